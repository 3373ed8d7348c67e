//! Exchanges: every message goes straight from its sender to its receiver.
//!
//! * [`pairwise`]: alltoall and its relatives. At step `k` (`1..world`)
//!   rank `r` sends its message for `r + k` and receives the one from
//!   `r - k`. A send waits for no receive, and a rank takes the receives of
//!   step `k` only after those of the steps before, whose senders sent them
//!   first: no cycle of waits, whatever the sizes. The same walk serves
//!   gather (only messages to the root), scatter (only from it), allgatherv
//!   (the own block to every rank) and reduce-scatter with per-rank counts
//!   (each received block reduced into the own one).
//! * [`point_to_point`]: a batch of sends and receives between any ranks
//!   (NCCL's group of `ncclSend`/`ncclRecv`). Each rank sends in the order
//!   of the key (sender, receiver, position) and receives in that order
//!   too, whatever order its caller posted in: the message with the least
//!   key not yet done is first in line at both its ends, so some message
//!   always moves and no batch deadlocks. Each receiver also answers every
//!   message it expects with an empty acknowledgement that carries its own
//!   descriptor of the message, sent as the batch starts (after its own
//!   data to that peer), not once the message is in: it crosses the data
//!   on the wire, so a send costs one trip, not two. A sender waits for
//!   it, so that a sender whose receiver disagreed on the count or type
//!   fails too, naming both calls, and a send to a rank that never
//!   receives times out naming it.
//!
//! Ranges are bytes: of the input for sends, of the output for receives.
//! Each message travels as frames of at most `slice_elems` elements; an
//! empty message is one empty frame, so sender and receiver always agree
//! on the number of frames and a count that differs is caught.

use std::ops::Range;

use oxccl_transport::wire::DESCRIPTOR_LEN;

use super::{Commit, Plan, RecvOp, SendOp, Src, WireTag, slices};

/// What a received block does: lands in place, or is reduced into the
/// output (which holds the own block already).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    /// Copied into its range of the output.
    Copy,
    /// `output[range] = op(output[range], block)`; with `avg`, the last
    /// block also turns the sums into averages.
    Reduce {
        /// The op is an average.
        avg: bool,
    },
}

/// The byte ranges of a message's frames.
fn frames(range: &Range<usize>, elem: usize, slice_elems: usize) -> Vec<Range<usize>> {
    let elems = range.start / elem..range.end / elem;
    slices(elems, slice_elems)
        .map(|s| s.start * elem..s.end * elem)
        .collect()
}

/// The plan of rank `rank` in a pairwise exchange: `sends[p]` is the input
/// range it sends to `p` (`None`: no message to `p`), `recvs[p]` the output
/// range it receives from `p`. Entries for `rank` itself are ignored (the
/// caller copies the own block). Both slices have `world` entries.
pub fn pairwise(
    rank: usize,
    world: usize,
    sends: &[Option<Range<usize>>],
    recvs: &[Option<Range<usize>>],
    landing: Landing,
    elem: usize,
    slice_elems: usize,
) -> Plan {
    let mut p = Plan::default();
    let elem = elem.max(1);
    let slice_elems = slice_elems.max(1);
    let last_from = (1..world)
        .rev()
        .map(|k| (rank + world - k) % world)
        .find(|&q| recvs.get(q).is_some_and(Option::is_some));
    for k in 1..world {
        let step = k as u32;
        let to = (rank + k) % world;
        if let Some(Some(r)) = sends.get(to) {
            for (j, f) in frames(r, elem, slice_elems).into_iter().enumerate() {
                p.sends.push(SendOp {
                    peer: to,
                    step,
                    slice: j as u32,
                    src: Src::Input,
                    range: f,
                    after_recv: None,
                });
            }
        }
        let from = (rank + world - k) % world;
        if let Some(Some(r)) = recvs.get(from) {
            let commit = match landing {
                Landing::Copy => Commit::Copy,
                Landing::Reduce { avg } => Commit::Reduce {
                    with: Src::Output,
                    finish_avg: avg && Some(from) == last_from,
                },
            };
            for (j, f) in frames(r, elem, slice_elems).into_iter().enumerate() {
                p.recvs.push(RecvOp {
                    peer: from,
                    step,
                    slice: j as u32,
                    range: f,
                    commit,
                    after_send: None,
                });
            }
        }
    }
    p
}

/// One message of a batch of sends and receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The rank it goes to (a send) or comes from (a receive).
    pub peer: usize,
    /// Its bytes: of the batch's input for a send, of its output for a receive.
    pub range: Range<usize>,
    /// Its number among the messages between the two ranks in this
    /// direction, the same at both ends.
    pub seq: u64,
    /// What both ends must agree on (kind, type, count, sender).
    pub descriptor: [u8; DESCRIPTOR_LEN],
}

/// The wire step of a message's data frames, and of its acknowledgement.
const DATA: u32 = 0;
const ACK: u32 = 1;

/// The plan of one rank for a batch of `sends` and `recvs`, each already
/// in the order of the key described in the module docs (by peer, then as
/// posted). Frames carry their message's tag ([`Plan::wires`]).
pub fn point_to_point(
    sends: &[Message],
    recvs: &[Message],
    elem: usize,
    slice_elems: usize,
) -> Plan {
    let mut p = Plan::default();
    let elem = elem.max(1);
    let slice_elems = slice_elems.max(1);
    let tag = |p: &mut Plan, m: &Message, step: u32| {
        p.wires.push(WireTag {
            seq: m.seq,
            step,
            descriptor: m.descriptor,
        });
        (p.wires.len() - 1) as u32
    };
    for m in sends {
        let t = tag(&mut p, m, DATA);
        for (j, f) in frames(&m.range, elem, slice_elems).into_iter().enumerate() {
            p.sends.push(SendOp {
                peer: m.peer,
                step: t,
                slice: j as u32,
                src: Src::Input,
                range: f,
                after_recv: None,
            });
        }
    }
    for m in recvs {
        let t = tag(&mut p, m, DATA);
        for (j, f) in frames(&m.range, elem, slice_elems).into_iter().enumerate() {
            p.recvs.push(RecvOp {
                peer: m.peer,
                step: t,
                slice: j as u32,
                range: f,
                commit: Commit::Copy,
                after_send: None,
            });
        }
    }
    // Every message this rank receives is acknowledged at once, after this
    // rank's own data went: the acknowledgement's header is this end's
    // descriptor, which the sender checks against its own.
    for m in recvs {
        let t = tag(&mut p, m, ACK);
        p.sends.push(SendOp {
            peer: m.peer,
            step: t,
            slice: 0,
            src: Src::Output,
            range: 0..0,
            after_recv: None,
        });
    }
    for m in sends {
        let t = tag(&mut p, m, ACK);
        p.recvs.push(RecvOp {
            peer: m.peer,
            step: t,
            slice: 0,
            range: 0..0,
            commit: Commit::Discard,
            after_send: None,
        });
    }
    p
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn blocks(world: usize, len: usize) -> Vec<Option<Range<usize>>> {
        (0..world).map(|p| Some(p * len..(p + 1) * len)).collect()
    }

    #[test]
    fn pairwise_sends_and_receives_every_other_rank_once_in_step_order() {
        for world in 1..=6 {
            for rank in 0..world {
                let p = pairwise(
                    rank,
                    world,
                    &blocks(world, 8),
                    &blocks(world, 8),
                    Landing::Copy,
                    4,
                    1,
                );
                // Two frames of one element for each other rank.
                assert_eq!(p.sends.len(), 2 * (world - 1));
                assert_eq!(p.recvs.len(), 2 * (world - 1));
                let to: Vec<usize> = p.sends.iter().step_by(2).map(|s| s.peer).collect();
                let want: Vec<usize> = (1..world).map(|k| (rank + k) % world).collect();
                assert_eq!(to, want);
                assert!(p.sends.iter().all(|s| s.after_recv.is_none()));
                let steps: Vec<u32> = p.recvs.iter().map(|r| r.step).collect();
                assert!(steps.windows(2).all(|w| w[0] <= w[1]));
            }
        }
    }

    #[test]
    fn only_the_last_block_of_an_average_finishes_it() {
        let p = pairwise(
            1,
            4,
            &blocks(4, 4),
            &[Some(0..4), Some(0..4), Some(0..4), Some(0..4)],
            Landing::Reduce { avg: true },
            4,
            16,
        );
        let finishing: Vec<usize> = p
            .recvs
            .iter()
            .filter(|r| {
                matches!(
                    r.commit,
                    Commit::Reduce {
                        finish_avg: true,
                        ..
                    }
                )
            })
            .map(|r| r.peer)
            .collect();
        // Rank 1 hears from 0, 3, 2 in that order.
        assert_eq!(finishing, vec![2]);
    }

    #[test]
    fn empty_messages_are_one_empty_frame_and_missing_ones_none() {
        let p = pairwise(
            0,
            3,
            &[None, Some(0..0), None],
            &[None, None, Some(4..12)],
            Landing::Copy,
            4,
            1,
        );
        assert_eq!(p.sends.len(), 1);
        assert_eq!(p.sends[0].range, 0..0);
        assert_eq!(p.recvs.len(), 2);
        assert_eq!(p.recvs[1].range, 8..12);
    }

    #[test]
    fn every_message_is_acknowledged_with_its_own_tag() {
        let m = |peer, range, seq| Message {
            peer,
            range,
            seq,
            descriptor: [peer as u8; DESCRIPTOR_LEN],
        };
        let p = point_to_point(&[m(2, 0..8, 5)], &[m(1, 0..0, 3), m(3, 0..4, 0)], 4, 1);
        // Two data frames, then an acknowledgement for each receive, which
        // waits for nothing received (it crosses the data).
        assert_eq!(p.sends.len(), 4);
        assert!(p.sends.iter().all(|s| s.after_recv.is_none()));
        assert_eq!(p.sends[2].peer, 1);
        assert_eq!(p.sends[3].peer, 3);
        let t = &p.wires[p.sends[3].step as usize];
        assert_eq!((t.seq, t.step, t.descriptor[0]), (0, ACK, 3));
        // One empty frame, one frame, then the acknowledgement of the send.
        assert_eq!(p.recvs.len(), 3);
        let ack = &p.recvs[2];
        assert_eq!((ack.peer, ack.commit), (2, Commit::Discard));
        let t = &p.wires[ack.step as usize];
        assert_eq!((t.seq, t.step), (5, ACK));
        let t = &p.wires[p.sends[0].step as usize];
        assert_eq!((t.seq, t.step), (5, DATA));
    }
}
