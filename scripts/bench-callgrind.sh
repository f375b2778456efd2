#!/usr/bin/env bash
# Counts the server's user-space instructions per call with callgrind, the
# yardstick BENCHMARKS.md uses for the hot path (#15): unlike rps, the count
# does not depend on what else the machine is doing.
#
# Builds the release server and the load generator, starts a private
# redis-server, pre-populates sessions through a native server, then runs the
# same server binary under `valgrind --tool=callgrind --instr-atstart=no` and,
# for each profile, counts only the window in which `session_bench` runs
# (`callgrind_control --instr=on`, then a dump). Prints one line per profile:
# instructions in the window / calls the generator completed in it.
#
# Usage: scripts/bench-callgrind.sh [--profiles "get-hint create revoke login"]
#                                   [--duration S] [--concurrency N] [--keep DIR]
#   --profiles  any of session_bench's RPC profiles; get-hint, revoke and
#               rotate read data populated before the server runs under
#               callgrind (rotate: 2,000 families of 400 users, whose current
#               tokens pass between runs in a file; login-device: 2,000
#               accounts' device tokens, likewise), so only their calls count.
#   --keep DIR  copies the callgrind dumps there (for callgrind_annotate).
# BENCH_BIN names a load generator built before, so only the server is built;
# SERVER_BIN a server binary built before (nothing is built then, e.g. to
# measure each step's build as built); MEASURED_BIN a binary to run under
# callgrind instead of the server (same environment, same port; the native
# server still pre-populates), e.g. session-server's example redis_floor.
# Needs valgrind (apt-get install valgrind).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

PROFILES="get-hint create revoke login"
DURATION=10
CONCURRENCY=8
KEEP=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profiles) PROFILES="$2"; shift ;;
    --duration) DURATION="$2"; shift ;;
    --concurrency) CONCURRENCY="$2"; shift ;;
    --keep) KEEP="$2"; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "bench-callgrind: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
for tool in valgrind callgrind_control redis-server redis-cli; do
  command -v "$tool" >/dev/null || { echo "bench-callgrind: $tool is missing" >&2; exit 1; }
done

work="$(mktemp -d "${TMPDIR:-/tmp}/sessionstore-callgrind.XXXXXX")"
pids=()
# Stops what this script started, by pid; a process already gone is fine.
cleanup() {
  local pid
  for pid in "${pids[@]+"${pids[@]}"}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
log() { printf 'bench-callgrind: %s\n' "$*" >&2; }

log "building (release)"
server_bin="${SERVER_BIN:-$(cargo build --release --locked -p session-server --bin session-server \
  --message-format=json-render-diagnostics | executable session-server)}"
measured_bin="${MEASURED_BIN:-$server_bin}"
# BENCH_BIN: a load generator built before (it need not change with the server).
bench_bin="${BENCH_BIN:-$(cargo build --release --locked -p sessionstore --bench session_bench \
  --message-format=json-render-diagnostics | executable session_bench)}"
[[ -x "$bench_bin" && -x "$server_bin" && -x "$measured_bin" ]] || { log "build produced no binaries"; exit 1; }

redis_port="$(free_port)"
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$work" --logfile "$work/redis.log" &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done

port="$(free_port)"
url="http://127.0.0.1:$port"
# The same settings for the native and the callgrind run.
server_env=(REDIS_URL="redis://127.0.0.1:$redis_port" LISTEN_ADDR="127.0.0.1:$port"
  METRICS_ADDR=127.0.0.1:0 LOG_FORMAT=json RUST_LOG=warn KEY_PREFIX=cg)
wait_listening() {
  for _ in $(seq 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  log "server did not listen on :$port"; cat "$work"/server*.log >&2; exit 1
}
# Each profile reads its own sessions: run ids name the users and tokens.
bench() { "$bench_bin" --url "$url" "$@" 2>>"$work/bench.log"; }

log "pre-populating through a native server"
env "${server_env[@]}" "$server_bin" >"$work/server-native.log" 2>&1 &
native=$!
pids+=("$native")
wait_listening
bench --run-id cg-get --profile get-hint --keyspace 1000 --users 200 --duration 0.1 --warmup 0 >/dev/null
bench --run-id cg-revoke --profile revoke --keyspace 20000 --users 4000 --duration 0.1 --warmup 0 >/dev/null
# Families: the server makes their ids, so the file carries them (and each
# family's current token) from one run to the next; each run names its new
# tokens by its own run id.
families="$work/families"
if [[ " $PROFILES " == *" rotate "* ]]; then
  bench --run-id cg-rot-pop --profile rotate --keyspace 2000 --users 400 --families "$families" \
    --duration 0.1 --warmup 0 >/dev/null
fi
devices="$work/devices"
if [[ " $PROFILES " == *" login-device "* ]]; then
  bench --run-id cg-dev --profile login-device --users 2000 --devices "$devices" \
    --duration 0.1 --warmup 0 >/dev/null
fi
kill "$native"; wait "$native" 2>/dev/null || true

log "server under callgrind"
(cd "$work" && exec env "${server_env[@]}" valgrind --tool=callgrind --instr-atstart=no \
  --callgrind-out-file="$work/cg.out.%p" "$measured_bin" >"$work/server-cg.log" 2>&1) &
cg=$!
pids+=("$cg")
wait_listening
# One untimed call each, so lazy set-up (connections, script loading) is not counted.
for profile in $PROFILES; do
  case "$profile" in
    get-hint) bench --run-id cg-get --no-populate --profile get-hint --keyspace 1000 --users 200 --duration 0.5 --warmup 0 >/dev/null ;;
    revoke) ;;
    rotate) bench --run-id cg-rot-warm --no-populate --profile rotate --families "$families" --duration 0.5 --warmup 0 >/dev/null ;;
    login-device) bench --run-id cg-dev --no-populate --profile login-device --devices "$devices" --keyspace 60000 --duration 0.5 --warmup 0 >/dev/null ;;
    *) bench --profile "$profile" --keyspace 60000 --users 100000 --duration 0.5 --warmup 0 >/dev/null ;;
  esac
done

printf '| profile | calls | instructions | per call |\n|---|---:|---:|---:|\n'
for profile in $PROFILES; do
  case "$profile" in
    get-hint) args=(--run-id cg-get --no-populate --keyspace 1000 --users 200) ;;
    revoke) args=(--run-id cg-revoke --no-populate --keyspace 20000 --users 4000) ;;
    rotate) args=(--run-id cg-rot --no-populate --families "$families") ;;
    login-device) args=(--run-id cg-dev --no-populate --devices "$devices" --keyspace 60000) ;;
    *) args=(--keyspace 60000 --users 100000) ;;
  esac
  callgrind_control -z "$cg" >/dev/null
  callgrind_control --instr=on "$cg" >/dev/null
  line="$(bench --profile "$profile" "${args[@]}" --concurrency "$CONCURRENCY" \
    --duration "$DURATION" --warmup 0)"
  callgrind_control --instr=off "$cg" >/dev/null
  callgrind_control -d "$profile" "$cg" >/dev/null
  dump="$(ls -t "$work"/cg.out.* | head -n1)"
  total="$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$dump" | head -n1)"
  calls="$(field "$line" requests)"
  [[ -n "$total" && -n "$calls" && "$calls" -gt 0 ]] || { log "no count for $profile: $line"; exit 1; }
  # A count of the wrong thing (a rotate that did not rotate, a get that
  # found nothing) is no count: say so.
  [[ "$(field "$line" errors)" == 0 && "$(field "$line" misses)" == 0 ]] \
    || log "$profile: $(field "$line" errors) errors, $(field "$line" misses) misses: $line"
  printf '| %s | %d | %d | %d |\n' "$profile" "$calls" "$total" $((total / calls))
  # Numbered by window, so a profile given twice keeps both dumps.
  window=$((${window:-0} + 1))
  if [[ -n "$KEEP" ]]; then mkdir -p "$KEEP"; cp "$dump" "$KEEP/callgrind.out.$window.$profile"; fi
done
