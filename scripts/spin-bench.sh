#!/usr/bin/env bash
# Measures the block driver's spin policies side by side on a Molt mount: small-file
# creates per second with the CPU the server and the driver spend per create, then fio
# 4 KiB O_DIRECT random writes at QD1 and QD32 with their CPU per write. Each round
# mounts a fresh 2 GiB image once per configuration; rounds interleave the
# configurations, and the summary gives the median of each figure. Needs root and a
# release build (`cargo build --release --workspace`).
#
#   scripts/spin-bench.sh [--runs N] [--files N] [--runtime S] [--dir DIR] CONFIG...
#
# A CONFIG is LABEL=MODE:MICROS (MOLT_DRIVER_SPIN=MODE, MOLT_DRIVER_SPIN_US=MICROS), e.g.
# `fixed50=fixed:50 none=fixed:0 adaptive=adaptive:50`. Per-run lines go to stderr, the
# summary (markdown) to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}/release"
runs=3 files=20000 runtime=8 base=/var/tmp
configs=()
while (($#)); do
    case "$1" in
    --runs) runs=$2; shift 2 ;;
    --files) files=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --dir) base=$2; shift 2 ;;
    *=*:*) configs+=("$1"); shift ;;
    *) echo "usage: $0 [--runs N] [--files N] [--runtime S] [--dir DIR] LABEL=MODE:MICROS..." >&2
       exit 2 ;;
    esac
done
((${#configs[@]})) || configs=(fixed50=fixed:50 none=fixed:0 adaptive=adaptive:50)

dir=$(mktemp -d "$base/spin-bench.XXXXXX")
img=$dir/img mnt=$dir/mnt results=$dir/results.tsv
mkdir "$mnt"
cleanup() {
    if mountpoint -q "$mnt"; then "$target/fsd" unmount "$mnt" || true; fi
    rm -rf "$dir"
}
trap cleanup EXIT

# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
tick_us=$((1000000 / $(getconf CLK_TCK)))

# One child of the mount's supervisor, by the start of its command line.
child_pid() {
    local sup
    sup=$(pgrep -f "fsd mount $img $mnt --foreground" | head -1)
    ps -o pid=,args= --ppid "$sup" | awk -v want="$1" 'index($0, want) {print $1; exit}'
}

measure() { # LABEL MODE MICROS ROUND
    local label=$1 mode=$2 us=$3 round=$4
    rm -f "$img"
    "$target/fsd" mkfs "$img" --size 2G >/dev/null
    MOLT_DRIVER_SPIN=$mode MOLT_DRIVER_SPIN_US=$us "$target/fsd" mount "$img" "$mnt"
    local srv drv
    srv=$(child_pid "fsd serve")
    drv=$(child_pid "blockdev serve")
    # The driver must run the configuration asked for (`--spin` is passed only for fixed).
    local args want="--spin-us $us"
    args=$(tr '\0' ' ' <"/proc/$drv/cmdline")
    [[ $mode == fixed ]] && want+=" .*--spin fixed"
    [[ $args =~ $want ]] || { echo "driver runs $args, not $mode:$us" >&2; exit 1; }
    # Creates: open(O_CREAT), a 100-byte write, close, in one directory, one thread.
    mkdir "$mnt/c"
    local s0 d0 t
    s0=$(cpu_ticks "$srv") d0=$(cpu_ticks "$drv")
    t=$(python3 - "$mnt/c" "$files" <<'EOF'
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
data = b"x" * 100
t0 = time.monotonic()
for i in range(n):
    fd = os.open(f"{d}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, data)
    os.close(fd)
print(time.monotonic() - t0)
EOF
)
    local s1 d1
    s1=$(cpu_ticks "$srv") d1=$(cpu_ticks "$drv")
    python3 -c "import sys; t, n, s, d, u = map(float, sys.argv[1:]); \
print(f'{n / t:.0f}\t{s * u / n:.1f}\t{d * u / n:.1f}')" \
        "$t" "$files" $((s1 - s0)) $((d1 - d0)) "$tick_us" >"$dir/creates"
    # fio: a laid-out 256 MiB file, then QD1 and QD32 random writes.
    local f=$mnt/fio.dat
    fio --name=layout --filename="$f" --size=256m --rw=write --bs=1m --direct=1 \
        --ioengine=io_uring --output=/dev/null
    local qd row=""
    for qd in 1 32; do
        s0=$(cpu_ticks "$srv") d0=$(cpu_ticks "$drv")
        fio --name=qd$qd --filename="$f" --size=256m --rw=randwrite --bs=4k --iodepth=$qd \
            --direct=1 --ioengine=io_uring --time_based --runtime="$runtime" --norandommap \
            --output-format=json --output="$dir/fio.json"
        s1=$(cpu_ticks "$srv") d1=$(cpu_ticks "$drv")
        row+=$(python3 -c "import json, sys; w = json.load(open(sys.argv[1]))['jobs'][0]['write']; \
s, d, u = map(float, sys.argv[2:]); n = w['total_ios']; \
print(f\"\t{w['iops']:.0f}\t{s * u / n:.1f}\t{d * u / n:.1f}\", end='')" \
            "$dir/fio.json" $((s1 - s0)) $((d1 - d0)) "$tick_us")
    done
    "$target/fsd" unmount "$mnt"
    local line
    line="$label	$round	$(cat "$dir/creates")$row"
    echo "$line" >>"$results"
    echo "$line" >&2
}

echo "config	round	creates/s	srv_us/create	drv_us/create	qd1_iops	srv_us/w	drv_us/w	qd32_iops	srv_us/w	drv_us/w" >&2
for round in $(seq 1 "$runs"); do
    for c in "${configs[@]}"; do
        label=${c%%=*} spec=${c#*=}
        measure "$label" "${spec%%:*}" "${spec#*:}" "$round"
    done
done

python3 - "$results" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    rows.setdefault(f[0], []).append([float(x) for x in f[2:]])
print("| driver spin | creates/s | server µs CPU / create | driver µs CPU / create "
      "| QD1 IOPS | server / driver µs CPU per QD1 write "
      "| QD32 IOPS | server / driver µs CPU per QD32 write |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for label, rs in rows.items():
    m = [statistics.median(col) for col in zip(*rs)]
    print(f"| {label} | {m[0]:,.0f} | {m[1]:.0f} | {m[2]:.0f} | {m[3]:,.0f} | "
          f"{m[4]:.0f} / {m[5]:.0f} | {m[6]:,.0f} | {m[7]:.0f} / {m[8]:.0f} |")
EOF
