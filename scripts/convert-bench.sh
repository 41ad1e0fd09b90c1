#!/usr/bin/env bash
# Measures online format conversions (v1 -> v2 -> v3 by live updates) on a 1 GiB and an
# 8 GiB image while molt-stress runs: conversion time, rate (live inodes/s and inode-table
# MB/s), the raw sequential read bandwidth of the image for comparison, and the longest
# stall the workload saw while each conversion ran.
# Usage: scripts/convert-bench.sh [FILES]   (root; builds release; FILES per image, 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build --release --workspace --quiet
BIN="$PWD/target/release"
export MOLT_BLOCKDEV_BIN="$BIN/blockdev"
FILES="${1:-20000}"

WORK="$(mktemp -d /var/tmp/molt-convert.XXXXXX)"
MNT="$WORK/mnt"
mkdir -p "$MNT" "$WORK/keyring" "$WORK/pkg/bin"
cleanup() {
    if mountpoint -q "$MNT"; then "$BIN/fsd" unmount "$MNT" || umount -l "$MNT" || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
"$BIN/updater" keygen --out "$WORK/key" >/dev/null
cp "$WORK/key.pub" "$WORK/keyring/" && chmod 755 "$WORK/keyring"
cp "$BIN/fsd" "$WORK/pkg/bin/fsd"
VERSION="$("$BIN/fsd" component-version)"
seq=1
pack() { # FROM TO
    cat > "$WORK/pkg/manifest.toml" <<TOML
[package]
name = "format-v$1-to-v$2"
sequence = $seq
expires_unix = $(( $(date +%s) + 86400 ))
nature = "data-on-disk"
description = "conversion benchmark"
deadline_ms = 10000

[format]
from = $1
to = $2

[[component]]
name = "fsd"
applies_to = ["$VERSION"]
new_version = "$VERSION"
binary = "bin/fsd"
state_schema_reads = [1]
state_schema_writes = 1
required_state = ["quiescent"]

[[file]]
path = "bin/fsd"
TOML
    "$BIN/updater" pack --manifest "$WORK/pkg/manifest.toml" --key "$WORK/key" --out "$WORK/u.lup" >/dev/null
    seq=$((seq + 1))
}

# Longest run of empty 10 ms timeline buckets overlapping [start, end] (unix ms).
stall_in() { # JSON START END
    python3 - "$@" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s, e = int(sys.argv[2]), int(sys.argv[3])
t0, w, counts = r["started_unix_ms"], r["timeline"]["bucket_ms"], r["timeline"]["counts"]
worst, run = 0, None
for i, c in enumerate(counts + [1]):
    if c == 0 and run is None:
        run = i
    elif c != 0 and run is not None:
        a, b = t0 + run * w, t0 + i * w
        if a < e and b > s:
            worst = max(worst, b - a)
        run = None
print(worst)
PY
}

printf '| image | live inodes | inode slots | conversion | time (s) | live inodes/s | inode table MB/s | raw image read MB/s | longest stall during it (ms) | workload errors |\n'
printf '|---|---:|---:|---|---:|---:|---:|---:|---:|---:|\n'
for size in 1G 8G; do
    IMG="$WORK/img-$size"
    slots=$("$BIN/fsd" mkfs "$IMG" --size "$size" --format-version 1 | grep -oE '[0-9]+ inodes' | grep -oE '[0-9]+')
    raw=$(dd if="$IMG" of=/dev/null bs=1M count=1024 iflag=direct 2>&1 | awk '/copied/ {print $(NF-1), $NF}')
    raw_mb=$(python3 -c "v,u='$raw'.split(); v=float(v); print(round(v*1000 if u.startswith('G') else v))")
    "$BIN/fsd" mount "$IMG" "$MNT" --keyring "$WORK/keyring"
    # The tree to convert: small files in nested directories, some with many extents.
    mkdir -p "$MNT/tree"
    python3 - "$MNT/tree" "$FILES" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, "d%d" % (i % 97), "e%d" % (i % 13))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%d" % i), "wb") as f:
        if i % 500 == 0:
            for b in range(64):
                f.seek(b * 8192)
                f.write(b"x" * 4096)
        else:
            f.write(os.urandom(i % 3000))
PY
    live=$(find "$MNT/tree" | wc -l)
    mkdir -p "$MNT/load"
    "$BIN/molt-stress" --dir "$MNT/load" --threads 4 --files 16 --file-size $((16 << 20)) \
        --mix read=45,write=45,meta=10 --time 600s --quiet --json "$WORK/stress.json" \
        > "$WORK/stress.out" 2>&1 &
    stress=$!
    sleep 3
    windows=()
    for step in "1 2" "2 3"; do
        set -- $step
        pack "$1" "$2"
        start=$(date +%s%3N)
        "$BIN/updater" apply "$WORK/u.lup" --mount "$MNT" > "$WORK/apply.out"
        end=$(date +%s%3N)
        conv_ms=$(grep -oE 'phase conversion finished in [0-9]+' "$WORK/apply.out" | grep -oE '[0-9]+$')
        windows+=("v$1 -> v$2:$start:$end:$conv_ms")
        sleep 2
    done
    kill -INT $stress; wait $stress || true
    errors=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['errors_total'])" "$WORK/stress.json")
    for w in "${windows[@]}"; do
        IFS=: read -r name start end conv_ms <<< "$w"
        stall=$(stall_in "$WORK/stress.json" "$start" "$end")
        python3 - "$size" "$live" "$slots" "$name" "$conv_ms" "$raw_mb" "$stall" "$errors" <<'PY'
import sys
size, live, slots, name, ms, raw, stall, errors = sys.argv[1:]
live, slots, ms = int(live), int(slots), max(int(ms), 1)
s = ms / 1000
table_mb = slots * 256 / 1e6
print(f"| {size} | {live} | {slots} | {name} | {s:.2f} | {live / s:.0f} | {table_mb / s:.1f} | {raw} | {stall} | {errors} |")
PY
    done
    "$BIN/fsd" unmount "$MNT"
    "$BIN/fsd" fsck "$IMG" >/dev/null
done
