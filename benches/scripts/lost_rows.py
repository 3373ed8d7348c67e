#!/usr/bin/env python3
"""lost_rows.py -- the rows where oxccl was behind Open MPI (benches/RESULTS.md),
measured side by side in one run: for each row, oxccl's *_perf binary and
Open MPI's benchmark (../shared/peers/mpi_allreduce_bench.c) alternate, REPS
times, and the table shows the median time of each and the ratio
(Open MPI's time / ours: at least 1 means oxccl is as fast or faster).

    python3 benches/scripts/lost_rows.py            # 5 alternating runs
    LOST_REPS=7 LOST_ALGO=ring python3 benches/scripts/lost_rows.py

Knobs: LOST_REPS (5), LOST_ALGO (OXCCL_ALGO for oxccl, default auto),
LOST_ONLY (a substring a row's name must contain), CARGO_TARGET_DIR.
Needs Open MPI (mpicc.openmpi, mpirun.openmpi) and the release binaries
(built first).
"""

import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PEERS = os.path.join(ROOT, "..", "shared", "peers")
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.path.join(TARGET, "release")
REPS = int(os.environ.get("LOST_REPS", "5"))
ALGO = os.environ.get("LOST_ALGO", "auto")
ONLY = os.environ.get("LOST_ONLY", "")

K, M = 1 << 10, 1 << 20
# (transport, collective, ranks, sizes, in place)
ROWS = [
    ("tcp", "all_reduce", 2, [1 * M], True),
    ("tcp", "all_reduce", 4, [1 * M, 16 * M], True),
    ("shm", "all_reduce", 2, [8, 16 * M], True),
    ("shm", "all_reduce", 4, [8, 1 * M], True),
    ("shm", "broadcast", 2, [64 * K, 1 * M], True),
    ("shm", "broadcast", 4, [64 * K, 1 * M, 16 * M], True),
    ("tcp", "broadcast", 4, [1 * M], True),
    ("shm", "all_gather", 2, [64 * K, 1 * M, 16 * M, 64 * M], False),
    ("shm", "all_gather", 4, [1 * M], False),
    ("tcp", "all_gather", 2, [1 * M], False),
    ("tcp", "all_gather", 4, [1 * M], False),
]

MPI_COLL = {"all_reduce": "allreduce", "broadcast": "bcast", "all_gather": "allgather"}


def human(n):
    for unit, size in (("MiB", M), ("KiB", K)):
        if n >= size:
            return f"{n // size} {unit}"
    return f"{n} B"


def iters(size):
    if size <= 64 * K:
        return 3000, 300
    if size <= 1 * M:
        return 300, 30
    if size <= 16 * M:
        return 30, 3
    return 10, 2


def ours(transport, coll, ranks, size, in_place, bindir=BIN):
    n, w = iters(size)
    variant = "--in-place-only" if in_place else "--out-of-place-only"
    cmd = [
        os.path.join(bindir, "oxrun"), "-n", str(ranks), "--",
        os.path.join(bindir, f"{coll}_perf"),
        "-b", str(size), "-e", str(size), "-n", str(n), "-w", str(w), "-c", "0", variant,
    ]
    env = dict(os.environ, OXCCL_TRANSPORT=transport, OXCCL_ALGO=ALGO)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    for line in out.stdout.splitlines():
        f = line.split()
        if len(f) >= 13 and f[0] == "[0]" and f[1] == str(size):
            # [0] size count type redop root | time algbw busbw wrong | time algbw busbw wrong
            t = f[10] if in_place else f[6]
            return float(t)
    raise RuntimeError(f"no result in: {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")


def mpi(exe, transport, coll, ranks, size, in_place):
    btl = "vader,self" if transport == "shm" else "tcp,self"
    cmd = [
        "mpirun.openmpi", "--allow-run-as-root", "--oversubscribe", "--mca", "pml", "ob1",
        "--mca", "oob_tcp_if_include", "lo", "--mca", "btl_tcp_if_include", "lo",
        "--mca", "btl", btl, "-np", str(ranks), exe,
        "-c", MPI_COLL[coll], "-s", str(size), "-w", "3", "-T", "0.25",
    ] + (["-i"] if in_place else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    for line in out.stdout.splitlines():
        f = line.split()
        if len(f) >= 9 and f[0] == str(size):
            return float(f[5])
    raise RuntimeError(f"no result in: {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")


def main():
    exe = os.path.join(tempfile.gettempdir(), "oxccl_mpi_bench")
    subprocess.run(
        ["mpicc.openmpi", "-O2", "-o", exe, os.path.join(PEERS, "mpi_allreduce_bench.c")],
        check=True,
    )
    subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "oxccl-tools", "--bin", "oxrun"],
        check=True, cwd=ROOT,
    )
    subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "oxccl-benches", "--bins"],
        check=True, cwd=ROOT,
    )
    rows = []
    for transport, coll, ranks, sizes, in_place in ROWS:
        for size in sizes:
            name = f"{transport} {coll} {human(size)}, {ranks} ranks"
            if ONLY and ONLY not in name:
                continue
            rows.append((name, transport, coll, ranks, size, in_place))
    times = {r[0]: ([], []) for r in rows}
    for rep in range(REPS):
        for name, transport, coll, ranks, size, in_place in rows:
            # Alternate which side goes first, so that neither always runs
            # right after the other's warm caches or noise.
            sides = [("ours", ours), ("mpi", None)]
            if rep % 2:
                sides.reverse()
            for side, _ in sides:
                if side == "ours":
                    t = ours(transport, coll, ranks, size, in_place)
                    times[name][0].append(t)
                else:
                    t = mpi(exe, transport, coll, ranks, size, in_place)
                    times[name][1].append(t)
            a, b = times[name]
            print(f"# rep {rep + 1}/{REPS} {name}: oxccl {a[-1]:.1f} us, open mpi {b[-1]:.1f} us",
                  file=sys.stderr, flush=True)
    print(f"| row (OXCCL_ALGO={ALGO}, medians of {REPS}) | oxccl | Open MPI | ratio | won |")
    print("|---|---|---|---|---|")
    for name, *_ in rows:
        a, b = times[name]
        ma, mb = statistics.median(a), statistics.median(b)
        ratio = mb / ma
        print(f"| {name} | {ma:.1f} µs | {mb:.1f} µs | {ratio:.2f}× | "
              f"{'yes' if ratio >= 1.0 else 'no'} |")


if __name__ == "__main__":
    main()
