//! Horovod-style tensor fusion: an asynchronous engine that batches many small
//! collectives into a few large ones.
//!
//! A [`FusionEngine`] owns a [`Communicator`] on a background thread. The
//! application submits named tensors ([`FusionEngine::allreduce_async`],
//! [`allgather_async`](FusionEngine::allgather_async),
//! [`broadcast_async`](FusionEngine::broadcast_async)) in any order, and gets
//! a [`Handle`] whose [`wait`](Handle::wait) gives the tensor back reduced.
//!
//! Every cycle (`OXCCL_CYCLE_TIME_MS`) the ranks agree which names are ready
//! everywhere, so that all ranks run the same collectives in the same order
//! whatever order they submitted in:
//!
//! - **Response cache.** A name seen before with the same shape, dtype and op
//!   has a slot in a cache that is identical on every rank. Each cycle starts
//!   with one small allreduce (sum) of a `u32` per cache slot: 1 where this
//!   rank has that tensor ready. Slots that sum to the world size run at once,
//!   in slot order. In steady-state training this is the only negotiation.
//! - **Coordination round.** When some rank holds a tensor the cache does not
//!   know (or a stall check is due, or a rank shuts down), every rank sends
//!   its pending list to rank 0 (an allgather of lengths, then of the padded
//!   lists); rank 0 decides (ready names in its own submission order, errors
//!   for duplicates and mismatches, stall warnings) and broadcasts the answer.
//!   Ready names join the cache.
//! - **Fusion.** Ready tensors of the same kind, dtype, op and root are packed
//!   into a bucket of at most `OXCCL_FUSION_THRESHOLD` bytes, reduced in one
//!   collective, and unpacked. A bucket of one tensor (in particular a tensor
//!   above the threshold) runs in place, without a copy.
//! - **Stall inspector.** A tensor that some ranks submitted and others have
//!   not for `OXCCL_STALL_WARNING_SECS` is named by rank 0 in a `tracing`
//!   warning (also kept in [`FusionEngine::stall_warnings`] on every rank),
//!   with the ranks that miss it; after `OXCCL_STALL_SHUTDOWN_SECS` (if not 0)
//!   every pending handle fails and the engine stops.
//! - **Timeline.** `OXCCL_TIMELINE=path` writes a Chrome trace of every
//!   tensor's phases (see the `timeline` module docs).
//!
//! Errors: a name submitted twice before it completed, or submitted with a
//! different shape, dtype, op or root on different ranks, fails that name's
//! handles on every rank, with a message naming the tensor and the ranks. A
//! communicator failure fails every pending handle (kind
//! [`ErrorKind::Aborted`], [`Error::cause_kind`] the original's, the original
//! message included) and closes the engine. [`Handle::wait`] gives up after
//! the communicator's timeout (`OXCCL_TIMEOUT`).
//!
//! ```
//! use oxccl::fusion::FusionEngine;
//! use oxccl::{Communicator, Config, ReduceOp};
//!
//! let engines: Vec<FusionEngine> = Communicator::in_process(2, Config::default())
//!     .unwrap()
//!     .into_iter()
//!     .map(|c| FusionEngine::new(c).unwrap())
//!     .collect();
//! let handles: Vec<_> = engines
//!     .iter()
//!     .map(|e| {
//!         let a = e.allreduce_async("a", vec![e.rank() as f32; 3], ReduceOp::Sum);
//!         let b = e.allreduce_async("b", vec![1i64; 5], ReduceOp::Sum);
//!         (a, b)
//!     })
//!     .collect();
//! for (a, b) in handles {
//!     assert_eq!(a.wait().unwrap(), vec![1.0f32; 3]);
//!     assert_eq!(b.wait().unwrap(), vec![2i64; 5]);
//! }
//! ```

pub(crate) mod plan;
mod timeline;
pub(crate) mod wire;
mod worker;

use std::any::Any;
use std::marker::PhantomData;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use oxccl_kernels::{Element, ReduceOp};

use crate::schedule::Kind;
use crate::{Communicator, Error, ErrorKind, Result};
use wire::Meta;

/// Counters of a fusion engine, for tests and monitoring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FusionStats {
    /// Negotiation cycles run (each starts with the cache allreduce).
    pub cycles: u64,
    /// Cycles that needed a coordination round through rank 0.
    pub coordination_rounds: u64,
    /// Tensors scheduled by the response cache alone.
    pub cache_hits: u64,
    /// Tensors scheduled by a coordination round.
    pub negotiated: u64,
    /// Collectives run on tensor data (a bucket of one or more tensors).
    pub collectives: u64,
    /// Of those, the ones that carried more than one tensor.
    pub fused_collectives: u64,
    /// Tensors completed by a collective.
    pub tensors: u64,
    /// Bytes of tensor data those collectives moved (buffer sizes).
    pub bytes: u64,
    /// Handles failed with an error.
    pub failed: u64,
    /// Entries in the response cache.
    pub cache_entries: u64,
}

/// A tensor the engine holds, type-erased.
trait Buffer: Send {
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
    /// A zeroed buffer of the same element type and `elems` elements.
    fn zeroed(&self, elems: usize) -> Box<dyn Buffer>;
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

impl<T: Element> Buffer for Vec<T> {
    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self)
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(self)
    }
    fn zeroed(&self, elems: usize) -> Box<dyn Buffer> {
        Box::new(vec![T::zeroed(); elems])
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

type Outcome = Result<Box<dyn Buffer>>;

/// A tensor handed to the background thread.
struct Submission {
    name: String,
    meta: Meta,
    buf: Box<dyn Buffer>,
    tx: Sender<Outcome>,
    at: Instant,
}

/// What the application threads and the background thread share.
struct Shared {
    state: Mutex<State>,
    /// Wakes the background thread (an enqueue on an idle engine, shutdown).
    wake: Condvar,
    /// Signals completions (for `synchronize`).
    done: Condvar,
}

/// Whether the background thread starts cycles before the timer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Flush {
    /// No: every cycle_time (Horovod's pacing).
    #[default]
    Off,
    /// The next cycle at once: asked for and not yet started.
    Asked,
    /// Each next cycle at once while the last one completed something,
    /// until nothing is outstanding.
    On,
}

#[derive(Default)]
struct State {
    incoming: Vec<Submission>,
    shutdown: bool,
    /// Why the engine stopped, once it has.
    closed: Option<(ErrorKind, String)>,
    /// Handles submitted and not yet completed.
    outstanding: u64,
    /// Completions so far (progress, for `synchronize`'s deadline).
    completed: u64,
    /// Someone waits for the outstanding tensors ([`FusionEngine::flush`]):
    /// cycles need not wait for the timer.
    flush: Flush,
    /// Live [`Hold`]s: while any, the background thread leaves `incoming`
    /// where it is, so that a group of submissions is negotiated together.
    holds: usize,
    stats: FusionStats,
    warnings: Vec<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The error a closed engine gives to every later submission.
fn closed_error(rank: usize, kind: ErrorKind, cause: &str) -> Error {
    Error::Aborted {
        rank,
        kind,
        cause: format!("fusion engine closed: {cause}"),
    }
}

/// Runs collectives on named tensors asynchronously, fusing small ones. See
/// the [module docs](self).
pub struct FusionEngine {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Communicator>>,
    rank: usize,
    world: usize,
    timeout: Duration,
}

impl std::fmt::Debug for FusionEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusionEngine")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish_non_exhaustive()
    }
}

impl FusionEngine {
    /// Starts an engine on `comm`, with the fusion settings of `comm.config()`
    /// (cycle time, fusion threshold, stall times, timeline). Every rank of
    /// the world must start one, and use `comm` only through it.
    pub fn new(comm: Communicator) -> Result<FusionEngine> {
        let rank = comm.rank();
        let world = comm.world();
        let timeout = comm.config().timeout;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            done: Condvar::new(),
        });
        let w = worker::Worker::new(comm, shared.clone())?;
        let thread = std::thread::Builder::new()
            .name(format!("oxccl-fusion-{rank}"))
            .spawn(move || w.run())
            .map_err(|e| {
                Error::Internal(format!("rank {rank}: cannot start fusion thread: {e}"))
            })?;
        Ok(FusionEngine {
            shared,
            thread: Some(thread),
            rank,
            world,
            timeout,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Counters so far.
    pub fn stats(&self) -> FusionStats {
        self.shared.lock().stats
    }

    /// Stall warnings rank 0 issued so far (the same on every rank).
    pub fn stall_warnings(&self) -> Vec<String> {
        self.shared.lock().warnings.clone()
    }

    /// Reduces `tensor` over all ranks with `op`; the handle gives it back reduced.
    pub fn allreduce_async<T: Element>(
        &self,
        name: impl Into<String>,
        tensor: Vec<T>,
        op: ReduceOp,
    ) -> Handle<T> {
        let meta = Meta::new(Kind::AllReduce, T::DTYPE, op, 0, tensor.len());
        self.submit(name.into(), meta, Box::new(tensor))
    }

    /// Concatenates every rank's `tensor` in rank order; every rank must
    /// submit the same number of elements. The handle gives a vector of
    /// `world * tensor.len()` elements.
    pub fn allgather_async<T: Element>(
        &self,
        name: impl Into<String>,
        tensor: Vec<T>,
    ) -> Handle<T> {
        let meta = Meta::new(Kind::AllGather, T::DTYPE, ReduceOp::Sum, 0, tensor.len());
        self.submit(name.into(), meta, Box::new(tensor))
    }

    /// Copies `root`'s `tensor` to every rank (whose `tensor` gives the length
    /// and is overwritten).
    pub fn broadcast_async<T: Element>(
        &self,
        name: impl Into<String>,
        tensor: Vec<T>,
        root: usize,
    ) -> Handle<T> {
        let meta = Meta::new(Kind::Broadcast, T::DTYPE, ReduceOp::Sum, root, tensor.len());
        self.submit(name.into(), meta, Box::new(tensor))
    }

    fn submit<T: Element>(&self, name: String, meta: Meta, buf: Box<dyn Buffer>) -> Handle<T> {
        let (tx, rx) = channel();
        let handle = Handle {
            rx,
            name: name.clone(),
            what: meta.to_string(),
            rank: self.rank,
            timeout: self.timeout,
            _t: PhantomData,
        };
        let mut st = self.shared.lock();
        if let Some((kind, cause)) = &st.closed {
            let _ = tx.send(Err(closed_error(self.rank, *kind, cause)));
            return handle;
        }
        if meta.kind == Kind::Broadcast && meta.root >= self.world {
            let _ = tx.send(Err(Error::InvalidArgument(format!(
                "rank {}: broadcast of tensor '{name}': root {} is not in a world of {}",
                self.rank, meta.root, self.world
            ))));
            return handle;
        }
        // Under a hold the background thread cannot take it yet: the hold's
        // drop wakes it (a wake now would cost a context switch mid-group).
        let wake = st.incoming.is_empty() && st.holds == 0;
        st.incoming.push(Submission {
            name,
            meta,
            buf,
            tx,
            at: Instant::now(),
        });
        st.outstanding += 1;
        drop(st);
        if wake {
            self.shared.wake.notify_all();
        }
        handle
    }

    /// Holds the submissions made until the returned guard drops: the
    /// negotiation sees them together, so that a group submitted at once on
    /// every rank (a step's gradients) is agreed in one cycle and fused, not
    /// split over the cycles that happen to start while it is submitted.
    /// Cycles go on meanwhile with what was submitted before.
    pub fn hold(&self) -> Hold<'_> {
        self.shared.lock().holds += 1;
        Hold { engine: self }
    }

    /// Starts the next negotiation cycle now rather than at the cycle timer,
    /// and the ones after it as soon as each completes something, until
    /// every tensor submitted so far has completed: for a caller about to
    /// wait for its tensors (an optimizer's step after the backward pass),
    /// whose last submissions would otherwise wait up to a cycle. A cycle
    /// is collective, so a rank that flushes early waits in it for the
    /// others' next cycle. Does nothing when nothing is outstanding.
    pub fn flush(&self) {
        let mut st = self.shared.lock();
        if st.outstanding > 0 && st.flush == Flush::Off {
            st.flush = Flush::Asked;
            drop(st);
            self.shared.wake.notify_all();
        }
    }

    /// Waits until every handle submitted so far (and since) has completed,
    /// successfully or not ([`flush`](Self::flush)ing first). Fails after the
    /// communicator's timeout without a completion.
    pub fn synchronize(&self) -> Result<()> {
        self.flush();
        let mut st = self.shared.lock();
        let mut seen = st.completed;
        let mut deadline = crate::deadline_in(self.timeout);
        while st.outstanding > 0 {
            if st.completed != seen {
                seen = st.completed;
                deadline = crate::deadline_in(self.timeout);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    rank: self.rank,
                    call: "fusion synchronize".into(),
                    what: format!("{} pending tensors to complete", st.outstanding),
                    waited: self.timeout,
                });
            }
            st = self
                .shared
                .done
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Stops the engine on every rank and gives the communicator back. Other
    /// ranks' engines stop too; tensors still pending anywhere (submitted by
    /// some ranks only) fail, naming the ranks that shut down. Call
    /// [`synchronize`](Self::synchronize) first to finish outstanding work.
    pub fn shutdown(mut self) -> Result<Communicator> {
        self.stop()
            .ok_or_else(|| Error::Internal(format!("rank {}: fusion thread panicked", self.rank)))
    }

    fn stop(&mut self) -> Option<Communicator> {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for FusionEngine {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop();
        }
    }
}

/// Submissions made while it lives wait for its drop to be negotiated (see
/// [`FusionEngine::hold`]).
#[derive(Debug)]
#[must_use = "submissions are held until the guard drops"]
pub struct Hold<'a> {
    engine: &'a FusionEngine,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut st = self.engine.shared.lock();
        st.holds = st.holds.saturating_sub(1);
        let wake = st.holds == 0 && !st.incoming.is_empty();
        drop(st);
        if wake {
            self.engine.shared.wake.notify_all();
        }
    }
}

/// The future result of a submitted tensor.
pub struct Handle<T: Element> {
    rx: Receiver<Outcome>,
    name: String,
    what: String,
    rank: usize,
    timeout: Duration,
    _t: PhantomData<fn() -> T>,
}

impl<T: Element> std::fmt::Debug for Handle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("name", &self.name)
            .field("call", &self.what)
            .finish_non_exhaustive()
    }
}

impl<T: Element> Handle<T> {
    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for the result (or the error), at most the communicator's timeout.
    pub fn wait(self) -> Result<Vec<T>> {
        let t = self.timeout;
        self.wait_timeout(t)
    }

    /// Waits for the result (or the error), at most `timeout`.
    pub fn wait_timeout(self, timeout: Duration) -> Result<Vec<T>> {
        let outcome = match self.rx.recv_timeout(timeout) {
            Ok(o) => o,
            Err(RecvTimeoutError::Timeout) => {
                return Err(Error::Timeout {
                    rank: self.rank,
                    call: format!("fusion {} of tensor '{}'", self.what, self.name),
                    what: "every rank to submit it and the engine to run it \
                           (the stall inspector names the ranks that have not)"
                        .into(),
                    waited: timeout,
                });
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Error::Internal(format!(
                    "rank {}: tensor '{}': the fusion engine stopped without completing it",
                    self.rank, self.name
                )));
            }
        };
        let buf = outcome?;
        buf.into_any()
            .downcast::<Vec<T>>()
            .map(|b| *b)
            .map_err(|_| {
                Error::Internal(format!(
                    "rank {}: tensor '{}': result of the wrong type",
                    self.rank, self.name
                ))
            })
    }
}
