//! Transport for oxccl: links between ranks, their wire format, and the
//! rendezvous stores ranks meet through.
//!
//! This crate moves messages and knows nothing of dtypes or collectives.
//! The engine drives every link as a [`MessageLink`] ([`message`]): it
//! registers memory, posts sends and receives whose memory the operation
//! owns until it is done, and tests them, never blocking; it sleeps on
//! several links at once with [`wait`]. What every link offers besides
//! (its descriptor to sleep on, withdrawing, shutting down, capabilities)
//! is its [`Endpoint`]. Byte streams ([`Link`]) carry messages by framing
//! them; implementations:
//!
//! * TCP ([`tcp`]): socket2-configured sockets with a handshake that refuses
//!   stray and mismatched connections ([`wire::Hello`]);
//! * in-process ([`inproc`]): Unix socket pairs between threads of one
//!   process, so that tests run the same engine code as TCP jobs;
//! * fault-injecting ([`fault`]): in-memory queues that deliver a byte at a
//!   time, stall, fail or close on purpose, for testing what drives links;
//! * shared memory ([`shm`]): byte rings in a segment both ranks of one host
//!   map, upgraded from a socket that stays on as doorbell and death notice;
//! * rendezvous stores ([`store`]): in-memory, TCP (served by rank 0) and
//!   file-system key-value stores.
//!
//! Every wire format (frames, handshakes, store protocols) is read and
//! written with one codec ([`codec`]) whose errors name the format and field.
//!
//! Messages are a fixed [`wire::FrameHeader`] and a payload; the engine
//! decides what the header's opaque descriptor bytes mean.

pub mod auth;
pub mod codec;
mod error;
pub mod fault;
#[cfg(test)]
mod fuzz;
pub mod inproc;
mod link;
pub mod message;
pub mod shm;
mod sockopt;
pub mod store;
pub mod tcp;
#[cfg(feature = "ucx")]
pub mod ucx;
pub mod wire;

pub use error::TransportError;
pub use link::{
    Capabilities, Direction, Endpoint, Link, Medium, Readiness, ShutdownHandle, StreamLink, wait,
    wait_watching,
};
pub use message::{Incoming, Lent, MessageLink, Outgoing, Parts, Status};
pub use oxccl_memory::{DevMut, DevRef, MemoryKind, MemoryKinds};

/// What the code under test logs, for tests that check a warning is given.
#[cfg(test)]
pub(crate) mod test_log {
    use std::sync::{Arc, Mutex, OnceLock, PoisonError};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    static SINK: OnceLock<Sink> = OnceLock::new();

    /// Everything logged at warn and above in this test process so far
    /// (from every thread: the subscriber is global, installed on first use).
    pub(crate) fn warnings() -> String {
        let sink = SINK.get_or_init(|| {
            let sink = Sink::default();
            let writer = sink.clone();
            let _ = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::WARN)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .try_init();
            sink
        });
        String::from_utf8_lossy(&sink.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}
