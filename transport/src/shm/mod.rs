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
//! ([`Link::allow_single_copy`]).
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
//! architecture notes). The invariants it keeps:
//!
//! * A [`Mapping`] owns one `mmap` of `len` bytes, page-aligned, readable and
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
//!   sides). A writer that gives them up before the reader is done (an
//!   abort, a drop) first marks the link shut, and the reader checks that
//!   mark after each copy and discards the copy if it is set, so bytes the
//!   caller may already have reused are never delivered.

use std::cell::Cell;
use std::ffi::CString;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::Instant;

use rustix::fs::Mode;
use rustix::mm::{MapFlags, ProtFlags};

use crate::link::{Direction, ShutdownHandle};
use crate::{Link, StreamLink, TransportError};

/// "oxcclshm": the first word of every segment.
const MAGIC: u64 = u64::from_le_bytes(*b"oxcclshm");
/// Bytes before the first ring: the header and two control blocks, one page.
const HEADER_LEN: usize = 4096;
/// Offset of the control block of direction `d` (0: creator to opener).
const CTRL_OFFSET: [usize; 2] = [256, 512];
/// Offset of the header word that either side sets, non-zero, when it shuts
/// the link down (an abort): from then on both sides fail every write, and
/// every read once the committed bytes (see [`Ctrl::committed`]) are read,
/// whatever else the rings still hold.
const SHUT: usize = 24;
/// A long write (or read) publishes its progress at least this often, so
/// that the other side starts copying out (or refilling) while this side
/// still copies: the two copies of a large frame overlap instead of
/// following each other.
const PUBLISH_BYTES: usize = 64 * 1024;
/// The smallest ring capacity accepted.
pub const MIN_CAPACITY: usize = 4096;

/// The per-direction control block, one cache line per word that a different
/// side writes, so that the writer's and the reader's stores do not share lines.
#[repr(C, align(64))]
struct Ctrl {
    /// Bytes ever written (the writer advances it).
    head: AtomicU64,
    /// Bytes written by completed collectives ([`Link::commit`]): after a
    /// shutdown the reader still gets these, and only these.
    committed: AtomicU64,
    /// Single-copy transfers ever posted by the writer; one is pending while
    /// this differs from the count the reader completed. Its other words are
    /// written before this one (release) and stay put until it completes.
    pull_posted: AtomicU64,
    /// Ring position at which the pending transfer's bytes enter the stream:
    /// the ring bytes before it come first, and the ring holds nothing after.
    pull_at: AtomicU64,
    /// Address of the pending transfer's bytes in the writer's address space.
    pull_addr: AtomicU64,
    /// Its length in bytes.
    pull_len: AtomicU64,
    _pad0: [u8; 16],
    /// Bytes ever read (the reader advances it).
    tail: AtomicU64,
    /// Bytes ever copied by single-copy transfers (the reader advances it).
    pulled: AtomicU64,
    _pad1: [u8; 48],
    /// Non-zero while the reader sleeps (or is about to) waiting for bytes.
    reader_waiting: AtomicU32,
    _pad2: [u8; 60],
    /// Non-zero while the writer sleeps (or is about to) waiting for room.
    writer_waiting: AtomicU32,
    _pad3: [u8; 60],
}

const _: () = assert!(std::mem::size_of::<Ctrl>() == 256);
const _: () = assert!(CTRL_OFFSET[1] + std::mem::size_of::<Ctrl>() <= HEADER_LEN);

/// Offset of the words that describe the writer of direction `d` for
/// single-copy transfers: its process id, the address and value of a token
/// in its memory (the reader's proof that it reads the right process), and
/// the reader's verdict ([`PULLABLE_YES`] or [`PULLABLE_NO`]; 0: not tried).
const SOURCE_OFFSET: [usize; 2] = [1024, 1088];
const SOURCE_PID: usize = 0;
const SOURCE_TOKEN_ADDR: usize = 8;
const SOURCE_TOKEN: usize = 16;
const SOURCE_PULLABLE: usize = 24;
const PULLABLE_YES: u64 = 1;
const PULLABLE_NO: u64 = 2;
const _: () = assert!(SOURCE_OFFSET[1] + 64 <= HEADER_LEN);

/// Writes of at least this many bytes (one buffer of a `try_write`) go by a
/// single copy when the reader may read this process's memory: the writer
/// posts the buffer's address and the reader copies it straight into its
/// own buffer (`process_vm_readv`), instead of one copy into the ring and
/// one out of it.
pub const DEFAULT_SINGLE_COPY_BYTES: usize = 64 * 1024;

/// One shared mapping of a whole segment.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
    /// A random value at a fixed address of this process: a peer that reads
    /// it back through `process_vm_readv` knows it may read our memory.
    token: Box<u64>,
}

// SAFETY: the mapping is plain memory owned by this value; the raw pointer is
// only dereferenced through the methods below, which keep the module's
// invariants, and moving the owner to another thread changes none of them.
unsafe impl Send for Mapping {}
// SAFETY: through a shared reference only the header words are touched, and
// only atomically (`word`, `ctrl`); ring bytes are copied by the one
// `ShmLink` that owns its direction, through `&mut self`. A `ShutdownHandle`
// on another thread only stores the `SHUT` word.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn map(fd: BorrowedFd<'_>, len: usize) -> Result<Mapping, TransportError> {
        // SAFETY: a fresh shared mapping of a file we opened, at an address the
        // kernel chooses; no existing Rust object is affected.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::POPULATE,
                fd,
                0,
            )
        }
        .map_err(|e| TransportError::io("mapping a shared-memory segment", e.into()))?;
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| {
            TransportError::io(
                "mapping a shared-memory segment",
                std::io::Error::other("mmap returned null"),
            )
        })?;
        Ok(Mapping {
            base,
            len,
            token: Box::new(random_u64()),
        })
    }

    /// Publishes this process as the writer of direction `dir`, for the
    /// reader's single-copy probe.
    fn publish_source(&self, dir: usize) {
        let at = SOURCE_OFFSET[dir];
        self.word(at + SOURCE_TOKEN_ADDR)
            .store(&*self.token as *const u64 as u64, Ordering::Relaxed);
        self.word(at + SOURCE_TOKEN)
            .store(*self.token, Ordering::Relaxed);
        self.word(at + SOURCE_PID)
            .store(u64::from(std::process::id()), Ordering::Release);
    }

    /// As the reader of direction `dir`: tries to read the writer's token
    /// from its memory and records the verdict for the writer.
    fn probe_source(&self, dir: usize) -> Result<i32, String> {
        let at = SOURCE_OFFSET[dir];
        let verdict = self.read_token(at);
        self.word(at + SOURCE_PULLABLE).store(
            if verdict.is_ok() {
                PULLABLE_YES
            } else {
                PULLABLE_NO
            },
            Ordering::Release,
        );
        verdict
    }

    /// The writer's process id, once its token is read back.
    fn read_token(&self, at: usize) -> Result<i32, String> {
        let pid = self.word(at + SOURCE_PID).load(Ordering::Acquire);
        if pid == 0 {
            return Err("the writer did not publish its process id".into());
        }
        let pid = i32::try_from(pid).map_err(|_| format!("process id {pid} out of range"))?;
        let addr = self.word(at + SOURCE_TOKEN_ADDR).load(Ordering::Relaxed);
        let want = self.word(at + SOURCE_TOKEN).load(Ordering::Relaxed);
        let mut got = 0u64;
        let local = libc::iovec {
            iov_base: (&mut got as *mut u64).cast(),
            iov_len: 8,
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: 8,
        };
        // SAFETY: `local` describes `got`, 8 writable bytes of ours that live
        // across the call; `remote` is only read, by the kernel, in the other
        // process, which checks its permission and the address.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(format!(
                "process_vm_readv of process {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        if n != 8 || got != want {
            return Err(format!(
                "process {pid} does not hold the token at {addr:#x} (another pid namespace?)"
            ));
        }
        Ok(pid)
    }

    /// The 64-bit word at `offset` (8-aligned, inside the header page).
    fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(offset % 8 == 0 && offset + 8 <= HEADER_LEN.min(self.len));
        // SAFETY: in bounds and aligned (asserted; the base is page-aligned),
        // valid for the lifetime of `self`, and only ever accessed atomically.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn ctrl(&self, dir: usize) -> &Ctrl {
        let offset = CTRL_OFFSET[dir];
        assert!(offset + std::mem::size_of::<Ctrl>() <= self.len);
        // SAFETY: in bounds (asserted), 64-byte aligned (a fixed offset that is
        // a multiple of 64 from a page-aligned base), valid while `self`
        // lives; `Ctrl` holds only atomics and padding, so a shared reference
        // is sound although the peer writes the same words.
        unsafe { &*self.base.as_ptr().add(offset).cast::<Ctrl>() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `map` with this length and no
        // reference into it outlives `self` (they all borrow `self`).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Removes a segment's name when dropped (on every path of the handshake).
struct Unlinker(Option<CString>);

impl Drop for Unlinker {
    fn drop(&mut self) {
        if let Some(name) = self.0.take() {
            let _ = rustix::shm::unlink(name.as_c_str());
        }
    }
}

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
    /// As the reader: transfers finished, and bytes of the current one copied.
    pulls_done: Cell<u64>,
    pull_progress: Cell<usize>,
    /// As the reader: the writer's process id, found by the probe.
    source_pid: Cell<i32>,
    description: String,
}

/// A single-copy transfer the writer posted: the caller's bytes at `addr`,
/// of which the first `reported` were reported written (the reader copied
/// them).
#[derive(Debug, Clone, Copy)]
struct Posted {
    addr: usize,
    len: usize,
    reported: usize,
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

    /// As the reader: checks once whether we may read the writer's memory,
    /// and tells the writer. Logs why not.
    fn probe(&self) {
        let rx = 1 - self.tx;
        match self.map.probe_source(rx) {
            Ok(pid) => self.source_pid.set(pid),
            Err(why) => tracing::debug!(
                "shared-memory link from rank {}: no single copy ({why}); bytes go through the ring",
                self.peer
            ),
        }
    }

    /// Whether the reader said it may read our memory.
    fn may_post(&self) -> bool {
        if self.pullable.get() == 0 {
            let v = self.map.word(SOURCE_OFFSET[self.tx] + SOURCE_PULLABLE);
            self.pullable.set(v.load(Ordering::Acquire));
        }
        self.pullable.get() == PULLABLE_YES
    }

    /// As the writer: reports how many bytes of the posted transfer the
    /// reader copied since the last call; the caller passes the rest of the
    /// transfer's bytes as `bufs[0]`.
    fn poll_posted(&self, posted: Posted, bufs: &[IoSlice<'_>]) -> Result<usize, TransportError> {
        let pulled = self.map.ctrl(self.tx).pulled.load(Ordering::Acquire);
        let new = pulled
            .checked_sub(self.pulled_seen.get())
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n <= posted.len - posted.reported)
            .ok_or_else(|| {
                self.peer_wrote(format!(
                    "its single-copy progress went from {} to {pulled} bytes, \
                     on a transfer of {} bytes of which {} were copied",
                    self.pulled_seen.get(),
                    posted.len,
                    posted.reported
                ))
            })?;
        let first = bufs.iter().find(|b| !b.is_empty());
        let rest_at = posted.addr + posted.reported;
        match first {
            Some(b) if b.as_ptr() as usize == rest_at => {
                let n = new.min(b.len());
                self.pulled_seen.set(self.pulled_seen.get() + n as u64);
                let reported = posted.reported + n;
                self.posted
                    .set((reported < posted.len).then_some(Posted { reported, ..posted }));
                Ok(n)
            }
            _ => Err(TransportError::io(
                format!("writing to rank {}", self.peer),
                std::io::Error::other(format!(
                    "a single-copy write's remaining bytes moved (expected them at {rest_at:#x}): \
                     callers must pass the rest of a partial write again, unchanged, at the same address"
                )),
            )),
        }
    }

    /// As the writer: posts `buf` for the reader to copy, its bytes entering
    /// the stream at ring position `at`.
    fn post(&self, ctrl: &Ctrl, at: u64, buf: &[u8]) {
        ctrl.pull_at.store(at, Ordering::Relaxed);
        ctrl.pull_addr.store(buf.as_ptr() as u64, Ordering::Relaxed);
        ctrl.pull_len.store(buf.len() as u64, Ordering::Relaxed);
        self.posted.set(Some(Posted {
            addr: buf.as_ptr() as usize,
            len: buf.len(),
            reported: 0,
        }));
        let posted = self.pulls_posted.get() + 1;
        self.pulls_posted.set(posted);
        ctrl.pull_posted.store(posted, Ordering::Release);
        fence(Ordering::SeqCst);
        if ctrl.reader_waiting.load(Ordering::Relaxed) != 0 {
            self.ring_doorbell();
        }
    }

    /// As the reader: copies up to the rest of the pending transfer straight
    /// from the writer's memory into `dst` (the unfilled parts of the
    /// caller's buffers), returning how many bytes.
    fn pull(&self, ctrl: &Ctrl, dst: &[libc::iovec]) -> Result<usize, TransportError> {
        // The writer's words, checked every time: they must not move while
        // the transfer is pending, but only the writer keeps that promise.
        let addr = ctrl.pull_addr.load(Ordering::Relaxed);
        let len = ctrl.pull_len.load(Ordering::Relaxed);
        let progress = self.pull_progress.get();
        if len == 0 {
            return Err(self.peer_wrote("it posted an empty single-copy transfer".into()));
        }
        if addr
            .checked_add(len)
            .and_then(|end| usize::try_from(end).ok())
            .is_none()
        {
            return Err(self.peer_wrote(format!(
                "it posted a single-copy transfer of {len} bytes at {addr:#x}, \
                 past the end of the address space"
            )));
        }
        // Both fit in a usize (their sum does), and `progress < len` below.
        let (addr, len) = (addr as usize, len as usize);
        let left = len
            .checked_sub(progress)
            .filter(|&l| l > 0)
            .ok_or_else(|| {
                self.peer_wrote(format!(
                    "it shrank a pending single-copy transfer to {len} bytes \
                     after {progress} were copied"
                ))
            })?;
        let want = dst.iter().map(|v| v.iov_len).sum::<usize>().min(left);
        if want == 0 {
            return Ok(0);
        }
        let remote = libc::iovec {
            iov_base: (addr + progress) as *mut libc::c_void,
            iov_len: want,
        };
        // SAFETY: every `dst` entry describes unfilled bytes of the caller's
        // buffers (exclusively borrowed by `try_read` for this call); the
        // kernel writes at most `want` bytes there. The remote range is only
        // read, in the writer's process, with the kernel's checks: a bad
        // address is an error, never an access in ours.
        let n = unsafe {
            libc::process_vm_readv(
                self.source_pid.get(),
                dst.as_ptr(),
                dst.len() as libc::c_ulong,
                &remote,
                1,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ESRCH) => TransportError::PeerClosed {
                    peer: self.peer,
                    how: "its process is gone (a single-copy transfer found no process)".into(),
                },
                _ => TransportError::io(
                    format!(
                        "copying {want} bytes from rank {} (process {}) by single copy",
                        self.peer,
                        self.source_pid.get()
                    ),
                    e,
                ),
            });
        }
        // The writer's bytes were valid while it had not given up: an abort
        // stores SHUT before its caller may touch them again, so a copy that
        // still sees the link open afterwards copied the bytes it posted.
        fence(Ordering::SeqCst);
        if self.is_shut() {
            return Err(self.shut_error());
        }
        if n == 0 {
            return Err(self.peer_wrote(format!(
                "it posted a single-copy transfer whose bytes at {addr:#x} cannot be read"
            )));
        }
        // The kernel copies at most `want <= left` bytes.
        let n = (n as usize).min(want);
        let pulled = self.pulled_total.get() + n as u64;
        self.pulled_total.set(pulled);
        ctrl.pulled.store(pulled, Ordering::Release);
        if n == left {
            self.pull_progress.set(0);
            self.pulls_done.set(self.pulls_done.get() + 1);
        } else {
            self.pull_progress.set(progress + n);
        }
        fence(Ordering::SeqCst);
        if ctrl.writer_waiting.load(Ordering::Relaxed) != 0 {
            self.ring_doorbell();
        }
        Ok(n)
    }

    /// Bytes of the ring of direction `dir` start here.
    fn data(&self, dir: usize) -> *mut u8 {
        // SAFETY: HEADER_LEN + 2 * capacity == len (checked when mapped), so
        // the start of either ring is inside the mapping.
        unsafe { self.map.base.as_ptr().add(HEADER_LEN + dir * self.capacity) }
    }

    fn closed_error(&self) -> TransportError {
        TransportError::PeerClosed {
            peer: self.peer,
            how: "end of stream on the shared-memory link's socket".into(),
        }
    }

    /// Whether either side shut the link down (see [`SHUT`]).
    fn is_shut(&self) -> bool {
        self.map.word(SHUT).load(Ordering::Acquire) != 0
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

    /// The ring's occupancy `head - tail`, refusing impossible values as the
    /// fault of the peer, which wrote the head (`peer_head`: we read) or the
    /// tail (we write).
    fn used(&self, head: u64, tail: u64, peer_head: bool) -> Result<usize, TransportError> {
        let cap = self.capacity;
        match head.checked_sub(tail) {
            Some(u) if u <= cap as u64 => Ok(u as usize),
            Some(u) => Err(self.peer_wrote(if peer_head {
                format!(
                    "its shared-memory ring head is {u} bytes ahead of the tail, \
                     more than the {cap}-byte ring holds (head {head}, tail {tail})"
                )
            } else {
                format!(
                    "its shared-memory ring tail is {u} bytes behind the head, \
                     more than the {cap}-byte ring holds (head {head}, tail {tail})"
                )
            })),
            None => {
                let d = tail - head;
                Err(self.peer_wrote(if peer_head {
                    format!(
                        "its shared-memory ring head is {d} bytes behind the tail \
                         (head {head}, tail {tail})"
                    )
                } else {
                    format!(
                        "its shared-memory ring tail is {d} bytes ahead of the head \
                         (head {head}, tail {tail})"
                    )
                }))
            }
        }
    }

    /// As the reader: whether the writer's single-copy transfer is pending,
    /// refusing a count that cannot be (at most one is pending) and a
    /// transfer posted although we told the writer we cannot read it.
    fn pending(&self, ctrl: &Ctrl) -> Result<bool, TransportError> {
        let posted = ctrl.pull_posted.load(Ordering::Acquire);
        let done = self.pulls_done.get();
        if posted == done {
            return Ok(false);
        }
        if posted != done.wrapping_add(1) {
            return Err(self.peer_wrote(format!(
                "its count of single-copy transfers posted is {posted}, \
                 but {done} were completed and at most one may be pending"
            )));
        }
        if self.source_pid.get() == 0 {
            return Err(self.peer_wrote(
                "it posted a single-copy transfer, but this rank cannot read its memory \
                 and told it so"
                    .into(),
            ));
        }
        Ok(true)
    }

    /// Makes the bytes written up to `head` visible to the reader, and wakes
    /// it if it sleeps. The fence orders the store before the flag's load
    /// (the eventcount's half on this side; `arm` keeps the other).
    fn publish_head(&self, ctrl: &Ctrl, head: u64) {
        self.head.set(head);
        ctrl.head.store(head, Ordering::Release);
        fence(Ordering::SeqCst);
        if ctrl.reader_waiting.load(Ordering::Relaxed) != 0 {
            self.ring_doorbell();
        }
    }

    /// Gives the bytes read up to `tail` back to the writer, and wakes it if
    /// it sleeps waiting for room.
    fn publish_tail(&self, ctrl: &Ctrl, tail: u64) {
        self.tail.set(tail);
        ctrl.tail.store(tail, Ordering::Release);
        fence(Ordering::SeqCst);
        if ctrl.writer_waiting.load(Ordering::Relaxed) != 0 {
            self.ring_doorbell();
        }
    }

    /// Sends one doorbell byte; a full socket already has bytes pending.
    fn ring_doorbell(&self) {
        match rustix::net::send(
            self.doorbell.fd(),
            &[1u8],
            rustix::net::SendFlags::NOSIGNAL | rustix::net::SendFlags::DONTWAIT,
        ) {
            Ok(_) | Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => self.closed.set(true),
        }
    }

    /// Reads pending doorbell bytes; notes the end of the stream.
    fn drain_doorbell(&self) -> Result<(), TransportError> {
        let mut buf = [0u8; 64];
        loop {
            match rustix::io::read(self.doorbell.fd(), &mut buf) {
                Ok(0) => {
                    self.closed.set(true);
                    return Ok(());
                }
                Ok(_) => continue,
                Err(rustix::io::Errno::AGAIN) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(
                    rustix::io::Errno::CONNRESET
                    | rustix::io::Errno::PIPE
                    | rustix::io::Errno::NOTCONN,
                ) => {
                    self.closed.set(true);
                    return Ok(());
                }
                Err(e) => {
                    return Err(TransportError::io(
                        format!("reading the doorbell of the link to rank {}", self.peer),
                        e.into(),
                    ));
                }
            }
        }
    }
}

impl Link for ShmLink {
    fn peer(&self) -> usize {
        self.peer
    }

    fn try_write(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, TransportError> {
        if self.is_shut() {
            return Err(self.shut_error());
        }
        if let Some(posted) = self.posted.get() {
            // Nothing else enters the stream before the posted bytes. The
            // reader may have copied them all and then left.
            let n = self.poll_posted(posted, bufs)?;
            if n == 0 && self.closed.get() {
                return Err(self.closed_error());
            }
            return Ok(n);
        }
        if self.closed.get() {
            return Err(self.closed_error());
        }
        let ctrl = self.map.ctrl(self.tx);
        let head = self.head.get();
        let mut free = self.capacity - self.used(head, self.tail_seen.get(), false)?;
        let want: usize = bufs.iter().map(|b| b.len()).sum();
        if free < want {
            let tail = ctrl.tail.load(Ordering::Acquire);
            free = self.capacity - self.used(head, tail, false)?;
            self.tail_seen.set(tail);
        }
        if free == 0 {
            return Ok(0);
        }
        let data = self.data(self.tx);
        let mut pos = (head % self.capacity as u64) as usize;
        let mut written = 0usize;
        let mut published = 0usize;
        for b in bufs {
            if b.len() >= self.single_copy_min && self.single_copy_allowed && self.may_post() {
                // Everything before it is in the ring (else `free` ran out
                // and the loop ended): the reader copies this one itself.
                if written > published {
                    self.publish_head(ctrl, head + written as u64);
                }
                self.post(ctrl, head + written as u64, b);
                return Ok(written);
            }
            let mut src: &[u8] = b;
            while !src.is_empty() && free > 0 {
                let n = src
                    .len()
                    .min(free)
                    .min(self.capacity - pos)
                    .min(PUBLISH_BYTES);
                // SAFETY: `pos + n <= capacity`, so the destination lies in
                // this direction's ring; those bytes are outside `tail..head`,
                // i.e. the writer's part, which the reader does not touch
                // until the release store of `head` below; `src` is our own
                // memory and cannot overlap the mapping's ring bytes, which
                // are never handed out as Rust slices.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), data.add(pos), n) };
                src = &src[n..];
                free -= n;
                written += n;
                pos = (pos + n) % self.capacity;
                if written - published >= PUBLISH_BYTES {
                    self.publish_head(ctrl, head + written as u64);
                    published = written;
                }
            }
            if free == 0 {
                break;
            }
        }
        if written > published {
            self.publish_head(ctrl, head + written as u64);
        }
        Ok(written)
    }

    fn try_read(&mut self, bufs: &mut [IoSliceMut<'_>]) -> Result<usize, TransportError> {
        let rx = 1 - self.tx;
        let ctrl = self.map.ctrl(rx);
        let tail = self.tail.get();
        // A posted transfer: its bytes follow the ring's up to `pull_at`,
        // and the ring holds nothing after. The writer published `head` up
        // to there before posting, and moves it no further until the
        // transfer completes: loaded after the count, `head` is `pull_at`.
        let pending = self.pending(ctrl)?;
        let mut head = ctrl.head.load(Ordering::Acquire);
        if pending {
            let at = ctrl.pull_at.load(Ordering::Relaxed);
            if at != head {
                return Err(self.peer_wrote(format!(
                    "it posted a single-copy transfer at ring position {at}, \
                     but its ring head is {head}"
                )));
            }
        }
        let shut = self.is_shut();
        if shut {
            // Like a reset socket, a shut link fails at once, except that the
            // bytes of collectives the writer completed still arrive: the rest
            // (a posted transfer included) belongs to a call it abandoned.
            // `committed` never passes `head` once stored, but may pass the
            // `head` loaded above.
            head = head.min(ctrl.committed.load(Ordering::Acquire));
            if head <= tail {
                return Err(self.shut_error());
            }
        }
        let mut avail = self.used(head, tail, true)?;
        if avail == 0 {
            if pending && !shut {
                let mut dst = [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; 4];
                let mut k = 0;
                for b in bufs.iter_mut().filter(|b| !b.is_empty()).take(dst.len()) {
                    dst[k] = libc::iovec {
                        iov_base: b.as_mut_ptr().cast(),
                        iov_len: b.len(),
                    };
                    k += 1;
                }
                return self.pull(ctrl, &dst[..k]);
            }
            if self.closed.get() {
                return Err(self.closed_error());
            }
            return Ok(0);
        }
        let data = self.data(rx);
        let mut pos = (tail % self.capacity as u64) as usize;
        let mut read = 0usize;
        let mut published = 0usize;
        for b in bufs.iter_mut() {
            let mut dst: &mut [u8] = b;
            while !dst.is_empty() && avail > 0 {
                let n = dst
                    .len()
                    .min(avail)
                    .min(self.capacity - pos)
                    .min(PUBLISH_BYTES);
                // SAFETY: `pos + n <= capacity`, inside the ring of direction
                // `rx`; the bytes lie in `tail..head`, published by the
                // writer's release store that the acquire load above saw, and
                // the writer does not touch them until we advance `tail`.
                unsafe { std::ptr::copy_nonoverlapping(data.add(pos), dst.as_mut_ptr(), n) };
                dst = &mut dst[n..];
                avail -= n;
                read += n;
                pos = (pos + n) % self.capacity;
                if read - published >= PUBLISH_BYTES {
                    self.publish_tail(ctrl, tail + read as u64);
                    published = read;
                }
            }
            if avail == 0 {
                break;
            }
        }
        if read > published {
            self.publish_tail(ctrl, tail + read as u64);
        }
        Ok(read)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.doorbell.fd()
    }

    fn arm(&self, dir: Direction) -> Result<Option<Direction>, TransportError> {
        self.drain_doorbell()?;
        if self.closed.get() || self.is_shut() {
            // Ready: the next try_read/try_write reports it.
            return Ok(None);
        }
        let ready = match dir {
            Direction::Read => {
                let ctrl = self.map.ctrl(1 - self.tx);
                ctrl.reader_waiting.store(1, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                ctrl.head.load(Ordering::Relaxed) != self.tail.get()
                    || ctrl.pull_posted.load(Ordering::Relaxed) != self.pulls_done.get()
            }
            Direction::Write if self.posted.get().is_some() => {
                let ctrl = self.map.ctrl(self.tx);
                ctrl.writer_waiting.store(1, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                ctrl.pulled.load(Ordering::Relaxed) != self.pulled_seen.get()
            }
            Direction::Write => {
                let ctrl = self.map.ctrl(self.tx);
                ctrl.writer_waiting.store(1, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                // Ready unless exactly full: room, or an impossible tail
                // that the next write reports.
                let used = self
                    .head
                    .get()
                    .wrapping_sub(ctrl.tail.load(Ordering::Relaxed));
                used != self.capacity as u64
            }
        };
        if ready {
            self.disarm(dir);
            return Ok(None);
        }
        // Both the peer's doorbell and its end of stream make the socket readable.
        Ok(Some(Direction::Read))
    }

    fn disarm(&self, dir: Direction) {
        // A wake-up may have been the end of the stream: note it now, so the
        // next try_read/try_write reports it instead of spinning first.
        let _ = self.drain_doorbell();
        match dir {
            Direction::Read => self
                .map
                .ctrl(1 - self.tx)
                .reader_waiting
                .store(0, Ordering::Relaxed),
            Direction::Write => self
                .map
                .ctrl(self.tx)
                .writer_waiting
                .store(0, Ordering::Relaxed),
        }
    }

    fn cheap_to_poll(&self) -> bool {
        true
    }

    fn allow_single_copy(&mut self, allowed: bool) {
        self.single_copy_allowed = allowed;
    }

    fn commit(&mut self) {
        self.map
            .ctrl(self.tx)
            .committed
            .store(self.head.get(), Ordering::Release);
    }

    fn shutdown_handle(&self) -> Result<ShutdownHandle, TransportError> {
        let map = Arc::clone(&self.map);
        let mark = move || {
            map.word(SHUT).store(1, Ordering::Release);
            // Before our caller may touch a posted transfer's bytes again
            // (see `pull`).
            fence(Ordering::SeqCst);
        };
        Ok(self.doorbell.shutdown_handle()?.with_hook(Arc::new(mark)))
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

impl Drop for ShmLink {
    fn drop(&mut self) {
        if self.posted.get().is_some() {
            // The posted bytes belong to our caller, who may free them once
            // we are gone: the reader must not copy them any more.
            self.map.word(SHUT).store(1, Ordering::Release);
            fence(Ordering::SeqCst);
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

impl Policy {
    fn code(self) -> u8 {
        match self {
            Policy::Auto => 0,
            Policy::Never => 1,
            Policy::Require => 2,
        }
    }

    fn from_code(c: u8) -> Option<Policy> {
        match c {
            0 => Some(Policy::Auto),
            1 => Some(Policy::Never),
            2 => Some(Policy::Require),
            _ => None,
        }
    }
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

const OFFER_MAGIC: &[u8; 8] = b"OXSHOFR1";
const REPLY_MAGIC: &[u8; 8] = b"OXSHREP1";
const MAX_NAME: usize = 200;

fn random_u64() -> u64 {
    // RandomState is seeded from the OS's randomness per process; mix in the
    // clock and the pid so that two segments of one process differ too.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// A segment that this side created and has mapped.
struct Created {
    map: Mapping,
    name: CString,
    nonce: u64,
    _unlink: Unlinker,
}

fn create_segment(capacity: usize) -> Result<Created, TransportError> {
    let nonce = random_u64();
    let name = format!("/oxccl-{}-{nonce:016x}", std::process::id());
    let cname = CString::new(name).map_err(|e| {
        TransportError::io("naming a shared-memory segment", std::io::Error::other(e))
    })?;
    let len = HEADER_LEN + 2 * capacity;
    let fd: OwnedFd = rustix::shm::open(
        cname.as_c_str(),
        rustix::shm::OFlags::CREATE | rustix::shm::OFlags::EXCL | rustix::shm::OFlags::RDWR,
        Mode::RUSR | Mode::WUSR,
    )
    .map_err(|e| TransportError::io(format!("creating {cname:?}"), e.into()))?;
    let unlink = Unlinker(Some(cname.clone()));
    rustix::fs::ftruncate(&fd, len as u64)
        .map_err(|e| TransportError::io(format!("sizing {cname:?} to {len} bytes"), e.into()))?;
    let map = Mapping::map(fd.as_fd(), len)?;
    map.word(8).store(nonce, Ordering::Relaxed);
    map.word(16).store(capacity as u64, Ordering::Relaxed);
    map.publish_source(0);
    map.word(0).store(MAGIC, Ordering::Release);
    Ok(Created {
        map,
        name: cname,
        nonce,
        _unlink: unlink,
    })
}

fn open_segment(name: &str, nonce: u64, capacity: usize) -> Result<Mapping, String> {
    let cname = CString::new(name).map_err(|_| "a segment name with a NUL byte".to_string())?;
    let fd = rustix::shm::open(cname.as_c_str(), rustix::shm::OFlags::RDWR, Mode::empty())
        .map_err(|e| format!("cannot open {name}: {e} (another host, or another /dev/shm)"))?;
    let len = HEADER_LEN + 2 * capacity;
    let st = rustix::fs::fstat(&fd).map_err(|e| format!("cannot stat {name}: {e}"))?;
    if st.st_size as u64 != len as u64 {
        return Err(format!("{name} has {} bytes, expected {len}", st.st_size));
    }
    let map = Mapping::map(fd.as_fd(), len).map_err(|e| e.to_string())?;
    if map.word(0).load(Ordering::Acquire) != MAGIC
        || map.word(8).load(Ordering::Relaxed) != nonce
        || map.word(16).load(Ordering::Relaxed) != capacity as u64
    {
        return Err(format!(
            "{name} holds another segment (nonce or size differ): not the same memory"
        ));
    }
    map.publish_source(1);
    Ok(map)
}

/// Writes all of `bytes` on a nonblocking link before `deadline`.
fn send_all(
    link: &mut StreamLink,
    bytes: &[u8],
    deadline: Instant,
    what: &str,
) -> Result<(), TransportError> {
    let mut done = 0;
    while done < bytes.len() {
        let n = link.try_write(&[IoSlice::new(&bytes[done..])])?;
        done += n;
        if n == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Timeout {
                    what: format!("sending {what} to rank {}", link.peer()),
                    waited: Instant::now().duration_since(deadline),
                });
            }
            crate::wait(None, Some(&*link), left)?;
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes from a nonblocking link before `deadline`.
fn recv_exact(
    link: &mut StreamLink,
    buf: &mut [u8],
    deadline: Instant,
    what: &str,
) -> Result<(), TransportError> {
    let started = Instant::now();
    let mut done = 0;
    while done < buf.len() {
        let n = link.try_read(&mut [IoSliceMut::new(&mut buf[done..])])?;
        done += n;
        if n == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Timeout {
                    what: format!("waiting for {what} from rank {}", link.peer()),
                    waited: started.elapsed(),
                });
            }
            crate::wait(Some(&*link), None, left)?;
        }
    }
    Ok(())
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
    let mut next = next;
    let mut prev = prev;

    // 1. Offer on prev.
    let created = if policy == Policy::Never {
        Err("this rank has OXCCL_TRANSPORT=tcp".to_string())
    } else {
        create_segment(capacity).map_err(|e| e.to_string())
    };
    let mut offer = Vec::with_capacity(64);
    offer.extend_from_slice(OFFER_MAGIC);
    offer.push(policy.code());
    match &created {
        Ok(c) => {
            offer.push(1);
            offer.extend_from_slice(&c.nonce.to_le_bytes());
            offer.extend_from_slice(&(capacity as u64).to_le_bytes());
            let name = c.name.to_bytes();
            offer.extend_from_slice(&(name.len() as u16).to_le_bytes());
            offer.extend_from_slice(name);
        }
        Err(reason) => {
            offer.push(0);
            offer.extend_from_slice(&0u64.to_le_bytes());
            offer.extend_from_slice(&0u64.to_le_bytes());
            let r = &reason.as_bytes()[..reason.len().min(MAX_NAME)];
            offer.extend_from_slice(&(r.len() as u16).to_le_bytes());
            offer.extend_from_slice(r);
        }
    }
    send_all(&mut prev, &offer, deadline, "a shared-memory offer")?;

    // 2. Answer the offer on next.
    let mut fixed = [0u8; 8 + 1 + 1 + 8 + 8 + 2];
    recv_exact(&mut next, &mut fixed, deadline, "a shared-memory offer")?;
    let bad = |reason: String| TransportError::Protocol {
        peer: next.peer(),
        reason,
    };
    if &fixed[..8] != OFFER_MAGIC {
        return Err(bad("expected a shared-memory offer".into()));
    }
    let peer_policy =
        Policy::from_code(fixed[8]).ok_or_else(|| bad(format!("unknown policy {}", fixed[8])))?;
    let offered = fixed[9] == 1;
    let nonce = u64::from_le_bytes(fixed[10..18].try_into().unwrap_or([0; 8]));
    let peer_capacity = u64::from_le_bytes(fixed[18..26].try_into().unwrap_or([0; 8]));
    let text_len = u16::from_le_bytes([fixed[26], fixed[27]]) as usize;
    if text_len > MAX_NAME {
        return Err(bad(format!("offer text of {text_len} bytes")));
    }
    let mut text = vec![0u8; text_len];
    recv_exact(&mut next, &mut text, deadline, "a shared-memory offer")?;
    let text = String::from_utf8_lossy(&text).into_owned();
    let opened: Result<Mapping, String> = if policy == Policy::Never {
        Err("this rank has OXCCL_TRANSPORT=tcp".into())
    } else if peer_policy == Policy::Never {
        Err(format!("rank {} has OXCCL_TRANSPORT=tcp", next.peer()))
    } else if !offered {
        Err(format!(
            "rank {} could not offer a segment: {text}",
            next.peer()
        ))
    } else if usize::try_from(peer_capacity).ok() != Some(capacity) {
        Err(format!(
            "ranks disagree on the ring capacity ({peer_capacity} and {capacity} bytes; OXCCL_SHM_BYTES)"
        ))
    } else {
        open_segment(&text, nonce, capacity)
    };
    let mut reply = Vec::with_capacity(64);
    reply.extend_from_slice(REPLY_MAGIC);
    reply.push(policy.code());
    let reason = match &opened {
        Ok(_) => {
            reply.push(1);
            String::new()
        }
        Err(r) => {
            reply.push(0);
            r.clone()
        }
    };
    let r = &reason.as_bytes()[..reason.len().min(MAX_NAME)];
    reply.extend_from_slice(&(r.len() as u16).to_le_bytes());
    reply.extend_from_slice(r);
    let sent = send_all(&mut next, &reply, deadline, "a shared-memory answer");
    let next_link: Box<dyn Link> = match opened {
        Ok(map) => {
            sent?;
            let peer = next.peer();
            let mut link = ShmLink::new(peer, map, capacity, 1, next, &text);
            link.set_single_copy(single_copy);
            Box::new(link)
        }
        Err(reason) => {
            if policy == Policy::Require || peer_policy == Policy::Require {
                // This error, not a failed send of the answer: the peer
                // reaches the same verdict and may have closed already.
                return Err(TransportError::Handshake {
                    addr: next.describe(),
                    reason: format!(
                        "OXCCL_TRANSPORT=shm, but rank {} cannot share memory with this rank: {reason}",
                        next.peer()
                    ),
                });
            }
            sent?;
            Box::new(next)
        }
    };

    // 3. Read the answer on prev.
    let mut fixed = [0u8; 8 + 1 + 1 + 2];
    recv_exact(&mut prev, &mut fixed, deadline, "a shared-memory answer")?;
    let bad = |reason: String| TransportError::Protocol {
        peer: prev.peer(),
        reason,
    };
    if &fixed[..8] != REPLY_MAGIC {
        return Err(bad("expected a shared-memory answer".into()));
    }
    let peer_policy =
        Policy::from_code(fixed[8]).ok_or_else(|| bad(format!("unknown policy {}", fixed[8])))?;
    let accepted = fixed[9] == 1;
    let text_len = u16::from_le_bytes([fixed[10], fixed[11]]) as usize;
    if text_len > MAX_NAME {
        return Err(bad(format!("answer text of {text_len} bytes")));
    }
    let mut text = vec![0u8; text_len];
    recv_exact(&mut prev, &mut text, deadline, "a shared-memory answer")?;
    let prev_link: Box<dyn Link> = match created {
        Ok(c) if accepted => {
            let name = c.name.to_string_lossy().into_owned();
            // The name goes now (Unlinker), the mapping stays.
            let Created { map, _unlink, .. } = c;
            drop(_unlink);
            let peer = prev.peer();
            Box::new(ShmLink::new(peer, map, capacity, 0, prev, &name))
        }
        created => {
            let reason = match created {
                Err(r) => r,
                Ok(_) => String::from_utf8_lossy(&text).into_owned(),
            };
            if policy == Policy::Require || peer_policy == Policy::Require {
                return Err(TransportError::Handshake {
                    addr: prev.describe(),
                    reason: format!(
                        "OXCCL_TRANSPORT=shm, but rank {} cannot share memory with this rank: {reason}",
                        prev.peer()
                    ),
                });
            }
            Box::new(prev)
        }
    };
    Ok(Upgraded {
        next: next_link,
        prev: prev_link,
    })
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::wait;
    use std::time::Duration;

    /// Asserts that a transfer failed because rank `peer` went away.
    fn expect_closed(r: Result<usize, TransportError>, peer: usize) {
        match r {
            Err(TransportError::PeerClosed { peer: p, .. }) if p == peer => {}
            other => panic!("expected PeerClosed from rank {peer}, got {other:?}"),
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    /// Pushes `total` bytes of a counting pattern from `a` to `b` on two
    /// threads, in odd-sized pieces, sleeping in `wait` when blocked.
    /// Streams `total` bytes from `a` to `b` in pieces of varying size up to
    /// `max_piece` (writes) and 5/7 of it (reads), and checks every byte.
    fn stream(mut a: Box<dyn Link>, mut b: Box<dyn Link>, total: usize, max_piece: usize) {
        let writer = std::thread::spawn(move || {
            let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
            let mut done = 0;
            let mut piece = 1;
            while done < total {
                let end = (done + piece).min(total);
                let half = done + (end - done) / 2;
                let n = a
                    .try_write(&[
                        IoSlice::new(&data[done..half]),
                        IoSlice::new(&data[half..end]),
                    ])
                    .unwrap();
                done += n;
                if n == 0 {
                    wait(None, Some(&*a), Duration::from_secs(10)).unwrap();
                }
                piece = piece * 3 % max_piece + 1;
            }
            a
        });
        let mut got = vec![0u8; total];
        let mut done = 0;
        let mut piece = 7;
        while done < total {
            let end = (done + piece).min(total);
            let n = b
                .try_read(&mut [IoSliceMut::new(&mut got[done..end])])
                .unwrap();
            done += n;
            if n == 0 {
                wait(Some(&*b), None, Duration::from_secs(10)).unwrap();
            }
            piece = piece * 5 % (max_piece / 7 * 5) + 1;
        }
        let _a = writer.join().unwrap();
        for (i, &v) in got.iter().enumerate() {
            assert_eq!(v, (i % 251) as u8, "byte {i}");
        }
    }

    #[test]
    fn in_process_pair_carries_a_stream_across_wraps() {
        let (a, b) = pair(0, 1, MIN_CAPACITY).unwrap();
        assert_eq!(a.peer(), 1);
        assert_eq!(b.peer(), 0);
        stream(Box::new(a), Box::new(b), 3_000_000, 70_001);
        let (a, b) = pair(0, 1, MIN_CAPACITY).unwrap();
        // The other direction of the same kind of segment.
        stream(Box::new(b), Box::new(a), 1_000_000, 70_001);
    }

    /// Whether `a`'s reader may read `a`'s memory (some sandboxes forbid
    /// `process_vm_readv`); a test that needs it says why it skips.
    fn single_copy_here(a: &ShmLink) -> bool {
        if a.may_post() {
            return true;
        }
        let why = a
            .map
            .read_token(SOURCE_OFFSET[a.tx])
            .err()
            .unwrap_or_default();
        eprintln!(
            "skipping: no single copy on this machine ({why}); the ring path is tested alone"
        );
        false
    }

    /// What reads how many bytes the reader `b` got by single copy.
    fn pulled_counter(b: &ShmLink) -> impl Fn() -> u64 + use<> {
        let (map, rx) = (Arc::clone(&b.map), 1 - b.tx);
        move || map.ctrl(rx).pulled.load(Ordering::Acquire)
    }

    #[test]
    fn single_copy_carries_a_stream_with_partial_copies_and_sleeps() {
        // Writes of two buffers of up to 35 KB, reads of up to 50 KB, in a
        // ring of 4 KiB: buffers at the threshold or above go by single
        // copy (often copied in several reads), the others through the
        // ring, interleaved; both sides sleep when blocked.
        for (min, all) in [(1, true), (1000, false), (30_000, false)] {
            let (mut a, b) = pair(0, 1, MIN_CAPACITY).unwrap();
            a.set_single_copy(Some(min));
            if !single_copy_here(&a) {
                return;
            }
            let pulled = pulled_counter(&b);
            stream(Box::new(a), Box::new(b), 3_000_000, 70_001);
            let got = pulled();
            if all {
                assert_eq!(got, 3_000_000, "threshold {min}");
            } else {
                assert!(got > 0 && got < 3_000_000, "threshold {min}: {got}");
            }
        }
    }

    #[test]
    fn a_shut_link_drops_a_posted_transfer_but_delivers_committed_bytes() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        if !single_copy_here(&a) {
            return;
        }
        assert_eq!(a.try_write(&[IoSlice::new(b"done.")]).unwrap(), 5);
        a.commit();
        let big = [7u8; 100];
        // Posted, not copied: nothing is reported written yet.
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 0);
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 0);
        a.shutdown_handle().unwrap().shutdown();
        let mut buf = [0u8; 200];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut buf)]).unwrap(), 5);
        assert_eq!(&buf[..5], b"done.");
        expect_closed(b.try_read(&mut [IoSliceMut::new(&mut buf[5..])]), 0);
        assert!(
            buf[5..].iter().all(|&x| x == 0),
            "abandoned bytes were copied"
        );
        expect_closed(a.try_write(&[IoSlice::new(&big)]), 1);
    }

    #[test]
    fn a_writer_dropped_with_a_posted_transfer_fails_its_reader() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        if !single_copy_here(&a) {
            return;
        }
        let big = vec![7u8; 100];
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 0);
        drop(a);
        drop(big);
        let mut buf = [0u8; 200];
        expect_closed(b.try_read(&mut [IoSliceMut::new(&mut buf)]), 0);
    }

    #[test]
    fn a_posted_transfer_is_reported_as_the_reader_copies_it() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        if !single_copy_here(&a) {
            return;
        }
        let pulled = pulled_counter(&b);
        let hdr = *b"hdr";
        let big: Vec<u8> = (0..100u8).collect();
        // The small buffer goes through the ring, the large one is posted.
        let bufs = [IoSlice::new(&hdr), IoSlice::new(&big)];
        assert_eq!(a.try_write(&bufs).unwrap(), 3);
        // A sleeping writer wakes when the reader copies.
        assert!(
            a.arm(Direction::Write).unwrap().is_some(),
            "nothing copied yet"
        );
        a.disarm(Direction::Write);
        let mut got = [0u8; 40];
        assert_eq!(
            b.try_read(&mut [IoSliceMut::new(&mut got[..3])]).unwrap(),
            3
        );
        assert_eq!(&got[..3], b"hdr");
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut got)]).unwrap(), 40);
        assert_eq!(got[..], big[..40]);
        assert_eq!(pulled(), 40);
        assert!(
            a.arm(Direction::Write).unwrap().is_none(),
            "40 bytes copied"
        );
        a.disarm(Direction::Write);
        // Reported only through the rest of the same buffer.
        assert_eq!(a.try_write(&[IoSlice::new(&big[..10])]).unwrap(), 10);
        assert!(matches!(
            a.try_write(&[IoSlice::new(&hdr)]),
            Err(TransportError::Io { .. })
        ));
        assert_eq!(a.try_write(&[IoSlice::new(&big[10..])]).unwrap(), 30);
        assert_eq!(a.try_write(&[IoSlice::new(&big[40..])]).unwrap(), 0);
        let mut rest = [0u8; 100];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut rest)]).unwrap(), 60);
        assert_eq!(rest[..60], big[40..]);
        assert_eq!(a.try_write(&[IoSlice::new(&big[40..])]).unwrap(), 60);
        // Done: the ring carries the next bytes again.
        assert_eq!(a.try_write(&[IoSlice::new(b"after")]).unwrap(), 5);
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut rest)]).unwrap(), 5);
        assert_eq!(&rest[..5], b"after");
        assert_eq!(pulled(), 100);
    }

    #[test]
    fn a_transfer_copied_before_the_reader_left_counts_as_written() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(1));
        if !single_copy_here(&a) {
            return;
        }
        let last = *b"last frame";
        assert_eq!(a.try_write(&[IoSlice::new(&last)]).unwrap(), 0);
        let mut got = [0u8; 10];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut got)]).unwrap(), 10);
        drop(b);
        let r = wait(None, Some(&a), Duration::from_secs(5)).unwrap();
        assert!(r.writable);
        assert_eq!(a.try_write(&[IoSlice::new(&last)]).unwrap(), 10);
        expect_closed(a.try_write(&[IoSlice::new(&last)]), 1);
    }

    #[test]
    fn single_copy_only_while_the_caller_allows_it() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        if !single_copy_here(&a) {
            return;
        }
        let pulled = pulled_counter(&b);
        let big = vec![5u8; 1000];
        let mut got = vec![0u8; 1000];
        a.allow_single_copy(false);
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 1000);
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut got)]).unwrap(), 1000);
        assert_eq!(pulled(), 0);
        a.allow_single_copy(true);
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 0);
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut got)]).unwrap(), 1000);
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 1000);
        assert_eq!((pulled(), &got), (1000, &big));
    }

    #[test]
    fn a_reader_that_cannot_read_the_writer_keeps_the_ring() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        // As if the writer were another process's namesake: the token differs.
        let src = SOURCE_OFFSET[a.tx];
        let token = a.map.word(src + SOURCE_TOKEN);
        token.store(token.load(Ordering::Relaxed) ^ 1, Ordering::Relaxed);
        b.probe();
        a.pullable.set(0);
        assert_eq!(
            a.map.word(src + SOURCE_PULLABLE).load(Ordering::Relaxed),
            PULLABLE_NO
        );
        let pulled = pulled_counter(&b);
        let big = vec![5u8; 1000];
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 1000);
        let mut got = vec![0u8; 1000];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut got)]).unwrap(), 1000);
        assert_eq!(got, big);
        assert_eq!(pulled(), 0);
    }

    #[test]
    fn long_writes_and_reads_publish_as_they_go() {
        // Pieces of up to 600 KB in a 1 MiB ring: one call copies many
        // PUBLISH_BYTES steps and publishes after each.
        let (a, b) = pair(0, 1, 1 << 20).unwrap();
        stream(Box::new(a), Box::new(b), 40_000_000, 600_001);
    }

    #[test]
    fn closed_peer_is_reported_after_its_bytes() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        assert_eq!(a.try_write(&[IoSlice::new(b"last words")]).unwrap(), 10);
        drop(a);
        // The bytes written before the close are still read.
        let r = wait(Some(&b), None, Duration::from_secs(5)).unwrap();
        assert!(r.readable);
        let mut buf = [0u8; 32];
        let n = b.try_read(&mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(&buf[..n], b"last words");
        // Then the close: the wait returns at once and the read fails.
        let r = wait(Some(&b), None, Duration::from_secs(5)).unwrap();
        assert!(r.readable);
        expect_closed(b.try_read(&mut [IoSliceMut::new(&mut buf)]), 0);
        expect_closed(b.try_write(&[IoSlice::new(b"x")]), 0);
    }

    #[test]
    fn a_shut_link_fails_both_sides_at_once_despite_bytes_in_flight() {
        // An abort (not a drop): the bytes already in the ring belong to a
        // collective the sender abandoned, so the reader must not use them,
        // and the writer must learn at its next write, as over a reset socket.
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        assert_eq!(a.try_write(&[IoSlice::new(b"abandoned")]).unwrap(), 9);
        assert_eq!(b.try_write(&[IoSlice::new(b"unread")]).unwrap(), 6);
        a.shutdown_handle().unwrap().shutdown();
        let mut buf = [0u8; 32];
        expect_closed(b.try_read(&mut [IoSliceMut::new(&mut buf)]), 0);
        expect_closed(b.try_write(&[IoSlice::new(b"x")]), 0);
        let r = wait(Some(&b), None, Duration::from_secs(5)).unwrap();
        assert!(r.readable, "a shut link must not put a waiter to sleep");
        // The side that shut it fails too.
        expect_closed(a.try_read(&mut [IoSliceMut::new(&mut buf)]), 1);
    }

    #[test]
    fn a_shut_link_still_delivers_the_bytes_of_completed_calls() {
        // The writer completed one call (commit) and abandoned the next.
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        assert_eq!(a.try_write(&[IoSlice::new(b"done.")]).unwrap(), 5);
        a.commit();
        assert_eq!(a.try_write(&[IoSlice::new(b"abandoned")]).unwrap(), 9);
        a.shutdown_handle().unwrap().shutdown();
        let r = wait(Some(&b), None, Duration::from_secs(5)).unwrap();
        assert!(r.readable, "a shut link must not put a waiter to sleep");
        let mut buf = [0u8; 3];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut buf)]).unwrap(), 3);
        let mut rest = [0u8; 32];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut rest)]).unwrap(), 2);
        assert_eq!((&buf, &rest[..2]), (b"don", &b"e."[..]));
        expect_closed(b.try_read(&mut [IoSliceMut::new(&mut rest)]), 0);
        expect_closed(b.try_write(&[IoSlice::new(b"x")]), 0);
    }

    #[test]
    fn a_watched_shm_link_reports_its_peer_going_away() {
        let (mut a, b) = pair(0, 1, MIN_CAPACITY).unwrap();
        // Bytes (and the doorbells they may ring) are not a hang-up.
        assert_eq!(a.try_write(&[IoSlice::new(b"bytes")]).unwrap(), 5);
        let r = crate::wait_watching(None, None, Some(&b), Duration::from_millis(30)).unwrap();
        assert!(!r.hung_up, "{r:?}");
        drop(a);
        let r = crate::wait_watching(None, None, Some(&b), Duration::from_secs(5)).unwrap();
        assert!(r.hung_up, "{r:?}");
    }

    #[test]
    fn a_blocked_writer_sleeps_until_the_reader_makes_room() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        let fill = vec![9u8; MIN_CAPACITY + 100];
        assert_eq!(a.try_write(&[IoSlice::new(&fill)]).unwrap(), MIN_CAPACITY);
        assert_eq!(a.try_write(&[IoSlice::new(&fill)]).unwrap(), 0);
        let t = std::thread::spawn(move || {
            let t0 = Instant::now();
            let r = wait(None, Some(&a), Duration::from_secs(10)).unwrap();
            (r, t0.elapsed(), a)
        });
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = [0u8; 100];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut buf)]).unwrap(), 100);
        let (r, waited, mut a) = t.join().unwrap();
        assert!(r.writable, "the writer woke without room");
        assert!(waited < Duration::from_secs(5), "woke only at the timeout");
        assert_eq!(a.try_write(&[IoSlice::new(&fill)]).unwrap(), 100);
    }

    #[test]
    fn shutdown_handle_wakes_a_sleeping_reader() {
        let (a, b) = pair(0, 1, MIN_CAPACITY).unwrap();
        let h = b.shutdown_handle().unwrap();
        let t = std::thread::spawn(move || {
            let r = wait(Some(&b), None, Duration::from_secs(10)).unwrap();
            (r, b)
        });
        std::thread::sleep(Duration::from_millis(50));
        h.shutdown();
        let (r, mut b) = t.join().unwrap();
        assert!(r.readable);
        let mut buf = [0u8; 4];
        assert!(matches!(
            b.try_read(&mut [IoSliceMut::new(&mut buf)]),
            Err(TransportError::PeerClosed { .. })
        ));
        drop(a);
    }

    /// Asserts that a transfer failed because rank `peer` wrote an
    /// impossible value into the segment, and that the message says `words`.
    fn expect_protocol(r: Result<usize, TransportError>, peer: usize, words: &[&str]) {
        match r {
            Err(e @ TransportError::Protocol { peer: p, .. }) if p == peer => {
                let msg = e.to_string();
                for w in words {
                    assert!(msg.contains(w), "{msg:?} does not say {w:?}");
                }
            }
            other => panic!("expected a protocol error from rank {peer}, got {other:?}"),
        }
    }

    #[test]
    fn a_ring_head_out_of_place_fails_the_reader_naming_the_writer() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        // Rank 0 writes direction 0; these are its words.
        let map = Arc::clone(&a.map);
        let ctrl = map.ctrl(0);
        let mut buf = [0u8; 64];
        ctrl.head.store(5000, Ordering::Release);
        expect_protocol(
            b.try_read(&mut [IoSliceMut::new(&mut buf)]),
            0,
            &["rank 0", "ring head", "5000 bytes ahead", "4096-byte"],
        );
        ctrl.head.store(u64::MAX, Ordering::Release);
        expect_protocol(
            b.try_read(&mut [IoSliceMut::new(&mut buf)]),
            0,
            &["ring head", "bytes ahead"],
        );
        // Behind the tail.
        ctrl.head.store(0, Ordering::Release);
        assert_eq!(a.try_write(&[IoSlice::new(b"0123456789")]).unwrap(), 10);
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut buf)]).unwrap(), 10);
        ctrl.head.store(3, Ordering::Release);
        expect_protocol(
            b.try_read(&mut [IoSliceMut::new(&mut buf)]),
            0,
            &["ring head", "7 bytes behind"],
        );
    }

    #[test]
    fn a_ring_tail_out_of_place_fails_the_writer_naming_the_reader() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        // Rank 1 reads direction 0; its tail is there.
        let map = Arc::clone(&b.map);
        let ctrl = map.ctrl(0);
        let fill = vec![1u8; MIN_CAPACITY];
        assert_eq!(a.try_write(&[IoSlice::new(b"0123456789")]).unwrap(), 10);
        // Past the head (a write that needs the tail loads it).
        ctrl.tail.store(20, Ordering::Release);
        expect_protocol(
            a.try_write(&[IoSlice::new(&fill)]),
            1,
            &["rank 1", "ring tail", "10 bytes ahead"],
        );
        ctrl.tail.store(u64::MAX, Ordering::Release);
        expect_protocol(
            a.try_write(&[IoSlice::new(&fill)]),
            1,
            &["ring tail", "bytes ahead"],
        );
        // Gone back further than the ring holds.
        ctrl.tail.store(0, Ordering::Release);
        let mut buf = vec![0u8; MIN_CAPACITY];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut buf)]).unwrap(), 10);
        assert_eq!(a.try_write(&[IoSlice::new(&fill)]).unwrap(), MIN_CAPACITY);
        assert_eq!(
            b.try_read(&mut [IoSliceMut::new(&mut buf[..100])]).unwrap(),
            100
        );
        ctrl.tail.store(0, Ordering::Release);
        expect_protocol(
            a.try_write(&[IoSlice::new(&fill[..200])]),
            1,
            &["ring tail", "4106 bytes behind", "4096-byte"],
        );
        // A writer about to sleep on a full ring wakes for an impossible
        // tail, to report it, rather than sleep until its deadline.
        let (mut a, b) = pair(0, 1, MIN_CAPACITY).unwrap();
        let map = Arc::clone(&b.map);
        let ctrl = map.ctrl(0);
        assert_eq!(a.try_write(&[IoSlice::new(&fill)]).unwrap(), MIN_CAPACITY);
        assert!(
            a.arm(Direction::Write).unwrap().is_some(),
            "the ring is full"
        );
        a.disarm(Direction::Write);
        ctrl.tail.store(u64::MAX, Ordering::Release);
        assert!(a.arm(Direction::Write).unwrap().is_none());
        expect_protocol(a.try_write(&[IoSlice::new(&fill)]), 1, &["ring tail"]);
    }

    #[test]
    fn words_a_side_writes_itself_are_never_loaded_back() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        if !single_copy_here(&a) {
            return;
        }
        let map = Arc::clone(&a.map);
        let ctrl = map.ctrl(0);
        // Rank 1 scribbles over rank 0's head and count of posted transfers.
        ctrl.head.store(u64::MAX - 1, Ordering::Relaxed);
        ctrl.pull_posted.store(u64::MAX, Ordering::Relaxed);
        let big: Vec<u8> = (0..100u8).collect();
        let bufs = [IoSlice::new(b"hdr"), IoSlice::new(&big)];
        assert_eq!(a.try_write(&bufs).unwrap(), 3);
        // Rank 0 scribbles over rank 1's tail and count of bytes copied.
        ctrl.tail.store(u64::MAX - 1, Ordering::Relaxed);
        ctrl.pulled.store(u64::MAX - 1, Ordering::Relaxed);
        let mut got = [0u8; 103];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut got)]).unwrap(), 3);
        assert_eq!(
            b.try_read(&mut [IoSliceMut::new(&mut got[3..])]).unwrap(),
            100
        );
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 100);
        assert_eq!((&got[..3], &got[3..]), (&b"hdr"[..], &big[..]));
    }

    /// Posts a transfer of `len` bytes at `addr` as rank 0 would, at ring
    /// position `at`, as its transfer number `count`.
    fn forge_post(ctrl: &Ctrl, count: u64, at: u64, addr: u64, len: u64) {
        ctrl.pull_at.store(at, Ordering::Relaxed);
        ctrl.pull_addr.store(addr, Ordering::Relaxed);
        ctrl.pull_len.store(len, Ordering::Relaxed);
        ctrl.pull_posted.store(count, Ordering::Release);
    }

    #[test]
    fn a_forged_single_copy_post_fails_the_reader_naming_the_writer() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        let map = Arc::clone(&a.map);
        let ctrl = map.ctrl(0);
        let mine = [0u8; 100];
        let addr = mine.as_ptr() as u64;
        let mut buf = [0u8; 64];
        let mut read = |b: &mut ShmLink| b.try_read(&mut [IoSliceMut::new(&mut buf)]);
        // Posted although rank 1 found that it cannot read rank 0's memory
        // (as if its probe had failed).
        b.source_pid.set(0);
        forge_post(ctrl, 1, 0, addr, 100);
        expect_protocol(read(&mut b), 0, &["rank 0", "single-copy", "cannot read"]);
        // From here on, as if the probe had succeeded: no copy is attempted
        // before the checks anyway.
        b.source_pid.set(std::process::id() as i32);
        // More than one pending, or a count that went back.
        forge_post(ctrl, 2, 0, addr, 100);
        expect_protocol(read(&mut b), 0, &["single-copy transfer", "2"]);
        forge_post(ctrl, u64::MAX, 0, addr, 100);
        expect_protocol(read(&mut b), 0, &["single-copy transfer"]);
        // Empty.
        forge_post(ctrl, 1, 0, addr, 0);
        expect_protocol(read(&mut b), 0, &["empty single-copy transfer"]);
        // Past the end of the address space.
        forge_post(ctrl, 1, 0, u64::MAX - 10, 100);
        expect_protocol(read(&mut b), 0, &["single-copy", "address space"]);
        // Anchored elsewhere than where the ring's bytes end.
        forge_post(ctrl, 0, 0, 0, 0);
        assert_eq!(a.try_write(&[IoSlice::new(b"0123456789")]).unwrap(), 10);
        forge_post(ctrl, 1, 3, addr, 100);
        expect_protocol(
            read(&mut b),
            0,
            &["single-copy", "ring position 3", "head is 10"],
        );
        forge_post(ctrl, 1, u64::MAX, addr, 100);
        expect_protocol(read(&mut b), 0, &["single-copy", "ring position"]);
    }

    #[test]
    fn a_pending_transfer_changed_under_the_reader_fails_it() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        if !single_copy_here(&a) {
            return;
        }
        let map = Arc::clone(&a.map);
        let ctrl = map.ctrl(0);
        let big: Vec<u8> = (0..100u8).collect();
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 0);
        let mut got = [0u8; 100];
        assert_eq!(
            b.try_read(&mut [IoSliceMut::new(&mut got[..40])]).unwrap(),
            40
        );
        // Its address moved to where the rest wraps around.
        let addr = ctrl.pull_addr.load(Ordering::Relaxed);
        ctrl.pull_addr.store(u64::MAX - 10, Ordering::Relaxed);
        expect_protocol(
            b.try_read(&mut [IoSliceMut::new(&mut got[40..])]),
            0,
            &["single-copy", "address space"],
        );
        // Its length shrank below what was copied.
        ctrl.pull_addr.store(addr, Ordering::Relaxed);
        ctrl.pull_len.store(30, Ordering::Relaxed);
        expect_protocol(
            b.try_read(&mut [IoSliceMut::new(&mut got[40..])]),
            0,
            &["single-copy", "30 bytes", "40"],
        );
        // An address the kernel refuses is an error too, not a crash.
        ctrl.pull_len.store(100, Ordering::Relaxed);
        ctrl.pull_addr.store(8, Ordering::Relaxed);
        assert!(b.try_read(&mut [IoSliceMut::new(&mut got[40..])]).is_err());
    }

    #[test]
    fn single_copy_progress_out_of_place_fails_the_writer_naming_the_reader() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        if !single_copy_here(&a) {
            return;
        }
        let map = Arc::clone(&b.map);
        let ctrl = map.ctrl(0);
        let big: Vec<u8> = (0..100u8).collect();
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 0);
        // More copied than was posted.
        ctrl.pulled.store(500, Ordering::Release);
        expect_protocol(
            a.try_write(&[IoSlice::new(&big)]),
            1,
            &["rank 1", "single-copy", "500"],
        );
        // Gone back.
        ctrl.pulled.store(0, Ordering::Release);
        let mut got = [0u8; 40];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut got)]).unwrap(), 40);
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 40);
        ctrl.pulled.store(10, Ordering::Release);
        expect_protocol(
            a.try_write(&[IoSlice::new(&big[40..])]),
            1,
            &["single-copy", "10"],
        );
        ctrl.pulled.store(u64::MAX, Ordering::Release);
        expect_protocol(
            a.try_write(&[IoSlice::new(&big[40..])]),
            1,
            &["single-copy"],
        );
    }

    /// Two ranks in a ring of 2 over Unix socket pairs (standing in for TCP).
    fn ring_of_two() -> [(StreamLink, StreamLink); 2] {
        let (a0, b0) = std::os::unix::net::UnixStream::pair().unwrap();
        let (a1, b1) = std::os::unix::net::UnixStream::pair().unwrap();
        // pair 0: rank 0 -> rank 1; pair 1: rank 1 -> rank 0.
        [
            (
                StreamLink::unix(1, a0).unwrap(),
                StreamLink::unix(1, b1).unwrap(),
            ),
            (
                StreamLink::unix(0, a1).unwrap(),
                StreamLink::unix(0, b0).unwrap(),
            ),
        ]
    }

    fn upgrade_both(p0: Policy, p1: Policy) -> [Result<Upgraded, TransportError>; 2] {
        let [(n0, q0), (n1, q1)] = ring_of_two();
        let t = std::thread::spawn(move || upgrade_ring(n1, q1, p1, 8192, None, soon()));
        // Rank 0 sends buffers of 1000 bytes and more by single copy.
        let r0 = upgrade_ring(n0, q0, p0, 8192, Some(1000), soon());
        [r0, t.join().unwrap()]
    }

    #[test]
    fn ring_upgrade_gives_working_shm_links_and_leaves_no_names() {
        let [r0, r1] = upgrade_both(Policy::Auto, Policy::Require);
        let (u0, u1) = (r0.unwrap(), r1.unwrap());
        for l in [&u0.next, &u0.prev, &u1.next, &u1.prev] {
            assert!(l.describe().starts_with("shm /oxccl-"), "{}", l.describe());
            let name = l.describe()[4..].split(' ').next().unwrap().to_string();
            assert!(
                !std::path::Path::new(&format!("/dev/shm{name}")).exists(),
                "{name} was not unlinked"
            );
        }
        stream(u0.next, u1.prev, 100_000, 70_001);
        stream(u1.next, u0.prev, 100_000, 70_001);
    }

    #[test]
    fn tcp_on_either_side_keeps_the_sockets() {
        let [r0, r1] = upgrade_both(Policy::Never, Policy::Auto);
        let (u0, u1) = (r0.unwrap(), r1.unwrap());
        for l in [&u0.next, &u0.prev, &u1.next, &u1.prev] {
            assert_eq!(l.describe(), "in-process socket pair");
        }
        stream(u0.next, u1.prev, 100_000, 70_001);
    }

    #[test]
    fn required_shm_against_tcp_fails_on_both_sides_with_the_reason() {
        let [r0, r1] = upgrade_both(Policy::Never, Policy::Require);
        for r in [r0, r1] {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("OXCCL_TRANSPORT"), "{e}");
        }
    }
}
