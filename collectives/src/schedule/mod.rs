//! Pure, sans-IO schedules of the collectives.
//!
//! A [`Plan`] lists, for one rank, the frames it sends and the frames it
//! receives, each in the order it happens, with the peer it goes to or
//! comes from, the byte range it covers and the dependency that orders it.
//! Frames to one peer arrive in the order sent; the engine takes sends in
//! plan order and receives in plan order. The ring schedules are here;
//! `hypercube` (halving-doubling, recursive doubling) and `tree` (binomial
//! broadcast) hold the others. [`Progress`] walks
//! a plan: it is fed completions (`handle_sent`, `handle_received`) and
//! polled for the next frame that may go (`next_send`, `next_recv`). There are
//! no sockets, threads or clocks here: the engine drives a plan over links,
//! and the simulator in this module's tests drives `world` plans against each
//! other with a seeded delivery order.
//!
//! # The ring algorithms
//!
//! The buffer of `count` elements is cut into `world` chunks (chunk `c` is
//! elements `c*count/world .. (c+1)*count/world`: counts need not divide by
//! the world and chunks may be empty). Each chunk travels as slices of at
//! most `slice_elems` elements; an empty chunk still travels as one empty
//! slice so that every step carries a frame and its descriptor.
//!
//! * reduce-scatter, `world - 1` steps: at step `k` rank `r` sends chunk
//!   `r-k-1` and receives chunk `r-k-2`, reducing it into its own. Step 0 is a
//!   *send*; the later steps are *recv-reduce-send*: the slice sent at step
//!   `k` is the one received and reduced at step `k-1`, so slice `j` of step
//!   `k` may go as soon as slice `j` of step `k-1` has been reduced. After the
//!   last step rank `r` holds the fully reduced chunk `r`.
//! * allgather, `world - 1` steps: at step `k` rank `r` sends chunk `r-k` and
//!   receives chunk `r-k-1` straight into place (*recv-copy-send*); step 0
//!   sends the rank's own chunk.
//! * allreduce: reduce-scatter then allgather, `2(world-1)` steps, one
//!   pipeline: the allgather's first step sends the slices of chunk `r` as
//!   they finish their last reduction.
//! * broadcast: a chain `root, root+1, ..., root-1`; every rank but the root
//!   receives each slice and forwards it (*recv-copy-send*); the last rank
//!   answers the root with an empty frame, so the root too learns of a
//!   mismatched or failed call.
//! * reduce: a chain `root+1, ..., root`; every rank but the first receives
//!   each slice, reduces it with its input and forwards it; the root receives
//!   last. The root sends the first rank an empty frame for the same reason.

mod exchange;
mod hypercube;
mod layout;
mod tree;

pub use exchange::{Landing, Message, pairwise, point_to_point};
pub use hypercube::{halving_doubling, hypercube_peers, recursive_doubling};
pub use layout::{chunk_range, slices};
pub use tree::{binomial_broadcast, binomial_reduce, tree_peers};

use std::ops::Range;

/// Which collective a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Every rank gets the reduction of every rank's buffer.
    AllReduce = 1,
    /// Every rank gets the root's buffer.
    Broadcast = 2,
    /// The root gets the reduction of every rank's buffer.
    Reduce = 3,
    /// Every rank gets the concatenation of every rank's buffer.
    AllGather = 4,
    /// Rank `r` gets chunk `r` of the reduction of every rank's buffer.
    ReduceScatter = 5,
    /// Returns once every rank has entered.
    Barrier = 6,
    /// Rank `r` gets block `r` of every rank's buffer, in rank order.
    AllToAll = 7,
    /// The root gets every rank's buffer, in rank order.
    Gather = 8,
    /// Rank `r` gets block `r` of the root's buffer.
    Scatter = 9,
    /// [`AllToAll`](Kind::AllToAll) with per-peer counts and displacements.
    AllToAllV = 10,
    /// Every rank gets every rank's buffer, each of its own count.
    AllGatherV = 11,
    /// Rank `r` gets block `r`, of count `counts[r]`, of the reduction.
    ReduceScatterV = 12,
    /// Messages between pairs of ranks (`send`, `recv` and their batches).
    SendRecv = 13,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 13] = [
        Kind::AllReduce,
        Kind::Broadcast,
        Kind::Reduce,
        Kind::AllGather,
        Kind::ReduceScatter,
        Kind::Barrier,
        Kind::AllToAll,
        Kind::Gather,
        Kind::Scatter,
        Kind::AllToAllV,
        Kind::AllGatherV,
        Kind::ReduceScatterV,
        Kind::SendRecv,
    ];

    /// The name used in messages ("all_reduce", ...).
    pub const fn name(self) -> &'static str {
        match self {
            Kind::AllReduce => "all_reduce",
            Kind::Broadcast => "broadcast",
            Kind::Reduce => "reduce",
            Kind::AllGather => "all_gather",
            Kind::ReduceScatter => "reduce_scatter",
            Kind::Barrier => "barrier",
            Kind::AllToAll => "all_to_all",
            Kind::Gather => "gather",
            Kind::Scatter => "scatter",
            Kind::AllToAllV => "all_to_all_v",
            Kind::AllGatherV => "all_gather_v",
            Kind::ReduceScatterV => "reduce_scatter_v",
            Kind::SendRecv => "send_recv",
        }
    }

    /// Whether the ring's algorithms run it (the first six kinds); the
    /// others are exchanges, straight between pairs of ranks.
    pub const fn on_ring(self) -> bool {
        matches!(
            self,
            Kind::AllReduce
                | Kind::Broadcast
                | Kind::Reduce
                | Kind::AllGather
                | Kind::ReduceScatter
                | Kind::Barrier
        )
    }

    /// The kind with discriminant `v`.
    pub fn from_u8(v: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u8 == v)
    }
}

/// The buffer a frame's bytes come from, or a reduction's local operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    /// The caller's input (the output itself for an in-place call).
    Input,
    /// The output buffer.
    Output,
}

/// One frame to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOp {
    /// The rank it goes to.
    pub peer: usize,
    /// Step of the algorithm.
    pub step: u32,
    /// Slice within the step.
    pub slice: u32,
    /// Buffer the payload comes from.
    pub src: Src,
    /// Byte range of the payload in that buffer (may be empty).
    pub range: Range<usize>,
    /// Index of the receive that must have completed before this frame goes.
    pub after_recv: Option<usize>,
}

/// What to do with a received frame's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Received straight into the output range.
    Copy,
    /// Received into staging, then `output[range] = op(with[range], staging)`.
    Reduce {
        /// The local operand.
        with: Src,
        /// Then turn the sums of this range into averages (the range is final).
        finish_avg: bool,
    },
    /// An empty frame that only carries its header (synchronisation).
    Discard,
}

/// One frame to receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvOp {
    /// The rank it comes from.
    pub peer: usize,
    /// Step of the algorithm.
    pub step: u32,
    /// Slice within the step.
    pub slice: u32,
    /// Byte range of the output the payload lands in (may be empty).
    pub range: Range<usize>,
    /// What to do with it.
    pub commit: Commit,
    /// Index of the send that must have completed before this frame is
    /// committed: a frame reduced into a range that a send of the same
    /// step reads (recursive doubling exchanges whole buffers). The frame
    /// may arrive earlier; it waits, received, until the send is done.
    pub after_send: Option<usize>,
}

/// Everything one rank sends and receives in one collective.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Frames to the next rank, in order.
    pub sends: Vec<SendOp>,
    /// Frames from the previous rank, in order.
    pub recvs: Vec<RecvOp>,
    /// Copy `input[range]` to `output[range]` before anything else (out of place only).
    pub prologue_copy: Option<Range<usize>>,
    /// The prologue copy may instead happen at any time before the call
    /// returns: no frame reads or writes its range (an allgather's own chunk,
    /// which is sent from the input; a broadcast root's buffer). The engine
    /// then does it while it would otherwise wait for a peer.
    pub prologue_deferrable: bool,
    /// Finish averaging `output[range]` locally (a world of one rank, nothing received).
    pub local_avg: Option<Range<usize>>,
    /// Where the input buffer sits in the output's byte coordinates: ranges
    /// that read [`Src::Input`] of an out-of-place call are shifted down by
    /// it. Non-zero only for allgather, whose input is the rank's own chunk.
    pub input_offset: usize,
    /// A plan of messages (a batch of sends and receives) gives each its
    /// own tag: a frame's `step` is then an index here, and its header
    /// carries the entry's sequence number, step and descriptor instead of
    /// the call's. Empty for the collectives.
    pub wires: Vec<WireTag>,
    /// [`Plan::cuts`], once computed.
    pub(crate) cuts: Cuts,
}

/// The tag and descriptor of one message's frames ([`Plan::wires`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireTag {
    /// The message's number between its two ranks.
    pub seq: u64,
    /// Its step on the wire (data or acknowledgement).
    pub step: u32,
    /// What both ends must agree on.
    pub descriptor: [u8; oxccl_transport::wire::DESCRIPTOR_LEN],
}

/// A plan's cuts, and where each frame's range lies among them, computed
/// on first use and kept with the (cached) plan. Not part of a plan's
/// identity: equal plans are equal with or without.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cuts(std::sync::OnceLock<CutTable>);

#[derive(Debug, Clone, Default)]
struct CutTable {
    cuts: Vec<usize>,
    /// `sends[i]`: the cuts at which send `i`'s range starts and ends.
    sends: Vec<Range<usize>>,
    /// The same for each receive.
    recvs: Vec<Range<usize>>,
}

impl PartialEq for Cuts {
    fn eq(&self, _: &Cuts) -> bool {
        true
    }
}

impl Eq for Cuts {}

impl Plan {
    fn cut_table(&self) -> &CutTable {
        self.cuts.0.get_or_init(|| {
            let ranges = (self.sends.iter().map(|s| &s.range))
                .chain(self.recvs.iter().map(|r| &r.range))
                .chain(self.prologue_copy.iter())
                .chain(self.local_avg.iter());
            let mut cuts = vec![0];
            for r in ranges {
                cuts.extend([r.start, r.end]);
            }
            cuts.sort_unstable();
            cuts.dedup();
            // Every boundary is a cut, so each is found.
            let at = |x: usize| cuts.binary_search(&x).unwrap_or_default();
            let span = |r: &Range<usize>| at(r.start)..at(r.end);
            let sends = self.sends.iter().map(|s| span(&s.range)).collect();
            let recvs = self.recvs.iter().map(|r| span(&r.range)).collect();
            CutTable { cuts, sends, recvs }
        })
    }

    /// Every offset of the output where a range of the plan starts or
    /// ends (every send's, every receive's, the prologue's and the local
    /// average's), and 0, sorted and without repeats. The engine cuts the
    /// output there, so that a frame in flight owns exactly its bytes.
    pub fn cuts(&self) -> &[usize] {
        &self.cut_table().cuts
    }

    /// The indices in [`Plan::cuts`] where send `i`'s range starts and
    /// ends, so that the engine finds its cells without a search; an empty
    /// range for a send the plan does not have.
    pub fn send_cuts(&self, i: usize) -> Range<usize> {
        self.cut_table().sends.get(i).cloned().unwrap_or_default()
    }

    /// The same for receive `i`.
    pub fn recv_cuts(&self, i: usize) -> Range<usize> {
        self.cut_table().recvs.get(i).cloned().unwrap_or_default()
    }

    /// The largest payload of any received frame that goes through staging.
    pub fn staging_len(&self) -> usize {
        self.recvs
            .iter()
            .filter(|r| matches!(r.commit, Commit::Reduce { .. }))
            .map(|r| r.range.len())
            .max()
            .unwrap_or(0)
    }
}

/// The shape of one call, as the schedule needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Which collective.
    pub kind: Kind,
    /// Ranks in the ring.
    pub world: usize,
    /// This rank.
    pub rank: usize,
    /// Elements of the whole output buffer the ring works on (allgather and
    /// reduce-scatter: `world` times the per-rank count).
    pub count: usize,
    /// Bytes per element.
    pub elem: usize,
    /// Root of broadcast and reduce.
    pub root: usize,
    /// Whether the op is an average (the last reduction of a range finishes it).
    pub avg: bool,
    /// Whether input and output are distinct buffers.
    pub out_of_place: bool,
    /// Largest slice, in elements (at least 1).
    pub slice_elems: usize,
}

/// Builds the plan of one rank.
pub fn plan(s: &Shape) -> Plan {
    assert!(s.world >= 1 && s.rank < s.world && s.root < s.world && s.slice_elems >= 1);
    let mut p = Plan::default();
    let whole = 0..s.count * s.elem;
    let own = || byte_range(s, chunk_range(s.count, s.world, s.rank));
    match s.kind {
        Kind::AllReduce | Kind::Barrier => {
            ring_reduce_scatter(s, &mut p, 0);
            let rs_steps = (s.world - 1) as u32;
            let tail = (!p.recvs.is_empty()).then_some(p.recvs.len());
            ring_all_gather(s, &mut p, rs_steps, tail);
            if s.world == 1 && s.out_of_place {
                p.prologue_copy = Some(whole.clone());
            }
            if s.world == 1 && s.avg {
                p.local_avg = Some(whole);
            }
        }
        Kind::ReduceScatter => {
            ring_reduce_scatter(s, &mut p, 0);
            if s.world == 1 {
                if s.out_of_place {
                    p.prologue_copy = Some(own());
                }
                if s.avg {
                    p.local_avg = Some(own());
                }
            }
        }
        Kind::AllGather => {
            if s.out_of_place {
                p.prologue_copy = Some(own());
                p.input_offset = own().start;
            }
            ring_all_gather(s, &mut p, 0, None);
        }
        Kind::Broadcast => chain_broadcast(s, &mut p),
        Kind::Reduce => chain_reduce(s, &mut p),
        Kind::AllToAll | Kind::Gather | Kind::Scatter => return exchange_plan(s),
        // Built from their counts (`pairwise`, `point_to_point`).
        Kind::AllToAllV | Kind::AllGatherV | Kind::ReduceScatterV | Kind::SendRecv => {}
    }
    p
}

/// The pairwise exchange of the collectives of equal blocks, where
/// `s.count` is the elements of one block: alltoall, gather and scatter.
/// The own block is the caller's to copy.
pub fn exchange_plan(s: &Shape) -> Plan {
    let b = s.count * s.elem;
    let block = |p: usize| Some(p * b..(p + 1) * b);
    let none = || vec![None; s.world];
    let (sends, recvs) = match s.kind {
        Kind::AllToAll => (
            (0..s.world).map(block).collect(),
            (0..s.world).map(block).collect(),
        ),
        Kind::Gather if s.rank == s.root => (none(), (0..s.world).map(block).collect()),
        Kind::Gather => {
            let mut v = none();
            v[s.root] = Some(0..b);
            (v, none())
        }
        Kind::Scatter if s.rank == s.root => ((0..s.world).map(block).collect(), none()),
        Kind::Scatter => {
            let mut v = none();
            v[s.root] = Some(0..b);
            (none(), v)
        }
        _ => (none(), none()),
    };
    pairwise(
        s.rank,
        s.world,
        &sends,
        &recvs,
        Landing::Copy,
        s.elem,
        s.slice_elems,
    )
}

/// The bytes of elements `elems`.
pub(super) fn byte_range(s: &Shape, elems: Range<usize>) -> Range<usize> {
    elems.start * s.elem..elems.end * s.elem
}

fn wrap(s: &Shape, x: isize) -> usize {
    x.rem_euclid(s.world as isize) as usize
}

/// The reduce-scatter steps, numbered from `first_step`.
fn ring_reduce_scatter(s: &Shape, p: &mut Plan, first_step: u32) {
    let r = s.rank as isize;
    // Index in p.recvs of each slice received at the previous step.
    let mut prev_recvs: Vec<usize> = Vec::new();
    for k in 0..s.world.saturating_sub(1) {
        let step = first_step + k as u32;
        let send_chunk = wrap(s, r - k as isize - 1);
        let recv_chunk = wrap(s, r - k as isize - 2);
        for (j, elems) in
            slices(chunk_range(s.count, s.world, send_chunk), s.slice_elems).enumerate()
        {
            p.sends.push(SendOp {
                peer: wrap(s, r + 1),
                step,
                slice: j as u32,
                src: if k == 0 { Src::Input } else { Src::Output },
                range: byte_range(s, elems),
                after_recv: if k == 0 { None } else { Some(prev_recvs[j]) },
            });
        }
        let last = k + 2 == s.world;
        prev_recvs.clear();
        for (j, elems) in
            slices(chunk_range(s.count, s.world, recv_chunk), s.slice_elems).enumerate()
        {
            prev_recvs.push(p.recvs.len());
            p.recvs.push(RecvOp {
                peer: wrap(s, r - 1),
                step,
                slice: j as u32,
                range: byte_range(s, elems),
                commit: Commit::Reduce {
                    with: Src::Input,
                    finish_avg: last && s.avg,
                },
                after_send: None,
            });
        }
    }
}

/// The allgather steps, numbered from `first_step`. When it follows a
/// reduce-scatter, `after` is the number of receives before it: the own
/// chunk's slices were the last ones received.
fn ring_all_gather(s: &Shape, p: &mut Plan, first_step: u32, after: Option<usize>) {
    let r = s.rank as isize;
    let mut prev_recvs: Vec<usize> = Vec::new();
    if let Some(end) = after {
        let own = slices(chunk_range(s.count, s.world, s.rank), s.slice_elems).count();
        prev_recvs.extend(end - own..end);
    }
    for k in 0..s.world.saturating_sub(1) {
        let step = first_step + k as u32;
        let send_chunk = wrap(s, r - k as isize);
        let recv_chunk = wrap(s, r - k as isize - 1);
        for (j, elems) in
            slices(chunk_range(s.count, s.world, send_chunk), s.slice_elems).enumerate()
        {
            let (src, after_recv) = if k == 0 {
                match after {
                    Some(_) => (Src::Output, Some(prev_recvs[j])),
                    None => (Src::Input, None),
                }
            } else {
                (Src::Output, Some(prev_recvs[j]))
            };
            p.sends.push(SendOp {
                peer: wrap(s, r + 1),
                step,
                slice: j as u32,
                src,
                range: byte_range(s, elems),
                after_recv,
            });
        }
        prev_recvs.clear();
        for (j, elems) in
            slices(chunk_range(s.count, s.world, recv_chunk), s.slice_elems).enumerate()
        {
            prev_recvs.push(p.recvs.len());
            p.recvs.push(RecvOp {
                peer: wrap(s, r - 1),
                step,
                slice: j as u32,
                range: byte_range(s, elems),
                commit: Commit::Copy,
                after_send: None,
            });
        }
    }
}

/// Broadcast as a pipelined chain from the root.
fn chain_broadcast(s: &Shape, p: &mut Plan) {
    let n = s.world;
    let pos = wrap(s, s.rank as isize - s.root as isize);
    if n == 1 {
        if s.out_of_place {
            p.prologue_copy = Some(0..s.count * s.elem);
        }
        return;
    }
    let all = 0..s.count;
    if pos == 0 {
        if s.out_of_place {
            p.prologue_copy = Some(0..s.count * s.elem);
            p.prologue_deferrable = true;
        }
        for (j, elems) in slices(all, s.slice_elems).enumerate() {
            p.sends.push(SendOp {
                peer: wrap(s, s.rank as isize + 1),
                step: 0,
                slice: j as u32,
                src: Src::Input,
                range: byte_range(s, elems),
                after_recv: None,
            });
        }
        p.recvs.push(done_frame(wrap(s, s.rank as isize - 1), 1));
        return;
    }
    for (j, elems) in slices(all, s.slice_elems).enumerate() {
        p.recvs.push(RecvOp {
            peer: wrap(s, s.rank as isize - 1),
            step: 0,
            slice: j as u32,
            range: byte_range(s, elems.clone()),
            commit: Commit::Copy,
            after_send: None,
        });
        if pos + 1 < n {
            p.sends.push(SendOp {
                peer: wrap(s, s.rank as isize + 1),
                step: 0,
                slice: j as u32,
                src: Src::Output,
                range: byte_range(s, elems),
                after_recv: Some(j),
            });
        }
    }
    if pos + 1 == n {
        p.sends.push(SendOp {
            peer: wrap(s, s.rank as isize + 1),
            step: 1,
            slice: 0,
            src: Src::Output,
            range: 0..0,
            after_recv: Some(p.recvs.len() - 1),
        });
    }
}

/// Reduce as a pipelined chain ending at the root.
fn chain_reduce(s: &Shape, p: &mut Plan) {
    let n = s.world;
    if n == 1 {
        if s.out_of_place {
            p.prologue_copy = Some(0..s.count * s.elem);
        }
        if s.avg {
            p.local_avg = Some(0..s.count * s.elem);
        }
        return;
    }
    // Position in the chain: 0 is root+1, n-1 is the root.
    let pos = wrap(s, s.rank as isize - s.root as isize - 1);
    let all = 0..s.count;
    if pos == 0 {
        for (j, elems) in slices(all, s.slice_elems).enumerate() {
            p.sends.push(SendOp {
                peer: wrap(s, s.rank as isize + 1),
                step: 0,
                slice: j as u32,
                src: Src::Input,
                range: byte_range(s, elems),
                after_recv: None,
            });
        }
        p.recvs.push(done_frame(wrap(s, s.rank as isize - 1), 1));
        return;
    }
    let root = pos + 1 == n;
    if root {
        p.sends.push(SendOp {
            peer: wrap(s, s.rank as isize + 1),
            step: 1,
            slice: 0,
            src: Src::Output,
            range: 0..0,
            after_recv: None,
        });
    }
    for (j, elems) in slices(all, s.slice_elems).enumerate() {
        p.recvs.push(RecvOp {
            peer: wrap(s, s.rank as isize - 1),
            step: 0,
            slice: j as u32,
            range: byte_range(s, elems.clone()),
            commit: Commit::Reduce {
                with: Src::Input,
                finish_avg: root && s.avg,
            },
            after_send: None,
        });
        if !root {
            p.sends.push(SendOp {
                peer: wrap(s, s.rank as isize + 1),
                step: 0,
                slice: j as u32,
                src: Src::Output,
                range: byte_range(s, elems),
                after_recv: Some(j),
            });
        }
    }
}

fn done_frame(peer: usize, step: u32) -> RecvOp {
    RecvOp {
        peer,
        step,
        slice: 0,
        range: 0..0,
        commit: Commit::Discard,
        after_send: None,
    }
}

/// Walks a [`Plan`]: which frame may be sent or received next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    sent: usize,
    received: usize,
}

impl Progress {
    /// The next frame to send, if its dependency is met.
    pub fn next_send<'p>(&self, plan: &'p Plan) -> Option<&'p SendOp> {
        let op = plan.sends.get(self.sent)?;
        match op.after_recv {
            Some(i) if i >= self.received => None,
            _ => Some(op),
        }
    }

    /// The next frame to receive.
    pub fn next_recv<'p>(&self, plan: &'p Plan) -> Option<&'p RecvOp> {
        plan.recvs.get(self.received)
    }

    /// Whether the received frame `op` may be committed now (its
    /// [`RecvOp::after_send`] is done).
    #[inline]
    pub fn may_commit(&self, op: &RecvOp) -> bool {
        op.after_send.is_none_or(|i| i < self.sent)
    }

    /// The frame returned by `next_send` has been written entirely.
    pub fn handle_sent(&mut self) {
        self.sent += 1;
    }

    /// The frame returned by `next_recv` has been received and committed.
    pub fn handle_received(&mut self) {
        self.received += 1;
    }

    /// Frames sent so far.
    pub fn sent(&self) -> usize {
        self.sent
    }

    /// Frames received so far.
    pub fn received(&self) -> usize {
        self.received
    }

    /// Whether every frame of `plan` went both ways.
    pub fn done(&self, plan: &Plan) -> bool {
        self.sent == plan.sends.len() && self.received == plan.recvs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A send that waits for a receive forwards exactly what it received.
    #[test]
    fn send_dependencies_point_backwards() {
        for kind in Kind::ALL {
            for rank in 0..4 {
                let s = Shape {
                    kind,
                    world: 4,
                    rank,
                    count: 50,
                    elem: 8,
                    root: 2,
                    avg: false,
                    out_of_place: true,
                    slice_elems: 4,
                };
                let p = plan(&s);
                for op in &p.sends {
                    if let Some(i) = op.after_recv {
                        assert!(i < p.recvs.len());
                        let r = &p.recvs[i];
                        assert!(
                            op.range == r.range || op.range.is_empty(),
                            "{kind:?} {op:?} after {r:?}"
                        );
                    }
                }
            }
        }
    }
}
