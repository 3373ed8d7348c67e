//! The error of every oxccl call, and its stable classification.

use std::time::Duration;

use oxccl_kernels::KernelError;
use oxccl_transport::TransportError;
use oxccl_transport::store::StoreError;

/// A small, stable classification of errors, modelled on NCCL's result codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A bad argument: wrong sizes, a root out of range, a bad setting.
    InvalidArgument,
    /// A valid call at the wrong time, or ranks that disagree on a call.
    InvalidUsage,
    /// The operating system failed a call (sockets, files).
    System,
    /// A peer failed: it died, closed its links or reported an error.
    Remote,
    /// A deadline passed.
    Timeout,
    /// The requested backend (GPU, driver) is not available.
    UnavailableBackend,
    /// A bug in oxccl.
    Internal,
    /// The communicator was poisoned by an earlier failure.
    Aborted,
}

/// Every way an oxccl call fails. Messages name the rank, the call and,
/// where there is one, the peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A bad argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A call that is not valid now.
    #[error("invalid usage: {0}")]
    InvalidUsage(String),
    /// A missing, malformed or contradictory setting.
    #[error("{variable}: {reason}")]
    Config {
        /// The environment variable (or setting) at fault.
        variable: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Connecting the ranks failed.
    #[error("rank {rank}: bootstrap failed: {source}")]
    Bootstrap {
        /// This rank.
        rank: usize,
        /// What failed.
        #[source]
        source: TransportError,
    },
    /// A link failed during a collective.
    #[error("rank {rank}: {call}: {source}")]
    Transport {
        /// This rank.
        rank: usize,
        /// The collective ("all_reduce #3 (f32 sum, 1024 elements)").
        call: String,
        /// What failed.
        #[source]
        source: TransportError,
    },
    /// The ranks called different collectives (or the same with other arguments).
    #[error("rank {rank}: {call}: collective mismatch with rank {peer}, which called {theirs}")]
    Mismatch {
        /// This rank.
        rank: usize,
        /// This rank's call.
        call: String,
        /// The peer that disagrees.
        peer: usize,
        /// The peer's call.
        theirs: String,
    },
    /// Another rank failed, and this rank learned of it.
    #[error("rank {rank}: {call}: {}", describe_remote(*.origin, *.reporter, .cause))]
    Remote {
        /// This rank.
        rank: usize,
        /// This rank's call.
        call: String,
        /// The rank where the failure started.
        origin: usize,
        /// The neighbour that passed the news on, when it is not the origin.
        reporter: Option<usize>,
        /// What happened there.
        cause: String,
    },
    /// Nothing moved for the configured timeout.
    #[error(
        "rank {rank}: {call}: no progress for {waited:.1?} while waiting for {what} (OXCCL_TIMEOUT)"
    )]
    Timeout {
        /// This rank.
        rank: usize,
        /// This rank's call.
        call: String,
        /// What was awaited, naming the peer.
        what: String,
        /// How long.
        waited: Duration,
    },
    /// The communicator failed earlier; it must be rebuilt.
    #[error("rank {rank}: communicator is unusable after an earlier failure: {cause}")]
    Aborted {
        /// This rank.
        rank: usize,
        /// The kind of the original failure.
        kind: ErrorKind,
        /// The original failure's message.
        cause: String,
    },
    /// A reduction kernel failed.
    #[error("rank {rank}: {call}: {source}")]
    Kernel {
        /// This rank.
        rank: usize,
        /// This rank's call.
        call: String,
        /// What failed.
        #[source]
        source: KernelError,
    },
    /// A device backend failed outside a collective (no adapter, no driver).
    #[error(transparent)]
    Device(#[from] KernelError),
    /// A rendezvous store failed outside a collective.
    #[error("rank {rank}: {source}")]
    Store {
        /// This rank.
        rank: usize,
        /// What failed.
        #[source]
        source: StoreError,
    },
    /// A bug in oxccl.
    #[error("internal error: {0}")]
    Internal(String),
}

fn describe_remote(origin: usize, reporter: Option<usize>, cause: &str) -> String {
    match reporter {
        Some(r) if r != origin => format!("rank {origin} failed (reported by rank {r}): {cause}"),
        _ => format!("rank {origin} failed: {cause}"),
    }
}

impl Error {
    /// The stable classification of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidArgument(_) | Error::Config { .. } => ErrorKind::InvalidArgument,
            Error::InvalidUsage(_) | Error::Mismatch { .. } => ErrorKind::InvalidUsage,
            Error::Bootstrap { source, .. } | Error::Transport { source, .. } => match source {
                TransportError::PeerClosed { .. }
                | TransportError::Protocol { .. }
                | TransportError::Withdrawn { .. } => ErrorKind::Remote,
                TransportError::Timeout { .. } => ErrorKind::Timeout,
                TransportError::Handshake { .. } => ErrorKind::Remote,
                TransportError::Auth(a) => auth_kind(a),
                TransportError::Store(s) => store_kind(s),
                _ => ErrorKind::System,
            },
            Error::Store { source, .. } => store_kind(source),
            Error::Remote { .. } => ErrorKind::Remote,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Aborted { .. } => ErrorKind::Aborted,
            Error::Kernel { source, .. } | Error::Device(source) => match source {
                KernelError::Unsupported { .. } | KernelError::Unavailable { .. } => {
                    ErrorKind::UnavailableBackend
                }
                KernelError::Device { .. } => ErrorKind::System,
                KernelError::Timeout { .. } => ErrorKind::Timeout,
                _ => ErrorKind::InvalidArgument,
            },
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The kind of the failure behind this error: for [`ErrorKind::Aborted`],
    /// the kind of the error that poisoned the communicator.
    pub fn cause_kind(&self) -> ErrorKind {
        match self {
            Error::Aborted { kind, .. } => *kind,
            e => e.kind(),
        }
    }
}

fn store_kind(e: &StoreError) -> ErrorKind {
    match e {
        StoreError::Timeout { .. } => ErrorKind::Timeout,
        StoreError::Auth { source, .. } => auth_kind(source),
        _ => ErrorKind::System,
    }
}

/// A peer that fails authentication disagrees with this rank (another
/// job, another secret, another build): remote, unless the wait ran out or
/// the system failed.
fn auth_kind(e: &oxccl_transport::auth::AuthError) -> ErrorKind {
    use oxccl_transport::auth::AuthError;
    match e {
        AuthError::Timeout { .. } => ErrorKind::Timeout,
        AuthError::Io { .. } | AuthError::Randomness(_) => ErrorKind::System,
        _ => ErrorKind::Remote,
    }
}

/// The result of oxccl calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;
