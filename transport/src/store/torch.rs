//! A client of PyTorch's `TCPStore`, so that oxccl rendezvous through the
//! store a torch launcher already serves.
//!
//! torchrun's agent serves a `TCPStore` on `MASTER_ADDR:MASTER_PORT` and
//! tells its workers so (`TORCHELASTIC_USE_AGENT_STORE=True`); a worker that
//! tried to serve its own store on that port would find it taken. A
//! [`TorchStore`] speaks torch's protocol as a client instead, the way
//! torch's own workers do.
//!
//! # Protocol
//!
//! As torch's client writes it (`torch/csrc/distributed/c10d/TCPStore.cpp`
//! and its server backends): integers in the host's byte order (little-endian
//! on every platform torch ships for), strings and byte vectors as a `u64`
//! length and the bytes. A request is a `u8` query type and its arguments:
//!
//! | query | arguments | reply |
//! |---|---|---|
//! | validate (0) | `magic: u32` = `0x3C85F7CE` (first request of a connection) | none |
//! | set (1) | key, value | none |
//! | get (3) | key (present: waited for first) | value |
//! | add (4) | key, `delta: i64` | `new: i64` |
//! | check (5) | `n: u64`, n keys | `u8`: 0 ready, 1 not ready |
//! | wait (6) | `n: u64`, n keys | `u8` 0 (stop waiting) once all are set |
//! | cancel wait (12) | nothing | `u8` 1 (wait canceled) |
//! | ping (13) | `nonce: u32` | the same nonce |
//!
//! torch's clients put `/` before every key on the wire (so that a key `k`
//! set by torch's Python `TCPStore.set("k", ...)` is `/k` at the server);
//! this client does the same, so that the two read each other's keys.
//!
//! torch's server takes keys of at most 8 KiB and values of at most 8 MiB;
//! this client refuses larger ones before sending. Counters made by
//! [`Store::add`] hold the decimal text of the number in torch's store, not
//! the 8-byte form of oxccl's own stores: read them with [`Store::add`] of 0.
//!
//! Requests are written and replies decoded with the [`codec`](crate::codec).

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::client::{Client, Conn};
use super::tcp::{ReadError, read_bytes, read_fixed};
use super::{Store, StoreError, short_key};
use crate::codec::{DecodeError, Prefix, Writer};

const VALIDATE: u8 = 0;
const SET: u8 = 1;
const GET: u8 = 3;
const ADD: u8 = 4;
const CHECK: u8 = 5;
const WAIT: u8 = 6;
const CANCEL_WAIT: u8 = 12;
const PING: u8 = 13;

const MAGIC: u32 = 0x3C85_F7CE;
const READY: u8 = 0;
const STOP_WAITING: u8 = 0;
const WAIT_CANCELED: u8 = 1;

/// The longest key torch's server accepts.
pub const TORCH_MAX_KEY: usize = 8 << 10;
/// The longest value torch's server accepts.
pub const TORCH_MAX_VALUE: usize = 8 << 20;

/// The format name of torch's replies, as decoding errors name it.
pub(crate) const REPLY: &str = "torch store reply";

/// How long a reply may take (other than a wait's), and the handshake.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of a PyTorch `TCPStore` server (torchrun's agent store, or one
/// a torch program serves). One connection, shared by the threads that use
/// it; a request that fails half-way leaves the connection unusable, so that
/// a late reply is never taken for the next request's.
#[derive(Debug)]
pub struct TorchStore {
    server: SocketAddr,
    client: Client,
}

/// Appends a key as torch's client writes it: a `u64` length, `/` and the key.
fn put_key(w: &mut Writer, key: &str) {
    w.u64(key.len() as u64 + 1).u8(b'/').bytes(key.as_bytes());
}

/// A request that names `keys`: the query type, their number, the keys.
fn keys_request(op: u8, keys: &[&str]) -> Vec<u8> {
    let mut w = Writer::new();
    w.u8(op).u64(keys.len() as u64);
    for k in keys {
        put_key(&mut w, k);
    }
    w.into_bytes()
}

/// A request of query type `op` about one key, with what `tail` appends.
fn key_request(op: u8, key: &str, tail: impl FnOnce(&mut Writer)) -> Vec<u8> {
    let mut w = Writer::with_capacity(9 + key.len() + 1);
    w.u8(op);
    put_key(&mut w, key);
    tail(&mut w);
    w.into_bytes()
}

/// A ping: query type and nonce.
fn put_ping(w: &mut Writer, nonce: u32) {
    w.u8(PING).u32(nonce);
}

pub(crate) fn read_u8(r: &mut impl Read, field: &'static str) -> Result<u8, ReadError> {
    read_fixed::<1, _>(r, REPLY, |d| d.u8(field))
}

/// Reads a ping's reply and checks it is `nonce`.
pub(crate) fn read_pong(r: &mut impl Read, nonce: u32, after: &str) -> Result<(), ReadError> {
    let echo = read_fixed::<4, _>(r, REPLY, |d| d.u32("ping nonce"))?;
    if echo != nonce {
        return Err(bad_reply(
            "ping nonce",
            format!("ping {after}answered {echo:#010x}, not its nonce {nonce:#010x}"),
        ));
    }
    Ok(())
}

/// Reads a `u64` length (at most [`TORCH_MAX_VALUE`]) and that many bytes: a value.
pub(crate) fn read_value(r: &mut impl Read) -> Result<Vec<u8>, ReadError> {
    let len = read_fixed::<8, _>(r, REPLY, |d| {
        d.len_prefix("value", Prefix::U64, TORCH_MAX_VALUE)
    })?;
    Ok(read_bytes(r, len)?)
}

fn bad_reply(field: &'static str, why: String) -> ReadError {
    ReadError::Decode(DecodeError::Invalid {
        format: REPLY,
        field,
        why,
    })
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

impl TorchStore {
    /// Connects to the torch store at `addr` (retrying while nothing listens
    /// there yet, until `deadline`), validates the connection as torch's
    /// client does, and checks with a ping that a torch store answers.
    pub fn connect(addr: SocketAddr, deadline: Instant) -> Result<TorchStore, StoreError> {
        let store = describe_addr(addr);
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_secs(1), REPLY_TIMEOUT);
        let nonce = std::process::id();
        let handshake = |conn: &mut Conn| {
            let mut hello = Writer::with_capacity(10);
            hello.u8(VALIDATE).u32(MAGIC);
            put_ping(&mut hello, nonce);
            conn.writer
                .write_all(hello.as_bytes())
                .map_err(|source| StoreError::Io {
                    what: format!("sending handshake to {store}"),
                    source,
                })?;
            read_pong(&mut conn.reader, nonce, "").map_err(|e| match e {
                ReadError::Io(e) => StoreError::Protocol(format!(
                    "{store} did not answer a torch TCPStore ping ({e}): is a torch store \
                     (torchrun's agent) serving there?"
                )),
                ReadError::Decode(e) => {
                    StoreError::Protocol(format!("{store}: {e}: not a torch TCPStore"))
                }
            })
        };
        let client = Client::connect(
            addr,
            store.clone(),
            deadline,
            REPLY_TIMEOUT,
            wait,
            handshake,
        )?;
        tracing::debug!(server = %addr, local = %client.local_addr(), "connected to torch store");
        Ok(TorchStore {
            server: addr,
            client,
        })
    }

    /// The local address of this client's connection: the interface that
    /// routes to the server.
    pub fn local_addr(&self) -> SocketAddr {
        self.client.local_addr()
    }

    fn check_key(&self, key: &str) -> Result<(), StoreError> {
        self.check_len(key, "key", key.len() + 1, TORCH_MAX_KEY)
    }

    fn check_len(
        &self,
        key: &str,
        what: &'static str,
        len: usize,
        max: usize,
    ) -> Result<(), StoreError> {
        if len > max {
            return Err(StoreError::TooLarge {
                key: short_key(key),
                what,
                len,
                max,
                store: self.describe(),
            });
        }
        Ok(())
    }

    /// Runs request `op` on `key` through `f` (see [`Client::request`]).
    fn with_conn<T>(
        &self,
        op: &str,
        key: &str,
        f: impl FnOnce(&mut Conn) -> Result<T, ReadError>,
    ) -> Result<T, StoreError> {
        self.client.request(op, key, f)
    }

    /// Waits for `key` until `deadline`; `Ok(false)` if it is not set by then.
    fn wait(&self, key: &str, deadline: Instant) -> Result<bool, StoreError> {
        self.with_conn("wait", key, |c| {
            c.writer.set_read_timeout(Some(REPLY_TIMEOUT))?;
            c.writer.write_all(&keys_request(WAIT, &[key]))?;
            let left = deadline.saturating_duration_since(Instant::now());
            c.writer
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            match read_u8(&mut c.reader, "wait reply") {
                Ok(STOP_WAITING) => return Ok(true),
                Ok(other) => {
                    return Err(bad_reply("wait reply", format!("wait answered {other}")));
                }
                Err(ReadError::Io(e)) if timed_out(&e) => {}
                Err(e) => return Err(e),
            }
            // As torch's client does: cancel, then read the cancellation
            // (after a "stop waiting" that crossed it on the wire).
            c.writer.set_read_timeout(Some(REPLY_TIMEOUT))?;
            c.writer.write_all(&[CANCEL_WAIT])?;
            let canceled =
                |other: u8| bad_reply("cancel wait reply", format!("cancel wait answered {other}"));
            match read_u8(&mut c.reader, "cancel wait reply")? {
                WAIT_CANCELED => Ok(false),
                STOP_WAITING => match read_u8(&mut c.reader, "cancel wait reply")? {
                    WAIT_CANCELED => Ok(true),
                    other => Err(canceled(other)),
                },
                other => Err(canceled(other)),
            }
        })
    }

    fn get_present(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let request = key_request(GET, key, |_| {});
        self.with_conn("get", key, |c| {
            c.writer.set_read_timeout(Some(REPLY_TIMEOUT))?;
            c.writer.write_all(&request)?;
            read_value(&mut c.reader)
        })
    }
}

fn describe_addr(addr: SocketAddr) -> String {
    format!("torch store {addr}")
}

impl Store for TorchStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.check_key(key)?;
        self.check_len(key, "value", value.len(), TORCH_MAX_VALUE)?;
        // Set has no reply; a ping after it confirms the server took it, so
        // that an error surfaces here and not at a later request.
        let nonce = std::process::id();
        let request = key_request(SET, key, |w| {
            w.bytes_u64_prefixed(value);
            put_ping(w, nonce);
        });
        self.with_conn("set", key, |c| {
            c.writer.set_read_timeout(Some(REPLY_TIMEOUT))?;
            c.writer.write_all(&request)?;
            read_pong(&mut c.reader, nonce, "after set ")
        })
    }

    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, StoreError> {
        self.check_key(key)?;
        let start = Instant::now();
        if !self.wait(key, deadline)? {
            return Err(StoreError::Timeout {
                key: key.to_owned(),
                waited: start.elapsed(),
                store: self.describe(),
            });
        }
        self.get_present(key)
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.check_key(key)?;
        let ready = self.with_conn("check", key, |c| {
            c.writer.set_read_timeout(Some(REPLY_TIMEOUT))?;
            c.writer.write_all(&keys_request(CHECK, &[key]))?;
            Ok(read_u8(&mut c.reader, "check reply")? == READY)
        })?;
        // Keys are never deleted by oxccl, so a present key stays present.
        if ready {
            self.get_present(key).map(Some)
        } else {
            Ok(None)
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.check_key(key)?;
        let request = key_request(ADD, key, |w| {
            w.i64(delta);
        });
        self.with_conn("add", key, |c| {
            c.writer.set_read_timeout(Some(REPLY_TIMEOUT))?;
            c.writer.write_all(&request)?;
            read_fixed::<8, _>(&mut c.reader, REPLY, |d| d.i64("counter"))
        })
    }

    fn describe(&self) -> String {
        describe_addr(self.server)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A peer that is not a torch store (it answers the ping with garbage,
    /// or not at all) is refused with a message that says so.
    #[test]
    fn refuses_a_server_that_is_not_a_torch_store() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut hello = [0u8; 10];
            s.read_exact(&mut hello).unwrap();
            assert_eq!(hello[0], VALIDATE);
            assert_eq!(&hello[1..5], &MAGIC.to_le_bytes());
            assert_eq!(hello[5], PING);
            s.write_all(b"nope").unwrap();
            let (s2, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            drop(s2);
        });
        let e = TorchStore::connect(addr, Instant::now() + Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("not a torch TCPStore"), "{e}");
        let start = Instant::now();
        let e = TorchStore::connect(addr, Instant::now() + Duration::from_millis(200)).unwrap_err();
        assert!(
            e.to_string()
                .contains("did not answer a torch TCPStore ping"),
            "{e}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        server.join().unwrap();
    }

    #[test]
    fn refuses_oversized_keys_and_values_before_sending() {
        // A fake server that answers the handshake and nothing else.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut hello = [0u8; 10];
            s.read_exact(&mut hello).unwrap();
            s.write_all(&hello[6..10]).unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            rest
        });
        let store = TorchStore::connect(addr, Instant::now() + Duration::from_secs(5)).unwrap();
        let long_key = "k".repeat(TORCH_MAX_KEY);
        assert!(matches!(
            store.set(&long_key, b"v"),
            Err(StoreError::TooLarge { what: "key", .. })
        ));
        assert!(matches!(
            store.set("k", &vec![0; TORCH_MAX_VALUE + 1]),
            Err(StoreError::TooLarge { what: "value", .. })
        ));
        drop(store);
        assert!(server.join().unwrap().is_empty(), "nothing was sent");
    }

    #[test]
    fn request_layout_is_fixed() {
        let request = key_request(ADD, "k", |w| {
            w.i64(-2);
        });
        let mut want = vec![ADD, 2, 0, 0, 0, 0, 0, 0, 0, b'/', b'k'];
        want.extend_from_slice(&(-2i64).to_le_bytes());
        assert_eq!(request, want);
        let request = keys_request(CHECK, &["a", "bc"]);
        let mut want = vec![CHECK, 2, 0, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0, b'/', b'a']);
        want.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0, b'/', b'b', b'c']);
        assert_eq!(request, want);
    }

    #[test]
    fn values_over_the_limit_are_refused_before_reading() {
        let mut bytes = &((TORCH_MAX_VALUE + 1) as u64).to_le_bytes()[..];
        let e = read_value(&mut bytes).unwrap_err();
        assert!(
            matches!(
                &e,
                ReadError::Decode(DecodeError::TooLong { field: "value", .. })
            ),
            "{e:?}"
        );
    }

    proptest::proptest! {
        #[test]
        fn values_round_trip(value in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), nonce in proptest::prelude::any::<u32>()) {
            let mut w = Writer::new();
            w.bytes_u64_prefixed(&value).u32(nonce);
            let mut r = w.as_bytes();
            proptest::prop_assert_eq!(read_value(&mut r).unwrap(), value);
            read_pong(&mut r, nonce, "").unwrap();
            proptest::prop_assert!(r.is_empty());
        }

        #[test]
        fn arbitrary_replies_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), nonce in proptest::prelude::any::<u32>()) {
            let _ = read_value(&mut &bytes[..]);
            let _ = read_pong(&mut &bytes[..], nonce, "");
            let _ = read_u8(&mut &bytes[..], "status");
        }
    }
}
