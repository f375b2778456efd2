#!/usr/bin/env bash
# Checks k8s/monitoring/ (alerting rules, PrometheusRule, Grafana dashboard)
# and docs/runbook.md with a real Prometheus:
#   1. prometheusrule.yaml and dashboard.json are what their generators write;
#   2. every alert has a severity and a runbook_url whose section exists;
#   3. promtool check rules, and promtool test rules (rules.test.yaml: each
#      alert firing and not firing on synthetic series);
#   4. the live check (scripts/monitoring/live_check.py): the release server
#      against a private redis-server, scraped by Prometheus, under load with
#      errors and Redis stopped; every panel query and alert expression must
#      evaluate and return data, and SessionStoreRedisDown must fire.
#
# Usage: scripts/check-monitoring.sh
#   SERVER_BIN        the binary to check (default: target/release/session-server,
#                     the one .ci/run's polyglot step builds; built with
#                     `cargo build --release --locked -p session-server` if missing)
#   POLYGLOT_VENV     virtualenv with the pinned grpc packages (default
#                     .venv-polyglot/, shared with scripts/check-polyglot.sh)
# Installs Debian's prometheus (server and promtool) and redis-server with
# apt-get when missing (as root, or through sudo).
set -euo pipefail
export CI="${CI:-true}"

# The same pins as scripts/check-polyglot.sh, so the two share one venv.
PY_PACKAGES=(grpcio==1.85.1 grpcio-tools==1.85.1 grpcio-health-checking==1.85.1 protobuf==7.36.2)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mon=k8s/monitoring
venv="${POLYGLOT_VENV:-$root/.venv-polyglot}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log() { echo "check-monitoring: $*"; }
fail() { log "FAILED: $*" >&2; exit 1; }
as_root() {
  if [[ "$(id -u)" -eq 0 ]]; then "$@"; else sudo "$@"; fi
}
started=$SECONDS

# 0. Tools.
missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v redis-server >/dev/null && command -v redis-cli >/dev/null || missing+=(redis-server)
if ((${#missing[@]})); then
  log "installing ${missing[*]} with apt-get"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # Recommends left out: prometheus would pull in node-exporter. Debian's
  # policy-rc.d (in containers) or the unit left stopped: nothing starts on :9090.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
log "$(promtool --version 2>&1 | head -n 1)"

# 1. Generated files are current.
scripts/gen-prometheusrule.sh "$work/prometheusrule.yaml"
diff -u "$mon/prometheusrule.yaml" "$work/prometheusrule.yaml" \
  || fail "$mon/prometheusrule.yaml is stale: run scripts/gen-prometheusrule.sh"
python3 "$mon/dashboard.py" "$work/dashboard.json"
diff -u "$mon/dashboard.json" "$work/dashboard.json" >/dev/null \
  || fail "$mon/dashboard.json is stale: run python3 $mon/dashboard.py"
log "prometheusrule.yaml and dashboard.json match their sources"

# 2. Each alert: a severity, a runbook_url, its runbook section, a unit test.
alerts=$(sed -n 's/^ *- alert: *//p' "$mon/rules.yaml")
count=0
for alert in $alerts; do
  count=$((count + 1))
  block=$(awk -v a="$alert" '$0 ~ "- alert: "a"$" {on=1; next} /- alert:/ {on=0} on' "$mon/rules.yaml")
  grep -Eq 'severity: (critical|warning)$' <<<"$block" || fail "$alert has no severity critical|warning"
  anchor=$(tr '[:upper:]' '[:lower:]' <<<"$alert")
  grep -q "runbook_url: \"docs/runbook.md#$anchor\"" <<<"$block" || fail "$alert: runbook_url is not docs/runbook.md#$anchor"
  grep -q "^## $alert\$" docs/runbook.md || fail "docs/runbook.md has no section '## $alert'"
  grep -q "alertname: $alert\$" "$mon/rules.test.yaml" || fail "$alert has no unit test in rules.test.yaml"
done
log "$count alerts: each with a severity, a runbook section and unit tests"

# 3. promtool.
promtool check rules "$mon/rules.yaml"
(cd "$mon" && promtool test rules rules.test.yaml)

# 4. Live. Python with the pinned packages (a stamp skips pip), stubs from proto/.
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
mkdir -p "$work/gen" "$work/live"
"$py" -m grpc_tools.protoc -Iproto --python_out="$work/gen" --grpc_python_out="$work/gen" \
  proto/sessionstore/v1/session_store.proto

server_bin="${SERVER_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/session-server}"
if [[ -z "${SERVER_BIN:-}" ]]; then
  # A no-op when .ci/run's polyglot step has built it (the same command).
  cargo build --quiet --release --locked -p session-server
fi
[[ -x "$server_bin" ]] || fail "no server binary at $server_bin"

live=$SECONDS
if ! PYTHONPATH="$work/gen" timeout 300 "$py" scripts/monitoring/live_check.py \
  "$server_bin" "$mon/rules.yaml" "$mon/dashboard.json" "$work/live"; then
  for f in server prometheus redis; do
    [[ -s "$work/live/$f.log" ]] && { echo "---- $f log (last 30 lines) ----" >&2; tail -n 30 "$work/live/$f.log" >&2; }
  done
  fail "the live check"
fi
log "live check passed ($((SECONDS - live)) s)"
log "passed ($((SECONDS - started)) s)"
