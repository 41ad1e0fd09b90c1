#!/usr/bin/env bash
# Molt's main job, end to end: build everything, make an image, mount it, run a verified
# workload, upgrade both components live while it runs, unmount, check the image.
# Run as root. Leaves nothing mounted and no process behind, even on failure.
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"
molt_start --verbose demo
IMG="$WORK/molt.img"
mkdir -p "$WORK/keyring" "$WORK/pkg/bin"

echo "== mkfs and mount"
"$BIN/fsd" mkfs "$IMG" --size 1G
"$BIN/updater" keygen --out "$WORK/key" >/dev/null
cp "$WORK/key.pub" "$WORK/keyring/"
chmod 755 "$WORK/keyring"
"$BIN/fsd" mount "$IMG" "$MNT" --keyring "$WORK/keyring"
"$BIN/updater" status --mount "$MNT"

# Packages that replace each component with this build (sequence numbers increase).
pack() { # NAME COMPONENT BINARY SEQUENCE VERSION SCHEMA_READS SCHEMA_WRITES
    local dir="$WORK/pkg/$1"
    mkdir -p "$dir/bin"
    cp "$3" "$dir/bin/$2"
    cat > "$dir/manifest.toml" <<TOML
[package]
name = "$1"
sequence = $4
expires_unix = $(( $(date +%s) + 86400 ))
nature = "one-component"
description = "demo: replace $2 with this build"
live = true
deadline_ms = 5000

[[component]]
name = "$2"
applies_to = ["$5"]
new_version = "$5"
binary = "bin/$2"
state_schema_reads = [$6]
state_schema_writes = $7
required_state = ["quiescent"]

[[file]]
path = "bin/$2"
TOML
    "$BIN/updater" pack --manifest "$dir/manifest.toml" --key "$WORK/key" --out "$WORK/$1.lup" >/dev/null
}
FSD_VERSION="$(component_version "$BIN/fsd")"
BD_VERSION="$(component_version "$BIN/blockdev")"

echo "== workload: 4 threads of verified reads, writes and metadata operations, 30 s"
"$BIN/molt-stress" --dir "$MNT" --threads 4 --mix read=40,write=40,meta=20 --files 8 \
    --file-size 32m --prepare --time 30s --quiet --json "$WORK/stress.json" &
STRESS=$!
sleep 8

seq=1
for round in 1 2 3; do
    pack "fsd-$round" fsd "$BIN/fsd" $seq "$FSD_VERSION" "1, 2" 2; seq=$((seq + 1))
    echo "== live update $round: fsd"
    "$BIN/updater" apply "$WORK/fsd-$round.lup" --mount "$MNT"
    pack "blockdev-$round" blockdev "$BIN/blockdev" $seq "$BD_VERSION" "1, 2" 2; seq=$((seq + 1))
    echo "== live update $round: blockdev"
    "$BIN/updater" apply "$WORK/blockdev-$round.lup" --mount "$MNT"
    sleep 2
done

echo "== waiting for the workload"
wait $STRESS || { echo "demo: the workload reported errors"; exit 1; }
python3 - "$WORK/stress.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ops = sum(v["count"] for v in r["ops"].values())
print(f"workload: {ops} operations, {r['errors_total']} errors, "
      f"longest stall {r['longest_stall']['duration_ms']:.1f} ms")
sys.exit(1 if r["errors_total"] else 0)
PY

"$BIN/updater" status --mount "$MNT"
echo "== unmount and fsck"
"$BIN/fsd" unmount "$MNT"
"$BIN/fsd" fsck "$IMG"
echo "== demo complete"
