//! The communicator: a rank's place in a world, its links, and its state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oxccl_kernels::cpu::CpuReducer;
use oxccl_kernels::{DType, DeviceMemory, Element, ReduceOp, Reducer};
use oxccl_transport::auth::JobSecret;
use oxccl_transport::store::{Store, TcpStoreServer};
use oxccl_transport::{Endpoint, Medium, ShutdownHandle, TransportError, wait_watching};

use crate::algo::{self, Algorithm, GatherReduce, LinkModel};
use crate::config::Config;
use crate::descriptor::Descriptor;
use crate::engine::{self, EngineError, Input, Job, Output};
use crate::exchange::KeptExchange;
use crate::failure::Failures;
use crate::lazy::Connector;
use crate::links::Links;
use crate::schedule::{Kind, Plan, Shape, chunk_range};
use crate::{Error, ErrorKind, Result};

/// Cancels a communicator's collectives from another thread.
#[derive(Debug, Clone, Default)]
pub struct AbortHandle {
    inner: Arc<AbortInner>,
}

#[derive(Debug, Default)]
struct AbortInner {
    aborted: AtomicBool,
    /// Every link's, also those made on first use.
    links: Mutex<Vec<ShutdownHandle>>,
}

impl AbortHandle {
    /// Shuts the communicator's links down: a collective in progress on this
    /// rank fails at once, its neighbours learn of it within milliseconds, and
    /// every later call fails. Idempotent.
    pub fn abort(&self) {
        self.inner.aborted.store(true, Ordering::SeqCst);
        // A link added while a panic held the lock is still shut down.
        let links = self.inner.links.lock().unwrap_or_else(|e| e.into_inner());
        for l in links.iter() {
            l.shutdown();
        }
    }

    /// Whether [`abort`](Self::abort) was called.
    pub fn is_aborted(&self) -> bool {
        self.inner.aborted.load(Ordering::SeqCst)
    }
}

/// Counters a communicator keeps about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Collectives started (the next call's sequence number).
    pub collectives: u64,
    /// Connections refused during bootstrap (strays, other jobs).
    pub refused_connections: usize,
}

/// One rank of a group that runs collectives together.
///
/// Every rank of the world must make the same calls in the same order; a rank
/// that disagrees gets an error naming both calls, and so do the others. After
/// any failure the communicator is poisoned: later calls fail at once with
/// [`ErrorKind::Aborted`] and the original cause, until it is rebuilt.
///
/// Buffers are host memory (the typed calls and [`run_bytes`](Self::run_bytes))
/// or device memory ([`run_device`](Self::run_device): wgpu, CUDA). For
/// reductions, `Avg` divides the sum by the world size; on integers the
/// division truncates toward zero.
#[derive(Debug)]
pub struct Communicator {
    rank: usize,
    world: usize,
    config: Config,
    links: Option<Links<'static>>,
    /// How failures are reported, attributed and passed on.
    failures: Failures,
    /// The store this rank serves, shared with the communicators split
    /// or shrunk from this one, which use it too and may outlive it.
    pub(crate) server: Option<Arc<TcpStoreServer>>,
    reducer: Box<dyn Reducer>,
    seq: u64,
    poisoned: Option<(ErrorKind, String)>,
    /// The sequence number of a call that started and has not returned: set
    /// at its start, cleared when it returns. Found set at the next call's
    /// start, the earlier call unwound (a panic, caught by the application
    /// or at the C boundary) with its links in an unknown state.
    in_call: Option<u64>,
    staging: Vec<u8>,
    /// Device memory for frames reduced by address (links that move device
    /// memory themselves), kept between calls.
    device_scratch: Option<Box<dyn DeviceMemory>>,
    work: Vec<u8>,
    /// The last call's plan, its algorithm and its shape: a loop of
    /// identical calls (every training step) builds its plan once.
    last_plan: Option<(&'static str, Shape, Plan)>,
    /// The last batch's plan and its signature (its kind, sizes and
    /// peers, [`Communicator::take_kept_plan`]); exchanges keep theirs in
    /// `kept_exchange`.
    kept_plan: Option<(Vec<u64>, Plan)>,
    /// The last exchange, its layout and plan ([`crate::exchange`]), and
    /// the words the next call's arguments are written into to compare.
    pub(crate) kept_exchange: Option<Box<KeptExchange>>,
    pub(crate) exchange_args: Vec<u64>,
    /// The last call's descriptor and the algorithm chosen for it: the
    /// choice weighs every algorithm's cost, which a loop of identical
    /// calls need not pay each time.
    last_algo: Option<Chosen>,
    /// The cost parameters of the links, for choosing algorithms.
    model: LinkModel,
    /// More of the job's ranks on this host than it has CPUs (counted at
    /// bootstrap, [`crate::config::crowded_hosts`]; a split communicator
    /// keeps its parent's verdict, as the parent's ranks are still there).
    pub(crate) crowded: bool,
    /// The largest slice: the configured one, or the link model's
    /// [`crowded_slice`](LinkModel::crowded_slice) where any rank of the
    /// job is crowded (agreed at init, as plans must match).
    max_slice: usize,
    stats: Stats,
    abort: AbortHandle,
    /// What [`Communicator::split`] bootstraps a new communicator with:
    /// the store, the keys' prefix, the job's secret, and how many splits
    /// came before (the same count on every rank, as splits are collective).
    pub(crate) origin: Origin,
    /// Makes the links that exchanges need beyond those of init
    /// ([`crate::lazy`]); `None` for a world of one.
    connector: Option<Box<dyn Connector>>,
    /// Messages sent to and received from each peer so far: the next
    /// message's number at both its ends.
    pub(crate) p2p_sent: Vec<u64>,
    pub(crate) p2p_received: Vec<u64>,
    /// For a communicator split from another: the rank there of each rank
    /// here, so that failures name ranks in both numberings.
    pub(crate) parent_ranks: Option<Vec<usize>>,
    /// The rank the last failure started at, as this rank learned it: what
    /// [`Communicator::shrink`] leaves out.
    pub(crate) suspect: Option<usize>,
}

/// Where a communicator came from, for the ones split from it.
#[derive(Debug)]
pub(crate) struct Origin {
    pub store: Arc<dyn Store>,
    pub key_prefix: String,
    pub secret: Option<JobSecret>,
    pub splits: u64,
    /// How many shrinks came before (the same on every survivor).
    pub shrinks: u64,
}

/// A call's descriptor and the algorithm chosen for it.
#[derive(Clone, Copy)]
struct Chosen(Descriptor, &'static dyn Algorithm);

impl std::fmt::Debug for Chosen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.0, self.1.name())
    }
}

/// The parts bootstrap hands to [`Communicator::assemble`].
pub(crate) struct Parts {
    pub rank: usize,
    pub world: usize,
    pub config: Config,
    pub links: Option<Links<'static>>,
    pub store: Arc<dyn Store>,
    pub key_prefix: String,
    pub server: Option<TcpStoreServer>,
    pub refused: usize,
    pub secret: Option<JobSecret>,
    /// The rank that serves the store, when it is one of this world's.
    pub store_host: Option<usize>,
    /// Makes links on first use.
    pub connector: Option<Box<dyn Connector>>,
    /// This rank's host has more of the job's ranks than CPUs.
    pub crowded: bool,
}

impl Communicator {
    pub(crate) fn assemble(p: Parts) -> Result<Communicator> {
        let mut links = Vec::new();
        if let Some(r) = &p.links {
            for l in r.iter() {
                links.push(l.shutdown_handle().map_err(|source| Error::Bootstrap {
                    rank: p.rank,
                    source,
                })?);
            }
        }
        let model = match &p.links {
            Some(l) => link_model(l.iter().map(|l| l.capabilities().medium)),
            None => LinkModel::TCP,
        };
        Ok(Communicator {
            model,
            crowded: p.crowded,
            max_slice: p.config.slice_bytes,
            rank: p.rank,
            world: p.world,
            origin: Origin {
                store: p.store.clone(),
                key_prefix: p.key_prefix.clone(),
                secret: p.secret,
                splits: 0,
                shrinks: 0,
            },
            failures: Failures::new(
                p.rank,
                p.world,
                p.store,
                p.key_prefix,
                p.config.timeout,
                p.store_host,
            ),
            config: p.config,
            links: p.links,
            server: p.server.map(Arc::new),
            reducer: Box::new(CpuReducer),
            seq: 0,
            poisoned: None,
            in_call: None,
            staging: Vec::new(),
            device_scratch: None,
            work: Vec::new(),
            last_plan: None,
            kept_plan: None,
            kept_exchange: None,
            exchange_args: Vec::new(),
            last_algo: None,
            stats: Stats {
                collectives: 0,
                refused_connections: p.refused,
            },
            abort: AbortHandle {
                inner: Arc::new(AbortInner {
                    aborted: AtomicBool::new(false),
                    links: Mutex::new(links),
                }),
            },
            connector: p.connector,
            p2p_sent: vec![0; p.world],
            p2p_received: vec![0; p.world],
            parent_ranks: None,
            suspect: None,
        })
    }

    /// This rank, in `0..world`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters about this communicator.
    pub fn stats(&self) -> Stats {
        Stats {
            collectives: self.seq,
            ..self.stats
        }
    }

    /// A handle that aborts this communicator from another thread.
    pub fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }

    /// The error that poisoned this communicator, if any.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_ref().map(|(_, m)| m.as_str())
    }

    /// Sums (or otherwise reduces) `input` over all ranks into `output` on every rank.
    pub fn all_reduce<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let d = self.desc(Kind::AllReduce, T::DTYPE, op, 0, input.len());
        self.run_bytes(
            d,
            Some(bytemuck::cast_slice(input)),
            bytemuck::cast_slice_mut(output),
        )
    }

    /// [`all_reduce`](Self::all_reduce) with the result written over the input.
    pub fn all_reduce_in_place<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let d = self.desc(Kind::AllReduce, T::DTYPE, op, 0, buf.len());
        self.run_bytes(d, None, bytemuck::cast_slice_mut(buf))
    }

    /// Copies the root's `input` into every rank's `output`. `input` is read on the root only.
    pub fn broadcast<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
        root: usize,
    ) -> Result<()> {
        let d = self.desc(Kind::Broadcast, T::DTYPE, ReduceOp::Sum, root, output.len());
        let input = if self.rank == root {
            Some(bytemuck::cast_slice(input))
        } else {
            None
        };
        self.run_bytes(d, input, bytemuck::cast_slice_mut(output))
    }

    /// Copies the root's `buf` into every other rank's `buf`.
    pub fn broadcast_in_place<T: Element>(&mut self, buf: &mut [T], root: usize) -> Result<()> {
        let d = self.desc(Kind::Broadcast, T::DTYPE, ReduceOp::Sum, root, buf.len());
        self.run_bytes(d, None, bytemuck::cast_slice_mut(buf))
    }

    /// Reduces `input` over all ranks into the root's `output`. Other ranks' `output` is untouched.
    pub fn reduce<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        let d = self.desc(Kind::Reduce, T::DTYPE, op, root, input.len());
        self.run_bytes(
            d,
            Some(bytemuck::cast_slice(input)),
            bytemuck::cast_slice_mut(output),
        )
    }

    /// [`reduce`](Self::reduce) with the root's result written over its `buf`; other ranks' `buf` is untouched.
    pub fn reduce_in_place<T: Element>(
        &mut self,
        buf: &mut [T],
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        let d = self.desc(Kind::Reduce, T::DTYPE, op, root, buf.len());
        self.run_bytes(d, None, bytemuck::cast_slice_mut(buf))
    }

    /// Concatenates every rank's `input` in rank order into `output` (`world * input.len()` elements).
    pub fn all_gather<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let d = self.desc(Kind::AllGather, T::DTYPE, ReduceOp::Sum, 0, input.len());
        self.run_bytes(
            d,
            Some(bytemuck::cast_slice(input)),
            bytemuck::cast_slice_mut(output),
        )
    }

    /// [`all_gather`](Self::all_gather) where each rank's contribution already sits at
    /// `buf[rank * n..(rank + 1) * n]`, `n = buf.len() / world`.
    pub fn all_gather_in_place<T: Element>(&mut self, buf: &mut [T]) -> Result<()> {
        let n = self.per_rank(buf.len(), "all_gather_in_place")?;
        let d = self.desc(Kind::AllGather, T::DTYPE, ReduceOp::Sum, 0, n);
        self.run_bytes(d, None, bytemuck::cast_slice_mut(buf))
    }

    /// Reduces `input` (`world * output.len()` elements) over all ranks; rank `r`
    /// receives chunk `r` of the result in `output`.
    pub fn reduce_scatter<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let d = self.desc(Kind::ReduceScatter, T::DTYPE, op, 0, output.len());
        self.run_bytes(
            d,
            Some(bytemuck::cast_slice(input)),
            bytemuck::cast_slice_mut(output),
        )
    }

    /// [`reduce_scatter`](Self::reduce_scatter) in place: rank `r`'s chunk of the
    /// result lands in `buf[r * n..(r + 1) * n]`, `n = buf.len() / world`; the rest
    /// of `buf` holds partial results.
    pub fn reduce_scatter_in_place<T: Element>(
        &mut self,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let n = self.per_rank(buf.len(), "reduce_scatter_in_place")?;
        let d = self.desc(Kind::ReduceScatter, T::DTYPE, op, 0, n);
        self.run_bytes(d, None, bytemuck::cast_slice_mut(buf))
    }

    /// Returns once every rank has called it.
    pub fn barrier(&mut self) -> Result<()> {
        let d = self.desc(Kind::Barrier, DType::U8, ReduceOp::Sum, 0, 0);
        self.run_bytes(d, None, &mut [])
    }

    fn desc(
        &self,
        kind: Kind,
        dtype: DType,
        op: ReduceOp,
        root: usize,
        count: usize,
    ) -> Descriptor {
        Descriptor {
            kind,
            dtype,
            op,
            root,
            count,
        }
    }

    fn per_rank(&self, len: usize, what: &str) -> Result<usize> {
        if len % self.world != 0 {
            return Err(Error::InvalidArgument(format!(
                "rank {}: {what}: buffer of {len} elements does not divide by the world size {}",
                self.rank, self.world
            )));
        }
        Ok(len / self.world)
    }

    /// Runs the collective `d` on byte buffers: the entry point of the bindings.
    ///
    /// `input` is `None` for an in-place call. Lengths in bytes must be:
    /// allreduce, broadcast, reduce: `count` elements for both buffers (the
    /// root's output only, for reduce; the root's input only, for broadcast);
    /// allgather: input `count`, output `world * count`; reduce-scatter: input
    /// `world * count`, output `count`. In place, allgather and reduce-scatter
    /// take the `world * count` buffer.
    pub fn run_bytes(
        &mut self,
        d: Descriptor,
        input: Option<&[u8]>,
        output: &mut [u8],
    ) -> Result<()> {
        let seq = self.begin(&d, input.map(<[u8]>::len), output.len())?;
        let result = self.run_started(d, seq, Bufs::Host { input, output });
        self.in_call = None;
        result
    }

    /// Runs the collective `d` on device buffers (wgpu, CUDA), with the same
    /// buffer lengths as [`run_bytes`](Self::run_bytes). On the ring every
    /// slice goes device → host → wire → host → device, and received slices
    /// are reduced on the device by its own kernels, never by the CPU.
    pub fn run_device(
        &mut self,
        d: Descriptor,
        input: Option<&dyn DeviceMemory>,
        output: &mut dyn DeviceMemory,
    ) -> Result<()> {
        let seq = self.begin(&d, input.map(|i| i.len_bytes()), output.len_bytes())?;
        let result = self.run_started(d, seq, Bufs::Device { input, output });
        self.in_call = None;
        result
    }

    /// Runs a started call, on host or device buffers alike: the algorithm,
    /// its plan, a scratch buffer where the call needs one, the engine, and
    /// the failure handling.
    fn run_started(&mut self, d: Descriptor, seq: u64, bufs: Bufs<'_>) -> Result<()> {
        let algo = self.select(&d);
        if algo.name() == GatherReduce.name() {
            let result = self.small_all_reduce(&d, seq, bufs);
            return result.map_err(|e| self.fail(&d, seq, e));
        }
        let (shape, count, use_work) = self.shape(&d, bufs.in_place(), algo);
        let plan = self.take_plan(algo, shape);
        let bytes = count * d.dtype.size();
        // Where the engine writes: the caller's output, or a scratch buffer
        // of `bytes` (a non-root reduce, an out-of-place reduce-scatter),
        // with the caller's buffer as input when the call is in place.
        let (driver, work) = self.driver();
        let result = match bufs {
            Bufs::Host { input, output } => {
                if !use_work {
                    driver.run(&plan, seq, &d, input.map(Input::Host), Output::Host(output))
                } else {
                    if work.len() < bytes {
                        work.resize(bytes, 0);
                    }
                    let inp: &[u8] = input.unwrap_or(&*output);
                    let r = driver.run(
                        &plan,
                        seq,
                        &d,
                        Some(Input::Host(inp)),
                        Output::Host(&mut work[..bytes]),
                    );
                    r.map(|()| {
                        if d.kind == Kind::ReduceScatter {
                            let elem = d.dtype.size();
                            let own = chunk_range(shape.count, shape.world, shape.rank);
                            output.copy_from_slice(&work[own.start * elem..own.end * elem]);
                        }
                    })
                }
            }
            Bufs::Device { input, output } => {
                if !use_work {
                    driver.run(
                        &plan,
                        seq,
                        &d,
                        input.map(Input::Device),
                        Output::Device(output),
                    )
                } else {
                    let mut w = output.alloc_like(bytes)?;
                    let inp: &dyn DeviceMemory = input.unwrap_or(&*output);
                    let r = driver.run(
                        &plan,
                        seq,
                        &d,
                        Some(Input::Device(inp)),
                        Output::Device(w.as_mut()),
                    );
                    r.and_then(|()| {
                        if d.kind != Kind::ReduceScatter {
                            return Ok(());
                        }
                        // Only the own chunk comes back (on the device
                        // when both have addresses there, else through the host).
                        let elem = d.dtype.size();
                        let own = chunk_range(shape.count, shape.world, shape.rank);
                        let mut dest = crate::exchange::Dest::Device(output);
                        crate::exchange::copy_own(
                            Input::Device(w.as_ref()),
                            &mut dest,
                            own.start * elem..own.end * elem,
                            0,
                        )?;
                        Ok(())
                    })
                }
            }
        };
        self.last_plan = Some((algo.name(), shape, plan));
        result.map_err(|e| self.fail(&d, seq, e))
    }

    /// Makes every rank choose algorithms with the same link model: one
    /// of a medium's own only if every rank's links are all of it, the
    /// TCP model otherwise. A rank whose peers all share its host would
    /// otherwise choose differently from one that talks to another host,
    /// and their plans would not match. One allreduce (minimum) of three
    /// bytes over the ring, at init, outside the numbered calls: the
    /// model's index and its complement, so both the least and the
    /// greatest index come back, and whether the rank's host is not
    /// crowded (more of the job's ranks than CPUs), so that all cap their slices
    /// ([`LinkModel::crowded_slice`]) if any one is.
    pub(crate) fn agree_link_model(&mut self) -> Result<()> {
        /// The sequence number of the init call; numbered calls start at 0.
        const INIT: u64 = u64::MAX;
        if self.world < 2 {
            return Ok(());
        }
        let d = Descriptor {
            kind: Kind::AllReduce,
            dtype: DType::U8,
            op: ReduceOp::Min,
            root: 0,
            count: 3,
        };
        let mine = model_index(&self.model);
        let mut flag = [mine, u8::MAX - mine, u8::from(!self.crowded)];
        let (shape, _, _) = self.shape(&d, true, &algo::Ring);
        let plan = algo::Ring.plan(&shape);
        let (driver, _) = self.driver();
        let result = driver.run(&plan, INIT, &d, None, Output::Host(&mut flag));
        if let Err(e) = result {
            return Err(self.fail(&d, INIT, e));
        }
        self.last_algo = None;
        self.model = match MODELS.get(usize::from(flag[0])) {
            Some(m) if flag[0] == u8::MAX - flag[1] => *m,
            _ => LinkModel::TCP,
        };
        if flag[2] == 0 {
            self.max_slice = self.config.slice_bytes.min(self.model.crowded_slice);
        }
        tracing::debug!(
            rank = self.rank,
            "link model: {:?}, slices up to {} bytes",
            self.model,
            self.max_slice
        );
        Ok(())
    }

    /// The algorithm that runs `d` ([`algo::select`]), the last call's when
    /// `d` is the same (the config and the link model do not change after
    /// init).
    fn select(&mut self, d: &Descriptor) -> &'static dyn Algorithm {
        match self.last_algo {
            Some(Chosen(last, a)) if last == *d => a,
            _ => {
                let a = algo::select(d, self.world, &self.config, &self.model);
                self.last_algo = Some(Chosen(*d, a));
                a
            }
        }
    }

    /// The plan of `shape` by `algo`: the last call's when both are the
    /// same (the caller puts it back in `last_plan` when done), else a new one.
    fn take_plan(&mut self, algo: &'static dyn Algorithm, shape: Shape) -> Plan {
        match self.last_plan.take() {
            Some((a, s, p)) if a == algo.name() && s == shape => p,
            _ => {
                tracing::debug!(
                    rank = self.rank,
                    "{} of {} elements on {} ranks: {}",
                    shape.kind.name(),
                    shape.count,
                    shape.world,
                    algo.name()
                );
                algo.plan(&shape)
            }
        }
    }

    /// The shape of `d`, the element count of the buffer it works on, and
    /// whether that is a scratch buffer rather than the caller's output.
    fn shape(&self, d: &Descriptor, in_place: bool, algo: &dyn Algorithm) -> (Shape, usize, bool) {
        let (world, rank, elem) = (self.world, self.rank, d.dtype.size());
        let (count, use_work) = match d.kind {
            Kind::AllGather | Kind::ReduceScatter => {
                (d.count * world, d.kind == Kind::ReduceScatter && !in_place)
            }
            Kind::Reduce => (d.count, rank != d.root),
            _ => (d.count, false),
        };
        let shape = Shape {
            kind: d.kind,
            world,
            rank,
            count,
            elem,
            root: d.root,
            avg: d.reduces() && d.op == ReduceOp::Avg,
            out_of_place: !in_place || use_work,
            slice_elems: (algo.slice_bytes(d, world, &self.model, self.max_slice) / elem).max(1),
        };
        (shape, count, use_work)
    }

    /// Allreduce of a small buffer: one allgather of every rank's buffer (one
    /// frame per step, `world - 1` steps instead of `2 (world - 1)`), then
    /// every rank reduces the gathered buffers itself, in rank order, so all
    /// ranks get the same bits: the host reducer into host memory, the
    /// device's own kernels into device memory.
    fn small_all_reduce(
        &mut self,
        d: &Descriptor,
        seq: u64,
        bufs: Bufs<'_>,
    ) -> Result<(), EngineError> {
        let world = self.world;
        let (mut out, bytes) = match bufs {
            Bufs::Host { input, output } => {
                self.small_gather(d, seq, input.unwrap_or(&*output))?;
                let n = output.len();
                (Sink::Host(output), n)
            }
            Bufs::Device { input, output } => {
                let n = output.len_bytes();
                let mut own = vec![0u8; n];
                input.unwrap_or(&*output).read(0, &mut own)?;
                self.small_gather(d, seq, &own)?;
                (Sink::Device(output), n)
            }
        };
        let work = &self.work[..bytes * world];
        let reducer = self.reducer.as_ref();
        out.write(&work[..bytes])?;
        for r in 1..world {
            out.reduce(reducer, d, &work[r * bytes..(r + 1) * bytes])?;
        }
        if d.op == ReduceOp::Avg {
            out.finish_avg(reducer, d, world)?;
        }
        Ok(())
    }

    /// Gathers every rank's `own` bytes into `self.work`, in rank order.
    fn small_gather(&mut self, d: &Descriptor, seq: u64, own: &[u8]) -> Result<(), EngineError> {
        let (world, rank, bytes) = (self.world, self.rank, own.len());
        let shape = Shape {
            kind: Kind::AllGather,
            world,
            rank,
            count: d.count * world,
            elem: d.dtype.size(),
            root: 0,
            avg: false,
            out_of_place: false,
            slice_elems: d.count,
        };
        let plan = self.take_plan(&algo::Ring, shape);
        let (driver, work) = self.driver();
        if work.len() < bytes * world {
            work.resize(bytes * world, 0);
        }
        let work = &mut work[..bytes * world];
        work[rank * bytes..(rank + 1) * bytes].copy_from_slice(own);
        let result = driver.run(&plan, seq, d, None, Output::Host(work));
        self.last_plan = Some((algo::Ring.name(), shape, plan));
        result
    }

    /// Checks a call before it starts and gives it its sequence number.
    fn begin(&mut self, d: &Descriptor, input: Option<usize>, output: usize) -> Result<u64> {
        if !d.kind.on_ring() {
            return Err(Error::InvalidArgument(format!(
                "rank {}: {} takes its own buffers (Communicator::run_exchange), not run_bytes or run_device",
                self.rank,
                d.kind.name()
            )));
        }
        self.check_usable()?;
        self.validate_lengths(d, input, output)?;
        let seq = self.start(true);
        tracing::debug!(rank = self.rank, "{}", d.call(seq));
        Ok(seq)
    }

    /// Marks a call in progress and gives it its sequence number (the next
    /// one, taken when `numbered`).
    fn start(&mut self, numbered: bool) -> u64 {
        let seq = self.seq;
        if numbered {
            self.seq += 1;
        }
        self.in_call = Some(seq);
        seq
    }

    /// Fails at once when the communicator is poisoned, or when the call
    /// before unwound (which poisons it).
    fn check_usable(&mut self) -> Result<()> {
        if let Some(seq) = self.in_call.take() {
            // The call before unwound: its links are out of step. Fail as
            // any failed call does, so that the peers learn of it now.
            let err = Error::Internal(format!(
                "rank {}: call #{seq} did not return (it panicked): the communicator's links are in an unknown state",
                self.rank
            ));
            self.failures.publish(&err);
            self.abort.abort();
            tracing::warn!("{err}");
            self.poisoned = Some((err.kind(), err.to_string()));
        }
        if let Some((kind, cause)) = &self.poisoned {
            return Err(Error::Aborted {
                rank: self.rank,
                kind: *kind,
                cause: cause.clone(),
            });
        }
        Ok(())
    }

    /// [`begin`](Self::begin) for the calls that check their own buffers:
    /// fails a poisoned communicator, and numbers the call when it is
    /// collective (`numbered`; sends and receives are numbered per pair).
    pub(crate) fn enter(&mut self, numbered: bool) -> Result<u64> {
        self.check_usable()?;
        Ok(self.start(numbered))
    }

    /// Ends a call started with [`enter`](Self::enter).
    pub(crate) fn leave(&mut self) {
        self.in_call = None;
    }

    /// Makes the links to `peers` that this rank does not have yet
    /// ([`crate::lazy`]); each of them must be making its link to this
    /// rank too (it is in the same call). `call` names the call in errors.
    pub(crate) fn ensure_links(
        &mut self,
        peers: &[usize],
        call: &dyn Fn() -> String,
    ) -> Result<()> {
        let rank = self.rank;
        let Some(links) = self.links.as_ref() else {
            return Ok(());
        };
        let mut missing: Vec<usize> = peers
            .iter()
            .copied()
            .filter(|&q| q != rank && !links.has(q))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let Some(connector) = self.connector.as_mut() else {
            return Err(Error::Internal(format!(
                "rank {rank}: {}: no link to rank {} and no way to make one",
                call(),
                missing[0]
            )));
        };
        let deadline = crate::deadline_in(self.config.timeout);
        tracing::debug!("rank {rank}: {}: linking to ranks {missing:?}", call());
        let made = connector.connect(&missing, deadline);
        let made = match made {
            Ok(m) => m,
            Err(e) => return Err(self.fail_named(call(), EngineError::Transport(e))),
        };
        let mut handles = Vec::with_capacity(made.len());
        for l in &made {
            match l.shutdown_handle() {
                Ok(h) => handles.push(h),
                Err(e) => return Err(self.fail_named(call(), EngineError::Transport(e))),
            }
        }
        {
            let mut all = self
                .abort
                .inner
                .links
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            all.extend(handles);
        }
        if self.abort.is_aborted() {
            made.iter().for_each(|l| {
                if let Ok(h) = l.shutdown_handle() {
                    h.shutdown();
                }
            });
        }
        if let Some(links) = self.links.as_mut() {
            made.into_iter().for_each(|l| links.add(l));
        }
        Ok(())
    }

    /// The plan kept by [`keep_plan`](Self::keep_plan) when its signature
    /// is `sig`: a loop of identical exchanges or batches builds its plan
    /// (and its cuts) once.
    pub(crate) fn take_kept_plan(&mut self, sig: &[u64]) -> Option<Plan> {
        match self.kept_plan.take() {
            Some((s, p)) if s == sig => Some(p),
            other => {
                self.kept_plan = other;
                None
            }
        }
    }

    /// Keeps `plan`, of signature `sig`, for the next call.
    pub(crate) fn keep_plan(&mut self, sig: Vec<u64>, plan: Plan) {
        self.kept_plan = Some((sig, plan));
    }

    /// The cost parameters every rank chooses algorithms with.
    pub(crate) fn model(&self) -> LinkModel {
        self.model
    }

    /// The largest slice of this communicator's calls (`max_slice`).
    pub(crate) fn max_slice(&self) -> usize {
        self.max_slice
    }

    /// Runs `plan` over this rank's links: the engine, without the
    /// failure handling (the caller's).
    pub(crate) fn run_plan<'b>(
        &'b mut self,
        plan: &'b Plan,
        seq: u64,
        d: &Descriptor,
        input: Option<Input<'b>>,
        output: Output<'b>,
    ) -> std::result::Result<(), EngineError> {
        let (driver, _) = self.driver();
        driver.run(plan, seq, d, input, output)
    }

    /// What runs a plan, and the scratch buffer, borrowed apart.
    fn driver(&mut self) -> (Driver<'_>, &mut Vec<u8>) {
        (
            Driver {
                links: &mut self.links,
                reducer: self.reducer.as_ref(),
                staging: &mut self.staging,
                device_scratch: &mut self.device_scratch,
                config: &self.config,
                world: self.world,
                crowded: self.crowded,
            },
            &mut self.work,
        )
    }

    fn validate_lengths(&self, d: &Descriptor, input: Option<usize>, output: usize) -> Result<()> {
        // Formatted only for an error: this runs on every call.
        let call = || d.call(self.seq);
        let rank = self.rank;
        let elem = d.dtype.size();
        if d.rooted() && d.root >= self.world {
            return Err(Error::InvalidArgument(format!(
                "rank {rank}: {}: root {} is not below the world size {}",
                call(),
                d.root,
                self.world
            )));
        }
        let full = d
            .count
            .checked_mul(self.world)
            .and_then(|n| n.checked_mul(elem));
        let one = d.count.checked_mul(elem);
        let (Some(full), Some(one)) = (full, one) else {
            return Err(Error::InvalidArgument(format!(
                "rank {rank}: {}: count overflows",
                call()
            )));
        };
        let (want_in, want_out) = match (d.kind, input.is_some()) {
            (Kind::AllGather, true) => (one, full),
            (Kind::AllGather, false) => (0, full),
            (Kind::ReduceScatter, true) => (full, one),
            (Kind::ReduceScatter, false) => (0, full),
            (Kind::Broadcast, _)
            | (Kind::Reduce, _)
            | (Kind::AllReduce, _)
            | (Kind::Barrier, _) => (one, one),
            // Checked by their own calls (`begin` refuses them).
            (
                Kind::AllToAll
                | Kind::Gather
                | Kind::Scatter
                | Kind::AllToAllV
                | Kind::AllGatherV
                | Kind::ReduceScatterV
                | Kind::SendRecv,
                _,
            ) => return Ok(()),
        };
        let check = |what: &str, got: usize, want: usize| {
            if got != want {
                Err(Error::InvalidArgument(format!(
                    "rank {rank}: {}: {what} has {got} bytes, expected {want} ({} elements of {} bytes)",
                    call(),
                    want / elem,
                    elem
                )))
            } else {
                Ok(())
            }
        };
        // Buffers the call does not read may be of any length (NCCL ignores them).
        let output_used = !(d.kind == Kind::Reduce && rank != d.root && input.is_some());
        if output_used {
            check("output", output, want_out)?;
        }
        if let Some(i) = input {
            let input_used = !(d.kind == Kind::Broadcast && rank != d.root);
            if input_used {
                check("input", i, want_in)?;
            }
        }
        Ok(())
    }

    /// Turns an engine failure into this call's error ([`Failures`]);
    /// poisons the communicator, tells the other ranks (through the store)
    /// and closes the links.
    fn fail(&mut self, d: &Descriptor, seq: u64, e: EngineError) -> Error {
        self.fail_named(d.call(seq), e)
    }

    /// [`fail`](Self::fail) for a call named `call`.
    pub(crate) fn fail_named(&mut self, call: String, e: EngineError) -> Error {
        let call = match &self.parent_ranks {
            Some(p) => format!("{call} {}", parent_numbering(p)),
            None => call,
        };
        let err = self.failures.attribute(call, e, self.abort.is_aborted());
        self.suspect = match &err {
            Error::Remote { origin, .. } => Some(*origin),
            Error::Transport {
                source: TransportError::PeerClosed { peer, .. },
                ..
            } => Some(*peer),
            Error::Timeout { .. } => self.failures.waited_on(),
            _ => None,
        }
        .filter(|&r| r != self.rank);
        // Tell the others what happened before closing the links, so that a
        // neighbour that sees the links close finds the cause in the store.
        self.failures.publish(&err);
        self.abort.abort();
        tracing::warn!("{err}");
        self.poisoned = Some((err.kind(), err.to_string()));
        err
    }
}

impl Drop for Communicator {
    /// A rank that serves the store and failed keeps serving it until the
    /// others have read what they need to name the origin
    /// (`Failures::linger`).
    fn drop(&mut self) {
        if self.poisoned.is_some() && self.server.is_some() {
            self.failures.linger();
        }
    }
}

/// How a split communicator's failures name ranks in its parent's
/// numbering too: "[split: ranks 0, 1, 2 here are ranks 4, 0, 2 of the
/// parent]", the first 16 of a larger one.
fn parent_numbering(parents: &[usize]) -> String {
    const SHOWN: usize = 16;
    let list = |v: &mut dyn Iterator<Item = String>| v.collect::<Vec<_>>().join(", ");
    let here = list(&mut (0..parents.len().min(SHOWN)).map(|r| r.to_string()));
    let there = list(&mut parents.iter().take(SHOWN).map(|r| r.to_string()));
    let more = if parents.len() > SHOWN { ", ..." } else { "" };
    format!("[split: ranks {here}{more} here are ranks {there}{more} of the parent]")
}

/// The parts of a communicator that run a plan on the ring.
struct Driver<'a> {
    links: &'a mut Option<Links<'static>>,
    reducer: &'a dyn Reducer,
    staging: &'a mut Vec<u8>,
    device_scratch: &'a mut Option<Box<dyn DeviceMemory>>,
    config: &'a Config,
    world: usize,
    crowded: bool,
}

impl<'a> Driver<'a> {
    fn run<'b>(
        self,
        plan: &'b Plan,
        seq: u64,
        d: &Descriptor,
        input: Option<Input<'b>>,
        output: Output<'b>,
    ) -> std::result::Result<(), EngineError>
    where
        'a: 'b,
    {
        let result = engine::run(
            self.links.as_mut(),
            Job {
                plan,
                seq,
                descriptor: d.encode(),
                input,
                output,
                dtype: d.dtype,
                op: d.op,
                world: self.world,
                reducer: self.reducer,
                staging: self.staging,
                scratch: Some(self.device_scratch),
                timeout: self.config.timeout,
                spin: self.config.spin,
                crowded: self.crowded,
                single_copy_from: single_copy_from(d, self.world),
            },
        );
        let Some(links) = self.links.as_mut() else {
            return result;
        };
        match result {
            Ok(()) => {
                // This call's bytes survive a later abort (see `Endpoint::commit`).
                links.iter_mut().for_each(|l| l.commit());
                Ok(())
            }
            Err(EngineError::Transport(TransportError::PeerClosed { peer, how }))
                if links.ring().0.peer() != links.ring().1.peer()
                    && (peer == links.ring().0.peer() || peer == links.ring().1.peer()) =>
            {
                let (next, prev) = links.ring();
                let other = if peer == prev.peer() { next } else { prev };
                // Both neighbours may be gone, one because of the other's
                // failure (and with the store, if it hosted it): say so
                // rather than blame the one that happened to be seen first.
                let other_gone =
                    wait_watching(None, None, Some(other as &dyn Endpoint), Duration::ZERO)
                        .is_ok_and(|ready| ready.hung_up);
                let how = if other_gone {
                    format!("{how}; rank {} has hung up too", other.peer())
                } else {
                    how
                };
                Err(EngineError::Transport(TransportError::PeerClosed {
                    peer,
                    how,
                }))
            }
            Err(e) => Err(e),
        }
    }
}

/// From which step on the frames of `d` gain from single copies over shared
/// memory, where the receiver reads them straight from the sender's memory.
/// Measured on a 2-core VM (benches/RESULTS.md, "Single copy"), where
/// `process_vm_readv` copies at about 0.65 times memcpy:
///
/// * into the receiver's output, one copy beats two through the ring:
///   allgather at every size (1.2 to 2.8 times), and allreduce's allgather
///   half (steps `world - 1` on) from 3 ranks (1.2 to 1.4 times at 1 and
///   4 MiB, 4 ranks; with 2 ranks 0.83 times at 1 and 4 MiB);
/// * into the staging buffer that a reduction reads next, the ring's second
///   copy comes from cache and the pair beats one single copy (reductions
///   lost up to 0.7 times with it);
/// * a broadcast gains up to 1 MiB (1.2 to 2.7 times); beyond it the ring
///   splits each byte's two copies between the two sides' cores, while a
///   single copy puts all of it on the receiver (0.65 times at 16 MiB);
/// * the exchanges land in the receiver's output: send/recv took 0.36-0.65
///   of the ring's time from 64 KiB to 16 MiB on 2 ranks (0.56-0.74 to 1
///   MiB on 4), alltoall 0.49-0.78 from 256 KiB to 16 MiB; where one root
///   sends or receives everything the single copies stay on one side, as
///   a broadcast's do: scatter gains to 1 MiB a block (0.68 times) and
///   loses from 4 MiB (up to 1.87 times at 64 MiB) and below 64 KiB a
///   block (1.18-1.22 times at 16 and 32 KiB, where 2 ranks single-copy
///   from 16 KiB), gather loses from 1 MiB (1.14-1.51 times), so it keeps
///   the ring.
fn single_copy_from(d: &Descriptor, world: usize) -> Option<u32> {
    match d.kind {
        Kind::AllGather => Some(0),
        Kind::Broadcast if d.count.saturating_mul(d.dtype.size()) <= 1 << 20 => Some(0),
        Kind::AllReduce if world >= 3 => Some(world as u32 - 1),
        Kind::SendRecv | Kind::AllToAll | Kind::AllToAllV | Kind::AllGatherV => Some(0),
        Kind::Scatter if (64 << 10..=1 << 20).contains(&d.count.saturating_mul(d.dtype.size())) => {
            Some(0)
        }
        _ => None,
    }
}

/// A call's buffers: host memory or device memory. Both take one path
/// ([`Communicator::run_started`]); only where bytes are written differs.
enum Bufs<'b> {
    Host {
        input: Option<&'b [u8]>,
        output: &'b mut [u8],
    },
    Device {
        input: Option<&'b dyn DeviceMemory>,
        output: &'b mut dyn DeviceMemory,
    },
}

impl Bufs<'_> {
    fn in_place(&self) -> bool {
        match self {
            Bufs::Host { input, .. } => input.is_none(),
            Bufs::Device { input, .. } => input.is_none(),
        }
    }
}

/// Where a result computed on the host goes: host memory, reduced by the
/// host reducer, or device memory, reduced by the device's kernels.
enum Sink<'b> {
    Host(&'b mut [u8]),
    Device(&'b mut dyn DeviceMemory),
}

impl Sink<'_> {
    /// `self = src`.
    fn write(&mut self, src: &[u8]) -> Result<(), EngineError> {
        match self {
            Sink::Host(o) => o.copy_from_slice(src),
            Sink::Device(o) => o.write(0, src)?,
        }
        Ok(())
    }

    /// `self = op(self, src)`.
    fn reduce(&mut self, r: &dyn Reducer, d: &Descriptor, src: &[u8]) -> Result<(), EngineError> {
        match self {
            Sink::Host(o) => r.reduce(d.dtype, d.op, o, src)?,
            Sink::Device(o) => o.reduce_from_host(d.dtype, d.op, 0, src)?,
        }
        Ok(())
    }

    /// Turns sums over `world` ranks into averages.
    fn finish_avg(
        &mut self,
        r: &dyn Reducer,
        d: &Descriptor,
        world: usize,
    ) -> Result<(), EngineError> {
        match self {
            Sink::Host(o) => r.finish_avg(d.dtype, o, world)?,
            Sink::Device(o) => {
                let n = o.len_bytes();
                o.finish_avg(d.dtype, 0, n, world)?
            }
        }
        Ok(())
    }
}

/// The link models ranks agree on by index ([`Communicator::agree_link_model`]).
const MODELS: [LinkModel; 4] = [
    LinkModel::TCP,
    LinkModel::SHM,
    LinkModel::UCX_SHM,
    LinkModel::UCX_TCP,
];

fn model_index(m: &LinkModel) -> u8 {
    MODELS
        .iter()
        .position(|x| x == m)
        .and_then(|i| u8::try_from(i).ok())
        .unwrap_or(0)
}

/// The cost model of a rank's links: a medium's own where they are all of
/// it, TCP's where they mix (sockets to other hosts are the slowest) or
/// where no model of the medium was measured (UCX over RDMA).
fn link_model(media: impl Iterator<Item = Medium>) -> LinkModel {
    let mut media = media.peekable();
    let Some(&first) = media.peek() else {
        return LinkModel::TCP;
    };
    if !media.all(|m| m == first) {
        return LinkModel::TCP;
    }
    match first {
        Medium::SharedMemory => LinkModel::SHM,
        Medium::UcxSharedMemory => LinkModel::UCX_SHM,
        Medium::UcxSocket => LinkModel::UCX_TCP,
        Medium::Socket | Medium::UcxOther => LinkModel::TCP,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{Config, run_in_process};

    /// The algorithm kept from the last call is the one `algo::select`
    /// picks for each new descriptor, also when sizes alternate.
    #[test]
    fn the_kept_algorithm_follows_the_call() {
        let picks = run_in_process(4, Config::default(), |c| {
            let mut out = Vec::new();
            for count in [2usize, 1 << 18, 2, 3, 1 << 18] {
                let mut buf = vec![1.0f32; count];
                c.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap();
                assert!(buf.iter().all(|&x| x == 4.0));
                let d = Descriptor {
                    kind: Kind::AllReduce,
                    dtype: DType::F32,
                    op: ReduceOp::Sum,
                    root: 0,
                    count,
                };
                let Chosen(kept, a) = c.last_algo.unwrap();
                assert_eq!(kept, d);
                let fresh = algo::select(&d, c.world, &c.config, &c.model);
                assert_eq!(a.name(), fresh.name(), "count {count}");
                out.push(a.name());
            }
            out
        })
        .unwrap();
        // The small and the large calls took different algorithms.
        assert_ne!(picks[0][0], picks[0][1], "{:?}", picks[0]);
    }

    /// A medium's own model only where every link is of it.
    #[test]
    fn links_of_one_medium_get_its_model_and_mixed_ones_tcp() {
        use Medium::*;
        let m = |v: &[Medium]| link_model(v.iter().copied());
        assert_eq!(m(&[SharedMemory, SharedMemory]), LinkModel::SHM);
        assert_eq!(m(&[UcxSharedMemory]), LinkModel::UCX_SHM);
        assert_eq!(m(&[UcxSocket, UcxSocket]), LinkModel::UCX_TCP);
        assert_eq!(m(&[SharedMemory, UcxSocket]), LinkModel::TCP);
        assert_eq!(m(&[UcxSharedMemory, UcxSocket]), LinkModel::TCP);
        assert_eq!(m(&[UcxOther]), LinkModel::TCP);
        assert_eq!(m(&[Socket]), LinkModel::TCP);
        assert_eq!(m(&[]), LinkModel::TCP);
        for (i, model) in MODELS.iter().enumerate() {
            assert_eq!(usize::from(model_index(model)), i);
        }
    }

    /// Ranks whose links differ agree on TCP's model; ranks that agree keep
    /// theirs.
    #[test]
    fn ranks_agree_on_one_link_model() {
        let models = run_in_process(4, Config::default(), |c| {
            c.model = if c.rank == 2 {
                LinkModel::SHM
            } else {
                LinkModel::UCX_SHM
            };
            c.agree_link_model().unwrap();
            let mixed = c.model;
            c.model = LinkModel::UCX_TCP;
            c.agree_link_model().unwrap();
            let same = c.model;
            // Calls after it still match.
            let mut buf = vec![1u32; 1000];
            c.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap();
            assert!(buf.iter().all(|&x| x == 4));
            (mixed, same)
        })
        .unwrap();
        for (mixed, same) in models {
            assert_eq!(mixed, LinkModel::TCP);
            assert_eq!(same, LinkModel::UCX_TCP);
        }
    }

    /// One crowded rank caps every rank's slices at the model's
    /// `crowded_slice` (plans must match); none crowded, or a model without
    /// a cap, keeps the configured slice.
    #[test]
    fn one_crowded_rank_caps_every_ranks_slices() {
        let config = Config {
            slice_bytes: 1 << 20,
            ..Config::default()
        };
        let slices = run_in_process(4, config, |c| {
            let mut got = Vec::new();
            for (model, crowded_rank) in [
                (LinkModel::UCX_TCP, Some(1)),
                (LinkModel::UCX_TCP, None),
                (LinkModel::UCX_SHM, Some(1)),
            ] {
                c.model = model;
                c.crowded = Some(c.rank) == crowded_rank;
                c.max_slice = c.config.slice_bytes;
                c.agree_link_model().unwrap();
                got.push(c.max_slice());
                // Plans of 4 MiB, cut into these slices, match on every
                // rank (a slice that differed would fail the call).
                let mut buf = vec![1u32; 1 << 20];
                c.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap();
                assert!(buf.iter().all(|&x| x == 4));
            }
            got
        })
        .unwrap();
        for got in slices {
            assert_eq!(got, [256 << 10, 1 << 20, 1 << 20]);
        }
    }
}
