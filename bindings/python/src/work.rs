//! Calls in order on one communicator: inline when nothing is queued, else
//! on the communicator's worker thread; and `Work`, the handle of an async call.

use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use oxccl::{AbortHandle, ErrorKind};
use pyo3::prelude::*;

use crate::errors::Failure;

/// The Rust communicator; `None` while a `FusionEngine` holds it.
pub(crate) type Slot = Option<oxccl::Communicator>;
type Job = Box<dyn FnOnce(&mut Slot) + Send>;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct Queue {
    /// Calls submitted and not yet finished on the worker.
    pending: usize,
    tx: Option<Sender<Job>>,
    closed: bool,
}

/// One communicator's state, shared by its Python object, its worker
/// thread and a fusion engine made from it.
pub(crate) struct Shared {
    pub(crate) slot: Mutex<Slot>,
    queue: Mutex<Queue>,
    pub(crate) abort: AbortHandle,
    pub(crate) rank: usize,
    pub(crate) world: usize,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish_non_exhaustive()
    }
}

fn no_comm(rank: usize) -> Failure {
    Failure {
        kind: ErrorKind::InvalidUsage,
        message: format!(
            "rank {rank}: the communicator is held by a FusionEngine (or was closed): call \
             the engine's shutdown() to use it directly again"
        ),
    }
}

impl Shared {
    pub(crate) fn new(comm: oxccl::Communicator) -> Arc<Shared> {
        Arc::new(Shared {
            rank: comm.rank(),
            world: comm.world(),
            abort: comm.abort_handle(),
            slot: Mutex::new(Some(comm)),
            queue: Mutex::new(Queue::default()),
        })
    }

    /// Runs `f` after every call submitted before it, and waits for it.
    /// Call with the GIL released.
    pub(crate) fn run<R, F>(self: &Arc<Self>, f: F) -> Result<R, Failure>
    where
        R: Send + 'static,
        F: FnOnce(&mut Slot) -> Result<R, Failure> + Send + 'static,
    {
        let q = lock(&self.queue);
        if q.pending == 0 {
            let mut slot = lock(&self.slot);
            drop(q);
            return f(&mut slot);
        }
        let (tx, rx) = channel();
        self.submit_locked(
            q,
            Box::new(move |slot| {
                let _ = tx.send(f(slot));
            }),
        )?;
        rx.recv().unwrap_or_else(|_| {
            Err(Failure {
                kind: ErrorKind::Internal,
                message: format!("rank {}: the call panicked", self.rank),
            })
        })
    }

    /// Queues `f` behind every earlier call and returns its Work at once.
    pub(crate) fn spawn<F>(self: &Arc<Self>, f: F) -> Result<Work, Failure>
    where
        F: FnOnce(&mut Slot) -> Result<(), Failure> + Send + 'static,
    {
        let work = Work::new();
        let done = Completer(Some(work.state.clone()));
        let q = lock(&self.queue);
        self.submit_locked(
            q,
            Box::new(move |slot| {
                let mut done = done;
                let r = f(slot);
                done.finish(r);
            }),
        )?;
        Ok(work)
    }

    fn submit_locked(
        self: &Arc<Self>,
        mut q: MutexGuard<'_, Queue>,
        job: Job,
    ) -> Result<(), Failure> {
        if q.closed {
            return Err(Failure {
                kind: ErrorKind::InvalidUsage,
                message: format!("rank {}: the communicator is closed", self.rank),
            });
        }
        if q.tx.is_none() {
            let (tx, rx) = channel::<Job>();
            let me = self.clone();
            std::thread::Builder::new()
                .name(format!("oxccl-py-{}", self.rank))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        {
                            let mut slot = lock(&me.slot);
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                job(&mut slot)
                            }));
                        }
                        lock(&me.queue).pending -= 1;
                    }
                })
                .map_err(|e| Failure {
                    kind: ErrorKind::System,
                    message: format!("rank {}: cannot start the worker thread: {e}", self.rank),
                })?;
            q.tx = Some(tx);
        }
        let tx = q.tx.as_ref().ok_or_else(|| no_comm(self.rank))?;
        tx.send(job).map_err(|_| Failure {
            kind: ErrorKind::Internal,
            message: format!("rank {}: the worker thread is gone", self.rank),
        })?;
        q.pending += 1;
        Ok(())
    }

    /// Stops taking calls; the worker finishes the queued ones and exits.
    pub(crate) fn close(&self) {
        let mut q = lock(&self.queue);
        q.closed = true;
        q.tx = None;
    }
}

/// The communicator of a slot, or the error that it is lent out.
pub(crate) fn comm_of(slot: &mut Slot, rank: usize) -> Result<&mut oxccl::Communicator, Failure> {
    slot.as_mut().ok_or_else(|| no_comm(rank))
}

#[derive(Default)]
pub(crate) struct WorkState {
    done: Mutex<Option<Result<(), Failure>>>,
    cv: Condvar,
}

impl WorkState {
    pub(crate) fn is_done(&self) -> bool {
        lock(&self.done).is_some()
    }

    pub(crate) fn complete(&self, r: Result<(), Failure>) {
        *lock(&self.done) = Some(r);
        self.cv.notify_all();
    }
}

/// Completes its Work when dropped without [`finish`](Self::finish) (a panic).
pub(crate) struct Completer(pub(crate) Option<Arc<WorkState>>);

impl Completer {
    pub(crate) fn finish(&mut self, r: Result<(), Failure>) {
        if let Some(s) = self.0.take() {
            s.complete(r);
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        self.finish(Err(Failure {
            kind: ErrorKind::Internal,
            message: "the operation panicked".into(),
        }));
    }
}

/// The handle of an asynchronous operation (`*_async`). The buffers it uses
/// stay alive until it completes.
#[pyclass(module = "oxccl", frozen)]
pub(crate) struct Work {
    pub(crate) state: Arc<WorkState>,
}

impl Work {
    pub(crate) fn new() -> Work {
        Work {
            state: Arc::new(WorkState::default()),
        }
    }

    /// Waits for completion (the GIL must be released), at most `timeout`.
    pub(crate) fn wait_for(&self, timeout: Option<Duration>) -> Option<Result<(), Failure>> {
        let deadline = timeout.map(|t| Instant::now() + t.min(Duration::from_secs(1 << 32)));
        let mut g = lock(&self.state.done);
        loop {
            if let Some(r) = &*g {
                return Some(r.clone());
            }
            match deadline {
                None => g = self.state.cv.wait(g).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    g = self
                        .state
                        .cv
                        .wait_timeout(g, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }
}

#[pymethods]
impl Work {
    /// Waits until the operation completes; returns True. With `timeout`
    /// (seconds), returns False if it has not completed by then. Raises the
    /// operation's oxccl exception if it failed. The GIL is released while
    /// waiting.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let timeout = match timeout {
            None => None,
            Some(t) if t.is_finite() && t >= 0.0 => Some(Duration::from_secs_f64(t.min(1e9))),
            Some(t) => {
                return Err(crate::errors::invalid_argument(format!(
                    "Work.wait: timeout {t} is not a non-negative number of seconds"
                )));
            }
        };
        match py.detach(|| self.wait_for(timeout)) {
            None => Ok(false),
            Some(Ok(())) => Ok(true),
            Some(Err(f)) => Err(f.into()),
        }
    }

    /// Whether the operation has completed (successfully or not).
    fn is_completed(&self) -> bool {
        lock(&self.state.done).is_some()
    }

    /// The exception the operation failed with, or None (also while it runs).
    fn exception(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        let g = lock(&self.state.done);
        match &*g {
            Some(Err(f)) => {
                let e: PyErr = f.clone().into();
                Some(e.into_value(py).into_any())
            }
            _ => None,
        }
    }

    fn __repr__(&self) -> String {
        let g = lock(&self.state.done);
        match &*g {
            None => "<oxccl.Work pending>".into(),
            Some(Ok(())) => "<oxccl.Work completed>".into(),
            Some(Err(f)) => format!("<oxccl.Work failed: {}>", f.message),
        }
    }
}
