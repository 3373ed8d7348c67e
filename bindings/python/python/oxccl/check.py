"""``python -m oxccl.check``: oxccl-check through the Python package.

Runs collectives on every rank of a job started by a launcher (``oxrun -n 4
-- python -m oxccl.check``, ``torchrun --nproc-per-node 4 -m oxccl.check``),
on numpy arrays (bfloat16: torch tensors) passed through the bindings, and
checks every element of every result against the exact expected value,
with ``oxccl-check``'s own data and checker (``oxccl_tools::pattern``, the
same Rust code). Rank 0 prints one line per call with the median time.

With no options it sweeps every collective over every dtype, every
reduction and the element counts 0, 1, 1023 and 65537; ``-c``, ``-b``,
``-d``, ``-o`` pick one call as ``oxccl-check`` does.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import Communicator, _oxccl

RING = ["all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter", "barrier"]
EXCHANGES = ["all_to_all", "gather", "scatter", "send_recv"]
UNEVEN = ["all_to_all_v", "all_gather_v", "reduce_scatter_v"]
ALL = RING + EXCHANGES + UNEVEN
REDUCING = {"all_reduce", "reduce", "reduce_scatter", "reduce_scatter_v"}
DTYPES = ["i8", "u8", "i32", "u32", "i64", "u64", "f16", "bf16", "f32", "f64"]
OPS = ["sum", "prod", "min", "max", "avg"]
SIZES = {"i8": 1, "u8": 1, "i32": 4, "u32": 4, "i64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8}
NUMPY = {
    "i8": "int8",
    "u8": "uint8",
    "i32": "int32",
    "u32": "uint32",
    "i64": "int64",
    "u64": "uint64",
    "f16": "float16",
    "f32": "float32",
    "f64": "float64",
}


def parse_bytes(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper()
    if s and s[-1] in mult:
        return int(s[:-1]) * mult[s[-1]]
    return int(s)


def array(data: bytes, dtype: str) -> Any:
    """A writable buffer of ``dtype`` holding ``data`` (bfloat16: a torch tensor)."""
    if dtype == "bf16":
        import torch

        t = torch.empty(len(data) // 2, dtype=torch.bfloat16)
        t.view(torch.uint8).numpy()[:] = memoryview(data).cast("B")
        return t
    import numpy as np

    return np.frombuffer(bytearray(data), dtype=NUMPY[dtype])


def zeros(n: int, dtype: str) -> Any:
    return array(b"\xa5" * (n * SIZES[dtype]), dtype)


def bf16_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run_one(comm: Communicator, kind: str, dtype: str, op: str, count: int, root: int) -> Tuple[int, float]:
    """Runs one call of ``count`` elements (per rank where the call is cut
    in blocks); returns how many elements of its result are wrong and how
    long the call took (seconds, without making and checking the data)."""
    world, rank = comm.world, comm.rank
    if kind in UNEVEN:
        inp, counts, layout, out_len = _oxccl._check_uneven(kind, dtype, op, count, world, rank)
        x = array(inp, dtype)
        out = zeros(out_len // SIZES[dtype], dtype)
        t = time.perf_counter()
        if kind == "all_to_all_v":
            comm.all_to_all_v(x, layout[0], layout[1], out, layout[2], layout[3])
        elif kind == "all_gather_v":
            comm.all_gather_v(x, out, counts)
        else:
            comm.reduce_scatter_v(x, out, counts, op)
        took = time.perf_counter() - t
        return _oxccl._check_uneven_wrong(kind, dtype, op, count, world, rank, out), took
    prev, nxt = (rank + world - 1) % world, (rank + 1) % world
    d_root = prev if kind == "send_recv" else root
    x = array(_oxccl._check_input(kind, dtype, op, d_root, count, world, rank), dtype)
    out_count = {
        "all_gather": count * world,
        "all_to_all": count * world,
        "gather": count * world if rank == root else 0,
        "barrier": 0,
    }.get(kind, count)
    out = zeros(out_count, dtype)
    calls: Dict[str, Callable[[], None]] = {
        "all_reduce": lambda: comm.all_reduce(x, op, out=out),
        "broadcast": lambda: comm.broadcast(x, root, out=out),
        "reduce": lambda: comm.reduce(x, root, op, out=out),
        "all_gather": lambda: comm.all_gather(x, out),
        "reduce_scatter": lambda: comm.reduce_scatter(x, out, op),
        "barrier": comm.barrier,
        "all_to_all": lambda: comm.all_to_all(x, out),
        "gather": lambda: comm.gather(x, out if rank == root else None, root),
        "scatter": lambda: comm.scatter(x if rank == root else None, out, root),
        "send_recv": lambda: comm.batch([("send", x, nxt), ("recv", out, prev)]),
    }
    if kind not in calls:
        raise ValueError(f"unknown collective {kind!r}")
    t = time.perf_counter()
    calls[kind]()
    took = time.perf_counter() - t
    return _oxccl._check_count_wrong(kind, dtype, op, d_root, count, world, rank, out), took


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oxccl.check", description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--collective", help="one of: all, " + ", ".join(ALL))
    p.add_argument("-b", "--bytes", type=parse_bytes, help="size as oxccl-check counts it (K, M, G)")
    p.add_argument("-d", "--dtype", choices=DTYPES)
    p.add_argument("-o", "--op", choices=OPS)
    p.add_argument("-r", "--root", type=int, default=0)
    p.add_argument("-n", "--iters", type=int, default=3, help="checked, timed iterations of each call")
    args = p.parse_args(argv)

    comm = Communicator.from_env()
    world, rank = comm.world, comm.rank
    single = any(v is not None for v in (args.collective, args.bytes, args.dtype, args.op))
    kinds = ALL if args.collective in (None, "all") else [args.collective]
    if single:
        dtypes = [args.dtype or "f32"]
        ops = [args.op or "sum"]
    else:
        dtypes = [d for d in DTYPES if d != "bf16" or bf16_available()]
        ops = OPS
        if rank == 0 and "bf16" not in dtypes:
            print("oxccl.check: bfloat16 not checked: it needs torch, which is not installed")
    calls, wrong_total = 0, 0
    for kind in kinds:
        for dtype in dtypes:
            size = SIZES[dtype]
            if single:
                elems = (args.bytes if args.bytes is not None else 64 << 20) // size
                cut = kind in ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter") + tuple(UNEVEN)
                counts = [0 if kind == "barrier" else (elems // world if cut else elems)]
            else:
                counts = [0] if kind == "barrier" else [0, 1, 1023, 65537]
            for op in ops if kind in REDUCING else ["sum"]:
                for count in counts:
                    times, wrong = [], 0
                    for _ in range(max(1, args.iters)):
                        w, took = run_one(comm, kind, dtype, op, count, args.root % world)
                        wrong += w
                        times.append(took)
                    calls += len(times)
                    wrong_total += wrong
                    times.sort()
                    if rank == 0 or wrong:
                        print(
                            f"{kind:<16} {dtype:>4} {op if kind in REDUCING else '-':>4} "
                            f"{count:>9} elements, {world} ranks: median {times[len(times) // 2] * 1e6:>10.1f} us "
                            f"over {len(times)} calls, "
                            + ("result OK" if wrong == 0 else f"rank {rank}: {wrong} WRONG elements"),
                            flush=True,
                        )
    comm.barrier()
    if rank == 0:
        print(f"oxccl.check: {calls} calls on each of {world} ranks, {wrong_total} wrong elements on rank 0")
    return 1 if wrong_total else 0


if __name__ == "__main__":
    sys.exit(main())
