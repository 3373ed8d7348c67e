#!/usr/bin/env python3
"""plot.py -- busbw against message size for oxccl and the peers, as a PNG.

Usage:
    python3 plot.py RUN_DIR [-o busbw.png]

Reads the same data as results.py (RUN_DIR/oxccl/*.json from the perf binaries'
-J, RUN_DIR/peers/**/raw/*.log from run_peers.sh), medians over runs, one panel
per collective and rank count (sizes from 4 KiB). Needs matplotlib: when it is missing, the script creates a venv in
~/.cache/oxccl-plot-venv (or $OXCCL_PLOT_VENV), pip-installs matplotlib there
and re-runs itself with that venv's python.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.environ.get("OXCCL_PLOT_VENV",
                      os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                   "oxccl-plot-venv"))


def ensure_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return
    except ImportError:
        pass
    py = os.path.join(VENV, "bin", "python")
    in_venv = os.path.realpath(sys.prefix) == os.path.realpath(VENV)
    if in_venv or os.environ.get("OXCCL_PLOT_REEXEC"):
        sys.exit(f"plot.py: matplotlib is still missing in {VENV}")
    if not os.path.exists(py):
        print(f"plot.py: creating {VENV}", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
    probe = subprocess.run([py, "-c", "import matplotlib"], capture_output=True)
    if probe.returncode != 0:
        print("plot.py: installing matplotlib into the venv", file=sys.stderr)
        subprocess.check_call([py, "-m", "pip", "install", "-q", "matplotlib"])
    os.environ["OXCCL_PLOT_REEXEC"] = "1"
    os.execv(py, [py, os.path.abspath(__file__)] + sys.argv[1:])


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("-o", "--out", default="busbw.png")
    a = ap.parse_args()
    ensure_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    sys.path.insert(0, HERE)
    import results

    data, _ = results.load(a.run_dir)
    if not data:
        sys.exit(f"plot.py: no results under {a.run_dir}")
    med = results.medians(data)
    colls = [c for c in ("allreduce", "broadcast", "allgather") if any(k[0] == c for k in med)]
    ranks = sorted({k[2] for k in med})
    fig, axes = plt.subplots(len(colls), len(ranks), figsize=(6.5 * len(ranks), 4.8 * len(colls)),
                             squeeze=False)
    # One colour per library across all panels (tab20 has room for all of them).
    every = sorted({k[1] for k in med}, key=results.lib_key)
    colour = {lib: plt.get_cmap("tab20")(i % 20) for i, lib in enumerate(every)}
    for row, coll in zip(axes, colls):
        for ax, n in zip(row, ranks):
            keys = [k for k in med if k[0] == coll and k[2] == n]
            for lib in sorted({k[1] for k in keys}, key=results.lib_key):
                pts = sorted((k[3], med[k][1]) for k in keys if k[1] == lib and k[3] >= 4096)
                if not pts:
                    continue
                style = "-" if lib.startswith("oxccl") else "--"
                width = 2.4 if lib.startswith("oxccl") else 1.4
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", markersize=4,
                        linewidth=width, label=lib, color=colour[lib])
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda b, _: results.fmt_size(int(b))))
            ax.set_xlabel("message size")
            ax.set_ylabel("busbw (GB/s)")
            what = "float32 sum" if coll == "allreduce" else "float32"
            ax.set_title(f"{coll}, {what}, {n} ranks")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"plot.py: wrote {a.out}")


if __name__ == "__main__":
    main()
