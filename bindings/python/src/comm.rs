//! `oxccl.Communicator`: every collective and point-to-point call, sync and
//! async, on Python buffers.

use std::str::FromStr;
use std::sync::Arc;

use oxccl::{Batch, DType, Descriptor, Exchange, Kind, ReduceOp};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::buffer::Buf;
use crate::errors::{Failure, invalid_argument};
use crate::work::{Shared, Slot, Work, comm_of};

/// A call ready to run: it owns its buffers, which are released (under the
/// GIL) when it finishes.
type Call = Box<dyn FnOnce(&mut oxccl::Communicator) -> oxccl::Result<()> + Send>;

/// A rank's place in a world of ranks, and the collectives it runs.
///
/// Calls run in the order they are made, sync and async alike (async ones
/// on the communicator's worker thread). Buffers are numpy arrays, torch CPU
/// tensors or any C-contiguous object with ``__dlpack__`` or the buffer
/// protocol; they are used in place, never copied, and kept alive until the
/// call completes. Built with the ``cuda`` feature (``oxccl.HAS_CUDA``),
/// all_reduce, broadcast, reduce, all_gather and reduce_scatter take CUDA
/// tensors too. The GIL is released while a call runs.
#[pyclass(module = "oxccl", frozen)]
pub(crate) struct Communicator {
    pub(crate) shared: Arc<Shared>,
}

impl Drop for Communicator {
    fn drop(&mut self) {
        self.shared.close();
    }
}

pub(crate) fn parse_op(op: &str) -> PyResult<ReduceOp> {
    let name = op.rsplit('.').next().unwrap_or(op);
    ReduceOp::from_str(name).map_err(|_| {
        invalid_argument(format!(
            "op {op:?} is not one of \"sum\", \"prod\", \"min\", \"max\", \"avg\""
        ))
    })
}

fn same_dtype(a: &Buf, b: &Buf, call: &str) -> PyResult<()> {
    if a.dtype != b.dtype {
        return Err(invalid_argument(format!(
            "{call}: input is {} but output is {}: both must have one dtype",
            a.dtype, b.dtype
        )));
    }
    Ok(())
}

fn disjoint(a: &Buf, b: &Buf, call: &str) -> PyResult<()> {
    if a.overlaps(b) {
        return Err(invalid_argument(format!(
            "{call}: input and output overlap (pass distinct buffers, or out=None for in place)"
        )));
    }
    Ok(())
}

fn counts(v: Vec<i64>, what: &str) -> PyResult<Vec<usize>> {
    v.into_iter()
        .map(|c| {
            usize::try_from(c).map_err(|_| invalid_argument(format!("{what}: {c} is negative")))
        })
        .collect()
}

fn rank_arg(r: i64, what: &str, world: usize) -> PyResult<usize> {
    usize::try_from(r)
        .ok()
        .filter(|r| *r < world)
        .ok_or_else(|| {
            invalid_argument(format!(
                "{what} {r} is not a rank of this communicator (0..{world})"
            ))
        })
}

/// A run_bytes call: `input` None means in place in `output`. CUDA tensors
/// (feature `cuda`) go through oxccl's device path instead.
fn ring_call(d: Descriptor, input: Option<Buf>, mut output: Buf) -> Call {
    Box::new(move |c| {
        if output.is_device() || input.as_ref().is_some_and(Buf::is_device) {
            #[cfg(feature = "cuda")]
            return crate::cuda::run(c, d, input.as_ref(), &output);
            #[cfg(not(feature = "cuda"))]
            return Err(oxccl::Error::Internal(format!(
                "{d}: a device buffer in a build without the cuda feature"
            )));
        }
        let inp = input.as_ref().map(Buf::bytes);
        c.run_bytes(d, inp, output.bytes_mut())
    })
}

/// An exchange call; its arguments are owned by the call.
enum X {
    AllToAll,
    AllToAllV([Vec<usize>; 4]),
    Gather(usize),
    Scatter(usize),
    AllGatherV(Vec<usize>),
    ReduceScatterV(Vec<usize>, ReduceOp),
}

fn exchange_call(x: X, count: usize, dtype: DType, input: Buf, mut output: Buf) -> Call {
    Box::new(move |c| {
        let world = c.world().max(1);
        let e = match &x {
            X::AllToAll => Exchange::AllToAll {
                count: count / world,
            },
            X::AllToAllV([sc, sd, rc, rd]) => Exchange::AllToAllV {
                send_counts: sc,
                send_displs: sd,
                recv_counts: rc,
                recv_displs: rd,
            },
            X::Gather(root) => Exchange::Gather { count, root: *root },
            X::Scatter(root) => Exchange::Scatter { count, root: *root },
            X::AllGatherV(counts) => Exchange::AllGatherV { counts },
            X::ReduceScatterV(counts, op) => Exchange::ReduceScatterV { counts, op: *op },
        };
        c.run_exchange(e, dtype, input.bytes(), output.bytes_mut())
    })
}

impl Communicator {
    pub(crate) fn wrap(comm: oxccl::Communicator) -> Communicator {
        Communicator {
            shared: Shared::new(comm),
        }
    }

    fn rank_(&self) -> usize {
        self.shared.rank
    }

    fn world_(&self) -> usize {
        self.shared.world
    }

    fn sync(&self, py: Python<'_>, call: Call) -> PyResult<()> {
        let s = self.shared.clone();
        let rank = s.rank;
        py.detach(move || {
            s.run(move |slot: &mut Slot| call(comm_of(slot, rank)?).map_err(Failure::from))
        })
        .map_err(PyErr::from)
    }

    fn start(&self, py: Python<'_>, call: Call) -> PyResult<Work> {
        let s = self.shared.clone();
        let rank = s.rank;
        py.detach(move || {
            s.spawn(move |slot: &mut Slot| call(comm_of(slot, rank)?).map_err(Failure::from))
        })
        .map_err(PyErr::from)
    }

    fn desc(kind: Kind, dtype: DType, op: ReduceOp, root: usize, count: usize) -> Descriptor {
        Descriptor {
            kind,
            dtype,
            op,
            root,
            count,
        }
    }

    fn all_reduce_call(
        &self,
        buf: &Bound<'_, PyAny>,
        op: &str,
        out: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Call> {
        let op = parse_op(op)?;
        let Some(out) = out else {
            let b = Buf::get_device(buf, "all_reduce: buf", true)?;
            let d = Self::desc(Kind::AllReduce, b.dtype, op, 0, b.count);
            return Ok(ring_call(d, None, b));
        };
        let o = Buf::get_device(out, "all_reduce: out", true)?;
        let b = Buf::get_device(buf, "all_reduce: buf", false)?;
        same_dtype(&b, &o, "all_reduce")?;
        let d = Self::desc(Kind::AllReduce, b.dtype, op, 0, b.count);
        if b.same(&o) {
            return Ok(ring_call(d, None, o));
        }
        disjoint(&b, &o, "all_reduce")?;
        Ok(ring_call(d, Some(b), o))
    }

    fn broadcast_call(
        &self,
        buf: &Bound<'_, PyAny>,
        root: i64,
        out: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Call> {
        let root = rank_arg(root, "broadcast: root", self.world_())?;
        let Some(out) = out else {
            let b = Buf::get_device(buf, "broadcast: buf", true)?;
            let d = Self::desc(Kind::Broadcast, b.dtype, ReduceOp::Sum, root, b.count);
            return Ok(ring_call(d, None, b));
        };
        let o = Buf::get_device(out, "broadcast: out", true)?;
        let d = Self::desc(Kind::Broadcast, o.dtype, ReduceOp::Sum, root, o.count);
        if self.rank_() != root {
            return Ok(ring_call(d, None, o));
        }
        let b = Buf::get_device(buf, "broadcast: buf", false)?;
        same_dtype(&b, &o, "broadcast")?;
        if b.same(&o) {
            return Ok(ring_call(d, None, o));
        }
        disjoint(&b, &o, "broadcast")?;
        Ok(ring_call(d, Some(b), o))
    }

    fn reduce_call(
        &self,
        buf: &Bound<'_, PyAny>,
        root: i64,
        op: &str,
        out: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Call> {
        let py = buf.py();
        let op = parse_op(op)?;
        let root = rank_arg(root, "reduce: root", self.world_())?;
        if self.rank_() != root {
            // Non-roots only send; their buf is not written, out not used.
            let b = Buf::get_device(buf, "reduce: buf", false)?;
            let d = Self::desc(Kind::Reduce, b.dtype, op, root, b.count);
            let empty = Buf::empty(py, b.dtype);
            return Ok(ring_call(d, Some(b), empty));
        }
        let Some(out) = out else {
            let b = Buf::get_device(buf, "reduce: buf", true)?;
            let d = Self::desc(Kind::Reduce, b.dtype, op, root, b.count);
            return Ok(ring_call(d, None, b));
        };
        let o = Buf::get_device(out, "reduce: out", true)?;
        let b = Buf::get_device(buf, "reduce: buf", false)?;
        same_dtype(&b, &o, "reduce")?;
        let d = Self::desc(Kind::Reduce, b.dtype, op, root, b.count);
        if b.same(&o) {
            return Ok(ring_call(d, None, o));
        }
        disjoint(&b, &o, "reduce")?;
        Ok(ring_call(d, Some(b), o))
    }

    fn all_gather_call(
        &self,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
    ) -> PyResult<Call> {
        let o = Buf::get_device(output, "all_gather: output", true)?;
        let i = Buf::get_device(input, "all_gather: input", false)?;
        same_dtype(&i, &o, "all_gather")?;
        let d = Self::desc(Kind::AllGather, i.dtype, ReduceOp::Sum, 0, i.count);
        // NCCL's in-place layout: the input is the output's own block.
        if i.len() > 0 && i.addr() == o.addr() + self.rank_() * i.len() {
            return Ok(ring_call(d, None, o));
        }
        disjoint(&i, &o, "all_gather")?;
        Ok(ring_call(d, Some(i), o))
    }

    fn reduce_scatter_call(
        &self,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
        op: &str,
    ) -> PyResult<Call> {
        let op = parse_op(op)?;
        let o = Buf::get_device(output, "reduce_scatter: output", true)?;
        let i = Buf::get_device(input, "reduce_scatter: input", false)?;
        same_dtype(&i, &o, "reduce_scatter")?;
        let d = Self::desc(Kind::ReduceScatter, i.dtype, op, 0, o.count);
        if o.len() > 0 && o.addr() == i.addr() + self.rank_() * o.len() {
            return Ok(ring_call(d, None, i));
        }
        disjoint(&i, &o, "reduce_scatter")?;
        Ok(ring_call(d, Some(i), o))
    }

    fn barrier_call(&self) -> Call {
        Box::new(|c| c.barrier())
    }

    fn batch_call(&self, ops: &Bound<'_, PyAny>) -> PyResult<Call> {
        let mut sends: Vec<(Buf, usize)> = Vec::new();
        let mut recvs: Vec<(Buf, usize)> = Vec::new();
        for item in ops.try_iter()? {
            let item = item?;
            let t = item.cast::<PyTuple>().map_err(|_| {
                invalid_argument("batch: each op is a tuple (\"send\" | \"recv\", buf, peer)")
            })?;
            let (kind, buf, peer): (String, Bound<'_, PyAny>, i64) = t.extract().map_err(|e| {
                invalid_argument(format!(
                    "batch: each op is a tuple (\"send\" | \"recv\", buf, peer): {e}"
                ))
            })?;
            let peer = rank_arg(peer, "batch: peer", self.world_())?;
            match kind.as_str() {
                "send" => sends.push((Buf::get(&buf, "batch: send buffer", false)?, peer)),
                "recv" => recvs.push((Buf::get(&buf, "batch: recv buffer", true)?, peer)),
                k => {
                    return Err(invalid_argument(format!(
                        "batch: op {k:?} is not \"send\" or \"recv\""
                    )));
                }
            }
        }
        for (i, (r, _)) in recvs.iter().enumerate() {
            let clash = recvs[i + 1..].iter().any(|(o, _)| o.overlaps(r))
                || sends.iter().any(|(s, _)| s.overlaps(r));
            if clash {
                return Err(invalid_argument(
                    "batch: a receive buffer overlaps another buffer of the batch",
                ));
            }
        }
        Ok(Box::new(move |c| {
            let mut recvs = recvs;
            let mut b = Batch::new();
            for (s, peer) in &sends {
                b.send_bytes(s.bytes(), s.dtype, *peer);
            }
            for (r, peer) in &mut recvs {
                let dtype = r.dtype;
                b.recv_bytes(r.bytes_mut(), dtype, *peer);
            }
            c.run_batch(b)
        }))
    }

    fn p2p_call(&self, buf: &Bound<'_, PyAny>, peer: i64, send: bool) -> PyResult<Call> {
        let py = buf.py();
        let kind = if send { "send" } else { "recv" };
        let list = PyList::new(py, [(kind, buf.clone(), peer).into_pyobject(py)?])?;
        self.batch_call(list.as_any())
    }

    fn all_to_all_call(
        &self,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
    ) -> PyResult<Call> {
        let o = Buf::get(output, "all_to_all: output", true)?;
        let i = Buf::get(input, "all_to_all: input", false)?;
        same_dtype(&i, &o, "all_to_all")?;
        disjoint(&i, &o, "all_to_all")?;
        if i.count % self.world_() != 0 {
            return Err(invalid_argument(format!(
                "rank {}: all_to_all: input of {} elements does not divide by the world size {}",
                self.rank_(),
                i.count,
                self.world_()
            )));
        }
        let (count, dtype) = (i.count, i.dtype);
        Ok(exchange_call(X::AllToAll, count, dtype, i, o))
    }

    #[allow(clippy::too_many_arguments)]
    fn all_to_all_v_call(
        &self,
        input: &Bound<'_, PyAny>,
        send_counts: Vec<i64>,
        send_displs: Vec<i64>,
        output: &Bound<'_, PyAny>,
        recv_counts: Vec<i64>,
        recv_displs: Vec<i64>,
    ) -> PyResult<Call> {
        let o = Buf::get(output, "all_to_all_v: output", true)?;
        let i = Buf::get(input, "all_to_all_v: input", false)?;
        same_dtype(&i, &o, "all_to_all_v")?;
        disjoint(&i, &o, "all_to_all_v")?;
        let args = [
            counts(send_counts, "all_to_all_v: send_counts")?,
            counts(send_displs, "all_to_all_v: send_displs")?,
            counts(recv_counts, "all_to_all_v: recv_counts")?,
            counts(recv_displs, "all_to_all_v: recv_displs")?,
        ];
        let dtype = i.dtype;
        Ok(exchange_call(X::AllToAllV(args), 0, dtype, i, o))
    }

    fn gather_call(
        &self,
        input: &Bound<'_, PyAny>,
        output: Option<&Bound<'_, PyAny>>,
        root: i64,
    ) -> PyResult<Call> {
        let py = input.py();
        let root = rank_arg(root, "gather: root", self.world_())?;
        let i = Buf::get(input, "gather: input", false)?;
        let o = match output {
            Some(out) if self.rank_() == root => {
                let o = Buf::get(out, "gather: output", true)?;
                same_dtype(&i, &o, "gather")?;
                disjoint(&i, &o, "gather")?;
                o
            }
            None if self.rank_() == root => {
                return Err(invalid_argument(format!(
                    "rank {root}: gather: the root needs an output buffer"
                )));
            }
            _ => Buf::empty(py, i.dtype),
        };
        let (count, dtype) = (i.count, i.dtype);
        Ok(exchange_call(X::Gather(root), count, dtype, i, o))
    }

    fn scatter_call(
        &self,
        input: Option<&Bound<'_, PyAny>>,
        output: &Bound<'_, PyAny>,
        root: i64,
    ) -> PyResult<Call> {
        let py = output.py();
        let root = rank_arg(root, "scatter: root", self.world_())?;
        let o = Buf::get(output, "scatter: output", true)?;
        let i = match input {
            Some(inp) if self.rank_() == root => {
                let i = Buf::get(inp, "scatter: input", false)?;
                same_dtype(&i, &o, "scatter")?;
                disjoint(&i, &o, "scatter")?;
                i
            }
            None if self.rank_() == root => {
                return Err(invalid_argument(format!(
                    "rank {root}: scatter: the root needs an input buffer"
                )));
            }
            _ => Buf::empty(py, o.dtype),
        };
        let (count, dtype) = (o.count, o.dtype);
        Ok(exchange_call(X::Scatter(root), count, dtype, i, o))
    }

    fn all_gather_v_call(
        &self,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
        counts_: Vec<i64>,
    ) -> PyResult<Call> {
        let o = Buf::get(output, "all_gather_v: output", true)?;
        let i = Buf::get(input, "all_gather_v: input", false)?;
        same_dtype(&i, &o, "all_gather_v")?;
        disjoint(&i, &o, "all_gather_v")?;
        let c = counts(counts_, "all_gather_v: counts")?;
        let dtype = i.dtype;
        Ok(exchange_call(X::AllGatherV(c), 0, dtype, i, o))
    }

    fn reduce_scatter_v_call(
        &self,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
        counts_: Vec<i64>,
        op: &str,
    ) -> PyResult<Call> {
        let op = parse_op(op)?;
        let o = Buf::get(output, "reduce_scatter_v: output", true)?;
        let i = Buf::get(input, "reduce_scatter_v: input", false)?;
        same_dtype(&i, &o, "reduce_scatter_v")?;
        disjoint(&i, &o, "reduce_scatter_v")?;
        let c = counts(counts_, "reduce_scatter_v: counts")?;
        let dtype = i.dtype;
        Ok(exchange_call(X::ReduceScatterV(c, op), 0, dtype, i, o))
    }
}

#[pymethods]
impl Communicator {
    /// Rank `rank` of a world of `world`, through the store of `unique_id`
    /// (made by one process with ``UniqueId()`` and handed to the others).
    #[new]
    fn new(py: Python<'_>, unique_id: &crate::UniqueId, rank: i64, world: i64) -> PyResult<Self> {
        let id = unique_id.id;
        let (rank, world) = rank_world(rank, world)?;
        let c = py
            .detach(|| oxccl::Communicator::init(&id, rank, world))
            .map_err(Failure::from)?;
        Ok(Communicator::wrap(c))
    }

    /// The communicator of this process as its launcher describes it (oxrun,
    /// torchrun, mpirun, srun: see oxccl's README).
    #[staticmethod]
    fn from_env(py: Python<'_>) -> PyResult<Self> {
        let c = py
            .detach(oxccl::Communicator::from_env)
            .map_err(Failure::from)?;
        Ok(Communicator::wrap(c))
    }

    /// Rank `rank` of `world` through a Python store object with
    /// ``set(key, value)``, ``get(key)``, ``add(key, amount)`` and,
    /// optionally, ``check(keys)`` (a ``torch.distributed.Store`` has them):
    /// every rank passes a store reaching the same data, and keys go under
    /// ``prefix``. Settings come from the ``OXCCL_*`` environment.
    #[staticmethod]
    ///
    /// ``secret`` (str or bytes, the same on every rank) authenticates the
    /// ranks' connections, as ``OXCCL_JOB_SECRET`` does (which it overrides).
    #[pyo3(signature = (store, rank, world, prefix=String::new(), secret=None), text_signature = "(store, rank, world, prefix='', secret=None)")]
    fn from_store(
        py: Python<'_>,
        store: &Bound<'_, PyAny>,
        rank: i64,
        world: i64,
        prefix: String,
        secret: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let (rank, world) = rank_world(rank, world)?;
        let s: Arc<dyn oxccl_transport::store::Store> =
            Arc::new(crate::store::PyStore::new(store)?);
        let s = if prefix.is_empty() {
            s
        } else {
            Arc::new(oxccl_transport::store::PrefixStore::new(s, &prefix))
        };
        let mut config = oxccl::Config::from_env().map_err(Failure::from)?;
        if let Some(secret) = secret {
            let text = if let Ok(b) = secret.cast::<PyBytes>() {
                b.as_bytes().iter().map(|x| format!("{x:02x}")).collect()
            } else {
                secret
                    .extract::<String>()
                    .map_err(|_| invalid_argument("from_store: secret must be str or bytes"))?
            };
            let s = oxccl::JobSecret::from_text(&text)
                .map_err(|e| invalid_argument(format!("from_store: secret {e}")))?;
            config.job_secret = Some(s);
        }
        let c = py
            .detach(|| oxccl::Communicator::with_store(s, rank, world, config))
            .map_err(Failure::from)?;
        Ok(Communicator::wrap(c))
    }

    /// This rank, in ``0..world``.
    #[getter]
    fn rank(&self) -> usize {
        self.rank_()
    }

    /// Number of ranks.
    #[getter]
    fn world(&self) -> usize {
        self.world_()
    }

    fn __repr__(&self) -> String {
        format!(
            "<oxccl.Communicator rank {} of {}>",
            self.rank_(),
            self.world_()
        )
    }

    /// Reduces ``buf`` over all ranks with ``op``; the result replaces ``buf``
    /// (or goes to ``out``) on every rank.
    #[pyo3(signature = (buf, op=String::from("sum"), out=None), text_signature = "(self, buf, op='sum', out=None)")]
    fn all_reduce(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        op: String,
        out: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let c = self.all_reduce_call(buf, &op, out)?;
        self.sync(py, c)
    }

    /// :meth:`all_reduce`, returning a :class:`Work` at once.
    #[pyo3(signature = (buf, op=String::from("sum"), out=None), text_signature = "(self, buf, op='sum', out=None)")]
    fn all_reduce_async(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        op: String,
        out: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Work> {
        let c = self.all_reduce_call(buf, &op, out)?;
        self.start(py, c)
    }

    /// Copies ``root``'s ``buf`` to every rank's ``buf`` (or ``out``).
    #[pyo3(signature = (buf, root, out=None))]
    fn broadcast(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        root: i64,
        out: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let c = self.broadcast_call(buf, root, out)?;
        self.sync(py, c)
    }

    /// :meth:`broadcast`, returning a :class:`Work` at once.
    #[pyo3(signature = (buf, root, out=None))]
    fn broadcast_async(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        root: i64,
        out: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Work> {
        let c = self.broadcast_call(buf, root, out)?;
        self.start(py, c)
    }

    /// Reduces ``buf`` over all ranks into ``root``'s ``buf`` (or ``out``);
    /// other ranks' buffers are not written.
    #[pyo3(signature = (buf, root, op=String::from("sum"), out=None), text_signature = "(self, buf, root, op='sum', out=None)")]
    fn reduce(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        root: i64,
        op: String,
        out: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let c = self.reduce_call(buf, root, &op, out)?;
        self.sync(py, c)
    }

    /// :meth:`reduce`, returning a :class:`Work` at once.
    #[pyo3(signature = (buf, root, op=String::from("sum"), out=None), text_signature = "(self, buf, root, op='sum', out=None)")]
    fn reduce_async(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        root: i64,
        op: String,
        out: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Work> {
        let c = self.reduce_call(buf, root, &op, out)?;
        self.start(py, c)
    }

    /// Concatenates every rank's ``input`` in rank order into ``output``
    /// (``world`` times as long). In place when ``input`` is ``output``'s
    /// block of this rank.
    fn all_gather(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let c = self.all_gather_call(input, output)?;
        self.sync(py, c)
    }

    /// :meth:`all_gather`, returning a :class:`Work` at once.
    fn all_gather_async(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
    ) -> PyResult<Work> {
        let c = self.all_gather_call(input, output)?;
        self.start(py, c)
    }

    /// Reduces ``input`` (``world`` blocks of ``len(output)``) over all
    /// ranks; rank ``r`` gets block ``r`` of the result in ``output``.
    #[pyo3(signature = (input, output, op=String::from("sum")), text_signature = "(self, input, output, op='sum')")]
    fn reduce_scatter(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
        op: String,
    ) -> PyResult<()> {
        let c = self.reduce_scatter_call(input, output, &op)?;
        self.sync(py, c)
    }

    /// :meth:`reduce_scatter`, returning a :class:`Work` at once.
    #[pyo3(signature = (input, output, op=String::from("sum")), text_signature = "(self, input, output, op='sum')")]
    fn reduce_scatter_async(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
        op: String,
    ) -> PyResult<Work> {
        let c = self.reduce_scatter_call(input, output, &op)?;
        self.start(py, c)
    }

    /// Returns once every rank has called it.
    fn barrier(&self, py: Python<'_>) -> PyResult<()> {
        self.sync(py, self.barrier_call())
    }

    /// :meth:`barrier`, returning a :class:`Work` at once.
    fn barrier_async(&self, py: Python<'_>) -> PyResult<Work> {
        self.start(py, self.barrier_call())
    }

    /// Sends ``buf`` to rank ``peer`` (which calls :meth:`recv`).
    fn send(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, peer: i64) -> PyResult<()> {
        let c = self.p2p_call(buf, peer, true)?;
        self.sync(py, c)
    }

    /// :meth:`send`, returning a :class:`Work` at once.
    fn send_async(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, peer: i64) -> PyResult<Work> {
        let c = self.p2p_call(buf, peer, true)?;
        self.start(py, c)
    }

    /// Receives from rank ``peer`` into ``buf``, which the message fills exactly.
    fn recv(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, peer: i64) -> PyResult<()> {
        let c = self.p2p_call(buf, peer, false)?;
        self.sync(py, c)
    }

    /// :meth:`recv`, returning a :class:`Work` at once.
    fn recv_async(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, peer: i64) -> PyResult<Work> {
        let c = self.p2p_call(buf, peer, false)?;
        self.start(py, c)
    }

    /// Runs sends and receives together, as NCCL's group calls:
    /// ``ops`` is a list of ``("send", buf, peer)`` and ``("recv", buf, peer)``.
    fn batch(&self, py: Python<'_>, ops: &Bound<'_, PyAny>) -> PyResult<()> {
        let c = self.batch_call(ops)?;
        self.sync(py, c)
    }

    /// :meth:`batch`, returning a :class:`Work` at once.
    fn batch_async(&self, py: Python<'_>, ops: &Bound<'_, PyAny>) -> PyResult<Work> {
        let c = self.batch_call(ops)?;
        self.start(py, c)
    }

    /// Sends block ``p`` of ``input`` to rank ``p``; block ``p`` of
    /// ``output`` comes from rank ``p`` (both ``world`` equal blocks).
    fn all_to_all(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let c = self.all_to_all_call(input, output)?;
        self.sync(py, c)
    }

    /// :meth:`all_to_all`, returning a :class:`Work` at once.
    fn all_to_all_async(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
    ) -> PyResult<Work> {
        let c = self.all_to_all_call(input, output)?;
        self.start(py, c)
    }

    /// :meth:`all_to_all` with per-peer counts and displacements in
    /// elements (``MPI_Alltoallv``).
    #[allow(clippy::too_many_arguments)]
    fn all_to_all_v(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        send_counts: Vec<i64>,
        send_displs: Vec<i64>,
        output: &Bound<'_, PyAny>,
        recv_counts: Vec<i64>,
        recv_displs: Vec<i64>,
    ) -> PyResult<()> {
        let c = self.all_to_all_v_call(
            input,
            send_counts,
            send_displs,
            output,
            recv_counts,
            recv_displs,
        )?;
        self.sync(py, c)
    }

    /// :meth:`all_to_all_v`, returning a :class:`Work` at once.
    #[allow(clippy::too_many_arguments)]
    fn all_to_all_v_async(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        send_counts: Vec<i64>,
        send_displs: Vec<i64>,
        output: &Bound<'_, PyAny>,
        recv_counts: Vec<i64>,
        recv_displs: Vec<i64>,
    ) -> PyResult<Work> {
        let c = self.all_to_all_v_call(
            input,
            send_counts,
            send_displs,
            output,
            recv_counts,
            recv_displs,
        )?;
        self.start(py, c)
    }

    /// Gathers every rank's ``input`` into ``root``'s ``output`` in rank
    /// order; ``output`` is ignored (may be None) on other ranks.
    #[pyo3(signature = (input, output, root))]
    fn gather(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        output: Option<&Bound<'_, PyAny>>,
        root: i64,
    ) -> PyResult<()> {
        let c = self.gather_call(input, output, root)?;
        self.sync(py, c)
    }

    /// :meth:`gather`, returning a :class:`Work` at once.
    #[pyo3(signature = (input, output, root))]
    fn gather_async(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        output: Option<&Bound<'_, PyAny>>,
        root: i64,
    ) -> PyResult<Work> {
        let c = self.gather_call(input, output, root)?;
        self.start(py, c)
    }

    /// Sends block ``p`` of ``root``'s ``input`` to rank ``p``'s ``output``;
    /// ``input`` is ignored (may be None) on other ranks.
    #[pyo3(signature = (input, output, root))]
    fn scatter(
        &self,
        py: Python<'_>,
        input: Option<&Bound<'_, PyAny>>,
        output: &Bound<'_, PyAny>,
        root: i64,
    ) -> PyResult<()> {
        let c = self.scatter_call(input, output, root)?;
        self.sync(py, c)
    }

    /// :meth:`scatter`, returning a :class:`Work` at once.
    #[pyo3(signature = (input, output, root))]
    fn scatter_async(
        &self,
        py: Python<'_>,
        input: Option<&Bound<'_, PyAny>>,
        output: &Bound<'_, PyAny>,
        root: i64,
    ) -> PyResult<Work> {
        let c = self.scatter_call(input, output, root)?;
        self.start(py, c)
    }

    /// Allgather with per-rank counts: rank ``p`` contributes ``counts[p]``
    /// elements; ``output`` gets them all packed in rank order.
    fn all_gather_v(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
        counts: Vec<i64>,
    ) -> PyResult<()> {
        let c = self.all_gather_v_call(input, output, counts)?;
        self.sync(py, c)
    }

    /// :meth:`all_gather_v`, returning a :class:`Work` at once.
    fn all_gather_v_async(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
        counts: Vec<i64>,
    ) -> PyResult<Work> {
        let c = self.all_gather_v_call(input, output, counts)?;
        self.start(py, c)
    }

    /// Reduce-scatter with per-rank counts: ``input`` holds every rank's
    /// block packed in rank order (``counts[p]`` elements for rank ``p``).
    #[pyo3(signature = (input, output, counts, op=String::from("sum")), text_signature = "(self, input, output, counts, op='sum')")]
    fn reduce_scatter_v(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
        counts: Vec<i64>,
        op: String,
    ) -> PyResult<()> {
        let c = self.reduce_scatter_v_call(input, output, counts, &op)?;
        self.sync(py, c)
    }

    /// :meth:`reduce_scatter_v`, returning a :class:`Work` at once.
    #[pyo3(signature = (input, output, counts, op=String::from("sum")), text_signature = "(self, input, output, counts, op='sum')")]
    fn reduce_scatter_v_async(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
        counts: Vec<i64>,
        op: String,
    ) -> PyResult<Work> {
        let c = self.reduce_scatter_v_call(input, output, counts, &op)?;
        self.start(py, c)
    }

    /// Splits the communicator: ranks passing the same ``color`` form a new
    /// one, ordered by ``key`` then rank; ``color=None`` takes part and gets
    /// None. Every rank calls it.
    #[pyo3(signature = (color, key=0))]
    fn split(&self, py: Python<'_>, color: Option<i64>, key: i64) -> PyResult<Option<Self>> {
        let color = match color {
            None => None,
            Some(c) => Some(u32::try_from(c).map_err(|_| {
                invalid_argument(format!(
                    "split: color {c} is not None or a non-negative 32-bit number"
                ))
            })?),
        };
        let s = self.shared.clone();
        let rank = s.rank;
        let sub = py
            .detach(move || {
                s.run(move |slot: &mut Slot| {
                    comm_of(slot, rank)?
                        .split(color, key)
                        .map_err(Failure::from)
                })
            })
            .map_err(PyErr::from)?;
        Ok(sub.map(Communicator::wrap))
    }

    /// A new communicator of the ranks that survived a failure: every
    /// survivor calls it, naming the ranks it knows are gone in ``exclude``.
    #[pyo3(signature = (exclude=Vec::new()), text_signature = "(self, exclude=[])")]
    fn shrink(&self, py: Python<'_>, exclude: Vec<i64>) -> PyResult<Self> {
        let exclude = counts(exclude, "shrink: exclude")?;
        let s = self.shared.clone();
        let rank = s.rank;
        let sub = py
            .detach(move || {
                s.run(move |slot: &mut Slot| {
                    comm_of(slot, rank)?.shrink(&exclude).map_err(Failure::from)
                })
            })
            .map_err(PyErr::from)?;
        Ok(Communicator::wrap(sub))
    }

    /// Aborts the communicator from any thread: a call in progress fails at
    /// once, peers learn of it within milliseconds, and later calls raise
    /// :class:`Aborted`.
    fn abort(&self) {
        self.shared.abort.abort();
    }
}

fn rank_world(rank: i64, world: i64) -> PyResult<(usize, usize)> {
    let world = usize::try_from(world)
        .ok()
        .filter(|w| *w > 0)
        .ok_or_else(|| invalid_argument(format!("world {world} must be at least 1")))?;
    let rank = rank_arg(rank, "rank", world)?;
    Ok((rank, world))
}
