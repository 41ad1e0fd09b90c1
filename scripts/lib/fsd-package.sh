# shellcheck shell=bash
# Sourced by the measurement scripts after lib/common.sh. Needs BIN (release binaries) and
# WORK (scratch dir).
# fsd_package_setup: a signing key, a keyring the mount trusts ($WORK/keyring) and a
# package directory holding this build's fsd and blockdev.
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

# Packs $WORK/u.lup: package NAME of NATURE replacing COMPONENT (at VERSION) with this
# build, with the manifest lines FORMAT (a [format] table, or nothing) before it.
component_package() { # NAME NATURE COMPONENT VERSION FORMAT
    cat > "$WORK/pkg/manifest.toml" <<TOML
[package]
name = "$1"
sequence = $FSD_SEQUENCE
expires_unix = $(( $(date +%s) + 86400 ))
nature = "$2"
description = "measurement"
deadline_ms = 10000

$5
[[component]]
name = "$3"
applies_to = ["$4"]
new_version = "$4"
binary = "bin/$3"
state_schema_reads = [1, 2]
state_schema_writes = 2
required_state = ["quiescent"]

[[file]]
path = "bin/$3"
TOML
    "$BIN/updater" pack --manifest "$WORK/pkg/manifest.toml" --key "$WORK/key" --out "$WORK/u.lup" >/dev/null
    FSD_SEQUENCE=$((FSD_SEQUENCE + 1))
}

fsd_package() {
    if [ $# -eq 2 ]; then
        component_package "format-v$1-to-v$2" data-on-disk fsd "$FSD_VERSION" "[format]
from = $1
to = $2
"
    else
        component_package "fsd-$FSD_SEQUENCE" one-component fsd "$FSD_VERSION" ""
    fi
}

blockdev_package() {
    component_package "blockdev-$FSD_SEQUENCE" one-component blockdev "$BD_VERSION" ""
}
