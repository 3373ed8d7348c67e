//! Broadcast down and reduce up a binomial tree: `ceil(log2 world)` hops
//! between the root and the farthest rank instead of the chain's
//! `world - 1`.
//!
//! Ranks are numbered from the root (`v = rank - root`, modulo the world).
//! The parent of `v > 0` is `v` without its highest set bit; its children
//! are `v + 2^k` for every `2^k > v` below the world, the largest subtree
//! first. Each rank receives the buffer slice by slice from its parent and
//! forwards each slice to its children as soon as it has it, so large
//! buffers pipeline down the tree. Every rank then sends its parent an empty
//! frame, so that each parent, the root included, learns in the same call
//! of a child that failed or made a different call.

use super::{Commit, Plan, RecvOp, SendOp, Shape, Src, byte_range, plan, slices};
use crate::schedule::Kind;

/// The ranks `rank` exchanges frames with in a binomial tree rooted
/// anywhere: `rank +- 2^k` (modulo the world).
pub fn tree_peers(rank: usize, world: usize) -> Vec<usize> {
    let mut peers = Vec::new();
    let mut d = 1;
    while d < world {
        peers.push((rank + d) % world);
        peers.push((rank + world - d) % world);
        d *= 2;
    }
    peers.retain(|&q| q != rank);
    peers.sort_unstable();
    peers.dedup();
    peers
}

/// A rank's parent and children in the binomial tree of `s` (children
/// smallest subtree first).
fn family(s: &Shape) -> (Option<usize>, Vec<usize>) {
    let n = s.world;
    let v = (s.rank + n - s.root) % n;
    let real = |v: usize| (v + s.root) % n;
    let parent = (v > 0).then(|| real(v & !(1 << (usize::BITS - 1 - v.leading_zeros()))));
    let mut children = Vec::new();
    let mut d = if v == 0 {
        1
    } else {
        1 << (usize::BITS - v.leading_zeros())
    };
    while v + d < n {
        children.push(real(v + d));
        d *= 2;
    }
    (parent, children)
}

/// The binomial-tree reduce of one rank: each rank receives every slice
/// from its children (smallest subtree first, the first to be ready),
/// reduces it into its own, and sends it on to its parent; the root ends
/// with the reduction. The root then sends each child an empty frame, so
/// that every rank learns in the same call of a root that failed or made a
/// different call.
pub fn binomial_reduce(s: &Shape) -> Plan {
    assert_eq!(s.kind, Kind::Reduce);
    if s.world == 1 {
        return plan(s);
    }
    let (parent, children) = family(s);
    let mut p = Plan::default();
    for (j, e) in slices(0..s.count, s.slice_elems).enumerate() {
        for (i, &c) in children.iter().enumerate() {
            p.recvs.push(RecvOp {
                peer: c,
                step: 0,
                slice: j as u32,
                range: byte_range(s, e.clone()),
                commit: Commit::Reduce {
                    with: if i == 0 { Src::Input } else { Src::Output },
                    finish_avg: parent.is_none() && i + 1 == children.len() && s.avg,
                },
                after_send: None,
            });
        }
        if let Some(to) = parent {
            p.sends.push(SendOp {
                peer: to,
                step: 0,
                slice: j as u32,
                src: if children.is_empty() {
                    Src::Input
                } else {
                    Src::Output
                },
                range: byte_range(s, e.clone()),
                after_recv: p.recvs.len().checked_sub(1),
            });
        }
    }
    // The root's word to every child, passed down the tree.
    if let Some(from) = parent {
        p.recvs.push(RecvOp {
            peer: from,
            step: 1,
            slice: 0,
            range: 0..0,
            commit: Commit::Discard,
            after_send: None,
        });
    }
    let last = p.recvs.len().checked_sub(1);
    for &c in &children {
        p.sends.push(SendOp {
            peer: c,
            step: 1,
            slice: 0,
            src: Src::Output,
            range: 0..0,
            after_recv: last,
        });
    }
    p
}

/// The binomial-tree broadcast of one rank (see the module docs).
pub fn binomial_broadcast(s: &Shape) -> Plan {
    assert_eq!(s.kind, Kind::Broadcast);
    if s.world == 1 {
        return plan(s);
    }
    let (parent, mut children) = family(s);
    // Largest subtree first: it has the longest way to go.
    children.reverse();
    let mut p = Plan::default();
    if parent.is_none() && s.out_of_place {
        p.prologue_copy = Some(0..s.count * s.elem);
        p.prologue_deferrable = true;
    }
    for (j, e) in slices(0..s.count, s.slice_elems).enumerate() {
        let after_recv = parent.map(|from| {
            p.recvs.push(RecvOp {
                peer: from,
                step: 0,
                slice: j as u32,
                range: byte_range(s, e.clone()),
                commit: Commit::Copy,
                after_send: None,
            });
            p.recvs.len() - 1
        });
        for &c in &children {
            p.sends.push(SendOp {
                peer: c,
                step: 0,
                slice: j as u32,
                src: if parent.is_some() {
                    Src::Output
                } else {
                    Src::Input
                },
                range: byte_range(s, e.clone()),
                after_recv,
            });
        }
    }
    if let Some(to) = parent {
        p.sends.push(SendOp {
            peer: to,
            step: 1,
            slice: 0,
            src: Src::Output,
            range: 0..0,
            after_recv: p.recvs.len().checked_sub(1),
        });
    }
    for &c in &children {
        p.recvs.push(RecvOp {
            peer: c,
            step: 1,
            slice: 0,
            range: 0..0,
            commit: Commit::Discard,
            after_send: None,
        });
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_but_the_root_has_one_parent_and_depth_is_logarithmic() {
        for world in 1..=33 {
            for root in [0, world / 2, world - 1] {
                let mut parents = vec![None; world];
                for rank in 0..world {
                    let s = Shape {
                        kind: Kind::Broadcast,
                        world,
                        rank,
                        count: 10,
                        elem: 1,
                        root,
                        avg: false,
                        out_of_place: false,
                        slice_elems: 100,
                    };
                    let p = binomial_broadcast(&s);
                    for op in p.sends.iter().filter(|o| o.step == 0) {
                        assert!(parents[op.peer].replace(rank).is_none(), "two parents");
                        assert!(tree_peers(rank, world).contains(&op.peer));
                    }
                }
                assert!(parents[root].is_none());
                let depth = |mut r: usize| {
                    let mut d = 0;
                    while let Some(p) = parents[r] {
                        r = p;
                        d += 1;
                    }
                    d
                };
                let log = usize::BITS - (world - 1).leading_zeros();
                for (r, parent) in parents.iter().enumerate() {
                    assert!(r == root || parent.is_some(), "{r} is unreached");
                    assert!(depth(r) <= log as usize, "world {world}");
                }
            }
        }
    }
}
