#!/usr/bin/env bash
# CI: the fuzz target still builds. fuzz/ is a workspace of its own (it needs
# cargo-fuzz's instrumentation flags), so `cargo build --workspace` never sees
# it, yet it calls session_server::convert and ::model and breaks when they
# change. This builds it with the same instrumentation as scripts/fuzz.sh, and
# runs nothing.
#
# The build is unoptimised (--dev): the same code and flags compile, in about
# two thirds of the CPU time of the optimised build scripts/fuzz.sh runs. Most
# of either is building session-server's dependencies once with the fuzzing
# flags; a second run takes seconds.
#
# Installs cargo-fuzz when missing. Stable toolchain: no sanitizer, so every
# flag cargo-fuzz passes is a stable one (see scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION" >&2
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

# fuzz/Cargo.lock must be committed and current, as the main lockfile is
# (CI builds with --locked); cargo-fuzz has no --locked of its own.
if ! cargo metadata --manifest-path fuzz/Cargo.toml --locked --format-version 1 >/dev/null; then
  echo "fuzz/Cargo.lock is out of date: run 'cargo metadata --manifest-path fuzz/Cargo.toml --format-version 1 >/dev/null' and commit it" >&2
  exit 1
fi

start=$SECONDS
cargo fuzz build --dev --sanitizer none decode_validate
echo "check-fuzz-builds: decode_validate built in $((SECONDS - start)) s"
