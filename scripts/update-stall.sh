#!/usr/bin/env bash
# Measures what a live update costs a running workload: the longest I/O stall seen by
# molt-stress and the update's total time, with 1, 1,000 and 10,000 files held open.
# Usage: [TRANSPORT=dev|uring] [COMPONENT=fsd|blockdev] scripts/update-stall.sh
# [UPDATES_PER_CASE]   (root; builds release). COMPONENT is the one replaced (default fsd);
# over io_uring, which does not replace fsd live (docs/live-update.md), it is blockdev.
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"
molt_start stall
UPDATES="${1:-5}"
TRANSPORT="${TRANSPORT:-dev}"
component="${COMPONENT:-fsd}"
[ "$TRANSPORT" = uring ] && component=blockdev
echo "transport $TRANSPORT: replacing $component"
ulimit -n "$(ulimit -Hn)"
# shellcheck source=lib/fsd-package.sh
. scripts/lib/fsd-package.sh
fsd_package_setup

printf '| files held open | updates | longest stall during an update (ms) | longest stall of the run (ms) | median update total (ms) | median drain (ms) | workload errors |\n|---:|---:|---:|---:|---:|---:|---:|\n'
for open in 1 1000 10000; do
    IMG="$WORK/img-$open"
    "$BIN/fsd" mkfs "$IMG" --size 2G >/dev/null
    "$BIN/fsd" mount "$IMG" "$MNT" --keyring "$WORK/keyring" --transport "$TRANSPORT"
    size=$(( open >= 1000 ? 64 * 1024 : 16 * 1024 * 1024 ))
    common=(--dir "$MNT" --threads 4 --files "$open" --hold-open "$open" --file-size "$size" --state "$WORK/state-$open")
    # Lay the files out first, then run the workload the updates are measured against.
    "$BIN/molt-stress" "${common[@]}" --prepare --ops 1 --quiet > /dev/null
    "$BIN/molt-stress" "${common[@]}" --mix read=45,write=45,meta=10 --time $(( 8 + UPDATES * 3 ))s \
        --quiet --json "$WORK/stress.json" > "$WORK/stress.out" 2>&1 &
    stress=$!
    sleep 4
    totals=(); drains=(); windows=()
    for _ in $(seq 1 "$UPDATES"); do
        if [ "$component" = fsd ]; then
            # shellcheck disable=SC2119 # no arguments: same version, no conversion
            fsd_package
        else
            blockdev_package
        fi
        molt_apply "$WORK/u.lup" "$WORK/events.json"
        start=$APPLY_START_MS end=$APPLY_END_MS
        windows+=("$start:$end")
        # The total is what `updater apply` took (sending the package included), as
        # docs/BENCHMARKS.md defines it; the drain is the preparation phase from the
        # update's events.
        totals+=("$((end - start))")
        drains+=("$(event_phase_ms "$WORK/events.json" Preparation)")
        sleep 2
    done
    wait "$stress" || true
    # The longest stall (no completion on any thread) overlapping an update's window (from
    # `updater apply` starting to its exit).
    update_stall=$(scripts/stall_window.py "$WORK/stress.json" overlap "${windows[@]}")
    stall=$(json_get "$WORK/stress.json" "round(j['longest_stall']['duration_ms'], 1)")
    errors=$(json_get "$WORK/stress.json" "j['errors_total']")
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$open" "$UPDATES" "$update_stall" "$stall" "$(median "${totals[@]}")" "$(median "${drains[@]}")" "$errors"
    "$BIN/fsd" unmount "$MNT"
    "$BIN/fsd" fsck "$IMG" >/dev/null
done
