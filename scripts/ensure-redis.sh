#!/usr/bin/env bash
# Makes sure redis-server is installed (the tests start private ones) and that a
# Redis answers at 127.0.0.1:6379, starting one when none does. Idempotent.
# Also installs faketime (libfaketime), which the near-cache's clock-skew test
# runs a client under (tests/e2e/near_cache.rs); that test fails without it.
set -euo pipefail

REDIS_PORT="${REDIS_PORT:-6379}"

redis_answers() {
  # A PING over bash's /dev/tcp: needs no client tools.
  local reply
  exec 3<>"/dev/tcp/127.0.0.1/${REDIS_PORT}" 2>/dev/null || return 1
  printf 'PING\r\n' >&3
  IFS= read -r -t 2 reply <&3 || true
  exec 3<&- 3>&-
  [[ "${reply}" == +PONG* ]]
}

as_root() {
  if [[ "$(id -u)" -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

missing=()
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  missing+=(redis-server)
fi
if ! command -v faketime >/dev/null; then
  missing+=(faketime)
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "ensure-redis: installing ${missing[*]} with apt-get"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if redis_answers; then
  echo "ensure-redis: using the Redis at 127.0.0.1:${REDIS_PORT}"
  exit 0
fi

echo "ensure-redis: starting redis-server on 127.0.0.1:${REDIS_PORT}"
dir="${TMPDIR:-/tmp}/sessionstore-redis-${REDIS_PORT}"
mkdir -p "${dir}"
redis-server --daemonize yes --bind 127.0.0.1 --port "${REDIS_PORT}" \
  --save "" --appendonly no --dir "${dir}" --logfile "${dir}/redis.log"
for _ in $(seq 1 100); do
  if redis_answers; then
    echo "ensure-redis: Redis is up"
    exit 0
  fi
  sleep 0.1
done
echo "ensure-redis: Redis did not answer on 127.0.0.1:${REDIS_PORT}; see ${dir}/redis.log" >&2
exit 1
