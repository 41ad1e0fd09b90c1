#!/usr/bin/env bash
# Measures online format conversions (v1 -> v2 -> v3 by live updates) on a 1 GiB and an
# 8 GiB image while molt-stress runs: conversion time, rate (live inodes/s and inode-table
# MB/s), the raw sequential read bandwidth of the image for comparison, and the longest
# stall the workload saw while each conversion ran.
# Usage: scripts/convert-bench.sh [FILES]   (root; builds release; FILES per image, 20000)
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"
molt_start convert
FILES="${1:-20000}"
# shellcheck source=lib/fsd-package.sh
. scripts/lib/fsd-package.sh
fsd_package_setup

# The statistics of the mount's last finished conversion, once it is the one to format
# v$1: "inodes bytes millis longest_step_us mean_step_us" (the mount's status keeps them
# in last_conversion). `updater apply` waits for the conversion, so the first look
# mostly finds it.
conversion_finished() { # TO
    local status finished='(j.get("last_conversion") or {})'
    for _ in $(seq 1 600); do
        status="$(molt_status)"
        if [ "$(json_get - "${finished}.get('to')" <<< "$status")" = "$1" ]; then
            json_get - "' '.join(str(${finished}[k]) for k in ('inodes', 'bytes', 'millis', 'longest_step_us', 'mean_step_us'))" <<< "$status"
            return
        fi
        sleep 0.1
    done
    molt_die "the mount's status shows no finished conversion to format v$1"
}

# Raw sequential read bandwidth of the disk the images live on (a written 1 GiB file,
# O_DIRECT, 1 MiB reads): what a conversion that read everything could reach at most.
dd if=/dev/zero of="$WORK/raw" bs=1M count=1024 oflag=direct status=none
raw_mb=$(dd if="$WORK/raw" of=/dev/null bs=1M iflag=direct 2>&1 \
    | python3 -c "import re,sys; t=sys.stdin.read(); b=int(re.search(r'^(\d+) bytes', t, re.M).group(1)); s=float(re.search(r'copied, ([0-9.]+) s', t).group(1)); print(round(b/s/1e6))")
rm -f "$WORK/raw"

printf '| image | inode slots | live inodes | conversion | inodes rewritten | metadata MB | time (s) | inodes/s | MB/s | raw read MB/s | step mean / longest (ms) | longest stall during it (ms) | longest stall outside conversions (ms) | workload errors |\n'
printf '|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n'
for size in 1G 8G; do
    IMG="$WORK/img-$size"
    slots=$("$BIN/fsd" mkfs "$IMG" --size "$size" --format-version 1 --json | json_get - "j['inodes']")
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
        read -r from to <<< "$step"
        fsd_package "$from" "$to"
        start=$(now_ms)
        molt_apply "$WORK/u.lup" "$WORK/events.json"
        end=$(now_ms)
        stats=$(conversion_finished "$to")
        read -r inodes bytes ms longest mean <<< "$stats"
        windows+=("v$from -> v$to:$start:$end:$inodes:$bytes:$ms:$longest:$mean")
        sleep 2
    done
    kill -INT "$stress"; wait "$stress" || true
    errors=$(json_get "$WORK/stress.json" "j['errors_total']")
    # Outside both conversions: from the start of the run to the first apply, and after
    # the last one.
    first_start=$(cut -d: -f2 <<< "${windows[0]}")
    last_end=$(cut -d: -f3 <<< "${windows[1]}")
    outside=$(scripts/stall_window.py "$WORK/stress.json" outside "$first_start" "$last_end")
    for w in "${windows[@]}"; do
        IFS=: read -r name start end inodes bytes ms longest mean <<< "$w"
        stall=$(scripts/stall_window.py "$WORK/stress.json" overlap "$start:$end")
        python3 - "$size" "$slots" "$live" "$name" "$inodes" "$bytes" "$ms" "$raw_mb" "$mean" "$longest" "$stall" "$outside" "$errors" <<'PY'
import sys
size, slots, live, name, inodes, nbytes, ms, raw, mean, longest, stall, outside, errors = sys.argv[1:]
inodes, nbytes, s = int(inodes), int(nbytes), max(int(ms), 1) / 1000
steps = f"{int(mean) / 1000:.1f} / {int(longest) / 1000:.0f}"
print(f"| {size} | {slots} | {live} | {name} | {inodes} | {nbytes / 1e6:.1f} | {s:.2f} | {inodes / s:.0f} | {nbytes / 1e6 / s:.1f} | {raw} | {steps} | {stall} | {outside} | {errors} |")
PY
    done
    "$BIN/fsd" unmount "$MNT"
    "$BIN/fsd" fsck "$IMG" >/dev/null
done
