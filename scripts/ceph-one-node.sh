#!/usr/bin/env bash
# Molt on Ceph RBD, end to end on one machine: installs Debian's Ceph packages and qemu's
# rbd driver (qemu-block-extra), brings up a one-node cluster (one monitor, one manager,
# one BlueStore OSD on a loop device, replication size 1), creates two RBD images and
# exports each with qemu-nbd's rbd driver on a unix socket. Molt is made on the first
# export; fio runs in its mount (mounted afresh with each FUSE worker thread count for
# each job) and, as the limit for a client, with fio's own nbd engine on the twin export,
# the jobs interleaved in rounds so that every column sees the same machine; fsck after
# the last unmount. Prints the medians as a markdown table. Everything lives in the
# temporary directory it names; on exit it unmounts and stops qemu-nbd, the Ceph daemons
# and the loop device. Needs root.
#
#   scripts/ceph-one-node.sh [--runs N] [--runtime SECONDS] [--threads N[,N...]]
# (default: 3 rounds of 8 s per job; --threads: the `fsd mount --threads` values, 4,16)
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"

RUNS=3
RUNTIME=8
THREADS=4,16
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) RUNS="${2:?--runs needs a number}"; shift 2 ;;
        --runtime) RUNTIME="${2:?--runtime needs seconds}"; shift 2 ;;
        --threads) THREADS="${2:?--threads needs N[,N...]}"; shift 2 ;;
        *) molt_die "unknown argument $1 (usage: $0 [--runs N] [--runtime SECONDS] [--threads N[,N...]])" ;;
    esac
done
IFS=, read -ra THREAD_COUNTS <<< "$THREADS"
[ "$(id -u)" = 0 ] || molt_die "needs root (loop device, mount, apt-get)"

molt_start ceph
C="$WORK/ceph"
CEPH_CONF="$C/ceph.conf"
URI="nbd+unix:///molt?socket=$WORK/fs.sock"     # Molt's
RAW_URI="nbd+unix:///molt?socket=$WORK/raw.sock" # fio's nbd engine's
export CEPH_CONF
LOOP=""
DAEMONS=() # pids, in start order

ceph_cleanup() {
    local rc=$? i pid log
    set +e
    if [ "$rc" != 0 ] && [ -d "$C/log" ]; then
        for log in "$C"/log/*; do
            echo "== $log (last lines)" >&2
            tail -n 15 "$log" >&2
        done
    fi
    if mountpoint -q "$MNT"; then
        "$BIN/fsd" unmount "$MNT" || umount -l "$MNT"
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        pid="${DAEMONS[$i]}"
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [ -n "$LOOP" ]; then losetup -d "$LOOP"; fi
    molt_cleanup
    exit "$rc"
}
trap ceph_cleanup EXIT
trap 'exit 130' INT TERM
echo "ceph-one-node: working in $WORK"

# --- packages --------------------------------------------------------------------------
export DEBIAN_FRONTEND=noninteractive
need=()
for pkg in ceph-mon ceph-osd ceph-mgr ceph-common; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
# qemu-nbd's rbd driver is a module (block-rbd.so) in qemu-block-extra, which must come
# from the same build as qemu-utils.
QEMU_VERSION="$(dpkg-query -W -f='${Version}' qemu-utils)"
extra="$(dpkg-query -W -f='${Version}' qemu-block-extra 2>/dev/null || true)"
if [ ${#need[@]} -gt 0 ] || [ "$extra" != "$QEMU_VERSION" ]; then
    echo "ceph-one-node: installing ${need[*]} qemu-block-extra=$QEMU_VERSION"
    apt-get update -qq
    if [ ${#need[@]} -gt 0 ]; then apt-get install -y -qq "${need[@]}" >/dev/null; fi
fi
if [ "$extra" != "$QEMU_VERSION" ]; then
    if apt-cache madison qemu-block-extra | awk -v v="$QEMU_VERSION" '$3 == v { f = 1 } END { exit !f }'; then
        apt-get install -y -qq --no-install-recommends "qemu-block-extra=$QEMU_VERSION" >/dev/null
    elif [[ "$QEMU_VERSION" == *~bpo* ]]; then
        # qemu-utils came from backports: take its module from there through a source list
        # of this run's own, leaving the machine's apt configuration alone.
        # shellcheck source=/dev/null
        codename="$(. /etc/os-release && echo "$VERSION_CODENAME")"
        mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial"
        printf 'deb http://deb.debian.org/debian %s main\ndeb http://deb.debian.org/debian %s-backports main\n' \
            "$codename" "$codename" > "$WORK/apt/sources.list"
        apt_private=(-o "Dir::Etc::sourcelist=$WORK/apt/sources.list" -o Dir::Etc::sourceparts=-
            -o "Dir::State::lists=$WORK/apt/lists" -o "Dir::Cache=$WORK/apt/cache")
        apt-get "${apt_private[@]}" update -qq
        apt-get "${apt_private[@]}" install -y -qq --no-install-recommends \
            "qemu-block-extra=$QEMU_VERSION" >/dev/null
    else
        molt_die "qemu-block-extra $QEMU_VERSION (qemu-utils' version) is not available from apt"
    fi
fi
dpkg -L qemu-block-extra | grep -q '/block-rbd\.so$' || molt_die "qemu-block-extra has no rbd driver"

# --- the cluster -----------------------------------------------------------------------
# Waits up to SECONDS for COMMAND to succeed.
wait_for() { # SECONDS WHAT COMMAND...
    local seconds="$1" what="$2" i
    shift 2
    for ((i = 0; i < seconds * 2; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    molt_die "timed out after ${seconds}s waiting for $what"
}
alive() { # PID
    kill -0 "$1" 2>/dev/null || molt_die "process $1 exited (see the logs above)"
}
cephq() {
    ceph --connect-timeout 10 "$@"
}

mkdir -p "$C/run" "$C/log" "$C/mon.a" "$C/mgr.x" "$C/osd.0"
fsid="$(python3 -c 'import uuid; print(uuid.uuid4())')"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cat > "$CEPH_CONF" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
public network = 127.0.0.0/8
run dir = $C/run
log file = $C/log/\$name.log
keyring = $C/\$name.keyring
mon data = $C/\$name
mgr data = $C/\$name
osd data = $C/\$name
osd objectstore = bluestore
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 5
auth allow insecure global id reclaim = false
EOF

echo "ceph-one-node: monitor on 127.0.0.1:$port"
ceph-authtool --create-keyring "$C/mon..keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$C/client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool "$C/mon..keyring" --import-keyring "$C/client.admin.keyring" >/dev/null
monmaptool --create --addv a "[v2:127.0.0.1:$port]" --fsid "$fsid" "$C/monmap" >/dev/null
ceph-mon -c "$CEPH_CONF" --mkfs -i a --monmap "$C/monmap" --keyring "$C/mon..keyring"
ceph-mon -c "$CEPH_CONF" -i a -f > "$C/log/mon.a.out" 2>&1 &
DAEMONS+=("$!")
wait_for 60 "the monitor" cephq mon stat
alive "${DAEMONS[-1]}"

cephq auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    -o "$C/mgr.x.keyring"
ceph-mgr -c "$CEPH_CONF" -i x -f > "$C/log/mgr.x.out" 2>&1 &
DAEMONS+=("$!")

# The OSD: BlueStore on a loop device over a sparse file, marked non-rotational (the
# backing file is on an SSD or a VM disk) so that BlueStore and the OSD take their SSD
# settings.
truncate -s 8G "$C/osd.img"
LOOP="$(losetup --find --show --direct-io=on "$C/osd.img")"
echo 0 > "/sys/block/${LOOP#/dev/}/queue/rotational" 2>/dev/null || true
echo "ceph-one-node: OSD on $LOOP (8 GiB, direct I/O to $C/osd.img)"
ln -s "$LOOP" "$C/osd.0/block"
osd_uuid="$(python3 -c 'import uuid; print(uuid.uuid4())')"
ceph-authtool --create-keyring "$C/osd.0.keyring" --gen-key -n osd.0 >/dev/null
printf '{"cephx_secret": "%s"}\n' "$(ceph-authtool -p -n osd.0 "$C/osd.0.keyring")" > "$C/osd.0.json"
osd_id="$(cephq osd new "$osd_uuid" -i "$C/osd.0.json")"
[ "$osd_id" = 0 ] || molt_die "the new OSD got id $osd_id, expected 0"
ceph-osd -c "$CEPH_CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" > "$C/log/osd.0.mkfs" 2>&1
ceph-osd -c "$CEPH_CONF" -i 0 -f > "$C/log/osd.0.out" 2>&1 &
DAEMONS+=("$!")
wait_for 120 "the OSD to come up" \
    sh -c 'ceph --connect-timeout 10 osd stat -f json | grep -q "\"num_up_osds\":1,"'
alive "${DAEMONS[-1]}"

cephq osd pool create molt 32 32 2>> "$C/log/ceph-cli.out"
cephq osd pool application enable molt rbd 2>> "$C/log/ceph-cli.out"
rbd pool init molt
pgs_clean() {
    local stat
    stat="$(cephq pg stat -f json)"
    [ "$(json_get - "[s['num'] for s in j['pg_summary']['num_pg_by_state'] if s['name'] == 'active+clean'] == [j['pg_summary']['num_pgs']]" <<< "$stat")" = true ]
}
wait_for 180 "every placement group to be active+clean" pgs_clean
rbd create molt/fs --size 2G
rbd create molt/raw --size 2G
echo "ceph-one-node: $(ceph --version | cut -d' ' -f1-3); pool molt (size 1, 32 PGs), images molt/fs and molt/raw (2 GiB)"

# --- the exports and Molt ---------------------------------------------------------------
# --cache=none: qemu's rbd driver then turns librbd's client cache off, so that every
# write and flush reaches the cluster.
for image in fs raw; do
    qemu-nbd -f raw -x molt --persistent --shared=4 --cache=none -k "$WORK/$image.sock" \
        "rbd:molt/$image:id=admin:conf=$CEPH_CONF" > "$C/log/qemu-nbd-$image.out" 2>&1 &
    DAEMONS+=("$!")
    wait_for 60 "qemu-nbd's socket for molt/$image" test -S "$WORK/$image.sock"
    alive "${DAEMONS[-1]}"
done
echo "ceph-one-node: qemu-nbd $QEMU_VERSION exports molt/fs as $URI, molt/raw as $RAW_URI"

# fio JOB NAME, then its arguments: rw, block size, queue depth.
JOBS=("4 KiB random write, QD1|randwrite|4k|1" "4 KiB random write, QD32|randwrite|4k|32"
    "1 MiB sequential write, QD8|write|1M|8" "1 MiB sequential read, QD8|read|1M|8")
MOLT_FIO=(--filename="$MNT/fio.dat" --direct=1 --ioengine=io_uring)
NBD_FIO=(--ioengine=nbd --uri="$RAW_URI")
mkdir -p "$WORK/fio"
fio_layout() { # TAG FIO-ARGS...: writes the 512 MiB the jobs use
    local tag="$1"
    shift
    fio --name=layout --rw=write --bs=1M --iodepth=8 --size=512M --output-format=json \
        --output="$WORK/fio/$tag-layout.json" "$@" >/dev/null
}
fio_job() { # TAG N R FIO-ARGS...: job N of round R, into $WORK/fio/TAG-N-R.json
    local tag="$1" n="$2" r="$3" rw bs qd
    shift 3
    IFS='|' read -r _ rw bs qd <<< "${JOBS[$n]}"
    fio --name=job --rw="$rw" --bs="$bs" --iodepth="$qd" --size=512M \
        --runtime="$RUNTIME" --time_based --output-format=json \
        --output="$WORK/fio/$tag-$n-$r.json" "$@" >/dev/null
}
# The runs of job N under TAG, comma-separated: IOPS for 4 KiB jobs, MiB/s for the others.
fio_values() { # TAG N
    local r rw bs f out=()
    IFS='|' read -r _ rw bs _ <<< "${JOBS[$2]}"
    for ((r = 1; r <= RUNS; r++)); do
        f="$WORK/fio/$1-$2-$r.json"
        if [ "$bs" = 4k ]; then
            out+=("$(json_get "$f" "round(j['jobs'][0][args[0]]['iops'])" "${rw/rand/}")")
        else
            out+=("$(json_get "$f" "round(j['jobs'][0][args[0]]['bw_bytes'] / 1048576)" "${rw/rand/}")")
        fi
    done
    local IFS=,
    echo "${out[*]}"
}

t0=$(now_ms)
"$BIN/fsd" mkfs "$URI"
t1=$(now_ms)
"$BIN/fsd" mount "$URI" "$MNT" --threads "${THREAD_COUNTS[0]}"
t2=$(now_ms)
fio_layout molt "${MOLT_FIO[@]}"
t3=$(now_ms)
"$BIN/fsd" unmount "$MNT"
t4=$(now_ms)
echo "ceph-one-node: mkfs $((t1 - t0)) ms, mount $((t2 - t1)) ms, unmount $((t4 - t3)) ms"
fio_layout nbd "${NBD_FIO[@]}"
echo "ceph-one-node: $RUNS rounds of ${RUNTIME}s per job: Molt with ${THREADS} FUSE threads, fio's nbd engine"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
for ((r = 1; r <= RUNS; r++)); do
    for n in "${!JOBS[@]}"; do
        for t in "${THREAD_COUNTS[@]}"; do
            "$BIN/fsd" mount "$URI" "$MNT" --threads "$t"
            fio_job "molt$t" "$n" "$r" "${MOLT_FIO[@]}"
            "$BIN/fsd" unmount "$MNT"
        done
        fio_job nbd "$n" "$r" "${NBD_FIO[@]}"
    done
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
t5=$(now_ms)
fsck_out="$("$BIN/fsd" fsck "$URI")" || molt_die "fsck after the last unmount failed: $fsck_out"
t6=$(now_ms)
echo "ceph-one-node: fsck $((t6 - t5)) ms: $fsck_out"

unit() { case "$1" in *4\ KiB*) echo IOPS ;; *) echo MiB/s ;; esac; }
echo
echo "Molt over qemu-nbd (rbd, --cache=none) on a one-node Ceph cluster, fio's nbd engine on a twin"
echo "export: medians of $RUNS runs of ${RUNTIME}s (each run in brackets); load average $load_before"
echo "before the rounds, $load_after after."
echo
header="| fio job |"
rule="|---|"
for t in "${THREAD_COUNTS[@]}"; do header+=" Molt, $t threads |"; rule+="---:|"; done
header+=" fio nbd engine |"
rule+="---:|"
for t in "${THREAD_COUNTS[@]}"; do header+=" Molt $t / fio nbd |"; rule+="---:|"; done
echo "$header"
echo "$rule"
for n in "${!JOBS[@]}"; do
    IFS='|' read -r label _ <<< "${JOBS[$n]}"
    u="$(unit "$label")"
    nv="$(fio_values nbd "$n")"
    IFS=, read -ra na <<< "$nv"
    b="$(median "${na[@]}")"
    row="| $label ($u) |"
    ratios=""
    for t in "${THREAD_COUNTS[@]}"; do
        mv="$(fio_values "molt$t" "$n")"
        IFS=, read -ra ma <<< "$mv"
        m="$(median "${ma[@]}")"
        row+=" $m ($mv) |"
        ratios+=" $(python3 -c "print(f'{$m / max($b, 1):.2f}')") |"
    done
    echo "$row $b ($nv) |$ratios"
done
