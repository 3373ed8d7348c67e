//! `oxccl.FusionEngine`: Horovod-style named tensors over oxccl's fusion
//! engine. The engine works on owned vectors, so a tensor is copied in at
//! submission and its result copied back into the caller's buffer when it
//! completes (by this engine's completion thread), before its Work completes.

use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use oxccl::fusion::FusionEngine as Engine;
use oxccl::{DType, Element, ErrorKind, ReduceOp, bf16, f16};
use pyo3::prelude::*;

use crate::buffer::Buf;
use crate::comm::{Communicator, parse_op};
use crate::errors::{Failure, invalid_argument};
use crate::work::{Completer, Shared, Work, WorkState, comm_of, lock};

/// Waits for one tensor's result and writes it into the destination bytes.
type Finish = Box<dyn FnOnce(&mut [u8]) -> oxccl::Result<()> + Send>;

/// One tensor of a [`Pending`]: how its result comes, and where it goes.
struct Part {
    finish: Finish,
    /// The buffer the result goes to; the input too, kept alive until then.
    dst: Buf,
    src: Option<Buf>,
}

/// What the completion thread waits for: one Work's tensors (one, or the
/// group of an `allreduce_group_async`).
struct Pending {
    parts: Vec<Part>,
    done: Completer,
}

struct Running {
    /// Shared with a `synchronize` in progress, which runs without the lock.
    engine: Arc<Engine>,
    tx: Option<Sender<Pending>>,
    thread: Option<JoinHandle<()>>,
    works: Vec<Arc<WorkState>>,
}

/// Runs collectives on named tensors asynchronously, fusing small ones into
/// few large calls (Horovod's fusion buffer, cycle time and negotiation;
/// settings ``OXCCL_FUSION_*``). Every rank submits the same names; the
/// order may differ. The engine holds the communicator until
/// :meth:`shutdown`.
#[pyclass(module = "oxccl", frozen)]
pub(crate) struct FusionEngine {
    shared: Arc<Shared>,
    inner: Mutex<Option<Running>>,
}

/// The elements of `bytes` (any alignment), in one copy.
fn vec_of<T: Element>(bytes: &[u8]) -> Vec<T> {
    bytemuck::pod_collect_to_vec::<u8, T>(bytes)
}

fn finish_of<T: Element>(h: oxccl::fusion::Handle<T>) -> Finish {
    Box::new(move |dst: &mut [u8]| {
        let v = h.wait()?;
        let src: &[u8] = bytemuck::cast_slice(&v);
        if src.len() != dst.len() {
            return Err(oxccl::Error::Internal(format!(
                "fusion result of {} bytes for a buffer of {}",
                src.len(),
                dst.len()
            )));
        }
        dst.copy_from_slice(src);
        Ok(())
    })
}

#[derive(Clone, Copy)]
enum Sub {
    AllReduce(ReduceOp),
    Broadcast(usize),
    AllGather,
}

fn submit_typed<T: Element>(e: &Engine, name: String, bytes: &[u8], sub: Sub) -> Finish {
    let v = vec_of::<T>(bytes);
    match sub {
        Sub::AllReduce(op) => finish_of(e.allreduce_async(name, v, op)),
        Sub::Broadcast(root) => finish_of(e.broadcast_async(name, v, root)),
        Sub::AllGather => finish_of(e.allgather_async(name, v)),
    }
}

fn submit(e: &Engine, name: String, dtype: DType, bytes: &[u8], sub: Sub) -> Finish {
    match dtype {
        DType::I8 => submit_typed::<i8>(e, name, bytes, sub),
        DType::U8 => submit_typed::<u8>(e, name, bytes, sub),
        DType::I32 => submit_typed::<i32>(e, name, bytes, sub),
        DType::U32 => submit_typed::<u32>(e, name, bytes, sub),
        DType::I64 => submit_typed::<i64>(e, name, bytes, sub),
        DType::U64 => submit_typed::<u64>(e, name, bytes, sub),
        DType::F16 => submit_typed::<f16>(e, name, bytes, sub),
        DType::BF16 => submit_typed::<bf16>(e, name, bytes, sub),
        DType::F32 => submit_typed::<f32>(e, name, bytes, sub),
        DType::F64 => submit_typed::<f64>(e, name, bytes, sub),
    }
}

fn closed() -> PyErr {
    crate::errors::invalid_usage("the FusionEngine is shut down")
}

/// Waits for every part's result, writes it into its buffer, and releases
/// the buffers (all in one hold of the GIL); the first error, if any.
fn complete(parts: Vec<Part>) -> Result<(), Failure> {
    let mut first: Option<Failure> = None;
    let mut bufs = Vec::with_capacity(2 * parts.len());
    for mut p in parts {
        if let Err(e) = (p.finish)(p.dst.bytes_mut()) {
            first.get_or_insert(Failure::from(e));
        }
        bufs.push(p.dst);
        bufs.extend(p.src);
    }
    crate::buffer::release(bufs);
    first.map_or(Ok(()), Err)
}

impl FusionEngine {
    fn enqueue(
        &self,
        py: Python<'_>,
        name: String,
        src: Option<Buf>,
        dst: Buf,
        sub: Sub,
    ) -> PyResult<Work> {
        self.enqueue_parts(py, vec![(name, src, dst)], sub)
    }

    /// Submits every `(name, input, output)` to the engine and queues one
    /// Work for all of them.
    fn enqueue_parts(
        &self,
        py: Python<'_>,
        tensors: Vec<(String, Option<Buf>, Buf)>,
        sub: Sub,
    ) -> PyResult<Work> {
        let mut g = lock(&self.inner);
        let r = g.as_mut().ok_or_else(closed)?;
        // Negotiated together: a cycle that started while the group was
        // submitted would agree on a part of it only.
        let hold = r.engine.hold();
        let parts: Vec<Part> = tensors
            .into_iter()
            .map(|(name, src, dst)| {
                let finish = submit(
                    &r.engine,
                    name,
                    dst.dtype,
                    src.as_ref().unwrap_or(&dst).bytes(),
                    sub,
                );
                Part { finish, dst, src }
            })
            .collect();
        drop(hold);
        let work = Work::new();
        let p = Pending {
            parts,
            done: Completer(Some(work.state.clone())),
        };
        r.works.retain(|w| !w.is_done());
        r.works.push(work.state.clone());
        let tx = r.tx.as_ref().ok_or_else(closed)?;
        if tx.send(p).is_err() {
            return Err(crate::errors::internal(
                "the fusion completion thread is gone",
            ));
        }
        let _ = py;
        Ok(work)
    }
}

#[pymethods]
impl FusionEngine {
    /// Starts an engine on ``comm`` (every rank does); ``comm`` is used only
    /// through the engine until :meth:`shutdown`.
    #[new]
    fn new(py: Python<'_>, comm: &Communicator) -> PyResult<Self> {
        let shared = comm.shared.clone();
        let rank = shared.rank;
        let s = shared.clone();
        let c = py
            .detach(move || {
                s.run(move |slot| {
                    comm_of(slot, rank)?;
                    slot.take().ok_or_else(|| Failure {
                        kind: ErrorKind::Internal,
                        message: format!("rank {rank}: the communicator vanished"),
                    })
                })
            })
            .map_err(PyErr::from)?;
        let engine = match Engine::new(c) {
            Ok(e) => e,
            Err(e) => return Err(Failure::from(e).into()),
        };
        let (tx, rx) = channel::<Pending>();
        let thread = std::thread::Builder::new()
            .name(format!("oxccl-py-fusion-{rank}"))
            .spawn(move || {
                while let Ok(mut p) = rx.recv() {
                    let r = complete(std::mem::take(&mut p.parts));
                    p.done.finish(r);
                }
            })
            .map_err(|e| invalid_argument(format!("cannot start the fusion thread: {e}")))?;
        Ok(FusionEngine {
            shared,
            inner: Mutex::new(Some(Running {
                engine: Arc::new(engine),
                tx: Some(tx),
                thread: Some(thread),
                works: Vec::new(),
            })),
        })
    }

    /// Reduces ``buf`` over all ranks with ``op``, in place, under ``name``.
    #[pyo3(signature = (buf, name, op=String::from("sum")), text_signature = "(self, buf, name, op='sum')")]
    fn allreduce_async(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        name: String,
        op: String,
    ) -> PyResult<Work> {
        let op = parse_op(&op)?;
        let b = Buf::get(buf, "allreduce_async: buf", true)?;
        self.enqueue(py, name, None, b, Sub::AllReduce(op))
    }

    /// Reduces each of ``bufs`` over all ranks with ``op``, in place, under
    /// the name at the same position of ``names``: the same as one
    /// :meth:`allreduce_async` per buffer (each name is negotiated and may
    /// be fused with any other), in one call and with one :class:`Work`,
    /// which completes when every buffer holds its result (and fails with
    /// the first error if any of them fails). A buffer may also be a DLPack
    /// capsule of host memory (``torch.utils.dlpack.to_dlpack(t)``), which
    /// is consumed: cheaper to take than a tensor, whose ``__dlpack__`` runs
    /// Python code.
    #[pyo3(signature = (bufs, names, op=String::from("sum")), text_signature = "(self, bufs, names, op='sum')")]
    fn allreduce_group_async(
        &self,
        py: Python<'_>,
        bufs: &Bound<'_, PyAny>,
        names: Vec<String>,
        op: String,
    ) -> PyResult<Work> {
        let op = parse_op(&op)?;
        let mut tensors = Vec::with_capacity(names.len());
        let mut names = names.into_iter();
        for (i, b) in bufs.try_iter()?.enumerate() {
            let name = names.next().ok_or_else(|| {
                invalid_argument(format!(
                    "allreduce_group_async: more buffers than the {i} names"
                ))
            })?;
            let b = Buf::get(&b?, "allreduce_group_async: buf", true)?;
            tensors.push((name, None, b));
        }
        let extra = names.len();
        if extra > 0 {
            return Err(invalid_argument(format!(
                "allreduce_group_async: {} buffers for {} names",
                tensors.len(),
                tensors.len() + extra
            )));
        }
        // Two buffers sharing bytes would be written by two results.
        let mut by_addr: Vec<usize> = (0..tensors.len()).collect();
        by_addr.sort_by_key(|&i| tensors[i].2.addr());
        for w in by_addr.windows(2) {
            let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
            if a.2.overlaps(&b.2) {
                return Err(invalid_argument(format!(
                    "allreduce_group_async: buffers '{}' and '{}' overlap",
                    a.0, b.0
                )));
            }
        }
        self.enqueue_parts(py, tensors, Sub::AllReduce(op))
    }

    /// Copies ``root``'s ``buf`` into every rank's ``buf``, under ``name``.
    fn broadcast_async(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        name: String,
        root: i64,
    ) -> PyResult<Work> {
        let root = usize::try_from(root)
            .ok()
            .filter(|r| *r < self.shared.world)
            .ok_or_else(|| {
                invalid_argument(format!("broadcast_async: root {root} is not a rank"))
            })?;
        let b = Buf::get(buf, "broadcast_async: buf", true)?;
        self.enqueue(py, name, None, b, Sub::Broadcast(root))
    }

    /// Concatenates every rank's ``input`` (same length on every rank) into
    /// ``output`` (``world`` times as long), under ``name``.
    fn allgather_async(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
        name: String,
    ) -> PyResult<Work> {
        let i = Buf::get(input, "allgather_async: input", false)?;
        let o = Buf::get(output, "allgather_async: output", true)?;
        if i.dtype != o.dtype || o.count != i.count * self.shared.world {
            return Err(invalid_argument(format!(
                "allgather_async: output must be {} elements of {} (world x input), not {} of {}",
                i.count * self.shared.world,
                i.dtype,
                o.count,
                o.dtype
            )));
        }
        self.enqueue(py, name, Some(i), o, Sub::AllGather)
    }

    /// Starts the next negotiation cycle now rather than at the cycle timer
    /// (``OXCCL_CYCLE_TIME_MS``), and the next ones as soon as each completes
    /// something, until every tensor submitted so far has completed: call it
    /// before waiting on handles (an optimizer step after the backward pass).
    /// :meth:`synchronize` does it itself.
    fn flush(&self) -> PyResult<()> {
        let g = lock(&self.inner);
        g.as_ref().ok_or_else(closed)?.engine.flush();
        Ok(())
    }

    /// Waits until every tensor submitted so far has completed (successfully
    /// or not) and its result is in its buffer.
    fn synchronize(&self, py: Python<'_>) -> PyResult<()> {
        // Not under the lock: other threads keep submitting meanwhile.
        let (works, engine) = {
            let g = lock(&self.inner);
            let r = g.as_ref().ok_or_else(closed)?;
            (r.works.clone(), r.engine.clone())
        };
        py.detach(move || {
            engine.synchronize().map_err(Failure::from)?;
            drop(engine);
            for w in works {
                let work = Work { state: w };
                if work.wait_for(Some(Duration::from_secs(600))).is_none() {
                    return Err(Failure {
                        kind: ErrorKind::Timeout,
                        message: "FusionEngine.synchronize: a result was not written back \
                                  within 600 s"
                            .into(),
                    });
                }
            }
            Ok(())
        })
        .map_err(PyErr::from)
    }

    /// Stops the engine on every rank and gives the communicator back to
    /// the :class:`Communicator` it was made from. Call :meth:`synchronize`
    /// first to finish outstanding work.
    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        let Some(r) = lock(&self.inner).take() else {
            return Ok(());
        };
        let shared = self.shared.clone();
        py.detach(move || stop(r, &shared)).map_err(PyErr::from)
    }
}

/// Stops the engine, waits for the completion thread, and puts the
/// communicator back. Call without the GIL (the completion thread takes it).
fn stop(mut r: Running, shared: &Shared) -> Result<(), Failure> {
    // A synchronize in progress holds the engine a while longer.
    let deadline = Instant::now() + Duration::from_secs(600);
    let engine = loop {
        match Arc::try_unwrap(r.engine) {
            Ok(e) => break e,
            Err(e) if Instant::now() < deadline => {
                r.engine = e;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => {
                return Err(Failure {
                    kind: ErrorKind::Timeout,
                    message: "FusionEngine.shutdown: a synchronize() did not return within 600 s"
                        .into(),
                });
            }
        }
    };
    let comm = engine.shutdown();
    r.tx = None;
    if let Some(t) = r.thread.take() {
        let _ = t.join();
    }
    *lock(&shared.slot) = Some(comm.map_err(Failure::from)?);
    Ok(())
}

impl Drop for FusionEngine {
    fn drop(&mut self) {
        if let Some(r) = lock(&self.inner).take() {
            let shared = self.shared.clone();
            Python::attach(|py| py.detach(move || stop(r, &shared))).ok();
        }
    }
}
