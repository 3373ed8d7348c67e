"""Trains a small conv net and a small transformer for a number of steps (launched by torchrun).

    torchrun --nproc-per-node 2 train.py --backend oxccl --out params.pt

Plain torch modules, synthetic data, fixed seeds: every run with the same world size
sees the same data. `--mode ddp` wraps the models in DistributedDataParallel;
`--mode fsdp` shards them with FSDP2's fully_shard; `--mode horovod` uses
oxccl.torch.DistributedOptimizer instead. Rank 0 saves the final
parameters of both models (and the last losses) to --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(16, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        h = self.emb(tok) + self.pos[: tok.size(1)]
        mask = nn.Transformer.generate_square_subsequent_mask(tok.size(1))
        return self.head(self.enc(h, mask=mask, is_causal=True))


def conv_batch(step: int, rank: int) -> tuple:
    g = torch.Generator().manual_seed(10_000 + 100 * step + rank)
    x = torch.randn(8, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    return x, y


def tok_batch(step: int, rank: int) -> tuple:
    g = torch.Generator().manual_seed(20_000 + 100 * step + rank)
    t = torch.randint(0, 64, (8, 13), generator=g)
    return t[:, :-1], t[:, 1:]


def build(kind: str, mode: str):
    torch.manual_seed(0)  # the same initial parameters on every rank and every run
    model = ConvNet() if kind == "conv" else TinyTransformer()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model), model, opt
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # shard every layer, then the root: odd sizes (e.g. 3*8*3*3 = 216 weights, 10
        # biases, 64-row embeddings over 4 ranks) make uneven shards that FSDP pads
        if kind == "conv":
            units = [model.c1, model.c2, model.fc]
        else:
            units = [model.emb, *model.enc.layers, model.head]
        for unit in units:
            fully_shard(unit)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, model, opt
    import oxccl.torch as oxt

    oxt.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = oxt.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    return model, model, opt


def _full_state(model: nn.Module) -> dict:
    """The model's parameters and buffers, gathered whole when FSDP sharded them."""
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().clone()
    return out


def train(kind: str, mode: str, steps: int, rank: int) -> tuple:
    wrapped, model, opt = build(kind, mode)
    initial = _full_state(model)
    loss_v = float("nan")
    t0 = time.perf_counter()
    for step in range(steps):
        opt.zero_grad(set_to_none=False)
        if kind == "conv":
            x, y = conv_batch(step, rank)
            loss = F.cross_entropy(wrapped(x), y)
        else:
            x, y = tok_batch(step, rank)
            loss = F.cross_entropy(wrapped(x).reshape(-1, 64), y.reshape(-1))
        loss.backward()
        opt.step()
        loss_v = loss.item()
    elapsed = time.perf_counter() - t0
    final = _full_state(model)
    moved = sum((final[k] - initial[k]).abs().sum().item() for k in final)
    return final, loss_v, elapsed, moved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="oxccl")
    ap.add_argument("--mode", choices=["ddp", "fsdp", "horovod"], default="ddp")
    ap.add_argument("--models", default="conv,transformer")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import oxccl.torch  # noqa: F401  (registers "oxccl")

    dist.init_process_group(a.backend)
    rank = dist.get_rank()
    result = {"world": dist.get_world_size(), "backend": a.backend, "mode": a.mode}
    for kind in a.models.split(","):
        params, loss, elapsed, moved = train(kind, a.mode, a.steps, rank)
        # every rank must hold the same parameters after synchronous data-parallel steps
        for name, p in params.items():
            ref = p.clone()
            dist.broadcast(ref, 0)
            if not torch.equal(ref, p):
                raise SystemExit(f"rank {rank}: {kind} parameter {name} differs from rank 0's")
        result[kind] = {"params": params, "loss": loss, "seconds": elapsed, "moved": moved}
    if rank == 0:
        tmp = a.out + ".tmp"
        torch.save(result, tmp)
        os.replace(tmp, a.out)
    dist.barrier()
    dist.destroy_process_group()
    # Once in a few runs torch 2.15 aborted at interpreter exit after FSDP2 on CPU
    # ("terminate called without an active exception"), seen with gloo too; the results
    # are written and every rank is done, so leave without the interpreter's teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
