use crate::DType;

/// Errors of the reduction kernels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// The destination and source buffers have different lengths.
    #[error("reduce: destination has {dst} bytes but source has {src}")]
    LengthMismatch {
        /// Destination length in bytes.
        dst: usize,
        /// Source length in bytes.
        src: usize,
    },
    /// A buffer length is not a whole number of elements.
    #[error("{bytes} bytes is not a whole number of {dtype} elements ({} bytes each)", dtype.size())]
    Misaligned {
        /// Element type.
        dtype: DType,
        /// Length in bytes.
        bytes: usize,
    },
    /// The backend cannot handle this dtype or op.
    #[error("{backend} reducer does not support {what}")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// What is not supported (for example "f64 on wgpu").
        what: String,
    },
    /// The backend is not available on this machine (no driver, no adapter).
    #[error("{backend} backend unavailable: {reason}")]
    Unavailable {
        /// Backend name.
        backend: &'static str,
        /// Why.
        reason: String,
    },
    /// The device did not finish within its deadline (a hung or lost device).
    #[error("{backend} device timeout: {message}")]
    Timeout {
        /// Backend name.
        backend: &'static str,
        /// What was awaited, for how long, on which device.
        message: String,
    },
    /// A device call failed.
    #[error("{backend} device error: {message}")]
    Device {
        /// Backend name.
        backend: &'static str,
        /// The driver's message.
        message: String,
    },
}
