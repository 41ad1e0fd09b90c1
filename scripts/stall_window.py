#!/usr/bin/env python3
"""Longest stalls in a molt-stress run, from its 10 ms completion timeline (--json).

A stall is a run of timeline buckets in which no operation completed on any thread.
Times are unix milliseconds.

  stall_window.py REPORT overlap START:END [START:END ...]
      the longest stall overlapping any of the windows
  stall_window.py REPORT outside START END
      the longest stall entirely before START or after END
  stall_window.py REPORT near T [T ...]
      for each instant T, the longest stall starting within a second after it
      (comma-separated, one figure per T)
"""
import json
import sys


def stalls(report):
    """Every stall of the run as (start_ms, end_ms)."""
    t0 = report["started_unix_ms"]
    width = report["timeline"]["bucket_ms"]
    counts = report["timeline"]["counts"]
    start = None
    for i, c in enumerate(counts + [1]):
        if c == 0 and start is None:
            start = i
        elif c != 0 and start is not None:
            yield t0 + start * width, t0 + i * width
            start = None


def main(argv):
    report = json.load(open(argv[1]))
    mode, args = argv[2], argv[3:]
    runs = list(stalls(report))
    if mode == "overlap":
        windows = [tuple(map(int, w.split(":"))) for w in args]
        print(max([b - a for a, b in runs if any(a < e and b > s for s, e in windows)], default=0))
    elif mode == "outside":
        s, e = int(args[0]), int(args[1])
        print(max([b - a for a, b in runs if b <= s or a >= e], default=0))
    elif mode == "near":
        figures = []
        for t in map(int, args):
            figures.append(max([b - a for a, b in runs if a <= t + 1000 and b >= t], default=0))
        print(",".join(map(str, figures)))
    else:
        sys.exit(f"stall_window.py: unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
