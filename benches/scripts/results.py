#!/usr/bin/env python3
"""results.py -- turn a compare.sh run into benches/RESULTS.md.

Standard library only. Usage:
    python3 results.py RUN_DIR [--out benches/RESULTS.md] [--plot busbw.png]

RUN_DIR holds what compare.sh wrote:
    RUN_DIR/oxccl/*.json         -J output of all_reduce_perf, broadcast_perf and
                                 all_gather_perf (one file per run)
    RUN_DIR/peers/rep*/raw/*.log raw logs of ../shared/peers/run_peers.sh
    RUN_DIR/peers/rep*/ceilings.log

Every (collective, library, ranks, size) is combined over runs: time is the
median of the per-run times (each a mean over a timed loop), and algbw/busbw
come from that median time, with nccl-tests' bus factors (allreduce 2(n-1)/n,
allgather (n-1)/n, broadcast 1). The targets of issue 3 are computed from the
same medians, so they change with the tables.
"""
import argparse
import glob
import json
import os
import re
import statistics
import sys
from collections import defaultdict

HDR = re.compile(r"^# bench=(\S+) collective=(\S+)(?: algorithm=(\S+))? nranks=(\d+)")
PEER = re.compile(r"^# peer=(\S+) rep=(\d+)")
IPERF = re.compile(r"^ceiling iperf3 mode=1-stream ([0-9.]+) GB/s")
# Display order; anything else follows alphabetically.
ORDER = ["oxccl shm (out of place)", "oxccl shm (in place)", "mpi-shm", "mpi-shm-oop",
         "oxccl tcp (out of place)", "oxccl tcp (in place)", "mpi-tcp", "mpi-tcp-oop",
         "gloo-native/ring", "gloo-native/ring_chunked", "gloo-native/halving_doubling",
         "gloo-native/bcube"]
# <collective>__<transport>__n<ranks>__... (files without a transport are TCP runs).
TRANSPORT = re.compile(r"__(tcp|shm)__")
# Our binaries' collective names and the peers' -> one name.
COLLECTIVE = {"all_reduce": "allreduce", "allreduce": "allreduce",
              "broadcast": "broadcast", "bcast": "broadcast",
              "all_gather": "allgather", "allgather": "allgather"}
TITLE = {"allreduce": "Allreduce", "broadcast": "Broadcast", "allgather": "Allgather"}
TCP_PEERS = ("mpi-tcp", "gloo-native/")


def lib_key(name):
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


def fmt_size(b):
    for unit, sh in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if b >= (1 << sh) and b % (1 << sh) == 0:
            return f"{b >> sh} {unit}"
    return f"{b} B"


def fmt_time(us):
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    if us >= 1e3:
        return f"{us / 1e3:.1f} ms"
    return f"{us:.1f} µs"


def bus_factor(coll, n):
    if coll == "allreduce":
        return 2.0 * (n - 1) / n
    if coll == "allgather":
        return (n - 1) / n
    return 1.0


def load_oxccl(run_dir, data, wrong):
    """Adds the float rows of every -J file under RUN_DIR/oxccl."""
    for path in sorted(glob.glob(os.path.join(run_dir, "oxccl", "*.json"))):
        try:
            doc = json.load(open(path))
        except (OSError, ValueError) as e:
            print(f"results.py: skipping {path}: {e}", file=sys.stderr)
            continue
        coll = COLLECTIVE.get(doc.get("collective"))
        if coll is None:
            continue
        n = int(doc["nranks"])
        m = TRANSPORT.search(os.path.basename(path))
        transport = m.group(1) if m else "tcp"
        for row in doc.get("rows", []):
            if row.get("type") != "float":
                continue
            if coll == "allreduce" and row.get("redop") != "sum":
                continue
            for variant, label in (("out_of_place", f"oxccl {transport} (out of place)"),
                                   ("in_place", f"oxccl {transport} (in place)")):
                v = row.get(variant)
                if not v:
                    continue
                data[(coll, label, n, int(row["size"]))].append(float(v["time_us"]))
                if v.get("wrong"):
                    wrong[label] += int(v["wrong"])


def load_peers(run_dir, data, wrong):
    """Adds the tables of run_peers.sh's raw logs under RUN_DIR/peers."""
    logs = glob.glob(os.path.join(run_dir, "peers", "**", "raw", "*.log"), recursive=True)
    for path in sorted(logs):
        peer, cur = None, None
        for line in open(path, errors="replace"):
            m = PEER.match(line)
            if m:
                peer = m.group(1)
                continue
            m = HDR.match(line)
            if m:
                bench, coll, algo, n = m.groups()
                name = peer or bench
                if algo:
                    name = f"{name}/{algo}"
                coll = COLLECTIVE.get(coll)
                cur = (coll, name, int(n)) if coll else None
                continue
            if line.startswith("#") or cur is None:
                continue
            f = line.split()
            if len(f) != 9:
                continue
            try:
                size, time_us, bad = int(f[0]), float(f[5]), int(float(f[8]))
            except ValueError:
                continue
            data[(cur[0], cur[1], cur[2], size)].append(time_us)
            wrong[cur[1]] += bad


def load(run_dir):
    """{(collective, library, ranks, size): [time_us, ...]} and {library: wrong elements}."""
    data, wrong = defaultdict(list), defaultdict(int)
    load_oxccl(run_dir, data, wrong)
    load_peers(run_dir, data, wrong)
    return data, wrong


def medians(data):
    """{(collective, library, ranks, size): (median time_us, busbw GB/s, runs, min, max)}."""
    out = {}
    for (coll, lib, n, size), times in data.items():
        t = statistics.median(times)
        busbw = size / (t / 1e6) / 1e9 * bus_factor(coll, n) if t > 0 else 0.0
        out[(coll, lib, n, size)] = (t, busbw, len(times), min(times), max(times))
    return out


def iperf_streams(run_dir):
    """One-stream iperf3 loopback figures (GB/s) of the run's ceilings logs."""
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "peers", "*", "ceilings.log"))):
        for line in open(path, errors="replace"):
            m = IPERF.match(line)
            if m:
                out.append(float(m.group(1)))
    return out


def table(med, coll, n):
    keys = [k for k in med if k[0] == coll and k[2] == n]
    libs = sorted({k[1] for k in keys}, key=lib_key)
    sizes = sorted({k[3] for k in keys})
    lines = ["| size | " + " | ".join(libs) + " |", "|---|" + "---|" * len(libs)]
    for s in sizes:
        cells = []
        for lib in libs:
            v = med.get((coll, lib, n, s))
            cells.append(f"{v[1]:.3f} ({fmt_time(v[0])})" if v else "–")
        lines.append(f"| {fmt_size(s)} | " + " | ".join(cells) + " |")
    return lines


class Targets:
    """The rows of the targets table: what was compared, the figures, the ratio."""

    def __init__(self, med):
        self.med = med
        self.rows = []

    def bw(self, coll, lib, n, size):
        v = self.med.get((coll, lib, n, size))
        return v[1] if v else None

    def time(self, coll, lib, n, size):
        v = self.med.get((coll, lib, n, size))
        return v[0] if v else None

    def best_tcp_peer(self, n, size):
        best = None
        for (c, lib, r, s), v in self.med.items():
            if c == "allreduce" and r == n and s == size and lib.startswith(TCP_PEERS) \
                    and not lib.endswith("-oop"):
                if best is None or v[1] > best[1]:
                    best = (lib, v[1])
        return best

    def add(self, target, ours, theirs, ratio, need):
        if ratio is None:
            self.rows.append((target, ours, theirs, "–", "not measured"))
        else:
            self.rows.append((target, ours, theirs, f"{ratio:.2f}×", "yes" if ratio >= need else "no"))

    def markdown(self):
        lines = ["| target | oxccl | peer | ratio | met |", "|---|---|---|---|---|"]
        lines += [f"| {' | '.join(r)} |" for r in self.rows]
        return lines


def targets(med, iperf):
    t = Targets(med)
    ip, oop = "oxccl tcp (in place)", "oxccl tcp (out of place)"
    # TCP, large.
    for n, need in ((2, 1.5), (4, 1.3)):
        for size in (64 << 20, 256 << 20):
            ours, best = t.bw("allreduce", ip, n, size), t.best_tcp_peer(n, size)
            ratio = ours / best[1] if ours and best else None
            t.add(f"TCP allreduce {fmt_size(size)}, {n} ranks: ≥ {need}× the best TCP peer",
                  f"{ours:.3f}" if ours else "–", f"{best[0]} {best[1]:.3f}" if best else "–",
                  ratio, need)
    if iperf:
        stream = statistics.median(iperf)
        for size in (64 << 20, 256 << 20):
            ours = t.bw("allreduce", ip, 2, size)
            ratio = ours / stream / 0.8 if ours else None
            t.add(f"TCP allreduce {fmt_size(size)}, 2 ranks: ≥ 80% of one iperf3 stream "
                  f"(ratio to 80%)", f"{ours:.3f}" if ours else "–",
                  f"iperf3 {stream:.3f}", ratio, 1.0)
    # TCP, middle.
    for n in (2, 4):
        for size in (1 << 20, 16 << 20):
            ours, mpi = t.bw("allreduce", ip, n, size), t.bw("allreduce", "mpi-tcp", n, size)
            t.add(f"TCP allreduce {fmt_size(size)}, {n} ranks: ≥ Open MPI TCP",
                  f"{ours:.3f}" if ours else "–", f"mpi-tcp {mpi:.3f}" if mpi else "–",
                  ours / mpi if ours and mpi else None, 1.0)
    # Latency (time: the ratio is theirs / ours, so ≥ 1 means we are at least as fast).
    for size in (8, 4 << 10):
        for lib in (ip, oop):
            ours, mpi = t.time("allreduce", lib, 2, size), t.time("allreduce", "mpi-tcp", 2, size)
            t.add(f"TCP allreduce {fmt_size(size)}, 2 ranks, {lib[11:-1]}: time ≤ Open MPI TCP "
                  f"(ratio: theirs / ours)", fmt_time(ours) if ours else "–",
                  f"mpi-tcp {fmt_time(mpi)}" if mpi else "–",
                  mpi / ours if ours and mpi else None, 1.0)
    # Shared memory: every size, in place against Open MPI's in-place allreduce.
    for n in (2, 4):
        sizes = sorted({k[3] for k in med if k[0] == "allreduce" and k[2] == n})
        for size in sizes:
            ours, mpi = t.bw("allreduce", "oxccl shm (in place)", n, size), \
                t.bw("allreduce", "mpi-shm", n, size)
            if ours is None and mpi is None:
                continue
            t.add(f"shm allreduce {fmt_size(size)}, {n} ranks: ≥ Open MPI shm",
                  f"{ours:.3f}" if ours else "–", f"mpi-shm {mpi:.3f}" if mpi else "–",
                  ours / mpi if ours and mpi else None, 1.0)
    # Broadcast (in place, as MPI_Bcast) and allgather (out of place, as the
    # peers' MPI_Allgather) from 64 KiB, on the same transport.
    for coll, variant in (("broadcast", "in place"), ("allgather", "out of place")):
        for transport, peer in (("shm", "mpi-shm"), ("tcp", "mpi-tcp")):
            for n in (2, 4):
                sizes = sorted({k[3] for k in med if k[0] == coll and k[2] == n and k[3] >= 64 << 10})
                for size in sizes:
                    ours = t.bw(coll, f"oxccl {transport} ({variant})", n, size)
                    mpi = t.bw(coll, peer, n, size)
                    if ours is None and mpi is None:
                        continue
                    t.add(f"{transport} {coll} {fmt_size(size)}, {n} ranks ({variant}): ≥ Open MPI",
                          f"{ours:.3f}" if ours else "–", f"{peer} {mpi:.3f}" if mpi else "–",
                          ours / mpi if ours and mpi else None, 1.0)
    return t


def markdown(run_dir, med, wrong, iperf, plot=None):
    runs = sorted({v[2] for v in med.values()})
    lines = [
        "# oxccl benchmark results",
        "",
        "Allreduce (float32 sum), broadcast and allgather (float32) on this machine, against the",
        "peers of `../shared/peers` (Open MPI over shared memory and over TCP, the Gloo C++",
        "library over TCP). Regenerate everything with `bash benches/scripts/compare.sh`",
        f"(raw data: `{os.path.relpath(run_dir)}`).",
        "",
        "busbw in GB/s (1e9 bytes/s) = size / time x factor (allreduce 2(n-1)/n, allgather (n-1)/n,",
        "broadcast 1), as nccl-tests computes it, from the median time of "
        + ("/".join(str(r) for r in runs) or "0") + " runs (each the mean",
        "of a timed loop); the time is in parentheses. oxccl runs over shared memory",
        "(`OXCCL_TRANSPORT=shm`, what it picks by default on one host) and over loopback TCP",
        "(`OXCCL_TRANSPORT=tcp`). Peers: `mpi-*` and Gloo reduce in place, `mpi-*-oop` out of",
        "place; Open MPI's broadcast uses one buffer (compare oxccl in place) and its allgather",
        "two (compare oxccl out of place).",
        "",
    ]
    if plot:
        lines += [f"![busbw by message size]({plot})", ""]
    t = targets(med, iperf)
    lines += ["## The targets of issue 3, computed from the medians below", ""]
    lines += t.markdown()
    lines += ["", "Ratios are oxccl / peer for bandwidth and peer / oxccl for time, so ≥ 1 (or",
              "≥ the stated factor) meets the target. The link-limit target (network namespaces)",
              "is measured by `ci/netns-bench.sh`; see below.", ""]
    for coll in ("allreduce", "broadcast", "allgather"):
        ranks = sorted({k[2] for k in med if k[0] == coll})
        for n in ranks:
            note = " (oversubscribed on 2 cores)" if n > (os.cpu_count() or n) else ""
            lines += [f"## {TITLE[coll]}, {n} ranks{note}", ""]
            lines += table(med, coll, n)
            lines.append("")
    bad = {lib: w for lib, w in wrong.items() if w}
    lines.append("Wrong elements: " + (", ".join(f"{lib} {w}" for lib, w in sorted(bad.items()))
                                       if bad else "none (every result checked)") + ".")
    ceil = sorted(glob.glob(os.path.join(run_dir, "peers", "*", "ceilings.log")))
    if ceil:
        lines += ["", f"Machine ceilings (memcpy, float add, TCP): `{os.path.relpath(ceil[0])}`"
                  + (f"; one iperf3 loopback stream: {', '.join(f'{x:.2f}' for x in iperf)} GB/s."
                     if iperf else ".")]
    return "\n".join(lines) + "\n"


MARKER = "<!-- Below: written by hand, kept when the tables above are regenerated. -->"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None, help="Markdown file to write (default: stdout)")
    ap.add_argument("--plot", default=None, help="image to link from the Markdown (path relative to it)")
    a = ap.parse_args(argv)
    data, wrong = load(a.run_dir)
    if not data:
        print(f"results.py: no results under {a.run_dir}", file=sys.stderr)
        return 1
    text = markdown(a.run_dir, medians(data), wrong, iperf_streams(a.run_dir), a.plot)
    # Sections written by hand (fusion, namespaces, profiles) follow MARKER in
    # the existing file; regenerating the tables keeps them.
    if a.out and os.path.exists(a.out):
        with open(a.out) as f:
            old = f.read()
        if MARKER in old:
            text += "\n" + old[old.index(MARKER):]
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
        print(f"results.py: wrote {a.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
