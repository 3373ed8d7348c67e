//! Python objects as byte buffers, without copying: DLPack (`__dlpack__`,
//! torch tensors, numpy arrays) and the buffer protocol (numpy, bytearray,
//! memoryview, array.array, bytes).
//!
//! # Safety
//!
//! A [`Buf`] holds what keeps its memory alive and in place for as long as
//! it exists: the DLPack managed tensor it took from the capsule (whose
//! deleter it calls once, on drop, with the GIL held), or a buffer-protocol
//! export (released once, on drop, with the GIL held), and a reference to
//! the Python object. Its pointer and length are those the producer gave,
//! checked to describe one C-contiguous block of `count` elements of
//! `dtype`. The bytes may be changed by Python code running at the same
//! time (as with any zero-copy binding); they are never freed or moved
//! while the `Buf` lives.
//!
//! The buffer protocol is reached through `PyObject_GetBuffer` and
//! `PyBuffer_Release` with the `Py_buffer` layout, declared here: both
//! functions exist in every CPython 3, and the layout has not changed since
//! 3.3 (it entered the stable ABI unchanged in 3.11), so the abi3 module
//! built for 3.9 may use them.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr::NonNull;

use oxccl::DType;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::errors::{invalid_argument, unavailable_backend};

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
#[derive(Debug)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
#[derive(Debug)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// CPython's `Py_buffer` (unchanged since 3.3).
#[repr(C)]
#[derive(Debug)]
struct PyBufferView {
    buf: *mut c_void,
    obj: *mut ffi::PyObject,
    len: isize,
    itemsize: isize,
    readonly: c_int,
    ndim: c_int,
    format: *mut c_char,
    shape: *mut isize,
    strides: *mut isize,
    suboffsets: *mut isize,
    internal: *mut c_void,
}

const PYBUF_WRITABLE: c_int = 0x0001;
const PYBUF_FORMAT: c_int = 0x0004;
const PYBUF_C_CONTIGUOUS: c_int = 0x0038;

// SAFETY: both functions are exported by every CPython 3 (see the module's
// Safety note); their signatures are CPython's.
unsafe extern "C" {
    fn PyObject_GetBuffer(obj: *mut ffi::PyObject, view: *mut PyBufferView, flags: c_int) -> c_int;
    fn PyBuffer_Release(view: *mut PyBufferView);
}

/// DLPack device types: CPU, CUDA, CUDA host (pinned), ROCm, CUDA managed.
const KDL_CPU: i32 = 1;
const KDL_CUDA: i32 = 2;
const KDL_CUDA_HOST: i32 = 3;
const KDL_ROCM: i32 = 10;
const KDL_CUDA_MANAGED: i32 = 13;

enum Keep {
    DlPack(NonNull<DLManagedTensor>),
    View(Box<PyBufferView>),
}

/// A Python object's memory, borrowed until drop (see the module's Safety note).
pub(crate) struct Buf {
    ptr: NonNull<u8>,
    len: usize,
    /// The element type.
    pub(crate) dtype: DType,
    /// Elements.
    pub(crate) count: usize,
    keep: Option<Keep>,
    _obj: Py<PyAny>,
    /// The device's reducer, for a CUDA tensor (kDLCUDA): then `ptr` is a
    /// device address, which host code never reads (`bytes` is empty).
    #[cfg(feature = "cuda")]
    cuda: Option<std::sync::Arc<oxccl::kernels::cuda::CudaReducer>>,
}

// SAFETY: the memory a `Buf` points to is owned by the Python object it
// keeps alive, not by a thread; the export is released under the GIL from
// whichever thread drops it.
unsafe impl Send for Buf {}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buf")
            .field("dtype", &self.dtype)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let Some(keep) = self.keep.take() else {
            return;
        };
        // SAFETY: Py_IsInitialized may be called at any time, GIL or not.
        if crate::exiting() || unsafe { ffi::Py_IsInitialized() } == 0 {
            // The interpreter is going away (a call still pending at exit):
            // taking the GIL now could hang or end this thread. The memory
            // goes with the process.
            std::mem::forget(keep);
            return;
        }
        Python::attach(|_py| match keep {
            Keep::DlPack(m) => {
                // SAFETY: `m` came from a "dltensor" capsule that was renamed
                // "used_dltensor", so its producer will not call the deleter;
                // this is the one call, with the GIL held (numpy's deleter
                // needs it).
                unsafe {
                    if let Some(d) = (*m.as_ptr()).deleter {
                        d(m.as_ptr());
                    }
                }
            }
            Keep::View(mut v) => {
                // SAFETY: `v` was filled by a successful PyObject_GetBuffer and
                // is released once, with the GIL held.
                unsafe { PyBuffer_Release(&mut *v) };
            }
        });
    }
}

/// Drops `bufs` holding the GIL once for all of them (each drop takes it
/// otherwise).
pub(crate) fn release(bufs: Vec<Buf>) {
    // SAFETY: Py_IsInitialized may be called at any time, GIL or not.
    let live = unsafe { ffi::Py_IsInitialized() } != 0;
    if bufs.iter().all(|b| b.keep.is_none()) || crate::exiting() || !live {
        // Nothing to release under the GIL, or no GIL to take (each drop
        // then leaves its export to the process's end, as `Drop` says).
        drop(bufs);
        return;
    }
    Python::attach(|_py| drop(bufs));
}

impl Buf {
    /// The bytes, for a call that only reads them.
    pub(crate) fn bytes(&self) -> &[u8] {
        if self.is_device() {
            debug_assert!(false, "host bytes of a device buffer");
            return &[];
        }
        // SAFETY: `ptr` points to `len` bytes kept alive by `self` (module
        // Safety note); `ptr` is dangling-but-aligned when `len` is 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, for a call that writes them.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        if self.is_device() {
            debug_assert!(false, "host bytes of a device buffer");
            return &mut [];
        }
        // SAFETY: as in `bytes`; writable because `get` checked it for
        // buffers that say so, and `&mut self` makes this the only slice
        // made from this `Buf` (callers check that two `Buf`s of one call
        // do not overlap, `overlap`).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Whether the memory is on a device (a CUDA tensor): the call runs it
    /// through oxccl's device path, never through `bytes`.
    pub(crate) fn is_device(&self) -> bool {
        #[cfg(feature = "cuda")]
        if self.cuda.is_some() {
            return true;
        }
        false
    }

    /// The device's reducer and the device address, for a CUDA tensor.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(
        &self,
    ) -> Option<(&std::sync::Arc<oxccl::kernels::cuda::CudaReducer>, usize)> {
        self.cuda.as_ref().map(|r| (r, self.addr()))
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The address of the first byte.
    pub(crate) fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Whether the two buffers share a byte.
    pub(crate) fn overlaps(&self, other: &Buf) -> bool {
        self.len > 0
            && other.len > 0
            && self.addr() < other.addr() + other.len
            && other.addr() < self.addr() + self.len
    }

    /// Whether the two buffers are the same bytes.
    pub(crate) fn same(&self, other: &Buf) -> bool {
        self.addr() == other.addr() && self.len == other.len
    }

    /// An empty buffer of `dtype` (a non-root's unused output).
    pub(crate) fn empty(py: Python<'_>, dtype: DType) -> Buf {
        Buf {
            ptr: NonNull::dangling(),
            len: 0,
            dtype,
            count: 0,
            keep: None,
            _obj: py.None(),
            #[cfg(feature = "cuda")]
            cuda: None,
        }
    }

    /// `obj`'s memory: through DLPack if it has `__dlpack__` (or is a
    /// DLPack capsule, "dltensor", of host memory, which is consumed), else
    /// (or if that export fails, as numpy's does for read-only arrays) the
    /// buffer protocol. `what` names the argument in errors; `writable` asks for a
    /// buffer the call may write. Host memory only.
    pub(crate) fn get(obj: &Bound<'_, PyAny>, what: &str, writable: bool) -> PyResult<Buf> {
        Buf::get_in(obj, what, writable, false)
    }

    /// As [`get`](Self::get), and CUDA tensors too where this build has the
    /// `cuda` feature (see [`is_device`](Self::is_device)).
    pub(crate) fn get_device(obj: &Bound<'_, PyAny>, what: &str, writable: bool) -> PyResult<Buf> {
        Buf::get_in(obj, what, writable, true)
    }

    fn get_in(obj: &Bound<'_, PyAny>, what: &str, writable: bool, device: bool) -> PyResult<Buf> {
        if is_dltensor_capsule(obj) {
            return from_capsule(obj, what);
        }
        if obj.hasattr("__dlpack__")? {
            if let Some(id) = check_device(obj, what, device)? {
                return cuda_dlpack(obj, what, id);
            }
            match from_dlpack(obj, what, None) {
                Ok(b) => return Ok(b),
                Err(e) => {
                    let is_buffer = buffer_view(obj, 0).map(|mut v| {
                        // SAFETY: a successful export, released at once.
                        unsafe { PyBuffer_Release(&mut *v) }
                    });
                    if is_buffer.is_err() {
                        return Err(invalid_argument(format!(
                            "{what}: its DLPack export failed: {e}"
                        )));
                    }
                }
            }
        }
        from_buffer(obj, what, writable)
    }
}

/// A CUDA tensor's memory (device `id`), exported for the device's stream.
#[cfg(feature = "cuda")]
fn cuda_dlpack(obj: &Bound<'_, PyAny>, what: &str, id: i32) -> PyResult<Buf> {
    let py = obj.py();
    let ordinal = usize::try_from(id)
        .map_err(|_| invalid_argument(format!("{what}: CUDA device {id} is negative")))?;
    let reducer = crate::cuda::reducer(ordinal, || nvrtc_include_dirs(py))
        .map_err(|e| PyErr::from(crate::errors::Failure::from(oxccl::Error::from(e))))?;
    // The producer orders its pending work on the tensor before this stream.
    let mut buf = from_dlpack(obj, what, Some(crate::cuda::dlpack_stream(&reducer)))?;
    buf.cuda = Some(reducer);
    Ok(buf)
}

#[cfg(not(feature = "cuda"))]
fn cuda_dlpack(_obj: &Bound<'_, PyAny>, what: &str, id: i32) -> PyResult<Buf> {
    Err(crate::errors::internal(format!(
        "{what}: CUDA device {id} accepted by a build without the cuda feature"
    )))
}

/// Where NVRTC finds `cuda_fp16.h` beside `/usr/local/cuda/include`:
/// `OXCCL_CUDA_INCLUDE` (oxccl's config), then the `nvidia-cuda-runtime-cu12`
/// wheel's headers, which torch's CUDA wheels install.
#[cfg(feature = "cuda")]
fn nvrtc_include_dirs(py: Python<'_>) -> Vec<std::path::PathBuf> {
    let mut dirs = oxccl::Config::from_env()
        .map(|c| c.cuda_include)
        .unwrap_or_default();
    let wheel = py.import("nvidia.cuda_runtime").and_then(|m| {
        let path: Vec<String> = m.getattr("__path__")?.extract()?;
        Ok(path)
    });
    dirs.extend(
        wheel
            .unwrap_or_default()
            .into_iter()
            .map(|p| std::path::Path::new(&p).join("include"))
            .filter(|p| p.is_dir()),
    );
    dirs
}

/// Refuses device memory this call or build cannot use, before `__dlpack__`
/// is called (which would synchronize a CUDA stream). `Some(device id)` for
/// a CUDA tensor the call takes (`device`, and a build with `cuda`).
fn check_device(obj: &Bound<'_, PyAny>, what: &str, device: bool) -> PyResult<Option<i32>> {
    if !obj.hasattr("__dlpack_device__")? {
        return Ok(None);
    }
    let (kind, id): (i32, i32) = obj.call_method0("__dlpack_device__")?.extract()?;
    match kind {
        KDL_CPU | KDL_CUDA_HOST => Ok(None),
        KDL_CUDA if device && cfg!(feature = "cuda") => Ok(Some(id)),
        KDL_CUDA if cfg!(feature = "cuda") => Err(invalid_argument(format!(
            "{what} is a CUDA tensor (device {id}): this call takes host memory only (the \
             collectives all_reduce, broadcast, reduce, all_gather and reduce_scatter take \
             CUDA tensors); copy it to the host (tensor.cpu())"
        ))),
        KDL_CUDA | KDL_CUDA_MANAGED | KDL_ROCM => Err(unavailable_backend(format!(
            "{what} is in device memory (DLPack device type {kind}, device {id}): this build \
             of the Python package takes host memory only (CPU tensors and arrays; CUDA \
             tensors need a build with the cuda feature); copy it to the host \
             (tensor.cpu()) or use a CPU process group"
        ))),
        _ => Err(invalid_argument(format!(
            "{what}: DLPack device type {kind} is not host memory"
        ))),
    }
}

fn dl_dtype(t: DLDataType) -> Option<DType> {
    if t.lanes != 1 {
        return None;
    }
    Some(match (t.code, t.bits) {
        (0, 8) => DType::I8,
        (0, 32) => DType::I32,
        (0, 64) => DType::I64,
        (1, 8) => DType::U8,
        (1, 32) => DType::U32,
        (1, 64) => DType::U64,
        (2, 16) => DType::F16,
        (2, 32) => DType::F32,
        (2, 64) => DType::F64,
        (4, 16) => DType::BF16,
        _ => return None,
    })
}

const DLTENSOR: &CStr = c"dltensor";
const USED_DLTENSOR: &CStr = c"used_dltensor";

/// Whether `obj` is an unconsumed DLPack capsule (named "dltensor"), such
/// as `torch.utils.dlpack.to_dlpack(t)` returns.
fn is_dltensor_capsule(obj: &Bound<'_, PyAny>) -> bool {
    // SAFETY: `obj` is a live object; PyCapsule_IsValid only reads it, sets
    // no exception, and is false for anything but a capsule of that name.
    unsafe { ffi::PyCapsule_IsValid(obj.as_ptr(), DLTENSOR.as_ptr()) == 1 }
}

/// A DLPack capsule's tensor (consumed: the capsule is renamed, as
/// `__dlpack__`'s consumers do), host memory only. Cheaper than
/// `__dlpack__` for a caller that has many tensors (torch's `to_dlpack` is
/// one C call, where `Tensor.__dlpack__` and `__dlpack_device__` run
/// Python code).
fn from_capsule(capsule: &Bound<'_, PyAny>, what: &str) -> PyResult<Buf> {
    let buf = consume_capsule(capsule, capsule, what)?;
    let device = match &buf.keep {
        // SAFETY: `buf` owns the managed tensor (its `keep`), valid until drop.
        Some(Keep::DlPack(m)) => unsafe { (*m.as_ptr()).dl_tensor.device },
        _ => {
            return Err(crate::errors::internal(
                "a DLPack buffer without its tensor",
            ));
        }
    };
    match device.device_type {
        KDL_CPU | KDL_CUDA_HOST => Ok(buf),
        kind => Err(invalid_argument(format!(
            "{what}: a DLPack capsule of device type {kind} (device {}): capsules are taken \
             for host memory only; pass the tensor itself",
            device.device_id
        ))),
    }
}

/// `obj.__dlpack__()`'s tensor; with `stream`, asked for that consumer
/// stream (DLPack's `stream=` argument, for device memory).
fn from_dlpack(obj: &Bound<'_, PyAny>, what: &str, stream: Option<usize>) -> PyResult<Buf> {
    let py = obj.py();
    let capsule = match stream {
        None => obj.call_method0("__dlpack__")?,
        Some(s) => {
            let kw = pyo3::types::PyDict::new(py);
            kw.set_item("stream", s)?;
            obj.call_method("__dlpack__", (), Some(&kw))?
        }
    };
    consume_capsule(obj, &capsule, what)
}

/// The tensor of `capsule` (a "dltensor" capsule exported by `obj`),
/// consumed: the returned `Buf` calls its deleter on drop.
fn consume_capsule(
    obj: &Bound<'_, PyAny>,
    capsule: &Bound<'_, PyAny>,
    what: &str,
) -> PyResult<Buf> {
    let py = obj.py();
    // SAFETY: `capsule` is a live object; PyCapsule_GetPointer checks that
    // it is a capsule named "dltensor" and sets an exception if not.
    let raw = unsafe { ffi::PyCapsule_GetPointer(capsule.as_ptr(), DLTENSOR.as_ptr()) };
    let Some(managed) = NonNull::new(raw.cast::<DLManagedTensor>()) else {
        return Err(PyErr::take(py).unwrap_or_else(|| {
            invalid_argument(format!("{what}: __dlpack__ returned no DLPack tensor"))
        }));
    };
    // SAFETY: the capsule is valid; renaming it marks the tensor consumed
    // (the DLPack protocol), so its destructor leaves the deleter to us.
    if unsafe { ffi::PyCapsule_SetName(capsule.as_ptr(), USED_DLTENSOR.as_ptr()) } != 0 {
        return Err(PyErr::fetch(py));
    }
    // From here `buf` owns the tensor: an early return drops it, which calls
    // the deleter.
    let mut buf = Buf {
        ptr: NonNull::dangling(),
        len: 0,
        dtype: DType::U8,
        count: 0,
        keep: Some(Keep::DlPack(managed)),
        _obj: obj.clone().unbind(),
        #[cfg(feature = "cuda")]
        cuda: None,
    };
    // SAFETY: the producer's tensor, valid until its deleter runs (drop of `buf`).
    let t = unsafe { &(*managed.as_ptr()).dl_tensor };
    let dtype = dl_dtype(t.dtype).ok_or_else(|| {
        invalid_argument(format!(
            "{what}: DLPack dtype (code {}, {} bits, {} lanes) is not one oxccl reduces \
             (int8, uint8, int32, uint32, int64, uint64, float16, bfloat16, float32, float64)",
            t.dtype.code, t.dtype.bits, t.dtype.lanes
        ))
    })?;
    let ndim = usize::try_from(t.ndim)
        .map_err(|_| invalid_argument(format!("{what}: negative ndim {}", t.ndim)))?;
    let shape: &[i64] = if ndim == 0 || t.shape.is_null() {
        &[]
    } else {
        // SAFETY: DLPack: `shape` points to `ndim` values.
        unsafe { std::slice::from_raw_parts(t.shape, ndim) }
    };
    let mut count = 1usize;
    for &d in shape {
        let d = usize::try_from(d)
            .map_err(|_| invalid_argument(format!("{what}: negative dimension {d}")))?;
        count = count
            .checked_mul(d)
            .ok_or_else(|| invalid_argument(format!("{what}: shape {shape:?} overflows")))?;
    }
    if !t.strides.is_null() && count > 0 {
        // SAFETY: DLPack: non-NULL `strides` points to `ndim` values.
        let strides = unsafe { std::slice::from_raw_parts(t.strides, ndim) };
        let mut want = 1i64;
        for (&d, &s) in shape.iter().zip(strides).rev() {
            if d != 1 && s != want {
                return Err(invalid_argument(format!(
                    "{what} is not contiguous (shape {shape:?}, strides {strides:?} in \
                     elements): pass a contiguous tensor (tensor.contiguous())"
                )));
            }
            want = want.saturating_mul(d);
        }
    }
    let len = count
        .checked_mul(dtype.size())
        .filter(|n| *n <= isize::MAX as usize)
        .ok_or_else(|| invalid_argument(format!("{what}: {count} elements overflow")))?;
    if len > 0 {
        let offset = usize::try_from(t.byte_offset)
            .map_err(|_| invalid_argument(format!("{what}: byte offset overflows")))?;
        let p = (t.data as usize).checked_add(offset).ok_or_else(|| {
            invalid_argument(format!("{what}: data pointer + byte offset overflows"))
        })?;
        buf.ptr = NonNull::new(p as *mut u8)
            .ok_or_else(|| invalid_argument(format!("{what}: DLPack data pointer is NULL")))?;
    }
    buf.len = len;
    buf.dtype = dtype;
    buf.count = count;
    Ok(buf)
}

/// A buffer-protocol export of `obj` with `flags`, or the Python error.
fn buffer_view(obj: &Bound<'_, PyAny>, flags: c_int) -> PyResult<Box<PyBufferView>> {
    let mut view = Box::new(PyBufferView {
        buf: std::ptr::null_mut(),
        obj: std::ptr::null_mut(),
        len: 0,
        itemsize: 0,
        readonly: 0,
        ndim: 0,
        format: std::ptr::null_mut(),
        shape: std::ptr::null_mut(),
        strides: std::ptr::null_mut(),
        suboffsets: std::ptr::null_mut(),
        internal: std::ptr::null_mut(),
    });
    // SAFETY: `obj` is live, `view` is a writable Py_buffer; on failure
    // nothing is exported and an exception is set.
    if unsafe { PyObject_GetBuffer(obj.as_ptr(), &mut *view, flags) } != 0 {
        return Err(PyErr::fetch(obj.py()));
    }
    Ok(view)
}

/// The dtype of a buffer-protocol format with items of `itemsize` bytes.
fn format_dtype(format: &str, itemsize: usize) -> Option<DType> {
    let f = format.trim_start_matches(['@', '=', '<']);
    if cfg!(target_endian = "little") && (f.starts_with('>') || f.starts_with('!')) {
        return None;
    }
    Some(match (f, itemsize) {
        ("b", 1) => DType::I8,
        ("B" | "c", 1) => DType::U8,
        ("i" | "l" | "q", 4) => DType::I32,
        ("i" | "l" | "q", 8) => DType::I64,
        ("I" | "L" | "Q", 4) => DType::U32,
        ("I" | "L" | "Q", 8) => DType::U64,
        ("e", 2) => DType::F16,
        ("f", 4) => DType::F32,
        ("d", 8) => DType::F64,
        _ => return None,
    })
}

fn from_buffer(obj: &Bound<'_, PyAny>, what: &str, writable: bool) -> PyResult<Buf> {
    let mut flags = PYBUF_C_CONTIGUOUS | PYBUF_FORMAT;
    if writable {
        flags |= PYBUF_WRITABLE;
    }
    let view = match buffer_view(obj, flags) {
        Ok(v) => v,
        Err(e) => {
            let t = obj
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default();
            return Err(invalid_argument(format!(
                "{what} (a {t}) is not a {}contiguous buffer: {e} (pass a numpy array, a torch \
                 CPU tensor, a bytearray or another object with __dlpack__ or the buffer \
                 protocol)",
                if writable { "writable " } else { "" }
            )));
        }
    };
    let (vbuf, vformat, vitemsize, vlen) = (view.buf, view.format, view.itemsize, view.len);
    let mut buf = Buf {
        ptr: NonNull::dangling(),
        len: 0,
        dtype: DType::U8,
        count: 0,
        keep: Some(Keep::View(view)),
        _obj: obj.clone().unbind(),
        #[cfg(feature = "cuda")]
        cuda: None,
    };
    let format = if vformat.is_null() {
        "B".to_owned()
    } else {
        // SAFETY: PyBUF_FORMAT: a NUL-terminated string valid while exported
        // (the export is held by `buf`).
        unsafe { CStr::from_ptr(vformat) }
            .to_string_lossy()
            .into_owned()
    };
    let itemsize = usize::try_from(vitemsize).unwrap_or(0);
    let len = usize::try_from(vlen).unwrap_or(0);
    let dtype = format_dtype(&format, itemsize).ok_or_else(|| {
        invalid_argument(format!(
            "{what}: buffer format {format:?} ({itemsize}-byte items) is not one oxccl reduces \
             (int8, uint8, int32, uint32, int64, uint64, float16, float32, float64; bfloat16 \
             through DLPack)"
        ))
    })?;
    if len > 0 {
        buf.ptr = NonNull::new(vbuf.cast::<u8>())
            .ok_or_else(|| invalid_argument(format!("{what}: buffer pointer is NULL")))?;
    }
    buf.len = len;
    buf.dtype = dtype;
    buf.count = len / dtype.size();
    Ok(buf)
}
