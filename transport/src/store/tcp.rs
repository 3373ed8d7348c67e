//! The TCP store: rank 0 runs a [`TcpStoreServer`], every rank talks to it
//! through a [`TcpStore`] client.
//!
//! # Protocol
//!
//! All integers are little-endian. A client opens with [`MAGIC`] (8 bytes)
//! and its version (u16); the server answers with the same ten bytes of its
//! own, or drops a connection whose magic is wrong. Then the client sends
//! requests and the server answers each in order:
//!
//! | request | bytes after `op: u8, key_len: u32, key` | reply |
//! |---|---|---|
//! | set (1) | `value_len: u32, value` | `OK` |
//! | get (2) | `timeout_ms: u64` | `OK, len: u32, value` or `NOT_FOUND` after the timeout |
//! | try_get (3) | nothing | `OK, len: u32, value` or `NOT_FOUND` |
//! | add (4) | `delta: i64` | `OK, new: i64` or `ERR, len: u32, message` |
//!
//! Keys are UTF-8; keys and values are at most [`TCP_MAX_LEN`] bytes. A
//! client that breaks these rules is dropped with a warning naming its
//! address; the server keeps serving the others.

use std::collections::HashMap;
use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::mem::{SharedMap, Wait};
use super::{Store, StoreError, short_key};

/// The largest key or value, in bytes, that the TCP store carries (64 MiB).
pub const TCP_MAX_LEN: usize = 64 << 20;

/// First bytes of every TCP store connection, from both sides.
const MAGIC: [u8; 8] = *b"OXCCLKV\0";
/// Protocol version, sent after [`MAGIC`].
const VERSION: u16 = 1;

const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_TRY_GET: u8 = 3;
const OP_ADD: u8 = 4;

const ST_OK: u8 = 0;
const ST_NOT_FOUND: u8 = 1;
const ST_ERR: u8 = 2;

/// Read timeout for replies to requests other than `get`, and for the
/// handshake and the rest of a request once its first byte arrived.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Added to a `get`'s remaining time for the client's read timeout, so the
/// server's "not found" arrives before the socket gives up.
const GET_MARGIN: Duration = Duration::from_secs(5);
/// The longest a server waits for a key in one `get` request.
const MAX_GET_WAIT: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often the accept loop checks whether the server is dropped.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

fn describe_addr(addr: SocketAddr) -> String {
    format!("tcp store {addr}")
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_le_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

pub(super) fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads exactly `len` bytes, growing the buffer only as bytes arrive (a
/// peer that announces 64 MiB and sends nothing costs nothing).
pub(super) fn read_bytes(r: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    r.take(len as u64).read_to_end(&mut buf)?;
    if buf.len() != len {
        return Err(io::Error::new(
            ErrorKind::UnexpectedEof,
            format!("connection ended after {} of {len} bytes", buf.len()),
        ));
    }
    Ok(buf)
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Lengths are checked against TCP_MAX_LEN before encoding.
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn hello() -> [u8; 10] {
    let mut h = [0; 10];
    h[..8].copy_from_slice(&MAGIC);
    h[8..].copy_from_slice(&VERSION.to_le_bytes());
    h
}

// ---------------------------------------------------------------- server

/// Connections the server has open, so that dropping it can close them.
#[derive(Debug, Default)]
struct Clients {
    next_id: u64,
    streams: HashMap<u64, TcpStream>,
}

#[derive(Debug)]
struct ServerShared {
    map: SharedMap,
    stop: AtomicBool,
    clients: Mutex<Clients>,
    addr: SocketAddr,
}

impl ServerShared {
    fn clients(&self) -> MutexGuard<'_, Clients> {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Serves a key-value store over TCP from background threads: one that
/// accepts connections and one per client.
///
/// Dropping the server stops accepting within a few tens of milliseconds,
/// closes every client connection (their pending and later requests fail
/// with [`StoreError::Closed`]) and discards the data.
#[derive(Debug)]
pub struct TcpStoreServer {
    shared: Arc<ServerShared>,
    accept: Option<JoinHandle<()>>,
}

impl TcpStoreServer {
    /// Binds `addr` (port 0 picks a free port; `SO_REUSEADDR` is set) and
    /// starts serving.
    pub fn bind(addr: SocketAddr) -> Result<TcpStoreServer, StoreError> {
        let what = |doing: &str| format!("{doing} for tcp store server on {addr}");
        let io = |doing: &str| {
            let what = what(doing);
            move |source| StoreError::Io { what, source }
        };
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(io("creating socket"))?;
        socket
            .set_reuse_address(true)
            .map_err(io("setting SO_REUSEADDR"))?;
        socket.bind(&addr.into()).map_err(io("binding"))?;
        socket.listen(128).map_err(io("listening"))?;
        let listener: TcpListener = socket.into();
        listener
            .set_nonblocking(true)
            .map_err(io("making listener nonblocking"))?;
        let local = listener.local_addr().map_err(io("reading local address"))?;
        let shared = Arc::new(ServerShared {
            map: SharedMap::default(),
            stop: AtomicBool::new(false),
            clients: Mutex::new(Clients::default()),
            addr: local,
        });
        let accept = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("oxccl-store-accept".to_owned())
                .spawn(move || accept_loop(&shared, &listener))
                .map_err(io("spawning accept thread"))?
        };
        tracing::debug!(addr = %local, "tcp store server listening");
        Ok(TcpStoreServer {
            shared,
            accept: Some(accept),
        })
    }

    /// The address the server listens on (with the real port if bound to
    /// port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }
}

impl Drop for TcpStoreServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            // The accept loop polls `stop` every ACCEPT_POLL; it does not panic.
            let _ = accept.join();
        }
        // No connection is registered after the accept loop ended.
        self.shared.map.close();
        let clients = std::mem::take(&mut self.shared.clients().streams);
        for stream in clients.values() {
            // Already closed connections fail here; that is fine.
            let _ = stream.shutdown(Shutdown::Both);
        }
        tracing::debug!(addr = %self.shared.addr, "tcp store server stopped");
    }
}

fn accept_loop(shared: &Arc<ServerShared>, listener: &TcpListener) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => start_client(shared, stream, peer),
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // E.g. out of file descriptors: back off and keep serving.
                tracing::warn!(addr = %shared.addr, error = %e, "tcp store server: accept failed");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

fn start_client(shared: &Arc<ServerShared>, stream: TcpStream, peer: SocketAddr) {
    let setup = || -> io::Result<TcpStream> {
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
        stream.try_clone()
    };
    let registered = match setup() {
        Ok(clone) => clone,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "tcp store server: could not set up connection");
            return;
        }
    };
    let id = {
        let mut clients = shared.clients();
        let id = clients.next_id;
        clients.next_id += 1;
        clients.streams.insert(id, registered);
        id
    };
    let thread_shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("oxccl-store-{peer}"))
        .spawn(move || {
            serve_client(&thread_shared, stream, peer);
            thread_shared.clients().streams.remove(&id);
        });
    if let Err(e) = spawned {
        tracing::warn!(%peer, error = %e, "tcp store server: could not spawn client thread");
        if let Some(stream) = shared.clients().streams.remove(&id) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// Why a client connection ended.
enum End {
    /// The client closed the connection between requests.
    Clean,
    /// The server is stopping.
    Stopping,
    /// The client broke the protocol.
    Fault(String),
    /// The connection failed.
    Io(io::Error),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> End {
        if e.kind() == ErrorKind::UnexpectedEof {
            End::Fault(format!("truncated frame: {e}"))
        } else {
            End::Io(e)
        }
    }
}

fn serve_client(shared: &ServerShared, stream: TcpStream, peer: SocketAddr) {
    let end = serve_requests(shared, stream);
    let stopping = shared.stop.load(Ordering::SeqCst);
    match end {
        End::Clean => tracing::debug!(%peer, "tcp store client disconnected"),
        End::Stopping => {}
        End::Io(_) if stopping => {}
        End::Fault(why) => tracing::warn!(
            %peer,
            "tcp store server {}: dropping client {peer}: {why}",
            shared.addr
        ),
        End::Io(e) => tracing::warn!(
            %peer,
            "tcp store server {}: connection to client {peer} failed: {e}",
            shared.addr
        ),
    }
}

fn read_len(r: &mut impl Read, what: &str) -> Result<usize, End> {
    let len = read_u32(r)? as usize;
    if len > TCP_MAX_LEN {
        return Err(End::Fault(format!(
            "{what} length {len} exceeds the limit of {TCP_MAX_LEN}"
        )));
    }
    Ok(len)
}

fn serve_requests(shared: &ServerShared, stream: TcpStream) -> End {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => return End::Io(e),
    };
    let mut reader = BufReader::new(stream);
    let result = (|| -> Result<(), End> {
        // Handshake, bounded in time so silent connections do not linger.
        reader.get_ref().set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        let mut magic = [0; 8];
        reader.read_exact(&mut magic)?;
        if magic != MAGIC {
            return Err(End::Fault(format!("wrong magic {magic:02x?}")));
        }
        let version = read_u16(&mut reader)?;
        writer.write_all(&hello())?;
        if version != VERSION {
            return Err(End::Fault(format!(
                "protocol version {version}, this server speaks {VERSION}"
            )));
        }
        loop {
            // Between requests a client may stay idle as long as it likes.
            reader.get_ref().set_read_timeout(None)?;
            let mut op = [0; 1];
            match reader.read(&mut op) {
                Ok(0) => return Err(End::Clean),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(End::Io(e)),
            }
            // Once a request started, the rest of it must follow promptly.
            reader.get_ref().set_read_timeout(Some(DEFAULT_TIMEOUT))?;
            let key_len = read_len(&mut reader, "key")?;
            let key = String::from_utf8(read_bytes(&mut reader, key_len)?)
                .map_err(|_| End::Fault("key is not UTF-8".to_owned()))?;
            let mut reply = Vec::new();
            match op[0] {
                OP_SET => {
                    let len = read_len(&mut reader, "value")?;
                    let value = read_bytes(&mut reader, len)?;
                    shared.map.set(&key, &value);
                    reply.push(ST_OK);
                }
                OP_GET => {
                    let ms = read_u64(&mut reader)?;
                    let wait = Duration::from_millis(ms).min(MAX_GET_WAIT);
                    let deadline = Instant::now() + wait;
                    match shared.map.wait_for(&key, deadline) {
                        Wait::Found(value) => {
                            reply.push(ST_OK);
                            put_bytes(&mut reply, &value);
                        }
                        Wait::TimedOut => reply.push(ST_NOT_FOUND),
                        Wait::Closed => return Err(End::Stopping),
                    }
                }
                OP_TRY_GET => match shared.map.try_get(&key) {
                    Some(value) => {
                        reply.push(ST_OK);
                        put_bytes(&mut reply, &value);
                    }
                    None => reply.push(ST_NOT_FOUND),
                },
                OP_ADD => {
                    let delta = read_u64(&mut reader)? as i64;
                    match shared.map.add(&key, delta) {
                        Ok(new) => {
                            reply.push(ST_OK);
                            reply.extend_from_slice(&new.to_le_bytes());
                        }
                        Err(e) => {
                            reply.push(ST_ERR);
                            put_bytes(&mut reply, e.to_string().as_bytes());
                        }
                    }
                }
                other => return Err(End::Fault(format!("unknown request op {other}"))),
            }
            if shared.stop.load(Ordering::SeqCst) {
                return Err(End::Stopping);
            }
            writer.write_all(&reply)?;
        }
    })();
    match result {
        Ok(()) => End::Clean,
        Err(end) => end,
    }
}

// ---------------------------------------------------------------- client

#[derive(Debug)]
struct Conn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    /// Why the connection can no longer be used: a request failed half-way,
    /// so a late reply could be mistaken for the next one's.
    broken: Option<String>,
}

/// A client of a [`TcpStoreServer`]. One connection, shared by the threads
/// that use it (requests are serialized).
///
/// If a request fails half-way (an I/O error or a read timeout), the
/// connection is not reused: later requests fail with
/// [`StoreError::Closed`].
#[derive(Debug)]
pub struct TcpStore {
    server: SocketAddr,
    local: SocketAddr,
    conn: Mutex<Conn>,
}

fn retryable_connect_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::TimedOut
            | ErrorKind::Interrupted
            | ErrorKind::WouldBlock
    )
}

/// Connects to `addr`, retrying while nothing listens there yet (the server
/// may start after its clients) until `deadline`.
pub(super) fn connect_retrying(
    addr: SocketAddr,
    store: &str,
    deadline: Instant,
) -> Result<TcpStream, StoreError> {
    let start = Instant::now();
    let mut backoff = Duration::from_millis(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = left.clamp(Duration::from_millis(100), Duration::from_secs(5));
        match TcpStream::connect_timeout(&addr, attempt) {
            Ok(stream) => return Ok(stream),
            Err(e) if retryable_connect_error(&e) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(StoreError::Unreachable {
                        store: store.to_owned(),
                        waited: start.elapsed(),
                        source: e,
                    });
                }
                std::thread::sleep(backoff.min(left));
                backoff = (backoff * 3 / 2).min(Duration::from_millis(50));
            }
            Err(source) => {
                return Err(StoreError::Io {
                    what: format!("connecting to {store}"),
                    source,
                });
            }
        }
    }
}

impl TcpStore {
    /// Connects to the server at `addr`, retrying while nothing listens
    /// there yet (rank 0 may start its server after the others start) until
    /// `deadline`.
    pub fn connect(addr: SocketAddr, deadline: Instant) -> Result<TcpStore, StoreError> {
        let store = describe_addr(addr);
        let stream = connect_retrying(addr, &store, deadline)?;
        let io = |doing: &'static str| {
            let store = store.clone();
            move |source| StoreError::Io {
                what: format!("{doing} {store}"),
                source,
            }
        };
        stream
            .set_nodelay(true)
            .map_err(io("setting TCP_NODELAY on connection to"))?;
        stream
            .set_write_timeout(Some(DEFAULT_TIMEOUT))
            .map_err(io("setting write timeout on connection to"))?;
        let local = stream
            .local_addr()
            .map_err(io("reading local address of connection to"))?;
        let handshake_wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(5));
        stream
            .set_read_timeout(Some(handshake_wait))
            .map_err(io("setting read timeout on connection to"))?;
        let reader = stream.try_clone().map_err(io("cloning connection to"))?;
        let mut conn = Conn {
            writer: stream,
            reader: BufReader::new(reader),
            broken: None,
        };
        conn.writer
            .write_all(&hello())
            .map_err(io("sending handshake to"))?;
        let mut reply = [0; 10];
        conn.reader
            .read_exact(&mut reply)
            .map_err(io("reading handshake reply from"))?;
        if reply[..8] != MAGIC {
            return Err(StoreError::Protocol(format!(
                "{store} answered the handshake with wrong magic {:02x?} (not an oxccl tcp store?)",
                &reply[..8]
            )));
        }
        let version = u16::from_le_bytes([reply[8], reply[9]]);
        if version != VERSION {
            return Err(StoreError::Protocol(format!(
                "{store} speaks protocol version {version}, this client speaks {VERSION}"
            )));
        }
        tracing::debug!(server = %addr, %local, "connected to tcp store");
        Ok(TcpStore {
            server: addr,
            local,
            conn: Mutex::new(conn),
        })
    }

    /// The local address of this client's connection: the interface that
    /// routes to the server.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The server's address.
    pub fn server_addr(&self) -> SocketAddr {
        self.server
    }

    fn check_len(&self, key: &str, what: &'static str, len: usize) -> Result<(), StoreError> {
        if len > TCP_MAX_LEN {
            return Err(StoreError::TooLarge {
                key: short_key(key),
                what,
                len,
                max: TCP_MAX_LEN,
                store: self.describe(),
            });
        }
        Ok(())
    }

    /// Sends one request and reads its reply with `parse`, waiting at most
    /// `wait` for each read.
    fn roundtrip<T>(
        &self,
        op: u8,
        key: &str,
        tail: &[u8],
        wait: Duration,
        parse: impl FnOnce(&mut BufReader<TcpStream>) -> io::Result<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.check_len(key, "key", key.len())?;
        let mut request = Vec::with_capacity(5 + key.len() + tail.len());
        request.push(op);
        put_bytes(&mut request, key.as_bytes());
        request.extend_from_slice(tail);

        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(why) = &conn.broken {
            return Err(StoreError::Closed {
                store: self.describe(),
                detail: why.clone(),
            });
        }
        // Until the reply is read, the connection is in an unknown state.
        conn.broken = Some("an earlier request failed half-way".to_owned());
        let op_name = match op {
            OP_SET => "set",
            OP_GET => "get",
            OP_TRY_GET => "try_get",
            _ => "add",
        };
        let wait = wait.max(Duration::from_millis(1));
        let sent = conn
            .writer
            .set_read_timeout(Some(wait))
            .and_then(|()| conn.writer.write_all(&request));
        let result = sent.and_then(|()| parse(&mut conn.reader));
        match result {
            Ok(reply) => {
                conn.broken = None;
                reply
            }
            Err(source) => {
                let store = self.describe();
                let err = match source.kind() {
                    ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe => StoreError::Closed {
                        store,
                        detail: format!(
                            "server closed the connection during {op_name} of key {:?}: {source}",
                            short_key(key)
                        ),
                    },
                    _ => StoreError::Io {
                        what: format!("{op_name} of key {:?} in {store}", short_key(key)),
                        source,
                    },
                };
                conn.broken = Some(err.to_string());
                Err(err)
            }
        }
    }

    /// Reads an `OK, len, value` or `NOT_FOUND` reply.
    fn parse_value(
        &self,
        key: &str,
        r: &mut BufReader<TcpStream>,
    ) -> io::Result<Result<Option<Vec<u8>>, StoreError>> {
        let mut status = [0; 1];
        r.read_exact(&mut status)?;
        match status[0] {
            ST_OK => {
                let len = read_u32(r)? as usize;
                if len > TCP_MAX_LEN {
                    return Err(
                        self.bad_reply(key, format!("value length {len} exceeds the limit"))
                    );
                }
                Ok(Ok(Some(read_bytes(r, len)?)))
            }
            ST_NOT_FOUND => Ok(Ok(None)),
            other => Err(self.bad_reply(key, format!("unknown reply status {other}"))),
        }
    }

    /// A malformed reply: reported as an I/O error of kind InvalidData so
    /// the connection is marked broken; converted to Protocol by callers.
    fn bad_reply(&self, key: &str, detail: String) -> io::Error {
        io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "malformed reply from {} for key {:?}: {detail}",
                self.describe(),
                short_key(key)
            ),
        )
    }
}

/// Turns the InvalidData errors of [`TcpStore::bad_reply`] into
/// [`StoreError::Protocol`].
fn protocol_from_io(err: StoreError) -> StoreError {
    match err {
        StoreError::Io { source, .. } if source.kind() == ErrorKind::InvalidData => {
            StoreError::Protocol(source.to_string())
        }
        other => other,
    }
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.check_len(key, "value", value.len())?;
        let mut tail = Vec::with_capacity(4 + value.len());
        put_bytes(&mut tail, value);
        self.roundtrip(OP_SET, key, &tail, DEFAULT_TIMEOUT, |r| {
            let mut status = [0; 1];
            r.read_exact(&mut status)?;
            if status[0] != ST_OK {
                return Err(self.bad_reply(key, format!("unexpected status {} to set", status[0])));
            }
            Ok(Ok(()))
        })
        .map_err(protocol_from_io)
    }

    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, StoreError> {
        let start = Instant::now();
        let left = deadline.saturating_duration_since(start);
        let ms = u64::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
        let value = self
            .roundtrip(OP_GET, key, &ms.to_le_bytes(), left + GET_MARGIN, |r| {
                self.parse_value(key, r)
            })
            .map_err(protocol_from_io)?;
        value.ok_or_else(|| StoreError::Timeout {
            key: key.to_owned(),
            waited: start.elapsed(),
            store: self.describe(),
        })
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.roundtrip(OP_TRY_GET, key, &[], DEFAULT_TIMEOUT, |r| {
            self.parse_value(key, r)
        })
        .map_err(protocol_from_io)
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.roundtrip(OP_ADD, key, &delta.to_le_bytes(), DEFAULT_TIMEOUT, |r| {
            let mut status = [0; 1];
            r.read_exact(&mut status)?;
            match status[0] {
                ST_OK => Ok(Ok(read_u64(r)? as i64)),
                ST_ERR => {
                    let len = read_u32(r)? as usize;
                    if len > TCP_MAX_LEN {
                        return Err(
                            self.bad_reply(key, format!("error length {len} exceeds the limit"))
                        );
                    }
                    let msg = read_bytes(r, len)?;
                    Ok(Err(StoreError::Counter {
                        key: key.to_owned(),
                        store: self.describe(),
                        detail: String::from_utf8_lossy(&msg).into_owned(),
                    }))
                }
                other => Err(self.bad_reply(key, format!("unknown reply status {other}"))),
            }
        })
        .map_err(protocol_from_io)
    }

    fn describe(&self) -> String {
        describe_addr(self.server)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::tests as common;

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    fn server_and_client() -> (TcpStoreServer, TcpStore) {
        let server = TcpStoreServer::bind(loopback()).unwrap();
        let client = TcpStore::connect(server.local_addr(), soon(5000)).unwrap();
        (server, client)
    }

    #[test]
    fn tcp_store_semantics() {
        let (server, client) = server_and_client();
        assert_ne!(server.local_addr().port(), 0);
        assert_eq!(client.server_addr(), server.local_addr());
        assert!(client.local_addr().ip().is_loopback());
        assert_eq!(
            client.describe(),
            format!("tcp store {}", server.local_addr())
        );
        common::basic_semantics(&client);
        // A second client sees what the first set.
        let other = TcpStore::connect(server.local_addr(), soon(5000)).unwrap();
        assert_eq!(other.try_get("a").unwrap().as_deref(), Some(&b"two!"[..]));
    }

    #[test]
    fn tcp_store_get_wakes_on_set() {
        let (server, getter) = server_and_client();
        let setter = TcpStore::connect(server.local_addr(), soon(5000)).unwrap();
        common::get_wakes(Arc::new(getter), Arc::new(setter));
    }

    #[test]
    fn tcp_store_get_times_out() {
        let (_server, client) = server_and_client();
        common::get_times_out(&client);
        // The connection stays usable after a timeout.
        client.set("k", b"v").unwrap();
        assert_eq!(client.get("k", soon(1000)).unwrap(), b"v");
    }

    #[test]
    fn tcp_store_concurrent_adds() {
        let (server, client) = server_and_client();
        let client = Arc::new(client);
        // Half the threads share one client, half have their own.
        let stores = (0..8)
            .map(|i| -> Arc<dyn Store> {
                if i % 2 == 0 {
                    Arc::clone(&client) as Arc<dyn Store>
                } else {
                    Arc::new(TcpStore::connect(server.local_addr(), soon(5000)).unwrap())
                }
            })
            .collect();
        common::concurrent_adds(stores);
    }

    #[test]
    fn tcp_store_client_connects_before_server_binds() {
        let addr = {
            let probe = TcpListener::bind(loopback()).unwrap();
            probe.local_addr().unwrap()
        };
        let client = std::thread::spawn(move || TcpStore::connect(addr, soon(10_000)));
        std::thread::sleep(Duration::from_millis(300));
        let server = TcpStoreServer::bind(addr).unwrap();
        let client = client.join().unwrap().unwrap();
        client.set("k", b"v").unwrap();
        assert_eq!(client.get("k", soon(1000)).unwrap(), b"v");
        drop(server);
    }

    #[test]
    fn tcp_store_connect_gives_up_at_deadline() {
        let addr = {
            let probe = TcpListener::bind(loopback()).unwrap();
            probe.local_addr().unwrap()
        };
        let start = Instant::now();
        let err = TcpStore::connect(addr, soon(300)).unwrap_err();
        assert!(matches!(err, StoreError::Unreachable { .. }), "{err:?}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    /// Writes `bytes` on a raw connection and checks the server closes it.
    fn assert_dropped(server: &TcpStoreServer, bytes: &[u8], half_close: bool) {
        let mut raw = TcpStream::connect(server.local_addr()).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        raw.write_all(bytes).unwrap();
        if half_close {
            raw.shutdown(Shutdown::Write).unwrap();
        }
        let mut sink = Vec::new();
        let start = Instant::now();
        // The server drops the connection: end of stream or a reset.
        let _ = raw.read_to_end(&mut sink);
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "connection not dropped"
        );
    }

    #[test]
    fn tcp_store_drops_garbage_clients_and_keeps_serving() {
        let (server, client) = server_and_client();
        client.set("before", b"1").unwrap();
        // Wrong magic, with random-looking bytes.
        let garbage: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        assert_dropped(&server, &garbage, false);
        assert_dropped(&server, b"GET / HTTP/1.1\r\n\r\n", false);
        // Right magic, wrong version: answered, then dropped.
        let mut wrong_version = MAGIC.to_vec();
        wrong_version.extend_from_slice(&99u16.to_le_bytes());
        assert_dropped(&server, &wrong_version, false);
        // Absurd key length.
        let mut absurd = hello().to_vec();
        absurd.push(OP_SET);
        absurd.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_dropped(&server, &absurd, false);
        // Absurd value length.
        let mut absurd_value = hello().to_vec();
        absurd_value.push(OP_SET);
        put_bytes(&mut absurd_value, b"k");
        absurd_value.extend_from_slice(&((TCP_MAX_LEN + 1) as u32).to_le_bytes());
        assert_dropped(&server, &absurd_value, false);
        // Unknown op.
        let mut unknown = hello().to_vec();
        unknown.push(77);
        put_bytes(&mut unknown, b"k");
        assert_dropped(&server, &unknown, false);
        // Truncated frame.
        let mut truncated = hello().to_vec();
        truncated.push(OP_SET);
        put_bytes(&mut truncated, b"key");
        truncated.extend_from_slice(&100u32.to_le_bytes());
        truncated.extend_from_slice(b"only a few");
        assert_dropped(&server, &truncated, true);
        // Key not UTF-8.
        let mut not_utf8 = hello().to_vec();
        not_utf8.push(OP_TRY_GET);
        put_bytes(&mut not_utf8, &[0xff, 0xfe]);
        assert_dropped(&server, &not_utf8, false);

        // The real clients still work, old and new.
        assert_eq!(client.get("before", soon(1000)).unwrap(), b"1");
        let fresh = TcpStore::connect(server.local_addr(), soon(5000)).unwrap();
        fresh.set("after", b"2").unwrap();
        assert_eq!(client.get("after", soon(1000)).unwrap(), b"2");
    }

    #[test]
    fn tcp_store_client_rejects_non_store_server() {
        let listener = TcpListener::bind(loopback()).unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut hello = [0; 10];
            s.read_exact(&mut hello).unwrap();
            s.write_all(b"SSH-2.0-xx").unwrap();
            // Keep the connection open until the client is done.
            let _ = s.read(&mut hello);
        });
        let err = TcpStore::connect(addr, soon(5000)).unwrap_err();
        assert!(matches!(err, StoreError::Protocol(_)), "{err:?}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        fake.join().unwrap();
    }

    #[test]
    fn tcp_store_server_drop_fails_blocked_get_promptly() {
        let (server, client) = server_and_client();
        let client = Arc::new(client);
        let waiter = {
            let client = Arc::clone(&client);
            std::thread::spawn(move || {
                let result = client.get("never", soon(30_000));
                (result, Instant::now())
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        let dropped_at = Instant::now();
        drop(server);
        let dropped_in = dropped_at.elapsed();
        let (result, returned_at) = waiter.join().unwrap();
        assert!(
            dropped_in < Duration::from_secs(1),
            "drop took {dropped_in:?}"
        );
        assert!(
            returned_at.duration_since(dropped_at) < Duration::from_secs(2),
            "get returned {:?} after the drop",
            returned_at.duration_since(dropped_at)
        );
        let err = result.unwrap_err();
        assert!(matches!(err, StoreError::Closed { .. }), "{err:?}");
        assert!(err.to_string().contains("never"), "{err}");
        // Later requests fail at once too.
        assert!(client.set("k", b"v").is_err());
        assert!(client.try_get("k").is_err());
    }

    #[test]
    fn tcp_store_rejects_oversized_values() {
        let (_server, client) = server_and_client();
        let big = vec![0u8; TCP_MAX_LEN + 1];
        let err = client.set("huge", &big).unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { .. }), "{err:?}");
        // Nothing was sent: the connection still works.
        client.set("small", b"ok").unwrap();
    }
}
