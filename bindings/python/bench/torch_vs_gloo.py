"""oxccl against gloo through PyTorch itself, side by side in one run.

    torchrun --nproc-per-node 2 bindings/python/bench/torch_vs_gloo.py
    torchrun --nproc-per-node 4 bindings/python/bench/torch_vs_gloo.py --json results.json

The default group is "oxccl"; a gloo group over the same ranks is made with
dist.new_group(backend="gloo"). Every measurement runs `--reps` times, alternating
oxccl and gloo (oxccl, gloo, oxccl, gloo, ...), and the median of the repetitions is
reported:

* dist.all_reduce of a `--size-mib` float32 tensor: bus bandwidth,
  busbw = 2 (n - 1) / n * bytes / seconds per call (the nccl-tests definition);
* dist.all_reduce of one float32 (4 bytes): microseconds per call;
* a DDP training step of the small transformer of the tests (forward, backward,
  optimizer step), with each backend's group; and, when oxccl.torch has Horovod's
  DistributedOptimizer, the same step with it on oxccl.

Run it on a quiet machine: these are timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import oxccl.torch as oxt

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "torch_backend"))
from train import TinyTransformer, tok_batch  # noqa: E402


def time_allreduce(t: torch.Tensor, group, iters: int, warmup: int) -> float:
    """Seconds per dist.all_reduce, the slowest rank's (so every rank reports the same)."""
    for _ in range(warmup):
        dist.all_reduce(t, group=group)
    dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(t, group=group)
    secs = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
    dist.all_reduce(secs, op=dist.ReduceOp.MAX, group=group)
    return secs.item()


def time_training(group, mode: str, steps: int, warmup: int) -> float:
    """Seconds per training step of the transformer (slowest rank)."""
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, process_group=group)
    else:
        oxt.init()  # Horovod's API: through the default group's store; a no-op once initialised
        oxt.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = oxt.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        net = model
    rank = dist.get_rank()
    t0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            dist.barrier(group=group)
            t0 = time.perf_counter()
        x, y = tok_batch(step, rank)
        opt.zero_grad()
        F.cross_entropy(net(x).reshape(-1, 64), y.reshape(-1)).backward()
        opt.step()
    secs = torch.tensor([(time.perf_counter() - t0) / steps], dtype=torch.float64)
    dist.all_reduce(secs, op=dist.ReduceOp.MAX, group=group)
    return secs.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=float, default=64.0, help="large all_reduce size (MiB of float32)")
    ap.add_argument("--reps", type=int, default=5, help="alternating repetitions per backend")
    ap.add_argument("--iters", type=int, default=10, help="large all_reduce calls per repetition")
    ap.add_argument("--small-iters", type=int, default=2000, help="4-byte all_reduce calls per repetition")
    ap.add_argument("--ddp-steps", type=int, default=30, help="training steps per repetition")
    ap.add_argument("--json", help="write the medians and every repetition here (rank 0)")
    a = ap.parse_args()

    dist.init_process_group("oxccl")
    n = dist.get_world_size()
    ox = dist.group.WORLD
    gl = dist.new_group(backend="gloo")
    groups = {"oxccl": ox, "gloo": gl}
    elems = int(a.size_mib * (1 << 20)) // 4
    big = torch.ones(elems, dtype=torch.float32)
    small = torch.ones(1, dtype=torch.float32)
    runs: dict = {}

    def record(key: str, value: float) -> None:
        runs.setdefault(key, []).append(value)

    modes = ["ddp"] + (["horovod"] if hasattr(oxt, "DistributedOptimizer") else [])
    for _ in range(a.reps):
        for name, grp in groups.items():  # alternating oxccl, gloo
            secs = time_allreduce(big, grp, a.iters, warmup=2)
            record(f"allreduce_busbw_GBps/{name}", 2 * (n - 1) / n * big.numel() * 4 / secs / 1e9)
            secs = time_allreduce(small, grp, a.small_iters, warmup=50)
            record(f"allreduce_4B_us/{name}", secs * 1e6)
            record(f"ddp_step_ms/{name}", time_training(grp, "ddp", a.ddp_steps, warmup=3) * 1e3)
        if "horovod" in modes:
            record("distopt_step_ms/oxccl", time_training(ox, "horovod", a.ddp_steps, warmup=3) * 1e3)

    med = {k: statistics.median(v) for k, v in runs.items()}
    if dist.get_rank() == 0:
        print(f"{n} ranks, medians of {a.reps} alternating runs (size {a.size_mib} MiB):")
        for k in sorted(med):
            print(f"  {k:32s} {med[k]:12.3f}   runs: {', '.join(f'{x:.3f}' for x in runs[k])}")
        if "allreduce_busbw_GBps/gloo" in med:
            for label, key in (
                ("busbw ratio", "allreduce_busbw_GBps"),
                ("4-byte latency ratio", "allreduce_4B_us"),
                ("DDP step ratio", "ddp_step_ms"),
            ):
                print(f"  {label} oxccl/gloo: {med[key + '/oxccl'] / med[key + '/gloo']:.2f}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(
                    {"world": n, "size_mib": a.size_mib, "reps": a.reps, "median": med, "runs": runs},
                    f,
                    indent=1,
                )
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: a gloo worker thread may release a tensor
    # during finalization and abort the process (torch 2.15, "terminate called without
    # an active exception"; seen with a gloo group beside an oxccl one).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
