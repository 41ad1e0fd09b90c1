#!/usr/bin/env bash
# Installs what Molt's demo and tests need on a fresh Debian machine (run as root).
# Idempotent: does nothing that is already done.
set -euo pipefail

need_apt=()
# xfsprogs (xfs_io), acl (setfacl, getfacl), attr (setfattr, getfattr) and python3: the
# permission tests, which compare Molt with kernel ext4 on a loop device; rsync: the copy
# tests (cp -a, rsync -aX onto Molt); qemu-utils (qemu-nbd, qemu-img) and nbdkit: the NBD
# servers the NBD tests put in front of their images.
for pkg in fio fuse2fs e2fsprogs libacl1-dev pkg-config xfsprogs acl attr python3 rsync \
    qemu-utils nbdkit; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo-nextest >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
    echo "setup: installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

if ! command -v pjdfstest >/dev/null 2>&1; then
    echo "setup: installing pjdfstest"
    cargo install --locked pjdfstest
fi

# The FUSE control filesystem lets tests abort a stuck connection.
if [ -d /sys/fs/fuse/connections ] && ! mountpoint -q /sys/fs/fuse/connections; then
    mount -t fusectl none /sys/fs/fuse/connections 2>/dev/null || true
fi
