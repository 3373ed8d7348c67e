//! The message-level interface the engine drives: register memory, post a
//! send of a buffer, post a receive into a buffer, test for completion.
//!
//! This is the shape RDMA works in (NCCL's network plugins, UCX's
//! nonblocking tag operations, verbs work requests), and the one every link
//! offers the engine. A posted operation owns the memory it was posted with
//! until the link reports it done: an [`Outgoing`] holds its payload and an
//! [`Incoming`] its destination for their lifetime `'b`, so the borrow
//! checker keeps the caller from touching that memory while a link (or a
//! peer reading it in place) may still use it, and the caller gets its
//! exclusive slices back only from a completed operation
//! ([`Outgoing::take_payload`], [`Incoming::take_buffers`]). An operation
//! abandoned before completion is taken back with
//! [`Endpoint::withdraw`] before it is dropped, so its memory may be
//! reused at once.
//!
//! Every byte stream ([`Link`]: TCP, Unix socket pairs, shared-memory
//! rings, the fault-injecting link) is a message link: the blanket
//! implementation here frames each message as a [`FrameHeader`] and its
//! payload, keeping the framing state in the operation itself, and checks a
//! received header before any payload byte reaches the caller's memory. A
//! link that works in messages of its own (UCX) implements [`MessageLink`]
//! directly, with its request handle in [`Outgoing::slot`].
//!
//! Links differ in what they can do beyond moving messages; the caller asks
//! through [`Endpoint::capabilities`] instead of calling hooks that most
//! links ignore, and a send says whether the peer may read it in place
//! ([`Outgoing::set_single_copy`]).

use std::io::{IoSlice, IoSliceMut};

use smallvec::SmallVec;

use oxccl_memory::{DevMut, DevRef, MemoryKind};

use crate::TransportError;
use crate::link::{Capabilities, Endpoint, Link};
use crate::wire::FrameHeader;

const HDR: usize = FrameHeader::LEN;

/// Frames of at least this many bytes, header included, end a record on a
/// byte stream that has them ([`Link::set_record_ends`]): one 64 KiB GSO
/// packet, past which a frame's short tail would otherwise wait for the
/// packets before it to leave the host.
pub const RECORD_MIN: usize = 64 << 10;

/// The most slices one write or read hands the operating system.
const IOV: usize = 8;

/// Memory lent to a posted operation.
#[derive(Debug)]
pub enum Lent<'b> {
    /// Memory the caller only reads during the operation (an input
    /// buffer); a send's only.
    Shared(&'b [u8]),
    /// Memory the caller uses again once the operation is done (an output
    /// range that later frames reduce into or send from): given back by
    /// [`Outgoing::take_payload`] and [`Incoming::take_buffers`].
    Exclusive(&'b mut [u8]),
    /// A buffer the operation owns while in flight (a staging buffer),
    /// of which the first `len` bytes are the message's; given back the
    /// same way, `buf` unchanged in length.
    Owned {
        /// The buffer.
        buf: Vec<u8>,
        /// How many of its bytes the message covers.
        len: usize,
    },
    /// Memory reached only by address (a device buffer's range), read
    /// during the operation. Only links whose capabilities list its kind
    /// ([`Capabilities::by_address`](crate::Capabilities::by_address)) take
    /// it; no byte of it is read by the CPU here.
    Device(DevRef<'b>),
    /// Memory reached only by address, lent exclusively (a receive's
    /// destination, or an output range a send reads), given back as
    /// [`Lent::Exclusive`] is.
    DeviceMut(DevMut<'b>),
}

impl Lent<'_> {
    /// The lent bytes as the CPU reads them: host memory, including host
    /// memory reached by address; empty for device memory, which only a
    /// link that moves it reaches ([`Lent::device`]).
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        match self {
            Lent::Shared(b) => b,
            Lent::Exclusive(b) => b,
            Lent::Owned { buf, len } => buf.get(..*len).unwrap_or_default(),
            Lent::Device(r) => r.host().unwrap_or_default(),
            Lent::DeviceMut(r) => r.host().unwrap_or_default(),
        }
    }

    /// The lent bytes, writable; `None` for [`Lent::Shared`], [`Lent::Device`]
    /// and device memory.
    #[inline]
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        match self {
            Lent::Shared(_) | Lent::Device(_) => None,
            Lent::DeviceMut(r) => r.host_mut(),
            Lent::Exclusive(b) => Some(b),
            Lent::Owned { buf, len } => buf.get_mut(..*len),
        }
    }

    /// The lent length in bytes, wherever the memory is.
    #[inline]
    pub fn len(&self) -> usize {
        match self {
            Lent::Device(r) => r.len(),
            Lent::DeviceMut(r) => r.len(),
            _ => self.bytes().len(),
        }
    }

    /// Whether nothing is lent.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Memory reached by address: its address, length and kind; `None` for
    /// host memory the CPU reads.
    #[inline]
    pub fn device(&self) -> Option<(usize, usize, MemoryKind)> {
        match self {
            Lent::Device(r) => Some((r.addr(), r.len(), r.kind())),
            Lent::DeviceMut(r) => Some((r.addr(), r.len(), r.kind())),
            _ => None,
        }
    }

    /// Whether the memory is what it says: an owned buffer holds its `len`.
    #[inline]
    fn valid(&self) -> bool {
        match self {
            Lent::Owned { buf, len } => *len <= buf.len(),
            _ => true,
        }
    }
}

/// Refuses memory reached by address among `parts` unless the stream says
/// it takes that kind ([`Capabilities::by_address`]: host memory, which it
/// reads and writes as any other).
fn refuse_by_address(
    parts: &[Lent<'_>],
    takes: Capabilities,
    peer: usize,
) -> Result<(), TransportError> {
    match parts.iter().find_map(|p| p.device().map(|(_, _, k)| k)) {
        Some(kind) if kind != MemoryKind::Host || !takes.by_address.contains(kind) => {
            Err(TransportError::Protocol {
                peer,
                reason: format!(
                    "a stream link was handed {kind} memory by address; only links that move \
                     it themselves (UCX) take it"
                ),
            })
        }
        _ => Ok(()),
    }
}

/// The memory of one operation, in order: most often one piece, kept
/// inline.
pub type Parts<'b> = SmallVec<[Lent<'b>; 1]>;

/// Where a send or receive stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// In flight: the link still holds the operation's memory.
    Pending,
    /// Done: the link no longer touches the operation's memory.
    Done,
}

/// A message to send: a frame header and a payload lent for `'b`.
#[derive(Debug)]
pub struct Outgoing<'b> {
    header: [u8; HDR],
    payload: Parts<'b>,
    len: usize,
    /// The payload disagrees with the header ([`Outgoing::check`]).
    bad: bool,
    single_copy: bool,
    /// Stream framing: bytes written so far, header included.
    moved: usize,
    /// A link's own handle on the posted operation (a request), for links
    /// that post messages natively; untouched by byte streams.
    pub slot: u64,
}

impl<'b> Outgoing<'b> {
    /// A message of `header` whose payload is `payload`, in order.
    ///
    /// The payload's length must be `header.len`: a mismatch is the caller's
    /// bug, reported as [`TransportError::Protocol`] when the send is posted
    /// ([`Outgoing::check`]). Building a message never fails, so that it is
    /// built where it is kept, without a copy.
    #[inline]
    pub fn new(header: &FrameHeader, payload: Parts<'b>) -> Outgoing<'b> {
        let mut m = Outgoing::empty();
        let filled = m.fill(header, |p| {
            *p = payload;
            Ok::<_, std::convert::Infallible>(true)
        });
        debug_assert!(matches!(filled, Ok(true)));
        m
    }

    /// An operation that carries no message yet, for [`Outgoing::fill`].
    #[inline]
    pub fn empty() -> Outgoing<'b> {
        Outgoing {
            header: [0; HDR],
            payload: Parts::new(),
            len: 0,
            bad: false,
            single_copy: false,
            moved: 0,
            slot: 0,
        }
    }

    /// Makes this operation, empty or done with its payload taken back
    /// ([`Outgoing::take_payload`]), the message of `header`, whose payload
    /// `lend` appends to the empty list it is given. A caller that sends one
    /// message after another keeps one operation and refills it, instead of
    /// building and moving one per message. When `lend` returns false or
    /// an error (the memory is not available now), the operation is left
    /// empty. Checked as [`Outgoing::new`] is.
    #[inline]
    pub fn fill<E>(
        &mut self,
        header: &FrameHeader,
        lend: impl FnOnce(&mut Parts<'b>) -> Result<bool, E>,
    ) -> Result<bool, E> {
        self.payload.clear();
        self.len = 0;
        match lend(&mut self.payload) {
            Ok(true) => {}
            other => {
                self.payload.clear();
                return other;
            }
        }
        let len: usize = self.payload.iter().map(Lent::len).sum();
        self.bad = len != header.len as usize || !self.payload.iter().all(Lent::valid);
        self.header = header.encode();
        self.len = len;
        self.single_copy = false;
        self.moved = 0;
        self.slot = 0;
        Ok(true)
    }

    /// The error of a send whose payload disagrees with its header (the
    /// caller's bug), which every link reports when it is posted.
    #[inline]
    pub fn check(&self, peer: usize) -> Result<(), TransportError> {
        if !self.bad {
            return Ok(());
        }
        let said = u32::from_le_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ]);
        Err(TransportError::Protocol {
            peer,
            reason: format!(
                "a send of {} bytes under a header that says {said}",
                self.len
            ),
        })
    }

    /// Lets (or forbids) the link have the peer read the payload in place.
    /// The caller decides per message: a single copy halves the bytes
    /// copied, but puts all the copying on the reader.
    #[inline]
    pub fn set_single_copy(&mut self, allowed: bool) {
        self.single_copy = allowed;
    }

    /// The payload's length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the payload is empty (a header alone).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How far the send got, as the link counts (bytes, header included,
    /// for byte streams): a hint for the caller's idle policy that bytes
    /// moved although the send is not done. Links that cannot tell keep
    /// it at 0 until the send is done.
    #[inline]
    pub fn moved(&self) -> usize {
        self.moved
    }

    /// The memory the payload is lent from, in order (for links that post
    /// it natively, and to register it).
    #[inline]
    pub fn payload(&self) -> &[Lent<'b>] {
        &self.payload
    }

    /// The payload's memory, for a link that posts it by address (UCX).
    #[cfg(feature = "ucx")]
    #[inline]
    pub(crate) fn payload_mut(&mut self) -> &mut [Lent<'b>] {
        &mut self.payload
    }

    /// The encoded header (for links that post messages natively).
    #[cfg(feature = "ucx")]
    #[inline]
    pub(crate) fn header_bytes(&self) -> &[u8; HDR] {
        &self.header
    }

    /// Marks the send done, as far as [`Outgoing::moved`] tells.
    #[cfg(feature = "ucx")]
    #[inline]
    pub(crate) fn set_moved(&mut self, n: usize) {
        self.moved = n;
    }

    /// The lent memory, back from a completed send, leaving it empty.
    #[inline]
    pub fn take_payload(&mut self) -> Parts<'b> {
        self.len = 0;
        std::mem::take(&mut self.payload)
    }

    /// The encoded header and the payload from byte `from` of the framed
    /// message on, as at most [`IOV`] slices.
    fn slices(&self, from: usize) -> SmallVec<[IoSlice<'_>; IOV]> {
        let mut out = SmallVec::new();
        if from < HDR {
            out.push(IoSlice::new(&self.header[from..]));
        }
        let mut skip = from.saturating_sub(HDR);
        for p in &self.payload {
            let b = p.bytes();
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            out.push(IoSlice::new(&b[skip..]));
            skip = 0;
            if out.len() == IOV {
                break;
            }
        }
        out
    }
}

/// A message to receive: the header it must carry and the memory its
/// payload goes to, lent for `'b`.
#[derive(Debug)]
pub struct Incoming<'b> {
    expect: FrameHeader,
    into: Parts<'b>,
    len: usize,
    /// The memory disagrees with the header ([`Incoming::check`]).
    bad: bool,
    /// The payload may land before the header is checked: the memory is
    /// the caller's scratch, whose bytes count only once the message is
    /// complete.
    scratch: bool,
    header: [u8; HDR],
    /// Stream framing: bytes read so far, header included.
    moved: usize,
    /// A link's own handle on the posted operation, as [`Outgoing::slot`].
    pub slot: u64,
}

impl<'b> Incoming<'b> {
    /// A receive of the message `expect`, its payload going to `into`, in
    /// order. No payload byte reaches `into` before the received header is
    /// found equal to `expect`. Memory that disagrees with `expect.len` is
    /// reported when the receive is posted ([`Incoming::check`]).
    #[inline]
    pub fn new(expect: FrameHeader, into: Parts<'b>) -> Incoming<'b> {
        let mut m = Incoming::empty();
        let filled = m.fill(expect, |p| {
            *p = into;
            Ok::<_, std::convert::Infallible>(true)
        });
        debug_assert!(matches!(filled, Ok(true)));
        m
    }

    /// A receive that expects nothing yet, for [`Incoming::fill`].
    #[inline]
    pub fn empty() -> Incoming<'b> {
        Incoming {
            expect: FrameHeader::default(),
            into: Parts::new(),
            len: 0,
            bad: false,
            scratch: false,
            header: [0; HDR],
            moved: 0,
            slot: 0,
        }
    }

    /// Makes this receive, empty or done with its memory taken back
    /// ([`Incoming::take_buffers`]), the receive of a message of `expect`
    /// into the memory `lend` appends to the empty list it is given; as
    /// [`Outgoing::fill`] (left empty when `lend` returns false or an
    /// error), checked as [`Incoming::new`] is. Not a scratch receive until
    /// [`Incoming::set_scratch`].
    #[inline]
    pub fn fill<E>(
        &mut self,
        expect: FrameHeader,
        lend: impl FnOnce(&mut Parts<'b>) -> Result<bool, E>,
    ) -> Result<bool, E> {
        self.into.clear();
        self.len = 0;
        match lend(&mut self.into) {
            Ok(true) => {}
            other => {
                self.into.clear();
                return other;
            }
        }
        let len: usize = self.into.iter().map(Lent::len).sum();
        let writable = self
            .into
            .iter()
            .all(|p| p.valid() && !matches!(p, Lent::Shared(_) | Lent::Device(_)));
        self.expect = expect;
        self.len = len;
        self.bad = len != expect.len as usize || !writable;
        self.scratch = false;
        self.moved = 0;
        self.slot = 0;
        Ok(true)
    }

    /// The error of a receive whose memory disagrees with the expected
    /// header, or is not writable (the caller's bug), which every link
    /// reports when it is posted.
    #[inline]
    pub fn check(&self, peer: usize) -> Result<(), TransportError> {
        if !self.bad {
            return Ok(());
        }
        Err(TransportError::Protocol {
            peer,
            reason: format!(
                "a receive into {} bytes (all writable: {}) of a message of {}",
                self.len,
                self.into
                    .iter()
                    .all(|p| !matches!(p, Lent::Shared(_) | Lent::Device(_))),
                self.expect.len
            ),
        })
    }

    /// Marks `into` as the caller's scratch: payload bytes may land in it
    /// before the header is checked, which lets a byte stream read a small
    /// message with its header in one call.
    #[inline]
    pub fn set_scratch(&mut self) {
        self.scratch = true;
    }

    /// The header this receive expects.
    pub fn expected(&self) -> &FrameHeader {
        &self.expect
    }

    /// The payload's length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the payload is empty (a header alone).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How far the receive got, as [`Outgoing::moved`].
    #[inline]
    pub fn moved(&self) -> usize {
        self.moved
    }

    /// The memory the payload goes to, in order.
    #[inline]
    pub fn buffers(&self) -> &[Lent<'b>] {
        &self.into
    }

    /// The memory the payload goes to, writable (for links that post
    /// receives natively).
    #[cfg(feature = "ucx")]
    #[inline]
    pub(crate) fn buffers_mut(&mut self) -> &mut [Lent<'b>] {
        &mut self.into
    }

    /// Checks a received header (as the encoded bytes `got`) against the
    /// expected one, keeping it; sets [`Incoming::moved`] to `moved`.
    #[cfg(feature = "ucx")]
    #[inline]
    pub(crate) fn check_received(
        &mut self,
        got: &[u8; HDR],
        moved: usize,
        peer: usize,
    ) -> Result<(), TransportError> {
        self.header = *got;
        self.moved = moved;
        self.check_header(peer)
    }

    /// Sets [`Incoming::moved`] (for links that post receives natively).
    #[cfg(feature = "ucx")]
    #[inline]
    pub(crate) fn set_moved(&mut self, n: usize) {
        self.moved = n;
    }

    /// The memory, back from a completed (or abandoned) receive, leaving
    /// the receive without memory.
    #[inline]
    pub fn take_buffers(&mut self) -> Parts<'b> {
        self.len = 0;
        std::mem::take(&mut self.into)
    }

    /// Checks the header once it is all here.
    #[inline]
    fn check_header(&self, peer: usize) -> Result<(), TransportError> {
        // The encoding is canonical (every byte is a field's): equal bytes
        // are an equal header, checked without decoding on every frame.
        if self.header == self.expect.encode() {
            return Ok(());
        }
        let got = FrameHeader::parse(&self.header).map_err(|e| TransportError::Protocol {
            peer,
            reason: e.to_string(),
        })?;
        if got != self.expect {
            return Err(TransportError::Unexpected {
                peer,
                expected: Box::new(self.expect),
                got: Box::new(got),
            });
        }
        Ok(())
    }
}

/// One connection to one peer, in messages.
///
/// The waiting, withdrawing and shutting down that every link offers are
/// its [`Endpoint`]. A send or receive is posted once ([`post_send`](Self::post_send),
/// [`post_recv`](Self::post_recv)) and then tested until it reports
/// [`Status::Done`]; neither call blocks. Messages to one peer arrive in the
/// order posted, and each side posts one send and one receive at a time per
/// link. Between posting and completion the operation holds its memory; the
/// caller keeps the operation alive (and its memory with it) until the link
/// is done with it or has [withdrawn](Endpoint::withdraw) it.
pub trait MessageLink: Endpoint {
    /// Makes `mem` ready to be posted from or into, before the first post
    /// that uses it. RDMA links pin and register it with the adapter (and
    /// keep a cache by address, as registration is costly); byte streams
    /// need nothing.
    fn register(&mut self, _mem: &[u8]) -> Result<(), TransportError> {
        Ok(())
    }

    /// Posts a send, moving what can move now.
    fn post_send(&mut self, m: &mut Outgoing<'_>) -> Result<Status, TransportError>;

    /// Moves a posted send on; `Done` once the link no longer reads its payload.
    fn test_send(&mut self, m: &mut Outgoing<'_>) -> Result<Status, TransportError>;

    /// Posts a receive, moving what can move now.
    ///
    /// A message whose header differs from the expected one is
    /// [`TransportError::Unexpected`], and none of its payload reaches the
    /// receive's memory (unless that is [scratch](Incoming::set_scratch)).
    fn post_recv(&mut self, m: &mut Incoming<'_>) -> Result<Status, TransportError>;

    /// Moves a posted receive on; `Done` once its payload is all in place.
    fn test_recv(&mut self, m: &mut Incoming<'_>) -> Result<Status, TransportError>;
}

/// Every byte stream carries messages, each framed as its header and its
/// payload. The framing state lives in the operations, so the stream needs
/// none of its own.
impl<L: Link + ?Sized> MessageLink for L {
    #[inline]
    fn post_send(&mut self, m: &mut Outgoing<'_>) -> Result<Status, TransportError> {
        m.check(self.peer())?;
        refuse_by_address(&m.payload, self.capabilities(), self.peer())?;
        self.allow_single_copy(m.single_copy);
        self.set_record_ends(HDR + m.len >= RECORD_MIN);
        MessageLink::test_send(self, m)
    }

    #[inline]
    fn test_send(&mut self, m: &mut Outgoing<'_>) -> Result<Status, TransportError> {
        let total = HDR + m.len;
        while m.moved < total {
            let n = match m.payload.as_slice() {
                // One piece (most messages): no list to build.
                [] => self.try_write(&[IoSlice::new(&m.header[m.moved..])])?,
                [p] if m.moved < HDR => {
                    self.try_write(&[IoSlice::new(&m.header[m.moved..]), IoSlice::new(p.bytes())])?
                }
                [p] => self.try_write(&[IoSlice::new(&p.bytes()[m.moved - HDR..])])?,
                _ => self.try_write(&m.slices(m.moved))?,
            };
            if n == 0 {
                return Ok(Status::Pending);
            }
            m.moved += n;
        }
        Ok(Status::Done)
    }

    #[inline]
    fn post_recv(&mut self, m: &mut Incoming<'_>) -> Result<Status, TransportError> {
        m.check(self.peer())?;
        refuse_by_address(&m.into, self.capabilities(), self.peer())?;
        MessageLink::test_recv(self, m)
    }

    #[inline]
    fn test_recv(&mut self, m: &mut Incoming<'_>) -> Result<Status, TransportError> {
        let total = HDR + m.len;
        while m.moved < total {
            let before = m.moved;
            let n = if before < HDR && !m.scratch {
                // The caller's own memory: the header alone first.
                self.try_read(&mut [IoSliceMut::new(&mut m.header[before..])])?
            } else if let [p] = m.into.as_mut_slice() {
                // One piece (most messages): no list to build.
                let p = p.bytes_mut().unwrap_or_default();
                if before < HDR {
                    self.try_read(&mut [
                        IoSliceMut::new(&mut m.header[before..]),
                        IoSliceMut::new(p),
                    ])?
                } else {
                    self.try_read(&mut [IoSliceMut::new(&mut p[before - HDR..])])?
                }
            } else {
                let mut iov: SmallVec<[IoSliceMut<'_>; IOV]> = SmallVec::new();
                if before < HDR {
                    iov.push(IoSliceMut::new(&mut m.header[before..]));
                }
                let mut skip = before.saturating_sub(HDR);
                for p in m.into.iter_mut() {
                    let Some(p) = p.bytes_mut() else { continue };
                    if skip >= p.len() {
                        skip -= p.len();
                        continue;
                    }
                    iov.push(IoSliceMut::new(&mut p[skip..]));
                    skip = 0;
                    if iov.len() == IOV {
                        break;
                    }
                }
                self.try_read(&mut iov)?
            };
            if n == 0 {
                return Ok(Status::Pending);
            }
            m.moved += n;
            if before < HDR && m.moved >= HDR {
                m.check_header(self.peer())?;
            }
        }
        Ok(Status::Done)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;
    use smallvec::smallvec;

    use super::*;
    use crate::fault::{self, Faults};
    use crate::wire::Tag;

    fn header(step: u32, len: usize) -> FrameHeader {
        FrameHeader {
            tag: Tag {
                seq: 9,
                step,
                slice: 1,
            },
            len: len as u32,
            descriptor: [3; 16],
        }
    }

    fn faulty(max_chunk: usize, capacity: usize, seed: u64) -> Faults {
        Faults {
            max_chunk,
            stall_one_in: 3,
            capacity,
            seed,
            ..Faults::default()
        }
    }

    proptest! {
        /// Messages whose payloads are lent in several pieces arrive whole
        /// and in order into receives cut differently, over a stream that
        /// moves a few bytes per call, stalls and fills up.
        #[test]
        fn pieces_arrive_whole_over_a_faulty_stream(
            lens in prop::collection::vec(0usize..300, 1..6),
            cut in 1usize..64,
            chunk in 1usize..50,
            capacity in 1usize..200,
            seed in any::<u64>(),
        ) {
            let (mut a, mut b) = fault::pair(0, 1, faulty(chunk, capacity, seed), faulty(chunk, capacity, !seed)).unwrap();
            let sent: Vec<Vec<u8>> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect())
                .collect();
            let mut got: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0xEE; n]).collect();
            for (i, (data, out)) in sent.iter().zip(got.iter_mut()).enumerate() {
                let h = header(i as u32, data.len());
                let (x, y) = data.split_at(data.len().min(cut));
                let mut tx = Outgoing::new(&h, smallvec![Lent::Shared(x), Lent::Shared(y)]);
                let half = out.len() / 2;
                let (p, q) = out.split_at_mut(half);
                let mut rx = Incoming::new(h, smallvec![Lent::Exclusive(p), Lent::Exclusive(q)]);
                let mut s = a.post_send(&mut tx).unwrap();
                let mut r = b.post_recv(&mut rx).unwrap();
                let mut turns = 0;
                while s == Status::Pending || r == Status::Pending {
                    turns += 1;
                    prop_assert!(turns < 100_000, "no progress");
                    if s == Status::Pending {
                        s = a.test_send(&mut tx).unwrap();
                    }
                    if r == Status::Pending {
                        r = b.test_recv(&mut rx).unwrap();
                    }
                }
            }
            prop_assert_eq!(got, sent);
        }
    }

    /// Frames of at least one GSO packet end a record on the stream; smaller
    /// ones may share segments with what follows.
    #[test]
    fn large_frames_end_records_and_small_ones_do_not() {
        let (mut a, mut b) = fault::pair(0, 1, Faults::default(), Faults::default()).unwrap();
        assert_eq!(a.record_ends(), None);
        let data = vec![3u8; RECORD_MIN];
        for (len, ends) in [
            (100, false),
            (RECORD_MIN - HDR - 1, false),
            (RECORD_MIN - HDR, true),
            (0, false),
            (RECORD_MIN, true),
        ] {
            let h = header(1, len);
            let mut tx = Outgoing::new(&h, smallvec![Lent::Shared(&data[..len])]);
            let mut out = vec![0u8; len];
            let mut rx = Incoming::new(h, smallvec![Lent::Exclusive(&mut out)]);
            let mut s = a.post_send(&mut tx).unwrap();
            assert_eq!(a.record_ends(), Some(ends), "{len} bytes");
            let mut r = b.post_recv(&mut rx).unwrap();
            while s == Status::Pending || r == Status::Pending {
                s = a.test_send(&mut tx).unwrap();
                r = b.test_recv(&mut rx).unwrap();
            }
            drop(rx);
            assert_eq!(out, data[..len]);
        }
    }

    #[test]
    fn a_wrong_header_leaves_the_receivers_memory_untouched() {
        let (mut a, mut b) = fault::pair(0, 1, Faults::default(), Faults::default()).unwrap();
        let data = [7u8; 100];
        let mut tx = Outgoing::new(&header(5, 100), smallvec![Lent::Shared(&data)]);
        assert_eq!(a.post_send(&mut tx).unwrap(), Status::Done);
        let mut out = [0u8; 100];
        let mut rx = Incoming::new(header(4, 100), smallvec![Lent::Exclusive(&mut out)]);
        match b.post_recv(&mut rx) {
            Err(TransportError::Unexpected {
                peer: 0,
                expected,
                got,
            }) => {
                assert_eq!(expected.tag.step, 4);
                assert_eq!(got.tag.step, 5);
            }
            other => panic!("{other:?}"),
        }
        drop(rx);
        assert_eq!(out, [0u8; 100], "payload bytes reached the caller's memory");
    }

    #[test]
    fn scratch_takes_the_payload_with_the_header() {
        let (mut a, mut b) = fault::pair(0, 1, Faults::default(), Faults::default()).unwrap();
        let data = [9u8; 10];
        let mut tx = Outgoing::new(&header(1, 10), smallvec![Lent::Shared(&data)]);
        a.post_send(&mut tx).unwrap();
        let mut rx = Incoming::new(
            header(1, 10),
            smallvec![Lent::Owned {
                buf: vec![0; 64],
                len: 10
            }],
        );
        rx.set_scratch();
        assert_eq!(b.post_recv(&mut rx).unwrap(), Status::Done);
        let back = rx.take_buffers();
        assert!(
            matches!(&back[0], Lent::Owned { buf, len: 10 } if buf.len() == 64 && buf[..10] == data)
        );
    }

    #[test]
    fn sizes_that_disagree_with_the_header_are_refused_when_posted() {
        let (mut a, mut b) = fault::pair(0, 1, Faults::default(), Faults::default()).unwrap();
        let data = [0u8; 8];
        let refused = |r: Result<Status, TransportError>| {
            assert!(matches!(r, Err(TransportError::Protocol { .. })), "{r:?}")
        };
        refused(a.post_send(&mut Outgoing::new(
            &header(0, 9),
            smallvec![Lent::Shared(&data)],
        )));
        let over = Lent::Owned {
            buf: vec![0; 4],
            len: 8,
        };
        refused(a.post_send(&mut Outgoing::new(&header(0, 8), smallvec![over])));
        // A receive cannot write into shared memory.
        refused(b.post_recv(&mut Incoming::new(
            header(0, 8),
            smallvec![Lent::Shared(&data)],
        )));
        let mut out = [0u8; 8];
        refused(b.post_recv(&mut Incoming::new(
            header(0, 7),
            smallvec![Lent::Exclusive(&mut out)],
        )));
        // Nothing went: a good message after them arrives alone.
        let mut tx = Outgoing::new(&header(1, 8), smallvec![Lent::Shared(&data)]);
        assert_eq!(a.post_send(&mut tx).unwrap(), Status::Done);
        let mut got = [1u8; 8];
        let mut rx = Incoming::new(header(1, 8), smallvec![Lent::Exclusive(&mut got)]);
        assert_eq!(b.post_recv(&mut rx).unwrap(), Status::Done);
    }

    /// One operation of each kind, refilled, carries message after message;
    /// a lend that declines (or fails) leaves it empty and sends nothing.
    #[test]
    fn refilled_operations_carry_one_message_after_another() {
        let (mut a, mut b) = fault::pair(0, 1, faulty(7, 64, 3), faulty(7, 64, 4)).unwrap();
        // The memory outlives the operations that borrow it in turn.
        let sent: Vec<Vec<u8>> = (0..5u32)
            .map(|step| (0..step * 10).map(|i| (i + step) as u8).collect())
            .collect();
        let mut got: Vec<Vec<u8>> = sent.iter().map(|d| vec![0xEE; d.len()]).collect();
        let last = [1u8; 3];
        let mut last_got = [0u8; 3];
        let mut tx = Outgoing::empty();
        let mut rx = Incoming::empty();
        assert_eq!(tx.fill(&header(0, 4), |_| Ok::<_, ()>(false)), Ok(false));
        assert!(tx.is_empty() && tx.payload().is_empty());
        assert_eq!(
            rx.fill(header(0, 4), |into| {
                into.push(Lent::Owned {
                    buf: vec![0; 4],
                    len: 4,
                });
                Err(())
            }),
            Err(())
        );
        assert!(rx.is_empty() && rx.buffers().is_empty());
        for (step, (data, got)) in sent.iter().zip(got.iter_mut()).enumerate() {
            let h = header(step as u32, data.len());
            assert_eq!(
                tx.fill(&h, |p| {
                    p.push(Lent::Shared(data));
                    Ok::<_, ()>(true)
                }),
                Ok(true)
            );
            assert_eq!(
                rx.fill(h, |p| {
                    p.push(Lent::Exclusive(got));
                    Ok::<_, ()>(true)
                }),
                Ok(true)
            );
            let mut s = a.post_send(&mut tx).unwrap();
            let mut r = b.post_recv(&mut rx).unwrap();
            while s == Status::Pending || r == Status::Pending {
                if s == Status::Pending {
                    s = a.test_send(&mut tx).unwrap();
                }
                if r == Status::Pending {
                    r = b.test_recv(&mut rx).unwrap();
                }
            }
            assert_eq!(tx.take_payload().len(), 1);
            assert_eq!(rx.take_buffers().len(), 1);
        }
        // A refilled receive still checks the header it now expects.
        tx.fill(&header(9, 3), |p| {
            p.push(Lent::Shared(&last));
            Ok::<_, ()>(true)
        })
        .unwrap();
        a.post_send(&mut tx).unwrap();
        rx.fill(header(8, 3), |p| {
            p.push(Lent::Exclusive(&mut last_got));
            Ok::<_, ()>(true)
        })
        .unwrap();
        let mut r = b.post_recv(&mut rx);
        while matches!(r, Ok(Status::Pending)) {
            let _ = a.test_send(&mut tx);
            r = b.test_recv(&mut rx);
        }
        assert!(matches!(r, Err(TransportError::Unexpected { .. })), "{r:?}");
        drop((tx, rx));
        assert_eq!(got, sent);
        assert_eq!(last_got, [0; 3], "a wrong header's payload landed");
    }

    #[test]
    fn a_closed_peer_fails_a_receive_in_flight() {
        let (a, mut b) = fault::pair(0, 1, Faults::default(), Faults::default()).unwrap();
        let mut out = [0u8; 8];
        let mut rx = Incoming::new(header(0, 8), smallvec![Lent::Exclusive(&mut out)]);
        assert_eq!(b.post_recv(&mut rx).unwrap(), Status::Pending);
        drop(a);
        assert!(matches!(
            b.test_recv(&mut rx),
            Err(TransportError::PeerClosed { peer: 0, .. })
        ));
    }
}
