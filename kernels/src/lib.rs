//! Reduction kernels for oxccl.
//!
//! This crate owns the element types ([`DType`]), the reduction operations
//! ([`ReduceOp`]) and the reducers that apply them to byte buffers:
//!
//! * [`reference`](mod@reference): naive element-by-element loops. It is the oracle every
//!   other reducer and every collective is tested against.
//! * [`cpu`]: the host reducer, written so that the compiler vectorizes it
//!   (f16 and bf16 are widened to f32 in blocks).
//!
//! All reducers implement [`Reducer`], which works on byte slices plus a
//! [`DType`] so that the collective engine and the C bindings can drive them
//! without generics. Typed callers use the [`Element`] trait to map a Rust type
//! to its [`DType`].
//!
//! # Semantics shared by every reducer
//!
//! * `Sum`, `Prod`, `Min`, `Max` are applied element-wise: `dst[i] = op(dst[i], src[i])`.
//!   Integers wrap on overflow (two's complement), as in NCCL.
//! * `Min` and `Max` propagate NaN: if either operand is NaN the result is NaN
//!   (like `torch.maximum`, unlike C's `fmaxf`), so that a NaN in any rank's
//!   gradient is never silently dropped.
//! * f16 and bf16 are computed in f32 and rounded back to nearest-even after
//!   each reduction.
//! * `Avg` reduces as `Sum`; the caller then applies [`Reducer::finish_avg`]
//!   once with the number of contributions. For floats that divides by the
//!   count; for integers it is the sum divided by the count, truncated toward
//!   zero (Rust's and C's integer division), computed on the wrapped sum.

// Unit tests share the integration tests' helpers, which name the crate.
#[cfg(test)]
extern crate self as oxccl_kernels;
#[cfg(test)]
#[path = "../tests/common/mod.rs"]
mod test_common;

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod dtype;
mod error;
pub mod hostdev;
pub mod reference;
#[cfg(feature = "wgpu")]
pub mod wgpu;

pub use dtype::{DType, Element, ReduceOp};
pub use error::KernelError;
pub use oxccl_memory::{DevMut, DevRef, MemoryKind, MemoryKinds};

use std::sync::Arc;

/// Applies reductions to buffers that live somewhere the reducer can reach.
///
/// Host reducers work on host byte slices. Both slices hold elements of
/// `dtype` in native byte order; they need not be aligned.
pub trait Reducer: Send + Sync + std::fmt::Debug {
    /// Short name for logs ("reference", "cpu", ...).
    fn name(&self) -> &'static str;

    /// `dst[i] = op(dst[i], src[i])` for every element. `Avg` behaves as `Sum`.
    ///
    /// Errors when the lengths differ or are not a multiple of the element size.
    fn reduce(
        &self,
        dtype: DType,
        op: ReduceOp,
        dst: &mut [u8],
        src: &[u8],
    ) -> Result<(), KernelError>;

    /// Turns a sum of `contributions` values into their average, in place.
    fn finish_avg(
        &self,
        dtype: DType,
        dst: &mut [u8],
        contributions: usize,
    ) -> Result<(), KernelError>;
}

/// Memory on a device that collectives work on through host staging:
/// slices are read to the host to be sent and written or reduced into the
/// device when received, with the reduction running on the device.
///
/// Offsets and lengths are in bytes. Offsets passed to `reduce_from_host` and
/// `finish_avg` must be multiples of the element size; `read` and `write`
/// take any byte offset.
pub trait DeviceMemory: Send + std::fmt::Debug {
    /// Backend name ("wgpu", "cuda").
    fn backend(&self) -> &'static str;
    /// Length of the buffer in bytes.
    fn len_bytes(&self) -> usize;
    /// device → host: copies bytes `[offset, offset + dst.len())` into `dst`.
    fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), KernelError>;
    /// host → device: copies `src` to bytes `[offset, offset + src.len())`.
    fn write(&mut self, offset: usize, src: &[u8]) -> Result<(), KernelError>;
    /// `self[offset..offset + src.len()] = op(self[..], src)`, computed on the
    /// device (`src` is staged into a reused device scratch buffer first).
    /// `Avg` behaves as `Sum`.
    fn reduce_from_host(
        &mut self,
        dtype: DType,
        op: ReduceOp,
        offset: usize,
        src: &[u8],
    ) -> Result<(), KernelError>;
    /// A new zeroed buffer of `bytes` on the same device, for the scratch
    /// space some collectives need (a reduce's intermediate ranks, an
    /// out-of-place reduce-scatter).
    fn alloc_like(&self, bytes: usize) -> Result<Box<dyn DeviceMemory>, KernelError> {
        Err(KernelError::Unsupported {
            backend: self.backend(),
            what: format!("allocating a {bytes}-byte scratch buffer"),
        })
    }
    /// Turns sums of `contributions` values into averages over
    /// `[offset, offset + len)`, on the device.
    fn finish_avg(
        &mut self,
        dtype: DType,
        offset: usize,
        len: usize,
        contributions: usize,
    ) -> Result<(), KernelError>;
    /// The buffer by address, read-only, with the operations that work on
    /// it there ([`DeviceOps`]); `None` (the default) for a backend whose
    /// memory has no address a link could use (wgpu).
    fn addressed(&self) -> Option<(DevRef<'_>, Arc<dyn DeviceOps>)> {
        None
    }
    /// The buffer by address, lent exclusively, with its operations; `None`
    /// (the default) as for [`addressed`](Self::addressed).
    fn addressed_mut(&mut self) -> Option<(DevMut<'_>, Arc<dyn DeviceOps>)> {
        None
    }
}

/// Operations on one device's memory by address ([`DevMut`], [`DevRef`]):
/// what a collective runs when its links move the buffer's bytes
/// themselves (UCX with CUDA memory), so that nothing is staged through
/// the host on the way.
///
/// Every operation is complete, as far as a link that reads the memory
/// next can tell, when it returns. Regions must be of the device's
/// [`kind`](Self::kind); a destination and a source may not overlap.
pub trait DeviceOps: Send + Sync + std::fmt::Debug {
    /// Backend name ("hostdev", "cuda").
    fn backend(&self) -> &'static str;
    /// The kind of memory the operations work on.
    fn kind(&self) -> MemoryKind;
    /// device → host.
    fn read(&self, src: DevRef<'_>, dst: &mut [u8]) -> Result<(), KernelError>;
    /// host → device.
    fn write(&self, dst: DevMut<'_>, src: &[u8]) -> Result<(), KernelError>;
    /// device → device, `dst.len() == src.len()`.
    fn copy(&self, dst: DevMut<'_>, src: DevRef<'_>) -> Result<(), KernelError>;
    /// `dst[i] = op(dst[i], src[i])` on the device; `Avg` behaves as `Sum`.
    fn reduce(
        &self,
        dtype: DType,
        op: ReduceOp,
        dst: DevMut<'_>,
        src: DevRef<'_>,
    ) -> Result<(), KernelError>;
    /// `dst[i] = op(dst[i], src[i])` with `src` on the host, reduced on the device.
    fn reduce_from_host(
        &self,
        dtype: DType,
        op: ReduceOp,
        dst: DevMut<'_>,
        src: &[u8],
    ) -> Result<(), KernelError>;
    /// Turns sums of `contributions` values in `dst` into averages.
    fn finish_avg(
        &self,
        dtype: DType,
        dst: DevMut<'_>,
        contributions: usize,
    ) -> Result<(), KernelError>;
}

/// Checks that a region of `kind` and `len` bytes and `host` bytes of host
/// memory may be the two sides of a [`DeviceOps`] copy or reduction of
/// `ops`: the region of its kind, both of one length.
pub fn check_host_side(
    ops: &dyn DeviceOps,
    kind: MemoryKind,
    len: usize,
    host: usize,
) -> Result<(), KernelError> {
    if kind != ops.kind() {
        return Err(KernelError::Unsupported {
            backend: ops.backend(),
            what: format!("{kind} memory (it works on {} memory)", ops.kind()),
        });
    }
    if len != host {
        return Err(KernelError::LengthMismatch {
            dst: len,
            src: host,
        });
    }
    Ok(())
}

/// Checks that `dst` and `src` (`src_len` bytes at `src_addr`) may be the
/// two sides of a [`DeviceOps`] operation of `ops`: both of its kind, the
/// same length, not overlapping.
pub fn check_regions(
    ops: &dyn DeviceOps,
    dst: &DevMut<'_>,
    src: Option<&DevRef<'_>>,
) -> Result<(), KernelError> {
    let wrong = |kind: MemoryKind| KernelError::Unsupported {
        backend: ops.backend(),
        what: format!("{kind} memory (it works on {} memory)", ops.kind()),
    };
    if dst.kind() != ops.kind() {
        return Err(wrong(dst.kind()));
    }
    let Some(src) = src else { return Ok(()) };
    if src.kind() != ops.kind() {
        return Err(wrong(src.kind()));
    }
    if src.len() != dst.len() {
        return Err(KernelError::LengthMismatch {
            dst: dst.len(),
            src: src.len(),
        });
    }
    let (d, s) = (dst.addr(), src.addr());
    if !dst.is_empty() && d < s + src.len() && s < d + dst.len() {
        return Err(KernelError::Unsupported {
            backend: ops.backend(),
            what: format!(
                "overlapping regions ({:#x}+{} and {:#x}+{})",
                d,
                dst.len(),
                s,
                src.len()
            ),
        });
    }
    Ok(())
}

/// Checks the common preconditions of [`Reducer::reduce`] and returns the
/// element count.
pub fn check_reduce_args(dtype: DType, dst: &[u8], src: &[u8]) -> Result<usize, KernelError> {
    if dst.len() != src.len() {
        return Err(KernelError::LengthMismatch {
            dst: dst.len(),
            src: src.len(),
        });
    }
    check_len(dtype, dst.len())
}

/// Checks that `bytes` is a whole number of `dtype` elements and returns the count.
pub fn check_len(dtype: DType, bytes: usize) -> Result<usize, KernelError> {
    if bytes % dtype.size() != 0 {
        return Err(KernelError::Misaligned { dtype, bytes });
    }
    Ok(bytes / dtype.size())
}
