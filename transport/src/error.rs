use std::time::Duration;

use crate::store::StoreError;

/// Errors of links, handshakes and stores.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A system call on a link failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the peer ("sending to rank 2 over tcp 10.0.0.2:4000").
        what: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection or reset it: it exited, was killed, or aborted.
    #[error("rank {peer} closed the connection ({how})")]
    PeerClosed {
        /// The peer's rank.
        peer: usize,
        /// "end of stream", "connection reset", ...
        how: String,
    },
    /// The peer took back a write it had posted for this side to copy from
    /// its memory ([`Endpoint::withdraw`](crate::Endpoint::withdraw)): its call
    /// failed, and the bytes it had offered are no longer its call's data.
    #[error("rank {peer} withdrew a transfer: its call failed")]
    Withdrawn {
        /// The peer's rank.
        peer: usize,
    },
    /// A deadline passed.
    #[error("timed out after {waited:.1?} {what}")]
    Timeout {
        /// What was awaited, naming the peer.
        what: String,
        /// How long it was awaited.
        waited: Duration,
    },
    /// A connection failed the handshake: a stray client, another job, or a
    /// peer of another protocol version.
    #[error("handshake with {addr} refused: {reason}")]
    Handshake {
        /// The remote address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// A peer sent bytes that do not follow the wire format.
    #[error("protocol error from rank {peer}: {reason}")]
    Protocol {
        /// The peer's rank.
        peer: usize,
        /// What was wrong.
        reason: String,
    },
    /// A message arrived whose header is not the one the receive expected:
    /// the peer is in another call, another step, or out of step. None of
    /// its payload reached the receive's memory.
    #[error("rank {peer} sent {got:?} where {expected:?} was expected")]
    Unexpected {
        /// The peer's rank.
        peer: usize,
        /// The header the receive was posted for.
        expected: Box<crate::wire::FrameHeader>,
        /// The header that came.
        got: Box<crate::wire::FrameHeader>,
    },
    /// A connection did not authenticate: a rank of another job, a peer
    /// without the job's secret, or no oxccl peer at all.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// A rendezvous store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TransportError {
    /// Wraps an I/O error with a description of the operation.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        TransportError::Io {
            what: what.into(),
            source,
        }
    }
}
