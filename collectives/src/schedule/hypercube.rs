//! Allreduce schedules on a hypercube of ranks: Rabenseifner's recursive
//! halving-doubling (bandwidth-optimal in `2 log2 p` steps) and recursive
//! doubling (latency-optimal: `log2 p` steps, each sending the whole buffer).
//!
//! Both run on the largest power of two `pw <= world`. The `extra = world -
//! pw` ranks beyond it first *fold*: for `i < extra`, rank `2i` sends its
//! buffer to rank `2i + 1` (step 0), which reduces it into its own and takes
//! part as virtual rank `i`; after the last step rank `2i + 1` sends the
//! result back (the last step). Ranks from `2 extra` on are virtual rank
//! `rank - extra`. Partners are virtual rank `v ^ mask`.
//!
//! * Halving-doubling: `log2 pw` halving steps, each exchanging half of the
//!   current region with the partner at distance `pw/2, pw/4, ..., 1` and
//!   reducing the half kept, leave virtual rank `v` with block `v` of `pw`
//!   blocks fully reduced; `log2 pw` doubling steps at distance `1, 2, ...,
//!   pw/2` then gather the blocks back, each step sending the whole region
//!   held so far.
//! * Recursive doubling: `log2 pw` steps, each exchanging the whole buffer
//!   with the partner at distance `1, 2, ...` and reducing it. A received
//!   slice is reduced into the range its own send of the same step reads,
//!   so it waits, received, for that send ([`RecvOp::after_send`]).
//!
//! Every block is reduced by one rank in one order and then copied, and each
//! exchange reduces the same two operands on both sides (commutative ops),
//! so every rank gets the same bits.

use std::ops::Range;

use super::{
    Commit, Kind, Plan, RecvOp, SendOp, Shape, Src, byte_range, chunk_range, plan, slices,
};

/// The fold of a world onto the largest power of two below it.
#[derive(Debug, Clone, Copy)]
struct Fold {
    pw: usize,
    extra: usize,
}

impl Fold {
    fn new(world: usize) -> Fold {
        let pw = 1usize << (usize::BITS - 1 - world.leading_zeros());
        Fold {
            pw,
            extra: world - pw,
        }
    }

    fn steps(self) -> u32 {
        self.pw.trailing_zeros()
    }

    /// The virtual rank of `rank`, or `None` for a rank that sits out.
    fn virtual_rank(self, rank: usize) -> Option<usize> {
        if rank < 2 * self.extra {
            (rank % 2 == 1).then_some(rank / 2)
        } else {
            Some(rank - self.extra)
        }
    }

    /// The real rank of virtual rank `v`.
    fn real(self, v: usize) -> usize {
        if v < self.extra {
            2 * v + 1
        } else {
            v + self.extra
        }
    }
}

/// Whether the hypercube schedules can run `kind`.
pub(crate) fn hypercube_kind(kind: Kind) -> bool {
    matches!(kind, Kind::AllReduce | Kind::Barrier)
}

/// The ranks `rank` exchanges frames with in either hypercube schedule.
pub fn hypercube_peers(rank: usize, world: usize) -> Vec<usize> {
    if world < 2 {
        return Vec::new();
    }
    let f = Fold::new(world);
    let mut peers = Vec::new();
    if rank < 2 * f.extra {
        peers.push(rank ^ 1);
    }
    if let Some(v) = f.virtual_rank(rank) {
        for k in 0..f.steps() {
            peers.push(f.real(v ^ (1 << k)));
        }
    }
    peers.sort_unstable();
    peers.dedup();
    peers
}

/// Builds one rank's plan and its bookkeeping.
struct Builder<'s> {
    s: &'s Shape,
    p: Plan,
}

impl Builder<'_> {
    /// Sends `elems` to `peer` as slices; `after(slice)` is each one's dependency.
    fn send(
        &mut self,
        peer: usize,
        step: u32,
        src: Src,
        elems: Range<usize>,
        after: impl Fn(&Plan, &Range<usize>) -> Option<usize>,
    ) -> Range<usize> {
        let first = self.p.sends.len();
        for (j, e) in slices(elems, self.s.slice_elems).enumerate() {
            let range = byte_range(self.s, e);
            let after_recv = after(&self.p, &range);
            self.p.sends.push(SendOp {
                peer,
                step,
                slice: j as u32,
                src,
                range,
                after_recv,
            });
        }
        first..self.p.sends.len()
    }

    /// Receives `elems` from `peer` as slices; `after_send(j)` is slice
    /// `j`'s commit dependency.
    fn recv(
        &mut self,
        peer: usize,
        step: u32,
        commit: Commit,
        elems: Range<usize>,
        after_send: impl Fn(usize) -> Option<usize>,
    ) -> Range<usize> {
        let first = self.p.recvs.len();
        for (j, e) in slices(elems, self.s.slice_elems).enumerate() {
            let range = byte_range(self.s, e);
            self.p.recvs.push(RecvOp {
                peer,
                step,
                slice: j as u32,
                range,
                commit,
                after_send: after_send(j),
            });
        }
        first..self.p.recvs.len()
    }
}

/// The last receive among `recvs` (consecutive, ascending, contiguous
/// ranges) that writes a byte of `range`: the one that must complete before
/// `range` may be sent. `None` when `recvs` is empty (the first step).
fn covering(plan: &Plan, recvs: &Range<usize>, range: &Range<usize>) -> Option<usize> {
    let ops = &plan.recvs[recvs.clone()];
    // Ranges of empty slices count by their start.
    let end = range.end.max(range.start + 1);
    let n = ops.partition_point(|r| r.range.start < end);
    if ops.is_empty() {
        None
    } else {
        Some(recvs.start + n.max(1) - 1)
    }
}

/// What every hypercube schedule shares: the fold before and after.
/// `main(builder, v, src, first_dep)` adds the steps from 1 on for virtual
/// rank `v` and returns the number of steps it used.
fn folded(
    s: &Shape,
    main: impl FnOnce(&mut Builder<'_>, Fold, usize, Src, Range<usize>) -> u32,
) -> Plan {
    assert!(
        hypercube_kind(s.kind),
        "{:?} has no hypercube schedule",
        s.kind
    );
    if s.world == 1 {
        return plan(s);
    }
    let f = Fold::new(s.world);
    let all = 0..s.count;
    let mut b = Builder {
        s,
        p: Plan::default(),
    };
    let r = s.rank;
    match f.virtual_rank(r) {
        None => {
            // Sit out: hand the buffer over, get the result back.
            b.send(r + 1, 0, Src::Input, all.clone(), |_, _| None);
            let last = 2 * f.steps() + 1;
            b.recv(r + 1, last, Commit::Copy, all, |_| None);
        }
        Some(v) => {
            let (src, dep) = if r < 2 * f.extra {
                let commit = Commit::Reduce {
                    with: Src::Input,
                    finish_avg: false,
                };
                let got = b.recv(r - 1, 0, commit, all.clone(), |_| None);
                (Src::Output, got)
            } else {
                (Src::Input, 0..0)
            };
            let steps = main(&mut b, f, v, src, dep);
            if r < 2 * f.extra {
                let done = b.p.recvs.len().checked_sub(1);
                b.send(r - 1, 2 * f.steps() + 1, Src::Output, all, |_, _| done);
            }
            debug_assert!(steps <= 2 * f.steps());
        }
    }
    b.p
}

/// Rabenseifner's allreduce (see the module docs). Also a barrier, at count 0.
pub fn halving_doubling(s: &Shape) -> Plan {
    folded(s, |b, f, v, mut src, mut dep| {
        let s = b.s;
        let count = s.count;
        let elems = |lo: usize, hi: usize| {
            chunk_range(count, f.pw, lo).start..chunk_range(count, f.pw, hi - 1).end
        };
        let l = f.steps();
        let (mut lo, mut hi) = (0, f.pw);
        for k in 0..l {
            let mask = f.pw >> (k + 1);
            let peer = f.real(v ^ mask);
            let mid = lo + (hi - lo) / 2;
            let (keep, give) = if v & mask == 0 {
                ((lo, mid), (mid, hi))
            } else {
                ((mid, hi), (lo, mid))
            };
            let step = 1 + k;
            let prev = dep.clone();
            b.send(peer, step, src, elems(give.0, give.1), |p, range| {
                covering(p, &prev, range)
            });
            let commit = Commit::Reduce {
                with: src,
                finish_avg: k + 1 == l && s.avg,
            };
            dep = b.recv(peer, step, commit, elems(keep.0, keep.1), |_| None);
            src = Src::Output;
            (lo, hi) = keep;
        }
        for k in 0..l {
            let mask = 1usize << k;
            let peer = f.real(v ^ mask);
            let step = 1 + l + k;
            let done = b.p.recvs.len().checked_sub(1);
            b.send(peer, step, Src::Output, elems(lo, hi), |_, _| done);
            let plo = lo ^ mask;
            let phi = plo + (hi - lo);
            b.recv(peer, step, Commit::Copy, elems(plo, phi), |_| None);
            (lo, hi) = (lo.min(plo), hi.max(phi));
        }
        2 * l
    })
}

/// Recursive doubling (see the module docs). Also a barrier, at count 0.
pub fn recursive_doubling(s: &Shape) -> Plan {
    folded(s, |b, f, v, mut src, mut dep| {
        let s = b.s;
        let l = f.steps();
        for k in 0..l {
            let peer = f.real(v ^ (1 << k));
            let step = 1 + k;
            let prev = dep.clone();
            let sent = b.send(peer, step, src, 0..s.count, |p, range| {
                covering(p, &prev, range)
            });
            let commit = Commit::Reduce {
                with: src,
                finish_avg: k + 1 == l && s.avg,
            };
            // Slice j of the whole buffer is sent and received alike.
            dep = b.recv(peer, step, commit, 0..s.count, |j| Some(sent.start + j));
            src = Src::Output;
        }
        l
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_map_every_rank_once() {
        for world in 1..=40 {
            let f = Fold::new(world);
            assert!(f.pw <= world && world < 2 * f.pw);
            let vs: Vec<usize> = (0..world).filter_map(|r| f.virtual_rank(r)).collect();
            assert_eq!(vs, (0..f.pw).collect::<Vec<_>>(), "world {world}");
            for v in 0..f.pw {
                assert_eq!(f.virtual_rank(f.real(v)), Some(v));
            }
        }
    }

    #[test]
    fn peers_are_symmetric() {
        for world in 1..=40 {
            for r in 0..world {
                for q in hypercube_peers(r, world) {
                    assert!(hypercube_peers(q, world).contains(&r), "{r} {q} of {world}");
                    assert_ne!(q, r);
                }
            }
        }
    }

    #[test]
    fn a_power_of_two_takes_two_log_steps_each_way() {
        let s = Shape {
            kind: Kind::AllReduce,
            world: 8,
            rank: 5,
            count: 800,
            elem: 4,
            root: 0,
            avg: false,
            out_of_place: false,
            slice_elems: 1 << 20,
        };
        let p = halving_doubling(&s);
        assert_eq!(p.sends.len(), 6);
        assert_eq!(p.recvs.len(), 6);
        // Halving: 400, 200, 100 elements; doubling: 100, 200, 400.
        let sent: Vec<usize> = p.sends.iter().map(|o| o.range.len() / 4).collect();
        assert_eq!(sent, [400, 200, 100, 100, 200, 400]);
        let peers: Vec<usize> = p.sends.iter().map(|o| o.peer).collect();
        assert_eq!(peers, [1, 7, 4, 4, 7, 1]);
        let p = recursive_doubling(&s);
        let peers: Vec<usize> = p.sends.iter().map(|o| o.peer).collect();
        assert_eq!(peers, [4, 7, 1]);
        assert!(p.recvs.iter().all(|r| r.range.len() == 3200));
    }
}
