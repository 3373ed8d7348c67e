"""The torch.distributed backend ``"oxccl"``.

``import oxccl.torch`` registers the backend; then ``dist.init_process_group("oxccl")``
works under ``torchrun`` (or with any ``init_method``/``store`` torch accepts) and every
``dist.*`` collective, ``dist.new_group`` subgroups, DDP and FSDP2 (``fully_shard``) run
over oxccl. Horovod's API (``DistributedOptimizer`` ...) is re-exported here from
``oxccl._horovod``.

Design:

* The process group is a Python subclass of ``torch.distributed.ProcessGroup`` (torch's
  ``PyProcessGroup`` trampoline), so calls made from Python (``dist.all_reduce`` ...) return
  this module's :class:`Work` itself, with a working ``is_completed()``/``exception()``,
  and calls made from C++ (DDP's reducer) reach the same methods through the trampoline.
* It bootstraps through the store torch hands to the backend (for subgroups a prefixed
  store), with :meth:`oxccl.Communicator.from_store`; no other port or setting.
* ``async_op=True`` (and every call DDP makes) issues the bindings' ``*_async`` operation,
  which runs on oxccl's per-communicator worker thread; a completion thread per process
  group waits for them in order, finishes the output copies some operations need, and
  completes the :class:`Work` and its ``torch.futures.Future``. Synchronous calls run
  in the calling thread (the GIL is released inside oxccl).
* oxccl failures of the job (a dead or failing peer, a timeout, an aborted communicator)
  surface as ``torch.distributed.DistBackendError`` whose message is oxccl's (it names
  the rank, the call and the peer); invalid arguments stay ``ValueError``/``TypeError``.

* Calls on one group run in the order they were made (oxccl's rule, as on one NCCL
  stream): a pending ``irecv`` holds back the calls issued after it. ``isend``/``irecv``
  calls made one after another are held back and issued as one oxccl batch (NCCL group
  semantics) when one of their Works is looked at, another call is made, or 2 ms pass.
* One exception to the error class: inside DDP's ``backward()`` the pending gradient
  allreduce's failure reaches Python as ``RuntimeError("... DistBackendError: oxccl:
  ...")``, because torch passes a Python backend's future error to its C++ reducer only
  that way (see :meth:`Work.get_future`).

Not supported (each raises a clear error): receiving from any source
(``dist.recv(src=None)``), ``ReduceOp.PREMUL_SUM``/``BAND``/``BOR``/``BXOR``, reductions
on dtypes oxccl does not reduce (bool, int16, complex with ops other than SUM/AVG).
CUDA tensors are registered only when the bindings say ``oxccl.HAS_CUDA``.
"""

from __future__ import annotations

import atexit
import datetime
import os
import queue
import secrets
import threading
import time
import weakref
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

import oxccl as _ox

__all__ = ["BACKEND_NAME", "ProcessGroupOxccl", "Work"]

BACKEND_NAME = "oxccl"

_RED = ReduceOp.RedOpType
_OP_NAMES = {
    _RED.SUM: "sum",
    _RED.PRODUCT: "prod",
    _RED.MIN: "min",
    _RED.MAX: "max",
    _RED.AVG: "avg",
}

# Dtypes oxccl reduces (kernels' DType); data movement works on any dtype (sent as bytes).
_REDUCIBLE = {
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
}
for _name in ("uint32", "uint64"):
    if hasattr(torch, _name):
        _REDUCIBLE.add(getattr(torch, _name))


# --------------------------------------------------------------------------- errors


def _convert(exc: BaseException) -> BaseException:
    """Maps an oxccl exception onto what torch's callers expect."""
    if isinstance(exc, dist.DistBackendError):
        return exc
    if isinstance(exc, _ox.InvalidArgument):
        return exc  # a ValueError: the caller's mistake, not the job's
    if isinstance(exc, _ox.Error):
        err = dist.DistBackendError(f"oxccl: {exc}")
        err.__cause__ = exc
        return err
    return exc


def _reduce_op(op: Any, dtype: torch.dtype | None = None) -> str:
    kind = op.op if hasattr(op, "op") else op
    name = _OP_NAMES.get(kind)
    if name is None:
        raise ValueError(
            f"oxccl backend: reduce op {kind} is not supported (supported: SUM, AVG, PRODUCT, MIN, MAX)"
        )
    return name


def _timedelta_seconds(timeout: Any) -> float | None:
    """None or a zero/negative timedelta (torch's "no timeout") -> None."""
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        secs = timeout.total_seconds()
    else:
        secs = float(timeout)
    return secs if secs > 0 else None


# --------------------------------------------------------------------------- buffers


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor seen as flat bytes (for operations that only move data)."""
    flat = t.reshape(-1)
    if flat.dtype == torch.uint8:
        return flat
    if flat.dtype.is_complex:
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    return flat.view(torch.uint8)


def _reducible(t: torch.Tensor, op: str) -> torch.Tensor:
    """The flat tensor oxccl reduces for ``t`` (complex as real pairs for sum/avg)."""
    if t.dtype in _REDUCIBLE and t.dim() == 1:
        return t  # the common case, without making a view
    flat = t.reshape(-1)
    if flat.dtype.is_complex:
        if op not in ("sum", "avg"):
            raise TypeError(f"oxccl backend: {op} on complex tensors is not defined")
        return torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool and op in ("min", "max"):
        return flat.view(torch.uint8)
    if flat.dtype not in _REDUCIBLE:
        raise TypeError(
            f"oxccl backend: cannot reduce dtype {flat.dtype} "
            f"(oxccl reduces {sorted(str(d) for d in _REDUCIBLE)})"
        )
    return flat


class _Staged:
    """A contiguous stand-in for a tensor that may not be; copied back after the call."""

    def __init__(self, t: torch.Tensor, copy_in: bool = True):
        self.orig = t
        if t.is_contiguous():
            self.buf = t
            self.copy_back = False
        else:
            self.buf = (
                t.contiguous() if copy_in else torch.empty_like(t, memory_format=torch.contiguous_format)
            )
            self.copy_back = True

    def finish(self) -> None:
        if self.copy_back:
            self.orig.copy_(self.buf)


# --------------------------------------------------------------------------- work


class Work(dist._Work):
    """Completion of one backend call (``torch.distributed.Work`` semantics).

    ``wait(timeout)`` returns True once complete and raises the call's error
    (``DistBackendError`` for a failure of the job); with a positive ``timeout`` that
    passes first it raises ``DistBackendError`` too (the call stays pending).
    """

    def __init__(self, pg: "ProcessGroupOxccl", name: str, outputs: list, done: bool = False):
        super().__init__()
        self._pg = pg
        self._name = name
        self._outputs = outputs
        self._exc: BaseException | None = None
        self._source = -1
        # A call completed before its Work exists (the synchronous path) needs no lock,
        # event or future until someone asks: the 4-byte all_reduce stays cheap.
        self._is_done = done
        self._event: threading.Event | None = None if done else threading.Event()
        self._lock = None if done else threading.Lock()
        self._future: torch.futures.Future | None = None
        self._public_future: torch.futures.Future | None = None
        # set for an isend/irecv still held back to be batched with the next ones
        self._flush: Callable[[], None] | None = None

    def _issue(self) -> None:
        if self._flush is not None:
            self._flush()

    def _describe(self) -> str:
        return f"{self._name} on oxccl group rank {self._pg._rank} of {self._pg._size}"

    # called once, by the completion thread (async calls)
    def _finish(self, exc: BaseException | None = None) -> None:
        assert self._lock is not None and self._event is not None
        with self._lock:
            self._exc = exc
            self._is_done = True
            fut = self._future
        self._event.set()
        if fut is not None:
            self._complete_future(fut)

    def _complete_future(self, fut: torch.futures.Future) -> None:
        if self._exc is None:
            fut.set_result(self._outputs)
        else:
            fut.set_exception(self._exc)

    def wait(self, timeout: Any = None) -> bool:
        self._issue()
        if not self._is_done:
            assert self._event is not None
            secs = _timedelta_seconds(timeout)
            limit = secs if secs is not None else self._pg._timeout_s
            if not self._event.wait(limit):
                raise dist.DistBackendError(
                    f"oxccl: {self._describe()} did not complete within {limit:.3f} s "
                    f"({'the timeout passed to wait' if secs is not None else 'the process group timeout'})"
                )
        if self._exc is not None:
            raise self._exc
        return True

    def synchronize(self) -> None:
        self.wait()

    def is_completed(self) -> bool:
        self._issue()
        return self._is_done

    def is_success(self) -> bool:
        return self._is_done and self._exc is None

    def exception(self) -> BaseException | None:
        self._issue()
        return self._exc

    def result(self) -> list:
        self.wait()
        return self._outputs

    def source_rank(self) -> int:
        return self._source

    def get_future(self) -> torch.futures.Future:
        """A future completed with the output tensors.

        An error set with ``Future.set_exception`` crashes DDP's reducer when it reads the
        value from C++ (torch 2.15: segfault); an error raised by a ``then`` callback
        reaches C++ as a plain ``std::runtime_error``, safely. So the future handed out is
        chained: on failure it raises ``RuntimeError("... DistBackendError: oxccl: ...")``
        where ``wait()`` raises ``DistBackendError`` itself.
        """
        self._issue()
        if self._public_future is not None:
            return self._public_future
        fut = torch.futures.Future()
        public = fut.then(_value)
        if self._lock is None:
            self._future, self._public_future = fut, public
            self._complete_future(fut)
            return public
        with self._lock:
            if self._public_future is not None:
                return self._public_future
            self._future, self._public_future = fut, public
            done = self._is_done
        if done:
            self._complete_future(fut)
        return public


def _value(fut: torch.futures.Future) -> Any:
    return fut.value()


def _completed(pg: "ProcessGroupOxccl", name: str, outputs: list) -> Work:
    return Work(pg, name, outputs, done=True)


# --------------------------------------------------------------------------- the group

_Step = Callable[[bool], Any]  # step(async_) -> oxccl Work (async) or None (sync)


class ProcessGroupOxccl(dist.ProcessGroup):
    """A torch.distributed process group over one :class:`oxccl.Communicator`."""

    def __init__(self, store: Any, rank: int, size: int, timeout: datetime.timedelta | None = None):
        super().__init__(rank, size)
        self._rank = rank
        self._size = size
        secs = _timedelta_seconds(timeout)
        self._timeout_s = secs if secs is not None else 1800.0
        try:
            self._comm = _ox.Communicator.from_store(store, rank, size, secret=_job_secret(store, rank))
        except _ox.Error as e:
            raise _convert(e) from e
        self._pending: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._coalescing: list | None = None
        self._issue_lock = threading.RLock()
        self._held: list = []  # isend/irecv held back to be issued as one batch
        self._held_event = threading.Event()
        self._flusher: threading.Thread | None = None
        self._closed = False
        self._group_name = ""
        self._group_desc = ""

    # ---- identity
    def getBackendName(self) -> str:  # noqa: N802 (torch's name)
        return BACKEND_NAME

    def getRank(self) -> int:  # noqa: N802
        return self._rank

    def getSize(self) -> int:  # noqa: N802
        return self._size

    # torch keeps a group's name and description on its per-device backends; this group
    # is its own backend (DeviceMesh, FSDP and functional collectives read the name)
    def setGroupName(self, name: str) -> None:  # noqa: N802
        self._group_name = name

    def getGroupName(self) -> str:  # noqa: N802
        return self._group_name

    def setGroupDesc(self, desc: str) -> None:  # noqa: N802
        self._group_desc = desc

    def getGroupDesc(self) -> str:  # noqa: N802
        return self._group_desc

    @property
    def supports_coalescing(self) -> bool:
        return True

    def _get_backend(self, device: Any = None) -> "ProcessGroupOxccl":
        # torch asks the group's per-device backend for capabilities (batch_isend_irecv
        # reads `supports_coalescing`); this group is its own backend on every device.
        return self

    @property
    def communicator(self) -> Any:
        """The :class:`oxccl.Communicator` under this group."""
        return self._comm

    def __repr__(self) -> str:
        return f"ProcessGroupOxccl(rank={self._rank}, size={self._size})"

    # ---- completion thread
    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._thread_lock:
                if self._thread is None:
                    t = threading.Thread(
                        target=self._complete_loop,
                        name=f"oxccl-torch-completion-r{self._rank}",
                        daemon=True,
                    )
                    t.start()
                    self._thread = t

    def _complete_loop(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            ox_works, finish, work = item
            works = work if isinstance(work, list) else [work]
            exc: BaseException | None = None
            try:
                for ow in ox_works:
                    if not ow.wait(self._timeout_s):
                        raise dist.DistBackendError(
                            f"oxccl: {works[0]._describe()} did not complete within the process "
                            f"group timeout of {self._timeout_s:.0f} s"
                        )
                if finish is not None:
                    finish()
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                exc = _convert(e)
            for w in works:
                w._finish(exc)

    def _run(
        self,
        name: str,
        steps: list[_Step],
        outputs: list,
        async_op: bool,
        finish: Callable[[], None] | None = None,
    ) -> Work:
        """Runs ``steps`` (in order) now or on oxccl's worker; ``finish`` after them."""
        if self._coalescing is not None:
            self._coalescing.append((name, steps, outputs, finish))
            return _completed(self, name, outputs)  # torch uses end_coalescing's Work
        with self._issue_lock:
            if self._held:
                self._flush_held()
            return self._run_now(name, steps, outputs, async_op, finish)

    def _run_now(
        self,
        name: str,
        steps: list[_Step],
        outputs: list,
        async_op: bool,
        finish: Callable[[], None] | None,
    ) -> Work:
        if not async_op:
            try:
                for step in steps:
                    step(False)
                if finish is not None:
                    finish()
            except _ox.Error as e:
                raise _convert(e) from e
            return _completed(self, name, outputs)
        work = Work(self, name, outputs)
        try:
            ox_works = [step(True) for step in steps]
        except _ox.Error as e:
            raise _convert(e) from e
        self._ensure_thread()
        self._pending.put((ox_works, finish, work))
        return work

    # ---- coalescing (batch_isend_irecv, _coalescing_manager)
    def start_coalescing(self, device: Any = None) -> None:
        if self._coalescing is not None:
            raise RuntimeError("oxccl backend: start_coalescing while already coalescing")
        self._coalescing = []

    def end_coalescing(self, device: Any = None) -> Work:
        ops = self._coalescing or []
        self._coalescing = None
        outputs = [t for (_, _, outs, _) in ops for t in outs]
        if ops and all(name in ("send", "recv") for (name, _, _, _) in ops):
            batch = [(name, buf, peer) for (name, steps, _, _) in ops for (buf, peer) in steps]
            finishes = [f for (_, _, _, f) in ops if f is not None]

            def fin() -> None:
                for f in finishes:
                    f()

            return self._run(
                "batch_isend_irecv",
                [lambda a: self._comm.batch_async(batch) if a else self._comm.batch(batch)],
                outputs,
                True,
                fin,
            )
        steps = [s for (_, st, _, _) in ops for s in st]
        finishes = [f for (_, _, _, f) in ops if f is not None]

        def fin_all() -> None:
            for f in finishes:
                f()

        return self._run("coalesced", steps, outputs, True, fin_all)

    # ---- collectives
    def allreduce(self, tensors: list, opts: Any = None) -> Work:
        opts = opts if opts is not None else dist.AllreduceOptions()
        op = _reduce_op(opts.reduceOp)
        if len(tensors) == 1 and not opts.asyncOp and self._coalescing is None and tensors[0].is_contiguous():
            # the synchronous single-tensor call (dist.all_reduce(t)): nothing to stage
            buf = _reducible(tensors[0], op)
            with self._issue_lock:
                if self._held:
                    self._flush_held()
                try:
                    self._comm.all_reduce(buf, op)
                except _ox.Error as e:
                    raise _convert(e) from e
            return Work(self, "allreduce", tensors, done=True)
        staged = [_Staged(t) for t in tensors]
        bufs = [_reducible(s.buf, op) for s in staged]
        steps = [self._step_allreduce(b, op) for b in bufs]
        return self._run("allreduce", steps, list(tensors), opts.asyncOp, _finisher(staged))

    def _step_allreduce(self, buf: torch.Tensor, op: str) -> _Step:
        comm = self._comm
        return lambda a: comm.all_reduce_async(buf, op) if a else comm.all_reduce(buf, op)

    def allreduce_coalesced(self, tensors: list, opts: Any = None) -> Work:
        opts = opts if opts is not None else dist.AllreduceCoalescedOptions()
        op = _reduce_op(opts.reduceOp)
        # one flat buffer per dtype, copied back when done
        groups: dict = {}
        for t in tensors:
            groups.setdefault(t.dtype, []).append(t)
        steps = []
        copies = []
        for ts in groups.values():
            flat = torch.cat([t.reshape(-1) for t in ts]) if len(ts) > 1 else ts[0].reshape(-1).clone()
            steps.append(self._step_allreduce(_reducible(flat, op), op))
            copies.append((flat, ts))

        def finish() -> None:
            for flat, ts in copies:
                off = 0
                for t in ts:
                    n = t.numel()
                    t.copy_(flat[off : off + n].view_as(t))
                    off += n

        return self._run("allreduce_coalesced", steps, list(tensors), opts.asyncOp, finish)

    def broadcast(self, tensors: list, opts: Any = None) -> Work:
        opts = opts if opts is not None else dist.BroadcastOptions()
        root = opts.rootRank
        self._check_rank(root, "broadcast root")
        staged = [_Staged(t) for t in tensors]
        comm = self._comm

        def step(buf: torch.Tensor) -> _Step:
            return lambda a: comm.broadcast_async(buf, root) if a else comm.broadcast(buf, root)

        steps = [step(_as_bytes(s.buf)) for s in staged]
        return self._run("broadcast", steps, list(tensors), opts.asyncOp, _finisher(staged))

    def reduce(self, tensors: list, opts: Any = None) -> Work:
        opts = opts if opts is not None else dist.ReduceOptions()
        root = opts.rootRank
        self._check_rank(root, "reduce root")
        op = _reduce_op(opts.reduceOp)
        staged = [_Staged(t) for t in tensors]
        comm = self._comm

        def step(buf: torch.Tensor) -> _Step:
            return lambda a: comm.reduce_async(buf, root, op) if a else comm.reduce(buf, root, op)

        steps = [step(_reducible(s.buf, op)) for s in staged]
        return self._run("reduce", steps, list(tensors), opts.asyncOp, _finisher(staged))

    def allgather(self, output_tensors: list, input_tensors: list, opts: Any = None) -> Work:
        opts = opts if opts is not None else dist.AllgatherOptions()
        steps = []
        copies = []
        for outs, inp in zip(output_tensors, input_tensors):
            self._check_list(outs, "allgather output list")
            for o in outs:
                if o.numel() != inp.numel() or o.dtype != inp.dtype:
                    raise ValueError(
                        "oxccl backend: allgather needs every output tensor to match the "
                        f"input's size and dtype ({inp.numel()} x {inp.dtype}), "
                        f"got {o.numel()} x {o.dtype}"
                    )
            src = inp.contiguous()
            flat = torch.empty((self._size, inp.numel()), dtype=inp.dtype, device=inp.device)
            steps.append(self._step_allgather(_as_bytes(src), _as_bytes(flat)))
            copies.append((flat, outs))

        def finish() -> None:
            for flat, outs in copies:
                for i, o in enumerate(outs):
                    o.copy_(flat[i].view_as(o))

        outputs = [o for outs in output_tensors for o in outs]
        return self._run("allgather", steps, outputs, opts.asyncOp, finish)

    def _step_allgather(self, inp: torch.Tensor, out: torch.Tensor) -> _Step:
        comm = self._comm
        return lambda a: comm.all_gather_async(inp, out) if a else comm.all_gather(inp, out)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Work:
        opts = opts if opts is not None else dist.AllgatherOptions()
        if output.numel() != input.numel() * self._size or output.dtype != input.dtype:
            raise ValueError(
                "oxccl backend: all_gather_into_tensor needs an output of world x input "
                f"elements and the input's dtype ({self._size} x {input.numel()} {input.dtype}), "
                f"got {output.numel()} {output.dtype}"
            )
        out = _Staged(output, copy_in=False)
        step = self._step_allgather(_as_bytes(input.contiguous()), _as_bytes(out.buf))
        return self._run("all_gather_into_tensor", [step], [output], opts.asyncOp, _finisher([out]))

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(self, outputs: list, inputs: list, opts: Any = None) -> Work:
        opts = opts if opts is not None else dist.AllgatherOptions()
        staged = []
        steps = []
        for o, i in zip(outputs, inputs):
            if o.numel() != i.numel() * self._size or o.dtype != i.dtype:
                raise ValueError("oxccl backend: all_gather_into_tensor sizes do not match")
            s = _Staged(o, copy_in=False)
            staged.append(s)
            steps.append(self._step_allgather(_as_bytes(i.contiguous()), _as_bytes(s.buf)))
        return self._run(
            "all_gather_into_tensor_coalesced", steps, list(outputs), opts.asyncOp, _finisher(staged)
        )

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def allgather_coalesced(self, output_lists: list, inputs: list, opts: Any = None) -> Work:
        return self.allgather(output_lists, inputs, opts)

    def reduce_scatter(self, output_tensors: list, input_lists: list, opts: Any = None) -> Work:
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        op = _reduce_op(opts.reduceOp)
        steps = []
        staged = []
        comm = self._comm
        for out, ins in zip(output_tensors, input_lists):
            self._check_list(ins, "reduce_scatter input list")
            for t in ins:
                if t.dtype != out.dtype:
                    raise ValueError("oxccl backend: reduce_scatter inputs must have the output's dtype")
            s = _Staged(out, copy_in=False)
            staged.append(s)
            flat = _reducible(torch.cat([t.reshape(-1) for t in ins]), op)
            out_flat = _reducible(s.buf, op)
            counts = [t.numel() for t in ins]
            if counts[self._rank] != out.numel():
                raise ValueError(
                    f"oxccl backend: reduce_scatter input {self._rank} has {counts[self._rank]} "
                    f"elements, the output {out.numel()}"
                )
            if flat.dtype != ins[0].dtype:  # complex as real pairs
                counts = [2 * c for c in counts]
            if len(set(counts)) == 1:
                steps.append(
                    (
                        lambda f, o: (
                            lambda a: (
                                comm.reduce_scatter_async(f, o, op) if a else comm.reduce_scatter(f, o, op)
                            )
                        )
                    )(flat, out_flat)
                )
            else:
                steps.append(
                    (
                        lambda f, o, c: (
                            lambda a: (
                                comm.reduce_scatter_v_async(f, o, c, op)
                                if a
                                else comm.reduce_scatter_v(f, o, c, op)
                            )
                        )
                    )(flat, out_flat, counts)
                )
        return self._run("reduce_scatter", steps, list(output_tensors), opts.asyncOp, _finisher(staged))

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Work:
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        op = _reduce_op(opts.reduceOp)
        if input.numel() != output.numel() * self._size or output.dtype != input.dtype:
            raise ValueError(
                "oxccl backend: reduce_scatter_tensor needs an input of world x output "
                f"elements and the output's dtype ({self._size} x {output.numel()} {output.dtype}), "
                f"got {input.numel()} {input.dtype}"
            )
        s = _Staged(output, copy_in=False)
        inp = _reducible(input.contiguous(), op)
        out = _reducible(s.buf, op)
        comm = self._comm
        step: _Step = lambda a: (
            comm.reduce_scatter_async(inp, out, op) if a else comm.reduce_scatter(inp, out, op)
        )
        return self._run("reduce_scatter_tensor", [step], [output], opts.asyncOp, _finisher([s]))

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs: list, inputs: list, opts: Any = None) -> Work:
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        works = []
        # one call each; all run in order on oxccl's worker, the last Work completes last
        sub = dist.ReduceScatterOptions()
        sub.reduceOp = opts.reduceOp
        sub.asyncOp = opts.asyncOp
        for o, i in zip(outputs, inputs):
            works.append(self.reduce_scatter_single(o, i, sub))
        return _join(self, "reduce_scatter_tensor_coalesced", works, list(outputs))

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def alltoall(self, output_tensors: list, input_tensors: list, opts: Any = None) -> Work:
        opts = opts if opts is not None else dist.AllToAllOptions()
        self._check_list(output_tensors, "alltoall output list")
        self._check_list(input_tensors, "alltoall input list")
        dtype = input_tensors[0].dtype
        if any(t.dtype != dtype for t in list(output_tensors) + list(input_tensors)):
            raise ValueError("oxccl backend: alltoall tensors must share one dtype")
        send = _as_bytes(torch.cat([t.reshape(-1) for t in input_tensors]))
        recv_elems = torch.empty(
            sum(t.numel() for t in output_tensors), dtype=dtype, device=output_tensors[0].device
        )
        recv = _as_bytes(recv_elems)
        esz = _elem_bytes(dtype)
        send_counts = [t.numel() * esz for t in input_tensors]
        recv_counts = [t.numel() * esz for t in output_tensors]
        comm = self._comm
        sd, rd = _displs(send_counts), _displs(recv_counts)
        step: _Step = lambda a: (
            comm.all_to_all_v_async(send, send_counts, sd, recv, recv_counts, rd)
            if a
            else comm.all_to_all_v(send, send_counts, sd, recv, recv_counts, rd)
        )

        def finish() -> None:
            off = 0
            for t in output_tensors:
                n = t.numel()
                t.copy_(recv_elems[off : off + n].view_as(t))
                off += n

        return self._run("alltoall", [step], list(output_tensors), opts.asyncOp, finish)

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list,
        input_split_sizes: list,
        opts: Any = None,
    ) -> Work:
        opts = opts if opts is not None else dist.AllToAllOptions()
        if output.dtype != input.dtype:
            raise ValueError("oxccl backend: all_to_all_single needs one dtype for input and output")
        out = _Staged(output, copy_in=False)
        send = _as_bytes(input.contiguous())
        recv = _as_bytes(out.buf)
        comm = self._comm
        if not output_split_sizes and not input_split_sizes:
            if input.numel() % self._size or output.numel() != input.numel():
                raise ValueError(
                    "oxccl backend: all_to_all_single without split sizes needs input and output of "
                    f"one size divisible by the world ({self._size}); "
                    f"got {input.numel()} and {output.numel()}"
                )
            step: _Step = lambda a: comm.all_to_all_async(send, recv) if a else comm.all_to_all(send, recv)
        else:
            esz = _elem_bytes(input.dtype)
            sc = _split_counts(input, input_split_sizes, self._size, esz, "input")
            rc = _split_counts(output, output_split_sizes, self._size, esz, "output")
            sd, rd = _displs(sc), _displs(rc)
            step = lambda a: (
                comm.all_to_all_v_async(send, sc, sd, recv, rc, rd)
                if a
                else comm.all_to_all_v(send, sc, sd, recv, rc, rd)
            )
        return self._run("all_to_all_single", [step], [output], opts.asyncOp, _finisher([out]))

    alltoall_base = all_to_all_single

    def gather(self, output_lists: list, input_tensors: list, opts: Any = None) -> Work:
        opts = opts if opts is not None else dist.GatherOptions()
        root = opts.rootRank
        self._check_rank(root, "gather root")
        if len(input_tensors) != 1:
            raise ValueError("oxccl backend: gather takes exactly one input tensor")
        inp = input_tensors[0]
        src = _as_bytes(inp.contiguous())
        comm = self._comm
        if self._rank == root:
            if len(output_lists) != 1:
                raise ValueError("oxccl backend: gather takes one output list on the root")
            outs = output_lists[0]
            self._check_list(outs, "gather output list")
            for o in outs:
                if o.numel() != inp.numel() or o.dtype != inp.dtype:
                    raise ValueError("oxccl backend: gather outputs must match the input's size and dtype")
            flat = torch.empty((self._size, inp.numel()), dtype=inp.dtype, device=inp.device)
            dst = _as_bytes(flat)

            def finish() -> None:
                for i, o in enumerate(outs):
                    o.copy_(flat[i].view_as(o))

            outputs = list(outs)
        else:
            if output_lists and any(len(x) for x in output_lists):
                raise ValueError("oxccl backend: gather takes no output list on non-root ranks")
            dst = None
            finish = None
            outputs = []
        step: _Step = lambda a: comm.gather_async(src, dst, root) if a else comm.gather(src, dst, root)
        return self._run("gather", [step], outputs, opts.asyncOp, finish)

    def scatter(self, output_tensors: list, input_lists: list, opts: Any = None) -> Work:
        opts = opts if opts is not None else dist.ScatterOptions()
        root = opts.rootRank
        self._check_rank(root, "scatter root")
        if len(output_tensors) != 1:
            raise ValueError("oxccl backend: scatter takes exactly one output tensor")
        out = _Staged(output_tensors[0], copy_in=False)
        dst = _as_bytes(out.buf)
        if self._rank == root:
            if len(input_lists) != 1:
                raise ValueError("oxccl backend: scatter takes one input list on the root")
            ins = input_lists[0]
            self._check_list(ins, "scatter input list")
            o = output_tensors[0]
            for t in ins:
                if t.numel() != o.numel() or t.dtype != o.dtype:
                    raise ValueError("oxccl backend: scatter inputs must match the output's size and dtype")
            src = _as_bytes(torch.cat([t.reshape(-1) for t in ins]))
        else:
            if input_lists and any(len(x) for x in input_lists):
                raise ValueError("oxccl backend: scatter takes no input list on non-root ranks")
            src = None
        comm = self._comm
        step: _Step = lambda a: comm.scatter_async(src, dst, root) if a else comm.scatter(src, dst, root)
        return self._run("scatter", [step], list(output_tensors), opts.asyncOp, _finisher([out]))

    def barrier(self, opts: Any = None) -> Work:
        async_op = opts.asyncOp if opts is not None else False
        comm = self._comm
        step: _Step = lambda a: comm.barrier_async() if a else comm.barrier()
        return self._run("barrier", [step], [], async_op, None)

    # ---- point to point: torch's send/recv are asynchronous (dist.send waits on the Work)
    def send(self, tensors: list, dst: int, tag: int = 0) -> Work:
        self._check_rank(dst, "send destination")
        bufs = [_as_bytes(t.contiguous()) for t in tensors]
        return self._p2p("send", bufs, dst, list(tensors), None)

    def recv(self, tensors: list, src: int, tag: int = 0) -> Work:
        self._check_rank(src, "recv source")
        staged = [_Staged(t, copy_in=False) for t in tensors]
        bufs = [_as_bytes(s.buf) for s in staged]
        work = self._p2p("recv", bufs, src, list(tensors), _finisher(staged))
        work._source = src
        return work

    def _p2p(self, name: str, bufs: list, peer: int, outputs: list, finish: Any) -> Work:
        if self._coalescing is not None:
            # end_coalescing turns these into one oxccl batch (NCCL group semantics)
            self._coalescing.append((name, [(b, peer) for b in bufs], outputs, finish))
            return _completed(self, name, outputs)
        # Held back and issued as one oxccl batch with the isend/irecv calls that follow
        # it, as soon as any of their Works is looked at, another call is made on this
        # group, or 2 ms have passed: so that crossing isend/irecv pairs (both ranks
        # isend, then irecv) run together as in gloo, where oxccl alone would match a
        # send against a send.
        work = Work(self, name, outputs)
        work._flush = self._flush_held_locked
        with self._issue_lock:
            self._held.append((name, bufs, peer, work, finish))
            first = len(self._held) == 1
        if first:
            self._ensure_flusher()
            self._held_event.set()
        return work

    def _flush_held_locked(self) -> None:
        if self._held:
            with self._issue_lock:
                self._flush_held()

    def _flush_held(self) -> None:
        """Issues the held-back sends and receives as one batch (caller holds the lock)."""
        items, self._held = self._held, []
        if not items:
            return
        batch = [(name, b, peer) for (name, bufs, peer, _, _) in items for b in bufs]
        works = [w for (_, _, _, w, _) in items]
        finishes = [f for (_, _, _, _, f) in items if f is not None]
        for w in works:
            w._flush = None

        def finish() -> None:
            for f in finishes:
                f()

        try:
            ow = self._comm.batch_async(batch)
        except _ox.Error as e:
            exc = _convert(e)
            for w in works:
                w._finish(exc)
            return
        self._ensure_thread()
        self._pending.put(([ow], finish, works))

    def _ensure_flusher(self) -> None:
        if self._flusher is None:
            with self._thread_lock:
                if self._flusher is None:
                    t = threading.Thread(
                        target=self._flush_loop, name=f"oxccl-torch-p2p-r{self._rank}", daemon=True
                    )
                    t.start()
                    self._flusher = t

    def _flush_loop(self) -> None:
        while not self._closed:
            self._held_event.wait()
            if self._closed:
                return
            time.sleep(0.002)
            self._held_event.clear()
            self._flush_held_locked()

    def recv_anysource(self, tensors: list, tag: int = 0) -> Work:
        raise RuntimeError(
            "oxccl backend: receiving from any source (dist.recv / dist.irecv with src=None) "
            "is not supported; oxccl matches every message to a known peer, pass src="
        )

    # ---- lifecycle
    def abort(self) -> None:
        try:
            self._comm.abort()
        except _ox.Error:
            pass
        self._stop_thread()

    def shutdown(self) -> None:
        self._stop_thread()
        # release the communicator now (dist.destroy_process_group), not whenever the
        # interpreter's teardown gets to it: its links close and its thread ends here
        self._comm = _Closed(self._rank)

    def _stop_thread(self, join_timeout: float | None = None) -> None:
        """Issues what is held back, then ends the flusher and (once pending calls are
        done, or ``join_timeout`` passed) the completion thread."""
        self._flush_held_locked()
        self._closed = True
        self._held_event.set()
        limit = self._timeout_s if join_timeout is None else join_timeout
        if self._flusher is not None:
            self._flusher.join(timeout=limit)
        if self._thread is not None:
            self._pending.put(None)
            self._thread.join(timeout=limit)
            self._thread = None

    # ---- checks
    def _check_rank(self, r: int, what: str) -> None:
        if not 0 <= r < self._size:
            raise ValueError(f"oxccl backend: {what} {r} is not a rank of this group (size {self._size})")

    def _check_list(self, ts: list, what: str) -> None:
        if len(ts) != self._size:
            raise ValueError(f"oxccl backend: {what} has {len(ts)} tensors, the group {self._size} ranks")


_SECRET_KEY = "oxccl_torch/secret"


def _job_secret(store: Any, rank: int) -> bytes | None:
    """The secret that authenticates the group's connections: OXCCL_JOB_SECRET when the
    user set one (oxccl reads it), else a random one that rank 0 puts into the store
    torch handed the group (torch's rendezvous, which every rank already trusts)."""
    if os.environ.get("OXCCL_JOB_SECRET"):
        return None
    if rank == 0:
        store.set(_SECRET_KEY, secrets.token_hex(32))
    return bytes(store.get(_SECRET_KEY))


class _Closed:
    """Stands in for the communicator of a group that was shut down."""

    def __init__(self, rank: int) -> None:
        self._rank = rank

    def __getattr__(self, name: str) -> Any:
        raise dist.DistBackendError(
            f"oxccl: rank {self._rank}: {name} on a process group that was destroyed or shut down"
        )


def _finisher(staged: list) -> Callable[[], None] | None:
    if not any(s.copy_back for s in staged):
        return None

    def finish() -> None:
        for s in staged:
            s.finish()

    return finish


def _join(pg: ProcessGroupOxccl, name: str, works: list, outputs: list) -> Work:
    """One Work for several issued in order (the last completes last)."""
    if not works:
        return _completed(pg, name, outputs)
    joined = Work(pg, name, outputs)

    def done(_: Any) -> None:
        exc = next((w.exception() for w in works if w.exception() is not None), None)
        joined._finish(exc)

    torch.futures.collect_all([w.get_future() for w in works]).add_done_callback(done)
    return joined


def _elem_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _displs(counts: list) -> list:
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += c
    return out


def _split_counts(t: torch.Tensor, splits: list, world: int, esz: int, what: str) -> list:
    """Byte counts per rank of ``t`` cut along dim 0 by ``splits`` (even when empty)."""
    rows = t.size(0) if t.dim() > 0 else 1
    row_bytes = (t.numel() // rows if rows else 0) * esz
    if not splits:
        if rows % world:
            raise ValueError(
                f"oxccl backend: all_to_all_single {what} has {rows} rows, not divisible by {world}"
            )
        splits = [rows // world] * world
    if len(splits) != world or sum(splits) != rows:
        raise ValueError(
            f"oxccl backend: all_to_all_single {what} split sizes {list(splits)} do not cut "
            f"{rows} rows into {world} parts"
        )
    return [int(s) * row_bytes for s in splits]


# --------------------------------------------------------------------------- registration


_LIVE: "weakref.WeakSet[ProcessGroupOxccl]" = weakref.WeakSet()


def _create(store: Any, rank: int, size: int, timeout: datetime.timedelta) -> ProcessGroupOxccl:
    pg = ProcessGroupOxccl(store, rank, size, timeout)
    _LIVE.add(pg)
    return pg


@atexit.register
def _stop_all() -> None:
    # Stop this module's threads before the interpreter finalizes: a daemon thread that
    # wakes up in native code during finalization is torn down mid-call.
    for pg in list(_LIVE):
        try:
            pg._stop_thread(join_timeout=10.0)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _devices() -> list:
    devices = ["cpu"]
    if getattr(_ox, "HAS_CUDA", False):
        devices.append("cuda")
    return devices


def _register() -> None:
    if BACKEND_NAME.upper() in getattr(dist.Backend, "_plugins", {}):
        return
    dist.Backend.register_backend(BACKEND_NAME, _create, devices=_devices())


_register()

try:
    from oxccl._horovod import *  # noqa: F401,F403  (Horovod's API, see _horovod.py)
except ImportError as _e:  # only a missing _horovod module is tolerated
    if _e.name != "oxccl._horovod":
        raise
