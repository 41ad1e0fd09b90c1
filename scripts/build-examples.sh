#!/usr/bin/env bash
# Builds the neighbouring versions of fsd and blockdev that the live-update examples
# replace the running ones with, and packs every example of examples/updates/ into a
# signed package.
#
# usage: scripts/build-examples.sh [--profile P] [--default-bins DIR] [--bins-only] OUT_DIR [KEY]
#
#   OUT_DIR          receives bin/ (every binary below) and NN-name.lup per example
#   KEY              secret key for `updater pack` (from `updater keygen`); required
#                    unless --bins-only
#   --profile P      cargo profile (default: ci, what the test suite runs)
#   --default-bins D take the default fsd, blockdev and updater from D instead of
#                    building them (the tests pass their own build)
#   --bins-only      build and copy the binaries, pack nothing
#
# Binaries (OUT_DIR/bin/):
#   fsd, blockdev, updater  the default build (fsd 0.1.0, blockdev 0.2.0)
#   blockdev-counters32     blockdev --features legacy-counters-u32 (0.1.0-counters32)
#   fsd-ring48              fsd and blockdev built together with
#   blockdev-ring48           --features fsd/ring48,blockdev/ring48 (0.1.0+ring48, 0.2.0+ring48)
#   fsd-err2                fsd and blockdev built together with --features
#   blockdev-err2             fsd/errcodes-v2,blockdev/errcodes-v2 (0.1.0+err2, 0.2.0+errcodes2)
#   fsd-touch               fsd --features usage-on-touch (0.1.0+touch)
#   fsd-sup2                fsd --features supervisor-next (its supervisor: 0.1.0+sup2)
#   fsd-takeover-fault      fsd --features takeover-fault (a supervisor, 0.1.0+takeover-fault,
#                             that panics while taking a mount over)
#
# The variants are built in their own target directory, $CARGO_TARGET_DIR/variants
# (default target/variants), so they never overwrite the default binaries; builds of
# one variant after another reuse every dependency. Each binary is checked to report
# the version its example's manifest names.
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"

usage() {
    sed -n '5,15p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 64
}

root="$(cd "$(dirname "$0")/.." && pwd)"
profile=ci
default_bins=""
bins_only=0
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
        --default-bins) default_bins="${2:?--default-bins needs a directory}"; shift 2 ;;
        --bins-only) bins_only=1; shift ;;
        -h|--help) usage ;;
        -*) echo "build-examples: unknown option $1" >&2; usage ;;
        *) args+=("$1"); shift ;;
    esac
done
[ ${#args[@]} -ge 1 ] || usage
out="${args[0]}"
key="${args[1]:-}"
if [ "$bins_only" = 0 ] && [ -z "$key" ]; then
    echo "build-examples: a KEY is needed to pack (or use --bins-only)" >&2
    usage
fi

# cargo's output directory for a profile.
case "$profile" in
    dev|test) profdir=debug ;;
    bench) profdir=release ;;
    *) profdir="$profile" ;;
esac
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
variants="$target/variants"
mkdir -p "$out/bin" "$variants/bin"
out="$(cd "$out" && pwd)"

if [ -z "$default_bins" ]; then
    (cd "$root" && cargo build --profile "$profile" -p fsd -p blockdev -p updater)
    default_bins="$target/$profdir"
fi
for b in fsd blockdev updater; do
    [ -x "$default_bins/$b" ] || { echo "build-examples: $default_bins/$b is missing" >&2; exit 1; }
    cp -f "$default_bins/$b" "$out/bin/$b"
done

# One variant at a time: every variant build writes the same path in $variants, so the
# build and the copy that follows it must not interleave with another run of this script.
exec 9>"$variants/.lock"
flock 9

# variant FEATURES NAME=PACKAGE...: builds the PACKAGEs with FEATURES in the variants
# directory (one cargo run, so their shared library crates agree on the features) and
# keeps each binary as $variants/bin/NAME.
variant() {
    local features="$1" pkgs=() spec
    shift
    for spec in "$@"; do pkgs+=(-p "${spec#*=}"); done
    (cd "$root" && cargo build --quiet --profile "$profile" --target-dir "$variants" \
        "${pkgs[@]}" --features "$features")
    for spec in "$@"; do
        local name="${spec%%=*}" built="$variants/$profdir/${spec#*=}"
        if ! cmp -s "$built" "$variants/bin/$name"; then
            cp -f "$built" "$variants/bin/$name.tmp"
            mv -f "$variants/bin/$name.tmp" "$variants/bin/$name"
        fi
    done
}

variant blockdev/legacy-counters-u32 blockdev-counters32=blockdev
variant fsd/ring48,blockdev/ring48 fsd-ring48=fsd blockdev-ring48=blockdev
variant fsd/errcodes-v2,blockdev/errcodes-v2 fsd-err2=fsd blockdev-err2=blockdev
variant fsd/usage-on-touch fsd-touch=fsd
variant fsd/supervisor-next fsd-sup2=fsd
variant fsd/takeover-fault fsd-takeover-fault=fsd
flock -u 9

for b in blockdev-counters32 fsd-ring48 blockdev-ring48 fsd-err2 blockdev-err2 fsd-touch \
    fsd-sup2 fsd-takeover-fault; do
    cp -f "$variants/bin/$b" "$out/bin/$b"
done

# Every binary must report the version the manifests name.
expect() {
    local bin="$1" want="$2" got
    got="$(component_version "$out/bin/$bin")"
    if [ "$got" != "$want" ]; then
        echo "build-examples: bin/$bin reports version $got, expected $want" >&2
        exit 1
    fi
}
expect fsd 0.1.0
expect blockdev 0.2.0
expect blockdev-counters32 0.1.0-counters32
expect fsd-ring48 0.1.0+ring48
expect blockdev-ring48 0.2.0+ring48
expect fsd-err2 0.1.0+err2
expect blockdev-err2 0.2.0+errcodes2
expect fsd-touch 0.1.0+touch
# The supervisor variants: what their supervisor says of itself.
expect_supervisor() {
    local got
    got="$("$out/bin/$1" supervisor-info | sed -n 's/.*"version":"\([^"]*\)".*/\1/p')"
    if [ "$got" != "$2" ]; then
        echo "build-examples: bin/$1 reports supervisor version $got, expected $2" >&2
        exit 1
    fi
}
expect_supervisor fsd 0.1.0
expect_supervisor fsd-sup2 0.1.0+sup2
expect_supervisor fsd-takeover-fault 0.1.0+takeover-fault

[ "$bins_only" = 1 ] && exit 0

# The payload of each example: "PAYLOAD_PATH BINARY" pairs.
payload() {
    case "$1" in
        01-one-component) echo "bin/blockdev blockdev" ;;
        02-interaction) echo "bin/fsd fsd-ring48 bin/blockdev blockdev-ring48" ;;
        03-global-data) echo "bin/fsd fsd-err2 bin/blockdev blockdev-err2" ;;
        04-global-algorithm) echo "bin/fsd fsd-touch" ;;
        05-hardware) echo "bin/fsd fsd" ;;
        06-not-live) echo "bin/fsd fsd" ;;
        07-data-on-disk) echo "bin/fsd fsd" ;;
        *) echo "build-examples: no payload known for example $1" >&2; exit 1 ;;
    esac
}

for dir in "$root"/examples/updates/*/; do
    name="$(basename "$dir")"
    stage="$out/stage/$name"
    rm -rf "$stage"
    mkdir -p "$stage/bin"
    cp "$dir/manifest.toml" "$stage/manifest.toml"
    spec="$(payload "$name")"
    read -ra pairs <<< "$spec"
    set -- "${pairs[@]}"
    while [ $# -gt 0 ]; do
        ln -f "$out/bin/$2" "$stage/$1" 2>/dev/null || cp -f "$out/bin/$2" "$stage/$1"
        shift 2
    done
    "$out/bin/updater" pack --manifest "$stage/manifest.toml" --key "$key" --out "$out/$name.lup"
done
