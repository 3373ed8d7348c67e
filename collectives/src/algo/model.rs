//! A discrete-event model of an allreduce at scale: the real plans of an
//! [`Algorithm`] ([`Algorithm::plan`] for every rank) run against each other
//! over a latency/bandwidth model of a network ([`LinkModel`]).
//!
//! Each rank has one outbound port, one inbound port and one CPU:
//!
//! * a frame of `len` bytes occupies the sender's outbound port for
//!   `alpha + len * beta`; sends go strictly in plan order, each once its
//!   `after_recv` receive has been
//!   committed and the port is free. The frame has arrived when the send ends.
//! * the receiver's inbound port takes `len * beta` per frame, in arrival
//!   order, so that two senders into one rank share its bandwidth.
//! * receives are committed strictly in plan order, each once its frame has
//!   arrived, the previous commit is done and its
//!   `after_send` send has ended: a
//!   reduction costs the CPU `len * gamma`, a copy nothing (the copy out of
//!   the socket is part of `beta`).
//!
//! Frames between a pair of ranks are matched in the order sent, as on a
//! link. Because every port and every CPU takes its work in a fixed order,
//! a frame's times follow from the times of the frames it waits for: the
//! model is evaluated as a dataflow (each rank advances as far as its inputs
//! allow, then wakes the peers it sent to), with no event queue. A plan that
//! cannot complete ends in [`SimError::Deadlock`] instead of hanging.
//!
//! With [`Shaping`], each rank's outbound link is a token bucket instead
//! (Linux's `tc tbf`, as on the namespace hosts of `ci/netns-scale.sh`, or a
//! cloud instance's egress cap), and the calls run in a loop as a benchmark
//! times them: a frame's bytes leave at once while its rank holds tokens,
//! which come back at the link's rate (`1 / beta`); ingress is not shaped;
//! each rank starts its next call when it has finished the last. A loop of
//! calls, not one: the bucket's level at a call's start is what the calls
//! before it left.
//!
//! [`GatherReduce`] runs its allgather plan (the ring of
//! every rank's whole buffer) and then, as the communicator does, reduces the
//! `world` buffers locally: `(world - 1) * bytes * gamma` more per rank.
//!
//! Ops are stored compactly (three `u32`s each and one `f64` per commit), so
//! that 4096 ranks of the ring on 1 GiB (8190 frames per rank at the default
//! 512 KiB slice) fit in a few hundred MiB; [`Limits::max_ops`] refuses
//! larger runs up front.

use std::collections::VecDeque;
use std::fmt;

use oxccl_kernels::{DType, ReduceOp};

use super::{Algorithm, GatherReduce, LinkModel};
use crate::descriptor::Descriptor;
use crate::schedule::{Commit, Kind, Plan, Shape};

/// Bytes per element of the modelled allreduce (f32).
const ELEM: usize = 4;

/// The allreduce of `bytes` per rank the simulations run (f32, sum).
pub(crate) fn allreduce(bytes: usize) -> Descriptor {
    Descriptor {
        kind: Kind::AllReduce,
        dtype: DType::F32,
        op: ReduceOp::Sum,
        root: 0,
        count: bytes / ELEM,
    }
}

/// "No dependency" in the compact ops.
const NONE: u32 = u32::MAX;

/// Why a simulation gave no time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimError {
    /// The plans cannot complete: nothing can move and `rank` still has work.
    Deadlock {
        /// A rank that did not finish.
        rank: usize,
        /// Frames it sent, of `sends`.
        sent: usize,
        /// Frames in its plan.
        sends: usize,
        /// Frames it committed, of `recvs`.
        received: usize,
        /// Receives in its plan.
        recvs: usize,
    },
    /// The plans would hold more ops (sends plus receives, all ranks) than
    /// the limit.
    TooLarge {
        /// The estimated number of ops.
        ops: u64,
        /// The limit.
        max_ops: u64,
    },
    /// The algorithm cannot run this allreduce (or a frame, a peer or an
    /// index does not fit the compact form).
    Unsupported(String),
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimError::Deadlock {
                rank,
                sent,
                sends,
                received,
                recvs,
            } => write!(
                f,
                "deadlock: rank {rank} stuck after {sent} of {sends} sends and {received} of {recvs} receives"
            ),
            SimError::TooLarge { ops, max_ops } => {
                write!(f, "about {ops} ops, more than the limit of {max_ops}")
            }
            SimError::Unsupported(why) => write!(f, "unsupported: {why}"),
        }
    }
}

impl std::error::Error for SimError {}

/// Bounds on one simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most ops (sends plus receives over all ranks) to build; estimated
    /// from rank 0's plan times the world before anything else is built.
    pub max_ops: u64,
}

impl Default for Limits {
    /// 300 million ops: about 8 GiB at most.
    fn default() -> Limits {
        Limits { max_ops: 300 << 20 }
    }
}

/// What one simulation found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimResult {
    /// Seconds from the common start until the last rank is done.
    pub time: f64,
    /// Frames sent, all ranks together.
    pub frames: u64,
}

/// Outbound links shaped by token buckets, and the loop of calls that times
/// them (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shaping {
    /// The bucket, in bytes (`tc tbf`'s `burst`); full before the first call.
    pub burst: f64,
    /// Calls run before the timed ones, as a benchmark's warm-up.
    pub warmup: usize,
    /// Calls timed: the time reported is their mean.
    pub calls: usize,
}

/// One compact send: peer, length, the receive it waits for.
#[derive(Debug, Clone, Copy)]
struct SendC {
    peer: u32,
    len: u32,
    after: u32,
}

/// One compact receive: peer, length (top bit: reduce), the send it waits for.
#[derive(Debug, Clone, Copy)]
struct RecvC {
    peer: u32,
    len_reduce: u32,
    after: u32,
}

const REDUCE_BIT: u32 = 1 << 31;

/// One rank's compact plan.
#[derive(Debug, Default)]
struct Rank {
    sends: Vec<SendC>,
    recvs: Vec<RecvC>,
    /// Whether a receive waits for a send (then send ends are kept).
    keep_send_done: bool,
}

/// One rank's progress through its plan in one run.
#[derive(Debug, Default)]
struct State {
    /// Commit time of each receive done so far.
    recv_done: Vec<f64>,
    /// End of each send done so far (kept only where a receive waits for one).
    send_done: Vec<f64>,
    /// Sends done so far.
    sent: usize,
    out_free: f64,
    in_free: f64,
    cpu_free: f64,
    /// Tokens in the outbound bucket at `tokens_at` (shaped links only).
    tokens: f64,
    tokens_at: f64,
}

/// Frames on their way into one rank: per peer, arrival times in order sent.
#[derive(Debug, Default)]
struct Inbox(Vec<(u32, VecDeque<f64>)>);

impl Inbox {
    fn push(&mut self, from: u32, t: f64) {
        match self.0.iter_mut().find(|(p, _)| *p == from) {
            Some((_, q)) => q.push_back(t),
            None => self.0.push((from, VecDeque::from([t]))),
        }
    }

    fn pop(&mut self, from: u32) -> Option<f64> {
        self.0
            .iter_mut()
            .find(|(p, _)| *p == from)
            .and_then(|(_, q)| q.pop_front())
    }
}

/// `x` as a compact field: below 2^31, so that neither [`NONE`] nor
/// [`REDUCE_BIT`] is ambiguous.
fn small(x: usize, what: &str) -> Result<u32, SimError> {
    u32::try_from(x)
        .ok()
        .filter(|v| v & REDUCE_BIT == 0)
        .ok_or_else(|| SimError::Unsupported(format!("{what} {x} does not fit the compact form")))
}

fn compact(plan: &Plan) -> Result<Rank, SimError> {
    let mut sends = Vec::with_capacity(plan.sends.len());
    for op in &plan.sends {
        sends.push(SendC {
            peer: small(op.peer, "peer")?,
            len: small(op.range.len(), "frame length")?,
            after: match op.after_recv {
                Some(i) => small(i, "index")?,
                None => NONE,
            },
        });
    }
    let mut recvs = Vec::with_capacity(plan.recvs.len());
    let mut keep_send_done = false;
    for op in &plan.recvs {
        let reduce = match op.commit {
            Commit::Reduce { .. } => REDUCE_BIT,
            Commit::Copy | Commit::Discard => 0,
        };
        keep_send_done |= op.after_send.is_some();
        recvs.push(RecvC {
            peer: small(op.peer, "peer")?,
            len_reduce: small(op.range.len(), "frame length")? | reduce,
            after: match op.after_send {
                Some(i) => small(i, "index")?,
                None => NONE,
            },
        });
    }
    Ok(Rank {
        sends,
        recvs,
        keep_send_done,
    })
}

/// The shape rank `rank` plans for an allreduce of `bytes` (f32) per rank
/// by `algo`: the allgather of whole buffers for the gather-reduce, as the
/// communicator runs it.
fn shape(algo: &dyn Algorithm, world: usize, rank: usize, bytes: usize, slice: usize) -> Shape {
    let count = bytes / ELEM;
    let gather = algo.name() == GatherReduce.name();
    Shape {
        kind: if gather {
            Kind::AllGather
        } else {
            Kind::AllReduce
        },
        world,
        rank,
        count: if gather { count * world } else { count },
        elem: ELEM,
        root: 0,
        avg: false,
        out_of_place: true,
        slice_elems: if gather {
            count.max(1)
        } else {
            (slice / ELEM).max(1)
        },
    }
}

/// Simulates an allreduce of `bytes` per rank (f32 elements; a remainder
/// below 4 bytes is dropped) by `algo` on `world` ranks with slices of at
/// most `slice_bytes`, over `link`, within the default [`Limits`]. Returns
/// the time the last rank finishes, in seconds.
pub fn simulate(
    algo: &dyn Algorithm,
    world: usize,
    bytes: usize,
    slice_bytes: usize,
    link: &LinkModel,
) -> Result<f64, SimError> {
    simulate_with(algo, world, bytes, slice_bytes, link, Limits::default()).map(|r| r.time)
}

/// [`simulate`] with explicit limits, returning the frame count too.
pub fn simulate_with(
    algo: &dyn Algorithm,
    world: usize,
    bytes: usize,
    slice_bytes: usize,
    link: &LinkModel,
    limits: Limits,
) -> Result<SimResult, SimError> {
    simulate_many(algo, world, bytes, slice_bytes, &[*link], limits, None)?
        .pop()
        .unwrap_or(Err(SimError::Unsupported("no link".into())))
}

/// [`simulate_with`] over several links at once: the plans are built once
/// and each link runs on its own thread. The outer error is one that no
/// link could get past (building the plans); the inner ones are per link.
/// With `shaping`, the links are shaped by token buckets and a loop of
/// calls is timed (see the module docs): each result is then the mean time
/// of one timed call, and the frames of one call.
pub fn simulate_many(
    algo: &dyn Algorithm,
    world: usize,
    bytes: usize,
    slice_bytes: usize,
    links: &[LinkModel],
    limits: Limits,
    shaping: Option<Shaping>,
) -> Result<Vec<Result<SimResult, SimError>>, SimError> {
    let d = allreduce(bytes);
    if world == 0 || !algo.supports(&d, world) {
        return Err(SimError::Unsupported(format!(
            "{} cannot run an allreduce of {bytes} bytes on {world} ranks",
            algo.name()
        )));
    }
    if world == 1 {
        let zero = SimResult {
            time: 0.0,
            frames: 0,
        };
        return Ok(links.iter().map(|_| Ok(zero)).collect());
    }
    let build = |r: usize| algo.plan(&shape(algo, world, r, bytes, slice_bytes));
    let first = build(0);
    let ops = (first.sends.len() + first.recvs.len()) as u64 * world as u64;
    if ops > limits.max_ops {
        return Err(SimError::TooLarge {
            ops,
            max_ops: limits.max_ops,
        });
    }
    let ranks = build_all(world, first, &build)?;
    check_peers(&ranks)?;
    let gather = algo.name() == GatherReduce.name();
    let one = |l: &LinkModel| {
        // The gather-reduce's local reduction of the world's buffers.
        let local = if gather {
            (world - 1) as f64 * (d.count * ELEM) as f64 * l.gamma
        } else {
            0.0
        };
        let (time, frames) = run(&ranks, l, local, shaping.as_ref())?;
        Ok(SimResult { time, frames })
    };
    Ok(std::thread::scope(|s| {
        let handles: Vec<_> = links.iter().map(|l| s.spawn(move || one(l))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(SimError::Unsupported("a run panicked".into())))
            })
            .collect()
    }))
}

/// Every rank's compact plan, built on as many threads as there are cores.
fn build_all(
    world: usize,
    first: Plan,
    build: &(dyn Fn(usize) -> Plan + Sync),
) -> Result<Vec<Rank>, SimError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(world);
    let per = world.div_ceil(threads);
    let first = compact(&first)?;
    let parts: Vec<Result<Vec<Rank>, SimError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t * per..((t + 1) * per).min(world))
                        .filter(|r| *r != 0)
                        .map(|r| compact(&build(r)))
                        .collect::<Result<Vec<Rank>, SimError>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(SimError::Unsupported("a plan panicked".into())))
            })
            .collect()
    });
    let mut ranks = Vec::with_capacity(world);
    ranks.push(first);
    for p in parts {
        ranks.extend(p?);
    }
    Ok(ranks)
}

fn check_peers(ranks: &[Rank]) -> Result<(), SimError> {
    let world = ranks.len();
    for rk in ranks {
        if rk.sends.iter().any(|s| s.peer as usize >= world)
            || rk.recvs.iter().any(|r| r.peer as usize >= world)
        {
            return Err(SimError::Unsupported(
                "a plan names a peer beyond the world".into(),
            ));
        }
    }
    Ok(())
}

/// Runs the compact plans: once, or in a loop of calls over shaped links.
/// Returns the time of one call (the mean of the timed ones) and the frames
/// of one call; `local` is CPU work each rank does after its last commit.
fn run(
    ranks: &[Rank],
    l: &LinkModel,
    local: f64,
    shaping: Option<&Shaping>,
) -> Result<(f64, u64), SimError> {
    let world = ranks.len();
    let burst = shaping.map(|s| s.burst);
    let mut states: Vec<State> = ranks
        .iter()
        .map(|rk| State {
            recv_done: Vec::with_capacity(rk.recvs.len()),
            send_done: if rk.keep_send_done {
                Vec::with_capacity(rk.sends.len())
            } else {
                Vec::new()
            },
            tokens: burst.unwrap_or(0.0),
            ..State::default()
        })
        .collect();
    let (warmup, timed) = shaping.map_or((0, 1), |s| (s.warmup, s.calls.max(1)));
    // When each rank finished its last call (and may start the next).
    let mut start = vec![0.0; world];
    let mut timed_from = 0.0;
    let mut frames = 0u64;
    for call in 0..warmup + timed {
        if call == warmup {
            timed_from = start.iter().copied().fold(0.0, f64::max);
        }
        for st in &mut states {
            st.sent = 0;
            st.recv_done.clear();
            st.send_done.clear();
        }
        frames = one_call(ranks, &mut states, &start, l, burst)?;
        for (t, st) in start.iter_mut().zip(&states) {
            *t = st.out_free.max(st.cpu_free) + local;
        }
    }
    let end = start.iter().copied().fold(0.0, f64::max);
    Ok(((end - timed_from) / timed as f64, frames))
}

/// When a frame of `len` bytes, handed to a shaped link at `at`, has left:
/// at once while the bucket holds tokens, then at the link's rate.
fn shaped_send(st: &mut State, at: f64, len: f64, burst: f64, beta: f64) -> f64 {
    let refilled = if beta > 0.0 {
        (at - st.tokens_at).max(0.0) / beta
    } else {
        burst
    };
    let tokens = (st.tokens + refilled).min(burst);
    if tokens >= len {
        st.tokens = tokens - len;
        st.tokens_at = at;
        at
    } else {
        let left = at + (len - tokens) * beta;
        st.tokens = 0.0;
        st.tokens_at = left;
        left
    }
}

/// One call of every rank's plan, each rank starting at its `start`;
/// returns the frames sent.
fn one_call(
    ranks: &[Rank],
    states: &mut [State],
    start: &[f64],
    l: &LinkModel,
    burst: Option<f64>,
) -> Result<u64, SimError> {
    let world = ranks.len();
    let mut inboxes: Vec<Inbox> = (0..world).map(|_| Inbox::default()).collect();
    let mut queue: VecDeque<usize> = (0..world).collect();
    let mut queued = vec![true; world];
    let mut frames = 0u64;
    while let Some(r) = queue.pop_front() {
        queued[r] = false;
        let (rk, st) = (&ranks[r], &mut states[r]);
        loop {
            let mut moved = false;
            // Sends, in plan order, each once its receive is committed.
            while let Some(op) = rk.sends.get(st.sent) {
                let dep = if op.after == NONE {
                    start[r]
                } else {
                    match st.recv_done.get(op.after as usize) {
                        Some(t) => *t,
                        None => break,
                    }
                };
                let handed = st.out_free.max(dep) + l.alpha;
                let end = match burst {
                    None => handed + op.len as f64 * l.beta,
                    Some(b) => shaped_send(st, handed, op.len as f64, b, l.beta),
                };
                st.out_free = end;
                if rk.keep_send_done {
                    st.send_done.push(end);
                }
                st.sent += 1;
                let peer = op.peer as usize;
                inboxes[peer].push(r as u32, end);
                if !queued[peer] {
                    queued[peer] = true;
                    queue.push_back(peer);
                }
                frames += 1;
                moved = true;
            }
            // Receives, in plan order, each once its frame is in and its
            // send is done.
            while let Some(op) = rk.recvs.get(st.recv_done.len()) {
                let dep = if op.after == NONE {
                    start[r]
                } else if (op.after as usize) < st.sent {
                    st.send_done.get(op.after as usize).copied().unwrap_or(0.0)
                } else {
                    break;
                };
                let Some(arrived) = inboxes[r].pop(op.peer) else {
                    break;
                };
                let len = (op.len_reduce & !REDUCE_BIT) as f64;
                // A shaped link limits the sender's side only.
                let inbound = if burst.is_some() { 0.0 } else { len * l.beta };
                let got = arrived.max(st.in_free + inbound);
                st.in_free = got;
                let work = if op.len_reduce & REDUCE_BIT != 0 {
                    len * l.gamma
                } else {
                    0.0
                };
                let end = got.max(st.cpu_free).max(dep) + work;
                st.cpu_free = end;
                st.recv_done.push(end);
                moved = true;
            }
            if !moved {
                break;
            }
        }
    }
    for (rank, (rk, st)) in ranks.iter().zip(states.iter()).enumerate() {
        if st.sent < rk.sends.len() || st.recv_done.len() < rk.recvs.len() {
            return Err(SimError::Deadlock {
                rank,
                sent: st.sent,
                sends: rk.sends.len(),
                received: st.recv_done.len(),
                recvs: rk.recvs.len(),
            });
        }
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::algo::{ALL, HalvingDoubling, RecursiveDoubling, Ring};
    use crate::schedule::{RecvOp, SendOp, Src};

    const TCP: LinkModel = LinkModel::TCP;

    /// The closed form, without halving-doubling's measured byte penalty
    /// (which no schedule shows: the simulated links stream alike).
    fn closed(a: &dyn Algorithm, world: usize, bytes: usize, l: &LinkModel) -> f64 {
        let d = allreduce(bytes);
        let cost = a.cost(&d, world, l);
        if a.name() != "halving_doubling" {
            return cost;
        }
        let pw = (1usize << world.ilog2()) as f64;
        let sent = 2.0 * (pw - 1.0) / pw * (d.count * ELEM) as f64;
        cost - sent * l.beta * l.hd_byte_penalty
    }

    fn near(sim: f64, model: f64, tol: f64) -> bool {
        (sim / model - 1.0).abs() <= tol
    }

    /// With one slice per frame, the simulated schedules take exactly the
    /// steps the closed forms count.
    #[test]
    fn one_slice_agrees_with_the_closed_forms() {
        for world in [2, 4, 8, 16, 64] {
            for bytes in [8, 4096, 256 << 10] {
                let slice = 1 << 30;
                for a in [
                    &Ring as &dyn Algorithm,
                    &RecursiveDoubling,
                    &HalvingDoubling,
                ] {
                    let sim = simulate(a, world, bytes, slice, &TCP).unwrap();
                    let model = closed(a, world, bytes, &TCP);
                    assert!(
                        near(sim, model, 0.03),
                        "{} world {world} bytes {bytes}: sim {sim} model {model}",
                        a.name()
                    );
                }
                let sim = simulate(&GatherReduce, world, bytes, slice, &TCP).unwrap();
                let model = closed(&GatherReduce, world, bytes, &TCP);
                assert!(
                    near(sim, model, 0.03),
                    "gather {world} {bytes}: {sim} {model}"
                );
            }
        }
    }

    /// Off a power of two the hypercube schedules fold; the simulation
    /// stays close to the closed form that charges the fold.
    #[test]
    fn folds_cost_about_what_the_closed_form_says() {
        for world in [3, 6, 12, 100] {
            for a in [&RecursiveDoubling as &dyn Algorithm, &HalvingDoubling] {
                let sim = simulate(a, world, 4096, 1 << 30, &TCP).unwrap();
                let model = closed(a, world, 4096, &TCP);
                assert!(
                    near(sim, model, 0.10),
                    "{} {world}: {sim} {model}",
                    a.name()
                );
            }
        }
    }

    /// Slices pipeline: on a large buffer the sliced ring is faster than the
    /// closed form's unpipelined reduce and never faster than its bandwidth
    /// term alone.
    #[test]
    fn slicing_overlaps_reduction_with_the_wire() {
        let (world, bytes) = (8, 64 << 20);
        let sim = simulate(&Ring, world, bytes, 512 << 10, &TCP).unwrap();
        let model = closed(&Ring, world, bytes, &TCP);
        let wire = 2.0 * 7.0 / 8.0 * bytes as f64 * TCP.beta;
        assert!(sim < model && sim > wire, "{sim} {model} {wire}");
    }

    #[test]
    fn every_allreduce_algorithm_completes_at_odd_worlds_and_sizes() {
        for world in [2, 3, 5, 7, 9, 33] {
            for bytes in [0, 4, 12, 1000, 300_000] {
                for a in ALL {
                    let d = allreduce(bytes);
                    if a.supports(&d, world) {
                        let t = simulate(a, world, bytes, 64 << 10, &TCP).unwrap();
                        assert!(t > 0.0, "{} {world} {bytes}", a.name());
                    }
                }
            }
        }
    }

    /// Every rank first waits for a frame that its peer sends only after
    /// receiving one: nothing can move.
    struct Stuck;

    impl Algorithm for Stuck {
        fn name(&self) -> &'static str {
            "stuck"
        }
        fn supports(&self, _d: &Descriptor, _world: usize) -> bool {
            true
        }
        fn cost(&self, _d: &Descriptor, _world: usize, _l: &LinkModel) -> f64 {
            0.0
        }
        fn peers(&self, rank: usize, world: usize) -> Vec<usize> {
            vec![(rank + 1) % world]
        }
        fn plan(&self, s: &Shape) -> Plan {
            let peer = (s.rank + 1) % s.world;
            Plan {
                sends: vec![SendOp {
                    peer,
                    step: 0,
                    slice: 0,
                    src: Src::Input,
                    range: 0..4,
                    after_recv: Some(0),
                }],
                recvs: vec![RecvOp {
                    peer: (s.rank + s.world - 1) % s.world,
                    step: 0,
                    slice: 0,
                    range: 0..4,
                    commit: Commit::Copy,
                    after_send: None,
                }],
                ..Plan::default()
            }
        }
    }

    #[test]
    fn a_plan_that_cannot_complete_is_a_deadlock() {
        let e = simulate(&Stuck, 4, 16, 16, &TCP).unwrap_err();
        assert!(
            matches!(
                e,
                SimError::Deadlock {
                    sent: 0,
                    received: 0,
                    ..
                }
            ),
            "{e}"
        );
    }

    /// Two ranks exchanging 64 KiB (one frame each way) in a loop over a
    /// shaped link: 500 µs a message, 100 MB/s, no reduction cost.
    fn shaped_exchange(burst: f64, warmup: usize, calls: usize) -> f64 {
        let link = LinkModel {
            alpha: 500e-6,
            beta: 1e-8,
            gamma: 0.0,
            pipelines: false,
            hd_byte_penalty: crate::algo::HD_BYTE_PENALTY,
            crowded_slice: usize::MAX,
        };
        let shaping = Shaping {
            burst,
            warmup,
            calls,
        };
        let r = simulate_many(
            &RecursiveDoubling,
            2,
            64 << 10,
            1 << 30,
            &[link],
            Limits::default(),
            Some(shaping),
        )
        .unwrap();
        let one = r.into_iter().next().unwrap().unwrap();
        assert_eq!(one.frames, 2);
        one.time
    }

    /// Without a bucket every byte leaves at the rate, after the message's
    /// latency: alpha + len * beta a call.
    #[test]
    fn a_shaped_link_without_a_bucket_charges_every_byte() {
        let t = shaped_exchange(0.0, 2, 8);
        assert!(near(t, 500e-6 + 65536e-8, 1e-9), "{t}");
    }

    /// A bucket that holds every call's bytes: a call costs its latency.
    #[test]
    fn a_bucket_larger_than_the_loop_makes_bytes_free() {
        let t = shaped_exchange(1e6, 0, 3);
        assert!(near(t, 500e-6, 1e-9), "{t}");
    }

    /// Once the loop has drained the bucket, the tokens that come back
    /// during a message's latency carry part of its bytes: a call costs
    /// max(alpha, len * beta), not their sum.
    #[test]
    fn a_drained_bucket_overlaps_latency_with_the_rate() {
        let t = shaped_exchange(256.0 * 1024.0, 40, 10);
        assert!(near(t, 65536e-8, 1e-9), "{t}");
        // Before it drains, the calls are faster than the rate.
        let early = shaped_exchange(256.0 * 1024.0, 0, 4);
        assert!(near(early, 500e-6, 1e-9), "{early}");
    }

    /// An unshaped loop is the single call's model: the same plans, the
    /// same link, once.
    #[test]
    fn shaping_is_off_in_the_single_call_model() {
        let t = simulate(&Ring, 8, 64 << 10, 512 << 10, &TCP).unwrap();
        let model = closed(&Ring, 8, 64 << 10, &TCP);
        assert!(near(t, model, 0.03), "{t} {model}");
    }

    #[test]
    fn too_many_ops_are_refused_before_building() {
        let e = simulate_with(&Ring, 64, 1 << 20, 4, &TCP, Limits { max_ops: 1000 }).unwrap_err();
        assert!(matches!(e, SimError::TooLarge { .. }), "{e}");
    }
}
