# shellcheck shell=bash
# The preamble and helpers Molt's scripts share. Sourcing this file sets `-euo pipefail`
# and defines functions; it runs nothing else. A script that mounts starts with
#
#   . "$(dirname "$0")/lib/common.sh"
#   molt_start [--verbose] NAME
#
# molt_start [--verbose] NAME
#   cd to the repository root; run scripts/setup.sh (its output hidden unless --verbose);
#   build the release binaries once (`cargo build --release --workspace`); export
#   ROOT, BIN (target/release) and MOLT_BLOCKDEV_BIN ($BIN/blockdev); make WORK (a fresh
#   /var/tmp/molt-NAME.XXXXXX) and MNT ($WORK/mnt); install molt_cleanup as the EXIT trap.
#   --verbose also prints "== building (release)" before the build.
# molt_cleanup
#   the EXIT trap: stops the script's own background jobs (a workload a failure left
#   running), unmounts MNT if mounted (`fsd unmount`, falling back to `umount -l`) and
#   removes WORK.
#
# Helpers (none needs molt_start unless it says so):
#   molt_die MESSAGE...          print "SCRIPT: MESSAGE" on stderr and exit 1
#   now_ms                       the time, unix milliseconds
#   median N...                  the middle value (the lower of the two middle ones for
#                                an even count), numerically
#   json_get FILE|- EXPR [ARG...]
#                                parse FILE (- is stdin) as one JSON document and print
#                                the Python expression EXPR over it: the document is `j`,
#                                the ARGs are the list `args`. A string prints as is,
#                                anything else as JSON (true, null, 3, [1, 2]). A missing
#                                key or index is an error naming EXPR.
#   json_lines FILE|- EXPR [ARG...]
#                                the same for each line of a JSON-lines FILE; lines EXPR
#                                does not apply to (a missing key or index) and results
#                                that are None print nothing
#   component_version BINARY     the version BINARY's `component-info` probe reports
#   molt_status                  `updater status --json` of MNT (needs molt_start)
#   component_pid NAME           the pid of component NAME (fsd, blockdev) on MNT
#   supervisor_pid               the pid of MNT's supervisor
#   molt_apply PACKAGE EVENTS    `updater apply --json PACKAGE` on MNT, its events (one
#                                JSON object a line) in the file EVENTS; fails with the
#                                outcome, the failed checks and phases unless the
#                                outcome is Committed; APPLY_START_MS and APPLY_END_MS
#                                bracket the updater call alone
#   event_phase_ms EVENTS PHASE  how long PHASE (Preparation, Replacement, ...) took: its
#                                Finished event's elapsed_ms
#   event_outcome EVENTS         the Done event's outcome (Committed, RolledBack, ...)
set -euo pipefail

MOLT_SCRIPT="$(basename "$0" .sh)"

molt_die() {
    echo "$MOLT_SCRIPT: $*" >&2
    exit 1
}

molt_start() {
    local verbose=0
    if [ "${1:-}" = --verbose ]; then verbose=1; shift; fi
    local name="${1:?molt_start needs a name}"
    ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    cd "$ROOT"
    if [ "$verbose" = 1 ]; then
        scripts/setup.sh
        echo "== building (release)"
    else
        scripts/setup.sh >/dev/null
    fi
    cargo build --release --workspace --quiet
    BIN="$ROOT/target/release"
    MOLT_BLOCKDEV_BIN="$BIN/blockdev"
    export ROOT BIN MOLT_BLOCKDEV_BIN
    WORK="$(mktemp -d "/var/tmp/molt-$name.XXXXXX")"
    MNT="$WORK/mnt"
    mkdir -p "$MNT"
    trap molt_cleanup EXIT
}

molt_cleanup() {
    local job
    for job in $(jobs -p); do kill "$job" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${MNT:-}" ] && mountpoint -q "$MNT"; then
        "$BIN/fsd" unmount "$MNT" || umount -l "$MNT" || true
    fi
    if [ -n "${WORK:-}" ]; then rm -rf "$WORK"; fi
}

now_ms() {
    date +%s%3N
}

median() {
    printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}

# The Python behind json_get and json_lines: MODE FILE EXPR ARG...
_MOLT_JSON_PY='
import json, sys
mode, src, expr, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
text = sys.stdin.read() if src == "-" else open(src).read()
where = "stdin" if src == "-" else src
try:
    docs = [json.loads(text)] if mode == "get" else \
        [json.loads(line) for line in text.splitlines() if line.strip()]
except ValueError as e:
    sys.exit(f"json_{mode}: {where} is not JSON: {e}")
for j in docs:
    try:
        v = eval(expr, {"j": j, "args": args})
    except (KeyError, IndexError, TypeError) as e:
        if mode == "lines":
            continue
        sys.exit(f"json_get: {expr} in {where}: {type(e).__name__} {e}")
    if v is None and mode == "lines":
        continue
    print(v if isinstance(v, str) else json.dumps(v))
'

json_get() {
    python3 -c "$_MOLT_JSON_PY" get "$@"
}

json_lines() {
    python3 -c "$_MOLT_JSON_PY" lines "$@"
}

component_version() {
    "$1" component-info | json_get - "j['version']"
}

molt_status() {
    "$BIN/updater" status --json --mount "$MNT"
}

component_pid() {
    molt_status | json_get - "[c['pid'] for c in j['components'] if c['name'] == args[0]][0]" "$1"
}

supervisor_pid() {
    molt_status | json_get - "j['supervisor']['pid']"
}

event_outcome() {
    json_lines "$1" "j['Done']['outcome']"
}

event_phase_ms() {
    local ms
    ms="$(json_lines "$1" "j['Phase']['elapsed_ms'] if j['Phase']['phase'] == args[0] and j['Phase']['state'] == 'Finished' else None" "$2")"
    [ -n "$ms" ] || molt_die "no finished $2 phase in $1"
    echo "$ms"
}

molt_apply() {
    local package="$1" events="$2" rc=0 outcome
    APPLY_START_MS=$(now_ms)
    "$BIN/updater" apply --json "$package" --mount "$MNT" > "$events" || rc=$?
    APPLY_END_MS=$(now_ms)
    outcome="$(event_outcome "$events")"
    if [ "$rc" != 0 ] || [ "$outcome" != Committed ]; then
        json_lines "$events" "'check ' + j['Check']['name'] + ' failed: ' + j['Check']['detail'] if not j['Check']['passed'] else None" >&2
        json_lines "$events" "'phase ' + j['Phase']['phase'] + ' failed: ' + j['Phase']['detail'] if j['Phase']['state'] == 'Failed' else None" >&2
        molt_die "updater apply $package: ${outcome:-no outcome} (exit $rc)$(json_lines "$events" "': ' + j['Done']['message'] if j['Done']['message'] else None")"
    fi
}
