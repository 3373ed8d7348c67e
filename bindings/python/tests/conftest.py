"""Helpers: groups of ranks as threads of this process (one UniqueId), and
numpy references."""

import os
import threading
from typing import Any, Callable, List

import numpy as np
import pytest

import oxccl

# Every wait in these tests is bounded; a hang fails the test instead.
os.environ.setdefault("OXCCL_TIMEOUT", "30")
os.environ.setdefault("OXCCL_AUTH", "off")

JOIN_TIMEOUT = 120.0


def make_group(world: int) -> List[oxccl.Communicator]:
    """``world`` communicators of one world, made by one thread each."""
    uid = oxccl.UniqueId()
    raw = uid.to_bytes()
    comms: List[Any] = [None] * world

    def make(r: int) -> None:
        comms[r] = oxccl.Communicator(oxccl.UniqueId.from_bytes(raw), r, world)

    run_threads(world, make)
    return comms


def run_threads(world: int, fn: Callable[[int], Any]) -> List[Any]:
    """Runs ``fn(rank)`` on ``world`` threads; returns the results, raising
    the first rank's exception if any failed."""
    results: List[Any] = [None] * world
    errors: List[Any] = [None] * world

    def body(r: int) -> None:
        try:
            results[r] = fn(r)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors[r] = e

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
        if t.is_alive():
            raise AssertionError(f"a rank did not finish within {JOIN_TIMEOUT} s")
    for e in errors:
        if e is not None:
            raise e
    return results


_GROUPS: dict = {}


@pytest.fixture(params=[1, 2, 3, 4], ids=lambda w: f"world{w}")
def group(request: Any) -> List[oxccl.Communicator]:
    """A group of ``world`` communicators, reused across the tests of a world."""
    w = request.param
    if w not in _GROUPS:
        _GROUPS[w] = make_group(w)
    return _GROUPS[w]


def each(comms: List[oxccl.Communicator], fn: Callable[[oxccl.Communicator], Any]) -> List[Any]:
    return run_threads(len(comms), lambda r: fn(comms[r]))


NP_DTYPES = ["int8", "uint8", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64"]


def data(rank: int, n: int, dtype: str, op: str = "sum", salt: int = 0) -> np.ndarray:
    """Small integers exact in every dtype, whose sums and products over 4 ranks stay exact."""
    h = (np.arange(n, dtype=np.int64) * 7 + rank * 13 + 3 + salt * 5)
    unsigned = dtype.startswith("uint")
    if op == "prod":
        vals = np.array([1, 2] if unsigned else [-1, 1, 2], dtype=np.int64)
        v = vals[h % len(vals)]
    else:
        v = h % 11 if unsigned else h % 11 - 5
    return v.astype(dtype)


def reference(inputs: List[np.ndarray], op: str) -> np.ndarray:
    """The naive reduction of ``inputs`` (in float64 or int64, then cast)."""
    dtype = inputs[0].dtype
    wide = np.float64 if dtype.kind == "f" else np.int64
    stack = np.stack([x.astype(wide) for x in inputs])
    if op == "sum":
        r = stack.sum(0)
    elif op == "prod":
        r = stack.prod(0)
    elif op == "min":
        r = stack.min(0)
    elif op == "max":
        r = stack.max(0)
    elif op == "avg":
        s = stack.sum(0)
        r = s / len(inputs) if dtype.kind == "f" else np.trunc(s / len(inputs)).astype(np.int64)
    else:
        raise ValueError(op)
    return r.astype(dtype)
