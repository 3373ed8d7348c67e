//! The shared-memory segment: its layout (a header page with the control
//! blocks of both directions, then the ring of each direction), the mapping
//! of it, and the POSIX shared-memory objects it is made from.
//!
//! # Safety
//!
//! A [`Mapping`] owns one `mmap` of `len` bytes, page-aligned, readable and
//! writable, and unmaps it only on drop. The references it hands out
//! ([`Mapping::word`], [`Mapping::ctrl`]) point inside the header page
//! (bounds asserted; aligned, as fixed offsets from the page-aligned base),
//! borrow the mapping, and are to atomics only: the peer writes the same
//! words, so no plain Rust reference to its memory is ever formed. The ring
//! bytes after the header are reached only through raw pointers (`ring`).

use std::ffi::CString;
use std::hash::{BuildHasher, Hasher};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use rustix::fs::Mode;
use rustix::mm::{MapFlags, ProtFlags};

use crate::TransportError;

/// The first word of every segment: "oxshm" and the layout's version, so
/// that ranks of builds whose layouts differ (version 2 added
/// `pull_withdrawn`) refuse each other's segments by name, rather than
/// reading words the other does not write.
const MAGIC: u64 = u64::from_le_bytes([b'o', b'x', b's', b'h', b'm', 0, 0, b'2']);
/// The first word of the layout before [`MAGIC`] carried a version.
const MAGIC_V1: u64 = u64::from_le_bytes(*b"oxcclshm");
/// Bytes before the first ring: the header and two control blocks, one page.
pub(super) const HEADER_LEN: usize = 4096;
/// Offset of the control block of direction `d` (0: creator to opener).
const CTRL_OFFSET: [usize; 2] = [256, 512];
/// Offset of the header word that either side sets, non-zero, when it shuts
/// the link down (an abort): from then on both sides fail every write, and
/// every read once the committed bytes (see [`Ctrl::committed`]) are read,
/// whatever else the rings still hold.
pub(super) const SHUT: usize = 24;

/// The per-direction control block, one cache line per word that a different
/// side writes, so that the writer's and the reader's stores do not share lines.
#[repr(C, align(64))]
pub(super) struct Ctrl {
    /// Bytes ever written (the writer advances it).
    pub(super) head: AtomicU64,
    /// Bytes written by completed collectives
    /// ([`Endpoint::commit`](crate::Endpoint::commit)): after a shutdown the reader
    /// still gets these, and only these.
    pub(super) committed: AtomicU64,
    /// Single-copy transfers ever posted by the writer; one is pending while
    /// this differs from the count the reader completed. Its other words are
    /// written before this one (release) and stay put until it completes.
    pub(super) pull_posted: AtomicU64,
    /// Ring position at which the pending transfer's bytes enter the stream:
    /// the ring bytes before it come first, and the ring holds nothing after.
    pub(super) pull_at: AtomicU64,
    /// Address of the pending transfer's bytes in the writer's address space.
    pub(super) pull_addr: AtomicU64,
    /// Its length in bytes.
    pub(super) pull_len: AtomicU64,
    /// The number (the count `pull_posted` reached) of the last transfer the
    /// writer withdrew ([`Endpoint::withdraw`](crate::Endpoint::withdraw)): while it
    /// equals the pending transfer's, the reader copies no more of it and
    /// discards a copy it finishes (see `single_copy`). 0: none withdrawn.
    pub(super) pull_withdrawn: AtomicU64,
    _pad0: [u8; 8],
    /// Bytes ever read (the reader advances it).
    pub(super) tail: AtomicU64,
    /// Bytes ever copied by single-copy transfers (the reader advances it).
    pub(super) pulled: AtomicU64,
    _pad1: [u8; 48],
    /// Non-zero while the reader sleeps (or is about to) waiting for bytes.
    pub(super) reader_waiting: AtomicU32,
    _pad2: [u8; 60],
    /// Non-zero while the writer sleeps (or is about to) waiting for room.
    pub(super) writer_waiting: AtomicU32,
    _pad3: [u8; 60],
}

const _: () = assert!(std::mem::size_of::<Ctrl>() == 256);
const _: () = assert!(CTRL_OFFSET[1] + std::mem::size_of::<Ctrl>() <= HEADER_LEN);

/// Offset of the words that describe the writer of direction `d` for
/// single-copy transfers: its process id, the address and value of a token
/// in its memory (the reader's proof that it reads the right process), and
/// the reader's verdict ([`PULLABLE_YES`] or [`PULLABLE_NO`]; 0: not tried).
pub(super) const SOURCE_OFFSET: [usize; 2] = [1024, 1088];
pub(super) const SOURCE_PID: usize = 0;
pub(super) const SOURCE_TOKEN_ADDR: usize = 8;
pub(super) const SOURCE_TOKEN: usize = 16;
pub(super) const SOURCE_PULLABLE: usize = 24;
pub(super) const PULLABLE_YES: u64 = 1;
pub(super) const PULLABLE_NO: u64 = 2;
const _: () = assert!(SOURCE_OFFSET[1] + 64 <= HEADER_LEN);

/// One shared mapping of a whole segment.
pub(super) struct Mapping {
    pub(super) base: NonNull<u8>,
    len: usize,
    /// A random value at a fixed address of this process: a peer that reads
    /// it back through `process_vm_readv` knows it may read our memory.
    pub(super) token: Box<u64>,
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
    pub(super) fn map(fd: BorrowedFd<'_>, len: usize) -> Result<Mapping, TransportError> {
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

    /// The 64-bit word at `offset` (8-aligned, inside the header page).
    #[inline]
    pub(super) fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(offset % 8 == 0 && offset + 8 <= HEADER_LEN.min(self.len));
        // SAFETY: in bounds and aligned (asserted; the base is page-aligned),
        // valid for the lifetime of `self`, and only ever accessed atomically.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    #[inline]
    pub(super) fn ctrl(&self, dir: usize) -> &Ctrl {
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
pub(super) struct Unlinker(Option<CString>);

impl Drop for Unlinker {
    fn drop(&mut self) {
        if let Some(name) = self.0.take() {
            let _ = rustix::shm::unlink(name.as_c_str());
        }
    }
}

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
pub(super) struct Created {
    pub(super) map: Mapping,
    pub(super) name: CString,
    pub(super) nonce: u64,
    pub(super) _unlink: Unlinker,
}

pub(super) fn create_segment(capacity: usize) -> Result<Created, TransportError> {
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

pub(super) fn open_segment(name: &str, nonce: u64, capacity: usize) -> Result<Mapping, String> {
    let cname = CString::new(name).map_err(|_| "a segment name with a NUL byte".to_string())?;
    let fd = rustix::shm::open(cname.as_c_str(), rustix::shm::OFlags::RDWR, Mode::empty())
        .map_err(|e| format!("cannot open {name}: {e} (another host, or another /dev/shm)"))?;
    let len = HEADER_LEN + 2 * capacity;
    let st = rustix::fs::fstat(&fd).map_err(|e| format!("cannot stat {name}: {e}"))?;
    if st.st_size as u64 != len as u64 {
        return Err(format!("{name} has {} bytes, expected {len}", st.st_size));
    }
    let map = Mapping::map(fd.as_fd(), len).map_err(|e| e.to_string())?;
    let magic = map.word(0).load(Ordering::Acquire);
    if magic == MAGIC_V1 || (magic != MAGIC && magic.to_le_bytes()[..5] == MAGIC.to_le_bytes()[..5])
    {
        return Err(format!(
            "{name} was made by a build of oxccl with another shared-memory layout \
             (version {}, this build's {}): run one build on every rank",
            if magic == MAGIC_V1 {
                1
            } else {
                magic.to_le_bytes()[7].wrapping_sub(b'0')
            },
            MAGIC.to_le_bytes()[7] - b'0'
        ));
    }
    if magic != MAGIC
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_of_another_layout_is_refused_by_name() {
        let cap = super::super::MIN_CAPACITY;
        for (magic, version) in [
            (MAGIC_V1, "version 1"),
            (
                u64::from_le_bytes([b'o', b'x', b's', b'h', b'm', 0, 0, b'9']),
                "version 9",
            ),
        ] {
            let created = create_segment(cap).unwrap();
            created.map.word(0).store(magic, Ordering::Release);
            let name = created.name.to_str().unwrap();
            let err = open_segment(name, created.nonce, cap).err().unwrap();
            assert!(
                err.contains("another shared-memory layout") && err.contains(version),
                "{err}"
            );
        }
        // This build's own segments open.
        let created = create_segment(cap).unwrap();
        let name = created.name.to_str().unwrap().to_owned();
        assert!(open_segment(&name, created.nonce, cap).is_ok());
        // A segment of something else is another segment, not another layout.
        created.map.word(0).store(7, Ordering::Release);
        let err = open_segment(&name, created.nonce, cap).err().unwrap();
        assert!(err.contains("holds another segment"), "{err}");
    }
}
