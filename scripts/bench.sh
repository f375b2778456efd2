#!/usr/bin/env bash
# Measures SessionStore against Redis itself on this machine, and prints one
# markdown table (see BENCHMARKS.md for the method); with --near-cache, the
# near-cache's tables after it.
#
# Builds the release server and the load generator (benches/session_bench.rs),
# starts a private redis-server (no persistence) and the server on free ports,
# then for each concurrency runs back to back:
#   GetSession:    redis-benchmark GET of session-sized values, then the
#                  service's GetSession with the user id hint;
#   CreateSession: redis-benchmark EVALSHA of create_session.lua, then the
#                  service's CreateSession;
# and repeats the lot. CPU time of the server, Redis and the load generator
# comes from /proc/PID/stat; the server's RSS from /proc/PID/status.
#
# Usage: scripts/bench.sh [--long] [--near-cache] [--compare] [--repeats N]
#                         [--duration S] [--concurrency "1 16 64 256"]
#   --long  also runs 60 s of mixed load at c=256 and reports the server's RSS
#           at its start and end.
#   --near-cache  also measures the near-cache and its revocation stream (#12),
#           in the same run, and prints a second set of tables: cached
#           get_user_session checks (1 and 2 threads) next to this run's
#           GetSession and Redis GET; revocation visibility (NC_REVOCATIONS
#           revocations, with 0 and NC_SUBSCRIBERS other streams open; the
#           cache looked at every NC_POLL_US µs); the server's CPU per
#           revocation with 0, 1 and NC_SUBSCRIBERS streams open, for each
#           tasks:pause_us:revocations in NC_FANOUT_RUNS (spaced out, one
#           at a time back to back, 16 at a time).
#   --compare  also prints the "How we compare" table (#15) at the end, by
#           scripts/bench-compare.sh with this run's binaries and --repeats
#           and --duration: GetSession next to Redis GET and a bare tonic
#           echo (examples/echo_floor.rs), c=64, by h2load and session_bench.
# Server settings (REDIS_POOL_SIZE, TOKIO_WORKER_THREADS, ...) pass through
# the environment; BENCH_THREADS sets the load generator's worker threads;
# BENCH_BIN names a load generator built before (only the server is built).
# BENCH_PRIO is a command prefix for Redis, the server and both load
# generators alike, e.g. BENCH_PRIO="chrt -r 1" (root) so that other work on
# a shared machine does not take their CPU; the table header records it.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

LONG=0
REPEATS=2
DURATION=5
WARMUP=1
CONCURRENCIES="1 16 64 256"
CONNECTIONS=4
KEYSPACE=10000
GET_USERS=2000
CREATE_USERS=100000
BENCH_THREADS="${BENCH_THREADS:-1}"
NEAR_CACHE=0
COMPARE=0
NC_REVOCATIONS="${NC_REVOCATIONS:-2000}"
NC_SUBSCRIBERS="${NC_SUBSCRIBERS:-100}"
NC_POLL_US="${NC_POLL_US:-20}"
NC_FANOUT_RUNS="${NC_FANOUT_RUNS:-1:2000:3000 1:0:10000 16:0:10000}"
read -r -a prio <<<"${BENCH_PRIO:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --long) LONG=1 ;;
    --near-cache) NEAR_CACHE=1 ;;
    --compare) COMPARE=1 ;;
    --repeats) REPEATS="$2"; shift ;;
    --duration) DURATION="$2"; shift ;;
    --concurrency) CONCURRENCIES="$2"; shift ;;
    -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
    *) echo "bench: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

for tool in redis-server redis-cli redis-benchmark; do
  if ! command -v "$tool" >/dev/null; then
    echo "bench: $tool is missing (apt-get install redis-server redis-tools)" >&2
    exit 1
  fi
done

work="$(mktemp -d "${TMPDIR:-/tmp}/sessionstore-bench.XXXXXX")"
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

log() { printf 'bench: %s\n' "$*" >&2; }

log "building (release)"
server_bin="$(cargo build --release --locked -p session-server --bin session-server \
  --message-format=json-render-diagnostics | executable session-server)"
# BENCH_BIN: a load generator built before (it need not change with the server).
bench_bin="${BENCH_BIN:-$(cargo build --release --locked -p sessionstore --bench session_bench \
  --message-format=json-render-diagnostics | executable session_bench)}"
[[ -x "$bench_bin" && -x "$server_bin" ]] || { log "build produced no binaries"; exit 1; }

redis_port="$(free_port)"
${prio[@]+"${prio[@]}"} redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$work" --logfile "$work/redis.log" &
redis_pid=$!
rcli() { redis-cli -p "$redis_port" "$@"; }
for _ in $(seq 100); do rcli ping >/dev/null 2>&1 && break; sleep 0.05; done
rcli ping >/dev/null

# Port 0 for both listeners: the server logs the addresses it bound.
REDIS_URL="redis://127.0.0.1:$redis_port" LISTEN_ADDR=127.0.0.1:0 METRICS_ADDR=127.0.0.1:0 \
  LOG_FORMAT=json RUST_LOG="${RUST_LOG:-info}" ${prio[@]+"${prio[@]}"} "$server_bin" >"$work/server.log" 2>&1 &
server_pid=$!
listen=""
for _ in $(seq 200); do
  listen="$(sed -n 's/.*"addr":"\([^"]*\)".*"message":"listening".*/\1/p;s/.*"message":"listening".*"addr":"\([^"]*\)".*/\1/p' "$work/server.log" | head -n1)"
  [[ -n "$listen" ]] && break
  sleep 0.05
done
[[ -n "$listen" ]] || { log "server did not start:"; cat "$work/server.log" >&2; exit 1; }
url="http://$listen"
log "redis on :$redis_port (pid $redis_pid), server on $listen (pid $server_pid)"

# The session JSON the service stores for the bench's sessions is this long;
# redis-benchmark GETs values of the same size.
value_size=240
# As the server loads it: the shared helpers (lib.lua), then the script.
create_sha="$(rcli script load "$(cat session-server/src/store/scripts/lib.lua session-server/src/store/scripts/create_session.lua)")"
head_json='{"user_id":"bench-u","token_id":"bench-t","metadata":{"ip":"10.12.34.56","user_agent":"Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0"}'

# The numbers of redis-benchmark's --csv result line: rps, avg, min, p50, p95,
# p99, max (ms). Counted from the end: the test name may hold commas and quotes.
csv_numbers() {
  awk -F, 'NR == 2 { for (i = NF - 6; i <= NF; i++) { gsub(/"/, "", $i); printf "%s%s", $i, (i < NF ? " " : "\n") } }'
}

# Runs redis-benchmark with $1 = concurrency, the rest its command; sized to
# last about DURATION seconds by a short calibration run. Prints
# "rps p99_ms redis_cpu_s benchmark_cpu_s p50_ms".
redis_bench() {
  local c="$1"; shift
  local cal=$((c == 1 ? 10000 : 40000))
  local rps n before after
  rps="$(${prio[@]+"${prio[@]}"} redis-benchmark -p "$redis_port" -c "$c" -P 1 -n "$cal" --csv "$@" | csv_numbers | cut -d' ' -f1)"
  [[ -n "$rps" ]] || { log "redis-benchmark gave no result: $*"; exit 1; }
  n="$(awk -v r="$rps" -v d="$DURATION" 'BEGIN { printf "%d", r * d }')"
  before="$(cpu_of "$redis_pid")"
  ( ${prio[@]+"${prio[@]}"} redis-benchmark -p "$redis_port" -c "$c" -P 1 -n "$n" --csv "$@" >"$work/rb.csv"; times >"$work/rb.times" )
  after="$(cpu_of "$redis_pid")"
  # The second line of `times` is the children's user and system time: 0m1.230s 0m0.450s.
  local self_cpu
  self_cpu="$(awk 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%.2f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$work/rb.times")"
  csv_numbers <"$work/rb.csv" | awk -v b="$before" -v a="$after" -v s="$self_cpu" \
    '{ printf "%s %s %.2f %s %s\n", $1, $6, a - b, s, $4 }'

}

service_bench() {
  local c="$1" profile="$2" users="$3"; shift 3
  ${prio[@]+"${prio[@]}"} "$bench_bin" --url "$url" --connections "$CONNECTIONS" --concurrency "$c" \
    --warmup "$WARMUP" --duration "$DURATION" --profile "$profile" \
    --users "$users" --keyspace "$KEYSPACE" --threads "$BENCH_THREADS" \
    --watch "server=$server_pid" --watch "redis=$redis_pid" "$@" 2>>"$work/bench.log"
}

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
results="$work/results"
: >"$results"
for repeat in $(seq "$REPEATS"); do
  for c in $CONCURRENCIES; do
    log "repeat $repeat, c=$c: GET"
    rcli flushall >/dev/null
    redis-benchmark -p "$redis_port" -c 50 -P 16 -n $((KEYSPACE * 5)) -r "$KEYSPACE" -d "$value_size" -t set -q >/dev/null
    read -r r_rps r_p99 r_cpu rb_cpu r_p50 <<<"$(redis_bench "$c" -r "$KEYSPACE" GET 'key:__rand_int__')"
    [[ -n "$r_rps" ]] || exit 1
    line="$(service_bench "$c" get-hint "$GET_USERS")"
    echo "get $c $r_rps $r_p99 $r_cpu $rb_cpu $line redis_p50_ms=$r_p50" >>"$results"
    [[ "$(field "$line" errors)" == 0 && "$(field "$line" misses)" == 0 ]] \
      || log "GetSession c=$c: $(field "$line" errors) errors, $(field "$line" misses) misses"

    log "repeat $repeat, c=$c: CREATE"
    rcli flushall >/dev/null
    read -r r_rps r_p99 r_cpu rb_cpu _ <<<"$(redis_bench "$c" -r "$CREATE_USERS" EVALSHA "$create_sha" 4 \
      'session:{bench-u__rand_int__}:{bench-t__rand_int__}' 'user_sessions:{bench-u__rand_int__}' \
      'revoked:{bench-u__rand_int__}:{bench-t__rand_int__}' 'reservations:{bench-u__rand_int__}' \
      'bench-t__rand_int__' 900000 10 evict_oldest "$head_json" 61000 86400000 bench-revocations 'bench-u__rand_int__')"
    [[ -n "$r_rps" ]] || exit 1
    rcli flushall >/dev/null
    line="$(service_bench "$c" create "$CREATE_USERS")"
    echo "create $c $r_rps $r_p99 $r_cpu $rb_cpu $line" >>"$results"
    [[ "$(field "$line" errors)" == 0 ]] || log "CreateSession c=$c: $(field "$line" errors) errors"
  done
done

# The near-cache (#12): every figure from this run, against this server.
nc_bench() {
  ${prio[@]+"${prio[@]}"} "$bench_bin" --url "$url" --connections "$CONNECTIONS" \
    --watch "server=$server_pid" --watch "redis=$redis_pid" "$@" 2>>"$work/bench.log"
}
if [[ "$NEAR_CACHE" == 1 ]]; then
  nc_load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
  for repeat in $(seq "$REPEATS"); do
    for threads in 1 2; do
      log "near-cache, repeat $repeat: cached get_user_session on $threads threads"
      rcli flushall >/dev/null
      line="$(nc_bench --profile cached-get --threads "$threads" --concurrency "$threads" \
        --warmup "$WARMUP" --duration "$DURATION" --users "$GET_USERS" --keyspace "$KEYSPACE")"
      echo "nc-get $threads $line" >>"$results"
      [[ "$(field "$line" errors)" == 0 && "$(field "$line" cache_misses)" == 0 ]] \
        || log "cached get: $(field "$line" errors) errors, $(field "$line" cache_misses) cache misses"
    done
  done
  # Five sessions per user, below the default MAX_SESSIONS_PER_USER.
  for subs in 0 "$NC_SUBSCRIBERS"; do
    log "near-cache: visibility of $NC_REVOCATIONS revocations, $subs other streams open"
    rcli flushall >/dev/null
    line="$(nc_bench --profile visibility --threads "$BENCH_THREADS" --subscribers "$subs" \
      --poll-interval-us "$NC_POLL_US" --users $(((NC_REVOCATIONS + 4) / 5)) --keyspace "$NC_REVOCATIONS")"
    echo "nc-vis $subs $line" >>"$results"
  done
  for run in $NC_FANOUT_RUNS; do
    IFS=: read -r c pause n <<<"$run"
    for subs in 0 1 "$NC_SUBSCRIBERS"; do
      log "near-cache: $n revocations by $c task(s) pausing $pause µs, $subs streams open"
      rcli flushall >/dev/null
      line="$(nc_bench --profile revoke-fanout --threads "$BENCH_THREADS" --concurrency "$c" \
        --pause-us "$pause" --subscribers "$subs" --users $(((n + 4) / 5)) --keyspace "$n")"
      echo "nc-fan $run $subs $line" >>"$results"
      [[ "$(field "$line" subscribers_ended)" == 0 && "$(field "$line" errors)" == 0 ]] \
        || log "fan-out $run, $subs streams: $(field "$line" subscribers_ended) streams ended, $(field "$line" errors) errors"
    done
  done
  nc_load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
fi

rss_line=""
if [[ "$LONG" == 1 ]]; then
  log "60 s of mixed load at c=256 for the server's RSS"
  rcli flushall >/dev/null
  rss_line="$(WARMUP=0 DURATION=60 service_bench 256 mixed "$GET_USERS")"
fi

# The table: medians over the repeats (the ratio's range in brackets).
{
  echo "SessionStore vs Redis on $(nproc) cores, $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m)," \
    "$REPEATS repeats of ${DURATION} s windows, $CONNECTIONS HTTP/2 connections, loadgen threads $BENCH_THREADS;" \
    "load average before $load_before, after $(cut -d' ' -f1-3 /proc/loadavg);" \
    "priority prefix: ${BENCH_PRIO:-none}"
  echo
  echo "| RPC vs Redis | c | service rps | Redis rps | ratio | p99 service ms | p99 Redis ms | CPU s server | CPU s Redis (service run) | CPU s loadgen | CPU s Redis (redis-benchmark run) | CPU s redis-benchmark | errors |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for op in get create; do
    for c in $CONCURRENCIES; do
      grep "^$op $c " "$results" | while read -r _ _ r_rps r_p99 r_cpu rb_cpu rest; do
        printf '%s %s %s %s %s %s %s %s %s %s\n' "$r_rps" "$r_p99" "$r_cpu" "$rb_cpu" \
          "$(field "$rest" rps)" "$(field "$rest" p99_ms)" "$(field "$rest" cpu_server_s)" \
          "$(field "$rest" cpu_redis_s)" "$(field "$rest" cpu_loadgen_s)" "$(field "$rest" errors)"
      done | awk -v op="$op" -v c="$c" '
        function median(a, n,   i, j, t) {
          for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
          return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        { n++; rr[n] = $1; rp[n] = $2; rc[n] = $3; bc[n] = $4; sr[n] = $5; sp[n] = $6; sc[n] = $7; src[n] = $8; lc[n] = $9; err += $10
          q[n] = $5 / $1; if (n == 1 || q[n] < lo) lo = q[n]; if (n == 1 || q[n] > hi) hi = q[n] }
        END {
          if (n == 0) exit
          name = op == "get" ? "GetSession (hint) vs GET" : "CreateSession vs EVALSHA create_session.lua"
          printf "| %s | %d | %.0f | %.0f | %.2f (%.2f-%.2f) | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %d |\n",
            name, c, median(sr, n), median(rr, n), median(q, n), lo, hi, median(sp, n), median(rp, n),
            median(sc, n), median(src, n), median(lc, n), median(rc, n), median(bc, n), err
        }'
    done
  done
  echo
  rss256="$(grep '^get 256 ' "$results" | tail -n1 || true)"
  if [[ -n "$rss256" ]]; then
    echo "Server RSS, GetSession c=256 (${DURATION} s): start $(field "$rss256" rss_server_start_kib) KiB," \
      "end $(field "$rss256" rss_server_end_kib) KiB, peak $(field "$rss256" hwm_server_kib) KiB"
  fi
  if [[ -n "$rss_line" ]]; then
    echo "Server RSS, mixed c=256 (60 s, $(field "$rss_line" rps) rps, p99 $(field "$rss_line" p99_ms) ms," \
      "$(field "$rss_line" errors) errors): start $(field "$rss_line" rss_server_start_kib) KiB," \
      "end $(field "$rss_line" rss_server_end_kib) KiB, peak $(field "$rss_line" hwm_server_kib) KiB"
  fi
}

# The near-cache's tables: medians over the repeats for the cached checks.
if [[ "$NEAR_CACHE" == 1 ]]; then
  median() { sort -g | awk '{ a[NR] = $1 } END { if (NR) print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
  # The median over the lines of $1 (a grep pattern) of field $2.
  med() { grep "$1" "$results" | while read -r l; do field "$l" "$2"; done | median; }
  echo
  echo "Near-cache (#12), same run; load average before $nc_load_before, after $nc_load_after"
  echo
  echo "| check | concurrency | checks/s | p50 µs | p99 µs | p99.9 µs | CPU s server | CPU s Redis | CPU s loadgen | misses | errors |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for threads in 1 2; do
    p="^nc-get $threads "
    printf '| get_user_session, near-cache hit | %s thread(s) | %.0f | %.3f | %.3f | %.3f | %.2f | %.2f | %.2f | %s | %s |\n' \
      "$threads" "$(med "$p" rps)" "$(med "$p" p50_us)" "$(med "$p" p99_us)" "$(med "$p" p999_us)" \
      "$(med "$p" cpu_server_s)" "$(med "$p" cpu_redis_s)" "$(med "$p" cpu_loadgen_s)" \
      "$(grep "$p" "$results" | while read -r l; do field "$l" cache_misses; done | paste -sd+ | bc)" \
      "$(grep "$p" "$results" | while read -r l; do field "$l" errors; done | paste -sd+ | bc)"
  done
  for c in $CONCURRENCIES; do
    p="^get $c "
    grep -q "$p" "$results" || continue
    printf '| GetSession (hint), no cache | %s | %.0f | %.0f | %.0f | %.0f | %.2f | %.2f | %.2f | %s | %s |\n' \
      "$c" "$(med "$p" rps)" "$(awk "BEGIN { print $(med "$p" p50_ms) * 1000 }")" \
      "$(awk "BEGIN { print $(med "$p" p99_ms) * 1000 }")" "$(awk "BEGIN { print $(med "$p" p999_ms) * 1000 }")" \
      "$(med "$p" cpu_server_s)" "$(med "$p" cpu_redis_s)" "$(med "$p" cpu_loadgen_s)" \
      "$(grep "$p" "$results" | while read -r l; do field "$l" misses; done | paste -sd+ | bc)" \
      "$(grep "$p" "$results" | while read -r l; do field "$l" errors; done | paste -sd+ | bc)"
  done
  for c in $CONCURRENCIES; do
    grep -q "^get $c " "$results" || continue
    # Columns 3 and 4 of a get line: Redis's rps and p99 (ms).
    printf '| Redis GET (redis-benchmark) | %s | %.0f | %.0f | %.0f | | | | | | |\n' "$c" \
      "$(grep "^get $c " "$results" | awk '{ print $3 }' | median)" \
      "$(awk "BEGIN { print $(med "^get $c " redis_p50_ms) * 1000 }")" \
      "$(grep "^get $c " "$results" | awk '{ print $4 * 1000 }' | median)"
  done
  echo
  echo "Revocation visibility: from RevokeSession returning on one connection to another client's near-cache no longer answering the session (negative: before it returned)."
  echo
  echo "| other streams open | revocations | p50 ms | p99 ms | max ms | min ms | seen before RevokeSession returned | by the cache's counters p50 / p99 / max ms | RevokeSession p50 / p99 ms | from RevokeSession sent p99 ms | not measured (not cached / flushed / unseen) | CPU s server |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|---:|"
  for subs in 0 "$NC_SUBSCRIBERS"; do
    l="$(grep "^nc-vis $subs " "$results" | tail -n1)"
    [[ -n "$l" ]] || continue
    echo "| $subs | $(field "$l" revocations) | $(field "$l" visible_p50_ms) | $(field "$l" visible_p99_ms) |" \
      "$(field "$l" visible_max_ms) | $(field "$l" visible_min_ms) | $(field "$l" visible_before_return) |" \
      "$(field "$l" applied_p50_ms) / $(field "$l" applied_p99_ms) / $(field "$l" applied_max_ms) |" \
      "$(field "$l" p50_ms) / $(field "$l" p99_ms) | $(field "$l" from_call_p99_ms) |" \
      "$(field "$l" not_cached) / $(field "$l" flushed) / $(field "$l" unseen) | $(field "$l" cpu_server_s) |"
  done
  echo
  echo "What subscribers cost the server: sessions revoked once each, from the first revoke until every stream received every revocation."
  echo
  echo "| revoking tasks | pause after each µs | streams | revoked | revokes/s | RevokeSession p50 / p99 / max ms | delivered in s | CPU s server | server CPU µs per revocation | messages per revocation per stream | CPU s loadgen | streams ended | errors |"
  echo "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
  for run in $NC_FANOUT_RUNS; do
    IFS=: read -r c pause _ <<<"$run"
    for subs in 0 1 "$NC_SUBSCRIBERS"; do
      l="$(grep "^nc-fan $run $subs " "$results" | tail -n1)"
      [[ -n "$l" ]] || continue
      awk -v c="$c | $pause" -v s="$subs" -v n="$(field "$l" revoked)" \
        -v rps="$(field "$l" rps) | $(field "$l" p50_ms) / $(field "$l" p99_ms) / $(field "$l" max_ms)" \
        -v d="$(field "$l" delivered_s)" -v cpu="$(field "$l" cpu_server_s)" -v m="$(field "$l" subscriber_messages)" \
        -v lg="$(field "$l" cpu_loadgen_s)" -v e="$(field "$l" subscribers_ended)" -v err="$(field "$l" errors)" \
        'BEGIN { printf "| %s | %s | %s | %s | %s | %s | %.1f | %s | %s | %s | %s |\n", c, s, n, rps, d, cpu,
          n ? cpu * 1e6 / n : 0, s && n ? sprintf("%.3f", m / (n * s)) : "-", lg, e, err }'
    done
  done
  echo
  for run in $NC_FANOUT_RUNS; do
    IFS=: read -r c pause _ <<<"$run"
    l0="$(grep "^nc-fan $run 0 " "$results" | tail -n1)"
    l1="$(grep "^nc-fan $run 1 " "$results" | tail -n1)"
    ls="$(grep "^nc-fan $run $NC_SUBSCRIBERS " "$results" | tail -n1)"
    [[ -n "$l0" && -n "$l1" && -n "$ls" ]] || continue
    awk -v c="$c task(s), pausing $pause µs" -v s="$NC_SUBSCRIBERS" -v n0="$(field "$l0" revoked)" -v c0="$(field "$l0" cpu_server_s)" \
      -v n1="$(field "$l1" revoked)" -v c1="$(field "$l1" cpu_server_s)" \
      -v ns="$(field "$ls" revoked)" -v cs="$(field "$ls" cpu_server_s)" -v ms="$(field "$ls" subscriber_messages)" 'BEGIN {
        printf "- %s: server CPU per revocation per stream with %s streams: %.2f µs against none open, %.2f µs against one (a first stream adds %.1f µs per revocation); %.2f µs per message per stream\n",
          c, s, (cs / ns - c0 / n0) * 1e6 / s, (cs / ns - c1 / n1) * 1e6 / (s - 1), (c1 / n1 - c0 / n0) * 1e6,
          ms ? (cs / ns - c0 / n0) * ns * 1e6 / ms : 0 }'
  done
fi
if [[ -n "${BENCH_RAW:-}" ]]; then cp "$results" "$BENCH_RAW"; fi
command -v h2load >/dev/null && SERVER_BIN="$server_bin" scripts/bench-h2load.sh --repeats "$REPEATS" --duration "$DURATION" || log "no h2load table (#15: needs h2load from nghttp2-client, or scripts/bench-h2load.sh failed)"
if [[ "$COMPARE" == 1 ]]; then
  SERVER_BIN="$server_bin" BENCH_BIN="$bench_bin" BENCH_RAW="${BENCH_RAW:+$BENCH_RAW.compare}" scripts/bench-compare.sh --repeats "$REPEATS" --duration "$DURATION" \
    || log "no compare table (scripts/bench-compare.sh failed)"
fi
