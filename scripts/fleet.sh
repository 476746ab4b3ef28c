#!/usr/bin/env bash
# A fleet of machines inside this one: each machine a Linux network namespace with its own address on a bridge
# this script creates (10.77.0.0/24, private, nothing routed out), running what deploy/ gives a real machine:
#
#   server-1..3  10.77.0.11-13  Consul server (deploy/consul/server.hcl) and Kafka broker N (deploy/kafka/broker-N)
#   app-1..3     10.77.0.21-23  Consul client agent (deploy/consul/client.hcl) and service instances
#   pg           10.77.0.31     Consul client agent and PostgreSQL 15 + PostGIS
#   ops          10.77.0.41     Consul client agent, StatsD, carbon and graphite-web; where `keel` and load run
#
# Every service of deploy/fleet.toml runs its `instances` spread over app-1..3, with the environment of its
# deploy/systemd/<service>.env (rendered from fleet.toml: the same settings as the systemd units and the
# Kubernetes manifests), registers with its machine's Consul agent and finds its peers through that agent's
# DNS. Names (server-N/kafka-N/pg/ops.keel.internal) resolve through each namespace's /etc/netns/<ns>/hosts.
#
#   scripts/fleet.sh up               build nothing; start the machines and everything on them, wait until every
#                                     instance passes its checks (make fleet-up builds first)
#   scripts/fleet.sh down             stop every process started here (by PID), remove namespaces, bridge, files
#   scripts/fleet.sh status           machines, their link and processes; every instance by service, where it
#                                     runs and its Consul health
#   scripts/fleet.sh exec HOST CMD…   run CMD on machine HOST (e.g. `exec ops keel services`)
#   scripts/fleet.sh pid HOST NAME    the PID of process NAME on HOST (consul, kafka, <service>-<n>)
#   scripts/fleet.sh where SVC N      the machine of instance N (1-based) of service SVC
#   scripts/fleet.sh start SVC N      (re)starts instance N of SVC on its machine, if it is not running
#   scripts/fleet.sh start-agent HOST (re)starts the Consul agent of HOST
#   scripts/fleet.sh link HOST up|down  connects or cuts machine HOST's network link
#   scripts/fleet.sh list | passing   the services of fleet.toml; how many instances pass in Consul
#   scripts/fleet.sh not-passing      each instance down or not passing with its log's end, then what status shows of them
#   scripts/fleet.sh pg-stop | pg-start | kafka-start N… | secret NAME
#
# Local-fleet differences from production, each for a reason: services also log to a file (to read them here),
# the database password and the accounts operator token are made up at `up` into $FLEET/secrets.env.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every machine's agent is on its own loopback (127.0.0.1:8500): an address of the single-machine servers
# (`scripts/infra.sh env`, as `make test` exports it) must not leak into the machines' commands.
unset CONSUL_HTTP_ADDR CONSUL_HTTP_TOKEN CONSUL_GRPC_ADDR
ROOT=$PWD
FLEET=${KEEL_FLEET_DIR:-/var/tmp/keel-fleet}
BIN=${KEEL_FLEET_BIN:-$ROOT/target/debug}
CACHE=${KEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keel}
SUBNET=10.77.0
BRIDGE=keel-br0
DOMAIN=keel.internal
HOSTS=(server-1 server-2 server-3 app-1 app-2 app-3 pg ops)
APPS=(app-1 app-2 app-3)
declare -A OCTET=([server-1]=11 [server-2]=12 [server-3]=13 [app-1]=21 [app-2]=22 [app-3]=23 [pg]=31 [ops]=41)
PG_BIN=/usr/lib/postgresql/15/bin

log() { printf '[fleet] %s\n' "$*" >&2; }
die() { printf '[fleet] error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=lib/kafka.sh
source "$ROOT/scripts/lib/kafka.sh"
ns() { echo "keel-$1"; }
addr() { echo "$SUBNET.${OCTET[$1]}"; }
on() { local h=$1; shift; ip netns exec "$(ns "$h")" "$@"; }

consul_bin() { ls "$CACHE"/consul-*/consul 2>/dev/null | sort | tail -1; }
kafka_libs() { ls -d "$CACHE"/kafka-*/libs 2>/dev/null | sort | tail -1; }

# The services of deploy/fleet.toml: "name port instances database" per line.
services() {
  python3 - "$ROOT/deploy/fleet.toml" <<'PY'
import sys, tomllib
fleet = tomllib.load(open(sys.argv[1], "rb"))
for s in fleet["service"]:
    print(s["name"], s["port"], s.get("instances", 1), "yes" if s.get("database") else "no")
PY
}

# Waits until "$@" succeeds, at most $2 seconds; on timeout names $1 and shows the tail of log $3.
wait_for() {
  local what=$1 secs=$2 logf=$3; shift 3
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= end)); then
      [[ -f $logf ]] && tail -20 "$logf" >&2
      die "$what not ready after ${secs}s"
    fi
    sleep 1
  done
}

# Starts "$@" on machine $1 as process $2 (log and PID file under $FLEET/<host>/).
spawn() {
  local host=$1 name=$2; shift 2
  mkdir -p "$FLEET/$host"
  if [[ -f $FLEET/$host/$name.pid ]] && kill -0 "$(cat "$FLEET/$host/$name.pid")" 2>/dev/null; then return; fi
  # `ip netns exec` execs the command: the PID recorded is the process's own.
  nohup ip netns exec "$(ns "$host")" "$@" >>"$FLEET/$host/$name.log" 2>&1 </dev/null &
  echo $! >"$FLEET/$host/$name.pid"
}

# ---------------------------------------------------------------- network
net_up() {
  ip link show "$BRIDGE" >/dev/null 2>&1 || {
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
  }
  ip link set "$BRIDGE" up
  local hosts_file; hosts_file=$(mktemp)
  {
    echo "127.0.0.1 localhost"
    for h in "${HOSTS[@]}"; do
      local names="$h.$DOMAIN"
      [[ $h == server-* ]] && names="$names kafka-${h#server-}.$DOMAIN"
      echo "$(addr "$h") $names"
    done
  } >"$hosts_file"
  for h in "${HOSTS[@]}"; do
    local n; n=$(ns "$h")
    mkdir -p "/etc/netns/$n"
    # The namespaces share this machine's hostname: on each, it names that machine (as on a real one; Kafka
    # resolves it for its wildcard listeners).
    { cat "$hosts_file"; echo "$(addr "$h") $(hostname)"; } >"/etc/netns/$n/hosts"
    # No name server: the fleet resolves its names from hosts and services through Consul DNS only.
    echo "nameserver 127.0.0.1" >"/etc/netns/$n/resolv.conf"
    ip netns list | grep -qx "$n\( .*\)\?" || ip netns add "$n"
    if ! ip link show "kv-$h" >/dev/null 2>&1; then
      ip link add "kv-$h" type veth peer name eth0 netns "$n"
      ip link set "kv-$h" master "$BRIDGE"
      ip -n "$n" addr add "$(addr "$h")/24" dev eth0
    fi
    ip link set "kv-$h" up
    ip -n "$n" link set lo up
    ip -n "$n" link set eth0 up
  done
  rm -f "$hosts_file"
}

net_down() {
  for h in "${HOSTS[@]}"; do
    local n; n=$(ns "$h")
    ip link del "kv-$h" 2>/dev/null || true
    ip netns del "$n" 2>/dev/null || true
    rm -rf "/etc/netns/$n"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

# ---------------------------------------------------------------- consul
consul_up() {
  local consul; consul=$(consul_bin)
  [[ -x $consul ]] || die "consul not installed: run make infra-install"
  for h in "${HOSTS[@]}"; do
    mkdir -p "$FLEET/$h/consul"
    start_agent "$h"
  done
  wait_for "consul leader" 90 "$FLEET/server-1/consul.log" \
    bash -c "ip netns exec $(ns server-1) curl -sf http://127.0.0.1:8500/v1/status/leader | grep -q '$SUBNET'"
  wait_for "consul members" 60 "$FLEET/ops/consul.log" bash -c \
    "[[ \$(ip netns exec $(ns ops) $consul members -status=alive | tail -n +2 | wc -l) -ge ${#HOSTS[@]} ]]"
  log "consul: 3 servers, $((${#HOSTS[@]} - 3)) client agents, leader $(on server-1 curl -sf http://127.0.0.1:8500/v1/status/leader)"
}

# ---------------------------------------------------------------- kafka
kafka_up() {
  local libs; libs=$(kafka_libs)
  [[ -d $libs ]] || die "kafka not installed: run make infra-install"
  [[ -f $FLEET/kafka-cluster-id ]] ||
    { java -cp "$libs/*" org.apache.kafka.tools.StorageTool random-uuid 2>/dev/null ||
      java -cp "$libs/*" kafka.tools.StorageTool random-uuid; } | tail -1 >"$FLEET/kafka-cluster-id"
  for i in 1 2 3; do start_broker "$i"; done
  for i in 1 2 3; do wait_broker "$i"; done
  log "kafka: 3 brokers (replication factor 3, min.insync.replicas 2)"
}

# Starts Kafka broker $1 on server-$1 with deploy/kafka/broker-$1.properties (its data under $FLEET).
start_broker() {
  local i=$1 cp; cp="$(kafka_libs)/*"
  local dir=$FLEET/server-$i/kafka
  mkdir -p "$dir/data"
  sed -e "s|^log.dirs=.*|log.dirs=$dir/data|" "$ROOT/deploy/kafka/broker-$i.properties" >"$dir/server.properties"
  kafka_log4j "$dir"
  # The broker properties name the three voters, so no --standalone.
  [[ -f $dir/data/meta.properties ]] || kafka_format "$cp" "$dir" "$(cat "$FLEET/kafka-cluster-id")"
  spawn "server-$i" kafka java -Xmx384m -Xms128m -XX:+UseSerialGC -cp "$cp" \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" kafka.Kafka "$dir/server.properties"
}

wait_broker() {
  wait_for "kafka broker $1" 120 "$FLEET/server-$1/kafka/server.log" \
    on "server-$1" bash -c "exec 3<>/dev/tcp/$(addr "server-$1")/9092"
}

# ---------------------------------------------------------------- postgres
pg_up() {
  local dir=$FLEET/pg/postgres
  mkdir -p "$dir"; chown postgres:postgres "$dir"
  if [[ ! -f $dir/data/PG_VERSION ]]; then
    runuser -u postgres -- "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth-local=trust \
      --auth-host=scram-sha-256 -E UTF8 >"$dir/initdb.log" 2>&1 || { tail "$dir/initdb.log" >&2; die "initdb"; }
    echo "host all keel $SUBNET.0/24 scram-sha-256" >>"$dir/data/pg_hba.conf"
  fi
  if ! runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    on pg runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" \
      -o "-p 5432 -k $dir -c listen_addresses='$(addr pg),127.0.0.1' -c max_connections=400" start >/dev/null
  fi
  wait_for postgres 30 "$dir/postgres.log" on pg "$PG_BIN/pg_isready" -h 127.0.0.1 -p 5432
  local psql=(on pg runuser -u postgres -- psql -h "$dir" -p 5432 -qAt)
  "${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = 'keel'" | grep -q 1 ||
    "${psql[@]}" -c "CREATE ROLE keel LOGIN PASSWORD '$(secret KEEL_FLEET_DB_PASSWORD)'" >/dev/null
  while read -r svc _ _ database; do
    [[ $database == yes ]] || continue
    local db=fleet_${svc//-/_}
    "${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 ||
      "${psql[@]}" -c "CREATE DATABASE $db OWNER keel" >/dev/null
    # PostGIS is not a trusted extension: made here by the superuser, found by the migrations.
    "${psql[@]}" -d "$db" -c "CREATE EXTENSION IF NOT EXISTS postgis" >/dev/null
  done < <(services)
  log "postgres: $(addr pg):5432"
}

pg_down() {
  local dir=$FLEET/pg/postgres
  [[ -f $dir/data/postmaster.pid ]] || return 0
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
}

# ---------------------------------------------------------------- ops: statsd, carbon, graphite-web
ops_env() { echo "KEEL_RUN_DIR=$FLEET/ops/infra KEEL_CACHE=$CACHE KEEL_STATSD_PORT=8125 KEEL_STATSD_ADDRESS=$(addr ops)"; }

ops_up() {
  # shellcheck disable=SC2046
  on ops env $(ops_env) "$ROOT/scripts/infra.sh" start graphite statsd 2>"$FLEET/ops/infra.log" ||
    { tail "$FLEET/ops/infra.log" >&2; die "statsd/graphite on ops"; }
  log "ops: statsd udp $(addr ops):8125 -> carbon, graphite-web on ops:18080"
}

ops_down() {
  # shellcheck disable=SC2046
  [[ -d $FLEET/ops/infra ]] && env $(ops_env) "$ROOT/scripts/infra.sh" stop statsd graphite 2>/dev/null || true
}

# ---------------------------------------------------------------- secrets
# The fleet's made-up secrets (database password, accounts operator token), kept in $FLEET/secrets.env.
secret() {
  local f=$FLEET/secrets.env
  if [[ ! -s $f ]]; then
    (umask 077
      echo "KEEL_FLEET_DB_PASSWORD=$(head -c 24 /dev/urandom | base64 | tr -d '/+=\n')"
      echo "KEEL_FLEET_ADMIN_TOKEN=$(head -c 32 /dev/urandom | base64 | tr -d '/+=\n')") >"$f"
  fi
  sed -n "s/^$1=//p" "$f"
}

# ---------------------------------------------------------------- services
# The machine of instance $2 (0-based) of the $1-th service: instances spread over the app machines.
placement() { echo "${APPS[$((($1 + $2) % ${#APPS[@]}))]}"; }

# Starts instance $3 (1-based) of service $1 (database: $2) on machine $4.
start_instance() {
  local svc=$1 database=$2 n=$3 host=$4
  [[ -x $BIN/$svc ]] || die "$BIN/$svc missing: run make fleet-up (it builds)"
  local -a env=(PATH=/usr/bin:/bin HOME=/var/lib/keel)
  while IFS= read -r line; do
    [[ -z $line || $line == \#* ]] || env+=("$line")
  done <"$ROOT/deploy/systemd/$svc.env"
  env+=(KEEL_LOG__STDOUT=true "KEEL_SERVICE__INSTANCE_ID=$svc-$host-$n")
  local token; token=$(secret KEEL_FLEET_ADMIN_TOKEN)
  env+=("KEEL_ACCOUNTS__ADMIN_TOKEN=$token" "KEEL_CACHE__ACCOUNTS_TOKEN=$token")
  [[ $database == yes ]] &&
    env+=("KEEL_DATABASE__URL=postgres://keel:$(secret KEEL_FLEET_DB_PASSWORD)@pg.$DOMAIN:5432/fleet_${svc//-/_}")
  spawn "$host" "$svc-$n" env -i "${env[@]}" "$BIN/$svc"
}

# Every instance of the fleet, one per line: "service n machine database" (n 1-based, database yes|no).
instances() {
  local k=0
  while read -r svc _ count database; do
    for ((i = 0; i < count; i++)); do
      echo "$svc $((i + 1)) $(placement "$k" "$i") $database"
    done
    k=$((k + 1))
  done < <(services)
}

services_up() {
  local expected=0 svc n host database
  while read -r svc n host database; do
    start_instance "$svc" "$database" "$n" "$host"
    expected=$((expected + 1))
  done < <(instances)
  local end=$((SECONDS + 180)) got
  until got=$(passing) && ((got >= expected)); do
    if ((SECONDS >= end)); then
      not_passing >&2
      die "every instance passing not ready after 180s ($got of $expected passing)"
    fi
    restart_exited
    sleep 1
  done
  log "services: $expected instances passing"
}

# What the units' `Restart=always` does on a machine, while `up` waits: an instance whose process exited is
# started again (its log appended to), and how its log ended is shown.
restart_exited() {
  local svc n host database
  while read -r svc n host database; do
    local pidf=$FLEET/$host/$svc-$n.pid
    [[ -f $pidf ]] && ! kill -0 "$(cat "$pidf")" 2>/dev/null || continue
    log "$svc-$host-$n exited; started again. Its log ended: $(tail -2 "$FLEET/$host/$svc-$n.log" 2>/dev/null |
      cut -c1-400)"
    start_instance "$svc" "$database" "$n" "$host"
  done < <(instances)
}

# What keeps instances from passing: for each instance whose process is gone or whose checks do not all pass,
# its log's last warnings and errors and its last lines; then the machines and every check not passing.
not_passing() {
  local svc n host
  while read -r svc n host _; do
    local pidf=$FLEET/$host/$svc-$n.pid logf=$FLEET/$host/$svc-$n.log id=$svc-$host-$n state=running
    if [[ -f $pidf ]] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
      on ops curl -sf "http://127.0.0.1:8500/v1/health/service/$svc?passing" | grep -q "\"$id\"" && continue
    else
      state=exited
    fi
    echo "--- $id ($state; $logf)"
    { grep -E '"level":"(WARN|ERROR)"' "$logf" | tail -6 || true; tail -4 "$logf" || true; } 2>/dev/null | cut -c1-400
  done < <(instances)
  status | grep -Ev ' passing$' || true
}

# The number of passing instances of the fleet's services, as Consul sees them.
passing() {
  local total=0
  while read -r svc _ _ _; do
    local n
    n=$(on ops curl -sf "http://127.0.0.1:8500/v1/health/service/$svc?passing" |
      python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0)
    total=$((total + n))
  done < <(services)
  echo "$total"
}

# ---------------------------------------------------------------- up / down / status
up() {
  mkdir -p "$FLEET"
  net_up
  consul_up
  pg_up
  ops_up
  kafka_up
  services_up
  log "up: scripts/fleet.sh status; scripts/fleet.sh exec ops $BIN/keel services"
}

down() {
  # Services first (their shutdown deregisters them), then what they use; each group signalled at once.
  stop_all 30 "$FLEET"/app-*/*.pid
  stop_all 30 "$FLEET"/server-*/kafka.pid
  ops_down
  pg_down
  stop_all 20 "$FLEET"/*/consul.pid
  net_down
  rm -rf "$FLEET"
  log "down"
}

# SIGTERM the processes of PID files $2…, then SIGKILL those still running after $1 seconds.
stop_all() {
  local secs=$1; shift
  local pids=() f
  for f in "$@"; do
    [[ -f $f ]] || continue
    pids+=("$(cat "$f")")
    rm -f "$f"
  done
  ((${#pids[@]})) || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  local end=$((SECONDS + secs))
  while ((SECONDS < end)); do
    local alive=0 p
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.25
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}

status() {
  [[ -d $FLEET ]] || { echo "no fleet (make fleet-up)"; return; }
  printf '%-9s %-12s %-5s %s\n' MACHINE ADDRESS LINK PROCESSES
  for h in "${HOSTS[@]}"; do
    local link procs=""
    link=$(ip -br link show "kv-$h" 2>/dev/null | awk '{print $2}' || echo "-")
    for f in "$FLEET/$h"/*.pid; do
      [[ -f $f ]] || continue
      local name; name=$(basename "$f" .pid)
      kill -0 "$(cat "$f")" 2>/dev/null && procs="$procs $name" || procs="$procs $name(down)"
    done
    [[ $h == pg && -f $FLEET/pg/postgres/data/postmaster.pid ]] && procs="$procs postgres"
    printf '%-9s %-12s %-5s%s\n' "$h" "$(addr "$h")" "${link:--}" "$procs"
  done
  echo
  local names; names=$(services | awk '{print $1}' | tr '\n' ' ')
  on ops curl -sf "http://127.0.0.1:8500/v1/health/state/any" | python3 -c '
import json, sys
names = sys.argv[1].split()
checks = json.load(sys.stdin)
print("%-18s %-34s %-9s %s" % ("SERVICE", "INSTANCE", "MACHINE", "HEALTH"))
rows = []
for c in checks:
    if c.get("ServiceName") in names:
        rows.append((c["ServiceName"], c["ServiceID"], c["Node"], c["Status"]))
for r in sorted(rows):
    print("%-18s %-34s %-9s %s" % r)
' "$names" || echo "consul on ops does not answer"
}

pid_of() { cat "$FLEET/$1/$2.pid"; }

# The machine and database flag of instance $2 of service $1: "host database".
locate() {
  local k=0
  while read -r svc _ instances database; do
    if [[ $svc == "$1" ]]; then
      ((${2} >= 1 && ${2} <= instances)) || die "$1 has $instances instances"
      echo "$(placement "$k" $(($2 - 1))) $database"
      return
    fi
    k=$((k + 1))
  done < <(services)
  die "no service $1 in deploy/fleet.toml"
}

start_agent() {
  local h=$1 role=client
  [[ $h == server-* ]] && role=server
  spawn "$h" consul env CHECKPOINT_DISABLE=1 "$(consul_bin)" agent -config-file="$ROOT/deploy/consul/$role.hcl" \
    -data-dir="$FLEET/$h/consul" -node="$h"
}

[[ $(id -u) == 0 ]] || die "the fleet needs root (network namespaces)"
# One `up` or `down` at a time: a `down` racing an `up` removes namespaces the `up` is starting processes in.
# The lock is held by flock(1) around this script, its descriptor closed for the script (-o): the processes
# `up` leaves running must not inherit it, or a later `down` would wait for them forever. Waiting for another
# `up` or `down` ends after 15 minutes with exit status 75.
if [[ (${1:-} == up || ${1:-} == down) && -z ${KEEL_FLEET_LOCKED:-} ]]; then
  exec env KEEL_FLEET_LOCKED=1 flock -o -w 900 -E 75 "$FLEET.lock" "$ROOT/scripts/fleet.sh" "$@"
fi
case ${1:-status} in
  up) up ;;
  down) down ;;
  status) status ;;
  passing) passing ;;
  not-passing) not_passing ;;
  # exec: the command replaces this script, so a caller's signals reach it.
  exec) shift; h=$1; shift; exec ip netns exec "$(ns "$h")" "$@" ;;
  pid) pid_of "$2" "$3" ;;
  where) locate "$2" "$3" | cut -d' ' -f1 ;;
  start) read -r host database < <(locate "$2" "$3"); start_instance "$2" "$database" "$3" "$host" ;;
  start-agent) start_agent "$2" ;;
  link) ip link set "kv-$2" "$3" ;;
  list) services ;;
  secret) secret "$2" ;;
  pg-stop) pg_down ;;
  pg-start) pg_up ;;
  # Brokers are started together: one alone cannot reach a controller quorum and exits.
  kafka-start) shift; for i in "$@"; do start_broker "$i"; done; for i in "$@"; do wait_broker "$i"; done ;;
  *) die "usage: $0 up|down|status|exec HOST CMD…|pid HOST NAME" ;;
esac
