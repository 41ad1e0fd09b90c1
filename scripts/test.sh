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
# The fsync flush-sharing protocol under the loom model checker: every interleaving of
# two syncs (fsd/core/src/fs/flushes.rs). Its own target directory: --cfg loom changes
# every crate's flags.
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    cargo test -p fsd-core --release --lib fs::flushes::
cargo nextest run --workspace --cargo-profile ci --profile ci "$@"
# The filesystem's own tests again over FUSE io_uring where the kernel has it. Left out:
# the tests that replace the filesystem server live or kill it, which an io_uring mount
# refuses and ends by design (tests/tests/integration/transport.rs covers both there).
if [ -e /sys/module/fuse/parameters/enable_uring ] && [ $# -eq 0 ]; then
    MOLT_TEST_TRANSPORT=uring cargo nextest run -p molt-tests --cargo-profile ci --profile ci \
        -E 'test(/^(mount|posix|namespace|permissions|pjdfstest|fio)::/) - test(/kill9|live_update/)'
fi
# The same tests again with every image served by qemu-nbd on a private unix socket
# (MOLT_TEST_IMAGE=nbd): mkfs by path, then mount and fsck by NBD URI, the block driver on
# its NBD engine. Left out: mount::mount_errors_are_clear, which mounts the image file a
# second time to see the image lock refuse it — an NBD export has no lock (its server
# decides who may connect), so that mount of the file behind the export would succeed.
if [ $# -eq 0 ]; then
    MOLT_TEST_IMAGE=nbd cargo nextest run -p molt-tests --cargo-profile ci --profile ci \
        -E 'test(/^(mount|posix|namespace|permissions|pjdfstest|fio)::/) - test(mount_errors_are_clear)'
fi
