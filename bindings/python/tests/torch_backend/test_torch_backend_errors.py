"""Failure behaviour of the "oxccl" backend through torch's API.

* a rank that dies mid-training: every survivor's pending call (the gradient allreduce
  DDP issued in backward) and its next call raise torch.distributed.DistBackendError
  carrying oxccl's message, which names the dead rank, within seconds;
* Work: wait(timeout) on a call that cannot complete raises, is_completed() and
  exception() report what happened;
* what oxccl does not do fails with a clear message: recv from any source,
  ReduceOp.PREMUL_SUM / BAND, reductions on dtypes oxccl does not reduce.
"""

from __future__ import annotations

from torch_ranks import require_torch_backend

require_torch_backend()

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist

from torch_ranks import free_port, run_ranks

DEAD = 2
DIE_AT = 5


def _dead_rank_worker(rank: int, world: int, port: int, results, mode: str) -> None:
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    import oxccl.torch  # noqa: F401

    # a long process-group timeout: the failure must come from oxccl noticing the dead
    # peer, not from a timeout
    dist.init_process_group(
        "oxccl",
        rank=rank,
        world_size=world,
        init_method=f"tcp://127.0.0.1:{port}",
        timeout=datetime.timedelta(seconds=300),
    )
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    report = {"rank": rank}
    t_call = None
    try:
        for step in range(100):
            if rank == DEAD and step == DIE_AT:
                os._exit(17)  # dies without a word, as a crashed process does
            x = torch.randn(16, 32)
            if mode == "direct":
                # a call issued by the user, pending when the peer dies
                buf = torch.ones(1 << 16)
                t_call = time.monotonic()
                w = dist.all_reduce(buf, async_op=True)
                w.wait()
                continue
            opt.zero_grad()
            loss = F.cross_entropy(model(x), torch.randint(0, 4, (16,)))
            t_call = time.monotonic()
            loss.backward()  # DDP's allreduce of the gradients is pending in here
            opt.step()
        report["pending"] = ("no error", "", 0.0)
    except Exception as e:  # noqa: BLE001
        report["pending"] = (type(e).__name__, str(e), time.monotonic() - t_call)
    t = torch.ones(8)
    t0 = time.monotonic()
    try:
        dist.all_reduce(t)
        report["next"] = ("no error", "", 0.0)
    except Exception as e:  # noqa: BLE001
        report["next"] = (type(e).__name__, str(e), time.monotonic() - t0)
    t0 = time.monotonic()
    try:
        dist.all_reduce(t, async_op=True).wait()
        report["next_async"] = ("no error", "", 0.0)
    except Exception as e:  # noqa: BLE001
        report["next_async"] = (type(e).__name__, str(e), time.monotonic() - t0)
    results.put(report)
    results.close()
    results.join_thread()
    os._exit(0)  # skip destroy_process_group: the group is broken by design


@pytest.mark.parametrize("mode", ["ddp", "direct"])
def test_dead_rank_raises_dist_backend_error_naming_it(mode):
    import torch.multiprocessing as mp

    world = 3
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_dead_rank_worker, args=(r, world, port, results, mode), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    reports = []
    try:
        for _ in range(world - 1):
            reports.append(results.get(timeout=180))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert procs[DEAD].exitcode == 17
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        for what in ("pending", "next", "next_async"):
            kind, msg, secs = r[what][:3]
            if mode == "ddp" and what == "pending":
                # DDP's reducer reads the failed future from C++; torch hands a Python
                # backend's future error to C++ only as a plain RuntimeError (see
                # Work.__init__ in oxccl/torch.py), whose message carries the class name
                assert kind == "RuntimeError" and "DistBackendError: oxccl:" in msg, f"{kind}: {msg}"
            else:
                assert kind == "DistBackendError", f"rank {r['rank']} {what}: {kind}: {msg}"
            assert f"rank {DEAD}" in msg, f"rank {r['rank']} {what}: message does not name rank {DEAD}: {msg}"
            assert secs < 15.0, f"rank {r['rank']} {what}: took {secs:.1f} s"


def _work_semantics(rank: int, world: int) -> dict:
    out = {}
    pg = dist.group.WORLD
    # a recv whose send comes 2 s later: wait(timeout) raises, the Work stays incomplete,
    # then completes. (Calls on one oxccl communicator run in order, as on one NCCL
    # stream: nothing else is issued while the recv is pending.)
    if rank == 0:
        r = torch.empty(4)
        w = dist.irecv(r, src=1)
        t0 = time.monotonic()
        try:
            w.wait(timeout=datetime.timedelta(milliseconds=300))
            out["wait_timeout"] = "returned"
        except dist.DistBackendError as e:
            out["wait_timeout"] = ("raised", time.monotonic() - t0, str(e))
        out["completed_before"] = w.is_completed()
        out["exception_before"] = w.exception()
        assert w.wait() is True
        out["completed_after"] = w.is_completed()
        out["exception_after"] = w.exception()
        out["received"] = r.tolist()
        out["future"] = w.get_future().wait()[0].tolist()
    else:
        time.sleep(2.0)
        dist.send(torch.arange(4.0), dst=0)
    errs = {}
    for name, call in [
        ("anysource", lambda: dist.recv(torch.empty(1))),
        ("premul", lambda: dist.all_reduce(torch.ones(2), op=dist._make_nccl_premul_sum(2.0))),
        ("band", lambda: dist.all_reduce(torch.ones(2, dtype=torch.int32), op=dist.ReduceOp.BAND)),
        ("int16", lambda: dist.all_reduce(torch.ones(2, dtype=torch.int16))),
    ]:
        try:
            call()
            errs[name] = "no error"
        except Exception as e:  # noqa: BLE001
            errs[name] = f"{type(e).__name__}: {e}"
    out["errors"] = errs
    dist.barrier()
    assert pg is not None
    return out


def test_work_semantics_and_clear_errors():
    res = run_ranks(2, _work_semantics)
    r0 = res[0]
    kind, secs, msg = r0["wait_timeout"]
    assert kind == "raised" and 0.25 <= secs < 5.0, r0["wait_timeout"]
    assert "did not complete" in msg
    assert r0["completed_before"] is False and r0["exception_before"] is None
    assert r0["completed_after"] is True and r0["exception_after"] is None
    assert r0["received"] == [0.0, 1.0, 2.0, 3.0] == r0["future"]
    for rank_res in res:
        e = rank_res["errors"]
        assert "any source" in e["anysource"], e
        assert "PREMUL_SUM" in e["premul"] and "not supported" in e["premul"], e
        assert "BAND" in e["band"] and "not supported" in e["band"], e
        assert "int16" in e["int16"], e
