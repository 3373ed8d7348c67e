//! oxccl: collective communication for distributed training.
//!
//! A [`Communicator`] joins one rank to a world of ranks; its collectives
//! (allreduce, broadcast, reduce, allgather, reduce-scatter, barrier) run as
//! pipelined rings over shared memory between ranks of one host and TCP
//! between hosts (socket pairs or shared memory between threads of one
//! process), on host memory or on device memory (wgpu, CUDA) reduced where
//! it lives. Buffers are cut into chunks and slices so that sending,
//! receiving and reducing overlap; every frame carries a descriptor of its
//! call, so ranks that disagree fail with an error naming both calls; every
//! wait has a deadline; a failing rank tells its neighbours at once and the
//! communicator is then poisoned. A [`fusion`] engine packs many small
//! tensors into few allreduces, as Horovod does.
//!
//! oxccl logs through `tracing` and installs no subscriber: a program that
//! wants its messages installs one (oxccl's own binaries and C library do,
//! at the level `OXCCL_DEBUG` names).
//!
//! ```
//! use oxccl::{Config, ReduceOp, run_in_process};
//!
//! let sums = run_in_process(4, Config::default(), |comm| {
//!     let mut grad = vec![comm.rank() as f32; 1000];
//!     comm.all_reduce_in_place(&mut grad, ReduceOp::Sum).map(|_| grad[0])
//! })
//! .unwrap();
//! assert!(sums.iter().all(|s| *s.as_ref().unwrap() == 6.0));
//! ```

#![forbid(unsafe_code)]

pub mod algo;
mod bootstrap;
mod comm;
pub mod config;
mod descriptor;
mod engine;
mod error;
mod exchange;
mod failure;
pub mod fusion;
#[cfg(test)]
mod fuzz;
mod lazy;
mod links;
mod p2p;
mod schedule;
mod shrink;
mod split;
mod upgrade;

pub use bootstrap::{UniqueId, run_in_process};
pub use comm::{AbortHandle, Communicator, Stats};
pub use config::{Algo, AuthMode, Config, SingleCopy, Transport};
pub use descriptor::Descriptor;
pub use error::{Error, ErrorKind, Result};
pub use exchange::Exchange;
pub use half::{bf16, f16};
/// The reduction kernels and device backends (`kernels::wgpu`, `kernels::cuda` with their features).
pub use oxccl_kernels as kernels;
pub use oxccl_kernels::DeviceMemory;
pub use oxccl_kernels::{DType, Element, ReduceOp};
pub use oxccl_transport::auth::JobSecret;
pub use p2p::Batch;
pub use schedule::Kind;

/// The instant `after` from now; a wait longer than a century (a timeout of
/// `Duration::MAX` set in code) waits a century instead of overflowing the clock.
pub(crate) fn deadline_in(after: std::time::Duration) -> std::time::Instant {
    const CENTURY: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);
    std::time::Instant::now() + after.min(CENTURY)
}
