//! What oxccl's command-line tools share with its benchmarks: deterministic
//! data to check collectives with ([`pattern`]), device buffers by name
//! ([`devices`]) and a log subscriber ([`init_logging`]).
//!
//! The binaries are `oxrun`, a local launcher, and `oxccl-check`, which runs
//! collectives under any launcher and checks every element. They live here,
//! not in the `oxccl` library, so that the library depends on no
//! command-line or logging crate.

#![forbid(unsafe_code)]

pub mod devices;
pub mod pattern;

/// Installs a stderr logger for oxccl's crates at `level` (an `OXCCL_DEBUG`
/// level), unless a `tracing` subscriber is installed already. No colour
/// codes when stderr is not a terminal: srun, sbatch and oxrun logs are pipes.
pub fn init_logging(level: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            oxccl::config::log_filter(level),
        ))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
