"""Type stubs of the native module ``oxccl._oxccl`` (re-exported by ``oxccl``)."""

from typing import Any, List, Optional, Sequence, Tuple, Union, final

#: A buffer: any C-contiguous object with ``__dlpack__`` (torch CPU tensors,
#: numpy arrays) or the buffer protocol (numpy, bytearray, memoryview,
#: array.array), of dtype int8, uint8, int32, uint32, int64, uint64, float16,
#: bfloat16 (DLPack only), float32 or float64.
_Buffer = Any
#: "sum" | "prod" | "min" | "max" | "avg", or an ``oxccl.ReduceOp``.
_Op = str

__version__: str
#: Whether this build takes CUDA tensors (it does not: host memory only).
HAS_CUDA: bool
__all__ = [
    "Error",
    "InvalidArgument",
    "InvalidUsage",
    "SystemFailure",
    "RemoteError",
    "Timeout",
    "UnavailableBackend",
    "InternalError",
    "Aborted",
    "UniqueId",
    "Communicator",
    "Work",
    "FusionEngine",
    "_check_input",
    "_check_count_wrong",
    "_names",
    "_check_uneven",
    "_check_uneven_wrong",
    "__version__",
    "HAS_CUDA",
]

class Error(RuntimeError):
    """Every error oxccl raises. Subclasses follow oxccl's error kind."""

class InvalidArgument(Error, ValueError):
    """A bad argument: wrong sizes or dtypes, a rank out of range, a bad setting."""

class InvalidUsage(Error):
    """A valid call at the wrong time, or ranks that disagree on a call."""

class SystemFailure(Error, OSError):
    """The operating system failed a call (sockets, files, shared memory)."""

class RemoteError(Error):
    """A peer failed: it died, closed its links or reported an error. The message names it."""

class Timeout(Error, TimeoutError):
    """A deadline passed (OXCCL_TIMEOUT)."""

class UnavailableBackend(Error):
    """The requested backend or device memory is not available in this build."""

class InternalError(Error):
    """A bug in oxccl."""

class Aborted(Error):
    """The communicator was aborted or poisoned by an earlier failure."""

@final
class UniqueId:
    """A store address, a job id and the job's secret: ``UniqueId()`` serves
    the store from this process; hand ``to_bytes()`` to the other ranks."""

    def __new__(cls) -> "UniqueId": ...
    def to_bytes(self) -> bytes: ...
    @staticmethod
    def from_bytes(b: bytes) -> "UniqueId": ...

@final
class Work:
    """The handle of an asynchronous call; its buffers stay alive until it completes."""

    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once completed; False if ``timeout`` seconds passed first;
        raises the call's oxccl exception if it failed."""
    def is_completed(self) -> bool: ...
    def exception(self) -> Optional[BaseException]: ...

@final
class Communicator:
    """A rank's place in a world of ranks. Calls run in the order they are
    made, sync and async alike; the GIL is released while they run."""

    def __new__(cls, unique_id: UniqueId, rank: int, world: int) -> "Communicator": ...
    @staticmethod
    def from_env() -> "Communicator":
        """From the launcher's environment (oxrun, torchrun, mpirun, srun)."""
    @staticmethod
    def from_store(
        store: Any,
        rank: int,
        world: int,
        prefix: str = "",
        secret: Optional[Union[str, bytes]] = None,
    ) -> "Communicator":
        """Through a store with set/get/add (and optionally check), such as a
        ``torch.distributed.Store``; keys go under ``prefix``. ``secret`` (the
        same on every rank) authenticates the connections, overriding
        ``OXCCL_JOB_SECRET``."""
    @property
    def rank(self) -> int: ...
    @property
    def world(self) -> int: ...
    def all_reduce(self, buf: _Buffer, op: _Op = "sum", out: Optional[_Buffer] = None) -> None: ...
    def all_reduce_async(self, buf: _Buffer, op: _Op = "sum", out: Optional[_Buffer] = None) -> Work: ...
    def broadcast(self, buf: _Buffer, root: int, out: Optional[_Buffer] = None) -> None: ...
    def broadcast_async(self, buf: _Buffer, root: int, out: Optional[_Buffer] = None) -> Work: ...
    def reduce(self, buf: _Buffer, root: int, op: _Op = "sum", out: Optional[_Buffer] = None) -> None: ...
    def reduce_async(
        self, buf: _Buffer, root: int, op: _Op = "sum", out: Optional[_Buffer] = None
    ) -> Work: ...
    def all_gather(self, input: _Buffer, output: _Buffer) -> None: ...
    def all_gather_async(self, input: _Buffer, output: _Buffer) -> Work: ...
    def reduce_scatter(self, input: _Buffer, output: _Buffer, op: _Op = "sum") -> None: ...
    def reduce_scatter_async(self, input: _Buffer, output: _Buffer, op: _Op = "sum") -> Work: ...
    def barrier(self) -> None: ...
    def barrier_async(self) -> Work: ...
    def send(self, buf: _Buffer, peer: int) -> None: ...
    def send_async(self, buf: _Buffer, peer: int) -> Work: ...
    def recv(self, buf: _Buffer, peer: int) -> None: ...
    def recv_async(self, buf: _Buffer, peer: int) -> Work: ...
    def batch(self, ops: Sequence[Tuple[str, _Buffer, int]]) -> None:
        """``[("send", buf, peer), ("recv", buf, peer), ...]`` run together (NCCL group semantics)."""
    def batch_async(self, ops: Sequence[Tuple[str, _Buffer, int]]) -> Work: ...
    def all_to_all(self, input: _Buffer, output: _Buffer) -> None: ...
    def all_to_all_async(self, input: _Buffer, output: _Buffer) -> Work: ...
    def all_to_all_v(
        self,
        input: _Buffer,
        send_counts: Sequence[int],
        send_displs: Sequence[int],
        output: _Buffer,
        recv_counts: Sequence[int],
        recv_displs: Sequence[int],
    ) -> None: ...
    def all_to_all_v_async(
        self,
        input: _Buffer,
        send_counts: Sequence[int],
        send_displs: Sequence[int],
        output: _Buffer,
        recv_counts: Sequence[int],
        recv_displs: Sequence[int],
    ) -> Work: ...
    def gather(self, input: _Buffer, output: Optional[_Buffer], root: int) -> None: ...
    def gather_async(self, input: _Buffer, output: Optional[_Buffer], root: int) -> Work: ...
    def scatter(self, input: Optional[_Buffer], output: _Buffer, root: int) -> None: ...
    def scatter_async(self, input: Optional[_Buffer], output: _Buffer, root: int) -> Work: ...
    def all_gather_v(self, input: _Buffer, output: _Buffer, counts: Sequence[int]) -> None: ...
    def all_gather_v_async(self, input: _Buffer, output: _Buffer, counts: Sequence[int]) -> Work: ...
    def reduce_scatter_v(
        self, input: _Buffer, output: _Buffer, counts: Sequence[int], op: _Op = "sum"
    ) -> None: ...
    def reduce_scatter_v_async(
        self, input: _Buffer, output: _Buffer, counts: Sequence[int], op: _Op = "sum"
    ) -> Work: ...
    def split(self, color: Optional[int], key: int = 0) -> Optional["Communicator"]: ...
    def shrink(self, exclude: Sequence[int] = ...) -> "Communicator": ...
    def abort(self) -> None: ...

@final
class FusionEngine:
    """Horovod-style named tensors over oxccl's fusion engine; holds ``comm``
    until :meth:`shutdown`."""

    def __new__(cls, comm: Communicator) -> "FusionEngine": ...
    def allreduce_async(self, buf: _Buffer, name: str, op: _Op = "sum") -> Work: ...
    def allreduce_group_async(
        self, bufs: Sequence[_Buffer], names: Sequence[str], op: _Op = "sum"
    ) -> Work: ...
    def broadcast_async(self, buf: _Buffer, name: str, root: int) -> Work: ...
    def allgather_async(self, input: _Buffer, output: _Buffer, name: str) -> Work: ...
    def flush(self) -> None: ...
    def synchronize(self) -> None: ...
    def shutdown(self) -> None: ...

def _check_input(
    kind: str, dtype: str, op: str, root: int, count: int, world: int, rank: int
) -> bytes: ...
def _check_count_wrong(
    kind: str, dtype: str, op: str, root: int, count: int, world: int, rank: int, output: _Buffer
) -> int: ...
def _names() -> Tuple[List[str], List[str], List[str]]: ...

def _check_uneven(
    kind: str, dtype: str, op: str, count: int, world: int, rank: int
) -> Tuple[bytes, List[int], List[List[int]], int]: ...
def _check_uneven_wrong(
    kind: str, dtype: str, op: str, count: int, world: int, rank: int, output: _Buffer
) -> int: ...
