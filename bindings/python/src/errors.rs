//! oxccl's error kinds as Python exception classes.
//!
//! `oxccl.Error(RuntimeError)` is the base; each [`ErrorKind`] has a
//! subclass, some of which also derive from the builtin a Python caller
//! would catch (`InvalidArgument` is a `ValueError`, `Timeout` a
//! `TimeoutError`, `SystemFailure` an `OSError`). The message is the Rust
//! error's `Display`, which names the rank, the call and the peer.

use oxccl::ErrorKind;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

/// A failed call, as it crosses threads before it becomes a Python exception.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) kind: ErrorKind,
    pub(crate) message: String,
}

impl From<oxccl::Error> for Failure {
    fn from(e: oxccl::Error) -> Failure {
        Failure {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

impl From<Failure> for PyErr {
    fn from(f: Failure) -> PyErr {
        new_err(f.kind, f.message)
    }
}

/// The classes: (name, kind, extra builtin base, doc).
const CLASSES: [(&str, ErrorKind, Option<&str>, &str); 8] = [
    (
        "InvalidArgument",
        ErrorKind::InvalidArgument,
        Some("ValueError"),
        "A bad argument: wrong sizes or dtypes, a rank out of range, a bad setting.",
    ),
    (
        "InvalidUsage",
        ErrorKind::InvalidUsage,
        None,
        "A valid call at the wrong time, or ranks that disagree on a call.",
    ),
    (
        "SystemFailure",
        ErrorKind::System,
        Some("OSError"),
        "The operating system failed a call (sockets, files, shared memory).",
    ),
    (
        "RemoteError",
        ErrorKind::Remote,
        None,
        "A peer failed: it died, closed its links or reported an error. The message names it.",
    ),
    (
        "Timeout",
        ErrorKind::Timeout,
        Some("TimeoutError"),
        "A deadline passed (OXCCL_TIMEOUT).",
    ),
    (
        "UnavailableBackend",
        ErrorKind::UnavailableBackend,
        None,
        "The requested backend or device memory is not available in this build.",
    ),
    (
        "InternalError",
        ErrorKind::Internal,
        None,
        "A bug in oxccl.",
    ),
    (
        "Aborted",
        ErrorKind::Aborted,
        None,
        "The communicator was aborted or poisoned by an earlier failure (the message gives it).",
    ),
];

struct Classes {
    base: Py<PyType>,
    kinds: Vec<(ErrorKind, Py<PyType>)>,
}

static CLASSES_CELL: PyOnceLock<Classes> = PyOnceLock::new();

fn make_class(
    py: Python<'_>,
    name: &str,
    bases: Bound<'_, PyTuple>,
    doc: &str,
) -> PyResult<Py<PyType>> {
    let dict = PyDict::new(py);
    dict.set_item("__module__", "oxccl")?;
    dict.set_item("__doc__", doc)?;
    let builtins = py.import("builtins")?;
    let t = builtins
        .getattr("type")?
        .call1((name, bases, dict))?
        .cast_into::<PyType>()?;
    Ok(t.unbind())
}

fn classes(py: Python<'_>) -> PyResult<&Classes> {
    CLASSES_CELL.get_or_try_init(py, || {
        let builtins = py.import("builtins")?;
        let base = make_class(
            py,
            "Error",
            PyTuple::new(py, [builtins.getattr("RuntimeError")?])?,
            "Every error oxccl raises. Subclasses follow oxccl's error kind.",
        )?;
        let mut kinds = Vec::new();
        for (name, kind, extra, doc) in CLASSES {
            let mut bases = vec![base.bind(py).clone().into_any()];
            if let Some(b) = extra {
                bases.push(builtins.getattr(b)?);
            }
            kinds.push((kind, make_class(py, name, PyTuple::new(py, bases)?, doc)?));
        }
        Ok(Classes { base, kinds })
    })
}

/// Adds the classes to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let c = classes(py)?;
    m.add("Error", c.base.bind(py))?;
    for ((name, ..), (_, t)) in CLASSES.iter().zip(&c.kinds) {
        m.add(*name, t.bind(py))?;
    }
    Ok(())
}

/// The exception of `kind` with `message`.
pub(crate) fn new_err(kind: ErrorKind, message: String) -> PyErr {
    Python::attach(|py| match classes(py) {
        Ok(c) => {
            let t = c
                .kinds
                .iter()
                .find(|(k, _)| *k == kind)
                .map_or(&c.base, |(_, t)| t);
            PyErr::from_type(t.bind(py).clone(), message)
        }
        Err(e) => e,
    })
}

pub(crate) fn invalid_argument(message: impl Into<String>) -> PyErr {
    new_err(ErrorKind::InvalidArgument, message.into())
}

pub(crate) fn invalid_usage(message: impl Into<String>) -> PyErr {
    new_err(ErrorKind::InvalidUsage, message.into())
}

pub(crate) fn unavailable_backend(message: impl Into<String>) -> PyErr {
    new_err(ErrorKind::UnavailableBackend, message.into())
}

pub(crate) fn internal(message: impl Into<String>) -> PyErr {
    new_err(ErrorKind::Internal, message.into())
}
