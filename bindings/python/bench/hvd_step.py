"""Training step time of a small transformer: Horovod's DistributedOptimizer on oxccl's
fusion engine, against DDP on the "oxccl" torch.distributed backend and DDP on "gloo".

    python bindings/python/bench/hvd_step.py --nproc 2 --runs 5
    python bindings/python/bench/hvd_step.py --nproc 4 --runs 5 --json out.json

Each run is one torchrun launch (`python -m torch.distributed.run`) of one mode that
trains `--warmup` steps untimed, then `--steps` timed steps; a step is zero_grad,
forward, backward, optimizer step, and rank 0 reports the median of its step times.
The modes alternate (hvd, ddp-oxccl, ddp-gloo, hvd, ...) so that a machine's drift hits
each alike; the result per mode is the median over `--runs` runs. Run it on a quiet
machine; `--quick` only checks that everything runs (tiny model, 1 run, 3 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

MODES = ("hvd", "ddp-oxccl", "ddp-gloo")


def model_of(args):
    import torch
    import torch.nn as nn

    class TinyTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(args.vocab, args.dim)
            layer = nn.TransformerEncoderLayer(
                args.dim, args.heads, 4 * args.dim, dropout=0.0, batch_first=True
            )
            self.layers = nn.TransformerEncoder(
                layer, args.layers, enable_nested_tensor=False
            )
            self.head = nn.Linear(args.dim, args.vocab)

        def forward(self, tokens):
            return self.head(self.layers(self.embed(tokens)))

    torch.manual_seed(0)
    return TinyTransformer()


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    rank = int(os.environ["RANK"])
    model = model_of(args)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if args.mode == "hvd":
        import oxccl._horovod as hvd

        hvd.init()  # from torchrun's environment
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        net = model

        def barrier() -> None:
            hvd.allreduce(torch.zeros(1), name="barrier")
    else:
        backend = args.mode.split("-", 1)[1]
        if backend == "oxccl":
            import oxccl.torch  # noqa: F401  (registers the backend)
        dist.init_process_group(backend)
        net = torch.nn.parallel.DistributedDataParallel(model)

        def barrier() -> None:
            dist.barrier()

    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        out = net(x)
        F.cross_entropy(out.reshape(-1, args.vocab), y.reshape(-1)).backward()
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    barrier()
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        with open(args.out, "w") as f:
            json.dump({"median_s": statistics.median(times), "params": params}, f)
    if args.mode == "hvd":
        hvd.shutdown()
    else:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, mode: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={args.nproc}",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            os.path.abspath(__file__),
            "--worker",
            "--mode",
            mode,
            "--out",
            out,
        ]
        for k in (
            "vocab",
            "dim",
            "heads",
            "layers",
            "seq",
            "batch",
            "steps",
            "warmup",
            "threads",
        ):
            cmd += [f"--{k}", str(getattr(args, k))]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        p = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=args.timeout
        )
        if p.returncode != 0:
            sys.exit(
                f"{mode} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
            )
        with open(out) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--nproc", type=int, default=2, help="ranks (torchrun --nproc-per-node)"
    )
    ap.add_argument("--runs", type=int, default=5, help="runs per mode (alternating)")
    ap.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}"
    )
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes, 1 run: checks that it runs"
    )
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.vocab, args.dim, args.heads, args.layers, args.seq, args.batch = (
            100,
            32,
            2,
            1,
            16,
            2,
        )
        args.runs, args.steps, args.warmup = 1, 3, 1
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            sys.exit(f"unknown mode {m!r}; modes are {MODES}")
    times: dict = {m: [] for m in modes}
    params = None
    for run in range(args.runs):
        for m in modes:
            r = launch(args, m)
            params = r["params"]
            times[m].append(r["median_s"])
            print(
                f"run {run + 1}/{args.runs} {m:10s} {r['median_s'] * 1e3:9.2f} ms/step",
                flush=True,
            )
    med = {m: statistics.median(v) for m, v in times.items()}
    print(
        f"\n{args.nproc} ranks, transformer of {params} parameters "
        f"(dim {args.dim}, {args.layers} layers, seq {args.seq}, batch {args.batch}/rank), "
        f"median of {args.runs} runs of {args.steps} steps:"
    )
    for m in modes:
        print(f"  {m:10s} {med[m] * 1e3:9.2f} ms/step")
    if "hvd" in med and "ddp-oxccl" in med:
        print(
            f"  DistributedOptimizer / DDP on oxccl: {med['hvd'] / med['ddp-oxccl']:.3f}"
        )
    if "ddp-oxccl" in med and "ddp-gloo" in med:
        print(
            f"  DDP on oxccl / DDP on gloo:          {med['ddp-oxccl'] / med['ddp-gloo']:.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "nproc": args.nproc,
                    "params": params,
                    "runs": times,
                    "median_s": med,
                    "args": vars(args),
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
