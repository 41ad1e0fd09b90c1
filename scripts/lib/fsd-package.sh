# shellcheck shell=bash
# Sourced by the measurement scripts after lib/common.sh. Needs BIN (release binaries) and
# WORK (scratch dir).
# fsd_package_setup: a signing key, a keyring the mount trusts ($WORK/keyring) and a
# package directory holding this build's fsd.
# fsd_package [FROM TO]: packs $WORK/u.lup replacing fsd with this build (same version),
# with sequence numbers 1, 2, ... per call; with FROM TO it converts the image's format.
# blockdev_package: packs $WORK/u.lup replacing the block driver with this build (same
# version), numbered in the same sequence.
fsd_package_setup() {
    mkdir -p "$WORK/keyring" "$WORK/pkg/bin"
    "$BIN/updater" keygen --out "$WORK/key" >/dev/null
    cp "$WORK/key.pub" "$WORK/keyring/" && chmod 755 "$WORK/keyring"
    cp "$BIN/fsd" "$WORK/pkg/bin/fsd"
    cp "$BIN/blockdev" "$WORK/pkg/bin/blockdev"
    FSD_VERSION="$(component_version "$BIN/fsd")"
    BD_VERSION="$(component_version "$BIN/blockdev")"
    FSD_SEQUENCE=1
}

fsd_package() {
    local nature="one-component" name="fsd-$FSD_SEQUENCE" format=""
    if [ $# -eq 2 ]; then
        nature="data-on-disk"
        name="format-v$1-to-v$2"
        format="[format]
from = $1
to = $2
"
    fi
    cat > "$WORK/pkg/manifest.toml" <<TOML
[package]
name = "$name"
sequence = $FSD_SEQUENCE
expires_unix = $(( $(date +%s) + 86400 ))
nature = "$nature"
description = "measurement"
deadline_ms = 10000

$format
[[component]]
name = "fsd"
applies_to = ["$FSD_VERSION"]
new_version = "$FSD_VERSION"
binary = "bin/fsd"
state_schema_reads = [1, 2]
state_schema_writes = 2
required_state = ["quiescent"]

[[file]]
path = "bin/fsd"
TOML
    "$BIN/updater" pack --manifest "$WORK/pkg/manifest.toml" --key "$WORK/key" --out "$WORK/u.lup" >/dev/null
    FSD_SEQUENCE=$((FSD_SEQUENCE + 1))
}

blockdev_package() {
    cat > "$WORK/pkg/manifest.toml" <<TOML
[package]
name = "blockdev-$FSD_SEQUENCE"
sequence = $FSD_SEQUENCE
expires_unix = $(( $(date +%s) + 86400 ))
nature = "one-component"
description = "measurement"
deadline_ms = 10000

[[component]]
name = "blockdev"
applies_to = ["$BD_VERSION"]
new_version = "$BD_VERSION"
binary = "bin/blockdev"
state_schema_reads = [1, 2]
state_schema_writes = 2
required_state = ["quiescent"]

[[file]]
path = "bin/blockdev"
TOML
    "$BIN/updater" pack --manifest "$WORK/pkg/manifest.toml" --key "$WORK/key" --out "$WORK/u.lup" >/dev/null
    FSD_SEQUENCE=$((FSD_SEQUENCE + 1))
}
