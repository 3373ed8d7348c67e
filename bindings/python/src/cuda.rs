//! CUDA tensors (DLPack device type kDLCUDA) as oxccl device buffers
//! (feature `cuda`): the collectives of `Communicator` run on them through
//! [`oxccl::Communicator::run_device`], staging slices through the host and
//! reducing on the device with oxccl's CUDA kernels.
//!
//! libcuda and libnvrtc are loaded at run time; [`reducer`] probes for both
//! before any CUDA call (cudarc panics on a missing library), so a process
//! without a driver gets oxccl's `UnavailableBackend` error ("CUDA driver
//! not found (libcuda.so)"), never a panic.
//!
//! # Safety
//!
//! A producer's CUDA tensor is viewed as a [`CudaBuffer::borrowed`] (a
//! cudarc `CudaSlice` made with `upgrade_device_ptr` and leaked, never
//! freed, on drop). It is made only from a [`Buf`] of
//! device type kDLCUDA, whose pointer and length the producer gave (checked
//! as for host memory in `buffer.rs`), and the call that uses it owns that
//! `Buf`, which keeps the producer's tensor alive until the call is over.
//! The memory is on the device of the reducer it is made with (the DLPack
//! device id picks the reducer) and in the primary context, which cudarc and
//! torch share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use oxccl::kernels::KernelError;
use oxccl::kernels::cuda::{CudaBuffer, CudaReducer, CudaSettings, probe};
use oxccl::{Descriptor, DeviceMemory};

use crate::buffer::Buf;

/// The reducer (context, stream, kernels) of device `ordinal`, made once
/// per process, after checking that libcuda and libnvrtc can be loaded.
/// `include_dirs`: where NVRTC finds `cuda_fp16.h` (see
/// `oxccl::kernels::cuda`), used when the device's reducer is first made.
pub(crate) fn reducer(
    ordinal: usize,
    include_dirs: impl FnOnce() -> Vec<std::path::PathBuf>,
) -> Result<Arc<CudaReducer>, KernelError> {
    probe()?;
    static REDUCERS: OnceLock<Mutex<HashMap<usize, Arc<CudaReducer>>>> = OnceLock::new();
    let mut map = crate::work::lock(REDUCERS.get_or_init(Default::default));
    if let Some(r) = map.get(&ordinal) {
        return Ok(Arc::clone(r));
    }
    let r = CudaReducer::new(&CudaSettings {
        ordinal,
        include_dirs: include_dirs(),
    })?;
    map.insert(ordinal, Arc::clone(&r));
    Ok(r)
}

/// The raw stream handle a DLPack producer is asked to order its work
/// before (`__dlpack__(stream=...)`): the reducer's stream, or 1 (the
/// legacy default stream, in DLPack's numbering) when that is the null
/// stream.
pub(crate) fn dlpack_stream(r: &CudaReducer) -> usize {
    let s = r.stream().cu_stream() as usize;
    if s == 0 { 1 } else { s }
}

/// A view of `buf`'s device memory (see the module's Safety note).
fn view(buf: &Buf) -> Result<CudaBuffer, oxccl::Error> {
    let (reducer, ptr) = buf.cuda().ok_or_else(|| {
        oxccl::Error::Internal("a host buffer where a CUDA tensor was expected".into())
    })?;
    // SAFETY: `ptr` points to `buf.len()` bytes of device memory on
    // `reducer`'s device, which `buf` keeps allocated while the call that
    // owns both runs (module Safety note); the buffer never frees it.
    Ok(unsafe { CudaBuffer::borrowed(Arc::clone(reducer), ptr as u64, buf.len())? })
}

/// Runs the collective `d` on CUDA tensors (`input` None: in place), and
/// waits for the device: the results are in `output` when it returns.
pub(crate) fn run(
    c: &mut oxccl::Communicator,
    d: Descriptor,
    input: Option<&Buf>,
    output: &Buf,
) -> oxccl::Result<()> {
    let in_reducer = input.and_then(|i| i.cuda()).map(|(r, _)| r);
    let out_reducer = output.cuda().map(|(r, _)| r);
    let mut out = match (in_reducer, out_reducer) {
        // A non-root's reduce: no output (an empty host buffer).
        (Some(r), None) if output.len() == 0 => CudaBuffer::new(Arc::clone(r), 0)?,
        (Some(a), Some(b)) if Arc::ptr_eq(a, b) => view(output)?,
        (None, Some(_)) if input.is_none() => view(output)?,
        _ => return Err(mixed(&d)),
    };
    let inp = input.map(view).transpose()?;
    let r = c.run_device(d, inp.as_ref().map(|i| i as &dyn DeviceMemory), &mut out);
    let synced = out.reducer().synchronize().map_err(oxccl::Error::from);
    r.and(synced)
}

fn mixed(d: &Descriptor) -> oxccl::Error {
    oxccl::Error::InvalidArgument(format!(
        "{d}: input and output must both be CUDA tensors of one device, or both host memory"
    ))
}
