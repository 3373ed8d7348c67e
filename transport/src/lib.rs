//! Byte transport for oxccl: links between ranks, their wire format, and the
//! rendezvous stores ranks meet through.
//!
//! This crate moves bytes and knows nothing of dtypes or collectives. A
//! [`Link`] is one ordered, reliable byte stream to one peer, driven without
//! blocking: the collective engine writes and reads what it can and waits on
//! several links at once with [`wait`]. Implementations:
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
//! Frames on a link are a fixed [`wire::FrameHeader`] followed by a payload;
//! the engine decides what the header's opaque descriptor bytes mean.

pub mod codec;
mod error;
pub mod fault;
pub mod inproc;
mod link;
pub mod shm;
pub mod store;
pub mod tcp;
pub mod wire;

pub use error::TransportError;
pub use link::{Direction, Link, Readiness, ShutdownHandle, StreamLink, wait, wait_watching};
