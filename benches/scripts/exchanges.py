#!/usr/bin/env python3
"""exchanges.py -- oxccl's alltoall_perf, gather_perf, scatter_perf and
sendrecv_perf against Open MPI's MPI_Alltoall, MPI_Gather, MPI_Scatter and
MPI_Sendrecv ring (../shared/peers/mpi_allreduce_bench.c), side by side in
one run: for every rank count, transport and collective, oxccl's binary and
Open MPI's benchmark alternate (which side goes first swaps every rep), REPS
times, over the same sizes. Writes the raw tables and a JSON of every
measurement into OUT, then the medians as a markdown table on stdout (and
OUT/table.md; one table per collective in OUT/compact.md; the full table also has the
median of the per-rep ratios, each rep's two sides having run back to back),
and an SVG plot of busbw (OUT/busbw.svg, or --plot PATH).

    python3 benches/scripts/exchanges.py                 # 5 reps
    EXCH_REPS=3 EXCH_ONLY=alltoall python3 benches/scripts/exchanges.py
    python3 benches/scripts/exchanges.py --report OUT [OUT2 ...]  # tables, plot again
                                                     # (the reps of several runs pooled)

Conventions (both sides): float32, out of place (oxccl has no in-place form
of these; the MPI benchmark's default), gather and scatter at root 0, size =
all ranks' blocks (alltoall: one rank's send buffer; gather: the root's
output; scatter: the root's input; sendrecv: the message), busbw = size /
time x (n-1)/n (sendrecv: x 1), time = the largest of the ranks' mean times
(oxccl -a 3; the MPI benchmark always takes the max).
Transports: oxccl OXCCL_TRANSPORT=shm or tcp; Open MPI --mca pml ob1 with
--mca btl vader,self (shared memory) or tcp,self (loopback).

Knobs: EXCH_REPS (5), EXCH_RANKS ("2 4"), EXCH_TRANSPORTS ("shm tcp"),
EXCH_COLLS ("alltoall gather scatter sendrecv"), EXCH_PEERS (the peers'
folder, default ../shared/peers from the repository), EXCH_ONLY (substring of
"coll transport nN"), EXCH_OUT (benches/results/raw/<timestamp>-exchanges),
CARGO_TARGET_DIR. Needs mpicc.openmpi, mpirun.openmpi and the release
binaries (cargo build --release -p oxccl-tools -p oxccl-benches).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PEERS = os.environ.get("EXCH_PEERS", os.path.join(ROOT, "..", "shared", "peers"))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.path.join(TARGET, "release")
K, M = 1 << 10, 1 << 20
SIZES = [4 * K, 64 * K, 1 * M, 16 * M, 64 * M]
# oxccl invocations: (sizes reported from, last size, iters, warm-up), each
# from 4 KiB up by factors of 4, as the MPI side runs its sizes in one
# process: under BBR (this machine's congestion control) a connection's
# first megabytes are paced while BBR's startup measures the path, and a
# process whose first calls were of 1 MiB over loopback TCP ran its first
# 40 up to 2x slower than one that began small (no difference under
# cubic). A loop must outlast a scheduler hiccup; the MPI side times each
# size for MPI_T s.
OURS_RUNS = [(4 * K, 64 * K, 2000, 200), (1 * M, 16 * M, 40, 4), (64 * M, 64 * M, 5, 1)]
MPI_T = "0.2"
FACTOR = {"alltoall": None, "gather": None, "scatter": None, "sendrecv": 1.0}


def human(n):
    for unit, size in (("MiB", M), ("KiB", K)):
        if n >= size:
            return f"{n // size} {unit}"
    return f"{n} B"


def ours(coll, transport, ranks, out_dir, tag):
    """Runs oxccl's binary over every size; returns {size: (time_us, busbw, wrong)}."""
    res = {}
    for b, e, n, w in OURS_RUNS:
        js = os.path.join(out_dir, f"{tag}__{b}.json")
        cmd = [os.path.join(BIN, "oxrun"), "-n", str(ranks), "--timeout", "600", "--",
               os.path.join(BIN, f"{coll}_perf"), "-b", str(4 * K), "-e", str(e), "-f", "4",
               "-n", str(n), "-w", str(w), "-a", "3", "-c", "1", "--out-of-place-only",
               "-J", js]
        env = dict(os.environ, OXCCL_TRANSPORT=transport)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        with open(os.path.join(out_dir, f"{tag}__{b}.log"), "w") as fh:
            fh.write(" ".join(cmd) + "\n" + p.stdout + p.stderr)
        if p.returncode != 0:
            raise RuntimeError(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
        with open(js) as fh:
            doc = json.load(fh)
        for r in doc["rows"]:
            if r["size"] >= b and r["size"] in SIZES:
                m = r["out_of_place"]
                res[r["size"]] = (m["time_us"], m["busbw_gbps"], m["wrong"])
    return res


def mpi(exe, coll, transport, ranks, out_dir, tag):
    btl = "vader,self" if transport == "shm" else "tcp,self"
    cmd = ["mpirun.openmpi", "--allow-run-as-root", "--oversubscribe", "--mca", "pml", "ob1",
           "--mca", "oob_tcp_if_include", "lo", "--mca", "btl_tcp_if_include", "lo",
           "--mca", "btl", btl, "-np", str(ranks), exe, "-c", coll,
           "-s", ",".join(str(s) for s in SIZES), "-w", "3", "-T", MPI_T]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    with open(os.path.join(out_dir, f"{tag}.log"), "w") as fh:
        fh.write(" ".join(cmd) + "\n" + p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    res = {}
    for line in p.stdout.splitlines():
        f = line.split()
        if len(f) == 9 and not line.startswith("#"):
            # size count type redop iters time algbw busbw wrong
            res[int(f[0])] = (float(f[5]), float(f[7]), int(f[8]))
    return res


def measure(out):
    reps = int(os.environ.get("EXCH_REPS", "5"))
    ranks = [int(n) for n in os.environ.get("EXCH_RANKS", "2 4").split()]
    transports = os.environ.get("EXCH_TRANSPORTS", "shm tcp").split()
    colls = os.environ.get("EXCH_COLLS", "alltoall gather scatter sendrecv").split()
    only = os.environ.get("EXCH_ONLY", "")
    exe = os.path.join(tempfile.gettempdir(), f"oxccl_mpi_bench_{os.getpid()}")
    subprocess.run(["mpicc.openmpi", "-O2", "-o", exe,
                    os.path.join(PEERS, "mpi_allreduce_bench.c")], check=True)
    os.makedirs(os.path.join(out, "oxccl"), exist_ok=True)
    os.makedirs(os.path.join(out, "mpi"), exist_ok=True)
    runs = []  # every measurement: dict
    t0 = time.time()
    for rep in range(reps):
        for n in ranks:
            for t in transports:
                for c in colls:
                    name = f"{c} {t} n{n}"
                    if only and only not in name:
                        continue
                    sides = ["oxccl", "mpi"] if rep % 2 == 0 else ["mpi", "oxccl"]
                    for side in sides:
                        tag = f"{c}__{t}__n{n}__rep{rep + 1}"
                        if side == "oxccl":
                            r = ours(c, t, n, os.path.join(out, "oxccl"), tag)
                        else:
                            r = mpi(exe, c, t, n, os.path.join(out, "mpi"), tag)
                        for size, (us, busbw, wrong) in sorted(r.items()):
                            runs.append(dict(side=side, coll=c, transport=t, ranks=n, rep=rep + 1,
                                             size=size, time_us=us, busbw=busbw, wrong=wrong))
                    print(f"# [{time.time() - t0:6.0f} s] rep {rep + 1}/{reps} {name} done",
                          file=sys.stderr, flush=True)
                    # Written after each pair, so that a run cut short keeps its data.
                    with open(os.path.join(out, "runs.json"), "w") as fh:
                        json.dump({"host_cores": os.cpu_count(), "runs": runs}, fh, indent=1)
                        fh.write("\n")
    os.remove(exe)


def medians(runs):
    """{(coll, transport, ranks, size): {side: (median time, median busbw, n, wrong total,
    fastest time, slowest time)}}"""
    groups = {}
    for r in runs:
        key = (r["coll"], r["transport"], r["ranks"], r["size"])
        groups.setdefault(key, {}).setdefault(r["side"], []).append(r)
    med = {}
    for key, sides in groups.items():
        med[key] = {}
        for side, rs in sides.items():
            ts = [x["time_us"] for x in rs]
            med[key][side] = (statistics.median(ts),
                              statistics.median(x["busbw"] for x in rs), len(rs),
                              sum(x["wrong"] or 0 for x in rs), min(ts), max(ts))
    return med


def paired(runs):
    """{(coll, transport, ranks, size): median over reps of Open MPI's time /
    oxccl's in the same rep (the two ran back to back), robust to the load
    drifting between reps."""
    t = {}
    for r in runs:
        key = (r["coll"], r["transport"], r["ranks"], r["size"])
        t.setdefault(key, {}).setdefault((r.get("batch", 0), r["rep"]), {})[r["side"]] = r["time_us"]
    return {k: statistics.median(v["mpi"] / v["oxccl"] for v in reps.values()
                                 if "mpi" in v and "oxccl" in v)
            for k, reps in t.items()}


def table(med, pair=None):
    lines = []
    colls = [c for c in ("alltoall", "gather", "scatter", "sendrecv") if any(k[0] == c for k in med)]
    for c in colls:
        for t in ("shm", "tcp"):
            for n in sorted({k[2] for k in med}):
                keys = sorted(k for k in med if k[:3] == (c, t, n))
                if not keys:
                    continue
                lines.append(f"#### {c}, {t}, {n} ranks")
                lines.append("")
                lines.append("| size | oxccl busbw (time) | Open MPI busbw (time) | ratio | target met "
                             "| oxccl times | Open MPI times | runs | paired ratio |")
                lines.append("|---:|---:|---:|---:|:---:|---:|---:|---:|---:|")
                for k in keys:
                    o, m = med[k].get("oxccl"), med[k].get("mpi")
                    if not (o and m):
                        continue
                    ratio = m[0] / o[0]  # Open MPI's time / ours: >= 1 means as fast or faster
                    met = "yes" if ratio >= 1.0 else "**no**"
                    lines.append(f"| {human(k[3])} | {o[1]:.3f} ({o[0]:.1f} µs) | "
                                 f"{m[1]:.3f} ({m[0]:.1f} µs) | {ratio:.2f}× | {met} "
                                 f"| {o[4]:.1f}-{o[5]:.1f} | {m[4]:.1f}-{m[5]:.1f} | {o[2]}, {m[2]} "
                                 f"| {(pair or {}).get(k, float('nan')):.2f}× |")
                lines.append("")
    return "\n".join(lines)


def compact(med):
    """One table per collective: a row per size, a column per transport and
    rank count, each cell oxccl's busbw / Open MPI's (ratio of times)."""
    lines = []
    cols = [(t, n) for t in ("shm", "tcp") for n in sorted({k[2] for k in med})]
    for c in ("alltoall", "gather", "scatter", "sendrecv"):
        keys = [k for k in med if k[0] == c]
        if not keys:
            continue
        lines.append(f"#### {c}: busbw GB/s, oxccl / Open MPI (ratio of Open MPI's time to oxccl's)")
        lines.append("")
        lines.append("| size | " + " | ".join(f"{t}, {n} ranks" for t, n in cols) + " |")
        lines.append("|---:|" + "---:|" * len(cols))
        for size in sorted({k[3] for k in keys}):
            cells = []
            for t, n in cols:
                v = med.get((c, t, n, size), {})
                o, m = v.get("oxccl"), v.get("mpi")
                if not (o and m):
                    cells.append("")
                    continue
                ratio = m[0] / o[0]
                r = f"{ratio:.2f}×" if ratio >= 1.0 else f"**{ratio:.2f}×**"
                cells.append(f"{o[1]:.2f} / {m[1]:.2f} ({r})")
            lines.append(f"| {human(size)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def svg(med, path):
    """busbw against size: one panel per collective and rank count, 4 lines each."""
    colls = [c for c in ("alltoall", "gather", "scatter", "sendrecv") if any(k[0] == c for k in med)]
    ranks = sorted({k[2] for k in med})
    pw, ph, ml, mb, mt = 330, 230, 48, 34, 22
    W, H = pw * len(ranks) + 10, ph * len(colls) + 40
    style = {("oxccl", "shm"): ("#d62728", ""), ("oxccl", "tcp"): ("#1f77b4", ""),
             ("mpi", "shm"): ("#d62728", "5,3"), ("mpi", "tcp"): ("#1f77b4", "5,3")}
    label = {"oxccl": "oxccl", "mpi": "Open MPI"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="10">',
           f'<rect width="{W}" height="{H}" fill="white"/>']
    lx = 10
    for (side, t), (col, dash) in style.items():
        out.append(f'<line x1="{lx}" y1="14" x2="{lx + 24}" y2="14" stroke="{col}" stroke-width="2" '
                   f'stroke-dasharray="{dash}"/>'
                   f'<text x="{lx + 28}" y="18">{label[side]} {t}</text>')
        lx += 120
    sizes = sorted({k[3] for k in med})
    import math
    lo, hi = math.log2(sizes[0]), math.log2(sizes[-1])
    for i, c in enumerate(colls):
        for j, n in enumerate(ranks):
            x0, y0 = j * pw + ml, 40 + i * ph + mt
            w, h = pw - ml - 12, ph - mt - mb
            ymax = max([v[1] for k, s in med.items() if k[0] == c and k[2] == n
                        for v in s.values()] + [0.01]) * 1.1
            out.append(f'<text x="{x0 + w / 2}" y="{y0 - 6}" text-anchor="middle" font-size="11">'
                       f'{c}, float32, {n} ranks</text>')
            out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#888"/>')
            for q in range(5):
                v = ymax * q / 4
                y = y0 + h - h * q / 4
                out.append(f'<line x1="{x0}" y1="{y}" x2="{x0 + w}" y2="{y}" stroke="#eee"/>'
                           f'<text x="{x0 - 4}" y="{y + 3}" text-anchor="end">{v:.2g}</text>')
            for s in sizes:
                x = x0 + w * (math.log2(s) - lo) / (hi - lo)
                out.append(f'<text x="{x}" y="{y0 + h + 12}" text-anchor="middle">'
                           f'{human(s).replace(" ", "")}</text>')
            out.append(f'<text x="{x0 - 36}" y="{y0 + h / 2}" transform="rotate(-90 {x0 - 36} '
                       f'{y0 + h / 2})" text-anchor="middle">busbw (GB/s)</text>')
            for (side, t), (col, dash) in style.items():
                pts = []
                for s in sizes:
                    v = med.get((c, t, n, s), {}).get(side)
                    if v:
                        x = x0 + w * (math.log2(s) - lo) / (hi - lo)
                        pts.append(f"{x:.1f},{y0 + h - h * v[1] / ymax:.1f}")
                if pts:
                    out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{col}" '
                               f'stroke-width="{2 if side == "oxccl" else 1.4}" '
                               f'stroke-dasharray="{dash}"/>')
    out.append("</svg>")
    with open(path, "w") as fh:
        fh.write("\n".join(out) + "\n")


def main():
    args = sys.argv[1:]
    plot = None
    if "--plot" in args:
        i = args.index("--plot")
        plot = args[i + 1]
        del args[i:i + 2]
    if args[:1] == ["--report"]:
        dirs = args[1:]
    else:
        dirs = [os.environ.get("EXCH_OUT") or os.path.join(
            ROOT, "benches", "results", "raw", time.strftime("%Y%m%d-%H%M%S") + "-exchanges")]
        measure(dirs[0])
    out = dirs[0]
    runs = []
    for i, d in enumerate(dirs):  # several runs' directories: their reps pooled
        with open(os.path.join(d, "runs.json")) as fh:
            runs += [dict(r, batch=i) for r in json.load(fh)["runs"]]
    med = medians(runs)
    text = table(med, paired(runs))
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(out, "compact.md"), "w") as fh:
        fh.write(compact(med) + "\n")
    svg(med, plot or os.path.join(out, "busbw.svg"))
    print(text)
    wrong = sum(r["wrong"] or 0 for r in runs)
    print(f"wrong elements over all runs: {wrong}", file=sys.stderr)


if __name__ == "__main__":
    main()
