//! Drives a [`Plan`] over a rank's links and a reducer.
//!
//! One thread per rank does everything: it writes the next allowed frame to
//! its peer, reads the next frame from its peer, and reduces a slice as soon
//! as it has arrived, with nonblocking links, so both
//! directions stay busy while the kernel's socket buffers (or the shared
//! memory rings) carry the slices in flight. When neither direction can
//! move it sleeps in `poll` on exactly the links that can unblock it. This
//! suits few cores (no thread hand-offs, no copies between threads) and
//! needs no `unsafe`: the engine is the only borrower of the caller's
//! buffers.
//!
//! The pieces, each small and tested on its own against the
//! fault-injecting link of `oxccl_transport::fault`:
//!
//! * [`send`]: the send half, writing frames from the caller's buffers;
//! * [`recv`]: the receive half, checking each frame's header before any of
//!   its bytes reach the caller's buffer, and reducing or copying it;
//! * [`idle`]: what a rank does when nothing moved: spin, yield, sleep in
//!   `poll`, or give up at its deadline;
//! * [`Call`]: one collective in progress, whose [`Call::pump`] moves what
//!   can move now without waiting; [`run`] drives it to completion. The
//!   simulator (`sim`, tests only) pumps every rank's call in one thread in
//!   a seeded random order, over links that deliver a byte at a time.

mod cells;
mod idle;
mod recv;
mod send;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::ops::Range;
use std::time::{Duration, Instant};

use std::sync::Arc;

use oxccl_kernels::{DType, DeviceMemory, DeviceOps, KernelError, ReduceOp, Reducer};
use oxccl_transport::wire::{DESCRIPTOR_LEN, FrameHeader, Tag};
use oxccl_transport::{
    DevMut, DevRef, Endpoint, Lent, MemoryKinds, MessageLink, Parts, TransportError, wait_watching,
};

use crate::links::Links;
use crate::schedule::{Plan, Progress, WireTag};
use cells::Cells;
use idle::{Idle, Step};
use recv::RecvHalf;
use send::SendHalf;

/// Where the engine reads a call's input.
#[derive(Clone, Copy)]
pub(crate) enum Input<'a> {
    /// Host memory: sent straight from here.
    Host(&'a [u8]),
    /// Device memory: read to the host slice by slice.
    Device(&'a dyn DeviceMemory),
    /// Device memory by address, sent by the links themselves
    /// ([`by_address`]).
    Addressed(DevRef<'a>),
}

/// Where the engine writes a call's result.
pub(crate) enum Output<'a> {
    /// Host memory: received straight into place, reduced by the host reducer.
    Host(&'a mut [u8]),
    /// Device memory: each received slice is staged on the host, then
    /// written or reduced into the device by the device's own kernels.
    Device(&'a mut dyn DeviceMemory),
    /// Device memory by address (made by [`by_address`] from `Device`).
    Addressed {
        mem: DevMut<'a>,
        ops: Arc<dyn DeviceOps>,
        over: usize,
        scratch: Option<DevMut<'a>>,
    },
}

/// One collective for the engine to run.
pub(crate) struct Job<'a> {
    pub plan: &'a Plan,
    pub seq: u64,
    pub descriptor: [u8; DESCRIPTOR_LEN],
    /// `None` for an in-place call.
    pub input: Option<Input<'a>>,
    pub output: Output<'a>,
    pub dtype: DType,
    pub op: ReduceOp,
    pub world: usize,
    pub reducer: &'a dyn Reducer,
    pub staging: &'a mut Vec<u8>,
    /// Device memory a call whose links move device memory by address
    /// receives frames to reduce into, kept between calls (`None`: the
    /// call has no place to keep it, and stages device memory on the host).
    pub scratch: Option<&'a mut Option<Box<dyn DeviceMemory>>>,
    pub timeout: Duration,
    /// How long to busy-poll before sleeping in `poll`.
    pub spin: Duration,
    /// This host has more of the job's ranks than CPUs ([`crate::config::crowded_hosts`]).
    pub crowded: bool,
    /// Frames of this step and later may go by single copy where the link
    /// offers it ([`Outgoing::set_single_copy`](oxccl_transport::Outgoing::set_single_copy));
    /// `None`: none may.
    pub single_copy_from: Option<u32>,
}

/// Why the engine stopped.
#[derive(Debug)]
pub(crate) enum EngineError {
    Transport(TransportError),
    Timeout {
        peer: usize,
        what: String,
        waited: Duration,
    },
    Mismatch {
        peer: usize,
        descriptor: [u8; DESCRIPTOR_LEN],
        seq: u64,
    },
    Protocol {
        peer: usize,
        reason: String,
    },
    Kernel(KernelError),
}

impl From<TransportError> for EngineError {
    fn from(e: TransportError) -> Self {
        EngineError::Transport(e)
    }
}

impl From<KernelError> for EngineError {
    fn from(e: KernelError) -> Self {
        EngineError::Kernel(e)
    }
}

/// What identifies this call's frames on the wire.
#[derive(Clone, Copy)]
struct Wire<'a> {
    seq: u64,
    descriptor: [u8; DESCRIPTOR_LEN],
    /// A plan of messages ([`Plan::wires`]): each frame's `step` picks its
    /// sequence number, wire step and descriptor here instead.
    tags: &'a [WireTag],
}

impl Wire<'_> {
    /// The header of this call's frame of `step` and `slice`, `len` bytes,
    /// exchanged with `peer`. Slices and the small-message path are at
    /// most 1 GiB (`Config::validate`); a larger frame is a bug, reported
    /// rather than wrapped.
    #[inline]
    fn header(
        &self,
        step: u32,
        slice: u32,
        len: usize,
        peer: usize,
    ) -> Result<FrameHeader, EngineError> {
        let (seq, step, descriptor) = match self.tags.get(step as usize) {
            Some(t) => (t.seq, t.step, t.descriptor),
            None => (self.seq, step, self.descriptor),
        };
        Ok(FrameHeader {
            tag: Tag { seq, step, slice },
            len: u32::try_from(len).map_err(|_| EngineError::Protocol {
                peer,
                reason: format!("a frame of {len} bytes exceeds the 4 GiB frame limit"),
            })?,
            descriptor,
        })
    }
}

/// Registers the memory of an operation with `link` when the links ask for
/// it (`registration`, from [`Links::registration`]).
#[inline]
fn register(
    registration: bool,
    link: &mut (dyn MessageLink + '_),
    parts: &[Lent<'_>],
) -> Result<(), EngineError> {
    if registration {
        for p in parts {
            link.register(p.bytes())?;
        }
    }
    Ok(())
}

/// Where a call in progress writes its result.
enum Out<'a> {
    /// Host memory, in cells that frames in flight own in turn.
    Host(Cells<'a>),
    /// Device memory, staged through the host.
    Device(&'a mut dyn DeviceMemory),
    /// Device memory by address: the links move frames straight into and
    /// out of it, the device's kernels reduce there.
    Addressed(Addressed<'a>),
}

/// A device output whose links move its memory by address.
struct Addressed<'a> {
    /// The output, in cells as host outputs are.
    cells: Cells<'a, DevMut<'a>>,
    /// The device's operations on it.
    ops: Arc<dyn DeviceOps>,
    /// Frames of at most this many bytes go through host staging
    /// ([`oxccl_transport::Capabilities::by_address_over`]).
    over: usize,
    /// Device memory for one frame to reduce; `None` while a receive holds it.
    scratch: Option<DevMut<'a>>,
}

/// The buffers and arithmetic of a call, which both halves use.
struct Data<'a> {
    input: Option<Input<'a>>,
    output: Out<'a>,
    /// Where the input's byte 0 sits in the output's coordinates.
    off: usize,
    dtype: DType,
    op: ReduceOp,
    world: usize,
    reducer: &'a dyn Reducer,
    /// Host bytes for an out-of-place input on its way to a device output.
    bounce: Vec<u8>,
}

impl Data<'_> {
    /// `output[range] = input[range - off]`.
    fn copy_input(&mut self, range: Range<usize>) -> Result<(), EngineError> {
        let Some(input) = self.input else {
            return Ok(());
        };
        let src = range.start - self.off..range.end - self.off;
        match (input, &mut self.output) {
            (Input::Host(i), Out::Host(o)) => o.each_mut(&range, 0..0, |at, dst| {
                dst.copy_from_slice(&i[src.start + at..src.start + at + dst.len()]);
                Ok(())
            })?,
            (Input::Host(i), Out::Device(o)) => o.write(range.start, &i[src])?,
            (Input::Device(i), Out::Host(o)) => {
                o.each_mut(&range, 0..0, |at, dst| Ok(i.read(src.start + at, dst)?))?
            }
            (Input::Device(i), Out::Device(o)) => {
                self.bounce.resize(range.len(), 0);
                i.read(src.start, &mut self.bounce)?;
                o.write(range.start, &self.bounce)?;
            }
            (Input::Addressed(i), Out::Addressed(o)) => {
                let (ops, cells) = (&o.ops, &mut o.cells);
                cells.each_mut(&range, 0..0, |at, cell| {
                    let from = src.start + at..src.start + at + cell.len();
                    let from = i.slice(from).ok_or_else(|| outside("input", &src))?;
                    Ok(ops.copy(cell.reborrow(), from)?)
                })?
            }
            (Input::Addressed(_), _) | (_, Out::Addressed(_)) => {
                return Err(EngineError::Protocol {
                    peer: 0,
                    reason: "a device input by address with an output that is not, or the \
                             other way round"
                        .into(),
                });
            }
        }
        Ok(())
    }
}

/// A range of a call's plan outside its buffer (a bug, reported).
fn outside(what: &str, range: &Range<usize>) -> EngineError {
    EngineError::Protocol {
        peer: 0,
        reason: format!("bytes {range:?} are outside the call's {what}"),
    }
}

/// Takes back the memory a done frame of `range` was lent: the output's
/// cells go back to the output; a staging buffer is returned to its owner.
#[inline]
fn take_back<'a>(
    mut parts: Parts<'a>,
    range: &Range<usize>,
    at: Range<usize>,
    data: &mut Data<'a>,
) -> Result<Option<Vec<u8>>, EngineError> {
    match (parts.first(), &mut data.output) {
        (Some(Lent::Owned { .. }), _) => match parts.pop() {
            Some(Lent::Owned { buf, .. }) => Ok(Some(buf)),
            _ => Ok(None),
        },
        (Some(Lent::Exclusive(_)), Out::Host(cells)) => {
            cells.give_back(range, at, parts).map(|()| None)
        }
        (Some(Lent::DeviceMut(_)), Out::Addressed(o)) => {
            o.cells.give_back(range, at, parts).map(|()| None)
        }
        // Input bytes, or an empty range.
        _ => Ok(None),
    }
}

/// What one [`Call::pump`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pumped {
    /// Some bytes went either way.
    pub moved: bool,
    /// The next link could not take the next frame's bytes.
    pub send_full: bool,
}

/// One collective in progress on one rank.
pub(crate) struct Call<'a> {
    plan: &'a Plan,
    wire: Wire<'a>,
    data: Data<'a>,
    progress: Progress,
    send: SendHalf<'a>,
    recv: RecvHalf<'a>,
    single_copy_from: Option<u32>,
    /// A prologue copy that waits for the first moment without traffic.
    deferred: Option<Range<usize>>,
}

impl<'a> Call<'a> {
    /// Starts `job`: [`Call::new`], then [`Call::begin`].
    #[cfg(test)]
    pub(crate) fn start(job: Job<'a>) -> Result<Call<'a>, EngineError> {
        let mut call = Call::new(job);
        call.begin()?;
        Ok(call)
    }

    /// The call of `job`, with its buffers sized and nothing run yet.
    /// Infallible, so that the (large) call is built where it is kept.
    #[inline]
    pub(crate) fn new(job: Job<'a>) -> Call<'a> {
        let Job {
            plan,
            seq,
            descriptor,
            input,
            output,
            dtype,
            op,
            world,
            reducer,
            staging,
            single_copy_from,
            ..
        } = job;
        // Device slices up to this many bytes are staged through the host.
        let device = match &output {
            Output::Host(_) => None,
            Output::Device(_) => Some(usize::MAX),
            Output::Addressed { over, .. } => Some(*over),
        };
        let output = match output {
            Output::Host(o) => Out::Host(Cells::new(o, plan)),
            Output::Device(d) => Out::Device(d),
            Output::Addressed {
                mem,
                ops,
                over,
                scratch,
            } => Out::Addressed(Addressed {
                cells: Cells::new(mem, plan),
                ops,
                over,
                scratch,
            }),
        };
        Call {
            plan,
            wire: Wire {
                seq,
                descriptor,
                tags: &plan.wires,
            },
            data: Data {
                input,
                output,
                off: plan.input_offset,
                dtype,
                op,
                world,
                reducer,
                bounce: Vec::new(),
            },
            progress: Progress::default(),
            send: SendHalf::new(plan, device),
            recv: RecvHalf::new(plan, device, staging),
            single_copy_from,
            deferred: None,
        }
    }

    /// Runs the parts that need no peer: a prologue copy that cannot wait
    /// (one that can is kept for a moment without traffic), an average over
    /// one rank.
    pub(crate) fn begin(&mut self) -> Result<(), EngineError> {
        let plan = self.plan;
        if let (Some(r), Some(_)) = (plan.prologue_copy.clone(), self.data.input) {
            if plan.prologue_deferrable && self.has_frames() {
                self.deferred = Some(r);
            } else {
                self.data.copy_input(r)?;
            }
        }
        if let Some(r) = plan.local_avg.clone() {
            let (dtype, world, reducer) = (self.data.dtype, self.data.world, self.data.reducer);
            match &mut self.data.output {
                Out::Host(o) => {
                    o.each_mut(&r, 0..0, |_, c| Ok(reducer.finish_avg(dtype, c, world)?))?
                }
                Out::Device(d) => d.finish_avg(dtype, r.start, r.len(), world)?,
                Out::Addressed(a) => {
                    let ops = &a.ops;
                    a.cells.each_mut(&r, 0..0, |_, c| {
                        Ok(ops.finish_avg(dtype, c.reborrow(), world)?)
                    })?
                }
            }
        }
        Ok(())
    }

    /// Whether the call exchanges any frame at all.
    pub(crate) fn has_frames(&self) -> bool {
        !(self.plan.sends.is_empty() && self.plan.recvs.is_empty())
    }

    /// Moves every frame that can move now, both ways, without waiting.
    #[inline]
    pub(crate) fn pump(&mut self, links: &mut Links<'_>) -> Result<Pumped, EngineError> {
        let (sent, send_full) = self.send.pump(
            links,
            self.plan,
            &mut self.progress,
            &self.wire,
            &mut self.data,
            self.single_copy_from,
        )?;
        let received = self.recv.pump(
            links,
            self.plan,
            &mut self.progress,
            &self.wire,
            &mut self.data,
        )?;
        Ok(Pumped {
            moved: sent || received,
            send_full,
        })
    }

    /// Every frame went both ways.
    #[inline]
    pub(crate) fn done(&self) -> bool {
        self.progress.done(self.plan)
    }

    /// Uses a moment without traffic for the deferred prologue; whether
    /// there was one.
    pub(crate) fn idle_work(&mut self) -> Result<bool, EngineError> {
        match self.deferred.take() {
            Some(r) => self.data.copy_input(r).map(|()| true),
            None => Ok(false),
        }
    }

    /// Completes a call whose frames are done.
    #[inline]
    pub(crate) fn finish(&mut self) -> Result<(), EngineError> {
        self.idle_work().map(|_| ())
    }

    /// The error of a call that made no progress for `waited`.
    fn timed_out(&self, waited: Duration) -> EngineError {
        let p = &self.progress;
        let to = p
            .next_send(self.plan)
            .or_else(|| self.plan.sends.get(p.sent()))
            .map(|s| s.peer);
        match (p.next_recv(self.plan), to) {
            (Some(r), _) if !self.recv.holding() => EngineError::Timeout {
                peer: r.peer,
                what: format!(
                    "data from rank {} (step {}, slice {}; {} of {} frames received)",
                    r.peer,
                    r.step,
                    r.slice,
                    p.received(),
                    self.plan.recvs.len()
                ),
                waited,
            },
            (_, Some(next)) => EngineError::Timeout {
                peer: next,
                what: format!(
                    "rank {next} to take data ({} of {} frames sent)",
                    p.sent(),
                    self.plan.sends.len()
                ),
                waited,
            },
            (_, None) => EngineError::Protocol {
                peer: 0,
                reason: "a call stalled with nothing left to send or receive".into(),
            },
        }
    }

    /// The link to sleep on for reading, and for writing when the send
    /// half found its link full; and the link of the next frame still owed
    /// to a peer, watched for a hang-up.
    fn waits<'l>(&self, links: &'l Links<'_>, send_full: bool) -> [Option<&'l dyn Endpoint>; 3] {
        let p = &self.progress;
        let read = match p.next_recv(self.plan) {
            Some(r) if !self.recv.holding() => {
                links.link_from_ref(r.peer).map(|l| l as &dyn Endpoint)
            }
            _ => None,
        };
        let owed = self
            .plan
            .sends
            .get(p.sent())
            .and_then(|s| links.link_to_ref(s.peer))
            .map(|l| l as &dyn Endpoint);
        if send_full {
            [read, owed, None]
        } else {
            [read, None, owed]
        }
    }
}

/// The links of a call in progress, which withdraws what the halves may
/// have posted ([`Endpoint::withdraw`]) when it is dropped before the call
/// completed: on an error return and while a panic unwinds.
///
/// The frames in flight own their memory ([`oxccl_transport::Outgoing`],
/// [`oxccl_transport::Incoming`]), so none of it can be reused while they
/// live; but they are dropped with the [`Call`] when [`run`] is left, and a
/// link may still use that memory then: shared memory's single copy has
/// the peer read a partly sent frame in place, and an RDMA adapter writes
/// a posted receive when its message comes. The failure handling that
/// follows (reporting, then closing the links) may take seconds, and a
/// panic skips it, so the guard, declared after the call and dropped
/// before it, takes the operations back first. Completing costs one store
/// of a flag per call, nothing per frame.
struct Withdraw<'a, 'l> {
    links: &'a mut Links<'l>,
    plan: &'a Plan,
    completed: bool,
}

impl Drop for Withdraw<'_, '_> {
    fn drop(&mut self) {
        if self.completed {
            return;
        }
        // Every link this call uses, once.
        let mut done: Vec<(usize, bool)> = Vec::new();
        let sends = self.plan.sends.iter().map(|s| (s.peer, true));
        let recvs = self.plan.recvs.iter().map(|r| (r.peer, false));
        for (peer, out) in sends.chain(recvs) {
            if done.contains(&(peer, out)) {
                continue;
            }
            done.push((peer, out));
            let link = if out {
                self.links.link_to(peer)
            } else {
                self.links.link_from(peer)
            };
            if let Some(l) = link {
                l.withdraw();
            }
        }
    }
}

/// Makes a device call's buffers memory by address when every link moves
/// their kind of memory itself (`kinds`, frames of more than `over` bytes:
/// [`Links::by_address`]), with device scratch for the frames it reduces;
/// leaves any other call as it is (staged through the host).
fn by_address<'a>(
    mut job: Job<'a>,
    (kinds, over): (MemoryKinds, usize),
) -> Result<Job<'a>, EngineError> {
    let (Output::Device(out), Some(home)) = (&job.output, job.scratch.take()) else {
        return Ok(job);
    };
    let kind = match out.addressed() {
        Some((r, _)) if kinds.contains(r.kind()) => r.kind(),
        _ => return Ok(job),
    };
    let backend = out.backend();
    // An input on the same device, by address too.
    let input = match job.input {
        None => None,
        Some(Input::Device(d)) if d.backend() == backend => match d.addressed() {
            Some((r, _)) if r.kind() == kind => Some(Input::Addressed(r)),
            _ => return Ok(job),
        },
        Some(_) => return Ok(job),
    };
    // One frame's worth of device memory for the frames reduced by address.
    let need = job
        .plan
        .recvs
        .iter()
        .filter(|r| matches!(r.commit, crate::schedule::Commit::Reduce { .. }))
        .map(|r| r.range.len())
        .filter(|&l| l > over)
        .max()
        .unwrap_or(0);
    if need > 0
        && home
            .as_ref()
            .is_none_or(|s| s.len_bytes() < need || s.backend() != backend)
    {
        *home = Some(out.alloc_like(need)?);
    }
    let scratch = match home.as_mut() {
        Some(s) if need > 0 => Some(
            s.addressed_mut()
                .map(|(m, _)| m)
                .ok_or_else(|| lost_address("scratch"))?,
        ),
        _ => None,
    };
    let Output::Device(out) = job.output else {
        return Ok(job);
    };
    let (mem, ops) = out.addressed_mut().ok_or_else(|| lost_address("output"))?;
    Ok(Job {
        input,
        output: Output::Addressed {
            mem,
            ops,
            over,
            scratch,
        },
        ..job
    })
}

/// A device buffer that had an address when asked and none the next time
/// (a backend's bug).
fn lost_address(what: &str) -> EngineError {
    EngineError::Protocol {
        peer: 0,
        reason: format!("the call's device {what} lost its address"),
    }
}

/// Runs `job` to completion. `links` may be `None` only when the plan has no frames.
///
/// On every other exit, an error or a panic, whatever the send half posted
/// on a link is withdrawn before `run` returns or the panic leaves it, so
/// the caller may free or reuse its buffers at once.
pub(crate) fn run(links: Option<&mut Links<'_>>, job: Job<'_>) -> Result<(), EngineError> {
    let (timeout, spin, crowded) = (job.timeout, job.spin, job.crowded);
    let job = match &links {
        Some(l) => by_address(job, l.by_address())?,
        None => job,
    };
    let mut call = Call::new(job);
    call.begin()?;
    if !call.has_frames() {
        return call.finish();
    }
    let Some(links) = links else {
        return Err(EngineError::Protocol {
            peer: 0,
            reason: "a plan with frames but no links".into(),
        });
    };
    // Declared after `call`, so dropped before it (and its staging).
    let mut guard = Withdraw {
        links,
        plan: call.plan,
        completed: false,
    };
    let links = &mut *guard.links;
    let cheap = links.iter().all(|l| l.capabilities().cheap_polling);
    let mut idle = Idle::new(spin, timeout, cheap, crowded);

    loop {
        let pumped = call.pump(links)?;
        if call.done() {
            // Every frame was written: nothing is posted any more.
            guard.completed = true;
            return call.finish();
        }
        if pumped.moved {
            idle.reset();
            continue;
        }
        if call.idle_work()? {
            continue;
        }
        match idle.next(Instant::now()) {
            Step::Pause(n) => (0..n).for_each(|_| std::hint::spin_loop()),
            Step::Yield => std::thread::yield_now(),
            Step::TimedOut(waited) => return Err(call.timed_out(waited)),
            Step::Sleep(left) => {
                let [read, write, watch] = call.waits(links, pumped.send_full);
                let ready = wait_watching(read, write, watch, left)?;
                if ready.hung_up {
                    let plan = call.plan;
                    let owed = plan.sends.len() - call.progress.sent();
                    let peer = watch.map_or(0, |l| l.peer());
                    return Err(EngineError::Transport(TransportError::PeerClosed {
                        peer,
                        how: format!(
                            "hung up while {owed} of {} frames were still to be sent to it",
                            plan.sends.len()
                        ),
                    }));
                }
            }
        }
    }
}
