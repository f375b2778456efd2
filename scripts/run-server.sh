#!/usr/bin/env bash
# Runs the server (release build) on 0.0.0.0:50051 against the local Redis,
# installing and starting one if none answers. Settings come from the
# environment (see the README's configuration table); flags pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
exec cargo run --release --locked -p session-server -- "$@"
