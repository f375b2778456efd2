#!/usr/bin/env bash
# Runs the end-to-end suite again against a local Redis Cluster (3 masters, 3
# replicas) and a Sentinel deployment (master, replica, 3 sentinels), each
# started on free ports by scripts/redis-topology.sh and torn down after. The
# failover and eviction tests start their own deployments of every topology,
# the kubernetes and traces tests their own standalone Redis and server
# processes (or none), so they are not repeated here.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh >/dev/null

work="$(mktemp -d)"
cleanup() {
  for topology in cluster sentinel; do
    scripts/redis-topology.sh stop "${work}/${topology}" || true
  done
  rm -rf "${work}"
}
trap cleanup EXIT

for topology in cluster sentinel; do
  echo "=== end-to-end suite on ${topology}"
  env_lines="$(scripts/redis-topology.sh start "${topology}" "${work}/${topology}")"
  (
    while IFS= read -r line; do export "${line?}"; done <<<"${env_lines}"
    cargo test --locked --test e2e -- --skip failover:: --skip eviction:: --skip kubernetes:: \
      --skip traces::
  )
  scripts/redis-topology.sh stop "${work}/${topology}"
done
