//! Host memory that collectives treat as a device buffer reached by
//! address: what a link that moves device memory itself (UCX with CUDA)
//! sees, on a machine without a device.
//!
//! A [`HostDevice`] never hands out Rust references to its bytes while
//! they may be lent: it owns them as [`UnsafeCell`]s and reads and writes
//! them only through addresses, as a device's memory is, so a link writing
//! into one region while a kernel ([`HostOps`]) reduces another is what
//! the device path does, with nothing a CUDA machine would add. Its
//! reductions are the CPU reducer's. The engine's device path over UCX's
//! TCP and shared-memory transports is tested with it.
//!
//! # Safety
//!
//! One of the places where `kernels` uses `unsafe`. The invariants:
//!
//! * A buffer's bytes live in one heap allocation of `UnsafeCell<u8>` that
//!   neither moves nor shrinks while the buffer lives; every access goes
//!   through a raw pointer to it, within its length.
//! * A [`DevMut`] or [`DevRef`] of the buffer is made only from `&mut self`
//!   or `&self` respectively, for that borrow, so its contract (valid,
//!   unaliased for its lifetime) holds.
//! * [`HostOps`] reaches regions only through their host slices
//!   ([`DevMut::host_mut`], [`DevRef::host`]), destination and source
//!   checked not to overlap ([`check_regions`]).

use std::cell::UnsafeCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::cpu::CpuReducer;
use crate::{
    DType, DevMut, DevRef, DeviceMemory, DeviceOps, KernelError, MemoryKind, ReduceOp, Reducer,
    check_host_side, check_regions,
};

const BACKEND: &str = "hostdev";

/// Host bytes reached only by address, as a device's are.
pub struct HostDevice {
    mem: Box<[UnsafeCell<u8>]>,
    /// Bytes copied or reduced through host staging ([`DeviceMemory`]'s
    /// `read`, `write`, `reduce_from_host`): none when links move the
    /// buffer by address.
    staged: AtomicUsize,
}

// SAFETY: the bytes are plain `u8`s owned by the buffer; moving the owner
// to another thread moves the only way to reach them (regions lent from it
// borrow it and cannot outlive that).
unsafe impl Send for HostDevice {}

impl std::fmt::Debug for HostDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostDevice")
            .field("len", &self.mem.len())
            .finish()
    }
}

impl HostDevice {
    /// `bytes` zeroed bytes.
    pub fn zeroed(bytes: usize) -> HostDevice {
        HostDevice {
            mem: (0..bytes).map(|_| UnsafeCell::new(0)).collect(),
            staged: AtomicUsize::new(0),
        }
    }

    /// A copy of `data`.
    pub fn from_host(data: &[u8]) -> HostDevice {
        HostDevice {
            mem: data.iter().map(|&b| UnsafeCell::new(b)).collect(),
            staged: AtomicUsize::new(0),
        }
    }

    /// The bytes, copied out.
    pub fn to_host(&self) -> Vec<u8> {
        let mut out = vec![0; self.mem.len()];
        self.copy_out(0, &mut out);
        out
    }

    /// Bytes that went through host staging so far (read to the host,
    /// written or reduced from it through [`DeviceMemory`]).
    pub fn staged_bytes(&self) -> usize {
        self.staged.load(Ordering::Relaxed)
    }

    fn base(&self) -> *mut u8 {
        UnsafeCell::raw_get(self.mem.as_ptr())
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), KernelError> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.mem.len())
        {
            return Err(KernelError::Unsupported {
                backend: BACKEND,
                what: format!(
                    "range {offset}+{len} beyond a buffer of {} bytes",
                    self.mem.len()
                ),
            });
        }
        Ok(())
    }

    /// Copies bytes `offset..` into `dst`; the range is checked by the caller.
    fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        // SAFETY: `offset + dst.len()` is within the allocation (checked by
        // the caller); `dst` is the caller's own memory, not ours.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base().add(offset), dst.as_mut_ptr(), dst.len())
        }
    }

    fn region(&self) -> DevRef<'_> {
        // SAFETY: the allocation lives and is not written through `&self`
        // for the borrow (see the module's notes).
        unsafe { DevRef::new(self.base() as usize, self.mem.len(), MemoryKind::Host) }
    }

    fn region_mut(&mut self) -> DevMut<'_> {
        // SAFETY: the allocation lives, and `&mut self` keeps every other
        // access away, for the borrow.
        unsafe { DevMut::new(self.base() as usize, self.mem.len(), MemoryKind::Host) }
    }
}

impl DeviceMemory for HostDevice {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn len_bytes(&self) -> usize {
        self.mem.len()
    }

    fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), KernelError> {
        self.check(offset, dst.len())?;
        self.staged.fetch_add(dst.len(), Ordering::Relaxed);
        self.copy_out(offset, dst);
        Ok(())
    }

    fn write(&mut self, offset: usize, src: &[u8]) -> Result<(), KernelError> {
        self.check(offset, src.len())?;
        self.staged.fetch_add(src.len(), Ordering::Relaxed);
        let dst = self.region_mut().slice(offset..offset + src.len());
        HostOps.write(dst.ok_or_else(|| range_error(offset, src.len()))?, src)
    }

    fn reduce_from_host(
        &mut self,
        dtype: DType,
        op: ReduceOp,
        offset: usize,
        src: &[u8],
    ) -> Result<(), KernelError> {
        self.check(offset, src.len())?;
        self.staged.fetch_add(src.len(), Ordering::Relaxed);
        let dst = self.region_mut().slice(offset..offset + src.len());
        HostOps.reduce_from_host(
            dtype,
            op,
            dst.ok_or_else(|| range_error(offset, src.len()))?,
            src,
        )
    }

    fn alloc_like(&self, bytes: usize) -> Result<Box<dyn DeviceMemory>, KernelError> {
        Ok(Box::new(HostDevice::zeroed(bytes)))
    }

    fn finish_avg(
        &mut self,
        dtype: DType,
        offset: usize,
        len: usize,
        contributions: usize,
    ) -> Result<(), KernelError> {
        self.check(offset, len)?;
        let dst = self.region_mut().slice(offset..offset + len);
        HostOps.finish_avg(
            dtype,
            dst.ok_or_else(|| range_error(offset, len))?,
            contributions,
        )
    }

    fn addressed(&self) -> Option<(DevRef<'_>, Arc<dyn DeviceOps>)> {
        Some((self.region(), Arc::new(HostOps)))
    }

    fn addressed_mut(&mut self) -> Option<(DevMut<'_>, Arc<dyn DeviceOps>)> {
        Some((self.region_mut(), Arc::new(HostOps)))
    }
}

fn range_error(offset: usize, len: usize) -> KernelError {
    KernelError::Unsupported {
        backend: BACKEND,
        what: format!("range {offset}+{len}"),
    }
}

/// The operations on host memory reached by address, computed by the CPU
/// reducer.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostOps;

impl HostOps {
    /// A region's bytes, writable, for one operation: empty for device
    /// memory, which the checks of every operation refuse first.
    fn bytes_mut<'r>(dst: &'r mut DevMut<'_>) -> &'r mut [u8] {
        dst.host_mut().unwrap_or_default()
    }

    fn bytes<'r>(src: &DevRef<'r>) -> &'r [u8] {
        src.host().unwrap_or_default()
    }
}

impl DeviceOps for HostOps {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::Host
    }

    fn read(&self, src: DevRef<'_>, dst: &mut [u8]) -> Result<(), KernelError> {
        check_host_side(self, src.kind(), src.len(), dst.len())?;
        dst.copy_from_slice(Self::bytes(&src));
        Ok(())
    }

    fn write(&self, mut dst: DevMut<'_>, src: &[u8]) -> Result<(), KernelError> {
        check_host_side(self, dst.kind(), dst.len(), src.len())?;
        Self::bytes_mut(&mut dst).copy_from_slice(src);
        Ok(())
    }

    fn copy(&self, mut dst: DevMut<'_>, src: DevRef<'_>) -> Result<(), KernelError> {
        check_regions(self, &dst, Some(&src))?;
        Self::bytes_mut(&mut dst).copy_from_slice(Self::bytes(&src));
        Ok(())
    }

    fn reduce(
        &self,
        dtype: DType,
        op: ReduceOp,
        mut dst: DevMut<'_>,
        src: DevRef<'_>,
    ) -> Result<(), KernelError> {
        check_regions(self, &dst, Some(&src))?;
        CpuReducer.reduce(dtype, op, Self::bytes_mut(&mut dst), Self::bytes(&src))
    }

    fn reduce_from_host(
        &self,
        dtype: DType,
        op: ReduceOp,
        mut dst: DevMut<'_>,
        src: &[u8],
    ) -> Result<(), KernelError> {
        check_host_side(self, dst.kind(), dst.len(), src.len())?;
        CpuReducer.reduce(dtype, op, Self::bytes_mut(&mut dst), src)
    }

    fn finish_avg(
        &self,
        dtype: DType,
        mut dst: DevMut<'_>,
        contributions: usize,
    ) -> Result<(), KernelError> {
        check_regions(self, &dst, None)?;
        CpuReducer.finish_avg(dtype, Self::bytes_mut(&mut dst), contributions)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn i32s(b: &[u8]) -> Vec<i32> {
        b.chunks_exact(4)
            .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn a_host_device_reduces_copies_and_refuses_what_it_should() {
        let mut a = HostDevice::from_host(bytemuck::cast_slice(&[1i32, 2, 3, 4]));
        let b = HostDevice::from_host(bytemuck::cast_slice(&[10i32, 20, 30, 40]));
        let (src, ops) = b.addressed().unwrap();
        {
            let (dst, _) = a.addressed_mut().unwrap();
            let (lo, hi) = dst.split_at(8);
            ops.reduce(DType::I32, ReduceOp::Sum, hi, src.slice(8..16).unwrap())
                .unwrap();
            ops.copy(lo, src.slice(0..8).unwrap()).unwrap();
        }
        let got = i32s(&a.to_host());
        assert_eq!(got, [10, 20, 33, 44]);

        let mut host = [0u8; 8];
        ops.read(src.slice(4..12).unwrap(), &mut host).unwrap();
        assert_eq!(i32s(&host), [20, 30]);

        // Overlapping, mismatched, or of another kind: refused before any
        // byte is touched (safe code cannot make such regions: these are
        // made by hand, and never dereferenced).
        // SAFETY: refused by the checks, never dereferenced.
        let (d, s) = unsafe {
            (
                DevMut::new(0x1004, 8, MemoryKind::Host),
                DevRef::new(0x1000, 8, MemoryKind::Host),
            )
        };
        let e = ops.copy(d, s).unwrap_err();
        assert!(e.to_string().contains("overlapping"), "{e}");
        // SAFETY: as above.
        let (d, s) = unsafe {
            (
                DevMut::new(0x1000, 8, MemoryKind::Host),
                DevRef::new(0x2000, 4, MemoryKind::Host),
            )
        };
        assert!(matches!(
            ops.reduce(DType::I32, ReduceOp::Sum, d, s),
            Err(KernelError::LengthMismatch { .. })
        ));
        // SAFETY: as above.
        let cuda = unsafe { DevMut::new(0x1000, 8, MemoryKind::Cuda) };
        let e = ops.write(cuda, &[0; 8]).unwrap_err();
        assert!(e.to_string().contains("cuda memory"), "{e}");
    }

    #[test]
    fn a_host_device_averages_and_checks_ranges() {
        let mut a = HostDevice::from_host(bytemuck::cast_slice(&[4.0f32, 8.0]));
        a.finish_avg(DType::F32, 4, 4, 4).unwrap();
        a.reduce_from_host(
            DType::F32,
            ReduceOp::Max,
            0,
            bytemuck::cast_slice(&[5.0f32]),
        )
        .unwrap();
        let got: Vec<f32> = i32s(&a.to_host())
            .into_iter()
            .map(|i| f32::from_bits(i as u32))
            .collect();
        assert_eq!(got, [5.0, 2.0]);
        assert!(a.write(6, &[0; 4]).is_err());
        assert!(a.read(8, &mut [0; 1]).is_err());
    }
}
