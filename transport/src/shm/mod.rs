//! Shared-memory links between ranks of one host.
//!
//! A [`ShmLink`] carries its bytes through two single-producer,
//! single-consumer byte rings in a shared mapping, one per direction, and
//! keeps the stream socket it was upgraded from (TCP, or a Unix socket pair
//! in process) as its *doorbell*: a rank that is about to sleep sets a
//! "waiting" flag in the ring it waits on and polls the socket; the other
//! side, after moving the ring's head or tail, sends one byte on the socket
//! if it sees the flag. The flag store and the head/tail store are each
//! followed by a sequentially consistent fence before the other side's value
//! is loaded, so either the sleeper sees the new position or the mover sees
//! the flag (the eventcount pattern). A rank that spins never touches the
//! socket. The socket also tells that the peer is gone: when it dies, the
//! kernel closes it, and a sleeper wakes to the end of the stream.
//!
//! Large buffers skip the ring (*single copy*): the writer posts a buffer's
//! address and length in the control block, anchored at a ring position,
//! and the reader copies it with `process_vm_readv` straight from the
//! writer's memory into its own buffer, one copy instead of two. The writer
//! reports the bytes written only as the reader copies them, so a partial
//! write means the same as over the ring. Each reader checks once, when the
//! link is made, that the kernel lets it read the writer (a random token at
//! a published address; Yama's ptrace scope or separate pid namespaces may
//! refuse) and tells the writer, which otherwise keeps to the ring. The
//! caller chooses per write whether single copies are allowed
//! ([`Link::allow_single_copy`]). A writer whose call fails mid-transfer
//! withdraws it ([`Endpoint::withdraw`]) before its caller may free or reuse
//! the bytes, without shutting the link: the reader then delivers none of
//! the rest and fails its read, naming the writer.
//!
//! Segments are POSIX shared-memory objects (`/dev/shm/oxccl-...`): the
//! receiving side of a ring link creates one, offers its name and a random
//! nonce over the socket, the sending side maps it and checks the nonce (the
//! proof that both see the same memory, not merely the same name), and the
//! creator unlinks the name as soon as the answer arrives, so nothing is left
//! behind once both have it mapped.
//!
//! # Safety
//!
//! This module is one of the places where oxccl uses `unsafe` (see the
//! architecture notes). Its blocks are in `segment` (the mapping), `ring`
//! (the ring copies) and `single_copy` (`process_vm_readv`), each of which
//! opens with the part it keeps of these invariants:
//!
//! * A `Mapping` owns one `mmap` of `len` bytes, page-aligned, readable and
//!   writable, unmapped only on drop. Every pointer formed into it is derived
//!   from its base and stays below `len`: the control blocks lie at fixed
//!   offsets inside the first page, and ring offsets are positions modulo the
//!   capacity, so a peer that writes garbage positions can make us read
//!   garbage bytes (which the frame checks above reject) but never access
//!   memory outside the mapping.
//! * The peer can write every word of the segment, its own and ours. A side
//!   keeps its own counts (head, tail, transfers posted, bytes copied) in
//!   its own memory and only stores them, never loads them back; each word
//!   the peer writes is checked before any arithmetic or copy uses it, and
//!   an impossible value is a [`TransportError::Protocol`] naming the peer.
//! * The control words are only accessed as atomics; they are 64-byte aligned
//!   and live as long as the mapping that [`ShmLink`] owns.
//! * Ring bytes between `tail` and `head` belong to the reader, the rest to
//!   the writer. Each side copies only within its own part and publishes with
//!   a release store that the other side loads with acquire; bytes are copied
//!   with `copy_nonoverlapping` through raw pointers, never through Rust
//!   references to the shared memory, which the other process writes.
//! * A posted transfer's bytes belong to the writer's caller, who leaves
//!   them alone until they are reported written; they are only read, by the
//!   kernel, into the reader's own buffers (`process_vm_readv` checks both
//!   sides). A writer that gives them up before the reader is done first
//!   marks the link shut (an abort, a drop) or the transfer withdrawn (its
//!   call failed, [`Endpoint::withdraw`]), and the reader checks both marks
//!   after each copy and discards the copy if either is set, so bytes the
//!   caller may already have reused are never delivered.

pub(crate) mod handshake;
mod ring;
mod segment;
mod single_copy;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

use std::cell::Cell;
use std::fmt;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::{Endpoint, Link, StreamLink, TransportError};
use segment::{HEADER_LEN, Mapping, SHUT};
use single_copy::Posted;

/// The smallest ring capacity accepted.
pub const MIN_CAPACITY: usize = 4096;

/// Writes of at least this many bytes (one buffer of a `try_write`) go by a
/// single copy when the reader may read this process's memory: the writer
/// posts the buffer's address and the reader copies it straight into its
/// own buffer (`process_vm_readv`), instead of one copy into the ring and
/// one out of it.
pub const DEFAULT_SINGLE_COPY_BYTES: usize = 64 * 1024;

/// A [`Link`] through shared memory, with the socket it came from as doorbell.
pub struct ShmLink {
    peer: usize,
    map: Arc<Mapping>,
    capacity: usize,
    /// The direction this side writes (0 or 1); it reads the other.
    tx: usize,
    doorbell: StreamLink,
    /// The doorbell socket reached its end: the peer closed or we shut down.
    closed: Cell<bool>,
    /// As the writer: bytes ever written (our `head`). This and the next
    /// three are the words only this side writes: the peer could overwrite
    /// them in the segment, so they are kept here and only stored there.
    head: Cell<u64>,
    /// As the reader: bytes ever read (our `tail`).
    tail: Cell<u64>,
    /// As the writer: single-copy transfers ever posted (our `pull_posted`).
    pulls_posted: Cell<u64>,
    /// As the reader: bytes ever copied by single copy (our `pulled`).
    pulled_total: Cell<u64>,
    /// The reader's `tail` of our direction as we last loaded it. Free room
    /// only grows behind our back, so a stale value is safe (it understates
    /// the room), and reloading it only when it says too little keeps the
    /// reader's cache line out of every small write.
    tail_seen: Cell<u64>,
    /// Buffers of at least this many bytes go by a single copy when the
    /// reader may read our memory (`usize::MAX`: never).
    single_copy_min: usize,
    /// Whether the caller allows single copies now ([`Link::allow_single_copy`]).
    single_copy_allowed: bool,
    /// The reader's verdict on reading our memory, once it gave one.
    pullable: Cell<u64>,
    /// As the writer: the single-copy transfer posted and not yet finished.
    posted: Cell<Option<Posted>>,
    /// As the writer: the reader's `pulled` as last loaded.
    pulled_seen: Cell<u64>,
    /// As the writer: a posted transfer was withdrawn before the reader had
    /// copied it all, so the stream lost bytes and takes no more.
    withdrawn: Cell<bool>,
    /// As the reader: transfers finished, and bytes of the current one copied.
    pulls_done: Cell<u64>,
    pull_progress: Cell<usize>,
    /// As the reader: the writer's process id, found by the probe.
    source_pid: Cell<i32>,
    description: String,
}

impl fmt::Debug for ShmLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmLink")
            .field("peer", &self.peer)
            .field("capacity", &self.capacity)
            .field("description", &self.description)
            .finish()
    }
}

impl ShmLink {
    fn new(
        peer: usize,
        map: Mapping,
        capacity: usize,
        tx: usize,
        doorbell: StreamLink,
        name: &str,
    ) -> ShmLink {
        let description = format!(
            "shm {name} ({} KiB per direction; doorbell {})",
            capacity / 1024,
            doorbell.describe()
        );
        let link = ShmLink {
            peer,
            map: Arc::new(map),
            capacity,
            tx,
            doorbell,
            closed: Cell::new(false),
            head: Cell::new(0),
            tail: Cell::new(0),
            pulls_posted: Cell::new(0),
            pulled_total: Cell::new(0),
            tail_seen: Cell::new(0),
            single_copy_min: DEFAULT_SINGLE_COPY_BYTES,
            single_copy_allowed: true,
            pullable: Cell::new(0),
            posted: Cell::new(None),
            pulled_seen: Cell::new(0),
            withdrawn: Cell::new(false),
            pulls_done: Cell::new(0),
            pull_progress: Cell::new(0),
            source_pid: Cell::new(0),
            description,
        };
        link.probe();
        link
    }

    /// Sends buffers of at least `min_bytes` by a single copy when the peer
    /// may read this process's memory; `None` never does.
    pub fn set_single_copy(&mut self, min_bytes: Option<usize>) {
        self.single_copy_min = min_bytes.map_or(usize::MAX, |m| m.max(1));
    }

    fn closed_error(&self) -> TransportError {
        TransportError::PeerClosed {
            peer: self.peer,
            how: "end of stream on the shared-memory link's socket".into(),
        }
    }

    /// Whether either side shut the link down (see [`SHUT`]).
    #[inline]
    fn is_shut(&self) -> bool {
        self.map.word(SHUT).load(Ordering::Acquire) != 0
    }

    /// The reader's error once the writer withdrew the pending transfer.
    fn withdrawn_error(&self) -> TransportError {
        TransportError::Withdrawn { peer: self.peer }
    }

    fn shut_error(&self) -> TransportError {
        TransportError::PeerClosed {
            peer: self.peer,
            how: "the shared-memory link was shut down".into(),
        }
    }

    /// An impossible value the peer wrote into the segment: `what` says
    /// which, of "it" (the peer, whose rank the error names).
    fn peer_wrote(&self, what: String) -> TransportError {
        TransportError::Protocol {
            peer: self.peer,
            reason: what,
        }
    }
}

/// Whether a link may, should or must become a shared-memory link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Use shared memory when both ends can map the same segment.
    Auto,
    /// Never (both ends agree on the socket).
    Never,
    /// Always; fail the handshake if the peer cannot map the segment.
    Require,
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::Auto => "auto",
            Policy::Never => "tcp",
            Policy::Require => "shm",
        })
    }
}

/// What a ring upgrade decided, per link.
#[derive(Debug)]
pub struct Upgraded {
    /// The link to the next rank (shared memory or the original socket).
    pub next: Box<dyn Link>,
    /// The link from the previous rank.
    pub prev: Box<dyn Link>,
}

/// Offers shared memory on `prev` (this side creates the segment), answers
/// the offer of `next`, and reads the answer on `prev`: each link becomes a
/// [`ShmLink`] when both ends agree and can map the same segment, or stays
/// the socket it was. Every rank of a ring calls it at once; the order of the
/// steps (offer, answer, read the answer) cannot deadlock.
///
/// With [`Policy::Require`] on either end, a link that cannot use shared
/// memory fails on both ends with the reason; with [`Policy::Never`] on
/// either end it stays a socket.
pub fn upgrade_ring(
    next: StreamLink,
    prev: StreamLink,
    policy: Policy,
    capacity: usize,
    single_copy: Option<usize>,
    deadline: Instant,
) -> Result<Upgraded, TransportError> {
    let capacity = capacity.max(MIN_CAPACITY);
    let mut prev = prev;
    // 1. Offer on prev.
    let created = handshake::offer(&mut prev, policy, capacity, deadline)?;
    // 2. Answer the offer on next.
    let next = handshake::answer(next, policy, capacity, single_copy, deadline)?;
    // 3. Read the answer on prev.
    let prev = handshake::read_answer(prev, created, policy, capacity, single_copy, deadline)?;
    Ok(Upgraded { next, prev })
}

/// [`upgrade_ring`] for links to other peers: on each link of `links`, the
/// side given `true` creates and offers the segment and the other side
/// answers. Every rank calls it with all its pair links at once; it sends
/// all its offers first, then answers the offers it gets, then reads the
/// answers to its own, so no rank waits for one that waits for it. Returns
/// the links in the order given.
pub fn upgrade_pairs(
    links: Vec<(StreamLink, bool)>,
    policy: Policy,
    capacity: usize,
    single_copy: Option<usize>,
    deadline: Instant,
) -> Result<Vec<Box<dyn Link>>, TransportError> {
    let capacity = capacity.max(MIN_CAPACITY);
    let mut offered = Vec::new();
    let mut answering = Vec::new();
    for (i, (mut link, offers)) in links.into_iter().enumerate() {
        if offers {
            let created = handshake::offer(&mut link, policy, capacity, deadline)?;
            offered.push((i, link, created));
        } else {
            answering.push((i, link));
        }
    }
    let mut out: Vec<(usize, Box<dyn Link>)> = Vec::new();
    for (i, link) in answering {
        out.push((
            i,
            handshake::answer(link, policy, capacity, single_copy, deadline)?,
        ));
    }
    for (i, link, created) in offered {
        let l = handshake::read_answer(link, created, policy, capacity, single_copy, deadline)?;
        out.push((i, l));
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, l)| l).collect())
}

/// Shared-memory links between two threads of this process: `(a, b)` where
/// `a` talks to rank `b_rank` and `b` to rank `a_rank`, with a Unix socket
/// pair as doorbell. The segment is anonymous (a memfd, mapped twice).
pub fn pair(
    a_rank: usize,
    b_rank: usize,
    capacity: usize,
) -> Result<(ShmLink, ShmLink), TransportError> {
    let capacity = capacity.max(MIN_CAPACITY);
    let len = HEADER_LEN + 2 * capacity;
    let fd = rustix::fs::memfd_create("oxccl-shm", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| TransportError::io("creating an in-process segment", e.into()))?;
    rustix::fs::ftruncate(&fd, len as u64)
        .map_err(|e| TransportError::io("sizing an in-process segment", e.into()))?;
    let map_a = Mapping::map(fd.as_fd(), len)?;
    let map_b = Mapping::map(fd.as_fd(), len)?;
    map_a.publish_source(0);
    map_b.publish_source(1);
    let (sa, sb) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| TransportError::io("creating a socket pair", e))?;
    let a = ShmLink::new(
        b_rank,
        map_a,
        capacity,
        0,
        StreamLink::unix(b_rank, sa)?,
        "memfd",
    );
    let b = ShmLink::new(
        a_rank,
        map_b,
        capacity,
        1,
        StreamLink::unix(a_rank, sb)?,
        "memfd",
    );
    Ok((a, b))
}
