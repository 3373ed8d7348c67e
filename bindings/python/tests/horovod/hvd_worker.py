"""One rank of a Horovod API test, started by torchrun (or as a plain process for a
world of one): `python hvd_worker.py CASE OUT_DIR`. Checks what it can itself
(assertions make the process fail) and saves what the test compares across ranks to
OUT_DIR/rank<r>.pt.
"""

from __future__ import annotations

import copy
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import oxccl
import oxccl._horovod as hvd

torch.set_num_threads(1)

STEPS = 50
GLOBAL_BATCH = 32
LR = 0.05
MOMENTUM = 0.9


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 4)
        self.unused = nn.Linear(4, 4)  # never in the graph: its gradient is None

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def batch(kind: str, step: int):
    g = torch.Generator().manual_seed(1000 + step)
    if kind == "mlp":
        x = torch.randn(GLOBAL_BATCH, 20, generator=g)
        y = torch.randn(GLOBAL_BATCH, 4, generator=g)
    else:
        x = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g)
        y = torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)
    return x, y


def loss_of(kind: str, out, y):
    return F.mse_loss(out, y) if kind == "mlp" else F.cross_entropy(out, y)


def new_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MLP() if kind == "mlp" else ConvNet()


def shard(t, rank: int, world: int):
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def params(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_hvd(kind: str, rank: int, world: int, passes: int = 1) -> dict:
    model = new_model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    opt = hvd.DistributedOptimizer(
        opt, named_parameters=model.named_parameters(), backward_passes_per_step=passes
    )
    assert isinstance(opt, torch.optim.SGD)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    for step in range(STEPS):
        x, y = batch(kind, step)
        x, y = shard(x, rank, world), shard(y, rank, world)
        opt.zero_grad()
        # `passes` backward passes over parts of the shard, each scaled so that the
        # accumulated gradient is the shard's mean-loss gradient.
        for xp, yp in zip(x.chunk(passes), y.chunk(passes)):
            (loss_of(kind, model(xp), yp) / passes).backward()
        opt.step()
    return params(model)


def train_ddp(kind: str, rank: int, world: int) -> dict:
    model = new_model(kind)
    ddp = nn.parallel.DistributedDataParallel(
        model, find_unused_parameters=(kind == "mlp")
    )
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=MOMENTUM)
    for step in range(STEPS):
        x, y = batch(kind, step)
        x, y = shard(x, rank, world), shard(y, rank, world)
        opt.zero_grad()
        loss_of(kind, ddp(x), y).backward()
        opt.step()
    return params(model)


def train_single(kind: str) -> dict:
    model = new_model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for step in range(STEPS):
        x, y = batch(kind, step)
        opt.zero_grad()
        loss_of(kind, model(x), y).backward()
        opt.step()
    return params(model)


def case_train(rank: int, world: int) -> dict:
    dist.init_process_group("gloo")
    hvd.init()  # through the default store of the gloo group
    assert (hvd.rank(), hvd.size()) == (rank, world)
    assert hvd.local_size() == world and hvd.local_rank() == rank
    out: dict = {}
    for kind in ("mlp", "conv"):
        out[kind] = {
            "hvd": train_hvd(kind, rank, world),
            "ddp": train_ddp(kind, rank, world),
        }
        if rank == 0:
            out[kind]["single"] = train_single(kind)
    out["mlp"]["hvd_passes2"] = train_hvd("mlp", rank, world, passes=2)
    hvd.shutdown()
    dist.destroy_process_group()
    return out


def case_broadcast(rank: int, world: int) -> dict:
    # HVD_TEST_BACKEND=oxccl: the default group is oxccl.torch's, so two oxccl
    # communicators (the group's and the Horovod API's) share the process.
    backend = os.environ.get("HVD_TEST_BACKEND", "gloo")
    if backend == "oxccl":
        import oxccl.torch  # noqa: F401  (registers the backend)
    dist.init_process_group(backend)
    hvd.init()
    assert dist.get_backend() == backend
    root = world - 1
    torch.manual_seed(100 + rank)  # every rank starts different
    model = MLP()
    opt = torch.optim.Adam(
        model.parameters(), lr=0.001 * (rank + 1), betas=(0.9, 0.99 - 0.01 * rank)
    )
    # rank r takes r steps: rank 0 has no optimizer state at all.
    for step in range(rank):
        x, y = batch("mlp", step)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    # a scalar in the per-parameter state (as optimizers keep step counts)
    if rank > 0:
        opt.state[model.fc1.weight]["custom_count"] = 10 * rank
    before = {"model": params(model), "opt": copy.deepcopy(opt.state_dict())}
    hvd.broadcast_parameters(model.state_dict(), root_rank=root)
    hvd.broadcast_optimizer_state(opt, root_rank=root)
    after = {"model": params(model), "opt": copy.deepcopy(opt.state_dict())}
    # named_parameters form, from another root, over a second model
    torch.manual_seed(200 + rank)
    other = ConvNet()
    hvd.broadcast_parameters(other.named_parameters(), root_rank=0)
    after["other"] = params(other)
    # the optimizer still steps after receiving state
    x, y = batch("mlp", 99)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()
    after["stepped"] = params(model)
    # the default group still works beside the Horovod API's communicator
    t = torch.ones(3)
    dist.all_reduce(t)
    assert torch.equal(t, torch.full((3,), float(world))), t
    obj = hvd.broadcast_object({"rank": rank, "list": [rank] * 3}, root_rank=root)
    assert obj == {"rank": root, "list": [root] * 3}, obj
    hvd.shutdown()
    dist.destroy_process_group()
    return {"before": before, "after": after, "root": root}


def expect_close(got, want, what, tol=0.0):
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, (
        f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    )
    if tol == 0.0:
        assert torch.equal(got, want), f"{what}: {got} != {want}"
    else:
        assert torch.allclose(got, want, rtol=tol, atol=tol), f"{what}: {got} != {want}"


def case_ops(rank: int, world: int) -> dict:
    # No torch.distributed here: init() takes the launcher's environment (or makes a
    # world of one when there is none).
    hvd.init()
    assert (hvd.rank(), hvd.size()) == (rank, world), (hvd.rank(), hvd.size())
    ranks_sum = world * (world + 1) // 2  # sum over r of (r + 1)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        base = torch.arange(10, dtype=dtype)
        t = base * (rank + 1)
        tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6
        s = hvd.allreduce(t, name=f"sum.{dtype}", op=hvd.Sum)
        expect_close(s, base * ranks_sum, f"Sum of {dtype}", tol)
        assert torch.equal(t, base * (rank + 1)), "allreduce must not change its input"
        a = hvd.allreduce(t, name=f"avg.{dtype}")  # Average is the default
        expect_close(a, base * ranks_sum / world, f"Average of {dtype}", tol)
    for dtype in (torch.int32, torch.int64, torch.uint8, torch.int8):
        t = torch.full((7,), rank + 1, dtype=dtype)
        expect_close(
            hvd.allreduce(t, name=f"isum.{dtype}", op=hvd.Sum),
            torch.full((7,), ranks_sum, dtype=dtype),
            f"Sum of {dtype}",
        )
        expect_close(
            hvd.allreduce(t, name=f"imax.{dtype}", op=hvd.Max),
            torch.full((7,), world, dtype=dtype),
            f"Max of {dtype}",
        )
        expect_close(
            hvd.allreduce(t, name=f"imin.{dtype}", op=hvd.Min),
            torch.full((7,), 1, dtype=dtype),
            f"Min of {dtype}",
        )
    # in place, non-contiguous, unnamed
    t = torch.ones(4, 6).t() * (rank + 1)
    assert not t.is_contiguous()
    r = hvd.allreduce_(t, op=hvd.Sum)
    assert r is t
    expect_close(t, torch.ones(6, 4) * ranks_sum, "in-place Sum of a transposed tensor")
    # many in flight at once (fused by the engine), synchronized in reverse order
    hs = [
        hvd.allreduce_async(
            torch.full((i + 1,), float(rank + i)), name=f"many.{i}", op=hvd.Sum
        )
        for i in range(40)
    ]
    for i, h in reversed(list(enumerate(hs))):
        expect_close(
            hvd.synchronize(h),
            torch.full((i + 1,), float(ranks_sum - world + world * i)),
            f"many.{i}",
        )
        assert hvd.poll(h)
    # a large tensor (above the direct-transfer size: reduced alone, in place)
    big = torch.arange(300_000, dtype=torch.float32) * (rank + 1)
    expect_close(
        hvd.allreduce(big, name="big", op=hvd.Sum),
        torch.arange(300_000, dtype=torch.float32) * ranks_sum,
        "big Sum",
        1e-6,
    )
    # allgather with a first dimension that differs by rank
    g = hvd.allgather(torch.full((rank + 1, 3), rank, dtype=torch.int64), name="gather")
    want = torch.cat(
        [torch.full((r + 1, 3), r, dtype=torch.int64) for r in range(world)]
    )
    expect_close(g, want, "allgather of uneven first dimensions")
    g = hvd.allgather(torch.tensor([float(rank)]))
    expect_close(
        g, torch.arange(world, dtype=torch.float32), "allgather of equal shapes"
    )
    # broadcast
    root = world - 1
    b = hvd.broadcast(torch.full((5,), float(rank)), root_rank=root, name="bcast")
    expect_close(b, torch.full((5,), float(root)), "broadcast")
    p = torch.full((2, 2), float(rank))
    hvd.broadcast_(p, root_rank=0)
    expect_close(p, torch.zeros(2, 2), "broadcast_ in place")
    # a requires_grad parameter can be broadcast in place, as broadcast_parameters does
    w = nn.Parameter(torch.full((3,), float(rank)))
    hvd.broadcast_(w, root_rank=root)
    expect_close(w.detach(), torch.full((3,), float(root)), "broadcast_ of a Parameter")
    # DistributedOptimizer: fp16 compression, synchronize() then step() under
    # skip_synchronize() (as for gradient clipping), an LR scheduler on top
    for compression in (hvd.Compression.none, hvd.Compression.fp16):
        lin = nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            lin.weight.fill_(1.0)
        opt = hvd.DistributedOptimizer(
            torch.optim.SGD(lin.parameters(), lr=0.5),
            named_parameters=lin.named_parameters(),
            compression=compression,
        )
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        lin(torch.full((1, 3), float(rank + 1))).sum().backward()  # gradient: rank + 1
        opt.synchronize()
        avg = (world + 1) / 2
        expect_close(
            lin.weight.grad,
            torch.full((1, 3), avg),
            f"reduced gradient ({compression.__name__})",
        )
        assert lin.weight.grad.dtype == torch.float32
        with opt.skip_synchronize():
            opt.step()
        expect_close(
            lin.weight.detach(),
            torch.full((1, 3), 1 - 0.5 * avg),
            f"weight after a step ({compression.__name__})",
        )
        sched.step()
        assert opt.param_groups[0]["lr"] == 0.25
        opt.zero_grad()
        assert lin.weight.grad is None
    # Horovod's other arguments: average= (deprecated), pre/postscale, compression
    t = torch.full((3,), float(rank + 1))
    expect_close(
        hvd.allreduce(t, average=False, name="avg_false"),
        torch.full((3,), float(ranks_sum)),
        "average=False",
    )
    expect_close(
        hvd.allreduce(t, average=True, name="avg_true"),
        torch.full((3,), ranks_sum / world),
        "average=True",
        1e-6,
    )
    expect_error(lambda: hvd.allreduce(t, average=True, op=hvd.Sum), "not both")
    scaled = hvd.allreduce(
        t, name="scaled", op=hvd.Sum, prescale_factor=2.0, postscale_factor=3.0
    )
    expect_close(scaled, torch.full((3,), 6.0 * ranks_sum), "prescale 2, postscale 3")
    c = hvd.allreduce(t, name="fp16", compression=hvd.Compression.fp16)
    expect_close(
        c, torch.full((3,), ranks_sum / world), "allreduce with fp16 compression", 1e-3
    )
    # barrier: the others wait for rank 0, which arrives a second late
    t0 = time.monotonic()
    if rank == 0:
        time.sleep(1.0)
    hvd.barrier()
    waited = time.monotonic() - t0
    assert waited >= 0.9, f"rank {rank} left the barrier after {waited:.2f} s"
    hvd.barrier()
    objs = hvd.allgather_object({"rank": rank, "pad": "x" * rank})
    assert objs == [{"rank": r, "pad": "x" * r} for r in range(world)], objs
    assert (hvd.cross_rank(), hvd.cross_size()) == (0, 1), (
        "one host: every rank is its own local rank"
    )
    # step hooks run once per step, also after load_state_dict (which has
    # torch wrap the class's step)
    lin = nn.Linear(3, 1)
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(lin.parameters(), lr=0.1),
        named_parameters=lin.named_parameters(),
    )
    opt.load_state_dict(opt.state_dict())
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert calls == [1], f"step post-hook ran {len(calls)} times"
    # without named_parameters: Horovod's default names; duplicate names refused
    lin = nn.Linear(3, 1, bias=False)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(lin.parameters(), lr=0.5))
    lin(torch.full((1, 3), float(rank + 1))).sum().backward()
    opt.synchronize()
    expect_close(
        lin.weight.grad, torch.full((1, 3), (world + 1) / 2), "unnamed parameters", 1e-6
    )
    expect_error(
        lambda: hvd.DistributedOptimizer(
            torch.optim.SGD(lin.parameters(), lr=0.5),
            named_parameters=[("w", lin.weight), ("w", nn.Parameter(torch.ones(1)))],
        ),
        "not unique: w",
    )
    # gradient_predivide_factor keeps the average; sparse gradients need sparse_as_dense
    lin = nn.Linear(3, 1, bias=False)
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(lin.parameters(), lr=0.5),
        named_parameters=lin.named_parameters(),
        gradient_predivide_factor=4.0,
    )
    lin(torch.full((1, 3), float(rank + 1))).sum().backward()
    opt.synchronize()
    expect_close(
        lin.weight.grad,
        torch.full((1, 3), (world + 1) / 2),
        "gradient_predivide_factor=4",
        1e-6,
    )
    emb = nn.Embedding(10, 2, sparse=True)
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(emb.parameters(), lr=0.5),
        named_parameters=emb.named_parameters(),
    )
    expect_error(
        lambda: emb(torch.tensor([1])).sum().backward(), "weight", "sparse_as_dense"
    )
    emb = nn.Embedding(10, 2, sparse=True)
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(emb.parameters(), lr=0.5),
        named_parameters=[("emb", emb.weight)],
        sparse_as_dense=True,
    )
    emb(torch.tensor([rank % 10])).sum().backward()
    opt.synchronize()
    want = torch.zeros(10, 2)
    for r in range(world):
        want[r % 10] += 1.0 / world
    expect_close(emb.weight.grad, want, "sparse_as_dense gradient", 1e-6)
    hvd.shutdown()
    assert not hvd.is_initialized()
    # init again after shutdown works
    hvd.init()
    expect_close(
        hvd.allreduce(torch.ones(2), name="again", op=hvd.Sum),
        torch.full((2,), float(world)),
        "after re-init",
    )
    hvd.shutdown()
    return {"ok": True}


def expect_error(fn, *needles):
    t0 = time.monotonic()
    try:
        fn()
    except oxccl.Error as e:
        msg = str(e)
        for n in needles:
            assert n in msg, f"{type(e).__name__} does not name {n!r}: {msg}"
        print(
            f"rank {os.environ.get('RANK')}: as expected, after {time.monotonic() - t0:.1f} s: {type(e).__name__}: {msg}",
            file=sys.stderr,
        )
        return e
    raise AssertionError(f"no oxccl.Error raised (expected one naming {needles})")


class Uneven(nn.Module):
    """A model whose `b` layer has a different shape on every rank (a user's bug)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 1 + rank)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def case_errors(rank: int, world: int) -> dict:
    dist.init_process_group("gloo")
    hvd.init()
    # a shape that differs between ranks
    expect_error(
        lambda: hvd.allreduce(torch.ones(4 + rank), name="mismatch"),
        "allreduce.mismatch",
    )
    # the engine still works afterwards
    expect_close(
        hvd.allreduce(torch.ones(3), name="after", op=hvd.Sum),
        torch.full((3,), float(world)),
        "after a mismatch",
    )
    # a model whose layer differs between ranks: step() raises naming the parameter
    model = Uneven(rank)
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        named_parameters=model.named_parameters(),
    )
    model(torch.ones(2, 4)).sum().backward()
    expect_error(opt.step, "allreduce.b.")
    # zero_grad between backward and step is a usage error, not a silent loss
    model2 = MLP()
    opt2 = hvd.DistributedOptimizer(
        torch.optim.SGD(model2.parameters(), lr=0.1),
        named_parameters=model2.named_parameters(),
    )
    F.mse_loss(model2(torch.ones(2, 20)), torch.zeros(2, 4)).backward()
    expect_error(opt2.zero_grad, "zero_grad")
    opt2.step()
    # a name only this rank submits: the stall inspector fails it (the test sets
    # OXCCL_STALL_SHUTDOWN_SECS) with a message naming it, rather than hanging
    t0 = time.monotonic()
    # Each rank names the tensor(s) that stalled: whichever of the two passed the
    # limit first, possibly the other rank's.
    name = "allreduce.only_on_rank"
    if os.environ.get("OXCCL_STALL_SHUTDOWN_SECS"):
        e = expect_error(
            lambda: hvd.allreduce(torch.ones(2), name=f"only_on_rank{rank}"),
            name,
            "stalled past",
        )
    else:  # default: the handle's wait gives up after OXCCL_TIMEOUT
        e = expect_error(
            lambda: hvd.allreduce(torch.ones(2), name=f"only_on_rank{rank}"),
            name,
            "OXCCL_TIMEOUT",
        )
        assert isinstance(e, oxccl.Timeout), type(e)
    waited = time.monotonic() - t0
    assert waited < 30, f"the stalled tensor failed only after {waited:.0f} s"
    # Every rank has its error before any shuts its engine down (a shutdown
    # fails the tensors other ranks still wait for, with another message).
    dist.barrier()
    hvd.shutdown()
    dist.destroy_process_group()
    return {"waited": waited}


CASES = {
    "train": case_train,
    "broadcast": case_broadcast,
    "ops": case_ops,
    "errors": case_errors,
}


def main() -> None:
    case, out_dir = sys.argv[1], sys.argv[2]
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    result = CASES[case](rank, world)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
