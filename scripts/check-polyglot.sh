#!/usr/bin/env bash
# Proves the contract from another language: generates Python stubs from
# proto/, starts session-server against Redis, and runs scripts/polyglot/check.py,
# which calls every RPC and the standard gRPC health checks.
#
# Usage: scripts/check-polyglot.sh
#   REDIS_URL          Redis for the server (default redis://127.0.0.1:6379); the
#                      run uses a key prefix of its own, so a shared Redis is fine.
#   POLYGLOT_PROFILE   cargo profile to build: debug (default) or release.
#   POLYGLOT_VENV      virtualenv to use (default .venv-polyglot/, git-ignored).
# Needs python3 (with venv), cargo and a Redis.
set -euo pipefail
export CI="${CI:-true}"

# Pinned Python packages: grpcio-tools ships protoc and the well-known types.
PY_PACKAGES=(grpcio==1.85.1 grpcio-tools==1.85.1 grpcio-health-checking==1.85.1 protobuf==7.36.2)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
profile="${POLYGLOT_PROFILE:-debug}"
venv="${POLYGLOT_VENV:-$root/.venv-polyglot}"
work="$(mktemp -d)"
server_pid=""
prefix=""
log() { echo "check-polyglot: $*"; }

cleanup() {
  local rc=$?
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    log "stopping the server (pid $server_pid)"
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  # The run's keys expire by themselves; remove them now when redis-cli is at hand.
  if [[ -n "${prefix:-}" ]] && command -v redis-cli >/dev/null; then
    redis-cli -u "$REDIS_URL" --scan --pattern "${prefix}*" 2>/dev/null \
      | xargs -r redis-cli -u "$REDIS_URL" unlink >/dev/null 2>&1 || true
  fi
  if [[ $rc -ne 0 && -s "$work/server.log" ]]; then
    echo "---- server log (last 50 lines) ----" >&2
    tail -n 50 "$work/server.log" >&2
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

# 1. Python with the pinned packages; a stamp skips pip when nothing changed.
started=$SECONDS
if [[ ! -x "$venv/bin/python" ]]; then
  log "creating $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.polyglot-requirements"
if [[ "$(cat "$stamp" 2>/dev/null)" != "${PY_PACKAGES[*]}" ]]; then
  log "installing ${PY_PACKAGES[*]}"
  "$py" -m pip install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
  echo "${PY_PACKAGES[*]}" >"$stamp"
fi

# 2. Stubs from the contract alone.
mkdir -p "$work/gen"
"$py" -m grpc_tools.protoc -Iproto --python_out="$work/gen" --grpc_python_out="$work/gen" \
  proto/sessionstore/v1/session_store.proto
log "python ready and stubs generated ($((SECONDS - started)) s)"

# 3. The server.
started=$SECONDS
case "$profile" in
  debug) cargo_flags=() ;;
  release) cargo_flags=(--release) ;;
  *) log "POLYGLOT_PROFILE must be debug or release, not '$profile'"; exit 2 ;;
esac
cargo build --quiet "${cargo_flags[@]}" -p session-server
server_bin="${CARGO_TARGET_DIR:-$root/target}/$profile/session-server"
log "built $server_bin ($((SECONDS - started)) s)"

port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
addr="127.0.0.1:$port"
prefix="polyglot-$(date +%s)-$$-$RANDOM:"
# METRICS_ADDR on an ephemeral loopback port: no clash with another server on 9090.
NO_COLOR=1 METRICS_ADDR=127.0.0.1:0 "$server_bin" --listen-addr "$addr" --redis-url "$REDIS_URL" --key-prefix "$prefix" \
  --rate-limit-max-attempts 5 >"$work/server.log" 2>&1 &
server_pid=$!
log "server pid $server_pid on $addr, key prefix $prefix"

# 4. The checks: check.py first waits on the standard health Watch for
#    "sessionstore.v1.SessionStore" to be SERVING, then calls every RPC.
started=$SECONDS
PYTHONPATH="$work/gen" timeout 120 "$py" scripts/polyglot/check.py "$addr"
log "checks passed ($((SECONDS - started)) s)"

# 5. A graceful stop: SIGTERM must end the server with exit status 0.
kill -TERM "$server_pid"
status=0
for _ in $(seq 300); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$server_pid" 2>/dev/null; then
  log "FAILED: the server is still running 30 s after SIGTERM"
  exit 1
fi
wait "$server_pid" || status=$?
server_pid=""
if [[ $status -ne 0 ]]; then
  log "FAILED: the server exited with status $status after SIGTERM"
  exit 1
fi
log "server stopped cleanly on SIGTERM (exit 0)"
log "passed"
