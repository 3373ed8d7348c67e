//! A rank's links, found by peer.
//!
//! Every rank has the ring's two links (to `rank + 1`, from `rank - 1`),
//! and one link to each other peer that some algorithm's schedule talks to
//! (`algo::peers`). Every link is one connection both ways, so the two
//! ranks of a pair agree on it from either side: frames to a peer go on
//! the link to the next rank when the peer is the next rank, else on the
//! pair link, else on the link from the previous rank (backwards along the
//! ring); frames from a peer come the mirror way. In a world of two the
//! next and the previous rank are the same peer and each ring link carries
//! one direction, as in the ring.

use oxccl_transport::{Capabilities, Link, MemoryKinds, MessageLink};

/// Where a link is kept.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Next,
    Prev,
    Pair(usize),
}

/// A rank's links.
#[derive(Debug)]
pub(crate) struct Links<'a> {
    /// To `rank + 1`.
    next: Box<dyn MessageLink + 'a>,
    /// From `rank - 1`.
    prev: Box<dyn MessageLink + 'a>,
    /// The peers of `next` and `prev`, kept so that finding a frame's link
    /// costs no call through the trait object.
    next_peer: usize,
    prev_peer: usize,
    /// To every other peer, sorted by peer.
    pairs: Vec<(usize, Box<dyn MessageLink + 'a>)>,
    /// Some link needs memory registered before it is posted.
    registration: bool,
    /// What every link moves by address, and the frame size above which it
    /// does ([`Capabilities::by_address`](oxccl_transport::Capabilities)).
    by_address: (MemoryKinds, usize),
}

/// What links move by address, with one more link's capabilities: the
/// kinds all of them take, above the largest of their thresholds.
fn by_address_with((kinds, over): (MemoryKinds, usize), c: Capabilities) -> (MemoryKinds, usize) {
    (kinds.and(c.by_address), over.max(c.by_address_over))
}

impl<'a> Links<'a> {
    /// The ring's links and the pair links to other peers.
    pub(crate) fn new(
        next: Box<dyn MessageLink + 'a>,
        prev: Box<dyn MessageLink + 'a>,
        pairs: Vec<Box<dyn MessageLink + 'a>>,
    ) -> Links<'a> {
        let mut pairs: Vec<(usize, Box<dyn MessageLink + 'a>)> =
            pairs.into_iter().map(|l| (l.peer(), l)).collect();
        pairs.sort_by_key(|(p, _)| *p);
        let all = || {
            [&next, &prev]
                .into_iter()
                .chain(pairs.iter().map(|(_, l)| l))
                .map(|l| l.capabilities())
        };
        let registration = all().any(|c| c.registration);
        let by_address = all().fold((MemoryKinds::ALL, 0), by_address_with);
        Links {
            registration,
            by_address,
            next_peer: next.peer(),
            prev_peer: prev.peer(),
            next,
            prev,
            pairs,
        }
    }

    /// Keeps `link`, to a peer this rank had no link to ([`crate::lazy`]).
    pub(crate) fn add(&mut self, link: Box<dyn MessageLink + 'a>) {
        let peer = link.peer();
        let caps = link.capabilities();
        self.registration |= caps.registration;
        self.by_address = by_address_with(self.by_address, caps);
        let at = self.pairs.partition_point(|(p, _)| *p < peer);
        self.pairs.insert(at, (peer, link));
    }

    /// Whether this rank has a link to `peer`.
    pub(crate) fn has(&self, peer: usize) -> bool {
        self.slot(peer, true).is_some()
    }

    /// Where the link for frames to (`out`) or from `peer` is.
    #[inline]
    fn slot(&self, peer: usize, out: bool) -> Option<Slot> {
        let ring = if out {
            [(Slot::Next, self.next_peer), (Slot::Prev, self.prev_peer)]
        } else {
            [(Slot::Prev, self.prev_peer), (Slot::Next, self.next_peer)]
        };
        match ring.into_iter().find(|&(_, p)| p == peer) {
            Some((slot, _)) => Some(slot),
            None => self
                .pairs
                .binary_search_by_key(&peer, |(p, _)| *p)
                .ok()
                .map(Slot::Pair),
        }
    }

    fn get(&self, slot: Slot) -> Option<&(dyn MessageLink + 'a)> {
        match slot {
            Slot::Next => Some(self.next.as_ref()),
            Slot::Prev => Some(self.prev.as_ref()),
            Slot::Pair(i) => self.pairs.get(i).map(|(_, l)| l.as_ref()),
        }
    }

    fn get_mut(&mut self, slot: Slot) -> Option<&mut (dyn MessageLink + 'a)> {
        match slot {
            Slot::Next => Some(self.next.as_mut()),
            Slot::Prev => Some(self.prev.as_mut()),
            Slot::Pair(i) => self.pairs.get_mut(i).map(|(_, l)| l.as_mut()),
        }
    }

    /// The kinds of memory every link moves by address, and the frame size
    /// above which it does: a call on device buffers of such a kind hands
    /// them to the links as they are.
    #[inline]
    pub(crate) fn by_address(&self) -> (MemoryKinds, usize) {
        self.by_address
    }

    /// Whether memory must be registered with a link before it is posted
    /// ([`MessageLink::register`]); false for byte streams, so the engine
    /// then makes no call per frame.
    #[inline]
    pub(crate) fn registration(&self) -> bool {
        self.registration
    }

    /// The link that carries frames to `peer`.
    #[inline]
    pub(crate) fn link_to(&mut self, peer: usize) -> Option<&mut (dyn MessageLink + 'a)> {
        self.slot(peer, true).and_then(|s| self.get_mut(s))
    }

    /// The link that carries frames from `peer`.
    #[inline]
    pub(crate) fn link_from(&mut self, peer: usize) -> Option<&mut (dyn MessageLink + 'a)> {
        self.slot(peer, false).and_then(|s| self.get_mut(s))
    }

    /// [`link_to`](Self::link_to), shared.
    pub(crate) fn link_to_ref(&self, peer: usize) -> Option<&(dyn MessageLink + 'a)> {
        self.slot(peer, true).and_then(|s| self.get(s))
    }

    /// [`link_from`](Self::link_from), shared.
    pub(crate) fn link_from_ref(&self, peer: usize) -> Option<&(dyn MessageLink + 'a)> {
        self.slot(peer, false).and_then(|s| self.get(s))
    }

    /// Every link.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &(dyn MessageLink + 'a)> {
        [self.next.as_ref(), self.prev.as_ref()]
            .into_iter()
            .chain(self.pairs.iter().map(|(_, l)| l.as_ref()))
    }

    /// Every link, mutably.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut (dyn MessageLink + 'a)> {
        [self.next.as_mut(), self.prev.as_mut()]
            .into_iter()
            .chain(self.pairs.iter_mut().map(|(_, l)| l.as_mut()))
    }

    /// The link to the next rank of the ring and the one from the previous.
    pub(crate) fn ring(&self) -> (&(dyn MessageLink + 'a), &(dyn MessageLink + 'a)) {
        (self.next.as_ref(), self.prev.as_ref())
    }
}

/// The links of every rank of a world in one process, indexed by rank
/// (`None` for a world of one): the ring and every pair link of
/// [`algo::pair_peers`](crate::algo::pair_peers), each made by
/// `make(a, b)`, which returns `a`'s end (to `b`) and `b`'s end (to `a`).
pub(crate) fn in_process<'a, L: Link + 'a, E>(
    world: usize,
    mut make: impl FnMut(usize, usize) -> Result<(L, L), E>,
) -> Result<Vec<Option<Links<'a>>>, E> {
    if world <= 1 {
        return Ok((0..world).map(|_| None).collect());
    }
    let mut next: Vec<Option<Box<dyn MessageLink + 'a>>> = (0..world).map(|_| None).collect();
    let mut prev: Vec<Option<Box<dyn MessageLink + 'a>>> = (0..world).map(|_| None).collect();
    let mut pairs: Vec<Vec<Box<dyn MessageLink + 'a>>> = (0..world).map(|_| Vec::new()).collect();
    for (r, slot) in next.iter_mut().enumerate() {
        let to = (r + 1) % world;
        let (a, b) = make(r, to)?;
        *slot = Some(Box::new(a));
        prev[to] = Some(Box::new(b));
    }
    for a in 0..world {
        for b in crate::algo::pair_peers(a, world) {
            if a < b {
                let (x, y) = make(a, b)?;
                pairs[a].push(Box::new(x));
                pairs[b].push(Box::new(y));
            }
        }
    }
    // Every rank got both ring links above.
    Ok(next
        .into_iter()
        .zip(prev)
        .zip(pairs)
        .map(|((n, p), pairs)| n.zip(p).map(|(n, p)| Links::new(n, p, pairs)))
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use oxccl_transport::fault::{self, Faults};
    use oxccl_transport::wire::{FrameHeader, Tag};
    use oxccl_transport::{Incoming, Lent, Outgoing, Status};
    use smallvec::smallvec;

    use super::*;

    fn world(n: usize) -> Vec<Links<'static>> {
        in_process(n, |a, b| {
            fault::pair(a, b, Faults::default(), Faults::default())
        })
        .unwrap()
        .into_iter()
        .map(Option::unwrap)
        .collect()
    }

    /// A message sent to a peer is received by that peer from this rank:
    /// the two sides of every pair pick the same connection, whichever way
    /// it is used (the ring forwards, backwards, a pair link, a world of two).
    #[test]
    fn both_sides_of_every_pair_agree_on_the_link() {
        for n in [2, 3, 4, 5, 8] {
            let mut links = world(n);
            for a in 0..n {
                let mut peers: Vec<usize> = crate::algo::pair_peers(a, n);
                peers.extend([(a + 1) % n, (a + n - 1) % n]);
                for b in peers {
                    let byte = [(a * 16 + b) as u8];
                    let header = FrameHeader {
                        tag: Tag {
                            seq: 7,
                            step: a as u32,
                            slice: b as u32,
                        },
                        len: 1,
                        descriptor: [0; 16],
                    };
                    let l = links[a].link_to(b).unwrap();
                    assert_eq!(l.peer(), b);
                    let mut m = Outgoing::new(&header, smallvec![Lent::Shared(&byte)]);
                    assert_eq!(l.post_send(&mut m).unwrap(), Status::Done);
                    let mut got = [0u8];
                    let r = links[b].link_from(a).unwrap();
                    let mut m = Incoming::new(header, smallvec![Lent::Exclusive(&mut got)]);
                    assert_eq!(r.post_recv(&mut m).unwrap(), Status::Done);
                    drop(m);
                    assert_eq!(got, byte, "world {n}: {a} -> {b}");
                }
            }
        }
    }

    #[test]
    fn a_peer_without_a_link_is_none() {
        let mut links = world(8);
        // Rank 0 of 8 talks to 1, 2, 4, 6, 7 (ring, hypercube, tree); not 3 or 5.
        assert!(links[0].link_to(3).is_none());
        assert!(links[0].link_from(5).is_none());
        assert!(links[0].link_to(4).is_some());
    }
}
