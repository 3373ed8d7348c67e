"""DDP on oxccl: the README's "Using it from PyTorch" example.

    torchrun --nproc-per-node 2 bindings/python/examples/torch_ddp.py

Trains a small network on synthetic data with DistributedDataParallel over the
torch.distributed backend "oxccl", and shows a few plain collectives on the same group.
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import oxccl.torch  # noqa: F401  registers the backend "oxccl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    steps = ap.parse_args().steps

    dist.init_process_group("oxccl")  # torchrun's environment and store: nothing else to set
    rank, world = dist.get_rank(), dist.get_world_size()

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)  # 1 + 2 + ... + world
    assert t.item() == world * (world + 1) / 2

    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    w_true = torch.randn(16, 4, generator=torch.Generator().manual_seed(42))
    for step in range(steps):
        x = torch.randn(32, 16, generator=g)
        loss = F.mse_loss(model(x), x @ w_true)
        opt.zero_grad()
        loss.backward()  # gradients are averaged over the ranks by oxccl, overlapped with backward
        opt.step()
        if rank == 0 and (step % 20 == 0 or step == steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}")

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
