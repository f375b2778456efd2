#!/usr/bin/env bash
# How we compare (#15): GetSession with the user id hint next to what a caller
# would otherwise use, measured in one run on this machine:
#   Redis GET     redis-benchmark GET of 240-byte values, as a caller reading
#                 Redis directly (as scripts/bench.sh);
#   echo floor    examples/echo_floor.rs, a bare tonic server answering a fixed
#                 session from memory (no Redis, no layers, default settings,
#                 the server's runtime and allocator): the floor of any tonic
#                 service;
#   SessionStore  the release server over a private Redis (no persistence).
# Both gRPC targets are driven by both of the project's drivers: h2load
# (CONNECTIONS connections x C/CONNECTIONS streams, one GetSession framed by
# examples/grpc_frame.rs) and benches/session_bench.rs (get-hint, C tasks over
# CONNECTIONS connections; --no-populate against the echo). A repeat runs the
# five measurements back to back, in reverse order on even repeats, so a
# drift in the machine's load falls on both sides.
#
# Prints one markdown table: medians over the repeats, the ratios' range in
# brackets (each ratio taken within one repeat). p99 is over every call of
# the measured window (h2load's --log-file, session_bench's histogram,
# redis-benchmark's own). CPU per call is the target's (and Redis's) CPU
# time from /proc/PID/stat over the window, divided by the calls counted.
# Every session_bench call must find its session, and every SessionStore
# GetSession's grpc-status is checked in the server's metrics.
#
# Usage: scripts/bench-compare.sh [--repeats N] [--duration S] [--concurrency C]
#   SERVER_BIN, BENCH_BIN, ECHO_BIN, FRAME_BIN  the release session-server,
#                session_bench, echo_floor and grpc_frame to use instead of
#                building them (scripts/bench.sh --compare passes the first two).
#   BENCH_PRIO   a command prefix for Redis, both servers and every driver, as
#                in scripts/bench.sh (e.g. "chrt -r 1").
#   BENCH_THREADS  session_bench's worker threads (default 1, as bench.sh).
#   BENCH_RAW    a file to copy the raw result lines to (bench.sh --compare:
#                its own BENCH_RAW with .compare appended).
# Needs redis-server, redis-benchmark, h2load and curl (Debian: redis-server
# redis-tools nghttp2-client curl).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

REPEATS=3
DURATION=5
WARMUP=1
CONCURRENCY=64
CONNECTIONS=4
KEYSPACE=10000
GET_USERS=2000
BENCH_THREADS="${BENCH_THREADS:-1}"
read -r -a prio <<<"${BENCH_PRIO:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --repeats) REPEATS="$2"; shift ;;
    --duration) DURATION="$2"; shift ;;
    --concurrency) CONCURRENCY="$2"; shift ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "bench-compare: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
log() { printf 'bench-compare: %s\n' "$*" >&2; }
for tool in redis-server redis-cli redis-benchmark h2load curl; do
  command -v "$tool" >/dev/null || { log "$tool is missing"; exit 1; }
done
if ((CONCURRENCY % CONNECTIONS != 0)); then
  log "--concurrency must be a multiple of $CONNECTIONS"; exit 2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/sessionstore-compare.XXXXXX")"
redis_pid=""
server_pid=""
echo_pid=""
# Stops the processes this script started, by pid, whatever state each is in
# (`kill` fails for one that has exited, `wait` returns 143 for one it
# killed: neither may end the trap early under `set -e`), then removes $work.
cleanup() {
  local pid
  for pid in "$echo_pid" "$server_pid" "$redis_pid"; do
    [[ -z "$pid" ]] || kill "$pid" 2>/dev/null || true
  done
  for pid in "$echo_pid" "$server_pid" "$redis_pid"; do
    [[ -z "$pid" ]] || wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# Built the way scripts/bench.sh builds them, the server on its own and the
# root package's targets together: packages built in one cargo call unify
# their dependencies' features, so another grouping would compile (and link,
# with fat LTO) other binaries.
if [[ -z "${SERVER_BIN:-}" ]]; then
  log "building session-server (release)"
  SERVER_BIN="$(cargo build --release --locked -p session-server --bin session-server \
    --message-format=json-render-diagnostics | executable session-server)"
fi
if [[ -z "${BENCH_BIN:-}" || -z "${ECHO_BIN:-}" || -z "${FRAME_BIN:-}" ]]; then
  log "building session_bench, echo_floor and grpc_frame (release)"
  targets=(--example echo_floor --example grpc_frame)
  [[ -n "${BENCH_BIN:-}" ]] || targets+=(--bench session_bench)
  built="$(cargo build --release --locked -p sessionstore "${targets[@]}" --message-format=json-render-diagnostics \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')"
  BENCH_BIN="${BENCH_BIN:-$(grep '/session_bench-[^/]*$' <<<"$built" | tail -n1)}"
  ECHO_BIN="${ECHO_BIN:-$(grep '/echo_floor$' <<<"$built" | tail -n1)}"
  FRAME_BIN="${FRAME_BIN:-$(grep '/grpc_frame$' <<<"$built" | tail -n1)}"
fi
for bin in "$SERVER_BIN" "$BENCH_BIN" "$ECHO_BIN" "$FRAME_BIN"; do
  [[ -x "$bin" ]] || { log "not an executable: '$bin'"; exit 1; }
done
user=compare-u
token=compare-t
"$FRAME_BIN" create "$user" "$token" >"$work/create.bin"
"$FRAME_BIN" get "$user" "$token" >"$work/get.bin"

redis_port="$(free_port)"
${prio[@]+"${prio[@]}"} redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$work" --logfile "$work/redis.log" &
redis_pid=$!
rcli() { redis-cli -p "$redis_port" "$@"; }
for _ in $(seq 100); do rcli ping >/dev/null 2>&1 && break; sleep 0.05; done
rcli ping >/dev/null || { log "redis did not start:"; cat "$work/redis.log" >&2; exit 1; }

REDIS_URL="redis://127.0.0.1:$redis_port" LISTEN_ADDR=127.0.0.1:0 METRICS_ADDR=127.0.0.1:0 \
  LOG_FORMAT=json RUST_LOG=info ${prio[@]+"${prio[@]}"} "$SERVER_BIN" >"$work/server.log" 2>&1 &
server_pid=$!
${prio[@]+"${prio[@]}"} "$ECHO_BIN" 127.0.0.1:0 >"$work/echo.log" 2>&1 &
echo_pid=$!
# The addresses the server bound, from its log lines (gRPC, then metrics).
addr_of() {
  sed -n "s/.*\"addr\":\"\([^\"]*\)\".*\"message\":\"$1\".*/\1/p;s/.*\"message\":\"$1\".*\"addr\":\"\([^\"]*\)\".*/\1/p" \
    "$work/server.log" | head -n1
}
listen=""
echo_addr=""
for _ in $(seq 200); do
  listen="$(addr_of listening)"
  echo_addr="$(sed -n 's/^listening on //p' "$work/echo.log" | head -n1)"
  [[ -n "$listen" && -n "$echo_addr" ]] && break
  sleep 0.05
done
[[ -n "$listen" ]] || { log "server did not start:"; cat "$work/server.log" >&2; exit 1; }
[[ -n "$echo_addr" ]] || { log "echo_floor did not start:"; cat "$work/echo.log" >&2; exit 1; }
log "redis on :$redis_port (pid $redis_pid), server on $listen (pid $server_pid), echo on $echo_addr (pid $echo_pid)"

h2() { # $1 = address, $2 = method, the rest h2load options
  local addr="$1" method="$2"; shift 2
  ${prio[@]+"${prio[@]}"} h2load -H 'content-type: application/grpc' -H 'te: trailers' \
    "$@" "http://$addr/sessionstore.v1.SessionStore/$method"
}
h2 "$listen" CreateSession -n 1 -c 1 -d "$work/create.bin" >"$work/create.out"
grep -q "1 succeeded" "$work/create.out" || { log "CreateSession failed:"; cat "$work/create.out" >&2; exit 1; }

# The GetSession answer's length (DATA bytes of one call, gRPC framing
# included): the echo's fixed session should be as long as the server's.
answer_bytes() {
  h2 "$1" GetSession -n 1 -c 1 -d "$work/get.bin" | sed -n 's/.*(\([0-9]*\)) data$/\1/p'
}
echo_bytes="$(answer_bytes "$echo_addr")"
svc_bytes="$(answer_bytes "$listen")"

# 240-byte values, as the stored session (scripts/bench.sh).
redis-benchmark -p "$redis_port" -c 50 -P 16 -n $((KEYSPACE * 5)) -r "$KEYSPACE" -d 240 -t set -q >/dev/null

results="$work/results"
: >"$results"

# Each measurement appends "repeat target driver rps p99_ms cpu_target_us cpu_redis_us".
measure_redis() {
  local repeat="$1" cal n before after line
  cal="$(${prio[@]+"${prio[@]}"} redis-benchmark -p "$redis_port" -c "$CONCURRENCY" -n 40000 -r "$KEYSPACE" \
    --csv GET 'key:__rand_int__' | awk -F, 'NR == 2 { gsub(/"/, "", $(NF - 6)); print $(NF - 6) }')"
  n="$(awk -v r="$cal" -v d="$DURATION" 'BEGIN { printf "%d", r * d }')"
  before="$(cpu_of "$redis_pid")"
  # rps avg min p50 p95 p99 max (ms), counted from the end of the CSV line.
  line="$(${prio[@]+"${prio[@]}"} redis-benchmark -p "$redis_port" -c "$CONCURRENCY" -n "$n" -r "$KEYSPACE" \
    --csv GET 'key:__rand_int__' | awk -F, 'NR == 2 { for (i = NF - 6; i <= NF; i++) { gsub(/"/, "", $i); printf "%s ", $i } }')"
  after="$(cpu_of "$redis_pid")"
  awk -v r="$repeat" -v n="$n" -v b="$before" -v a="$after" -v l="$line" 'BEGIN {
    split(l, f, " "); printf "%s redis rb %s %s %.2f %.2f\n", r, f[1], f[6], (a - b) * 1e6 / n, (a - b) * 1e6 / n }' >>"$results"
}

# $1 = repeat, $2 = target (echo or svc). The CPU window starts after the
# warm-up and ends with h2load: within a few ms of the measured window.
measure_h2load() {
  local repeat="$1" target="$2" addr pid h2pid c0 c1 r0 r1 out="$work/h2.$1.$2"
  if [[ "$target" == echo ]]; then addr="$echo_addr" pid="$echo_pid"; else addr="$listen" pid="$server_pid"; fi
  h2 "$addr" GetSession -c "$CONNECTIONS" -m "$((CONCURRENCY / CONNECTIONS))" -t 1 \
    --warm-up-time="$WARMUP" -D "$DURATION" -d "$work/get.bin" --log-file="$out.log" >"$out.out" &
  h2pid=$!
  sleep "$WARMUP"
  c0="$(cpu_of "$pid")" r0="$(cpu_of "$redis_pid")"
  wait "$h2pid"
  c1="$(cpu_of "$pid")" r1="$(cpu_of "$redis_pid")"
  local failed
  failed="$(sed -n 's/.* \([0-9]*\) failed, .*/\1/p' "$out.out" | head -n1)"
  [[ "$failed" == 0 ]] || log "h2load against $target: $failed failed requests"
  # The log holds the measured window's requests only: start (µs), status, duration (µs).
  sort -n -k3,3 "$out.log" | awk -v r="$repeat" -v t="$target" -v d="$DURATION" \
    -v c="$(awk -v a="$c0" -v b="$c1" 'BEGIN { print b - a }')" -v rc="$(awk -v a="$r0" -v b="$r1" 'BEGIN { print b - a }')" '
    $2 != 200 { bad++ } { v[NR] = $3 }
    END {
      i = int(NR * 0.99); if (i < NR * 0.99) i++
      printf "%s %s h2 %.0f %.3f %.2f %.2f bad=%d\n", r, t, NR / d, v[i] / 1000, c * 1e6 / NR, rc * 1e6 / NR, bad
    }' >>"$results"
}

# $1 = repeat, $2 = target (echo or svc).
measure_bench() {
  local repeat="$1" target="$2" url pid line populate=(--no-populate)
  if [[ "$target" == echo ]]; then url="http://$echo_addr" pid="$echo_pid"; else url="http://$listen" pid="$server_pid"; fi
  # The server's sessions are made once, by its first run; the echo needs none.
  if [[ "$target" == svc && ! -e "$work/populated" ]]; then populate=(); touch "$work/populated"; fi
  line="$(${prio[@]+"${prio[@]}"} "$BENCH_BIN" --url "$url" --connections "$CONNECTIONS" \
    --concurrency "$CONCURRENCY" --warmup "$WARMUP" --duration "$DURATION" --profile get-hint \
    --users "$GET_USERS" --keyspace "$KEYSPACE" --threads "$BENCH_THREADS" --run-id compare \
    "${populate[@]}" --watch "target=$pid" --watch "redis=$redis_pid" 2>>"$work/bench.log")"
  [[ "$(field "$line" errors)" == 0 && "$(field "$line" misses)" == 0 ]] \
    || log "session_bench against $target: $(field "$line" errors) errors, $(field "$line" misses) misses"
  awk -v r="$repeat" -v t="$target" -v rps="$(field "$line" rps)" -v p99="$(field "$line" p99_ms)" \
    -v n="$(field "$line" requests)" -v c="$(field "$line" cpu_target_s)" -v rc="$(field "$line" cpu_redis_s)" \
    'BEGIN { printf "%s %s sb %s %s %.2f %.2f\n", r, t, rps, p99, c * 1e6 / n, rc * 1e6 / n }' >>"$results"
}

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
loads=""
steps=(redis "h2load echo" "h2load svc" "bench echo" "bench svc")
for repeat in $(seq "$REPEATS"); do
  loads="$loads${loads:+; }$(cut -d' ' -f1 /proc/loadavg)"
  order=("${steps[@]}")
  if ((repeat % 2 == 0)); then order=("bench svc" "bench echo" "h2load svc" "h2load echo" redis); fi
  for step in "${order[@]}"; do
    log "repeat $repeat: $step"
    case "$step" in
      redis) measure_redis "$repeat" ;;
      "h2load "*) measure_h2load "$repeat" "${step#h2load }" ;;
      "bench "*) measure_bench "$repeat" "${step#bench }" ;;
    esac
  done
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

# The server's warnings and errors (a call that did not end OK is logged at
# WARN or above with its code), for the reader of a table whose codes are not
# all OK: h2load's and session_bench's last calls may end CANCELLED when the
# driver stops with calls in flight.
if grep -q '"level":"\(WARN\|ERROR\)"' "$work/server.log"; then
  log "the server's warnings and errors (first 5):"
  grep '"level":"\(WARN\|ERROR\)"' "$work/server.log" | head -n5 >&2
fi
# Every SessionStore GetSession's grpc-status, as the server counted them.
metrics_addr="$(addr_of 'metrics at \/metrics')"
codes="unknown (no metrics address in the log)"
if [[ -n "$metrics_addr" ]]; then
  codes="$(curl -s "http://$metrics_addr/metrics" \
    | sed -n 's/^sessionstore_rpc_requests_total{\(.*method="[^"]*GetSession"[^}]*\)} \(.*\)/\1 \2/p' \
    | sed -n 's/.*code="\([A-Z_]*\)".* \([0-9.e+]*\)$/\1=\2/p' | paste -sd' ')"
fi

echo
echo "How we compare: GetSession (hint) vs Redis GET and a bare tonic echo, c=$CONCURRENCY, $(nproc) cores," \
  "$(date -u '+%Y-%m-%d %H:%M UTC'), $REPEATS repeats of ${DURATION} s windows (${WARMUP} s warm-up), $CONNECTIONS HTTP/2 connections," \
  "session_bench threads $BENCH_THREADS; load average (1, 5, 15 min) before $load_before, after $load_after," \
  "1 min at each repeat's start: $loads; priority prefix: ${BENCH_PRIO:-none}"
echo
echo "| target | driver | rps | p99 ms | rps vs Redis GET | rps vs echo floor | p99 vs echo floor | target CPU µs/call | Redis CPU µs/call |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
awk -v repeats="$REPEATS" '
  function median(a, n,   i, j, t, b) {
    for (i = 1; i <= n; i++) b[i] = a[i]
    for (i = 2; i <= n; i++) { t = b[i]; for (j = i - 1; j >= 1 && b[j] > t; j--) b[j + 1] = b[j]; b[j + 1] = t }
    return n % 2 ? b[(n + 1) / 2] : (b[n / 2] + b[n / 2 + 1]) / 2
  }
  function ratio(num, den,   r, n, q, lo, hi) {
    n = 0
    for (r = 1; r <= repeats; r++) if ((num, r) in rps && (den, r) in rps) {
      n++; q[n] = rps[num, r] / rps[den, r]
      if (n == 1 || q[n] < lo) lo = q[n]; if (n == 1 || q[n] > hi) hi = q[n]
    }
    return n ? sprintf("%.2f (%.2f-%.2f)", median(q, n), lo, hi) : "-"
  }
  function p99ratio(num, den,   r, n, q, lo, hi) {
    n = 0
    for (r = 1; r <= repeats; r++) if ((num, r) in p99 && (den, r) in p99) {
      n++; q[n] = p99[num, r] / p99[den, r]
      if (n == 1 || q[n] < lo) lo = q[n]; if (n == 1 || q[n] > hi) hi = q[n]
    }
    return n ? sprintf("%.2f (%.2f-%.2f)", median(q, n), lo, hi) : "-"
  }
  function row(key, name, driver, echo_key, target_cpu,   r, n, a, b, c, d) {
    n = 0
    for (r = 1; r <= repeats; r++) if ((key, r) in rps) { n++; a[n] = rps[key, r]; b[n] = p99[key, r]; c[n] = cpu[key, r]; d[n] = rcpu[key, r] }
    if (n == 0) return
    printf "| %s | %s | %.0f | %.2f | %s | %s | %s | %s | %s |\n", name, driver, median(a, n), median(b, n),
      key == "redis rb" ? "1" : ratio(key, "redis rb"),
      echo_key == "" ? "-" : (echo_key == key ? "1" : ratio(key, echo_key)),
      echo_key == "" ? "-" : (echo_key == key ? "1" : p99ratio(key, echo_key)),
      target_cpu ? sprintf("%.1f", median(c, n)) : "-", sprintf("%.1f", median(d, n))
  }
  { k = $2 " " $3; rps[k, $1] = $4; p99[k, $1] = $5; cpu[k, $1] = $6; rcpu[k, $1] = $7 }
  END {
    row("redis rb", "Redis GET from the caller", "redis-benchmark", "", 0)
    row("echo h2", "echo floor (bare tonic, examples/echo_floor.rs)", "h2load", "echo h2", 1)
    row("svc h2", "SessionStore GetSession (hint)", "h2load", "echo h2", 1)
    row("echo sb", "echo floor (bare tonic, examples/echo_floor.rs)", "session_bench", "echo sb", 1)
    row("svc sb", "SessionStore GetSession (hint)", "session_bench", "echo sb", 1)
  }' "$results"
echo
echo "SessionStore GetSession calls by grpc-status (server metrics, warm-up and populating included): $codes;" \
  "GetSession answer DATA bytes: echo $echo_bytes, SessionStore $svc_bytes"
if [[ -n "${BENCH_RAW:-}" ]]; then cp "$results" "$BENCH_RAW"; fi
