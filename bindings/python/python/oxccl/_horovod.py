"""Horovod's PyTorch API on oxccl's fusion engine.

Import it as ``import oxccl.torch as hvd`` (``oxccl.torch`` re-exports this
module) and write what a Horovod user writes::

    hvd.init()
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size())
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

Every collective goes through one :class:`oxccl.FusionEngine` per process
(oxccl's Horovod-style engine: named tensors, a negotiation cycle every
``OXCCL_CYCLE_TIME_MS``, small tensors fused into buffers of at most
``OXCCL_FUSION_THRESHOLD`` bytes, a stall inspector, and the
``OXCCL_TIMELINE`` Chrome trace with one row per tensor name). Tensor names
are Horovod's: ``allreduce.<parameter name>`` for gradients,
``broadcast.<name>`` for broadcasts, ``allreduce.noname.<n>`` when no name
is given.

How :func:`init` finds the other ranks:

- when ``torch.distributed`` is already initialised (any backend), through
  its default store, under the key prefix ``oxccl_horovod/<n>/``: no extra
  port, and the same ranks as the default process group;
- otherwise from the launcher's environment (``oxrun``, ``torchrun``,
  ``mpirun``, ``srun``), as :meth:`oxccl.Communicator.from_env`;
- with no launcher variables at all, as a world of one rank (Horovod runs a
  plain ``python train.py`` as one rank too).

Tensors may be on any device: the engine copies each tensor in at
submission and its result back when it completes, and tensors outside host
memory (CUDA) travel through a host copy. Errors are oxccl exceptions (:class:`oxccl.Error` subclasses)
whose message names the tensor: a name submitted with a different number of
elements or dtype on different ranks fails on every rank; a name that some
ranks never submit is reported by the stall inspector after
``OXCCL_STALL_WARNING_SECS`` and fails every pending tensor after
``OXCCL_STALL_SHUTDOWN_SECS`` (if set) or, at the latest, after
``OXCCL_TIMEOUT``.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import io
import os
import pickle
import socket
import threading
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch.utils.dlpack import to_dlpack as _to_dlpack

from ._oxccl import (
    Communicator,
    FusionEngine,
    InvalidArgument,
    InvalidUsage,
    UnavailableBackend,
    UniqueId,
    Work,
)

__all__ = [
    "Average",
    "Sum",
    "Min",
    "Max",
    "Product",
    "Compression",
    "init",
    "shutdown",
    "is_initialized",
    "rank",
    "size",
    "local_rank",
    "local_size",
    "cross_rank",
    "cross_size",
    "allreduce",
    "allreduce_",
    "allreduce_async",
    "allreduce_async_",
    "allgather",
    "allgather_async",
    "broadcast",
    "broadcast_",
    "broadcast_async",
    "broadcast_async_",
    "broadcast_object",
    "allgather_object",
    "poll",
    "barrier",
    "synchronize",
    "DistributedOptimizer",
    "broadcast_parameters",
    "broadcast_optimizer_state",
]

#: Reduction ops, as Horovod names them (``op=`` of :func:`allreduce`).
Average = "avg"
Sum = "sum"
Min = "min"
Max = "max"
Product = "prod"

_OPS = {Average, Sum, Min, Max, Product}

# Launcher variables that name this process's rank (see oxccl's config):
# with none of them set, init() makes a world of one.
_RANK_VARS = ("OXCCL_RANK", "RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.engine: Optional[FusionEngine] = None
        self.comm: Optional[Communicator] = None
        self.rank = 0
        self.size = 1
        self.local_rank = 0
        self.local_size = 1
        self.cross_rank = 0
        self.cross_size = 1
        self.generation = 0
        # The communicator of the last init() from the environment, kept
        # by shutdown() for the next init().
        self.kept: Optional[Communicator] = None
        self.reuse = False
        self.counters: Dict[str, int] = collections.defaultdict(int)


_state = _State()


def _engine() -> FusionEngine:
    e = _state.engine
    if e is None:
        raise InvalidUsage("oxccl Horovod API: call init() first")
    return e


def _torch_dist_ready() -> bool:
    d = torch.distributed
    return d.is_available() and d.is_initialized()


def _new_communicator(generation: int) -> Tuple[Communicator, bool]:
    """A communicator for :func:`init`, and whether a later :func:`init`
    may use it again (one made from the environment: a second one from
    the same launcher variables could meet a rank still tearing down the
    first one's store)."""
    if _torch_dist_ready():
        from torch.distributed import distributed_c10d as c10d

        try:
            store = c10d._get_default_store()  # private in torch, stable since 1.x
        except (AttributeError, RuntimeError) as e:
            raise UnavailableBackend(
                "init(): torch.distributed is initialised, but its default store "
                f"cannot be reached ({e}); call init() before init_process_group"
            ) from e
        comm = Communicator.from_store(
            store,
            torch.distributed.get_rank(),
            torch.distributed.get_world_size(),
            prefix=f"oxccl_horovod/{generation}/",
        )
        return comm, False
    if any(os.environ.get(v) for v in _RANK_VARS):
        return Communicator.from_env(), True
    return Communicator(UniqueId(), 0, 1), True


def _host_ranks(comm: Communicator) -> Tuple[int, int, int, int]:
    """This rank's index among the ranks of its host and their number (by
    host name, gathered over ``comm``); its index among the ranks of the same
    local rank (one per host) and their number."""
    width = 256
    mine = bytearray(width)
    name = socket.gethostname().encode()[:width]
    mine[: len(name)] = name
    every = bytearray(width * comm.world)
    comm.all_gather(mine, every)
    hosts = [bytes(every[i * width : (i + 1) * width]) for i in range(comm.world)]
    me = hosts[comm.rank]
    local = [hosts[:r].count(hosts[r]) for r in range(comm.world)]
    mine = local[comm.rank]
    return (
        local[comm.rank],
        hosts.count(me),
        local[: comm.rank].count(mine),
        local.count(mine),
    )


def init() -> None:
    """Joins this process to the job (see the module docs for how the ranks
    are found) and starts its fusion engine. Calling it again while
    initialised does nothing."""
    with _state.lock:
        if _state.engine is not None:
            return
        comm = _state.kept
        _state.kept = None
        if comm is None or _torch_dist_ready():
            comm, reusable = _new_communicator(_state.generation)
            _state.generation += 1
            _state.reuse = reusable
        local_rank, local_size, cross_rank, cross_size = _host_ranks(comm)
        engine = FusionEngine(comm)
        _state.comm = comm
        _state.engine = engine
        _state.rank = comm.rank
        _state.size = comm.world
        _state.local_rank = local_rank
        _state.local_size = local_size
        _state.cross_rank = cross_rank
        _state.cross_size = cross_size
        _state.counters.clear()


def shutdown() -> None:
    """Stops the fusion engine (on every rank: call it on all of them, after
    the last collective). :func:`init` may be called again afterwards; it
    uses the same communicator again when the first came from the
    launcher's environment."""
    with _state.lock:
        engine, _state.engine = _state.engine, None
        comm, _state.comm = _state.comm, None
        if engine is not None:
            engine.shutdown()  # gives the communicator back to `comm`
            if _state.reuse:
                _state.kept = comm


atexit.register(shutdown)


def is_initialized() -> bool:
    """Whether :func:`init` has run (and :func:`shutdown` not since)."""
    return _state.engine is not None


def rank() -> int:
    """This process's rank."""
    _engine()
    return _state.rank


def size() -> int:
    """The number of ranks."""
    _engine()
    return _state.size


def local_rank() -> int:
    """This rank's index among the ranks on its host (by host name)."""
    _engine()
    return _state.local_rank


def local_size() -> int:
    """The number of ranks on this host."""
    _engine()
    return _state.local_size


def cross_rank() -> int:
    """This rank's index among the ranks with its local rank (its host's
    index, when every host runs as many ranks)."""
    _engine()
    return _state.cross_rank


def cross_size() -> int:
    """The number of ranks with this rank's local rank (the number of hosts,
    when every host runs as many ranks)."""
    _engine()
    return _state.cross_size


def _op_of(op: Any) -> str:
    s = str(getattr(op, "value", op)).rsplit(".", 1)[-1].lower()
    if s == "average":
        s = Average
    if s == "product":
        s = Product
    if s not in _OPS:
        raise InvalidArgument(
            f"op {op!r} is not one of Average, Sum, Min, Max, Product (Adasum is not supported)"
        )
    return s


def _name(kind: str, name: Optional[str]) -> str:
    if name is None:
        n = _state.counters[kind]
        _state.counters[kind] = n + 1
        return f"{kind}.noname.{n}"
    return f"{kind}.{name}"


def _check_tensor(tensor: Any, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgument(
            f"{what}: expected a torch.Tensor, got {type(tensor).__name__}"
        )
    if tensor.is_sparse:
        raise InvalidArgument(f"{what}: sparse tensors are not supported")
    return tensor


class _Handle:
    """What the ``*_async`` functions return; pass it to :func:`synchronize`
    or :func:`poll`."""

    __slots__ = ("name", "_work", "_buf", "_finish", "_result", "_done")

    def __init__(self, name: str, work: Optional[Work], buf: Any, finish: Any) -> None:
        self.name = name
        self._work = work
        self._buf = buf
        self._finish = finish
        self._result: Any = None
        self._done = False

    def __repr__(self) -> str:
        return f"<oxccl Horovod handle of {self.name!r}>"


def _submit_inplace(kind: str, tensor: torch.Tensor, name: str, submit) -> _Handle:
    """Submits ``tensor`` (its own memory when contiguous, else a contiguous
    copy that is written back by :func:`synchronize`)."""
    t = tensor.detach()
    on_host = t.device.type == "cpu"
    if on_host and t.is_contiguous():
        return _Handle(name, submit(t), t, lambda: tensor)
    # Device tensors travel through host memory (this package's collectives
    # take host buffers); non-contiguous ones through a contiguous copy.
    buf = (
        t.contiguous()
        if on_host
        else t.to("cpu", memory_format=torch.contiguous_format)
    )

    def finish() -> torch.Tensor:
        with torch.no_grad():
            t.copy_(buf)
        return tensor

    return _Handle(name, submit(buf), buf, finish)


def _resolve_op(average: Optional[bool], op: Any) -> str:
    if average is not None and op is not None:
        raise InvalidArgument("allreduce: give op or average (deprecated), not both")
    if average is not None:
        return Average if average else Sum
    return _op_of(Average if op is None else op)


def allreduce_async_(
    tensor: torch.Tensor,
    average: Optional[bool] = None,
    name: Optional[str] = None,
    op: Any = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> _Handle:
    """Starts reducing ``tensor`` in place over all ranks under ``name``
    (``op`` Average unless given; ``average=`` is Horovod's deprecated
    spelling). The tensor is multiplied by ``prescale_factor`` before and
    by ``postscale_factor`` after the reduction."""
    _check_tensor(tensor, "allreduce")
    o = _resolve_op(average, op)
    full = _name("allreduce", name)
    e = _engine()
    if prescale_factor != 1.0:
        with torch.no_grad():
            tensor.mul_(prescale_factor)
    h = _submit_inplace(
        "allreduce", tensor, full, lambda b: e.allreduce_async(b, full, o)
    )
    if postscale_factor != 1.0:
        inner = h._finish

        def finish() -> torch.Tensor:
            out = inner()
            with torch.no_grad():
                out.mul_(postscale_factor)
            return out

        h._finish = finish
    return h


def allreduce_async(
    tensor: torch.Tensor,
    average: Optional[bool] = None,
    name: Optional[str] = None,
    op: Any = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> _Handle:
    """Starts reducing a copy of ``tensor``; :func:`synchronize` returns it."""
    _check_tensor(tensor, "allreduce")
    copy = tensor.detach().clone(memory_format=torch.contiguous_format)
    return allreduce_async_(copy, average, name, op, prescale_factor, postscale_factor)


def allreduce(
    tensor: torch.Tensor,
    average: Optional[bool] = None,
    name: Optional[str] = None,
    compression: Any = None,
    op: Any = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> torch.Tensor:
    """Returns ``tensor`` reduced over all ranks (a new tensor), as Horovod's
    ``allreduce`` (``compression``: :class:`Compression`)."""
    _check_tensor(tensor, "allreduce")
    c = compression if compression is not None else Compression.none
    wire, ctx = c.compress(tensor)
    out = synchronize(
        allreduce_async(wire, average, name, op, prescale_factor, postscale_factor)
    )
    return c.decompress(out, ctx)


def allreduce_(
    tensor: torch.Tensor,
    average: Optional[bool] = None,
    name: Optional[str] = None,
    op: Any = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> torch.Tensor:
    """Reduces ``tensor`` over all ranks in place and returns it."""
    return synchronize(
        allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor)
    )


def broadcast_async_(
    tensor: torch.Tensor, root_rank: int, name: Optional[str] = None
) -> _Handle:
    """Starts copying ``root_rank``'s ``tensor`` into every rank's, in place."""
    _check_tensor(tensor, "broadcast")
    full = _name("broadcast", name)
    e = _engine()
    return _submit_inplace(
        "broadcast", tensor, full, lambda b: e.broadcast_async(b, full, int(root_rank))
    )


def broadcast_async(
    tensor: torch.Tensor, root_rank: int, name: Optional[str] = None
) -> _Handle:
    """Starts broadcasting into a copy of ``tensor``; :func:`synchronize` returns it."""
    _check_tensor(tensor, "broadcast")
    return broadcast_async_(
        tensor.detach().clone(memory_format=torch.contiguous_format), root_rank, name
    )


def broadcast(
    tensor: torch.Tensor, root_rank: int, name: Optional[str] = None
) -> torch.Tensor:
    """Returns ``root_rank``'s ``tensor`` on every rank (a new tensor)."""
    return synchronize(broadcast_async(tensor, root_rank, name))


def broadcast_(
    tensor: torch.Tensor, root_rank: int, name: Optional[str] = None
) -> torch.Tensor:
    """Overwrites ``tensor`` with ``root_rank``'s and returns it."""
    return synchronize(broadcast_async_(tensor, root_rank, name))


def allgather_async(tensor: torch.Tensor, name: Optional[str] = None) -> _Handle:
    """Starts concatenating every rank's ``tensor`` along dimension 0; the
    first dimension may differ between ranks, the others may not. The shapes
    are exchanged first (this call waits for that), then the data."""
    _check_tensor(tensor, "allgather")
    full = _name("allgather", name)
    e = _engine()
    world = _state.size
    t = tensor.detach()
    if t.dim() == 0:
        t = t.reshape(1)
    shape = torch.tensor([t.dim(), *t.shape], dtype=torch.int64)
    width = 1 + 8  # ndim and up to 8 dimensions
    if t.dim() > 8:
        raise InvalidArgument(f"allgather of tensor '{full}': more than 8 dimensions")
    mine = torch.zeros(width, dtype=torch.int64)
    mine[: shape.numel()] = shape
    every = torch.zeros(width * world, dtype=torch.int64)
    w = e.allgather_async(mine, every, full + ".shape")
    w.wait()
    shapes = [every[i * width : (i + 1) * width] for i in range(world)]
    dims = [tuple(int(x) for x in s[1 : 1 + int(s[0])]) for s in shapes]
    if any(d[1:] != dims[0][1:] for d in dims):
        raise InvalidArgument(
            f"allgather of tensor '{full}': shapes beyond dimension 0 differ between ranks: "
            + ", ".join(f"rank {r}: {list(d)}" for r, d in enumerate(dims))
        )
    firsts = [d[0] for d in dims]
    most = max(firsts)
    rest = t.shape[1:]
    src = torch.zeros((most, *rest), dtype=t.dtype)
    src[: t.shape[0]] = t
    out = torch.empty((most * world, *rest), dtype=t.dtype)
    work = e.allgather_async(src, out, full)

    def finish() -> torch.Tensor:
        if all(f == most for f in firsts):
            return out.to(t.device)
        return torch.cat(
            [out[r * most : r * most + f] for r, f in enumerate(firsts)]
        ).to(t.device)

    return _Handle(full, work, (src, out), finish)


def allgather(tensor: torch.Tensor, name: Optional[str] = None) -> torch.Tensor:
    """Returns every rank's ``tensor`` concatenated along dimension 0."""
    return synchronize(allgather_async(tensor, name))


def barrier() -> None:
    """Returns once every rank has called it (and every collective submitted
    before it has completed here)."""
    allreduce(torch.zeros(1), name=f"barrier.{_state.counters['barrier']}", op=Sum)
    _state.counters["barrier"] += 1
    _engine().synchronize()


def poll(handle: _Handle) -> bool:
    """Whether ``handle``'s operation has completed."""
    return handle._done or handle._work is None or handle._work.is_completed()


def synchronize(handle: _Handle) -> torch.Tensor:
    """Waits for ``handle``'s operation and returns its result; raises its
    oxccl exception if it failed."""
    if not isinstance(handle, _Handle):
        raise InvalidArgument(f"synchronize: not a handle: {handle!r}")
    if handle._done:
        return handle._result
    if handle._work is not None:
        if not handle._work.is_completed():
            # Waiting: the engine's next cycles need not wait for the timer.
            _engine().flush()
        # The engine's own deadline (OXCCL_TIMEOUT) bounds this wait.
        handle._work.wait()
    handle._result = handle._finish()
    handle._done = True
    handle._work = None
    handle._buf = None
    return handle._result


def broadcast_object(
    obj: Any = None, root_rank: int = 0, name: Optional[str] = None
) -> Any:
    """Returns ``root_rank``'s ``obj`` (pickled) on every rank."""
    base = name if name is not None else f"object.{_state.counters['broadcast_object']}"
    if name is None:
        _state.counters["broadcast_object"] += 1
    data = pickle.dumps(obj) if _state.rank == root_rank else b""
    n = torch.tensor([len(data)], dtype=torch.int64)
    broadcast_(n, root_rank, f"{base}.len")
    buf = torch.zeros(int(n.item()), dtype=torch.uint8)
    if _state.rank == root_rank:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    if buf.numel():
        broadcast_(buf, root_rank, f"{base}.data")
    if _state.rank == root_rank:
        return obj
    return pickle.load(io.BytesIO(buf.numpy().tobytes()))


def allgather_object(obj: Any, name: Optional[str] = None) -> List[Any]:
    """Returns every rank's ``obj`` (pickled), in rank order."""
    base = name if name is not None else f"object.{_state.counters['allgather_object']}"
    if name is None:
        _state.counters["allgather_object"] += 1
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = allgather(torch.tensor([data.numel()], dtype=torch.int64), f"{base}.len")
    every = allgather(data, f"{base}.data")
    out, at = [], 0
    for n in sizes.tolist():
        out.append(pickle.load(io.BytesIO(every[at : at + n].numpy().tobytes())))
        at += n
    return out


def broadcast_parameters(params: Any, root_rank: int) -> None:
    """Overwrites every rank's parameters with ``root_rank``'s, in place.

    ``params`` is a ``state_dict()`` (a mapping of name to tensor) or an
    iterable of ``(name, tensor)`` such as ``model.named_parameters()``.
    """
    if isinstance(params, dict):
        items = sorted(params.items())
    elif isinstance(params, collections.abc.Mapping):
        items = sorted(dict(params).items())
    else:
        items = list(params)
        if not all(isinstance(p, tuple) and len(p) == 2 for p in items):
            raise InvalidArgument(
                "broadcast_parameters: params must be a state_dict or (name, tensor) pairs"
            )
    handles = []
    for name, p in items:
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise InvalidArgument(f"broadcast_parameters: '{name}' is not a tensor")
        handles.append(broadcast_async_(p, root_rank, f"parameter.{name}"))
    for h in handles:
        synchronize(h)


class _TensorSlot:
    """Stands for a tensor in the pickled skeleton of an optimizer state."""

    __slots__ = ("index", "shape", "dtype")

    def __init__(self, index: int, shape: Tuple[int, ...], dtype: torch.dtype) -> None:
        self.index = index
        self.shape = shape
        self.dtype = dtype


def _strip(obj: Any, tensors: List[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _TensorSlot(len(tensors) - 1, tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return {k: _strip(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strip(v, tensors) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_strip(v, tensors) for v in obj)
    return obj


def _fill(obj: Any, tensors: List[torch.Tensor]) -> Any:
    if isinstance(obj, _TensorSlot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, tensors) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_fill(v, tensors) for v in obj)
    return obj


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int) -> None:
    """Makes every rank's ``optimizer`` state (its per-parameter tensors
    such as momentum buffers, scalars such as step counts, and every
    param-group setting such as ``lr``) equal to ``root_rank``'s.

    The state's structure and scalars travel pickled from ``root_rank``;
    its tensors travel as tensors. Every rank's optimizer must hold the same
    parameters in the same groups.
    """
    n = _state.counters["broadcast_optimizer_state"]
    _state.counters["broadcast_optimizer_state"] = n + 1
    base = f"optimizer_state.{n}"
    tensors: List[torch.Tensor] = []
    skeleton = (
        _strip(optimizer.state_dict(), tensors) if _state.rank == root_rank else None
    )
    skeleton = broadcast_object(skeleton, root_rank, f"{base}.skeleton")
    if _state.rank != root_rank:
        slots: List[_TensorSlot] = []

        def collect(o: Any) -> None:
            if isinstance(o, _TensorSlot):
                slots.append(o)
            elif isinstance(o, dict):
                for v in o.values():
                    collect(v)
            elif isinstance(o, (list, tuple)):
                for v in o:
                    collect(v)

        collect(skeleton)
        slots.sort(key=lambda s: s.index)
        tensors = [torch.empty(s.shape, dtype=s.dtype) for s in slots]
    # The root's own tensors are sent from copies, so that its optimizer is
    # not written to while the broadcast runs.
    bufs = [t.detach().to("cpu", copy=True).contiguous() for t in tensors]
    handles = [
        broadcast_async_(b, root_rank, f"{base}.tensor.{i}") for i, b in enumerate(bufs)
    ]
    for h in handles:
        synchronize(h)
    if _state.rank != root_rank:
        optimizer.load_state_dict(_fill(skeleton, bufs))


class Compression:
    """Gradient compression for :func:`DistributedOptimizer`, as Horovod's."""

    class none:  # noqa: N801 (Horovod's name)
        """No compression."""

        @staticmethod
        def compress(tensor: torch.Tensor) -> Tuple[torch.Tensor, Any]:
            return tensor, None

        @staticmethod
        def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
            return tensor

    class fp16:  # noqa: N801 (Horovod's name)
        """Floating-point gradients travel as float16."""

        @staticmethod
        def compress(tensor: torch.Tensor) -> Tuple[torch.Tensor, Any]:
            if tensor.dtype.is_floating_point:
                return tensor.to(torch.float16), tensor.dtype
            return tensor, None

        @staticmethod
        def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
            return tensor.to(ctx) if ctx is not None else tensor


#: DistributedOptimizer gathers gradients (on the host, contiguous) as their
#: hooks fire and hands them to the engine in one call once they reach this
#: many bytes, and the rest at :meth:`synchronize`: one crossing into the
#: engine, one :class:`Work` and one wait per group rather than per
#: gradient. Each gradient keeps its own name in the engine (negotiated,
#: fused, reduced as an ``allreduce_async_`` of it would be); a group only
#: delays a gradient's submission until the group fills or the step ends,
#: as DDP's buckets do (whose first is 1 MiB too).
_GROUP_BYTES = 1 << 20


class _DistributedOptimizer:
    """Methods mixed into the optimizer's class by :func:`DistributedOptimizer`."""

    def _hvd_setup(
        self,
        named_parameters: Optional[Iterable[Tuple[str, torch.Tensor]]],
        compression: Any,
        op: str,
        backward_passes_per_step: int,
        gradient_predivide_factor: float,
        sparse_as_dense: bool,
    ) -> None:
        all_params = [p for g in self.param_groups for p in g["params"]]
        if named_parameters is not None:
            named = list(named_parameters)
            if not all(isinstance(x, tuple) and len(x) == 2 for x in named):
                raise InvalidArgument(
                    "DistributedOptimizer: named_parameters must be (name, parameter) pairs, "
                    "such as model.named_parameters()"
                )
        else:
            named = [
                (f"noname.{i}.{j}", p)
                for i, g in enumerate(self.param_groups)
                for j, p in enumerate(g["params"])
            ]
        names = [n for n, _ in named]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise InvalidArgument(
                f"DistributedOptimizer: parameter names are not unique: {', '.join(dups)}"
            )
        by_param = {id(p): n for n, p in named}
        unnamed = [p for p in all_params if id(p) not in by_param]
        if unnamed:
            raise InvalidArgument(
                f"DistributedOptimizer: named_parameters was given, but {len(unnamed)} of the "
                "optimizer's parameters are not in it"
            )
        if backward_passes_per_step < 1:
            raise InvalidArgument(
                "DistributedOptimizer: backward_passes_per_step must be >= 1"
            )
        if gradient_predivide_factor != 1.0 and op != Average:
            raise InvalidArgument(
                "DistributedOptimizer: gradient_predivide_factor needs op=Average"
            )
        # Horovod's split of the average: gradients are divided by the factor
        # before the sum and the (sum / size) multiplied by it after.
        self._hvd_prescale = 1.0 / gradient_predivide_factor
        self._hvd_postscale = float(gradient_predivide_factor)
        self._hvd_sparse_as_dense = bool(sparse_as_dense)
        self._hvd_names = {id(p): by_param[id(p)] for p in all_params}
        # The engine's names of the gradients (Horovod's).
        self._hvd_wire_names = {k: "allreduce." + n for k, n in self._hvd_names.items()}
        self._hvd_op = op
        self._hvd_compression = compression
        self._hvd_passes_per_step = backward_passes_per_step
        self._hvd_passes: Dict[int, int] = {}
        # This step's gradients, submitted or gathered: parameter, what
        # travels (the gradient, or its compressed copy), compression context.
        self._hvd_pending: Dict[int, Tuple[torch.Tensor, torch.Tensor, Any]] = {}
        # Gathered and not yet handed to the engine (see _GROUP_BYTES).
        self._hvd_group: List[Tuple[torch.Tensor, torch.Tensor, Any]] = []
        self._hvd_group_names: List[str] = []
        self._hvd_group_bytes = 0
        # Handed to the engine: a Work (a group) or a _Handle (one tensor
        # through a host or contiguous copy), with its gradients.
        self._hvd_inflight: List[Tuple[Any, List[Tuple[torch.Tensor, torch.Tensor, Any]]]] = []
        self._hvd_requires = [p for p in all_params if p.requires_grad]
        self._hvd_skip_sync = False
        self._hvd_synchronized = False
        self._hvd_hooks = [
            p.register_post_accumulate_grad_hook(self._hvd_hook)
            for p in self._hvd_requires
        ]

    def _hvd_submit(self, p: torch.Tensor) -> None:
        # Runs once per gradient per step, from backward's hooks: kept to
        # few tensor attribute reads (each is a call into torch).
        key = id(p)
        grad = p.grad
        if grad is None:
            grad = p.grad = torch.zeros_like(p)
        if grad.is_sparse:
            if not self._hvd_sparse_as_dense:
                raise InvalidArgument(
                    f"DistributedOptimizer: the gradient of '{self._hvd_names[key]}' is "
                    "sparse; pass sparse_as_dense=True to reduce it as a dense tensor"
                )
            grad = p.grad = grad.to_dense()
        if self._hvd_compression is Compression.none:
            wire, ctx = grad, None
        else:
            wire, ctx = self._hvd_compression.compress(grad)
            if wire is not grad:
                wire = wire.contiguous()
        self._hvd_pending[key] = (p, wire, ctx)
        if not wire.is_cpu or not wire.is_contiguous():
            # Through a host or contiguous copy, alone (allreduce_async_).
            h = allreduce_async_(
                wire,
                name=self._hvd_names[key],
                op=self._hvd_op,
                prescale_factor=self._hvd_prescale,
                postscale_factor=self._hvd_postscale,
            )
            self._hvd_inflight.append((h, [(p, wire, ctx)]))
            return
        if self._hvd_prescale != 1.0:
            with torch.no_grad():
                wire.mul_(self._hvd_prescale)
        self._hvd_group.append((p, wire, ctx))
        self._hvd_group_names.append(self._hvd_wire_names[key])
        self._hvd_group_bytes += wire.nbytes
        if self._hvd_group_bytes >= _GROUP_BYTES:
            self._hvd_send_group()

    def _hvd_send_group(self) -> None:
        """Hands the gradients gathered so far to the engine in one call
        (each under its own name, as one allreduce_async_ each would)."""
        if not self._hvd_group:
            return
        group, names = self._hvd_group, self._hvd_group_names
        self._hvd_group, self._hvd_group_names, self._hvd_group_bytes = [], [], 0
        # DLPack capsules rather than the tensors: one C call each, where the
        # engine's export of a tensor runs __dlpack__ and __dlpack_device__
        # in Python (3 us a gradient, most of a group's submission).
        work = _engine().allreduce_group_async(
            [_to_dlpack(w) for _, w, _ in group], names, self._hvd_op
        )
        self._hvd_inflight.append((work, group))

    def _hvd_hook(self, p: torch.Tensor) -> None:
        key = id(p)
        n = self._hvd_passes.get(key, 0) + 1
        self._hvd_passes[key] = n
        if key in self._hvd_pending:
            raise InvalidUsage(
                f"DistributedOptimizer: the gradient of '{self._hvd_names[key]}' was computed "
                f"more than backward_passes_per_step={self._hvd_passes_per_step} times before "
                "step() or synchronize(); raise backward_passes_per_step to accumulate"
            )
        if n == self._hvd_passes_per_step:
            self._hvd_submit(p)

    def synchronize(self) -> None:
        """Waits for every gradient's allreduce (submitting those whose hook
        did not fire this step, such as unused parameters' zero gradients,
        so that every rank submits the same names)."""
        for p in self._hvd_requires:
            if id(p) not in self._hvd_pending:
                self._hvd_submit(p)
        self._hvd_send_group()
        inflight, self._hvd_inflight = self._hvd_inflight, []
        self._hvd_pending = {}
        self._hvd_passes = {}
        if inflight:
            # Every gradient of the step is submitted: cycles at once from
            # here, not at the cycle timer.
            _engine().flush()
        first: Optional[BaseException] = None
        post = self._hvd_postscale
        for w, group in inflight:
            try:
                if isinstance(w, _Handle):
                    outs = [synchronize(w)]  # applies the postscale itself
                else:
                    # The engine's own deadline (OXCCL_TIMEOUT) bounds this wait.
                    w.wait()
                    outs = [wire for _, wire, _ in group]
                    if post != 1.0:
                        with torch.no_grad():
                            torch._foreach_mul_(outs, post)
            except BaseException as e:  # wait for the others before raising
                first = first or e
                continue
            for (p, _, ctx), out in zip(group, outs):
                if out is not p.grad:
                    with torch.no_grad():
                        p.grad.copy_(self._hvd_compression.decompress(out, ctx))
        if first is not None:
            raise first
        self._hvd_synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Within it, :meth:`step` does not synchronize (call
        :meth:`synchronize` yourself first, e.g. to clip the reduced
        gradients)."""
        self._hvd_skip_sync = True
        try:
            yield
        finally:
            self._hvd_skip_sync = False

    def step(self, closure=None):  # noqa: D102 (the wrapped optimizer's)
        if not self._hvd_skip_sync:
            if self._hvd_synchronized and not self._hvd_pending and not self._hvd_inflight:
                pass  # synchronize() already ran for this step
            else:
                self.synchronize()
        self._hvd_synchronized = False
        return self._hvd_base.step(self, closure)

    # The base class's step already runs the optimizer's step hooks (torch
    # wraps it once): this tells torch's _patch_step_function (which
    # load_state_dict calls) not to wrap this one too.
    step.hooked = True  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        if self._hvd_pending or self._hvd_inflight:
            raise InvalidUsage(
                "DistributedOptimizer: zero_grad() was called after backward() but before "
                "step() or synchronize(); the gradients' allreduces are still in flight"
            )
        return self._hvd_base.zero_grad(self, set_to_none)


def DistributedOptimizer(  # noqa: N802 (Horovod's name)
    optimizer: torch.optim.Optimizer,
    named_parameters: Optional[Iterable[Tuple[str, torch.Tensor]]] = None,
    compression: Any = Compression.none,
    backward_passes_per_step: int = 1,
    op: Any = Average,
    gradient_predivide_factor: float = 1.0,
    sparse_as_dense: bool = False,
) -> torch.optim.Optimizer:
    """Wraps ``optimizer`` so that each gradient is allreduced (``op``,
    Average by default) through the fusion engine once backward has
    accumulated it (gathered in groups of ``_GROUP_BYTES`` as the hooks
    fire, each still reduced under its own name), and :meth:`step` waits
    for them before the wrapped optimizer's step.

    The result is an instance of a subclass of ``optimizer``'s class sharing
    its parameter groups and state (LR schedulers and ``state_dict`` work as
    usual). Gradients are named ``allreduce.<name>`` after
    ``named_parameters`` (``allreduce.noname.<group>.<index>`` without it);
    every rank must use the same names. With ``backward_passes_per_step=k``,
    gradients accumulate locally over ``k`` backward passes and are reduced
    on the ``k``-th. ``gradient_predivide_factor`` and ``sparse_as_dense``
    are Horovod's (``groups``, ``process_set`` and Adasum are not
    supported).
    """
    _engine()
    if not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
        raise UnavailableBackend(
            f"DistributedOptimizer needs torch >= 2.1 (register_post_accumulate_grad_hook); "
            f"this is torch {torch.__version__}"
        )
    if isinstance(optimizer, _DistributedOptimizer):
        raise InvalidUsage("DistributedOptimizer: the optimizer is already distributed")
    base = optimizer.__class__
    cls = type(base.__name__, (_DistributedOptimizer, base), {"_hvd_base": base})
    dist = cls.__new__(cls)
    dist.__dict__.update(optimizer.__dict__)
    dist._hvd_setup(
        named_parameters,
        compression,
        _op_of(op),
        int(backward_passes_per_step),
        float(gradient_predivide_factor),
        sparse_as_dense,
    )
    return dist
