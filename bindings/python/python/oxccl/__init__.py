"""oxccl: collective communication for distributed training.

A :class:`Communicator` joins this process (or thread) to a world of ranks;
its collectives (allreduce, broadcast, reduce, allgather, reduce-scatter,
alltoall, gather, scatter, send/recv, barrier) run over shared memory between
ranks of one host and TCP between hosts, on numpy arrays, torch CPU tensors
and any C-contiguous object with ``__dlpack__`` or the buffer protocol,
without copying. The GIL is released during every call. ``*_async`` variants
return a :class:`Work`; calls on one communicator run in the order they were
made.

Errors are :class:`Error` subclasses by kind (:class:`InvalidArgument`,
:class:`RemoteError`, :class:`Timeout`, ...) whose message is oxccl's,
naming the rank, the call and the peer.
"""

from enum import Enum

from ._oxccl import (
    HAS_CUDA,
    Aborted,
    Communicator,
    Error,
    FusionEngine,
    InternalError,
    InvalidArgument,
    InvalidUsage,
    RemoteError,
    SystemFailure,
    Timeout,
    UnavailableBackend,
    UniqueId,
    Work,
    __version__,
)


class ReduceOp(str, Enum):
    """Reduction operations; each is its name as a string (``"sum"`` ...)."""

    SUM = "sum"
    PROD = "prod"
    MIN = "min"
    MAX = "max"
    AVG = "avg"

    def __str__(self) -> str:
        return self.value


__all__ = [
    "HAS_CUDA",
    "Aborted",
    "Communicator",
    "Error",
    "FusionEngine",
    "InternalError",
    "InvalidArgument",
    "InvalidUsage",
    "ReduceOp",
    "RemoteError",
    "SystemFailure",
    "Timeout",
    "UnavailableBackend",
    "UniqueId",
    "Work",
    "__version__",
]
