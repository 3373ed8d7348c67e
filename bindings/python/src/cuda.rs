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
//! A [`CudaTensor`] views device memory owned by the DLPack producer (a torch
//! CUDA tensor) through a cudarc `CudaSlice` made with `upgrade_device_ptr`
//! and leaked (never freed) on drop. It is made only from a [`Buf`] of
//! device type kDLCUDA, whose pointer and length the producer gave (checked
//! as for host memory in `buffer.rs`), and the call that uses it owns that
//! `Buf`, which keeps the producer's tensor alive until the call is over.
//! The memory is on the device of the reducer it is made with (the DLPack
//! device id picks the reducer) and in the primary context, which cudarc and
//! torch share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::CudaSlice;
use oxccl::kernels::KernelError;
use oxccl::kernels::cuda::{CudaBuffer, CudaReducer, CudaSettings, probe};
use oxccl::{DType, Descriptor, DeviceMemory, ReduceOp};

use crate::buffer::Buf;

const BACKEND: &str = "cuda";

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

/// A producer's CUDA tensor, borrowed (see the module's Safety note).
pub(crate) struct CudaTensor {
    reducer: Arc<CudaReducer>,
    /// `None` for an empty tensor (whose pointer may be anything).
    data: Option<CudaSlice<u8>>,
    len: usize,
    scratch: Option<CudaSlice<u8>>,
}

impl std::fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaTensor")
            .field("len", &self.len)
            .field("device", &self.reducer.device_name())
            .finish_non_exhaustive()
    }
}

impl Drop for CudaTensor {
    fn drop(&mut self) {
        if let Some(d) = self.data.take() {
            // The producer owns the memory: forget it, never free it.
            let _ = d.leak();
        }
    }
}

impl CudaTensor {
    /// No memory, on `reducer`'s device.
    fn empty(reducer: &Arc<CudaReducer>) -> CudaTensor {
        CudaTensor {
            reducer: Arc::clone(reducer),
            data: None,
            len: 0,
            scratch: None,
        }
    }

    /// A view of `buf`'s device memory.
    fn of(buf: &Buf) -> Result<CudaTensor, oxccl::Error> {
        let (reducer, ptr) = buf.cuda().ok_or_else(|| {
            oxccl::Error::Internal("a host buffer where a CUDA tensor was expected".into())
        })?;
        let data = if buf.len() == 0 {
            None
        } else {
            // SAFETY: `ptr` points to `buf.len()` bytes of device memory on
            // `reducer`'s device, which `buf` keeps allocated while the call
            // that owns both runs (module Safety note); the slice is leaked on
            // drop, so it never frees them.
            Some(unsafe {
                reducer
                    .stream()
                    .upgrade_device_ptr::<u8>(ptr as u64, buf.len())
            })
        };
        Ok(CudaTensor {
            reducer: Arc::clone(reducer),
            data,
            len: buf.len(),
            scratch: None,
        })
    }
}

fn check_range(len: usize, offset: usize, bytes: usize) -> Result<(), KernelError> {
    match offset.checked_add(bytes) {
        Some(end) if end <= len => Ok(()),
        _ => Err(KernelError::Device {
            backend: BACKEND,
            message: format!("range {offset}+{bytes} outside a buffer of {len} bytes"),
        }),
    }
}

fn driver_error(what: &str, e: impl std::fmt::Display) -> KernelError {
    KernelError::Device {
        backend: BACKEND,
        message: format!("{what}: {e}"),
    }
}

impl DeviceMemory for CudaTensor {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn len_bytes(&self) -> usize {
        self.len
    }

    fn alloc_like(&self, bytes: usize) -> Result<Box<dyn DeviceMemory>, KernelError> {
        Ok(Box::new(CudaBuffer::new(Arc::clone(&self.reducer), bytes)?))
    }

    fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), KernelError> {
        check_range(self.len, offset, dst.len())?;
        let Some(data) = &self.data else {
            return Ok(());
        };
        if dst.is_empty() {
            return Ok(());
        }
        self.reducer
            .stream()
            .memcpy_dtoh(&data.slice(offset..offset + dst.len()), dst)
            .map_err(|e| driver_error("copy to host", e))?;
        self.reducer.synchronize()
    }

    fn write(&mut self, offset: usize, src: &[u8]) -> Result<(), KernelError> {
        check_range(self.len, offset, src.len())?;
        let Some(data) = &mut self.data else {
            return Ok(());
        };
        if src.is_empty() {
            return Ok(());
        }
        let stream = Arc::clone(self.reducer.stream());
        stream
            .memcpy_htod(src, &mut data.slice_mut(offset..offset + src.len()))
            .map_err(|e| driver_error("copy to device", e))
    }

    fn reduce_from_host(
        &mut self,
        dtype: DType,
        op: ReduceOp,
        offset: usize,
        src: &[u8],
    ) -> Result<(), KernelError> {
        check_range(self.len, offset, src.len())?;
        let Some(data) = &mut self.data else {
            return Ok(());
        };
        if src.is_empty() {
            return Ok(());
        }
        let reducer = Arc::clone(&self.reducer);
        let mut scratch = match self.scratch.take() {
            Some(s) if s.len() >= src.len() => s,
            _ => reducer.alloc(src.len().next_power_of_two())?,
        };
        let staged = reducer
            .stream()
            .memcpy_htod(src, &mut scratch.slice_mut(..src.len()))
            .map_err(|e| driver_error("stage to device", e))
            .and_then(|()| reducer.reduce(dtype, op, data, offset, &scratch, 0, src.len()));
        self.scratch = Some(scratch);
        staged
    }

    fn finish_avg(
        &mut self,
        dtype: DType,
        offset: usize,
        len: usize,
        contributions: usize,
    ) -> Result<(), KernelError> {
        check_range(self.len, offset, len)?;
        let Some(data) = &mut self.data else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        let reducer = Arc::clone(&self.reducer);
        reducer.finish_avg(dtype, data, offset, len, contributions)
    }
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
        (Some(r), None) if output.len() == 0 => CudaTensor::empty(r),
        (Some(a), Some(b)) if Arc::ptr_eq(a, b) => CudaTensor::of(output)?,
        (None, Some(_)) if input.is_none() => CudaTensor::of(output)?,
        _ => return Err(mixed(&d)),
    };
    let inp = input.map(CudaTensor::of).transpose()?;
    let r = c.run_device(d, inp.as_ref().map(|i| i as &dyn DeviceMemory), &mut out);
    let synced = out.reducer.synchronize().map_err(oxccl::Error::from);
    r.and(synced)
}

fn mixed(d: &Descriptor) -> oxccl::Error {
    oxccl::Error::InvalidArgument(format!(
        "{d}: input and output must both be CUDA tensors of one device, or both host memory"
    ))
}
