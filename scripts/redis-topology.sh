#!/usr/bin/env bash
# Starts and stops local Redis deployments on free ports, for tests:
#
#   redis-topology.sh start cluster DIR    3 masters + 3 replicas (redis-cli --cluster create)
#   redis-topology.sh start sentinel DIR   1 master + 1 replica + 3 sentinels, master "mymaster"
#   redis-topology.sh kill DIR PORT        SIGKILL the node on PORT (a failover test's fault)
#   redis-topology.sh stop DIR             kill every process and remove DIR
#
# `start` prints KEY=VALUE lines on stdout (TEST_REDIS_MODE, TEST_REDIS_URL, ...)
# that the end-to-end tests read from the environment; progress goes to stderr.
set -euo pipefail

log() { echo "redis-topology: $*" >&2; }

free_ports() { # COUNT: ports that are free with their cluster bus port (+10000)
  python3 - "$1" <<'PY'
import random, socket, sys
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
ports = []
while len(ports) < int(sys.argv[1]):
    port = random.randint(20000, 45000)
    if port not in ports and free(port) and free(port + 10000):
        ports.append(port)
print(" ".join(map(str, ports)))
PY
}

wait_for() { # DESCRIPTION TIMEOUT_S COMMAND...
  local what="$1" limit="$2"
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "timed out waiting for ${what}"
      return 1
    fi
    sleep 0.1
  done
}

answers() { [[ "$(redis-cli -p "$1" ping 2>/dev/null)" == PONG ]]; }

start_node() { # DIR PORT EXTRA-ARGS...
  local dir="$1" port="$2"
  shift 2
  mkdir -p "${dir}/${port}"
  redis-server --daemonize yes --bind 127.0.0.1 --port "${port}" --dir "${dir}/${port}" \
    --pidfile "${dir}/${port}.pid" --logfile "${dir}/${port}.log" --save "" --appendonly no \
    --enable-debug-command local "$@"
  wait_for "redis on ${port}" 10 answers "${port}"
}

cluster_ok() {
  local port
  for port in "$@"; do
    redis-cli -p "${port}" cluster info | grep -q '^cluster_state:ok' || return 1
  done
}

start_cluster() {
  local dir="$1" ports port nodes=()
  read -r -a ports <<<"$(free_ports 6)"
  for port in "${ports[@]}"; do
    start_node "${dir}" "${port}" --cluster-enabled yes \
      --cluster-config-file "${dir}/${port}/nodes.conf" --cluster-node-timeout 1000
    nodes+=("127.0.0.1:${port}")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"${dir}/create.log" 2>&1 ||
    { cat "${dir}/create.log" >&2; return 1; }
  wait_for "cluster_state:ok on every node" 30 cluster_ok "${ports[@]}"
  log "cluster up on ${ports[*]}"
  local urls
  urls="$(printf 'redis://127.0.0.1:%s,' "${ports[@]}")"
  echo "TEST_REDIS_MODE=cluster"
  echo "TEST_REDIS_URL=${urls%,}"
}

sentinels_ready() { # MASTER_PORT SENTINEL_PORTS...
  local master="$1" port
  shift
  for port in "$@"; do
    [[ "$(redis-cli -p "${port}" sentinel get-master-addr-by-name mymaster | tail -1)" == "${master}" ]] || return 1
    [[ "$(redis-cli -p "${port}" sentinel replicas mymaster | grep -c '^name$')" -ge 1 ]] || return 1
    # Each sentinel must know the two others, or there is no quorum to fail over.
    [[ "$(redis-cli -p "${port}" sentinel sentinels mymaster | grep -c '^name$')" -ge 2 ]] || return 1
  done
}

start_sentinel() {
  local dir="$1" ports master replica port sentinels=()
  read -r -a ports <<<"$(free_ports 5)"
  master="${ports[0]}"
  replica="${ports[1]}"
  start_node "${dir}" "${master}"
  start_node "${dir}" "${replica}" --replicaof 127.0.0.1 "${master}"
  for port in "${ports[@]:2}"; do
    mkdir -p "${dir}/${port}"
    cat >"${dir}/${port}/sentinel.conf" <<CONF
port ${port}
bind 127.0.0.1
daemonize yes
pidfile ${dir}/${port}.pid
logfile ${dir}/${port}.log
dir ${dir}/${port}
sentinel monitor mymaster 127.0.0.1 ${master} 2
sentinel down-after-milliseconds mymaster 1000
sentinel failover-timeout mymaster 5000
sentinel parallel-syncs mymaster 1
CONF
    redis-server "${dir}/${port}/sentinel.conf" --sentinel
    wait_for "sentinel on ${port}" 10 answers "${port}"
    sentinels+=("${port}")
  done
  wait_for "sentinels to agree on master, replica and each other" 60 \
    sentinels_ready "${master}" "${sentinels[@]}"
  log "sentinel up: master ${master}, replica ${replica}, sentinels ${sentinels[*]}"
  local urls
  urls="$(printf 'redis://127.0.0.1:%s,' "${sentinels[@]}")"
  echo "TEST_REDIS_MODE=sentinel"
  echo "TEST_REDIS_URL=${urls%,}"
  echo "TEST_REDIS_SENTINEL_MASTER=mymaster"
  echo "TEST_REDIS_MASTER_PORT=${master}"
  echo "TEST_REDIS_REPLICA_PORT=${replica}"
}

kill_node() { # DIR PORT
  local pidfile="$1/$2.pid"
  [[ -f "${pidfile}" ]] || { log "no node on port $2"; return 1; }
  kill -9 "$(cat "${pidfile}")" 2>/dev/null || true
  rm -f "${pidfile}"
}

stop_all() {
  local dir="$1" pidfile
  [[ -d "${dir}" ]] || return 0
  for pidfile in "${dir}"/*.pid; do
    [[ -f "${pidfile}" ]] && kill -9 "$(cat "${pidfile}")" 2>/dev/null || true
  done
  rm -rf "${dir}"
}

case "${1:-}" in
  start)
    [[ $# -eq 3 ]] || { log "usage: $0 start cluster|sentinel DIR"; exit 2; }
    mkdir -p "$3"
    dir="$(cd "$3" && pwd)"
    case "$2" in
      cluster) start_cluster "${dir}" ;;
      sentinel) start_sentinel "${dir}" ;;
      *) log "unknown topology '$2'"; exit 2 ;;
    esac
    ;;
  kill) kill_node "$2" "$3" ;;
  stop) stop_all "$2" ;;
  *) log "usage: $0 start cluster|sentinel DIR | kill DIR PORT | stop DIR"; exit 2 ;;
esac
