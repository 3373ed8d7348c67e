//! oxccl's [`Store`] over a Python store object (a `torch.distributed.Store`
//! or anything with `set`, `get` and `add`), called under the GIL.

use std::time::{Duration, Instant};

use oxccl_transport::store::{Store, StoreError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

/// A Python store: `set(key, value: bytes)`, `get(key) -> bytes` (blocking
/// until the key is set), `add(key, amount) -> int`, and optionally
/// `check(keys) -> bool`, which [`Store::get`] polls to keep its deadline
/// and [`Store::try_get`] uses to answer without waiting. Without `check`,
/// both call `get`, which waits as long as the store's own timeout.
pub(crate) struct PyStore {
    obj: Py<PyAny>,
    has_check: bool,
    name: String,
}

impl std::fmt::Debug for PyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl PyStore {
    pub(crate) fn new(obj: &Bound<'_, PyAny>) -> PyResult<PyStore> {
        for m in ["set", "get", "add"] {
            if !obj.hasattr(m)? {
                return Err(crate::errors::invalid_argument(format!(
                    "from_store: the store (a {}) has no method {m}(): pass an object with \
                     set(key, value), get(key) and add(key, amount), such as a \
                     torch.distributed.TCPStore",
                    type_name(obj)
                )));
            }
        }
        Ok(PyStore {
            obj: obj.clone().unbind(),
            has_check: obj.hasattr("check")?,
            name: format!("python store {}", type_name(obj)),
        })
    }

    /// Refuses calls once the interpreter is exiting (see [`crate::exiting`]).
    fn alive(&self, key: &str) -> Result<(), StoreError> {
        if crate::exiting() {
            return Err(StoreError::Closed {
                store: self.name.clone(),
                detail: format!("the Python interpreter is exiting (key {key:?})"),
            });
        }
        Ok(())
    }

    fn fail(&self, what: &str, key: &str, e: PyErr) -> StoreError {
        StoreError::Closed {
            store: self.name.clone(),
            detail: format!("{what}({key:?}) raised {e}"),
        }
    }

    fn check(&self, key: &str) -> Result<bool, StoreError> {
        self.alive(key)?;
        Python::attach(|py| {
            let keys = PyList::new(py, [key])?;
            self.obj.bind(py).call_method1("check", (keys,))?.extract()
        })
        .map_err(|e| self.fail("check", key, e))
    }

    fn get_now(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.alive(key)?;
        Python::attach(|py| {
            let v = self.obj.bind(py).call_method1("get", (key,))?;
            value_bytes(&v)
        })
        .map_err(|e| self.fail("get", key, e))
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".into())
}

fn value_bytes(v: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(b) = v.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    if let Ok(s) = v.extract::<String>() {
        return Ok(s.into_bytes());
    }
    let b = v.call_method0("__bytes__")?;
    Ok(b.cast::<PyBytes>()?.as_bytes().to_vec())
}

impl Store for PyStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.alive(key)?;
        Python::attach(|py| {
            self.obj
                .bind(py)
                .call_method1("set", (key, PyBytes::new(py, value)))
                .map(|_| ())
        })
        .map_err(|e| self.fail("set", key, e))
    }

    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, StoreError> {
        if self.has_check {
            let start = Instant::now();
            let mut pause = Duration::from_millis(1);
            while !self.check(key)? {
                let now = Instant::now();
                if now >= deadline {
                    return Err(StoreError::Timeout {
                        key: key.to_owned(),
                        waited: now - start,
                        store: self.name.clone(),
                    });
                }
                std::thread::sleep(pause.min(deadline - now));
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
        self.get_now(key)
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if self.has_check && !self.check(key)? {
            return Ok(None);
        }
        self.get_now(key).map(Some)
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.alive(key)?;
        Python::attach(|py| {
            self.obj
                .bind(py)
                .call_method1("add", (key, delta))?
                .extract::<i64>()
        })
        .map_err(|e| self.fail("add", key, e))
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}
