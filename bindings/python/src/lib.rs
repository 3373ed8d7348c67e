//! The Python module `oxccl._oxccl` (re-exported by the `oxccl` package):
//! communicators, collectives on Python buffers without copying, async
//! Work handles, the fusion engine, and exceptions by error kind.
//!
//! `unsafe` lives in [`buffer`] only (DLPack capsules and the buffer
//! protocol); see its Safety note.

mod buffer;
mod comm;
#[cfg(feature = "cuda")]
mod cuda;
mod errors;
mod fusion;
mod store;
mod work;

use oxccl::{Config, DType, Descriptor, Kind, ReduceOp};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::buffer::Buf;
use crate::errors::{Failure, invalid_argument};

/// What every rank needs to find the others: a store's address, a job id
/// and the job's secret. ``UniqueId()`` starts the store in this process;
/// hand ``to_bytes()`` to the other ranks as a secret (it holds the job's
/// secret) and rebuild it there with ``UniqueId.from_bytes``.
#[pyclass(module = "oxccl", frozen)]
struct UniqueId {
    id: oxccl::UniqueId,
}

#[pymethods]
impl UniqueId {
    #[new]
    fn new(py: Python<'_>) -> PyResult<Self> {
        let id = py.detach(oxccl::UniqueId::new).map_err(Failure::from)?;
        Ok(UniqueId { id })
    }

    /// The 128-byte form.
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.id.to_bytes())
    }

    /// The id of a 128-byte form made by :meth:`to_bytes`.
    #[staticmethod]
    fn from_bytes(b: &[u8]) -> PyResult<Self> {
        let arr: &[u8; oxccl::UniqueId::LEN] = b.try_into().map_err(|_| {
            invalid_argument(format!(
                "UniqueId.from_bytes: {} bytes, not {}",
                b.len(),
                oxccl::UniqueId::LEN
            ))
        })?;
        let id = oxccl::UniqueId::from_bytes(arr).map_err(Failure::from)?;
        Ok(UniqueId { id })
    }

    fn __repr__(&self) -> String {
        format!("<oxccl.UniqueId store {}>", self.id.addr())
    }
}

fn kind_of(name: &str) -> PyResult<Kind> {
    Kind::ALL
        .into_iter()
        .find(|k| k.name() == name)
        .ok_or_else(|| invalid_argument(format!("unknown collective {name:?}")))
}

fn dtype_of(name: &str) -> PyResult<DType> {
    name.parse::<DType>().map_err(invalid_argument)
}

fn check_desc(
    kind: &str,
    dtype: &str,
    op: &str,
    root: usize,
    count: usize,
) -> PyResult<Descriptor> {
    Ok(Descriptor {
        kind: kind_of(kind)?,
        dtype: dtype_of(dtype)?,
        op: comm::parse_op(op)?,
        root,
        count,
    })
}

/// oxccl-check's input of ``rank`` for a call (``oxccl.check``): the exact
/// small integers ``oxccl-check`` uses, as bytes.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn _check_input<'py>(
    py: Python<'py>,
    kind: &str,
    dtype: &str,
    op: &str,
    root: usize,
    count: usize,
    world: usize,
    rank: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    let d = check_desc(kind, dtype, op, root, count)?;
    Ok(PyBytes::new(
        py,
        &oxccl_tools::pattern::input(&d, world, rank),
    ))
}

/// oxccl-check's count of the elements of ``output`` that differ from the
/// exact result of the call on ``rank``.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn _check_count_wrong(
    kind: &str,
    dtype: &str,
    op: &str,
    root: usize,
    count: usize,
    world: usize,
    rank: usize,
    output: &Bound<'_, PyAny>,
) -> PyResult<usize> {
    let d = check_desc(kind, dtype, op, root, count)?;
    let out = Buf::get(output, "output", false)?;
    Ok(oxccl_tools::pattern::count_wrong(
        &d,
        world,
        rank,
        out.bytes(),
    ))
}

fn uneven(
    kind: &str,
    dtype: &str,
    op: &str,
    count: usize,
    world: usize,
) -> PyResult<oxccl_tools::pattern::Uneven> {
    Ok(oxccl_tools::pattern::Uneven {
        kind: kind_of(kind)?,
        dtype: dtype_of(dtype)?,
        op: comm::parse_op(op)?,
        count,
        world,
    })
}

/// Type of `_check_uneven`'s result: input, counts, layout, output length.
type UnevenCall<'py> = (Bound<'py, PyBytes>, Vec<usize>, [Vec<usize>; 4], usize);

/// oxccl-check's call of per-rank counts (all_to_all_v, all_gather_v,
/// reduce_scatter_v with blocks of 0, half and all of ``count``) on
/// ``rank``: ``(input, counts, [send_counts, send_displs, recv_counts,
/// recv_displs], output_bytes)``.
#[pyfunction]
fn _check_uneven<'py>(
    py: Python<'py>,
    kind: &str,
    dtype: &str,
    op: &str,
    count: usize,
    world: usize,
    rank: usize,
) -> PyResult<UnevenCall<'py>> {
    let u = uneven(kind, dtype, op, count, world)?;
    Ok((
        PyBytes::new(py, &u.input(rank)),
        u.counts(),
        u.layout(rank),
        u.output_len(rank),
    ))
}

/// oxccl-check's count of wrong elements of a call of per-rank counts.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn _check_uneven_wrong(
    kind: &str,
    dtype: &str,
    op: &str,
    count: usize,
    world: usize,
    rank: usize,
    output: &Bound<'_, PyAny>,
) -> PyResult<usize> {
    let u = uneven(kind, dtype, op, count, world)?;
    let out = Buf::get(output, "output", false)?;
    Ok(u.count_wrong(rank, out.bytes()))
}

/// The names of oxccl's dtypes, ops and collectives: ``(dtypes, ops, kinds)``.
#[pyfunction]
fn _names() -> (Vec<&'static str>, Vec<&'static str>, Vec<&'static str>) {
    (
        DType::ALL.iter().map(|d| d.name()).collect(),
        ReduceOp::ALL.iter().map(|o| o.name()).collect(),
        Kind::ALL.iter().map(|k| k.name()).collect(),
    )
}

static EXITING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the interpreter is exiting (an `atexit` hook set it): threads
/// of oxccl then no longer take the GIL, which could hang or end them.
pub(crate) fn exiting() -> bool {
    EXITING.load(std::sync::atomic::Ordering::SeqCst)
}

/// Registered with `atexit`: see [`exiting`].
#[pyfunction]
fn _at_exit() {
    EXITING.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// A log subscriber for oxccl's messages at ``OXCCL_DEBUG`` (default
/// warn) on stderr, unless the process installed one already.
fn init_logging() {
    let level = Config::from_env()
        .map(|c| c.debug)
        .unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            oxccl::config::log_filter(&level),
        ))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

#[pymodule]
fn _oxccl(m: &Bound<'_, PyModule>) -> PyResult<()> {
    init_logging();
    errors::register(m)?;
    m.add_class::<UniqueId>()?;
    m.add_class::<comm::Communicator>()?;
    m.add_class::<work::Work>()?;
    m.add_class::<fusion::FusionEngine>()?;
    m.add_function(wrap_pyfunction!(_check_input, m)?)?;
    m.add_function(wrap_pyfunction!(_check_count_wrong, m)?)?;
    m.add_function(wrap_pyfunction!(_names, m)?)?;
    m.add_function(wrap_pyfunction!(_check_uneven, m)?)?;
    m.add_function(wrap_pyfunction!(_check_uneven_wrong, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Built with the cuda feature: the ring collectives take CUDA tensors
    // (without, CUDA tensors raise UnavailableBackend).
    m.add("HAS_CUDA", cfg!(feature = "cuda"))?;
    let at_exit = wrap_pyfunction!(_at_exit, m)?;
    m.py()
        .import("atexit")?
        .call_method1("register", (at_exit,))?;
    Ok(())
}
