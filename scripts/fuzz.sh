#!/usr/bin/env bash
# Fuzzes what a client controls -- protobuf decoding of every request, then the
# server's validation and conversion (fuzz/fuzz_targets/decode_validate.rs) --
# for a bounded time, and prints libFuzzer's final statistics.
#
#   scripts/fuzz.sh [SECONDS]                 default 300
#   FUZZ_SANITIZER=address scripts/fuzz.sh    with AddressSanitizer
#
# Installs cargo-fuzz when missing. Runs on the stable toolchain: without a
# sanitizer cargo-fuzz passes only stable flags (coverage instrumentation is
# `-C llvm-args`), and the server's crates forbid unsafe code, so ASan would
# watch only dependencies. With a sanitizer, `-Zsanitizer` is a nightly flag:
# on stable the script sets RUSTC_BOOTSTRAP=1 so that rustc accepts it.
#
# The corpus (fuzz/corpus/, git-ignored) is kept between runs and starts from
# the seeds in fuzz/seeds/; a crash is saved under
# fuzz/artifacts/ and cargo-fuzz prints the command that replays it. Exits
# non-zero when the fuzzer found a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-300}"
sanitizer="${FUZZ_SANITIZER:-none}"
target=decode_validate
CARGO_FUZZ_VERSION=0.13.2

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION" >&2
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
if [ "$sanitizer" != none ] && ! rustc --version | grep -q nightly; then
  export RUSTC_BOOTSTRAP=1
fi

mkdir -p "fuzz/corpus/$target"
# New inputs go to the first directory (git-ignored); the second holds the
# committed seeds (fuzz/seeds/generate.py), read but never written.
# -max_len: room for every limit's first refused value (a 1025-byte metadata
# value, 33 entries, a 257-byte id) without slowing mutation with 64 KiB inputs.
exec cargo fuzz run --sanitizer "$sanitizer" "$target" \
  "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
  -max_total_time="$seconds" \
  -max_len=8192 \
  -dict="fuzz/$target.dict" \
  -print_final_stats=1
