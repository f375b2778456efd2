#!/usr/bin/env bash
# Lints proto/ with buf (rules in buf.yaml) and checks that the contract has no
# breaking change against the previous commit.
#
# Usage: scripts/check-proto.sh
#   BUF_VERSION       buf release to use (npm package @bufbuild/buf); pinned below.
#   PROTO_BASE_REF    git revision to compare against. Default: HEAD~1 when the
#                     work tree's proto/ matches HEAD (as on a fresh CI clone),
#                     HEAD when proto/ has uncommitted changes.
# buf is installed, when missing or of another version, into .buf-tools/ at the
# repository root (git-ignored). Needs node/npm and git.
set -euo pipefail
export CI="${CI:-true}"

BUF_VERSION="${BUF_VERSION:-1.75.0}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

tools="$root/.buf-tools"
buf="$tools/node_modules/.bin/buf"
if [[ ! -x "$buf" ]] || [[ "$("$buf" --version 2>/dev/null)" != "$BUF_VERSION" ]]; then
  echo "check-proto: installing @bufbuild/buf@$BUF_VERSION into .buf-tools/"
  npm install --prefix "$tools" --no-audit --no-fund --loglevel=error \
    "@bufbuild/buf@$BUF_VERSION" >/dev/null
fi
echo "check-proto: buf $("$buf" --version)"

echo "check-proto: buf lint"
"$buf" lint
echo "check-proto: lint passed"

# The revision the contract must stay compatible with. On a fresh clone the
# work tree is HEAD, so the last change to review is HEAD~1 -> HEAD; with local
# edits to proto/ the baseline is HEAD itself.
if [[ -n "${PROTO_BASE_REF:-}" ]]; then
  base_ref="$PROTO_BASE_REF"
elif [[ -z "$(git status --porcelain -- proto)" ]]; then
  base_ref="HEAD~1"
else
  base_ref="HEAD"
fi

if ! base="$(git rev-parse --verify --quiet "$base_ref^{commit}")"; then
  # No parent (first commit) or a shallow clone that lacks it.
  echo "check-proto: breaking check skipped: $base_ref does not exist in this clone"
  exit 0
fi
if [[ -z "$(git ls-tree -r --name-only "$base" -- proto | grep '\.proto$' || true)" ]]; then
  echo "check-proto: breaking check skipped: $base_ref ($base) has no .proto files under proto/"
  exit 0
fi

# Extract the baseline's proto/ (and its buf.yaml, if it had one) with git
# archive: works in shallow clones and worktrees, and needs no network.
snapshot="$(mktemp -d)"
trap 'rm -rf "$snapshot"' EXIT
paths=(proto)
if git cat-file -e "$base:buf.yaml" 2>/dev/null; then paths+=(buf.yaml); fi
git archive --format=tar "$base" -- "${paths[@]}" | tar -x -C "$snapshot"
# With a buf.yaml the baseline is a workspace at its root; without one, proto/
# itself is the module root. Either way files are named relative to proto/.
against="$snapshot"
[[ -f "$snapshot/buf.yaml" ]] || against="$snapshot/proto"

echo "check-proto: buf breaking against $base_ref ($(git rev-parse --short "$base"))"
"$buf" breaking --against "$against"
echo "check-proto: no breaking change"
