#!/usr/bin/env bash
# Starts every service of the workspace as its own process against the servers of scripts/infra.sh, each
# registered in Consul, logging to Kafka and sending metrics to StatsD. Run through `make up` / `make down`,
# which set the environment (scripts/infra.sh env).
#
#   scripts/cluster.sh start | stop | status
#
# INSTANCES (default 2) instances of each service; logs and PID files under $KEEL_RUN_DIR/cluster.
# Each service gets its own PostgreSQL database, kv_<service> (created here if missing); the
# instances of one service share it.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${KEEL_RUN_DIR:-/var/tmp/keel}/cluster
INSTANCES=${INSTANCES:-2}
# Release builds, as deployed (`make up` builds them); KEEL_BIN_DIR=target/debug for debug ones.
BIN=${KEEL_BIN_DIR:-target/release}
SERVICES=(echo video-lab user-management video-catalog comments ratings statistics search suggested-videos uploads accounts cache geo-search)
mkdir -p "$RUN"

start() {
  : "${CONSUL_HTTP_ADDR:?run through make up (the infra environment is not set)}"
  local admin=${KEEL_DATABASE_URL:?run through make up}
  # The accounts operator credential (accounts.admin_token), which the cache instances present too: made once,
  # kept beside the cluster's logs.
  local token_file=$RUN/admin-token
  [[ -s $token_file ]] || (umask 077; head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >"$token_file")
  local admin_token; admin_token=$(cat "$token_file")
  for svc in "${SERVICES[@]}"; do
    [[ -x $BIN/$svc ]] || { echo "$BIN/$svc is missing: build it first (make up does: cargo build --release --bins)" >&2; exit 1; }
  done
  for svc in "${SERVICES[@]}"; do
    local db=kv_${svc//-/_}
    psql "$admin" -qtAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 \
      || psql "$admin" -qc "CREATE DATABASE $db" >/dev/null
    for i in $(seq 1 "$INSTANCES"); do
      local pidf=$RUN/$svc-$i.pid
      if [[ -f $pidf ]] && kill -0 "$(cat "$pidf")" 2>/dev/null; then echo "$svc #$i already running"; continue; fi
      KEEL_CONSUL__DNS_ADDR=$KEEL_CONSUL_DNS_ADDR KEEL_KAFKA__BROKERS=$KEEL_KAFKA_BROKERS \
        KEEL_STATSD__ADDR=$KEEL_STATSD_ADDR KEEL_DATABASE__URL="${admin%/*}/$db" \
        KEEL_ACCOUNTS__ADMIN_TOKEN=$admin_token KEEL_CACHE__ACCOUNTS_TOKEN=$admin_token \
        nohup "$BIN/$svc" >"$RUN/$svc-$i.log" 2>&1 &
      echo $! >"$pidf"
      echo "started $svc #$i (pid $!, log $RUN/$svc-$i.log)"
    done
  done
  echo "consul: curl -s http://$CONSUL_HTTP_ADDR/v1/health/service/video-catalog?passing"
  echo "accounts operator token (authorization: Bearer …): $token_file"
}

stop() {
  for pidf in "$RUN"/*.pid; do
    [[ -f $pidf ]] || continue
    local pid; pid=$(cat "$pidf")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      echo "stopped $(basename "$pidf" .pid)"
    fi
    rm -f "$pidf"
  done
}

status() {
  for pidf in "$RUN"/*.pid; do
    [[ -f $pidf ]] || { echo "no service running"; return; }
    local pid; pid=$(cat "$pidf")
    printf '%-20s %s\n' "$(basename "$pidf" .pid)" "$(kill -0 "$pid" 2>/dev/null && echo "up (pid $pid)" || echo down)"
  done
}

case ${1:-status} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
