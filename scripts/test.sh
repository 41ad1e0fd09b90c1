#!/usr/bin/env bash
# Runs Molt's whole test suite: formatting, lints, and every test (unit, property, FUSE
# integration as root, pjdfstest, fio verification, crash tests). Exits non-zero on any
# failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --profile ci -- -D warnings
cargo build --workspace --profile ci
# The neighbouring versions the live-update tests replace components with.
variants="$(mktemp -d)"
scripts/build-examples.sh --profile ci --default-bins target/ci --bins-only "$variants"
rm -rf "$variants"
cargo nextest run --workspace --cargo-profile ci --profile ci "$@"
# The filesystem's own tests again over FUSE io_uring where the kernel has it. Left out:
# the tests that replace the filesystem server live or kill it, which an io_uring mount
# refuses and ends by design (tests/tests/integration/transport.rs covers both there).
if [ -e /sys/module/fuse/parameters/enable_uring ] && [ $# -eq 0 ]; then
    MOLT_TEST_TRANSPORT=uring cargo nextest run -p molt-tests --cargo-profile ci --profile ci \
        -E 'test(/^(mount|posix|namespace|permissions|pjdfstest|fio)::/) - test(/kill9|live_update/)'
fi
