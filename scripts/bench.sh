#!/usr/bin/env bash
# Builds Molt in release mode and runs the filesystem benchmark (molt-bench): the same jobs
# on a Molt mount, fuse2fs, kernel ext4 on a direct-I/O loop device and fio on the raw
# image; prints one markdown table of medians and ratios. A full run (without --quick)
# also rewrites the "Filesystem" section of docs/BENCHMARKS.md. Needs root.
#
#   scripts/bench.sh [--quick] [--runs N] [other molt-bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# Two builds: `--bin` would keep only molt-bench from every package named.
cargo build --release -p fsd -p blockdev
cargo build --release -p molt-tests --bin molt-bench
target="${CARGO_TARGET_DIR:-target}"

MOLT_BENCH_COMMAND="scripts/bench.sh${*:+ $*}" \
    exec "$target/release/molt-bench" --docs docs/BENCHMARKS.md "$@"
