#!/usr/bin/env python3
"""results.py -- turn a compare.sh run into benches/RESULTS.md.

Standard library only. Usage:
    python3 results.py RUN_DIR [--out benches/RESULTS.md] [--plot busbw.png]

RUN_DIR holds what compare.sh wrote:
    RUN_DIR/oxccl/*.json         -J output of all_reduce_perf (one file per run)
    RUN_DIR/peers/rep*/raw/*.log raw logs of /work/shared/peers/run_peers.sh
    RUN_DIR/peers/rep*/ceilings.log

Every (library, ranks, size) is combined over runs: time is the median of the
per-run times (each a mean over a timed loop), and algbw/busbw come from that
median time (busbw = size / time x 2(n-1)/n, as nccl-tests computes it).
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
# Display order; anything else follows alphabetically.
ORDER = ["oxccl shm (out of place)", "oxccl shm (in place)", "mpi-shm",
         "oxccl tcp (out of place)", "oxccl tcp (in place)", "mpi-tcp", "gloo-native/ring",
         "gloo-native/ring_chunked", "gloo-native/halving_doubling", "gloo-native/bcube"]
# all_reduce__<transport>__n<ranks>__... (files without a transport are TCP runs).
TRANSPORT = re.compile(r"all_reduce__(tcp|shm)__")


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


def bus_factor(n):
    return 2.0 * (n - 1) / n


def load_oxccl(run_dir, data, wrong):
    """Adds the all_reduce rows of every -J file under RUN_DIR/oxccl."""
    for path in sorted(glob.glob(os.path.join(run_dir, "oxccl", "*.json"))):
        try:
            doc = json.load(open(path))
        except (OSError, ValueError) as e:
            print(f"results.py: skipping {path}: {e}", file=sys.stderr)
            continue
        if doc.get("collective") != "all_reduce":
            continue
        n = int(doc["nranks"])
        m = TRANSPORT.search(os.path.basename(path))
        transport = m.group(1) if m else "tcp"
        for row in doc.get("rows", []):
            if row.get("type") != "float" or row.get("redop") != "sum":
                continue
            for variant, label in (("out_of_place", f"oxccl {transport} (out of place)"),
                                   ("in_place", f"oxccl {transport} (in place)")):
                m = row.get(variant)
                if not m:
                    continue
                data[(label, n, int(row["size"]))].append(float(m["time_us"]))
                if m.get("wrong"):
                    wrong[label] += int(m["wrong"])


def load_peers(run_dir, data, wrong):
    """Adds the allreduce tables of run_peers.sh's raw logs under RUN_DIR/peers."""
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
                cur = (name, int(n)) if coll == "allreduce" else None
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
            data[(cur[0], cur[1], size)].append(time_us)
            wrong[cur[0]] += bad


def load(run_dir):
    """{(library, ranks, size): [time_us, ...]} and {library: wrong elements}."""
    data, wrong = defaultdict(list), defaultdict(int)
    load_oxccl(run_dir, data, wrong)
    load_peers(run_dir, data, wrong)
    return data, wrong


def medians(data):
    """{(library, ranks, size): (median time_us, busbw GB/s, runs, min, max)}."""
    out = {}
    for (lib, n, size), times in data.items():
        t = statistics.median(times)
        busbw = size / (t / 1e6) / 1e9 * bus_factor(n) if t > 0 else 0.0
        out[(lib, n, size)] = (t, busbw, len(times), min(times), max(times))
    return out


def markdown(run_dir, med, wrong, plot=None):
    libs = sorted({k[0] for k in med}, key=lib_key)
    ranks = sorted({k[1] for k in med})
    sizes = sorted({k[2] for k in med})
    runs = sorted({v[2] for v in med.values()})
    lines = [
        "# oxccl benchmark results",
        "",
        "Allreduce, float32 sum, on this machine, against the peers of `/work/shared/peers`",
        "(Open MPI over shared memory and over TCP, the Gloo C++ library over TCP).",
        f"Regenerate everything with `bash benches/scripts/compare.sh` (raw data: `{os.path.relpath(run_dir)}`).",
        "",
        "busbw in GB/s (1e9 bytes/s) = size / time x 2(n-1)/n, as nccl-tests computes it, from the",
        "median time of " + ("/".join(str(r) for r in runs) or "0") + " runs (each the mean of a timed loop);",
        "the time is in parentheses. oxccl runs over shared memory (`OXCCL_TRANSPORT=shm`, what it",
        "picks by default on one host) and over loopback TCP (`OXCCL_TRANSPORT=tcp`); peers run in place.",
        "",
    ]
    if plot:
        lines += [f"![busbw by message size]({plot})", ""]
    for n in ranks:
        note = " (oversubscribed on 2 cores)" if n > (os.cpu_count() or n) else ""
        lines += [f"## {n} ranks{note}", ""]
        lines.append("| size | " + " | ".join(libs) + " |")
        lines.append("|---|" + "---|" * len(libs))
        for s in sizes:
            cells = []
            for lib in libs:
                v = med.get((lib, n, s))
                cells.append(f"{v[1]:.3f} ({fmt_time(v[0])})" if v else "–")
            lines.append(f"| {fmt_size(s)} | " + " | ".join(cells) + " |")
        lines.append("")
    bad = {lib: w for lib, w in wrong.items() if w}
    lines.append("Wrong elements: " + (", ".join(f"{lib} {w}" for lib, w in sorted(bad.items()))
                                       if bad else "none (every result checked)") + ".")
    ceil = sorted(glob.glob(os.path.join(run_dir, "peers", "*", "ceilings.log")))
    if ceil:
        lines += ["", f"Machine ceilings (memcpy, float add, TCP): `{os.path.relpath(ceil[0])}`."]
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
    text = markdown(a.run_dir, medians(data), wrong, a.plot)
    # Sections written by hand (targets, fusion, namespaces) follow MARKER in
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
