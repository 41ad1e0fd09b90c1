#!/usr/bin/env bash
# Measures what a component crash costs a running workload: molt-stress runs verified I/O
# with 1,000 files held open while the supervisor (then, on a fresh mount each, the
# filesystem server and the block driver) is killed with SIGKILL four times; for each
# kill, the longest window with no completed operation around it, and the workload's
# error count. A killed supervisor is replaced by one that adopts the running components;
# each kill waits for that before the next.
# Usage: [TRANSPORT=dev|uring] scripts/recovery-stall.sh   (root; builds release). Over
# io_uring a server crash is not recovered (docs/live-update.md): only the driver is killed.
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"
molt_start recovery
ulimit -n "$(ulimit -Hn)"

# The running component NAME's pid, from the mount's status; checked to be a child of the
# mount's supervisor SUPERVISOR (the process the supervisor restarts after a kill).
victim_pid() { # SUPERVISOR NAME
    local pid
    pid=$(component_pid "$2")
    [ "$(ps -o ppid= -p "$pid" | tr -d ' ')" = "$1" ] \
        || molt_die "$2 (pid $pid) is not a child of the supervisor (pid $1)"
    echo "$pid"
}

TRANSPORT="${TRANSPORT:-dev}"
victims="supervisor fsd blockdev"
[ "$TRANSPORT" = uring ] && victims="supervisor blockdev"
echo "transport $TRANSPORT"
printf '| component killed | kills | longest stall per kill (ms) | median (ms) | workload errors |\n|---|---:|---|---:|---:|\n'
for victim in $victims; do
    IMG="$WORK/img"
    "$BIN/fsd" mkfs "$IMG" --size 2G --force >/dev/null
    "$BIN/fsd" mount "$IMG" "$MNT" --transport "$TRANSPORT"
    sup=$(supervisor_pid)
    common=(--dir "$MNT" --threads 4 --files 1000 --hold-open 1000 --file-size 65536 --state "$WORK/state-$victim")
    "$BIN/molt-stress" "${common[@]}" --prepare --ops 1 --quiet > /dev/null
    "$BIN/molt-stress" "${common[@]}" --mix read=45,write=45,meta=10 --time 22s \
        --quiet --json "$WORK/stress.json" > "$WORK/stress.out" 2>&1 &
    stress=$!
    sleep 3
    kills=()
    for _ in 1 2 3 4; do
        if [ "$victim" = supervisor ]; then
            pid=$(supervisor_pid)
        else
            pid=$(victim_pid "$sup" "$victim")
        fi
        at=$(now_ms)
        kill -9 "$pid"
        kills+=("$at")
        sleep 4
        if [ "$victim" = supervisor ]; then
            [ "$(supervisor_pid)" != "$pid" ] \
                || molt_die "no supervisor adopted the mount after killing pid $pid"
        fi
    done
    wait "$stress" || true
    per_kill=$(scripts/stall_window.py "$WORK/stress.json" near "${kills[@]}")
    python3 - "$WORK/stress.json" "$victim" "$per_kill" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
stalls = [int(x) for x in sys.argv[3].split(",")]
med = sorted(stalls)[len(stalls) // 2]
name = {"fsd": "filesystem server", "blockdev": "block driver"}.get(sys.argv[2], sys.argv[2])
print(f"| {name} | {len(stalls)} | {', '.join(map(str, stalls))} | {med} | {r['errors_total']} |")
PY
    "$BIN/fsd" unmount "$MNT"
    "$BIN/fsd" fsck "$IMG" >/dev/null
done
