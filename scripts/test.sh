#!/usr/bin/env bash
# Runs the whole test suite (unit, doc and end-to-end tests of every crate)
# against a real Redis, installing and starting one if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
cargo test --workspace --locked "$@"
