#!/usr/bin/env bash
# Installs Molt: fsd, blockdev and updater into PREFIX/bin; the mount(8) and umount(8)
# helpers (mount.fuse.molt, umount.fuse.molt: links to fsd) into SBINDIR, where mount(8)
# looks for them; the systemd unit template molt@.service into UNITDIR; the trusted-key
# directory SYSCONFDIR/molt/keyring and SYSCONFDIR/molt/mounts for the unit's instances.
#
#   scripts/install.sh [--prefix /usr/local] [--sbindir /sbin] [--sysconfdir /etc]
#                      [--unitdir /etc/systemd/system] [--bins target/release]
#
# --bins: the directory of the built binaries (`cargo build --release --workspace`).
# DESTDIR (environment): a staging root put before every path written; the links and the
# unit name the final paths, without it (packaging, and the install test).
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=/usr/local
sbindir=/sbin
sysconfdir=/etc
unitdir=/etc/systemd/system
bins=target/release
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --sbindir) sbindir="$2"; shift 2 ;;
        --sysconfdir) sysconfdir="$2"; shift 2 ;;
        --unitdir) unitdir="$2"; shift 2 ;;
        --bins) bins="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
destdir="${DESTDIR:-}"
bindir="$prefix/bin"

for b in fsd blockdev updater; do
    if [ ! -x "$bins/$b" ]; then
        echo "install.sh: $bins/$b is not built (cargo build --release --workspace, or --bins DIR)" >&2
        exit 1
    fi
done

install -d -m 0755 "$destdir$bindir" "$destdir$sbindir" "$destdir$unitdir"
for b in fsd blockdev updater; do
    install -m 0755 "$bins/$b" "$destdir$bindir/$b"
done
for helper in mount.fuse.molt umount.fuse.molt; do
    ln -sfn "$bindir/fsd" "$destdir$sbindir/$helper"
done
sed -e "s|@BINDIR@|$bindir|g" -e "s|@SYSCONFDIR@|$sysconfdir|g" dist/systemd/molt@.service \
    > "$destdir$unitdir/molt@.service"
chmod 0644 "$destdir$unitdir/molt@.service"
install -d -m 0755 "$destdir$sysconfdir/molt/keyring" "$destdir$sysconfdir/molt/mounts"
install -m 0644 dist/systemd/mount.conf.example "$destdir$sysconfdir/molt/mounts/example.conf.sample"

echo "installed Molt into ${destdir:-/}: $bindir/{fsd,blockdev,updater}," \
    "$sbindir/{mount,umount}.fuse.molt, $unitdir/molt@.service, $sysconfdir/molt/"
