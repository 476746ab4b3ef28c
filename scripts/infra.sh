#!/usr/bin/env bash
# Installs, starts and stops the real infrastructure the stack runs on, on 127.0.0.1:
# HashiCorp Consul (built from the Go module proxy), Apache Kafka in KRaft mode (from Maven Central),
# PostgreSQL 15 + PostGIS (Debian), the Etsy StatsD daemon (npm) and Graphite carbon (Debian).
#
#   scripts/infra.sh install [component...]   idempotent; binaries cached under $KEEL_CACHE
#   scripts/infra.sh start   [component...]   waits for readiness, fails naming the component
#   scripts/infra.sh stop    [component...]   ends only the processes this script started (PID files)
#   scripts/infra.sh status | env
#   scripts/infra.sh clean-tests              drops the test suite's PostgreSQL databases (keeltest_*)
#
# Components: postgres consul kafka graphite statsd (default: all, in that order).
# `env` prints the KEEL_* / CONSUL_* exports that point the stack and its tests at these servers.
set -euo pipefail

CACHE=${KEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keel}
# The run directory must be reachable by the postgres user, so not under $HOME (often /root, mode 700).
RUN=${KEEL_RUN_DIR:-/var/tmp/keel}

CONSUL_VERSION=v1.22.7
# Consul's go.mod requires sub-module versions older than the code in its tree (which it builds through `replace`):
# a wrapper module needs the api sub-module at least at this version.
CONSUL_API_VERSION=v1.34.5
KAFKA_VERSION=4.1.1
# Kafka 4.1 resolves slf4j-api 1.7, so the log4j binding is the slf4j 1.x one (log4j-slf4j-impl).
KAFKA_LIBS_REV=2
STATSD_VERSION=0.9.0
GRPCURL_VERSION=v1.9.3
GHZ_VERSION=v0.120.0
WORLD_ATLAS_VERSION=2.0.2
GRPCIO_VERSION=1.85.3
GRPCIO_TOOLS_VERSION=1.85.1

# Ports: off the usual defaults so a machine's own servers never collide with ours.
PG_PORT=${KEEL_PG_PORT:-15432}
CONSUL_HTTP_PORT=${KEEL_CONSUL_HTTP_PORT:-18500}
CONSUL_DNS_PORT=${KEEL_CONSUL_DNS_PORT:-18600}
CONSUL_GRPC_PORT=${KEEL_CONSUL_GRPC_PORT:-18502}
CONSUL_SERF_LAN_PORT=${KEEL_CONSUL_SERF_LAN_PORT:-18301}
CONSUL_SERF_WAN_PORT=${KEEL_CONSUL_SERF_WAN_PORT:-18302}
CONSUL_SERVER_PORT=${KEEL_CONSUL_SERVER_PORT:-18300}
KAFKA_PORT=${KEEL_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${KEEL_KAFKA_CONTROLLER_PORT:-19093}
STATSD_PORT=${KEEL_STATSD_PORT:-18125}
# The address StatsD listens on (the fleet's ops machine listens on its network: scripts/fleet.sh).
STATSD_ADDRESS=${KEEL_STATSD_ADDRESS:-127.0.0.1}
STATSD_ADMIN_PORT=${KEEL_STATSD_ADMIN_PORT:-18126}
CARBON_PORT=${KEEL_CARBON_PORT:-12003}
CARBON_PICKLE_PORT=${KEEL_CARBON_PICKLE_PORT:-12004}
CARBON_QUERY_PORT=${KEEL_CARBON_QUERY_PORT:-17002}
GRAPHITE_WEB_PORT=${KEEL_GRAPHITE_WEB_PORT:-18080}

ALL=(postgres consul kafka graphite statsd)

log() { printf '[infra] %s\n' "$*" >&2; }
die() { printf '[infra] error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=lib/kafka.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/kafka.sh"

# Wait until "$2..." succeeds, at most $1 seconds; on timeout show the component's log tail.
wait_for() {
  local what=$1 secs=$2 logf=$3; shift 3
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= end)); then
      log "$what did not become ready within ${secs}s; last lines of $logf:"
      tail -n 30 "$logf" >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.5
  done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_alive() { local f=$1; [[ -f $f ]] && kill -0 "$(cat "$f")" 2>/dev/null; }

stop_pidfile() {
  local name=$1 f=$2
  if pid_alive "$f"; then
    local pid; pid=$(cat "$f")
    log "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { log "$name did not stop in 30s, killing"; kill -9 "$pid" 2>/dev/null || true; }
  fi
  rm -f "$f"
}

apt_install() {
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
  ((${#missing[@]} == 0)) && return 0
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ---------------------------------------------------------------- postgres
install_postgres() { apt_install postgresql-15 postgresql-15-postgis-3 postgresql-client-15; }

start_postgres() {
  local dir=$RUN/postgres bin=/usr/lib/postgresql/15/bin
  mkdir -p "$dir"; chown postgres:postgres "$dir"
  if [[ ! -f $dir/data/PG_VERSION ]]; then
    runuser -u postgres -- "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
      || { tail "$dir/initdb.log" >&2; die "postgres initdb failed"; }
  fi
  if runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then log "postgres already running"; return; fi
  runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" \
    -o "-p $PG_PORT -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" start >/dev/null
  wait_for postgres 30 "$dir/postgres.log" "$bin/pg_isready" -h 127.0.0.1 -p "$PG_PORT"
  psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc 'CREATE EXTENSION IF NOT EXISTS postgis' >/dev/null
  log "postgres ready on 127.0.0.1:$PG_PORT"
}

stop_postgres() {
  local dir=$RUN/postgres
  [[ -f $dir/data/postmaster.pid ]] || return 0
  log "stopping postgres"
  runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
}

# ---------------------------------------------------------------- consul
consul_bin() { echo "$CACHE/consul-$CONSUL_VERSION/consul"; }

install_consul() {
  local out; out=$(consul_bin)
  [[ -x $out ]] && return 0
  log "building consul $CONSUL_VERSION from the Go module proxy (several minutes, once)"
  local work; work=$(mktemp -d)
  (
    cd "$work"
    go mod init keel.local/consulbuild >/dev/null 2>&1
    # Consul's own go.mod excludes these msgpack versions; a wrapper module must repeat that.
    go mod edit -exclude=github.com/hashicorp/go-msgpack@v1.1.5 -exclude=github.com/hashicorp/go-msgpack@v1.1.6
    go get "github.com/hashicorp/consul@$CONSUL_VERSION" "github.com/hashicorp/consul/api@$CONSUL_API_VERSION"
    mkdir -p "$(dirname "$out")"
    GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -o "$out.tmp" github.com/hashicorp/consul
    mv "$out.tmp" "$out"
  )
  rm -rf "$work"
}

start_consul() {
  local dir=$RUN/consul
  mkdir -p "$dir"
  if pid_alive "$dir/consul.pid"; then log "consul already running"; return; fi
  CHECKPOINT_DISABLE=1 nohup "$(consul_bin)" agent -dev -node=keel -bind=127.0.0.1 -client=127.0.0.1 \
    -advertise=127.0.0.1 -http-port="$CONSUL_HTTP_PORT" -dns-port="$CONSUL_DNS_PORT" \
    -grpc-port="$CONSUL_GRPC_PORT" -serf-lan-port="$CONSUL_SERF_LAN_PORT" -serf-wan-port="$CONSUL_SERF_WAN_PORT" \
    -server-port="$CONSUL_SERVER_PORT" -hcl 'dns_config { service_ttl { "*" = "0s" } }' \
    >"$dir/consul.log" 2>&1 &
  echo $! >"$dir/consul.pid"
  wait_for consul 60 "$dir/consul.log" bash -c \
    "curl -sf http://127.0.0.1:$CONSUL_HTTP_PORT/v1/status/leader | grep -q 127.0.0.1"
  log "consul ready: http 127.0.0.1:$CONSUL_HTTP_PORT, dns 127.0.0.1:$CONSUL_DNS_PORT"
}

stop_consul() { stop_pidfile consul "$RUN/consul/consul.pid"; }

# ---------------------------------------------------------------- kafka
kafka_libs() { echo "$CACHE/kafka-$KAFKA_VERSION-r$KAFKA_LIBS_REV/libs"; }

install_kafka() {
  local libs; libs=$(kafka_libs)
  [[ -f $libs/.complete ]] && return 0
  log "resolving kafka $KAFKA_VERSION from Maven Central (once)"
  local work; work=$(mktemp -d)
  cat >"$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>keel.local</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>2.24.3</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>2.24.3</version></dependency>
  </dependencies>
</project>
EOF
  mkdir -p "$libs"
  mvn -q -B -f "$work/pom.xml" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$libs"
  touch "$libs/.complete"
  rm -rf "$work"
}

start_kafka() {
  local dir=$RUN/kafka
  mkdir -p "$dir/data"
  if pid_alive "$dir/kafka.pid"; then log "kafka already running"; return; fi
  cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=3
auto.create.topics.enable=true
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
  kafka_log4j "$dir"
  local cp; cp="$(kafka_libs)/*"
  if [[ ! -f $dir/data/meta.properties ]]; then
    local id; id=$(java -cp "$cp" org.apache.kafka.tools.StorageTool random-uuid 2>/dev/null \
      || java -cp "$cp" kafka.tools.StorageTool random-uuid)
    kafka_format "$cp" "$dir" "$id" --standalone
  fi
  nohup java -Xmx512m -Xms256m -XX:+UseSerialGC -cp "$cp" -Dlog4j2.configurationFile="$dir/log4j2.properties" \
    kafka.Kafka "$dir/server.properties" >"$dir/stdout.log" 2>&1 &
  echo $! >"$dir/kafka.pid"
  wait_for kafka 90 "$dir/stdout.log" bash -c \
    "grep -q 'Kafka Server started\|KafkaRaftServer.*started\|Kafka.*started' '$dir/server.log' && (exec 3<>/dev/tcp/127.0.0.1/$KAFKA_PORT)"
  log "kafka ready on 127.0.0.1:$KAFKA_PORT"
}

stop_kafka() { stop_pidfile kafka "$RUN/kafka/kafka.pid"; }

# ---------------------------------------------------------------- graphite (carbon)
install_graphite() { apt_install graphite-carbon python3-whisper graphite-web gunicorn python3-whitenoise; }

start_graphite() {
  local dir=$RUN/graphite
  mkdir -p "$dir/storage/whisper" "$dir/log" "$dir/conf"
  if pid_alive "$dir/carbon-cache-a.pid"; then log "carbon already running"; start_graphite_web; return; fi
  cat >"$dir/conf/carbon.conf" <<EOF
[cache]
STORAGE_DIR = $dir/storage/
LOCAL_DATA_DIR = $dir/storage/whisper/
WHITELISTS_DIR = $dir/storage/lists/
CONF_DIR = $dir/conf/
LOG_DIR = $dir/log/
PID_DIR = $dir/
ENABLE_LOGROTATION = False
USER =
MAX_CACHE_SIZE = inf
MAX_UPDATES_PER_SECOND = inf
MAX_CREATES_PER_MINUTE = inf
CACHE_WRITE_STRATEGY = sorted
LINE_RECEIVER_INTERFACE = 127.0.0.1
LINE_RECEIVER_PORT = $CARBON_PORT
ENABLE_UDP_LISTENER = False
PICKLE_RECEIVER_INTERFACE = 127.0.0.1
PICKLE_RECEIVER_PORT = $CARBON_PICKLE_PORT
CACHE_QUERY_INTERFACE = 127.0.0.1
CACHE_QUERY_PORT = $CARBON_QUERY_PORT
LOG_UPDATES = False
LOG_CACHE_HITS = False
WHISPER_AUTOFLUSH = True
EOF
  cat >"$dir/conf/storage-schemas.conf" <<EOF
[carbon]
pattern = ^carbon\.
retentions = 60:90d

[default]
pattern = .*
retentions = 1s:6h,1m:7d,10m:1y
EOF
  cat >"$dir/conf/storage-aggregation.conf" <<EOF
[counts]
pattern = ^stats_counts\.
xFilesFactor = 0
aggregationMethod = sum

[count]
pattern = \.count$
xFilesFactor = 0
aggregationMethod = sum

[default]
pattern = .*
xFilesFactor = 0
aggregationMethod = average
EOF
  carbon-cache --config="$dir/conf/carbon.conf" --pidfile="$dir/carbon-cache-a.pid" start >"$dir/log/start.log" 2>&1 \
    || { tail "$dir/log/start.log" >&2; die "carbon-cache failed to start"; }
  wait_for carbon 30 "$dir/log/console.log" port_open "$CARBON_PORT"
  log "carbon ready: line receiver 127.0.0.1:$CARBON_PORT, whisper under $dir/storage/whisper"
  start_graphite_web
}

# graphite-web (Debian's, Apache-2.0) under gunicorn on 127.0.0.1, reading carbon's whisper files (and its
# cache, for points not yet written), with its own settings and SQLite database under the run directory:
# nothing of /etc/graphite or /var/lib/graphite is used.
start_graphite_web() {
  local dir=$RUN/graphite web=$RUN/graphite/webapp
  if pid_alive "$dir/graphite-web.pid"; then log "graphite-web already running"; return; fi
  mkdir -p "$web" "$dir/log/webapp"
  [[ -f $dir/secret-key ]] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/secret-key"
  cat >"$web/keel_graphite_local.py" <<PY
SECRET_KEY = open('$dir/secret-key').read().strip()
ALLOWED_HOSTS = ['127.0.0.1', 'localhost']
TIME_ZONE = 'UTC'
GRAPHITE_ROOT = '/usr/share/graphite-web'
STATIC_ROOT = '$dir/static'
CONF_DIR = '$dir/conf'
STORAGE_DIR = '$dir/storage'
WHISPER_DIR = '$dir/storage/whisper'
STANDARD_DIRS = ['$dir/storage/whisper']
INDEX_FILE = '$dir/storage/index'
LOG_DIR = '$dir/log/webapp'
LOG_ROTATION = False
DEFAULT_XFILES_FACTOR = 0
CARBONLINK_HOSTS = ['127.0.0.1:$CARBON_QUERY_PORT:a']
DATABASES = {'default': {'ENGINE': 'django.db.backends.sqlite3', 'NAME': '$dir/graphite-web.db'}}
PY
  # graphite.settings sets STATICFILES_DIRS after reading local settings, to a directory Debian does not ship:
  # the dashboard's theme and scripts are found through this module instead.
  cat >"$web/keel_graphite_settings.py" <<PY
from graphite.settings import *  # noqa: F401,F403
STATICFILES_DIRS = ['/usr/share/graphite-web/static']
PY
  # Debian's graphite.wsgi mistakes WhiteNoise 6 (no __version__) for an old one: serve the dashboard's static
  # files with WhiteNoise in our own WSGI module instead. They are served from a copy, because Debian's XSS
  # patches (CVE-2022-4728..4730) call an `htmlEncode` that its dashboard.js never defines, which stops the
  # dashboard UI at the first named dashboard; the copy's dashboard.js first binds it to ExtJS's own encoder.
  rm -rf "$web/static" && cp -r /usr/share/graphite-web/static "$web/static"
  { echo 'var htmlEncode = Ext.util.Format.htmlEncode;'; cat /usr/share/graphite-web/static/js/dashboard.js; } \
    >"$web/static/js/dashboard.js"
  cat >"$web/keel_graphite_wsgi.py" <<PY
from django.core.wsgi import get_wsgi_application
from whitenoise import WhiteNoise
application = WhiteNoise(get_wsgi_application(), root='$web/static', prefix='static/')
PY
  local env=(env PYTHONPATH="$web" GRAPHITE_SETTINGS_MODULE=keel_graphite_local DJANGO_SETTINGS_MODULE=keel_graphite_settings)
  "${env[@]}" django-admin migrate --noinput >"$dir/log/webapp-migrate.log" 2>&1 \
    || { tail "$dir/log/webapp-migrate.log" >&2; die "graphite-web database set-up failed"; }
  "${env[@]}" gunicorn --daemon --bind "127.0.0.1:$GRAPHITE_WEB_PORT" --workers 2 --timeout 60 \
    --pid "$dir/graphite-web.pid" --error-logfile "$dir/log/webapp/gunicorn.log" keel_graphite_wsgi:application \
    || die "graphite-web failed to start"
  wait_for graphite-web 60 "$dir/log/webapp/gunicorn.log" curl -fsS "http://127.0.0.1:$GRAPHITE_WEB_PORT/version/"
  log "graphite-web ready: http://127.0.0.1:$GRAPHITE_WEB_PORT/ (render API, dashboards)"
}

stop_graphite() {
  stop_pidfile graphite-web "$RUN/graphite/graphite-web.pid"
  stop_pidfile carbon "$RUN/graphite/carbon-cache-a.pid"
}

# ---------------------------------------------------------------- statsd
install_statsd() {
  local dir=$CACHE/statsd-$STATSD_VERSION
  [[ -f $dir/node_modules/statsd/stats.js ]] && return 0
  log "installing statsd $STATSD_VERSION from npm (once)"
  mkdir -p "$dir"
  (cd "$dir" && npm install --no-audit --no-fund --loglevel=error "statsd@$STATSD_VERSION" >/dev/null)
}

start_statsd() {
  local dir=$RUN/statsd
  mkdir -p "$dir"
  if pid_alive "$dir/statsd.pid"; then log "statsd already running"; return; fi
  cat >"$dir/config.js" <<EOF
{
  address: "$STATSD_ADDRESS",
  port: $STATSD_PORT,
  mgmt_address: "127.0.0.1",
  mgmt_port: $STATSD_ADMIN_PORT,
  graphiteHost: "127.0.0.1",
  graphitePort: $CARBON_PORT,
  flushInterval: 1000,
  percentThreshold: [50, 90, 99],
  deleteIdleStats: true,
  backends: ["./backends/graphite"]
}
EOF
  # `exec`: the PID recorded is node's own, so `stop` ends the daemon itself (not a subshell it outlives).
  (cd "$CACHE/statsd-$STATSD_VERSION/node_modules/statsd" &&
    exec nohup node stats.js "$dir/config.js" >"$dir/statsd.log" 2>&1) &
  echo $! >"$dir/statsd.pid"
  wait_for statsd 30 "$dir/statsd.log" port_open "$STATSD_ADMIN_PORT"
  log "statsd ready: udp $STATSD_ADDRESS:$STATSD_PORT -> carbon 127.0.0.1:$CARBON_PORT"
}

stop_statsd() { stop_pidfile statsd "$RUN/statsd/statsd.pid"; }

# ---------------------------------------------------------------- tools used by tests
install_tools() {
  apt_install dnsutils curl kcat chromium systemd
  local bin=$CACHE/bin/grpcurl
  if [[ ! -x $bin ]]; then
    log "building grpcurl $GRPCURL_VERSION (once)"
    mkdir -p "$CACHE/bin"
    GOBIN=$CACHE/bin CGO_ENABLED=0 go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
  fi
  # Python grpcio (Apache-2.0): a gRPC implementation other than ours, for the interoperability tests (gzip).
  if [[ ! -x $CACHE/py/bin/python ]] || ! "$CACHE/py/bin/python" -c 'import grpc, grpc_tools' 2>/dev/null; then
    log "installing grpcio $GRPCIO_VERSION in $CACHE/py (once)"
    python3 -m venv "$CACHE/py"
    "$CACHE/py/bin/pip" install -q "grpcio==$GRPCIO_VERSION" "grpcio-tools==$GRPCIO_TOOLS_VERSION"
  fi
  # ghz (Apache-2.0), the load generator of `make bench`.
  if [[ ! -x $CACHE/bin/ghz ]]; then
    log "building ghz $GHZ_VERSION (once)"
    GOBIN=$CACHE/bin CGO_ENABLED=0 go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
  fi
  # Natural Earth's country polygons (public domain data; the npm package world-atlas, ISC): geo-search's data
  # set for tools/geo-loader and make bench.
  if [[ ! -f $CACHE/world-atlas/package/countries-110m.json ]]; then
    log "fetching world-atlas $WORLD_ATLAS_VERSION (once)"
    rm -rf "$CACHE/world-atlas" && mkdir -p "$CACHE/world-atlas"
    (cd "$CACHE/world-atlas" && npm pack --silent "world-atlas@$WORLD_ATLAS_VERSION" >/dev/null &&
      tar xzf "world-atlas-$WORLD_ATLAS_VERSION.tgz")
  fi
}

# Drops the databases the test suite creates (keel_common::testsuite::postgres names them keeltest_*): each run
# starts from none, so a machine that runs the tests every day does not fill its disk.
clean_tests() {
  port_open "$PG_PORT" || return 0
  local n=0 db
  for db in $(psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'keeltest\\_%'"); do
    psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" && n=$((n + 1))
  done
  log "dropped $n test databases"
}

print_env() {
  cat <<EOF
export KEEL_INFRA=1
export KEEL_RUN_DIR=$RUN
export KEEL_CACHE=$CACHE
export CONSUL_HTTP_ADDR=127.0.0.1:$CONSUL_HTTP_PORT
export KEEL_CONSUL_DNS_ADDR=127.0.0.1:$CONSUL_DNS_PORT
export KEEL_CONSUL__DNS_ADDR=127.0.0.1:$CONSUL_DNS_PORT
export KEEL_KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT
export KEEL_STATSD_ADDR=127.0.0.1:$STATSD_PORT
export KEEL_DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres
export KEEL_WHISPER_DIR=$RUN/graphite/storage/whisper
export KEEL_GRAPHITE_URL=http://127.0.0.1:$GRAPHITE_WEB_PORT
export KEEL_GRPCURL=$CACHE/bin/grpcurl
export KEEL_GHZ=$CACHE/bin/ghz
export KEEL_WORLD_ATLAS=$CACHE/world-atlas/package
export KEEL_PYTHON=$CACHE/py/bin/python
EOF
}

status() {
  printf '%-9s %s\n' postgres "$(port_open "$PG_PORT" && echo "up 127.0.0.1:$PG_PORT" || echo down)"
  printf '%-9s %s\n' consul "$(pid_alive "$RUN/consul/consul.pid" && echo "up http 127.0.0.1:$CONSUL_HTTP_PORT dns :$CONSUL_DNS_PORT" || echo down)"
  printf '%-9s %s\n' kafka "$(pid_alive "$RUN/kafka/kafka.pid" && echo "up 127.0.0.1:$KAFKA_PORT" || echo down)"
  printf '%-9s %s\n' graphite "$(pid_alive "$RUN/graphite/carbon-cache-a.pid" && echo "up 127.0.0.1:$CARBON_PORT web http://127.0.0.1:$GRAPHITE_WEB_PORT/" || echo down)"
  printf '%-9s %s\n' statsd "$(pid_alive "$RUN/statsd/statsd.pid" && echo "up udp 127.0.0.1:$STATSD_PORT" || echo down)"
}

cmd=${1:-status}; shift || true
comps=("$@"); ((${#comps[@]})) || comps=("${ALL[@]}")
mkdir -p "$CACHE" "$RUN"
case $cmd in
  install) for c in "${comps[@]}"; do "install_$c"; done ;;
  start) for c in "${comps[@]}"; do "start_$c"; done ;;
  stop) for ((i = ${#comps[@]} - 1; i >= 0; i--)); do "stop_${comps[i]}"; done ;;
  restart) for c in "${comps[@]}"; do "stop_$c"; "start_$c"; done ;;
  status) status ;;
  env) print_env ;;
  clean-tests) clean_tests ;;
  *) die "unknown command '$cmd' (install|start|stop|restart|status|env|clean-tests)" ;;
esac
