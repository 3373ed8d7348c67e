#!/usr/bin/env python3
"""ab.py -- two builds of oxccl side by side: for each row, the *_perf
binaries of build A and build B alternate, AB_REPS times, and the table
shows the median time of each and the ratio B/A (below 1: B is faster).

    git worktree add /tmp/base <rev>
    (cd /tmp/base && CARGO_TARGET_DIR=/tmp/base-target cargo build --release \\
        -p oxccl-tools --bin oxrun && CARGO_TARGET_DIR=/tmp/base-target \\
        cargo build --release -p oxccl-benches --bins)
    cargo build --release -p oxccl-tools --bin oxrun && \\
        cargo build --release -p oxccl-benches --bins
    python3 benches/scripts/ab.py /tmp/base-target/release target/release

Knobs: AB_REPS (5), AB_ONLY (a substring a row's name must contain).
"""

import os
import statistics
import sys

from lost_rows import K, M, human, ours

# (transport, collective, ranks, size, in place)
ROWS = [
    ("shm", "all_reduce", 2, 8, True),
    ("shm", "all_reduce", 4, 8, True),
    ("shm", "all_reduce", 2, 4 * K, True),
    ("shm", "all_reduce", 2, 1 * M, True),
    ("shm", "all_reduce", 4, 1 * M, True),
    ("shm", "all_reduce", 2, 16 * M, True),
    ("shm", "all_reduce", 4, 64 * M, True),
    ("tcp", "all_reduce", 2, 8, True),
    ("tcp", "all_reduce", 4, 1 * M, True),
    ("shm", "broadcast", 4, 64 * K, True),
    ("shm", "broadcast", 4, 1 * M, True),
    ("shm", "all_gather", 2, 64 * M, False),
    ("shm", "all_gather", 4, 1 * M, False),
    ("tcp", "all_gather", 2, 1 * M, False),
]
REPS = int(os.environ.get("AB_REPS", "5"))
ONLY = os.environ.get("AB_ONLY", "")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    builds = {"A": sys.argv[1], "B": sys.argv[2]}
    rows = [r for r in ROWS if ONLY in f"{r[0]} {r[1]} {human(r[3])}, {r[2]} ranks"]
    times = {r: {"A": [], "B": []} for r in rows}
    for rep in range(REPS):
        for r in rows:
            # Alternate which build goes first.
            for side in ("A", "B") if rep % 2 == 0 else ("B", "A"):
                times[r][side].append(ours(*r, bindir=builds[side]))
    print(f"| row | A (us) | B (us) | B/A |\n|---|---:|---:|---:|")
    for r in rows:
        a, b = statistics.median(times[r]["A"]), statistics.median(times[r]["B"])
        name = f"{r[0]} {r[1]} {human(r[3])}, {r[2]} ranks"
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
