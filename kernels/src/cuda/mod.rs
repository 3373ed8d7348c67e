//! Reductions on NVIDIA GPUs: CUDA C kernels compiled at run time with NVRTC.
//!
//! The kernels are in `reduce.cu` (embedded with `include_str!`; `ci/cuda-ptx.sh`
//! compiles the same text for compute_80/compute_90 and assembles it with
//! ptxas). They cover every dtype and op, f16/bf16 computed in float and
//! rounded to nearest even, with 16-byte loads and stores when both pointers
//! are 16-byte aligned. The source is compiled once per process for each
//! compute capability in use (the PTX is cached), and loaded once per
//! [`CudaReducer`].
//!
//! libcuda and libnvrtc are loaded at run time (cudarc's `dynamic-loading`),
//! so the crate builds without a toolkit. Every entry point first checks that
//! both libraries can be loaded and returns [`KernelError::Unavailable`]
//! ("CUDA driver not found (libcuda.so)") where they cannot: cudarc panics
//! on a missing library instead of returning an error.
//!
//! The kernels include `cuda_fp16.h` and `cuda_bf16.h`, which NVRTC 12.9 does
//! not have built in: it looks for them in [`CudaSettings::include_dirs`],
//! then in `/usr/local/cuda/include`. A machine with a driver but no toolkit
//! gets them from the `nvidia-cuda-runtime-cu12` wheel
//! (`site-packages/nvidia/cuda_runtime/include`), which is what
//! `ci/gpu-test` does.
//!
//! # Safety
//!
//! `unsafe` is used for three things: probing for the CUDA libraries
//! (cudarc's `is_culib_present`, which only tries to `dlopen` them),
//! wrapping memory that another library allocated
//! ([`CudaBuffer::borrowed`], whose caller vouches for the pointer; the
//! buffer leaks it on drop, never frees it), and launching kernels. A launch is sound when the pointers it passes point to
//! device memory of at least `n` elements of the kernel's type that stays
//! allocated until the kernel has run: every launch here derives its pointers
//! from a [`CudaSlice`] borrowed for the call, after checking `offset + bytes`
//! against the slice's length, and keeps cudarc's [`SyncOnDrop`] guards (which
//! record the use on the stream, so that a later free or reuse waits for the
//! kernel) alive until the launch is queued. The argument types match the
//! kernels' C signatures: `(T*, const T*, size_t)` for reductions and
//! `(T*, size_t, divisor)` for averages, the divisor being `u64` for integers,
//! `double` for f64 and `float` otherwise. The operations by address
//! ([`DeviceOps`], the path where UCX moves device memory itself) take
//! their pointers from [`DevMut`] and [`DevRef`] regions, whose makers
//! vouch that they are live device memory for the region's lifetime; each
//! such operation waits for the stream before it returns, so the region
//! outlives its use.

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError,
    LaunchConfig, PushKernelArg, SyncOnDrop,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::{
    DType, DevMut, DevRef, DeviceMemory, DeviceOps, KernelError, MemoryKind, ReduceOp,
    check_host_side, check_len, check_regions,
};

const BACKEND: &str = "cuda";
/// The CUDA C source of every kernel.
pub const SOURCE: &str = include_str!("reduce.cu");
const BLOCK: u32 = 256;

/// What the CUDA backend needs to start.
#[derive(Debug, Clone, Default)]
pub struct CudaSettings {
    /// Device ordinal.
    pub ordinal: usize,
    /// Extra include directories for NVRTC (where `cuda_fp16.h` lives, if
    /// NVRTC's built-in headers lack it).
    pub include_dirs: Vec<PathBuf>,
}

fn unavailable(reason: impl Into<String>) -> KernelError {
    KernelError::Unavailable {
        backend: BACKEND,
        reason: reason.into(),
    }
}

fn driver_error(what: &str, e: DriverError) -> KernelError {
    KernelError::Device {
        backend: BACKEND,
        message: format!("{what}: {e}"),
    }
}

/// Checks that libcuda and libnvrtc can be loaded, before any cudarc call
/// (cudarc panics when they cannot).
pub fn probe() -> Result<(), KernelError> {
    // SAFETY: `is_culib_present` only tries `dlopen` on the library's
    // candidate names and drops what it opened; it reads no global state.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(unavailable("CUDA driver not found (libcuda.so)"));
    }
    // SAFETY: as above, for libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(unavailable(
            "NVRTC not found (libnvrtc.so; install the CUDA toolkit or nvidia-cuda-nvrtc-cu12)",
        ));
    }
    Ok(())
}

/// Runs `f`, turning a panic inside cudarc (a missing symbol in an old
/// driver, for instance) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, KernelError>) -> Result<T, KernelError> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("panic");
        Err(unavailable(format!("{what}: {msg}")))
    })
}

/// PTX per compute capability, compiled once per process.
fn ptx_for(cc: (i32, i32), settings: &CudaSettings) -> Result<String, KernelError> {
    static CACHE: OnceLock<Mutex<HashMap<(i32, i32), String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ptx) = cache.get(&cc) {
        return Ok(ptx.clone());
    }
    let mut include_paths: Vec<String> = settings
        .include_dirs
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    include_paths.push("/usr/local/cuda/include".to_string());
    let opts = CompileOptions {
        prec_div: Some(true),
        ftz: Some(false),
        fmad: Some(false),
        include_paths,
        options: vec![
            format!("--gpu-architecture=compute_{}{}", cc.0, cc.1),
            "--std=c++17".to_string(),
        ],
        name: Some("reduce.cu".to_string()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)
        .map_err(|e| KernelError::Device {
            backend: BACKEND,
            message: format!("NVRTC compile for compute_{}{}: {e:?}", cc.0, cc.1),
        })?
        .to_src();
    cache.insert(cc, ptx.clone());
    Ok(ptx)
}

fn op_name(op: ReduceOp) -> &'static str {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => "sum",
        ReduceOp::Prod => "prod",
        ReduceOp::Max => "max",
        ReduceOp::Min => "min",
    }
}

/// Runs the kernels on one device, on its own stream.
pub struct CudaReducer {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<String, CudaFunction>,
    name: String,
    compute_capability: (i32, i32),
    sm_count: u32,
    /// Device memory for host bytes a [`DeviceOps::reduce_from_host`]
    /// stages, reused from call to call (grown to a power of two).
    staging: Mutex<Option<CudaSlice<u8>>>,
}

impl std::fmt::Debug for CudaReducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaReducer")
            .field("device", &self.name)
            .field("compute_capability", &self.compute_capability)
            .finish_non_exhaustive()
    }
}

impl CudaReducer {
    /// Opens device `settings.ordinal`, compiles (once per process) and loads
    /// the kernels.
    pub fn new(settings: &CudaSettings) -> Result<Arc<CudaReducer>, KernelError> {
        probe()?;
        guarded("CUDA initialization", || {
            let ctx = CudaContext::new(settings.ordinal).map_err(|e| {
                unavailable(format!("cannot open CUDA device {}: {e}", settings.ordinal))
            })?;
            let cc = ctx
                .compute_capability()
                .map_err(|e| driver_error("compute capability", e))?;
            let name = ctx.name().map_err(|e| driver_error("device name", e))?;
            let sm_count = ctx
                .attribute(
                    cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                )
                .map_err(|e| driver_error("SM count", e))?;
            let ptx = ptx_for(cc, settings)?;
            let module = ctx
                .load_module(Ptx::from_src(ptx))
                .map_err(|e| driver_error("load module", e))?;
            let mut functions = HashMap::new();
            for dtype in DType::ALL {
                let mut names = vec![format!("oxccl_avg_{dtype}")];
                for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Max, ReduceOp::Min] {
                    names.push(format!("oxccl_reduce_{dtype}_{}", op_name(op)));
                }
                for n in names {
                    let f = module
                        .load_function(&n)
                        .map_err(|e| driver_error(&format!("load {n}"), e))?;
                    functions.insert(n, f);
                }
            }
            let stream = ctx
                .new_stream()
                .map_err(|e| driver_error("new stream", e))?;
            Ok(Arc::new(CudaReducer {
                ctx,
                stream,
                functions,
                name,
                compute_capability: cc,
                sm_count: sm_count.max(1) as u32,
                staging: Mutex::new(None),
            }))
        })
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// The device's compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// The stream every kernel and copy of this reducer runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Peak memory bandwidth in bytes/s from the device's memory clock and
    /// bus width (double data rate).
    pub fn peak_memory_bandwidth(&self) -> Result<f64, KernelError> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let clock_khz = self
            .ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
            .map_err(|e| driver_error("memory clock", e))?;
        let bus_bits = self
            .ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)
            .map_err(|e| driver_error("bus width", e))?;
        Ok(2.0 * f64::from(clock_khz) * 1e3 * f64::from(bus_bits) / 8.0)
    }

    /// Allocates `bytes` zeroed bytes on the device.
    pub fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>, KernelError> {
        self.stream
            .alloc_zeros::<u8>(bytes.max(16))
            .map_err(|e| driver_error("alloc", e))
    }

    /// Makes the reducer's context current on this thread, for the driver
    /// calls made on raw addresses.
    fn bind(&self) -> Result<(), KernelError> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_error("bind context", e))
    }

    /// Waits for all the work queued on the reducer's stream.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error("synchronize", e))
    }

    fn function(&self, name: &str) -> Result<&CudaFunction, KernelError> {
        self.functions.get(name).ok_or_else(|| KernelError::Device {
            backend: BACKEND,
            message: format!("kernel {name} missing from the module"),
        })
    }

    fn launch_config(&self, n: usize, dtype: DType) -> LaunchConfig {
        // One thread per 16 bytes on the vector path; a grid-stride loop past
        // a few waves of blocks.
        let threads = (n * dtype.size()).div_ceil(16).max(1);
        let blocks = threads
            .div_ceil(BLOCK as usize)
            .min(self.sm_count as usize * 32);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `dst[dst_offset..][..bytes] = op(dst[..], src[src_offset..][..bytes])`
    /// element-wise, queued on the reducer's stream. `Avg` behaves as `Sum`.
    /// Offsets must be multiples of the element size.
    #[allow(clippy::too_many_arguments)]
    pub fn reduce(
        &self,
        dtype: DType,
        op: ReduceOp,
        dst: &mut CudaSlice<u8>,
        dst_offset: usize,
        src: &CudaSlice<u8>,
        src_offset: usize,
        bytes: usize,
    ) -> Result<(), KernelError> {
        let n = check_len(dtype, bytes)?;
        check_aligned(dtype, dst_offset)?;
        check_aligned(dtype, src_offset)?;
        check_range(dst.len(), dst_offset, bytes)?;
        check_range(src.len(), src_offset, bytes)?;
        if n == 0 {
            return Ok(());
        }
        let (dst_ptr, _dst_guard): (u64, SyncOnDrop<'_>) = dst.device_ptr_mut(&self.stream);
        let (src_ptr, _src_guard): (u64, SyncOnDrop<'_>) = src.device_ptr(&self.stream);
        // SAFETY: both point `bytes` into live device allocations (ranges
        // checked above; the slices are borrowed for this call and the
        // guards record the use on the stream before they drop).
        unsafe {
            self.reduce_at(
                dtype,
                op,
                dst_ptr + dst_offset as u64,
                src_ptr + src_offset as u64,
                n,
            )
        }
    }

    /// Queues the reduction of `n` elements at device address `s` into
    /// those at `d`.
    ///
    /// # Safety
    ///
    /// `d` and `s` must each point to `n` elements of `dtype` in device
    /// memory of this reducer's context that stays allocated until the
    /// kernel has run.
    unsafe fn reduce_at(
        &self,
        dtype: DType,
        op: ReduceOp,
        d: u64,
        s: u64,
        n: usize,
    ) -> Result<(), KernelError> {
        let f = self.function(&format!("oxccl_reduce_{dtype}_{}", op_name(op)))?;
        let cfg = self.launch_config(n, dtype);
        let mut launch = self.stream.launch_builder(f);
        launch.arg(&d).arg(&s).arg(&n);
        // SAFETY: the caller's contract; the argument types match
        // `(T*, const T*, size_t)`.
        unsafe { launch.launch(cfg) }.map_err(|e| driver_error("launch reduce", e))?;
        Ok(())
    }

    /// Turns the sums in `dst[offset..][..bytes]` of `contributions` values
    /// into averages (a no-op for 0 or 1 contributions).
    pub fn finish_avg(
        &self,
        dtype: DType,
        dst: &mut CudaSlice<u8>,
        offset: usize,
        bytes: usize,
        contributions: usize,
    ) -> Result<(), KernelError> {
        let n = check_len(dtype, bytes)?;
        check_aligned(dtype, offset)?;
        check_range(dst.len(), offset, bytes)?;
        if n == 0 || contributions <= 1 {
            return Ok(());
        }
        let (dst_ptr, _guard): (u64, SyncOnDrop<'_>) = dst.device_ptr_mut(&self.stream);
        // SAFETY: `bytes` at the offset lie in the live allocation (checked
        // above; the guard keeps the use recorded until the launch is queued).
        unsafe { self.avg_at(dtype, dst_ptr + offset as u64, n, contributions) }
    }

    /// Queues the averaging of `n` sums of `contributions` values at
    /// device address `d`.
    ///
    /// # Safety
    ///
    /// `d` must point to `n` elements of `dtype` in device memory of this
    /// reducer's context that stays allocated until the kernel has run.
    unsafe fn avg_at(
        &self,
        dtype: DType,
        d: u64,
        n: usize,
        contributions: usize,
    ) -> Result<(), KernelError> {
        let f = self.function(&format!("oxccl_avg_{dtype}"))?;
        let cfg = self.launch_config(n, dtype);
        let c = contributions as u64;
        // Integer divisor: 0 when the count does not fit the type (the
        // reference's quotient is then 0).
        let fits = |max: u64| if c <= max { c } else { 0 };
        let (f32_div, f64_div) = (contributions as f32, contributions as f64);
        let int_div = match dtype {
            DType::I8 => fits(i8::MAX as u64),
            DType::U8 => fits(u64::from(u8::MAX)),
            DType::I32 => fits(i32::MAX as u64),
            DType::U32 => fits(u64::from(u32::MAX)),
            DType::I64 => fits(i64::MAX as u64),
            _ => c,
        };
        let mut launch = self.stream.launch_builder(f);
        launch.arg(&d).arg(&n);
        match dtype {
            DType::F64 => launch.arg(&f64_div),
            DType::F32 | DType::F16 | DType::BF16 => launch.arg(&f32_div),
            _ => launch.arg(&int_div),
        };
        // SAFETY: the caller's contract; the arguments match
        // `(T*, size_t, divisor)` with the divisor type the kernel of this
        // dtype declares.
        unsafe { launch.launch(cfg) }.map_err(|e| driver_error("launch avg", e))?;
        Ok(())
    }
}

fn check_aligned(dtype: DType, offset: usize) -> Result<(), KernelError> {
    if offset % dtype.size() != 0 {
        return Err(KernelError::Misaligned {
            dtype,
            bytes: offset,
        });
    }
    Ok(())
}

fn check_range(len: usize, offset: usize, bytes: usize) -> Result<(), KernelError> {
    if offset.checked_add(bytes).is_none_or(|end| end > len) {
        return Err(KernelError::Unsupported {
            backend: BACKEND,
            what: format!("range {offset}+{bytes} beyond a buffer of {len} bytes"),
        });
    }
    Ok(())
}

/// A buffer in CUDA device memory, with a reused scratch buffer for
/// [`DeviceMemory::reduce_from_host`].
pub struct CudaBuffer {
    reducer: Arc<CudaReducer>,
    /// Freed on drop, unless `borrowed` (then leaked: its owner frees it).
    data: ManuallyDrop<CudaSlice<u8>>,
    borrowed: bool,
    len: usize,
    scratch: Option<CudaSlice<u8>>,
}

impl std::fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBuffer")
            .field("len", &self.len)
            .field("device", &self.reducer.name)
            .finish_non_exhaustive()
    }
}

impl CudaBuffer {
    /// `bytes` zeroed bytes on the reducer's device.
    pub fn new(reducer: Arc<CudaReducer>, bytes: usize) -> Result<CudaBuffer, KernelError> {
        let data = reducer.alloc(bytes)?;
        Ok(CudaBuffer {
            reducer,
            data: ManuallyDrop::new(data),
            borrowed: false,
            len: bytes,
            scratch: None,
        })
    }

    /// A view of `len` bytes of device memory at `ptr` that another library
    /// allocated (a DLPack producer's tensor), on `reducer`'s device: the
    /// buffer never frees it. An empty view owns a small allocation of its
    /// own instead (an empty tensor's pointer may be anything).
    ///
    /// # Safety
    ///
    /// `ptr` must point to `len` bytes of device memory of `reducer`'s
    /// device and context that stay allocated, and are used by nothing
    /// else, for as long as the buffer lives.
    pub unsafe fn borrowed(
        reducer: Arc<CudaReducer>,
        ptr: u64,
        len: usize,
    ) -> Result<CudaBuffer, KernelError> {
        if len == 0 {
            return CudaBuffer::new(reducer, 0);
        }
        // SAFETY: the caller's contract above; the slice is leaked on drop.
        let data = unsafe { reducer.stream.upgrade_device_ptr::<u8>(ptr, len) };
        Ok(CudaBuffer {
            reducer,
            data: ManuallyDrop::new(data),
            borrowed: true,
            len,
            scratch: None,
        })
    }

    /// The reducer (device, stream and kernels) the buffer lives with.
    pub fn reducer(&self) -> &Arc<CudaReducer> {
        &self.reducer
    }

    /// A device copy of `data`.
    pub fn from_host(reducer: Arc<CudaReducer>, data: &[u8]) -> Result<CudaBuffer, KernelError> {
        let mut b = CudaBuffer::new(reducer, data.len())?;
        b.write(0, data)?;
        Ok(b)
    }

    /// The whole buffer, copied to the host.
    pub fn to_host(&self) -> Result<Vec<u8>, KernelError> {
        let mut out = vec![0; self.len];
        self.read(0, &mut out)?;
        Ok(out)
    }

    /// The device allocation (at least 16 bytes; the first `len_bytes` are the buffer).
    pub fn slice(&self) -> &CudaSlice<u8> {
        &self.data
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        // SAFETY: `data` is taken once, here, and not used after.
        let data = unsafe { ManuallyDrop::take(&mut self.data) };
        if self.borrowed {
            // Its owner frees it: release cudarc's hold, not the memory.
            let _ = data.leak();
        }
    }
}

impl DeviceMemory for CudaBuffer {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn alloc_like(&self, bytes: usize) -> Result<Box<dyn DeviceMemory>, KernelError> {
        Ok(Box::new(CudaBuffer::new(Arc::clone(&self.reducer), bytes)?))
    }

    fn len_bytes(&self) -> usize {
        self.len
    }

    fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), KernelError> {
        check_range(self.len, offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        let stream = &self.reducer.stream;
        stream
            .memcpy_dtoh(&self.data.slice(offset..offset + dst.len()), dst)
            .map_err(|e| driver_error("copy to host", e))?;
        self.reducer.synchronize()
    }

    fn write(&mut self, offset: usize, src: &[u8]) -> Result<(), KernelError> {
        check_range(self.len, offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let stream = Arc::clone(&self.reducer.stream);
        stream
            .memcpy_htod(src, &mut self.data.slice_mut(offset..offset + src.len()))
            .map_err(|e| driver_error("copy to device", e))
    }

    fn reduce_from_host(
        &mut self,
        dtype: DType,
        op: ReduceOp,
        offset: usize,
        src: &[u8],
    ) -> Result<(), KernelError> {
        check_len(dtype, src.len())?;
        check_aligned(dtype, offset)?;
        check_range(self.len, offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let reducer = Arc::clone(&self.reducer);
        let mut scratch = match self.scratch.take() {
            Some(s) if s.len() >= src.len() => s,
            _ => reducer.alloc(src.len().next_power_of_two())?,
        };
        let staged = reducer
            .stream
            .memcpy_htod(src, &mut scratch.slice_mut(..src.len()))
            .map_err(|e| driver_error("stage to device", e))
            .and_then(|()| {
                reducer.reduce(dtype, op, &mut self.data, offset, &scratch, 0, src.len())
            });
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
        let reducer = Arc::clone(&self.reducer);
        reducer.finish_avg(dtype, &mut self.data, offset, len, contributions)
    }

    fn addressed(&self) -> Option<(DevRef<'_>, Arc<dyn DeviceOps>)> {
        let (ptr, _guard): (u64, SyncOnDrop<'_>) = self.data.device_ptr(&self.reducer.stream);
        // SAFETY: the allocation lives as long as the buffer (at least
        // `len` bytes), and `&self` keeps it from being written here for
        // the borrow.
        let region = unsafe { DevRef::new(ptr as usize, self.len, MemoryKind::Cuda) };
        Some((region, Arc::clone(&self.reducer) as Arc<dyn DeviceOps>))
    }

    fn addressed_mut(&mut self) -> Option<(DevMut<'_>, Arc<dyn DeviceOps>)> {
        let stream = Arc::clone(&self.reducer.stream);
        let (ptr, _guard): (u64, SyncOnDrop<'_>) = self.data.device_ptr_mut(&stream);
        // SAFETY: as above, with `&mut self` keeping every other access
        // away for the borrow.
        let region = unsafe { DevMut::new(ptr as usize, self.len, MemoryKind::Cuda) };
        Some((region, Arc::clone(&self.reducer) as Arc<dyn DeviceOps>))
    }
}

/// The reducer's operations on its device's memory by address: the engine's
/// path when a link moves device memory itself (UCX with CUDA). Each one
/// waits for the stream before it returns, so a link that reads the memory
/// next sees its result.
impl DeviceOps for CudaReducer {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::Cuda
    }

    fn read(&self, src: DevRef<'_>, dst: &mut [u8]) -> Result<(), KernelError> {
        check_host_side(self, src.kind(), src.len(), dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: a CUDA region is `len` bytes of live device memory of
        // this context for its lifetime (its contract); `dst` is host
        // memory of that length, and the copy is waited for below, before
        // `dst`'s borrow ends.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                dst,
                src.addr() as u64,
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| driver_error("copy to host", e))?;
        self.synchronize()
    }

    fn write(&self, dst: DevMut<'_>, src: &[u8]) -> Result<(), KernelError> {
        check_host_side(self, dst.kind(), dst.len(), src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: as in `read`, the other way; `src` stays borrowed until
        // the copy is waited for.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                dst.addr() as u64,
                src,
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| driver_error("copy to device", e))?;
        self.synchronize()
    }

    fn copy(&self, dst: DevMut<'_>, src: DevRef<'_>) -> Result<(), KernelError> {
        check_regions(self, &dst, Some(&src))?;
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: two CUDA regions of one length, not overlapping (checked),
        // live for their lifetimes, which outlast the wait below.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dst.addr() as u64,
                src.addr() as u64,
                src.len(),
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| driver_error("copy on the device", e))?;
        self.synchronize()
    }

    fn reduce(
        &self,
        dtype: DType,
        op: ReduceOp,
        dst: DevMut<'_>,
        src: DevRef<'_>,
    ) -> Result<(), KernelError> {
        check_regions(self, &dst, Some(&src))?;
        let n = check_len(dtype, dst.len())?;
        check_aligned(dtype, dst.addr())?;
        check_aligned(dtype, src.addr())?;
        if n == 0 {
            return Ok(());
        }
        // SAFETY: two CUDA regions of `n` elements (checked), live until the
        // wait below.
        unsafe { self.reduce_at(dtype, op, dst.addr() as u64, src.addr() as u64, n) }?;
        self.synchronize()
    }

    fn reduce_from_host(
        &self,
        dtype: DType,
        op: ReduceOp,
        dst: DevMut<'_>,
        src: &[u8],
    ) -> Result<(), KernelError> {
        check_host_side(self, dst.kind(), dst.len(), src.len())?;
        let n = check_len(dtype, src.len())?;
        check_aligned(dtype, dst.addr())?;
        if n == 0 {
            return Ok(());
        }
        let mut slot = self.staging.lock().unwrap_or_else(PoisonError::into_inner);
        let mut staged = match slot.take() {
            Some(s) if s.len() >= src.len() => s,
            _ => self.alloc(src.len().next_power_of_two())?,
        };
        let result = self
            .stream
            .memcpy_htod(src, &mut staged.slice_mut(..src.len()))
            .map_err(|e| driver_error("stage to device", e))
            .and_then(|()| {
                let (s, _guard): (u64, SyncOnDrop<'_>) = staged.device_ptr(&self.stream);
                // SAFETY: `dst` is a CUDA region of `n` elements (checked)
                // and `s` the staged copy's `n`, both live until the wait
                // below (the staging buffer is held, under its lock, until
                // then).
                unsafe { self.reduce_at(dtype, op, dst.addr() as u64, s, n) }
            })
            .and_then(|()| self.synchronize());
        *slot = Some(staged);
        result
    }

    fn finish_avg(
        &self,
        dtype: DType,
        dst: DevMut<'_>,
        contributions: usize,
    ) -> Result<(), KernelError> {
        check_regions(self, &dst, None)?;
        let n = check_len(dtype, dst.len())?;
        check_aligned(dtype, dst.addr())?;
        if n == 0 || contributions <= 1 {
            return Ok(());
        }
        // SAFETY: a CUDA region of `n` elements (checked), live until the
        // wait below.
        unsafe { self.avg_at(dtype, dst.addr() as u64, n, contributions) }?;
        self.synchronize()
    }
}
