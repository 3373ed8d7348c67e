//! Memory that links move by address: device buffers (and host memory
//! kept as their stand-in) lent to a fabric as they are, never touched by
//! the CPU on the way.
//!
//! A link that talks to UCX can hand it a CUDA pointer and let UCX's
//! `cuda_copy`, `cuda_ipc` or GPUDirect RDMA paths move the bytes; a
//! reduction kernel then works on the same addresses. Neither the kernels
//! crate (which owns device buffers) nor the transport crate (which owns
//! links) may depend on the other, so the one type both speak lives here:
//! a [`DevMut`] (or a shared [`DevRef`]) is `len` bytes of memory of one
//! [`MemoryKind`] at an address, borrowed for a lifetime like a slice. It
//! is made, unsafely, only where the memory is owned (a device buffer's
//! backend), which promises that the address stays valid and unaliased for
//! that lifetime; from then on it is split, narrowed and lent like a
//! slice, in safe code, and only the code that finally dereferences it (a
//! kernel launch, a posted UCX operation) needs `unsafe` again.
//!
//! # Safety
//!
//! The two constructors are `unsafe`: their callers vouch for the memory.
//! Every other function derives a region from one that was valid, covering
//! a subset of its bytes for no longer than it is borrowed; the only other
//! `unsafe` makes a slice of a host region's bytes ([`DevRef::host`],
//! [`DevMut::host_mut`]), which the constructors' contract makes valid for
//! the borrow.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;

/// Where memory lives, as a link or a kernel must know to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemoryKind {
    /// Host memory reached only by address while lent (a device
    /// buffer's stand-in where there is no device).
    Host,
    /// CUDA device memory (a device pointer in the current context).
    Cuda,
}

impl MemoryKind {
    /// Its name in messages ("host", "cuda").
    pub fn name(self) -> &'static str {
        match self {
            MemoryKind::Host => "host",
            MemoryKind::Cuda => "cuda",
        }
    }

    fn bit(self) -> u8 {
        match self {
            MemoryKind::Host => 1,
            MemoryKind::Cuda => 2,
        }
    }
}

impl fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of memory kinds: what a link moves by address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MemoryKinds(u8);

impl MemoryKinds {
    /// No kind: a link that moves only host memory it can read itself.
    pub const NONE: MemoryKinds = MemoryKinds(0);

    /// Every kind: the starting point of an intersection ([`and`](Self::and)).
    pub const ALL: MemoryKinds = MemoryKinds(1 | 2);

    /// The set with `kind` added.
    #[must_use]
    pub fn with(self, kind: MemoryKind) -> MemoryKinds {
        MemoryKinds(self.0 | kind.bit())
    }

    /// Whether `kind` is in the set.
    pub fn contains(self, kind: MemoryKind) -> bool {
        self.0 & kind.bit() != 0
    }

    /// The kinds in both sets.
    #[must_use]
    pub fn and(self, other: MemoryKinds) -> MemoryKinds {
        MemoryKinds(self.0 & other.0)
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// `len` bytes of `kind` memory at `addr`, read-only for `'b` (as `&'b [u8]`).
#[derive(Clone, Copy)]
pub struct DevRef<'b> {
    addr: usize,
    len: usize,
    kind: MemoryKind,
    _lent: PhantomData<&'b [u8]>,
}

/// `len` bytes of `kind` memory at `addr`, lent exclusively for `'b` (as
/// `&'b mut [u8]`).
pub struct DevMut<'b> {
    addr: usize,
    len: usize,
    kind: MemoryKind,
    _lent: PhantomData<&'b mut [u8]>,
}

impl fmt::Debug for DevRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevRef({} {:#x}+{})", self.kind, self.addr, self.len)
    }
}

impl fmt::Debug for DevMut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevMut({} {:#x}+{})", self.kind, self.addr, self.len)
    }
}

/// `range` within a region of `len` bytes, or `None` when it leaves it.
fn within(len: usize, range: &Range<usize>) -> Option<()> {
    (range.start <= range.end && range.end <= len).then_some(())
}

impl<'b> DevRef<'b> {
    /// A read-only region.
    ///
    /// # Safety
    ///
    /// For all of `'b`, `addr..addr + len` must be allocated memory of
    /// `kind` (reachable by the device API of that kind, and by links that
    /// move it) that nothing writes.
    pub unsafe fn new(addr: usize, len: usize, kind: MemoryKind) -> DevRef<'b> {
        DevRef {
            addr,
            len,
            kind,
            _lent: PhantomData,
        }
    }

    /// The first byte's address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where it lives.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }

    /// Its bytes, when it is host memory ([`MemoryKind::Host`]); `None`
    /// for device memory, which the CPU cannot read.
    pub fn host(self) -> Option<&'b [u8]> {
        if self.kind != MemoryKind::Host {
            return None;
        }
        if self.len == 0 {
            return Some(&[]);
        }
        // SAFETY: host memory that the constructor's contract keeps
        // allocated and unwritten for `'b`.
        Some(unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) })
    }

    /// Bytes `range` of it; `None` when the range leaves it.
    pub fn slice(self, range: Range<usize>) -> Option<DevRef<'b>> {
        within(self.len, &range)?;
        Some(DevRef {
            addr: self.addr + range.start,
            len: range.len(),
            ..self
        })
    }
}

impl<'b> DevMut<'b> {
    /// A region lent exclusively.
    ///
    /// # Safety
    ///
    /// For all of `'b`, `addr..addr + len` must be allocated memory of
    /// `kind` that nothing reads or writes except through this region (and
    /// the regions derived from it).
    pub unsafe fn new(addr: usize, len: usize, kind: MemoryKind) -> DevMut<'b> {
        DevMut {
            addr,
            len,
            kind,
            _lent: PhantomData,
        }
    }

    /// The first byte's address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where it lives.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }

    /// Its bytes, when it is host memory ([`MemoryKind::Host`]), for as long
    /// as this region is borrowed; `None` for device memory.
    pub fn host(&self) -> Option<&[u8]> {
        self.as_ref().host()
    }

    /// Its bytes, writable, when it is host memory, for as long as this
    /// region is borrowed mutably; `None` for device memory.
    pub fn host_mut(&mut self) -> Option<&mut [u8]> {
        if self.kind != MemoryKind::Host {
            return None;
        }
        if self.len == 0 {
            return Some(&mut []);
        }
        // SAFETY: host memory that the constructor's contract keeps
        // allocated and reached only through this region for `'b`, which
        // outlives the borrow of `self`.
        Some(unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) })
    }

    /// The region again, for a shorter borrow (as `&mut *slice`).
    pub fn reborrow(&mut self) -> DevMut<'_> {
        DevMut {
            addr: self.addr,
            len: self.len,
            kind: self.kind,
            _lent: PhantomData,
        }
    }

    /// The region, read-only, for as long as this one is borrowed.
    pub fn as_ref(&self) -> DevRef<'_> {
        DevRef {
            addr: self.addr,
            len: self.len,
            kind: self.kind,
            _lent: PhantomData,
        }
    }

    /// Bytes `range` of it; `None` when the range leaves it.
    pub fn slice(self, range: Range<usize>) -> Option<DevMut<'b>> {
        within(self.len, &range)?;
        Some(DevMut {
            addr: self.addr + range.start,
            len: range.len(),
            ..self
        })
    }

    /// Its first `mid` bytes and the rest (as `split_at_mut`; a `mid` past
    /// the end is taken as the end).
    pub fn split_at(self, mid: usize) -> (DevMut<'b>, DevMut<'b>) {
        let mid = mid.min(self.len);
        let tail = DevMut {
            addr: self.addr + mid,
            len: self.len - mid,
            kind: self.kind,
            _lent: PhantomData,
        };
        (DevMut { len: mid, ..self }, tail)
    }

    /// This region and `next`, when `next` starts where this one ends (in
    /// memory of the same kind), as one region: the inverse of
    /// [`split_at`](Self::split_at). Both back when they are not adjacent.
    pub fn join(self, next: DevMut<'b>) -> Result<DevMut<'b>, (DevMut<'b>, DevMut<'b>)> {
        if self.kind != next.kind || self.addr + self.len != next.addr {
            return Err((self, next));
        }
        Ok(DevMut {
            len: self.len + next.len,
            ..self
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_and_narrow_within_their_bytes() {
        // SAFETY: never dereferenced: only the arithmetic is tested.
        let m = unsafe { DevMut::new(0x1000, 100, MemoryKind::Cuda) };
        let (a, b) = m.split_at(40);
        assert_eq!((a.addr(), a.len()), (0x1000, 40));
        assert_eq!((b.addr(), b.len()), (0x1000 + 40, 60));
        assert!(b.slice(10..61).is_none());
        let c = a.slice(5..15).expect("within");
        assert_eq!(
            (c.addr(), c.len(), c.kind()),
            (0x1005, 10, MemoryKind::Cuda)
        );
        let (all, none) = c.split_at(11);
        assert_eq!((all.len(), none.len(), none.addr()), (10, 0, 0x100f));
        let back = all.split_at(4);
        let whole = back.0.join(back.1).expect("adjacent");
        assert_eq!((whole.addr(), whole.len()), (0x1005, 10));
        let (p, q) = whole.split_at(5);
        assert!(q.join(p).is_err(), "not in order");
        // SAFETY: as above.
        let r = unsafe { DevRef::new(0x2000, 8, MemoryKind::Host) };
        assert_eq!(
            r.slice(8..8).map(|s| (s.addr(), s.len())),
            Some((0x2008, 0))
        );
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = r.slice(3..2);
        assert!(backwards.is_none());
        // Host bytes of a host region; none of device memory.
        let mut buf = [1u8, 2, 3, 4];
        // SAFETY: `buf` is reached only through the region while it lives.
        let mut m = unsafe { DevMut::new(buf.as_mut_ptr() as usize, 4, MemoryKind::Host) };
        m.host_mut().expect("host")[1] = 9;
        assert_eq!(
            m.as_ref().slice(1..3).and_then(DevRef::host),
            Some(&[9u8, 3][..])
        );
        // SAFETY: never dereferenced.
        let cuda = unsafe { DevRef::new(0x1000, 4, MemoryKind::Cuda) };
        assert!(cuda.host().is_none());
    }

    #[test]
    fn kinds_form_sets() {
        let s = MemoryKinds::NONE.with(MemoryKind::Host);
        assert!(s.contains(MemoryKind::Host) && !s.contains(MemoryKind::Cuda));
        assert!(s.and(MemoryKinds::NONE.with(MemoryKind::Cuda)).is_empty());
        assert!(!s.with(MemoryKind::Cuda).and(s).is_empty());
        assert_eq!(s.with(MemoryKind::Cuda), MemoryKinds::ALL);
    }
}
