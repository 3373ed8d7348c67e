"""Helpers of the oxccl.torch tests: the requirement check, and N ranks as spawned
processes, each with a torch process group."""

from __future__ import annotations

import os
import sys
import socket
import traceback

import torch.multiprocessing as mp


def require_torch_backend() -> None:
    """Skips the calling test module, with the reason printed, when torch or oxccl.torch
    cannot be imported; with OXCCL_REQUIRE_TORCH=1 (as CI sets) fails instead."""
    import pytest

    reason = None
    try:
        import torch.distributed as dist

        if not dist.is_available():
            reason = "this torch has no torch.distributed"
    except Exception as e:  # noqa: BLE001
        reason = f"torch is not importable ({e})"
    if reason is None:
        try:
            import oxccl.torch  # noqa: F401
        except Exception as e:  # noqa: BLE001
            reason = f"oxccl.torch is not importable ({e}); build it with `pip install ./bindings/python`"
    if reason is None:
        return
    if os.environ.get("OXCCL_REQUIRE_TORCH") == "1":
        raise RuntimeError(f"OXCCL_REQUIRE_TORCH=1 but {reason}")
    print(f"oxccl.torch tests skipped: {reason}", file=sys.stderr)
    pytest.skip(reason, allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, backend, fn, args, results):
    import torch.distributed as dist

    import oxccl.torch  # noqa: F401  (registers "oxccl")

    try:
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            init_method=f"tcp://127.0.0.1:{port}",
        )
        out = fn(rank, world, *args)
        dist.destroy_process_group()
        results.put((rank, "ok", out))
        results.close()
        results.join_thread()
        # Leave without the interpreter's teardown: with a gloo group in the process, a
        # gloo worker thread may release a tensor during finalization and abort the
        # process (torch 2.15, "terminate called without an active exception").
        os._exit(0)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        results.close()
        results.join_thread()  # the report must leave before the process does
        os._exit(1)


def run_ranks(world: int, fn, *args, backend: str = "oxccl", timeout: float = 300.0) -> list:
    """fn(rank, world, *args) on `world` spawned ranks; returns their results by rank.

    Raises AssertionError with every rank's traceback when a rank fails or the run
    does not finish within `timeout` seconds.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, backend, fn, args, results), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    got: dict = {}
    errors = []
    errored: set = set()
    import queue as _q
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(got) + len(errors) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"ranks did not finish within {timeout} s; finished: {sorted(got)}, errors: {errors}"
                )
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except _q.Empty:
                reported = set(got) | set(errored)
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in reported]
                if dead:
                    # give the queue a moment to deliver the failing rank's report
                    time.sleep(0.5)
                    if results.empty():
                        raise AssertionError(
                            f"rank processes exited with {[p.exitcode for p in procs]}; errors: {errors}"
                        )
                continue
            if status == "ok":
                got[rank] = payload
            else:
                errored.add(rank)
                errors.append(f"rank {rank}: {payload}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [got[r] for r in range(world)]
