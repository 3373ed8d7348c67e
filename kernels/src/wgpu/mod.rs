//! Reductions on a GPU (or on Mesa's lavapipe) through wgpu compute shaders.
//!
//! * [`WgpuContext`] opens an adapter, a device and a queue, chosen by
//!   [`WgpuSettings`] (an adapter-name filter and a power preference). It
//!   compiles each WGSL pipeline once, on first use, and caches it per kernel
//!   (dtype × op).
//! * [`WgpuReducer`] runs `dst = op(dst, src)` and the avg scaling on device
//!   buffers at byte offsets.
//! * [`WgpuBuffer`] is device memory implementing [`DeviceMemory`]: reads,
//!   writes and reductions of host slices at any element-aligned offset.
//!
//! # Kernels
//!
//! WGSL has no 8- or 16-bit types and no 64-bit ones, so every kernel works
//! on `array<u32>` words. One invocation owns one destination word: it
//! extracts the 1, 2 or 4 lanes of that word that lie inside the range,
//! fetches the matching source elements (which may sit at another phase
//! within their words), combines them and writes the word back with the lanes
//! outside the range unchanged. No two invocations touch the same word, so
//! ranges that start or end inside a word (3 f16s, 5 u8s, a slice at byte
//! offset 1) need no atomics and leave their neighbours untouched. The grid is
//! two-dimensional (65535 × N workgroups of 256), so one dispatch covers any
//! length; buffers larger than the device's storage-binding limit are bound
//! in windows, one dispatch per window.
//!
//! Float semantics match [`ReferenceReducer`](crate::reference::ReferenceReducer)
//! bit for bit (NaN payloads aside) without trusting what WGSL leaves open:
//!
//! * `min`/`max` compare bit patterns (NaN checked by pattern, then an
//!   integer key ordering the floats), never the GPU's `min`/`max`;
//! * f16 and bf16 are converted to and from f32 with integer code (round to
//!   nearest even, NaN kept), not `unpack2x16float`/`pack2x16float` whose
//!   rounding WGSL does not pin down, so `SHADER_F16` is never needed;
//! * the avg division is an integer long division, correctly rounded
//!   (Vulkan allows 2.5 ulp for `/`).
//!
//! Sums and products of f32 use the GPU's `+` and `*`, which Vulkan requires
//! to be correctly rounded; a driver that flushes f32 subnormals to zero would
//! differ from the reference on subnormal inputs and results (lavapipe does
//! not, the tests check it).
//!
//! # Dtype support
//!
//! | dtype | sum, prod, min, max, avg |
//! |---|---|
//! | f32, f16, bf16 | yes (f16/bf16 computed in f32, rounded to nearest even) |
//! | i8, u8, i32, u32 | yes (wrapping; avg truncates toward zero) |
//! | i64, u64 | yes, emulated on (lo, hi) word pairs; avg needs `contributions <= u32::MAX` |
//! | f64 | no: [`KernelError::Unsupported`] (WGSL has no f64 and emulating IEEE double arithmetic is not worth it here) |
//!
//! # Costs
//!
//! Device buffers used by [`WgpuReducer`] must be a multiple of 4 bytes long
//! (every [`WgpuBuffer`] is allocated that way). [`DeviceMemory::write`] at an
//! offset or length that is not a multiple of 4 stages the bytes in a scratch
//! buffer and copies them with a masking kernel (one extra device copy of the
//! range); aligned writes go straight to the queue. [`DeviceMemory::read`]
//! copies the enclosing 4-byte-aligned window into a reused mappable buffer
//! and waits for it. Reductions and scalings are submitted and not waited
//! for: the queue orders them before any later read.
//!
//! # Waits
//!
//! Every wait for the device ([`WgpuContext::synchronize`],
//! [`DeviceMemory::read`]) is bounded by [`WgpuSettings::timeout`]: a hung or
//! lost device fails the call with [`KernelError::Timeout`] naming what was
//! awaited, for how long and on which adapter, instead of hanging the process.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use crate::{DType, DeviceMemory, KernelError, ReduceOp, check_len};

/// wgpu's adapter power preference, re-exported for [`WgpuSettings`].
pub use ::wgpu::PowerPreference;

const BACKEND: &str = "wgpu";
/// Invocations per workgroup.
const WORKGROUP: u32 = 256;
/// Most workgroups in one dimension of a dispatch.
const MAX_GROUPS_PER_DIM: u32 = 65535;
/// Bind groups kept per reducer before the cache is emptied.
const BIND_GROUP_CACHE: usize = 32;

const PRELUDE: &str = include_str!("prelude.wgsl");

/// The default of [`WgpuSettings::timeout`]: 300 s, as oxccl's `OXCCL_TIMEOUT`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// How to choose the adapter, and how long to wait for it. The oxccl config
/// module fills it from the `OXCCL_WGPU_*` variables; this crate never reads
/// the environment.
#[derive(Debug, Clone)]
pub struct WgpuSettings {
    /// Only adapters whose name contains this (case-insensitive), e.g.
    /// "llvmpipe" for lavapipe or "nvidia". `None`: any adapter.
    pub adapter_name: Option<String>,
    /// Which kind of adapter to prefer among those that match.
    pub power_preference: wgpu::PowerPreference,
    /// Most bytes of a buffer bound to one dispatch (rounded down to a
    /// multiple of 256, at least 1024). `None`: the device's limit. Larger
    /// buffers are processed in windows; tests set a small value to exercise
    /// that path.
    pub max_binding_size: Option<u64>,
    /// Longest wait for the device (submitted work to finish, a read to come
    /// back) before the call fails with an error naming what it awaited.
    /// Default: [`DEFAULT_TIMEOUT`]. Zero fails any wait for work that is not
    /// already done.
    pub timeout: Duration,
}

impl Default for WgpuSettings {
    fn default() -> WgpuSettings {
        WgpuSettings {
            adapter_name: None,
            power_preference: wgpu::PowerPreference::default(),
            max_binding_size: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// What an adapter is, for logs and for choosing one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSummary {
    /// The driver's name for it ("llvmpipe (LLVM 15.0.6, 256 bits)", ...).
    pub name: String,
    /// "Vulkan", "Gl", ...
    pub backend: String,
    /// "Cpu", "DiscreteGpu", ...
    pub device_type: String,
    /// Whether it offers `SHADER_F16` (not needed: f16 is emulated on u32 words).
    pub shader_f16: bool,
}

fn summarize(adapter: &wgpu::Adapter) -> AdapterSummary {
    let info = adapter.get_info();
    AdapterSummary {
        name: info.name,
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        shader_f16: adapter.features().contains(wgpu::Features::SHADER_F16),
    }
}

fn new_instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::all(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    })
}

/// Every adapter wgpu finds on this machine.
pub fn enumerate_adapters() -> Vec<AdapterSummary> {
    let instance = new_instance();
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .iter()
        .map(summarize)
        .collect()
}

/// Device-type rank for a power preference (lower is better).
fn preference_rank(pref: wgpu::PowerPreference, ty: wgpu::DeviceType) -> u8 {
    use wgpu::DeviceType as T;
    match pref {
        wgpu::PowerPreference::HighPerformance => match ty {
            T::DiscreteGpu => 0,
            T::IntegratedGpu => 1,
            T::VirtualGpu => 2,
            T::Other => 3,
            T::Cpu => 4,
        },
        wgpu::PowerPreference::LowPower => match ty {
            T::IntegratedGpu => 0,
            T::DiscreteGpu => 1,
            T::VirtualGpu => 2,
            T::Other => 3,
            T::Cpu => 4,
        },
        wgpu::PowerPreference::None => 0,
    }
}

/// A kernel: which shader a pipeline runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kernel {
    /// `dst = op(dst, src)`; never `Avg` (mapped to `Sum`).
    Reduce(DType, ReduceOp),
    /// `dst = dst / arg`.
    Avg(DType),
    /// `dst = src`, byte lanes (unaligned writes).
    Copy,
}

impl Kernel {
    fn lane_bytes(self) -> u32 {
        match self {
            Kernel::Reduce(d, _) | Kernel::Avg(d) => d.size() as u32,
            Kernel::Copy => 1,
        }
    }

    fn binary(self) -> bool {
        !matches!(self, Kernel::Avg(_))
    }

    fn label(self) -> String {
        match self {
            Kernel::Reduce(d, op) => format!("oxccl reduce {d} {op}"),
            Kernel::Avg(d) => format!("oxccl avg {d}"),
            Kernel::Copy => "oxccl copy".to_string(),
        }
    }
}

/// The WGSL expression combining lanes `a` and `b` (u32 bits, zero-extended)
/// of `dtype` with `op`; for 8-byte types they are `vec2<u32>` (lo, hi).
fn combine_expr(dtype: DType, op: ReduceOp) -> Option<String> {
    use ReduceOp::*;
    let f32_op = |x: &str, y: &str| match op {
        Sum | Avg => format!("add_f32({x}, {y})"),
        Prod => format!("mul_f32({x}, {y})"),
        Max => format!("max_f32({x}, {y})"),
        Min => format!("min_f32({x}, {y})"),
    };
    Some(match dtype {
        DType::F32 => f32_op("a", "b"),
        DType::F16 => format!("f32_to_f16({})", f32_op("f16_to_f32(a)", "f16_to_f32(b)")),
        DType::BF16 => format!(
            "f32_to_bf16({})",
            f32_op("bf16_to_f32(a)", "bf16_to_f32(b)")
        ),
        DType::I8 | DType::U8 | DType::I32 | DType::U32 => {
            let signed = |x: &str| match dtype {
                DType::I8 => format!("sext8({x})"),
                DType::I32 => format!("bitcast<i32>({x})"),
                _ => x.to_string(),
            };
            match op {
                Sum | Avg => "a + b".to_string(),
                Prod => "a * b".to_string(),
                Max => format!("select(a, b, {} > {})", signed("b"), signed("a")),
                Min => format!("select(a, b, {} < {})", signed("b"), signed("a")),
            }
        }
        DType::I64 | DType::U64 => {
            let lt = if dtype == DType::I64 {
                "lt_i64"
            } else {
                "lt_u64"
            };
            match op {
                Sum | Avg => "add64(a, b)".to_string(),
                Prod => "mul64(a, b)".to_string(),
                Max => format!("select(a, b, {lt}(a, b))"),
                Min => format!("select(a, b, {lt}(b, a))"),
            }
        }
        DType::F64 => return None,
    })
}

/// The WGSL expression dividing lane `a` by the count in `p.arg`.
fn avg_expr(dtype: DType) -> Option<String> {
    Some(
        match dtype {
            DType::F32 => "div_f32(a, p.arg)",
            DType::F16 => "f32_to_f16(div_f32(f16_to_f32(a), p.arg))",
            DType::BF16 => "f32_to_bf16(div_f32(bf16_to_f32(a), p.arg))",
            DType::U8 | DType::U32 => "select(a / p.arg, 0u, p.arg == 0u)",
            DType::I8 => "select(bitcast<u32>(sext8(a) / bitcast<i32>(p.arg)), 0u, p.arg == 0u)",
            DType::I32 => {
                "select(bitcast<u32>(bitcast<i32>(a) / bitcast<i32>(p.arg)), 0u, p.arg == 0u)"
            }
            DType::U64 => "divu64(a, p.arg)",
            DType::I64 => "divi64(a, p.arg)",
            DType::F64 => return None,
        }
        .to_string(),
    )
}

/// The full WGSL source of a kernel.
fn shader_source(kernel: Kernel) -> Option<String> {
    let (expr, binary) = match kernel {
        Kernel::Reduce(d, op) => (combine_expr(d, op)?, true),
        Kernel::Avg(d) => (avg_expr(d)?, false),
        Kernel::Copy => ("b".to_string(), true),
    };
    let size = kernel.lane_bytes();
    let mut s = String::from(PRELUDE);
    s.push_str("\n@group(0) @binding(0) var<storage, read_write> dst: array<u32>;\n");
    if binary {
        s.push_str("@group(0) @binding(1) var<storage, read> src: array<u32>;\n");
    }
    s.push_str("@group(0) @binding(2) var<uniform> p: Params;\n\n");
    let args = if binary { "a, b" } else { "a" };
    if size == 8 {
        let params = if binary {
            "a: vec2<u32>, b: vec2<u32>"
        } else {
            "a: vec2<u32>"
        };
        s.push_str(&format!(
            "fn lane({params}) -> vec2<u32> {{ return {expr}; }}\n\n\
             @compute @workgroup_size({WORKGROUP})\n\
             fn main(@builtin(global_invocation_id) gid: vec3<u32>) {{\n\
             \x20   let t = gid.x + gid.y * p.row;\n\
             \x20   if (t >= p.work) {{ return; }}\n\
             \x20   let dw = (p.dst_off >> 2u) + 2u * t;\n\
             \x20   let a = vec2<u32>(dst[dw], dst[dw + 1u]);\n"
        ));
        if binary {
            s.push_str(
                "    let sw = (p.src_off >> 2u) + 2u * t;\n\
                 \x20   let b = vec2<u32>(src[sw], src[sw + 1u]);\n",
            );
        }
        s.push_str(&format!(
            "    let r = lane({args});\n\
             \x20   dst[dw] = r.x;\n\
             \x20   dst[dw + 1u] = r.y;\n}}\n"
        ));
    } else {
        let mask = match size {
            1 => "0xffu",
            2 => "0xffffu",
            _ => "0xffffffffu",
        };
        let params = if binary { "a: u32, b: u32" } else { "a: u32" };
        s.push_str(&format!(
            "fn lane({params}) -> u32 {{ return {expr}; }}\n\n\
             const SIZE: u32 = {size}u;\n\
             const MASK: u32 = {mask};\n\n\
             @compute @workgroup_size({WORKGROUP})\n\
             fn main(@builtin(global_invocation_id) gid: vec3<u32>) {{\n\
             \x20   let t = gid.x + gid.y * p.row;\n\
             \x20   if (t >= p.work) {{ return; }}\n\
             \x20   let w = (p.dst_off >> 2u) + t;\n\
             \x20   var word = dst[w];\n\
             \x20   for (var l = 0u; l < 4u; l = l + SIZE) {{\n\
             \x20       let byte = w * 4u + l;\n\
             \x20       if (byte < p.dst_off) {{ continue; }}\n\
             \x20       let i = (byte - p.dst_off) / SIZE;\n\
             \x20       if (i >= p.n) {{ break; }}\n\
             \x20       let a = (word >> (l * 8u)) & MASK;\n"
        ));
        if binary {
            s.push_str(
                "        let sb = p.src_off + i * SIZE;\n\
                 \x20       let b = (src[sb >> 2u] >> ((sb & 3u) * 8u)) & MASK;\n",
            );
        }
        s.push_str(&format!(
            "        let r = lane({args}) & MASK;\n\
             \x20       word = (word & ~(MASK << (l * 8u))) | (r << (l * 8u));\n\
             \x20   }}\n\
             \x20   dst[w] = word;\n}}\n"
        ));
    }
    Some(s)
}

fn unsupported(what: String) -> KernelError {
    KernelError::Unsupported {
        backend: BACKEND,
        what,
    }
}

fn device_error(message: impl Into<String>) -> KernelError {
    KernelError::Device {
        backend: BACKEND,
        message: message.into(),
    }
}

/// Turns the result of a bounded wait for `what` into ours: a timeout names
/// what was awaited, for how long and on which adapter.
fn wait_result(
    result: Result<wgpu::PollStatus, wgpu::PollError>,
    what: &dyn Fn() -> String,
    timeout: Duration,
    adapter: &str,
) -> Result<wgpu::PollStatus, KernelError> {
    match result {
        Ok(status) => Ok(status),
        Err(wgpu::PollError::Timeout) => Err(timed_out(&what(), timeout, adapter)),
        Err(e) => Err(device_error(format!("waiting for {}: {e}", what()))),
    }
}

fn timed_out(what: &str, timeout: Duration, adapter: &str) -> KernelError {
    KernelError::Timeout {
        backend: BACKEND,
        message: format!("the GPU did not finish {what} within {timeout:?} (adapter {adapter})"),
    }
}

/// Work submitted to the queue, described in timeout errors.
#[derive(Debug, Clone, Copy)]
struct Work {
    kernel: Kernel,
    bytes: u64,
}

impl std::fmt::Display for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes = self.bytes;
        match self.kernel {
            Kernel::Reduce(d, op) => write!(f, "reducing {bytes} bytes of {d} ({op})"),
            Kernel::Avg(d) => write!(f, "averaging {bytes} bytes of {d}"),
            Kernel::Copy => write!(f, "copying {bytes} bytes"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind
    // (caches, a staging buffer): still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An adapter, its device and queue, and the compiled pipelines.
pub struct WgpuContext {
    adapter: AdapterSummary,
    device: wgpu::Device,
    queue: wgpu::Queue,
    limits: wgpu::Limits,
    max_binding_override: Option<u64>,
    timeout: Duration,
    /// The last kernel submitted and not yet known to be finished.
    last_submitted: Mutex<Option<Work>>,
    binary_layout: wgpu::BindGroupLayout,
    unary_layout: wgpu::BindGroupLayout,
    binary_pipeline_layout: wgpu::PipelineLayout,
    unary_pipeline_layout: wgpu::PipelineLayout,
    pipelines: Mutex<HashMap<Kernel, Arc<wgpu::ComputePipeline>>>,
    /// The first error the device reported outside a call that returns one.
    device_errors: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for WgpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuContext")
            .field("adapter", &self.adapter)
            .finish_non_exhaustive()
    }
}

fn storage_entry(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

fn uniform_entry() -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding: 2,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

impl WgpuContext {
    /// Opens the best adapter that matches `settings`.
    ///
    /// Errors with [`KernelError::Unavailable`] (listing what was found) when
    /// no adapter matches, or the device cannot be opened.
    pub fn new(settings: &WgpuSettings) -> Result<Arc<WgpuContext>, KernelError> {
        let instance = new_instance();
        let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        let found: Vec<String> = adapters
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
            })
            .collect();
        let filter = settings.adapter_name.as_ref().map(|s| s.to_lowercase());
        let adapter = adapters
            .into_iter()
            .filter(|a| {
                filter
                    .as_ref()
                    .is_none_or(|f| a.get_info().name.to_lowercase().contains(f))
            })
            .min_by_key(|a| preference_rank(settings.power_preference, a.get_info().device_type))
            .ok_or_else(|| KernelError::Unavailable {
                backend: BACKEND,
                reason: match &settings.adapter_name {
                    Some(name) => format!(
                        "no adapter whose name contains '{name}' (found: [{}]); \
                         for lavapipe install mesa-vulkan-drivers",
                        found.join(", ")
                    ),
                    None => {
                        "no adapter found (for lavapipe install mesa-vulkan-drivers)".to_string()
                    }
                },
            })?;
        let summary = summarize(&adapter);
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("oxccl"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| KernelError::Unavailable {
            backend: BACKEND,
            reason: format!("cannot open device on {}: {e}", summary.name),
        })?;
        let device_errors = Arc::new(Mutex::new(None));
        let sink = Arc::clone(&device_errors);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            lock(&sink).get_or_insert_with(|| e.to_string());
        }));
        let binary_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("oxccl binary"),
            entries: &[
                storage_entry(0, false),
                storage_entry(1, true),
                uniform_entry(),
            ],
        });
        let unary_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("oxccl unary"),
            entries: &[storage_entry(0, false), uniform_entry()],
        });
        let pipeline_layout = |layout: &wgpu::BindGroupLayout| {
            device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: None,
                bind_group_layouts: &[Some(layout)],
                immediate_size: 0,
            })
        };
        let binary_pipeline_layout = pipeline_layout(&binary_layout);
        let unary_pipeline_layout = pipeline_layout(&unary_layout);
        let ctx = WgpuContext {
            adapter: summary,
            device,
            queue,
            limits,
            max_binding_override: settings.max_binding_size,
            timeout: settings.timeout,
            last_submitted: Mutex::new(None),
            binary_layout,
            unary_layout,
            binary_pipeline_layout,
            unary_pipeline_layout,
            pipelines: Mutex::new(HashMap::new()),
            device_errors,
        };
        ctx.check_errors()?;
        Ok(Arc::new(ctx))
    }

    /// The adapter in use.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.adapter
    }

    /// The wgpu device (to create buffers for [`WgpuReducer`]).
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// The longest wait for the device ([`WgpuSettings::timeout`]).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Waits until all submitted work is done, and reports any device error.
    ///
    /// Errors with [`KernelError::Timeout`] if the work is not done within
    /// [`WgpuSettings::timeout`].
    pub fn synchronize(&self) -> Result<(), KernelError> {
        let what = || match *lock(&self.last_submitted) {
            Some(work) => format!("the work submitted to it (the last: {work})"),
            None => "the work submitted to it".to_string(),
        };
        self.wait(None, self.timeout, &what)?;
        self.check_errors()
    }

    /// Waits at most `left` (what remains of [`WgpuSettings::timeout`]) for
    /// `submission` (`None`: the latest) to finish; `what` names it in the
    /// error.
    fn wait(
        &self,
        submission: Option<wgpu::SubmissionIndex>,
        left: Duration,
        what: &dyn Fn() -> String,
    ) -> Result<(), KernelError> {
        let status = self.device.poll(wgpu::PollType::Wait {
            submission_index: submission,
            timeout: Some(left),
        });
        if wait_result(status, what, self.timeout, &self.adapter.name)?.is_queue_empty() {
            *lock(&self.last_submitted) = None;
        }
        Ok(())
    }

    /// The last kernel submitted, as " after reducing ..." (or "").
    fn after_last_submitted(&self) -> String {
        lock(&self.last_submitted).map_or_else(String::new, |w| format!(" after {w}"))
    }

    /// Returns the first error the device reported asynchronously, if any.
    fn check_errors(&self) -> Result<(), KernelError> {
        match lock(&self.device_errors).clone() {
            Some(message) => Err(device_error(message)),
            None => Ok(()),
        }
    }

    /// The pipeline of `kernel`, compiled on first use.
    fn pipeline(&self, kernel: Kernel) -> Result<Arc<wgpu::ComputePipeline>, KernelError> {
        let mut pipelines = lock(&self.pipelines);
        if let Some(p) = pipelines.get(&kernel) {
            return Ok(Arc::clone(p));
        }
        let source = shader_source(kernel).ok_or_else(|| unsupported(kernel_what(kernel)))?;
        let label = kernel.label();
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&label),
                source: wgpu::ShaderSource::Wgsl(Cow::Owned(source)),
            });
        let layout = if kernel.binary() {
            &self.binary_pipeline_layout
        } else {
            &self.unary_pipeline_layout
        };
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&label),
                layout: Some(layout),
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
        self.check_errors()?;
        let pipeline = Arc::new(pipeline);
        pipelines.insert(kernel, Arc::clone(&pipeline));
        Ok(pipeline)
    }

    /// Largest window of a buffer bound at once: the device's limit, kept
    /// below 4 GiB (shader offsets are u32) and a multiple of 256.
    fn max_binding(&self) -> u64 {
        let limit = self
            .limits
            .max_storage_buffer_binding_size
            .min(u64::from(u32::MAX));
        let limit = self
            .max_binding_override
            .map_or(limit, |o| o.clamp(1024, limit));
        limit & !255
    }

    /// How many pipelines have been compiled so far (each kernel once).
    pub fn compiled_pipelines(&self) -> usize {
        lock(&self.pipelines).len()
    }

    fn offset_alignment(&self) -> u64 {
        u64::from(self.limits.min_storage_buffer_offset_alignment.max(4))
    }
}

fn kernel_what(kernel: Kernel) -> String {
    match kernel {
        Kernel::Reduce(d, op) => format!("{d} {op} (WGSL has no {d}; use the host reducer)"),
        Kernel::Avg(d) => format!("{d} avg (WGSL has no {d}; use the host reducer)"),
        Kernel::Copy => "copy".to_string(),
    }
}

/// Shader parameters; the layout of `Params` in prelude.wgsl.
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct Params {
    dst_off: u32,
    src_off: u32,
    n: u32,
    work: u32,
    arg: u32,
    row: u32,
    pad: [u32; 2],
}

fn binding(w: &Window) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer: &w.buffer,
        offset: w.base,
        size: std::num::NonZeroU64::new(w.size),
    })
}

/// The binding of one buffer: a window `[base, base + size)`.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Window {
    buffer: wgpu::Buffer,
    base: u64,
    size: u64,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct BindKey {
    dst: Window,
    src: Option<Window>,
}

/// Runs reductions and avg scalings on wgpu buffers.
///
/// Holds a uniform buffer and a small cache of bind groups (each keeps its
/// buffers alive until evicted: drop the reducer, or let the cache wrap, to
/// free buffers it has seen). Calls from several threads are serialized.
pub struct WgpuReducer {
    ctx: Arc<WgpuContext>,
    uniform: wgpu::Buffer,
    bind_groups: Mutex<HashMap<BindKey, wgpu::BindGroup>>,
}

impl std::fmt::Debug for WgpuReducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuReducer")
            .field("adapter", &self.ctx.adapter.name)
            .finish_non_exhaustive()
    }
}

fn check_aligned(dtype: DType, offset: u64) -> Result<(), KernelError> {
    if offset % dtype.size() as u64 != 0 {
        return Err(KernelError::Misaligned {
            dtype,
            bytes: offset as usize,
        });
    }
    Ok(())
}

fn check_buffer(
    what: &str,
    buffer: &wgpu::Buffer,
    offset: u64,
    bytes: u64,
) -> Result<(), KernelError> {
    if buffer.size() % 4 != 0 {
        return Err(unsupported(format!(
            "a {what} buffer of {} bytes (wgpu buffers must be a multiple of 4 bytes)",
            buffer.size()
        )));
    }
    if offset
        .checked_add(bytes)
        .is_none_or(|end| end > buffer.size())
    {
        return Err(unsupported(format!(
            "{what} range {offset}+{bytes} beyond the buffer's {} bytes",
            buffer.size()
        )));
    }
    Ok(())
}

impl WgpuReducer {
    /// A reducer on `ctx`'s device.
    pub fn new(ctx: Arc<WgpuContext>) -> WgpuReducer {
        let uniform = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("oxccl params"),
            size: size_of::<Params>() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        WgpuReducer {
            ctx,
            uniform,
            bind_groups: Mutex::new(HashMap::new()),
        }
    }

    /// The context this reducer runs on.
    pub fn context(&self) -> &Arc<WgpuContext> {
        &self.ctx
    }

    /// `dst[dst_offset..][..bytes] = op(dst[..], src[src_offset..][..bytes])`
    /// element-wise, on the device. `Avg` behaves as `Sum`.
    ///
    /// Offsets must be multiples of the element size and the buffers
    /// multiples of 4 bytes long (with `STORAGE` usage). The work is submitted,
    /// not waited for ([`WgpuContext::synchronize`] waits).
    #[allow(clippy::too_many_arguments)]
    pub fn reduce(
        &self,
        dtype: DType,
        op: ReduceOp,
        dst: &wgpu::Buffer,
        dst_offset: u64,
        src: &wgpu::Buffer,
        src_offset: u64,
        bytes: u64,
    ) -> Result<(), KernelError> {
        let n = check_len(dtype, bytes as usize)? as u64;
        let op = if op == ReduceOp::Avg {
            ReduceOp::Sum
        } else {
            op
        };
        let kernel = Kernel::Reduce(dtype, op);
        if dtype == DType::F64 {
            return Err(unsupported(kernel_what(kernel)));
        }
        check_aligned(dtype, dst_offset)?;
        check_aligned(dtype, src_offset)?;
        check_buffer("destination", dst, dst_offset, bytes)?;
        check_buffer("source", src, src_offset, bytes)?;
        if dst == src {
            return Err(unsupported(
                "reducing a buffer into itself (bind a copy as the source)".to_string(),
            ));
        }
        self.run(kernel, dst, dst_offset, Some((src, src_offset)), n, 0)
    }

    /// Turns the sums in `dst[offset..][..bytes]` of `contributions` values
    /// into averages, on the device (a no-op for 0 or 1 contributions).
    pub fn finish_avg(
        &self,
        dtype: DType,
        dst: &wgpu::Buffer,
        offset: u64,
        bytes: u64,
        contributions: usize,
    ) -> Result<(), KernelError> {
        let n = check_len(dtype, bytes as usize)? as u64;
        let kernel = Kernel::Avg(dtype);
        if dtype == DType::F64 {
            return Err(unsupported(kernel_what(kernel)));
        }
        check_aligned(dtype, offset)?;
        check_buffer("destination", dst, offset, bytes)?;
        if contributions <= 1 {
            return Ok(());
        }
        // The divisor as the shader wants it (see avg_expr); 0 means the
        // reference's quotient is 0 because the count does not fit the type.
        let fits = |max: u64| {
            if contributions as u64 <= max {
                contributions as u32
            } else {
                0
            }
        };
        let arg = match dtype {
            DType::F32 | DType::F16 | DType::BF16 => (contributions as f32).to_bits(),
            DType::I8 => fits(i8::MAX as u64),
            DType::U8 => fits(u8::MAX as u64),
            DType::I32 => fits(i32::MAX as u64),
            DType::U32 => fits(u64::from(u32::MAX)),
            DType::I64 | DType::U64 => u32::try_from(contributions).map_err(|_| {
                unsupported(format!(
                    "{dtype} avg over {contributions} contributions (at most {} on wgpu)",
                    u32::MAX
                ))
            })?,
            DType::F64 => unreachable!("rejected above"),
        };
        self.run(kernel, dst, offset, None, n, arg)
    }

    /// Copies `bytes` bytes from `src` to `dst` at any byte offsets, with a
    /// kernel that masks the partial words at both ends.
    fn copy_bytes(
        &self,
        dst: &wgpu::Buffer,
        dst_offset: u64,
        src: &wgpu::Buffer,
        src_offset: u64,
        bytes: u64,
    ) -> Result<(), KernelError> {
        self.run(
            Kernel::Copy,
            dst,
            dst_offset,
            Some((src, src_offset)),
            bytes,
            0,
        )
    }

    /// Dispatches `kernel` over `n` elements, one window at a time.
    fn run(
        &self,
        kernel: Kernel,
        dst: &wgpu::Buffer,
        dst_offset: u64,
        src: Option<(&wgpu::Buffer, u64)>,
        n: u64,
        arg: u32,
    ) -> Result<(), KernelError> {
        if n == 0 {
            return Ok(());
        }
        let pipeline = self.ctx.pipeline(kernel)?;
        let size = u64::from(kernel.lane_bytes());
        let max_binding = self.ctx.max_binding();
        let whole = dst.size() <= max_binding && src.is_none_or(|(s, _)| s.size() <= max_binding);
        // Elements per window: leave room for the alignment of the window base.
        let per_window = if whole {
            n
        } else {
            ((max_binding - 2 * self.ctx.offset_alignment()) / 8 * 8 / size).max(1)
        };
        let mut cache = lock(&self.bind_groups);
        let mut done = 0;
        while done < n {
            let count = per_window.min(n - done);
            let window = |buffer: &wgpu::Buffer, offset: u64| {
                if whole {
                    Window {
                        buffer: buffer.clone(),
                        base: 0,
                        size: buffer.size(),
                    }
                } else {
                    let start = offset + done * size;
                    let base = start / self.ctx.offset_alignment() * self.ctx.offset_alignment();
                    Window {
                        buffer: buffer.clone(),
                        base,
                        size: (start + count * size).next_multiple_of(4) - base,
                    }
                }
            };
            let key = BindKey {
                dst: window(dst, dst_offset),
                src: src.map(|(s, off)| window(s, off)),
            };
            let dst_off = dst_offset + done * size - key.dst.base;
            let src_off = src.map_or(0, |(_, off)| off + done * size)
                - key.src.as_ref().map_or(0, |w| w.base);
            let work = if size == 8 {
                count
            } else {
                (dst_off + count * size).div_ceil(4) - dst_off / 4
            };
            let groups = work.div_ceil(u64::from(WORKGROUP));
            let x = groups.min(u64::from(MAX_GROUPS_PER_DIM));
            let y = groups.div_ceil(x);
            if y > u64::from(MAX_GROUPS_PER_DIM) {
                return Err(unsupported(format!("a dispatch of {work} invocations")));
            }
            let params = Params {
                dst_off: dst_off as u32,
                src_off: src_off as u32,
                n: count as u32,
                work: work as u32,
                arg,
                row: (x * u64::from(WORKGROUP)) as u32,
                pad: [0; 2],
            };
            if cache.len() >= BIND_GROUP_CACHE && !cache.contains_key(&key) {
                cache.clear();
            }
            let bind_group = cache.entry(key.clone()).or_insert_with(|| {
                let mut entries = vec![wgpu::BindGroupEntry {
                    binding: 0,
                    resource: binding(&key.dst),
                }];
                if let Some(s) = &key.src {
                    entries.push(wgpu::BindGroupEntry {
                        binding: 1,
                        resource: binding(s),
                    });
                }
                entries.push(wgpu::BindGroupEntry {
                    binding: 2,
                    resource: self.uniform.as_entire_binding(),
                });
                self.ctx
                    .device
                    .create_bind_group(&wgpu::BindGroupDescriptor {
                        label: None,
                        layout: if kernel.binary() {
                            &self.ctx.binary_layout
                        } else {
                            &self.ctx.unary_layout
                        },
                        entries: &entries,
                    })
            });
            self.ctx
                .queue
                .write_buffer(&self.uniform, 0, bytemuck::bytes_of(&params));
            let mut encoder = self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: None,
                });
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &*bind_group, &[]);
                pass.dispatch_workgroups(x as u32, y as u32, 1);
            }
            self.ctx.queue.submit([encoder.finish()]);
            done += count;
        }
        drop(cache);
        *lock(&self.ctx.last_submitted) = Some(Work {
            kernel,
            bytes: n * size,
        });
        self.ctx.check_errors()
    }
}

/// A buffer in device memory, with the scratch and readback buffers that host
/// staging needs (grown on demand and reused).
pub struct WgpuBuffer {
    reducer: WgpuReducer,
    buffer: wgpu::Buffer,
    len: usize,
    scratch: Option<wgpu::Buffer>,
    readback: Mutex<Option<wgpu::Buffer>>,
}

impl std::fmt::Debug for WgpuBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBuffer")
            .field("len", &self.len)
            .field("adapter", &self.reducer.ctx.adapter.name)
            .finish_non_exhaustive()
    }
}

/// Bytes allocated for a buffer of `len` bytes: a non-zero multiple of 4.
fn alloc_size(len: usize) -> u64 {
    (len as u64).next_multiple_of(4).max(4)
}

fn check_range(len: usize, offset: usize, bytes: usize) -> Result<(), KernelError> {
    if offset.checked_add(bytes).is_none_or(|end| end > len) {
        return Err(unsupported(format!(
            "range {offset}+{bytes} beyond a buffer of {len} bytes"
        )));
    }
    Ok(())
}

impl WgpuBuffer {
    /// `bytes` zeroed bytes on `ctx`'s device.
    pub fn new(ctx: Arc<WgpuContext>, bytes: usize) -> Result<WgpuBuffer, KernelError> {
        let size = alloc_size(bytes);
        if size > ctx.limits.max_buffer_size {
            return Err(unsupported(format!(
                "a buffer of {bytes} bytes (the device's limit is {})",
                ctx.limits.max_buffer_size
            )));
        }
        let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("oxccl buffer"),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        ctx.check_errors()?;
        Ok(WgpuBuffer {
            reducer: WgpuReducer::new(ctx),
            buffer,
            len: bytes,
            scratch: None,
            readback: Mutex::new(None),
        })
    }

    /// A device copy of `data`.
    pub fn from_host(ctx: Arc<WgpuContext>, data: &[u8]) -> Result<WgpuBuffer, KernelError> {
        let mut buffer = WgpuBuffer::new(ctx, data.len())?;
        buffer.write(0, data)?;
        Ok(buffer)
    }

    /// The whole buffer, copied to the host.
    pub fn to_host(&self) -> Result<Vec<u8>, KernelError> {
        let mut out = vec![0; self.len];
        self.read(0, &mut out)?;
        Ok(out)
    }

    /// The device buffer (its allocation is rounded up to a multiple of 4).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// The reducer this buffer's kernels run on.
    pub fn reducer(&self) -> &WgpuReducer {
        &self.reducer
    }

    /// Copies `src` into the scratch buffer at offset 0 (padded to 4 bytes),
    /// growing the scratch buffer if needed.
    fn stage(&mut self, src: &[u8]) -> Result<wgpu::Buffer, KernelError> {
        let need = alloc_size(src.len());
        let scratch = match &self.scratch {
            Some(s) if s.size() >= need => s.clone(),
            _ => {
                let ctx = &self.reducer.ctx;
                let size = need
                    .next_power_of_two()
                    .max(256)
                    .min(ctx.limits.max_buffer_size.max(need));
                let s = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("oxccl scratch"),
                    size,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                // Bind groups of the old scratch buffer would keep it alive.
                lock(&self.reducer.bind_groups).clear();
                self.scratch = Some(s.clone());
                s
            }
        };
        let body = src.len() / 4 * 4;
        let queue = &self.reducer.ctx.queue;
        if body > 0 {
            queue.write_buffer(&scratch, 0, &src[..body]);
        }
        if body < src.len() {
            let mut tail = [0u8; 4];
            tail[..src.len() - body].copy_from_slice(&src[body..]);
            queue.write_buffer(&scratch, body as u64, &tail);
        }
        Ok(scratch)
    }
}

impl DeviceMemory for WgpuBuffer {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn alloc_like(&self, bytes: usize) -> Result<Box<dyn DeviceMemory>, KernelError> {
        Ok(Box::new(WgpuBuffer::new(
            Arc::clone(&self.reducer.ctx),
            bytes,
        )?))
    }

    fn len_bytes(&self) -> usize {
        self.len
    }

    fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), KernelError> {
        check_range(self.len, offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        let ctx = &self.reducer.ctx;
        let start = offset as u64 / 4 * 4;
        let end = (offset + dst.len()) as u64;
        let size = end.next_multiple_of(4) - start;
        // The mappable buffer is reused while large enough.
        let mut slot = lock(&self.readback);
        let readback = match &*slot {
            Some(r) if r.size() >= size => r.clone(),
            _ => {
                let r = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("oxccl readback"),
                    size: size.next_power_of_two().max(256),
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                *slot = Some(r.clone());
                r
            }
        };
        let mut encoder = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        encoder.copy_buffer_to_buffer(&self.buffer, start, &readback, 0, size);
        let submission = ctx.queue.submit([encoder.finish()]);
        let slice = readback.slice(0..size);
        let (tx, rx) = mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        let what = || {
            format!(
                "copying {size} bytes back to the host{}",
                ctx.after_last_submitted()
            )
        };
        // The callback runs inside a poll once the copy is done; poll until it
        // has run or the deadline passes.
        // No deadline if the timeout is too large to add to now.
        let deadline = Instant::now().checked_add(ctx.timeout);
        let mut polled = false;
        let mapped = loop {
            match rx.try_recv() {
                Ok(r) => {
                    break r.map_err(|e| device_error(format!("mapping the readback buffer: {e}")));
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    break Err(device_error("the readback buffer's mapping was dropped"));
                }
                Err(mpsc::TryRecvError::Empty) => {}
            }
            let left =
                deadline.map_or(ctx.timeout, |d| d.saturating_duration_since(Instant::now()));
            if polled && left.is_zero() {
                break Err(timed_out(&what(), ctx.timeout, &ctx.adapter.name));
            }
            if polled {
                // Done but not yet called back: do not spin on the device.
                std::thread::sleep(Duration::from_millis(1));
            }
            if let Err(e) = ctx.wait(Some(submission.clone()), left, &what) {
                break Err(e);
            }
            polled = true;
        };
        if let Err(e) = mapped {
            // The mapping may still be pending: a later read must not reuse
            // this buffer.
            *slot = None;
            return Err(e);
        }
        ctx.check_errors()?;
        {
            let view = slice
                .get_mapped_range()
                .map_err(|e| device_error(format!("mapped range: {e}")))?;
            let skip = offset - start as usize;
            dst.copy_from_slice(&view[skip..skip + dst.len()]);
        }
        readback.unmap();
        Ok(())
    }

    fn write(&mut self, offset: usize, src: &[u8]) -> Result<(), KernelError> {
        check_range(self.len, offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        if offset % 4 == 0 && src.len() % 4 == 0 {
            self.reducer
                .ctx
                .queue
                .write_buffer(&self.buffer, offset as u64, src);
            return self.reducer.ctx.check_errors();
        }
        let scratch = self.stage(src)?;
        self.reducer
            .copy_bytes(&self.buffer, offset as u64, &scratch, 0, src.len() as u64)
    }

    fn reduce_from_host(
        &mut self,
        dtype: DType,
        op: ReduceOp,
        offset: usize,
        src: &[u8],
    ) -> Result<(), KernelError> {
        check_len(dtype, src.len())?;
        check_aligned(dtype, offset as u64)?;
        check_range(self.len, offset, src.len())?;
        if dtype == DType::F64 {
            return Err(unsupported(kernel_what(Kernel::Reduce(dtype, op))));
        }
        if src.is_empty() {
            return Ok(());
        }
        let scratch = self.stage(src)?;
        self.reducer.reduce(
            dtype,
            op,
            &self.buffer,
            offset as u64,
            &scratch,
            0,
            src.len() as u64,
        )
    }

    fn finish_avg(
        &mut self,
        dtype: DType,
        offset: usize,
        len: usize,
        contributions: usize,
    ) -> Result<(), KernelError> {
        check_range(self.len, offset, len)?;
        self.reducer.finish_avg(
            dtype,
            &self.buffer,
            offset as u64,
            len as u64,
            contributions,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A poll that timed out becomes an error naming what was awaited, for
    /// how long and on which adapter; other poll errors name what was awaited.
    #[test]
    fn wait_result_names_what_timed_out() {
        let work = Work {
            kernel: Kernel::Reduce(DType::F32, ReduceOp::Sum),
            bytes: 4_194_304,
        };
        let what = || work.to_string();
        let timeout = Duration::from_secs(300);
        let err = wait_result(Err(wgpu::PollError::Timeout), &what, timeout, "llvmpipe")
            .expect_err("timed out");
        assert!(matches!(err, KernelError::Timeout { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "wgpu device timeout: the GPU did not finish reducing 4194304 bytes of f32 (sum) \
             within 300s (adapter llvmpipe)"
        );
        let err = wait_result(
            Err(wgpu::PollError::WrongSubmissionIndex(7, 3)),
            &what,
            timeout,
            "llvmpipe",
        )
        .expect_err("wrong index");
        assert!(
            err.to_string()
                .contains("waiting for reducing 4194304 bytes of f32 (sum)"),
            "{err}"
        );
        for status in [
            wgpu::PollStatus::QueueEmpty,
            wgpu::PollStatus::WaitSucceeded,
        ] {
            assert!(wait_result(Ok(status), &what, timeout, "llvmpipe").is_ok());
        }
    }

    /// Every kernel's WGSL parses and validates (naga, no device needed).
    #[test]
    fn every_shader_validates() {
        let mut kernels = vec![Kernel::Copy];
        for d in DType::ALL {
            kernels.push(Kernel::Avg(d));
            for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max] {
                kernels.push(Kernel::Reduce(d, op));
            }
        }
        let mut validated = 0;
        for k in kernels {
            let Some(src) = shader_source(k) else {
                assert!(matches!(
                    k,
                    Kernel::Reduce(DType::F64, _) | Kernel::Avg(DType::F64)
                ));
                continue;
            };
            let module = wgpu::naga::front::wgsl::parse_str(&src)
                .unwrap_or_else(|e| panic!("{k:?}: {}", e.emit_to_string(&src)));
            wgpu::naga::valid::Validator::new(
                wgpu::naga::valid::ValidationFlags::all(),
                wgpu::naga::valid::Capabilities::empty(),
            )
            .validate(&module)
            .unwrap_or_else(|e| panic!("{k:?}: {e:?}"));
            validated += 1;
        }
        assert_eq!(validated, 1 + 9 * 5);
    }
}
