#!/usr/bin/env bash
# GetSession (with the user id hint) driven by h2load, an independent HTTP/2
# load generator written in C, next to redis-benchmark GET on the same private
# Redis in the same run (#15). The Rust load generator (benches/session_bench.rs)
# shares the server's HTTP/2 stack, so its own cost is part of what
# scripts/bench.sh measures; this driver is the cross-check.
#
# For each repeat: redis-benchmark -c C GET over 10,000 values of 240 bytes
# (as scripts/bench.sh), then h2load with 4 connections x C/4 streams sending
# one fixed GetSession (the request body is framed by `cargo run --release --example
# grpc_frame` from the contract's generated types) for DURATION seconds after
# a 1 s warm-up. Prints one markdown table; every call's grpc-status is
# checked afterwards against the server's metrics (non-OK calls are listed).
#
# Usage: scripts/bench-h2load.sh [--repeats N] [--duration S] [--concurrency C]
#   SERVER_BIN   a server binary to use instead of building the release one.
#   BENCH_PRIO   a command prefix for Redis, the server and both drivers, as
#                in scripts/bench.sh (e.g. "chrt -r 1").
# Needs redis-server, redis-benchmark and h2load (Debian: redis-server
# redis-tools nghttp2-client).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

REPEATS=2
DURATION=5
CONCURRENCY=64
CONNECTIONS=4
KEYSPACE=10000
read -r -a prio <<<"${BENCH_PRIO:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --repeats) REPEATS="$2"; shift ;;
    --duration) DURATION="$2"; shift ;;
    --concurrency) CONCURRENCY="$2"; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "bench-h2load: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
log() { printf 'bench-h2load: %s\n' "$*" >&2; }
for tool in redis-server redis-cli redis-benchmark h2load curl; do
  command -v "$tool" >/dev/null || { log "$tool is missing"; exit 1; }
done
if ((CONCURRENCY % CONNECTIONS != 0)); then
  log "--concurrency must be a multiple of $CONNECTIONS"; exit 2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/sessionstore-h2load.XXXXXX")"
redis_pid=""
server_pid=""
# Stops both processes this script started, by pid, whatever state each is
# in, then removes $work. Nothing here may fail under `set -e`: `kill` fails
# for a process that has exited already, and `wait` returns the signal's
# status (143) for one it killed, which used to end the trap before Redis
# was stopped.
cleanup() {
  local pid
  for pid in "$server_pid" "$redis_pid"; do
    [[ -z "$pid" ]] || kill "$pid" 2>/dev/null || true
  done
  for pid in "$server_pid" "$redis_pid"; do
    [[ -z "$pid" ]] || wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

if [[ -z "${SERVER_BIN:-}" ]]; then
  log "building (release)"
  SERVER_BIN="$(cargo build --release --locked -p session-server --bin session-server \
    --message-format=json-render-diagnostics \
    | sed -n 's/.*"executable":"\([^"]*session-server[^"]*\)".*/\1/p' | tail -n1)"
fi
[[ -x "$SERVER_BIN" ]] || { log "no server binary"; exit 1; }
user=h2load-u
token=h2load-t
cargo run --quiet --release --locked --example grpc_frame -- create "$user" "$token" >"$work/create.bin"
cargo run --quiet --release --locked --example grpc_frame -- get "$user" "$token" >"$work/get.bin"

redis_port="$(free_port)"
${prio[@]+"${prio[@]}"} redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$work" --logfile "$work/redis.log" &
redis_pid=$!
rcli() { redis-cli -p "$redis_port" "$@"; }
for _ in $(seq 100); do rcli ping >/dev/null 2>&1 && break; sleep 0.05; done
rcli ping >/dev/null

REDIS_URL="redis://127.0.0.1:$redis_port" LISTEN_ADDR=127.0.0.1:0 METRICS_ADDR=127.0.0.1:0 \
  LOG_FORMAT=json RUST_LOG=info ${prio[@]+"${prio[@]}"} "$SERVER_BIN" >"$work/server.log" 2>&1 &
server_pid=$!
# The addresses the server bound, from its log lines (gRPC, then metrics).
addr_of() {
  sed -n "s/.*\"addr\":\"\([^\"]*\)\".*\"message\":\"$1\".*/\1/p;s/.*\"message\":\"$1\".*\"addr\":\"\([^\"]*\)\".*/\1/p" \
    "$work/server.log" | head -n1
}
listen=""
for _ in $(seq 200); do
  listen="$(addr_of listening)"
  [[ -n "$listen" ]] && break
  sleep 0.05
done
[[ -n "$listen" ]] || { log "server did not start:"; cat "$work/server.log" >&2; exit 1; }
log "redis on :$redis_port, server on $listen"

h2() { # $1 = method, the rest h2load options
  local method="$1"; shift
  ${prio[@]+"${prio[@]}"} h2load -H 'content-type: application/grpc' -H 'te: trailers' \
    "$@" "http://$listen/sessionstore.v1.SessionStore/$method"
}
h2 CreateSession -n 1 -c 1 -d "$work/create.bin" >"$work/create.out"
grep -q "1 succeeded" "$work/create.out" || { log "CreateSession failed:"; cat "$work/create.out" >&2; exit 1; }

# 240-byte values, as the stored session (scripts/bench.sh).
redis-benchmark -p "$redis_port" -c 50 -P 16 -n $((KEYSPACE * 5)) -r "$KEYSPACE" -d 240 -t set -q >/dev/null
results="$work/results"
for repeat in $(seq "$REPEATS"); do
  log "repeat $repeat: redis-benchmark GET, c=$CONCURRENCY"
  cal="$(redis-benchmark -p "$redis_port" -c "$CONCURRENCY" -n 40000 -r "$KEYSPACE" --csv GET 'key:__rand_int__' \
    | awk -F, 'NR == 2 { gsub(/"/, "", $(NF - 6)); print $(NF - 6) }')"
  n="$(awk -v r="$cal" -v d="$DURATION" 'BEGIN { printf "%d", r * d }')"
  redis_line="$(${prio[@]+"${prio[@]}"} redis-benchmark -p "$redis_port" -c "$CONCURRENCY" -n "$n" -r "$KEYSPACE" \
    --csv GET 'key:__rand_int__' | awk -F, 'NR == 2 { for (i = NF - 6; i <= NF; i++) { gsub(/"/, "", $i); printf "%s ", $i } }')"
  log "repeat $repeat: h2load GetSession, $CONNECTIONS connections x $((CONCURRENCY / CONNECTIONS)) streams"
  h2 GetSession -c "$CONNECTIONS" -m "$((CONCURRENCY / CONNECTIONS))" -t 1 \
    --warm-up-time=1 -D "$DURATION" -d "$work/get.bin" >"$work/h2.$repeat.out"
  # "finished in 5.00s, 19876.40 req/s, ..." and "time for request: min max mean sd +/- sd".
  h2_rps="$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$work/h2.$repeat.out")"
  h2_mean="$(awk '/^time for request:/ { print $6 }' "$work/h2.$repeat.out")"
  h2_max="$(awk '/^time for request:/ { print $5 }' "$work/h2.$repeat.out")"
  h2_ok="$(sed -n 's/^status codes: \([0-9]*\) 2xx.*/\1/p' "$work/h2.$repeat.out")"
  h2_failed="$(sed -n 's/.* \([0-9]*\) failed, .*/\1/p' "$work/h2.$repeat.out" | head -n1)"
  echo "$repeat $redis_line $h2_rps $h2_mean $h2_max $h2_ok $h2_failed" >>"$results"
done

# Every GetSession's grpc-status, as the server counted them.
metrics_addr="$(addr_of 'metrics at \/metrics')"
codes="unknown (no metrics address in the log)"
if [[ -n "$metrics_addr" ]]; then
  codes="$(curl -s "http://$metrics_addr/metrics" \
    | sed -n 's/^sessionstore_rpc_requests_total{\(.*method="[^"]*GetSession"[^}]*\)} \(.*\)/\1 \2/p' \
    | sed -n 's/.*code="\([A-Z_]*\)".* \([0-9.e+]*\)$/\1=\2/p' | paste -sd' ')"
fi

echo
echo "GetSession (hint) by h2load vs Redis GET by redis-benchmark, c=$CONCURRENCY, $(date -u '+%Y-%m-%d %H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg), priority prefix: ${BENCH_PRIO:-none}"
echo
echo "| repeat | h2load rps | Redis GET rps | ratio | h2load mean | h2load max | Redis p50 ms | Redis p99 ms | 2xx | failed |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
# Columns: repeat, rps avg min p50 p95 p99 max (Redis), h2 rps mean max ok failed.
awk '{ printf "| %s | %.0f | %.0f | %.2f | %s | %s | %s | %s | %s | %s |\n", $1, $9, $2, $9 / $2, $10, $11, $5, $7, $12, $13 }' "$results"
echo
echo "GetSession calls by grpc-status (server metrics, warm-up included): $codes"
