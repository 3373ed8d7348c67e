"""Every collective of the torch API on the "oxccl" backend against gloo's result.

1 to 4 ranks (spawned processes), the world group and a subgroup made by
`dist.new_group` (torch hands the backend a prefixed store for it), every dtype that
torch, gloo and oxccl share, every reduce op oxccl has. Values are small integers
(also in the float dtypes), so sums, products, minima and maxima are exact in every
dtype and whatever order oxccl and gloo add in, and results must be equal; AVG (gloo
has none) is compared with gloo's SUM divided by the group size, within the dtype's
rounding.
"""

from __future__ import annotations

from torch_ranks import require_torch_backend

require_torch_backend()

import pytest
import torch
import torch.distributed as dist

from torch_ranks import run_ranks

DTYPES = [
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
]
OPS = [dist.ReduceOp.SUM, dist.ReduceOp.PRODUCT, dist.ReduceOp.MIN, dist.ReduceOp.MAX]


def _data(dtype, grank: int, n: int, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * salt + 17 * grank + n)
    lo, hi = (1, 4) if not dtype.is_floating_point else (-3, 4)
    return torch.randint(lo, hi, (n,), generator=g).to(dtype)


class Checker:
    def __init__(self, ox, gl, members, rank):
        self.ox, self.gl, self.members = ox, gl, members
        self.n = len(members)
        self.grank = members.index(rank)
        self.failures: list = []
        self.count = 0

    def same(self, what, got, want, exact=True):
        self.count += 1
        if isinstance(got, (list, tuple)):
            for i, (a, b) in enumerate(zip(got, want)):
                self.same(f"{what}[{i}]", a, b, exact)
            return
        if got.dtype != want.dtype or got.shape != want.shape:
            self.failures.append(f"{what}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}")
            return
        if exact:
            ok = torch.equal(got, want)
        else:
            tol = {torch.float16: 1e-2, torch.bfloat16: 2e-2}.get(got.dtype, 1e-6)
            ok = torch.allclose(got.double(), want.double(), rtol=tol, atol=tol)
        if not ok:
            self.failures.append(
                f"{what} (group {self.members}, rank {self.grank}): oxccl {got} vs gloo {want}"
            )

    def both(self, fn, *inputs):
        """fn(group, *copies) on oxccl and gloo; returns the two results."""
        a = fn(self.ox, *[_clone(x) for x in inputs])
        b = fn(self.gl, *[_clone(x) for x in inputs])
        return a, b


def _clone(x):
    if isinstance(x, list):
        return [t.clone() for t in x]
    return x.clone()


def _reductions(c: Checker, dtype) -> None:
    n, g = c.n, c.grank
    last = n - 1
    for op in OPS:
        name = f"{dtype}/{op}"
        x = _data(dtype, g, 37, 1)

        def ar(grp, t, op=op):
            dist.all_reduce(t, op=op, group=grp)
            return t

        c.same(f"all_reduce {name}", *c.both(ar, x))

        def ar_async(grp, t, op=op):
            w = dist.all_reduce(t, op=op, group=grp, async_op=True)
            assert w.wait() is True
            assert w.is_completed()
            return t

        c.same(f"all_reduce async {name}", *c.both(ar_async, x))

        def red(grp, t, op=op):
            dist.reduce(t, group_dst=last, op=op, group=grp)
            return t

        a, b = c.both(red, x)
        if g == last:
            c.same(f"reduce {name}", a, b)

        # reduce_scatter_tensor: the shard FSDP reduces its gradients with
        xs = _data(dtype, g, 5 * n, 2)

        def rst(grp, t, op=op):
            out = torch.empty(5, dtype=dtype)
            dist.reduce_scatter_tensor(out, t, op=op, group=grp)
            return out

        c.same(f"reduce_scatter_tensor {name}", *c.both(rst, xs))

        # reduce_scatter with a list of inputs
        ins = [_data(dtype, g, 4, 10 + i) for i in range(n)]

        def rs(grp, ts, op=op):
            out = torch.empty(4, dtype=dtype)
            dist.reduce_scatter(out, ts, op=op, group=grp)
            return out

        c.same(f"reduce_scatter {name}", *c.both(rs, ins))

        # coalesced allreduce (what _coalescing_manager and DDP-style callers issue)
        ts = [_data(dtype, g, k, 20 + k) for k in (1, 6, 3)]

        def coal(grp, ts, op=op):
            with dist._coalescing_manager(group=grp, async_ops=True) as cm:
                for t in ts:
                    dist.all_reduce(t, op=op, group=grp)
            cm.wait()
            return ts

        c.same(f"all_reduce coalesced {name}", *c.both(coal, ts))

    if dtype.is_floating_point:
        x = _data(dtype, g, 29, 3)
        got = x.clone()
        dist.all_reduce(got, op=dist.ReduceOp.AVG, group=c.ox)
        want = x.clone()
        dist.all_reduce(want, op=dist.ReduceOp.SUM, group=c.gl)
        want = (want.double() / n).to(dtype)
        c.same(f"all_reduce AVG {dtype}", got, want, exact=False)


def _movement(c: Checker, dtype) -> None:
    n, g = c.n, c.grank
    last = n - 1
    x = _data(dtype, g, 11, 4)
    for root in sorted({0, last}):

        def bc(grp, t, root=root):
            dist.broadcast(t, group_src=root, group=grp)
            return t

        c.same(f"broadcast {dtype} root {root}", *c.both(bc, x))

    def ag(grp, t):
        outs = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(outs, t, group=grp)
        return outs

    c.same(f"all_gather {dtype}", *c.both(ag, x))

    def agt(grp, t):
        out = torch.empty(n * t.numel(), dtype=dtype)
        w = dist.all_gather_into_tensor(out, t, group=grp, async_op=True)
        w.wait()
        return out

    c.same(f"all_gather_into_tensor {dtype}", *c.both(agt, x))

    # 2-d output (world, k): the layout FSDP uses
    def agt2(grp, t):
        out = torch.empty((n, t.numel()), dtype=dtype)
        dist.all_gather_into_tensor(out, t.reshape(1, -1), group=grp)
        return out

    c.same(f"all_gather_into_tensor 2-d {dtype}", *c.both(agt2, x))

    def gat(grp, t):
        outs = [torch.empty_like(t) for _ in range(n)] if g == last else None
        dist.gather(t, outs, group_dst=last, group=grp)
        return outs

    a, b = c.both(gat, x)
    if g == last:
        c.same(f"gather {dtype}", a, b)

    sc_in = [_data(dtype, 0, 6, 30 + i) for i in range(n)]  # same on every rank; only the root's count

    def sca(grp, ts):
        out = torch.empty(6, dtype=dtype)
        dist.scatter(out, ts if g == 0 else None, group_src=0, group=grp)
        return out

    c.same(f"scatter {dtype}", *c.both(sca, sc_in))

    def a2a(grp, ts, sizes):
        outs = [torch.empty(k, dtype=dtype) for k in sizes]
        dist.all_to_all(outs, ts, group=grp)
        return outs

    # all_to_all, even sizes: against gloo
    a2a_in = [_data(dtype, g, 3, 40 + j) for j in range(n)]
    c.same(f"all_to_all {dtype}", *c.both(lambda grp, ts: a2a(grp, ts, [3] * n), a2a_in))
    # uneven sizes (gloo has none): rank g sends (g + j + 1) elements to rank j; the
    # expected blocks are what every sender generated for this rank
    a2a_in = [_data(dtype, g, g + j + 1, 40 + j) for j in range(n)]
    got = a2a(c.ox, a2a_in, [j + g + 1 for j in range(n)])
    want = [_data(dtype, j, j + g + 1, 40 + g) for j in range(n)]
    c.same(f"all_to_all uneven {dtype}", got, want)

    # all_to_all_single, even and with split sizes (2-d rows of 3)
    ev = _data(dtype, g, 4 * n, 50)

    def a2as(grp, t):
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t, group=grp)
        return out

    c.same(f"all_to_all_single {dtype}", *c.both(a2as, ev))

    in_splits = [(g + 2 * j) % 3 for j in range(n)]
    out_splits = [(j + 2 * g) % 3 for j in range(n)]
    rows = _data(dtype, g, 3 * sum(in_splits), 51).reshape(-1, 3)

    def a2av(grp, t):
        out = torch.empty((sum(out_splits), 3), dtype=dtype)
        dist.all_to_all_single(out, t, out_splits, in_splits, group=grp)
        return out

    c.same(f"all_to_all_single splits {dtype}", *c.both(a2av, rows))

    if n > 1:
        nxt, prv = (g + 1) % n, (g - 1) % n

        def ring(grp, t):
            r = torch.empty_like(t)
            ops = [
                dist.P2POp(dist.isend, t, group_peer=nxt, group=grp),
                dist.P2POp(dist.irecv, r, group_peer=prv, group=grp),
            ]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
            return r

        c.same(f"batch_isend_irecv ring {dtype}", *c.both(ring, x))

        def crossing(grp, t):
            # every rank isends first, then irecvs: oxccl.torch issues the two as one batch
            r = torch.empty_like(t)
            ws = [dist.isend(t, group_dst=nxt, group=grp), dist.irecv(r, group_src=prv, group=grp)]
            for w in ws:
                w.wait()
            return r

        c.same(f"isend/irecv ring without a batch {dtype}", *c.both(crossing, x))

        def sendrecv(grp, t):
            # rank 0 sends to every other rank in turn
            if g == 0:
                for j in range(1, n):
                    dist.send(t + j if dtype != torch.bool else t, group_dst=j, group=grp)
                return t
            r = torch.empty_like(t)
            dist.recv(r, group_src=0, group=grp)
            return r

        c.same(f"send/recv {dtype}", *c.both(sendrecv, x))

        def isend_irecv(grp, t):
            if g == 0:
                ws = [dist.isend(t, group_dst=j, group=grp) for j in range(1, n)]
                for w in ws:
                    w.wait()
                return t
            r = torch.empty_like(t)
            w = dist.irecv(r, group_src=0, group=grp)
            w.wait()
            return r

        c.same(f"isend/irecv {dtype}", *c.both(isend_irecv, x))


def _unsigned_wide(c: Checker) -> None:
    """uint32 and uint64: oxccl reduces them, gloo has neither (nor does torch have
    arithmetic on them), so the expected results are computed in int64 from the inputs
    every rank generated."""
    n, g = c.n, c.grank
    reducers = {
        dist.ReduceOp.SUM: lambda xs: xs.sum(0),
        dist.ReduceOp.PRODUCT: lambda xs: xs.prod(0),
        dist.ReduceOp.MIN: lambda xs: xs.min(0).values,
        dist.ReduceOp.MAX: lambda xs: xs.max(0).values,
    }
    for dtype in (torch.uint32, torch.uint64):
        for op, ref in reducers.items():
            got = _data(torch.int64, g, 19, 70).to(dtype)
            dist.all_reduce(got, op=op, group=c.ox)
            want = ref(torch.stack([_data(torch.int64, j, 19, 70) for j in range(n)])).to(dtype)
            c.same(f"all_reduce {dtype}/{op}", got.to(torch.int64), want.to(torch.int64))
        x = _data(torch.int64, g, 9, 71).to(dtype)
        outs = [torch.empty(9, dtype=dtype) for _ in range(n)]
        dist.all_gather(outs, x, group=c.ox)
        c.same(
            f"all_gather {dtype}",
            [o.to(torch.int64) for o in outs],
            [_data(torch.int64, j, 9, 71) for j in range(n)],
        )


def _check_group(c: Checker) -> None:
    for dtype in DTYPES:
        _reductions(c, dtype)
        _movement(c, dtype)
    _unsigned_wide(c)
    # complex: SUM as pairs of reals, against gloo
    z = torch.complex(_data(torch.float32, c.grank, 8, 80), _data(torch.float32, c.grank, 8, 81))

    def zsum(grp, t):
        dist.all_reduce(t, group=grp)
        return t

    c.same("all_reduce complex64 SUM", *c.both(zsum, z))
    # non-contiguous tensors go through a contiguous copy and back
    x = _data(torch.float32, c.grank, 24, 60).reshape(4, 6).t()
    assert not x.is_contiguous()

    def nc(grp, t):
        dist.all_reduce(t, group=grp)
        return t

    c.same("all_reduce non-contiguous", *c.both(nc, x))
    dist.barrier(group=c.ox)
    w = dist.barrier(group=c.ox, async_op=True)
    w.wait()
    c.count += 1
    if not w.is_completed():
        c.failures.append("barrier async: not completed after wait")


def conformance(rank: int, world: int) -> tuple:
    gl_world = dist.new_group(backend="gloo")
    groups = [(dist.group.WORLD, gl_world, list(range(world)))]
    if world >= 2:
        members = [world - 1] if world == 2 else [r for r in range(world) if r != 1]
        sub_ox = dist.new_group(members, backend="oxccl")
        sub_gl = dist.new_group(members, backend="gloo")
        groups.append((sub_ox, sub_gl, members))
    assert dist.get_backend() == "oxccl"
    failures, count = [], 0
    for ox, gl, members in groups:
        if rank not in members:
            continue
        c = Checker(ox, gl, members, rank)
        _check_group(c)
        failures += c.failures
        count += c.count
    return failures, count


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_collective_matches_gloo(world):
    results = run_ranks(world, conformance, timeout=600)
    failures = [f for fs, _ in results for f in fs]
    counts = [n for _, n in results]
    assert all(n > 400 for n in counts), f"too few comparisons ran: {counts}"
    assert not failures, "\n".join(failures[:40])
