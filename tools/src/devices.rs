//! Device buffers by name, for tools that take `--device cpu|hostdev|wgpu|cuda`.

use oxccl::{Config, DeviceMemory, Error, Result};

/// Makes a buffer on one device holding the given host bytes.
pub type MakeBuffer = Box<dyn Fn(&[u8]) -> Result<Box<dyn DeviceMemory>>>;

/// The buffer factory of `device` ("cpu", "hostdev", "wgpu" or "cuda"), or
/// `None` for host memory. "hostdev" is host memory handled as a device
/// buffer reached by address (`oxccl_kernels::hostdev`): what links that
/// move device memory themselves (UCX) take as it is. A backend this build lacks, or that the machine lacks (no
/// adapter, no driver), is an error that says so. CUDA takes the device
/// `config.cuda_device`, else `local_rank`, else 0.
pub fn buffer_factory(
    device: &str,
    config: &Config,
    local_rank: Option<usize>,
) -> Result<Option<MakeBuffer>> {
    match device.to_ascii_lowercase().as_str() {
        "cpu" => Ok(None),
        "hostdev" => {
            use oxccl::kernels::hostdev::HostDevice;
            Ok(Some(Box::new(|data: &[u8]| {
                Ok(Box::new(HostDevice::from_host(data)) as Box<dyn DeviceMemory>)
            })))
        }
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            use oxccl::kernels::wgpu::{WgpuBuffer, WgpuContext};
            let ctx = WgpuContext::new(&config.wgpu_settings())?;
            Ok(Some(Box::new(move |data: &[u8]| {
                Ok(Box::new(WgpuBuffer::from_host(ctx.clone(), data)?) as Box<dyn DeviceMemory>)
            })))
        }
        #[cfg(feature = "cuda")]
        "cuda" => {
            use oxccl::kernels::cuda::{CudaBuffer, CudaReducer, CudaSettings};
            let settings = CudaSettings {
                ordinal: config.cuda_device.or(local_rank).unwrap_or(0),
                include_dirs: config.cuda_include.clone(),
            };
            let reducer = CudaReducer::new(&settings)?;
            Ok(Some(Box::new(move |data: &[u8]| {
                Ok(Box::new(CudaBuffer::from_host(reducer.clone(), data)?)
                    as Box<dyn DeviceMemory>)
            })))
        }
        #[allow(unreachable_patterns)]
        name @ ("wgpu" | "cuda") => {
            let _ = (config, local_rank);
            Err(Error::InvalidUsage(format!(
                "device {name}: this build of oxccl lacks that backend (build with --features {name})"
            )))
        }
        other => Err(Error::InvalidArgument(format!(
            "unknown device '{other}' (cpu, hostdev, wgpu or cuda)"
        ))),
    }
}
