//! The exchanges: alltoall with equal blocks or per-peer counts, gather,
//! scatter, allgather with per-rank counts and reduce-scatter with
//! per-rank counts. Each is a set of messages straight between pairs of
//! ranks ([`algo::Pairwise`], [`algo::Direct`]); the links they need beyond
//! the ring are made on their first call ([`crate::lazy`]).
//!
//! Every rank checks its own buffers, counts and displacements before
//! anything is sent; the counts two ranks disagree on are caught by the
//! receiver, whose frames' headers carry each message's own count, and
//! named with both calls.

use std::ops::Range;

use oxccl_kernels::{DType, DeviceMemory, Element, ReduceOp};

use crate::algo::{self, Algorithm};
use crate::comm::Communicator;
use crate::descriptor::Descriptor;
use crate::engine::{Input, Output};
use crate::schedule::{Kind, Landing, Plan, WireTag, pairwise};
use crate::{Error, Result};

/// An exchange call, in elements: what [`Communicator::run_exchange`] and
/// [`Communicator::run_exchange_device`] take from the bindings.
#[derive(Debug, Clone, Copy)]
pub enum Exchange<'c> {
    /// Block `p` of the input (`count` elements at `p * count`) goes to
    /// rank `p`; block `p` of the output comes from rank `p`.
    AllToAll {
        /// Elements of one block.
        count: usize,
    },
    /// `send_counts[p]` elements at `send_displs[p]` of the input go to
    /// rank `p`; `recv_counts[p]` elements from rank `p` land at
    /// `recv_displs[p]` of the output. Each argument has `world` entries.
    AllToAllV {
        /// Elements to each rank.
        send_counts: &'c [usize],
        /// Where in the input each rank's elements start.
        send_displs: &'c [usize],
        /// Elements from each rank.
        recv_counts: &'c [usize],
        /// Where in the output each rank's elements land.
        recv_displs: &'c [usize],
    },
    /// The root's output gets every rank's input (`count` elements each)
    /// in rank order; other ranks' output is not touched.
    Gather {
        /// Elements each rank sends.
        count: usize,
        /// The rank that receives.
        root: usize,
    },
    /// Rank `p` gets block `p` (`count` elements) of the root's input;
    /// other ranks' input is not read.
    Scatter {
        /// Elements each rank receives.
        count: usize,
        /// The rank that sends.
        root: usize,
    },
    /// Rank `p` contributes `counts[p]` elements; every rank's output is
    /// all of them, packed in rank order.
    AllGatherV {
        /// Elements of each rank.
        counts: &'c [usize],
    },
    /// The input is `counts[0] + ... + counts[world - 1]` elements, packed
    /// in rank order; rank `p` gets the reduction over every rank of block
    /// `p`, `counts[p]` elements.
    ReduceScatterV {
        /// Elements of each rank's block.
        counts: &'c [usize],
        /// The reduction.
        op: ReduceOp,
    },
}

impl Exchange<'_> {
    fn kind(&self) -> Kind {
        match self {
            Exchange::AllToAll { .. } => Kind::AllToAll,
            Exchange::AllToAllV { .. } => Kind::AllToAllV,
            Exchange::Gather { .. } => Kind::Gather,
            Exchange::Scatter { .. } => Kind::Scatter,
            Exchange::AllGatherV { .. } => Kind::AllGatherV,
            Exchange::ReduceScatterV { .. } => Kind::ReduceScatterV,
        }
    }
}

/// The messages of one rank in one exchange, in bytes.
#[derive(Debug)]
struct Layout {
    /// The input range sent to each rank (`None`: nothing to it).
    sends: Vec<Option<Range<usize>>>,
    /// The output range received from each rank.
    recvs: Vec<Option<Range<usize>>>,
    /// This rank's own block: from the input range to the output range.
    own: Option<(Range<usize>, Range<usize>)>,
    landing: Landing,
    /// The input and output lengths the call needs (`None`: not read or
    /// not written on this rank, any length).
    input_len: Option<usize>,
    output_len: Option<usize>,
    /// Each message carries its own count on the wire (the calls of
    /// per-peer counts).
    tagged: bool,
    descriptor: Descriptor,
}

/// A communicator's last exchange and what it was built into: a loop of
/// the same call (every step of training) compares its arguments with
/// [`args`](Self::args) and reuses the rest, where a first call checks
/// the layout, makes the links it needs and cuts the plan.
#[derive(Debug)]
pub(crate) struct KeptExchange {
    /// The call's kind, dtype and arguments as words ([`write_args`]).
    args: Vec<u64>,
    layout: Layout,
    /// Built by the first run (with the links to its peers), reused by
    /// the next with the new call's sequence number.
    plan: Option<Plan>,
}

/// Writes what identifies the exchange `x` of `dtype` on this rank into
/// `out`: two calls with the same words have the same layout and plan.
fn write_args(x: &Exchange<'_>, dtype: DType, out: &mut Vec<u64>) {
    out.clear();
    out.extend([x.kind() as u64, dtype as u64]);
    let mut slice = |v: &[usize]| {
        out.push(v.len() as u64);
        out.extend(v.iter().map(|&c| c as u64));
    };
    match *x {
        Exchange::AllToAll { count } => slice(&[count]),
        Exchange::Gather { count, root } | Exchange::Scatter { count, root } => {
            slice(&[count, root])
        }
        Exchange::AllToAllV {
            send_counts,
            send_displs,
            recv_counts,
            recv_displs,
        } => {
            for v in [send_counts, send_displs, recv_counts, recv_displs] {
                slice(v);
            }
        }
        Exchange::AllGatherV { counts } => slice(counts),
        Exchange::ReduceScatterV { counts, op } => {
            slice(&[op as usize]);
            slice(counts);
        }
    }
}

/// Where each rank's block of `counts` starts when they are packed in rank order.
fn packed(counts: &[usize]) -> Option<Vec<usize>> {
    let mut at = 0usize;
    let mut v = Vec::with_capacity(counts.len());
    for &c in counts {
        v.push(at);
        at = at.checked_add(c)?;
    }
    Some(v)
}

impl Communicator {
    /// Sends block `p` of `input` to rank `p` and receives rank `p`'s block
    /// for this rank into block `p` of `output`; both are `world * n`
    /// elements (the all-to-all of expert and sequence parallelism).
    pub fn all_to_all<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let count = input.len() / self.world().max(1);
        self.run_typed(Exchange::AllToAll { count }, input, output)
    }

    /// [`all_to_all`](Self::all_to_all) with per-peer counts and
    /// displacements, in elements, as `MPI_Alltoallv`: `send_counts[p]`
    /// elements at `send_displs[p]` of `input` go to rank `p`, and
    /// `recv_counts[p]` elements from rank `p` land at `recv_displs[p]` of
    /// `output`. Received ranges must not overlap; every range must lie in
    /// its buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn all_to_all_v<T: Element>(
        &mut self,
        input: &[T],
        send_counts: &[usize],
        send_displs: &[usize],
        output: &mut [T],
        recv_counts: &[usize],
        recv_displs: &[usize],
    ) -> Result<()> {
        self.run_typed(
            Exchange::AllToAllV {
                send_counts,
                send_displs,
                recv_counts,
                recv_displs,
            },
            input,
            output,
        )
    }

    /// Gathers every rank's `input` into the root's `output`, in rank order
    /// (`world * input.len()` elements); other ranks' `output` is not
    /// touched and may be empty.
    pub fn gather<T: Element>(&mut self, input: &[T], output: &mut [T], root: usize) -> Result<()> {
        self.run_typed(
            Exchange::Gather {
                count: input.len(),
                root,
            },
            input,
            output,
        )
    }

    /// Sends block `p` of the root's `input` (`world * output.len()`
    /// elements) to rank `p`'s `output`; other ranks' `input` is not read
    /// and may be empty.
    pub fn scatter<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
        root: usize,
    ) -> Result<()> {
        self.run_typed(
            Exchange::Scatter {
                count: output.len(),
                root,
            },
            input,
            output,
        )
    }

    /// Allgather with per-rank counts: rank `p` contributes `counts[p]`
    /// elements (its `input`), and every rank's `output` gets all of them
    /// packed in rank order (what FSDP-style sharding with uneven shards
    /// gathers).
    pub fn all_gather_v<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
        counts: &[usize],
    ) -> Result<()> {
        self.run_typed(Exchange::AllGatherV { counts }, input, output)
    }

    /// Reduce-scatter with per-rank counts: `input` holds every rank's
    /// block packed in rank order (`counts[p]` elements for rank `p`);
    /// rank `r` gets the reduction over every rank of block `r` in
    /// `output` (`counts[r]` elements).
    pub fn reduce_scatter_v<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
        counts: &[usize],
        op: ReduceOp,
    ) -> Result<()> {
        self.run_typed(Exchange::ReduceScatterV { counts, op }, input, output)
    }

    /// [`run_exchange`](Self::run_exchange) on typed slices.
    fn run_typed<T: Element>(
        &mut self,
        x: Exchange<'_>,
        input: &[T],
        output: &mut [T],
    ) -> Result<()> {
        self.run_exchange(
            x,
            T::DTYPE,
            bytemuck::cast_slice(input),
            bytemuck::cast_slice_mut(output),
        )
    }

    /// Runs the exchange `x` of elements of `dtype` on host byte buffers:
    /// the entry point of the bindings. Input and output must be distinct.
    pub fn run_exchange(
        &mut self,
        x: Exchange<'_>,
        dtype: DType,
        input: &[u8],
        output: &mut [u8],
    ) -> Result<()> {
        let kept = self.prepare(&x, dtype)?;
        self.check_lens(&kept.layout, dtype, input.len(), output.len())?;
        let seq = self.enter(true)?;
        let result = self.run_layout(kept, seq, Input::Host(input), Dest::Host(output));
        self.leave();
        result
    }

    /// [`run_exchange`](Self::run_exchange) on device buffers (wgpu,
    /// CUDA): blocks go device → host → wire → host → device, slice by
    /// slice, and received blocks of a reduce-scatter are reduced on the
    /// device.
    pub fn run_exchange_device(
        &mut self,
        x: Exchange<'_>,
        dtype: DType,
        input: &dyn DeviceMemory,
        output: &mut dyn DeviceMemory,
    ) -> Result<()> {
        let kept = self.prepare(&x, dtype)?;
        self.check_lens(&kept.layout, dtype, input.len_bytes(), output.len_bytes())?;
        let seq = self.enter(true)?;
        let result = self.run_layout(kept, seq, Input::Device(input), Dest::Device(output));
        self.leave();
        result
    }

    /// The kept exchange when `x` repeats the last one, else a new one
    /// with its layout checked and no plan yet.
    fn prepare(&mut self, x: &Exchange<'_>, dtype: DType) -> Result<Box<KeptExchange>> {
        let mut args = std::mem::take(&mut self.exchange_args);
        write_args(x, dtype, &mut args);
        match self.kept_exchange.take() {
            Some(kept) if kept.args == args => {
                // The words go back to be written over by the next call.
                self.exchange_args = args;
                Ok(kept)
            }
            _ => Ok(Box::new(KeptExchange {
                layout: self.layout(x, dtype)?,
                args,
                plan: None,
            })),
        }
    }

    /// The messages of `x` on this rank, checked: counts and displacements
    /// of `world` entries, in range, received ranges disjoint.
    fn layout(&self, x: &Exchange<'_>, dtype: DType) -> Result<Layout> {
        let (rank, world, elem) = (self.rank(), self.world(), dtype.size());
        let kind = x.kind();
        let bad =
            |why: String| Error::InvalidArgument(format!("rank {rank}: {}: {why}", kind.name()));
        let bytes = |n: usize| {
            n.checked_mul(elem)
                .ok_or_else(|| bad(format!("{n} elements overflow")))
        };
        let range = |at: usize, n: usize| -> Result<Range<usize>> {
            let a = bytes(at)?;
            let end = at
                .checked_add(n)
                .ok_or_else(|| bad(format!("{at} + {n} elements overflow")))?;
            Ok(a..bytes(end)?)
        };
        let per_rank = |what: &str, v: &[usize]| {
            if v.len() == world {
                Ok(())
            } else {
                Err(bad(format!(
                    "{what} has {} entries, expected one per rank ({world})",
                    v.len()
                )))
            }
        };
        let root_ok = |root: usize| {
            if root < world {
                Ok(root)
            } else {
                Err(bad(format!(
                    "root {root} is not below the world size {world}"
                )))
            }
        };
        let none = || vec![None; world];
        let mut desc = Descriptor {
            kind,
            dtype,
            op: ReduceOp::Sum,
            root: 0,
            count: 0,
        };
        let mut landing = Landing::Copy;
        let mut tagged = false;
        let (sends, recvs, own, input_len, output_len) = match *x {
            Exchange::AllToAll { count } => {
                desc.count = count;
                let blocks: Vec<_> = (0..world)
                    .map(|p| range(p * count, count).map(Some))
                    .collect::<Result<_>>()?;
                let own = blocks[rank].clone().map(|b| (b.clone(), b));
                let total = Some(bytes(count.saturating_mul(world))?);
                (blocks.clone(), blocks, own, total, total)
            }
            Exchange::AllToAllV {
                send_counts,
                send_displs,
                recv_counts,
                recv_displs,
            } => {
                per_rank("send_counts", send_counts)?;
                per_rank("send_displs", send_displs)?;
                per_rank("recv_counts", recv_counts)?;
                per_rank("recv_displs", recv_displs)?;
                tagged = true;
                let sends: Vec<_> = (0..world)
                    .map(|p| range(send_displs[p], send_counts[p]).map(Some))
                    .collect::<Result<_>>()?;
                let recvs: Vec<_> = (0..world)
                    .map(|p| range(recv_displs[p], recv_counts[p]).map(Some))
                    .collect::<Result<_>>()?;
                if send_counts[rank] != recv_counts[rank] {
                    return Err(bad(format!(
                        "this rank sends itself {} elements but receives {} from itself",
                        send_counts[rank], recv_counts[rank]
                    )));
                }
                let own = sends[rank].clone().zip(recvs[rank].clone());
                let in_len = sends.iter().flatten().map(|r| r.end).max();
                let out_len = recvs.iter().flatten().map(|r| r.end).max();
                (sends, recvs, own, in_len, out_len)
            }
            Exchange::Gather { count, root } | Exchange::Scatter { count, root } => {
                let root = root_ok(root)?;
                desc.count = count;
                desc.root = root;
                let one = range(0, count)?;
                let total = bytes(count.saturating_mul(world))?;
                // As a gather sees it: the root's side of the messages is
                // every rank's block, each other rank's side one block;
                // its own block goes from `one` to its place. A scatter is
                // the same the other way.
                let (root_side, leaf_side, own, root_len) = if rank == root {
                    let blocks: Vec<_> = (0..world)
                        .map(|p| range(p * count, count).map(Some))
                        .collect::<Result<_>>()?;
                    let own = (one.clone(), range(rank * count, count)?);
                    (blocks, none(), Some(own), Some(total))
                } else {
                    let mut single = none();
                    single[root] = Some(one.clone());
                    (none(), single, None, None)
                };
                let leaf_len = Some(one.len());
                if kind == Kind::Gather {
                    (leaf_side, root_side, own, leaf_len, root_len)
                } else {
                    let own = own.map(|(a, b)| (b, a));
                    (root_side, leaf_side, own, root_len, leaf_len)
                }
            }
            Exchange::AllGatherV { counts } => {
                per_rank("counts", counts)?;
                let displs = packed(counts).ok_or_else(|| bad("counts overflow".into()))?;
                tagged = true;
                let total: usize = counts.iter().sum();
                desc.count = total;
                let mine = range(0, counts[rank])?;
                let sends = (0..world).map(|_| Some(mine.clone())).collect();
                let recvs: Vec<_> = (0..world)
                    .map(|p| range(displs[p], counts[p]).map(Some))
                    .collect::<Result<_>>()?;
                let own = Some((mine.clone(), range(displs[rank], counts[rank])?));
                (sends, recvs, own, Some(mine.len()), Some(bytes(total)?))
            }
            Exchange::ReduceScatterV { counts, op } => {
                per_rank("counts", counts)?;
                let displs = packed(counts).ok_or_else(|| bad("counts overflow".into()))?;
                tagged = true;
                let total: usize = counts.iter().sum();
                desc.count = total;
                desc.op = op;
                landing = Landing::Reduce {
                    avg: op == ReduceOp::Avg,
                };
                let mine = range(0, counts[rank])?;
                let sends: Vec<_> = (0..world)
                    .map(|p| range(displs[p], counts[p]).map(Some))
                    .collect::<Result<_>>()?;
                let recvs = (0..world).map(|_| Some(mine.clone())).collect();
                let own = Some((range(displs[rank], counts[rank])?, mine.clone()));
                (sends, recvs, own, Some(bytes(total)?), Some(mine.len()))
            }
        };
        // Received ranges (but this rank's own, for a reduction, which all
        // land on) must not overlap.
        if landing == Landing::Copy {
            let mut rs: Vec<(Range<usize>, usize)> = recvs
                .iter()
                .enumerate()
                .filter_map(|(p, r)| r.clone().map(|r| (r, p)))
                .filter(|(r, _)| !r.is_empty())
                .collect();
            rs.sort_by_key(|(r, _)| r.start);
            if let Some(w) = rs.windows(2).find(|w| w[0].0.end > w[1].0.start) {
                return Err(bad(format!(
                    "the output ranges of rank {} (elements {}..{}) and rank {} (elements {}..{}) overlap",
                    w[0].1,
                    w[0].0.start / elem,
                    w[0].0.end / elem,
                    w[1].1,
                    w[1].0.start / elem,
                    w[1].0.end / elem
                )));
            }
        }
        Ok(Layout {
            sends,
            recvs,
            own,
            landing,
            input_len,
            output_len,
            tagged,
            descriptor: desc,
        })
    }

    /// Checks the buffers against what the layout reads and writes.
    fn check_lens(&self, l: &Layout, dtype: DType, input: usize, output: usize) -> Result<()> {
        let (rank, kind) = (self.rank(), l.descriptor.kind);
        let elem = dtype.size();
        // Displacements may leave room in the buffers of an alltoallv.
        let exact = kind != Kind::AllToAllV;
        for (what, got, want) in [
            ("input", input, l.input_len),
            ("output", output, l.output_len),
        ] {
            let Some(want) = want else { continue };
            let wrong = if exact { got != want } else { got < want };
            if wrong {
                return Err(Error::InvalidArgument(format!(
                    "rank {rank}: {}: {what} has {} elements, {} {} ({} bytes of {dtype})",
                    kind.name(),
                    got / elem,
                    if exact { "expected" } else { "needs at least" },
                    want / elem,
                    want,
                )));
            }
        }
        if kind == Kind::AllToAll && input % (elem * self.world().max(1)) != 0 {
            return Err(Error::InvalidArgument(format!(
                "rank {rank}: all_to_all: buffer of {} elements does not divide by the world size {}",
                input / elem,
                self.world()
            )));
        }
        Ok(())
    }

    /// The call's name in messages, with its counts.
    fn exchange_call(l: &Layout, seq: u64) -> String {
        let d = &l.descriptor;
        match d.kind {
            Kind::AllToAllV => {
                let sum = |v: &[Option<Range<usize>>]| {
                    v.iter().flatten().map(|r| r.len()).sum::<usize>() / d.dtype.size()
                };
                format!(
                    "{} #{seq} ({}, {} elements sent, {} received)",
                    d.kind.name(),
                    d.dtype,
                    sum(&l.sends),
                    sum(&l.recvs)
                )
            }
            _ => d.call(seq),
        }
    }

    /// Runs a checked layout: the own block, the links, the plan, the engine.
    fn run_layout(
        &mut self,
        mut kept: Box<KeptExchange>,
        seq: u64,
        input: Input<'_>,
        output: Dest<'_>,
    ) -> Result<()> {
        let (rank, world) = (self.rank(), self.world());
        let l = &kept.layout;
        let d = l.descriptor;
        let call = || Self::exchange_call(l, seq);
        let mut output = output;
        if let Some((from, to)) = &l.own {
            if let Err(e) = copy_own(input, &mut output, from.clone(), to.start) {
                return Err(self.fail_named(call(), e.into()));
            }
        }
        // Alone, the own block is the whole result (an average over one
        // rank is its value).
        if world == 1 {
            self.kept_exchange = Some(kept);
            return Ok(());
        }
        let plan = match kept.plan.take() {
            // A loop of the same exchange built its plan (and its cuts,
            // and its links) once; only the tags' sequence number changes.
            Some(mut plan) => {
                plan.wires.iter_mut().for_each(|w| w.seq = seq);
                plan
            }
            None => {
                let peers: Vec<usize> = (0..world)
                    .filter(|&p| p != rank && (l.sends[p].is_some() || l.recvs[p].is_some()))
                    .collect();
                self.ensure_links(&peers, &call)?;
                let algo: &'static dyn Algorithm = match d.kind {
                    Kind::Gather | Kind::Scatter => &algo::Direct,
                    _ => &algo::Pairwise,
                };
                let slice_elems = (algo.slice_bytes(&d, world, &self.model(), self.max_slice())
                    / d.dtype.size())
                .max(1);
                let mut sends = l.sends.clone();
                let mut recvs = l.recvs.clone();
                sends[rank] = None;
                recvs[rank] = None;
                let mut plan = pairwise(
                    rank,
                    world,
                    &sends,
                    &recvs,
                    l.landing,
                    d.dtype.size(),
                    slice_elems,
                );
                if l.tagged {
                    tag_messages(&mut plan, seq, &d);
                }
                plan
            }
        };
        let out = match output {
            Dest::Host(o) => Output::Host(o),
            Dest::Device(o) => Output::Device(o),
        };
        let result = self
            .run_plan(&plan, seq, &d, Some(input), out)
            .map_err(|e| self.fail_named(call(), e));
        kept.plan = Some(plan);
        self.kept_exchange = Some(kept);
        result
    }
}

/// Gives each message of a pairwise plan its own descriptor: its count,
/// and the count its sender expects back from its receiver (every pair
/// exchanges both ways in these calls). A receiver that expected another
/// count, and a sender whose receiver did, both fail naming both counts.
fn tag_messages(plan: &mut Plan, seq: u64, d: &Descriptor) {
    let elem = d.dtype.size().max(1);
    let total = |ops: &[(usize, usize)], peer: usize| {
        ops.iter()
            .filter(|(p, _)| *p == peer)
            .map(|(_, n)| n)
            .sum::<usize>()
            / elem
    };
    let sent: Vec<(usize, usize)> = plan.sends.iter().map(|s| (s.peer, s.range.len())).collect();
    let got: Vec<(usize, usize)> = plan.recvs.iter().map(|r| (r.peer, r.range.len())).collect();
    let mut wires = Vec::new();
    let mut tag = |step: u32, count: usize, back: usize| {
        let desc = Descriptor {
            count,
            root: back,
            ..*d
        };
        wires.push(WireTag {
            seq,
            step,
            descriptor: desc.encode(),
        });
        (wires.len() - 1) as u32
    };
    let mut last: Option<(usize, u32)> = None;
    for s in &mut plan.sends {
        let t = match last {
            Some((p, t)) if p == s.peer => t,
            _ => tag(s.step, total(&sent, s.peer), total(&got, s.peer)),
        };
        last = Some((s.peer, t));
        s.step = t;
    }
    last = None;
    for r in &mut plan.recvs {
        // What the peer's header must say: the count it sends, and the
        // count it expects back.
        let t = match last {
            Some((p, t)) if p == r.peer => t,
            _ => tag(r.step, total(&got, r.peer), total(&sent, r.peer)),
        };
        last = Some((r.peer, t));
        r.step = t;
    }
    plan.wires = wires;
}

/// Where an exchange writes: host or device memory.
pub(crate) enum Dest<'b> {
    Host(&'b mut [u8]),
    Device(&'b mut dyn DeviceMemory),
}

/// `output[to..] = input[from]`.
pub(crate) fn copy_own(
    input: Input<'_>,
    output: &mut Dest<'_>,
    from: Range<usize>,
    to: usize,
) -> std::result::Result<(), oxccl_kernels::KernelError> {
    match (input, output) {
        (Input::Host(i), Dest::Host(o)) => {
            o[to..to + from.len()].copy_from_slice(&i[from]);
        }
        (Input::Host(i), Dest::Device(o)) => o.write(to, &i[from])?,
        (Input::Device(i), Dest::Host(o)) => i.read(from.start, &mut o[to..to + from.len()])?,
        (Input::Device(i), Dest::Device(o)) => {
            // On the device when both are buffers of one backend with
            // addresses there.
            if i.backend() == o.backend() {
                if let (Some((src, _)), Some((dst, ops))) = (i.addressed(), o.addressed_mut()) {
                    let to = to..to + from.len();
                    if let (Some(s), Some(d)) = (src.slice(from.clone()), dst.slice(to)) {
                        return ops.copy(d, s);
                    }
                }
            }
            let mut host = vec![0u8; from.len()];
            i.read(from.start, &mut host)?;
            o.write(to, &host)?;
        }
        (Input::Addressed(_), _) => {
            return Err(oxccl_kernels::KernelError::Unsupported {
                backend: "engine",
                what: "a device input by address outside the engine".into(),
            });
        }
    }
    Ok(())
}
