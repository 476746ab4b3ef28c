# Kafka helpers shared by scripts/infra.sh (one broker on 127.0.0.1) and scripts/fleet.sh (three brokers on the
# fleet's machines). Sourced; the caller defines `die`.

# Writes DIR/log4j2.properties: the broker's log to DIR/server.log.
kafka_log4j() {
  local dir=$1
  cat >"$dir/log4j2.properties" <<EOF2
rootLogger.level=INFO
rootLogger.appenderRef.file.ref=FILE
appender.file.type=File
appender.file.name=FILE
appender.file.fileName=$dir/server.log
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
EOF2
}

# Formats the storage of the broker configured in DIR/server.properties for cluster id ID, with the libraries
# CP (a classpath); extra arguments (`--standalone`) go to the newer tool. The tool's class moved between Kafka
# releases: the newer name first, then the older.
kafka_format() {
  local cp=$1 dir=$2 id=$3
  shift 3
  java -cp "$cp" -Dlog4j2.configurationFile="$dir/log4j2.properties" org.apache.kafka.tools.StorageTool format \
    -t "$id" -c "$dir/server.properties" "$@" >"$dir/format.log" 2>&1 ||
    java -cp "$cp" -Dlog4j2.configurationFile="$dir/log4j2.properties" kafka.tools.StorageTool format \
      -t "$id" -c "$dir/server.properties" >"$dir/format.log" 2>&1 ||
    { tail "$dir/format.log" >&2; die "kafka storage format failed ($dir)"; }
}
