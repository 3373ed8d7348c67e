//! The TCP store: rank 0 runs a [`TcpStoreServer`], every rank talks to it
//! through a [`TcpStore`] client.
//!
//! # Protocol
//!
//! First both sides authenticate ([`auth`](crate::auth)): with the job's
//! secret each proves it knows it, without one they only exchange
//! greetings. A client that fails is dropped with a warning naming its
//! address and why, and counted ([`TcpStoreServer::auth_refusals`]); the
//! server keeps serving the others.
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
//!
//! Messages are written with the [`codec`](crate::codec); both sides read
//! them from the socket a fixed part at a time ([`read_fixed`]), so that a
//! length is checked against its limit before its bytes are read.

use std::collections::HashMap;
use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::client::{Client, Conn};
use super::mem::{SharedMap, Wait};
use super::{Store, StoreError, short_key};
use crate::auth::{self, AuthError, JobSecret, Role, STORE_CONTEXT};
use crate::codec::{DecodeError, EncodeError, Prefix, Reader, Writer};

/// The largest key or value, in bytes, that the TCP store carries (64 MiB).
pub const TCP_MAX_LEN: usize = 64 << 20;

/// First bytes of every TCP store connection, from both sides.
pub(crate) const MAGIC: [u8; 8] = *b"OXCCLKV\0";
/// Protocol version, sent after [`MAGIC`].
pub(crate) const VERSION: u16 = 1;

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
/// How long a new connection has to authenticate.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the accept loop checks whether the server is dropped.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

fn describe_addr(addr: SocketAddr) -> String {
    format!("tcp store {addr}")
}

/// Format names of the protocol's messages, as decoding errors name them.
pub(crate) const HANDSHAKE: &str = "tcp store handshake";
pub(crate) const REQUEST: &str = "tcp store request";
pub(crate) const REPLY: &str = "tcp store reply";

/// Why a message could not be read from a stream: the stream failed (or
/// ended), or its bytes do not follow the format.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The stream failed or ended early.
    Io(io::Error),
    /// The bytes do not follow the format.
    Decode(DecodeError),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> ReadError {
        ReadError::Io(e)
    }
}

impl From<DecodeError> for ReadError {
    fn from(e: DecodeError) -> ReadError {
        ReadError::Decode(e)
    }
}

/// Reads the next `N` bytes of a message of `format` from a stream and
/// decodes them with `decode`, which must take all of them.
pub(crate) fn read_fixed<const N: usize, T>(
    r: &mut impl Read,
    format: &'static str,
    decode: impl FnOnce(&mut Reader<'_>) -> Result<T, DecodeError>,
) -> Result<T, ReadError> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    let mut reader = Reader::new(format, &b);
    let value = decode(&mut reader)?;
    reader.finish()?;
    Ok(value)
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

/// Reads a `u32` length (at most [`TCP_MAX_LEN`]) and that many bytes.
fn read_prefixed(
    r: &mut impl Read,
    format: &'static str,
    field: &'static str,
) -> Result<Vec<u8>, ReadError> {
    let len = read_fixed::<4, _>(r, format, |d| d.len_prefix(field, Prefix::U32, TCP_MAX_LEN))?;
    Ok(read_bytes(r, len)?)
}

/// Appends a `u32` length and `bytes` (test requests; the protocol's own
/// messages are written by [`Request::encode`] and the server).
#[cfg(test)]
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut w = Writer::new();
    w.u32(bytes.len() as u32).bytes(bytes);
    out.extend_from_slice(w.as_bytes());
}

/// The handshake both sides send: [`MAGIC`] and [`VERSION`].
fn hello() -> [u8; 10] {
    let mut w = Writer::with_capacity(10);
    w.bytes(&MAGIC).u16(VERSION);
    w.into_array()
}

/// A request, after its op byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    Set { key: String, value: Vec<u8> },
    Get { key: String, wait_ms: u64 },
    TryGet { key: String },
    Add { key: String, delta: i64 },
}

impl Request {
    fn op(&self) -> u8 {
        match self {
            Request::Set { .. } => OP_SET,
            Request::Get { .. } => OP_GET,
            Request::TryGet { .. } => OP_TRY_GET,
            Request::Add { .. } => OP_ADD,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Request::Set { .. } => "set",
            Request::Get { .. } => "get",
            Request::TryGet { .. } => "try_get",
            Request::Add { .. } => "add",
        }
    }

    fn key(&self) -> &str {
        match self {
            Request::Set { key, .. }
            | Request::Get { key, .. }
            | Request::TryGet { key }
            | Request::Add { key, .. } => key,
        }
    }

    /// The request's bytes, op byte first.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let key = self.key();
        let mut w = Writer::with_capacity(5 + key.len());
        w.u8(self.op()).str_prefixed(Prefix::U32, key)?;
        match self {
            Request::Set { value, .. } => {
                w.bytes_prefixed(Prefix::U32, value)?;
            }
            Request::Get { wait_ms, .. } => {
                w.u64(*wait_ms);
            }
            Request::TryGet { .. } => {}
            Request::Add { delta, .. } => {
                w.i64(*delta);
            }
        }
        Ok(w.into_bytes())
    }

    /// Reads the rest of a request whose op byte was `op`. Lengths are
    /// refused over [`TCP_MAX_LEN`] before their bytes are read.
    pub(crate) fn read(op: u8, r: &mut impl Read) -> Result<Request, ReadError> {
        if !matches!(op, OP_SET | OP_GET | OP_TRY_GET | OP_ADD) {
            return Err(ReadError::Decode(DecodeError::Invalid {
                format: REQUEST,
                field: "op",
                why: format!("unknown request op {op}"),
            }));
        }
        let key = read_prefixed(r, REQUEST, "key")?;
        let key = String::from_utf8(key).map_err(|_| DecodeError::Invalid {
            format: REQUEST,
            field: "key",
            why: "not UTF-8".to_owned(),
        })?;
        Ok(match op {
            OP_SET => Request::Set {
                key,
                value: read_prefixed(r, REQUEST, "value")?,
            },
            OP_GET => Request::Get {
                key,
                wait_ms: read_fixed::<8, _>(r, REQUEST, |d| d.u64("timeout"))?,
            },
            OP_TRY_GET => Request::TryGet { key },
            _ => Request::Add {
                key,
                delta: read_fixed::<8, _>(r, REQUEST, |d| d.i64("delta"))?,
            },
        })
    }
}

/// Reads the reply status byte.
fn read_status(r: &mut impl Read) -> Result<u8, ReadError> {
    read_fixed::<1, _>(r, REPLY, |d| d.u8("status"))
}

/// Reads an `OK, len, value` or `NOT_FOUND` reply (to get and try_get).
pub(crate) fn read_value_reply(r: &mut impl Read) -> Result<Option<Vec<u8>>, ReadError> {
    match read_status(r)? {
        ST_OK => Ok(Some(read_prefixed(r, REPLY, "value")?)),
        ST_NOT_FOUND => Ok(None),
        other => Err(unknown_status(other)),
    }
}

/// Reads the `OK` reply to a set.
pub(crate) fn read_set_reply(r: &mut impl Read) -> Result<(), ReadError> {
    match read_status(r)? {
        ST_OK => Ok(()),
        other => Err(unknown_status(other)),
    }
}

/// Reads an `OK, new` or `ERR, len, message` reply (to add); the error is
/// the server's message.
pub(crate) fn read_add_reply(r: &mut impl Read) -> Result<Result<i64, String>, ReadError> {
    match read_status(r)? {
        ST_OK => Ok(Ok(read_fixed::<8, _>(r, REPLY, |d| d.i64("counter"))?)),
        ST_ERR => {
            let msg = read_prefixed(r, REPLY, "error message")?;
            Ok(Err(String::from_utf8_lossy(&msg).into_owned()))
        }
        other => Err(unknown_status(other)),
    }
}

fn unknown_status(status: u8) -> ReadError {
    ReadError::Decode(DecodeError::Invalid {
        format: REPLY,
        field: "status",
        why: format!("unknown reply status {status}"),
    })
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
    /// Connections served at once at most ([`TcpStoreServer::limit_clients`]).
    max_clients: AtomicUsize,
    /// The job's secret that clients must prove they know.
    secret: Option<JobSecret>,
    /// Connections refused for failing authentication, and the last reason.
    refused: Mutex<(usize, Option<String>)>,
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
    /// starts serving clients without authentication (see
    /// [`bind_with_secret`](Self::bind_with_secret)).
    pub fn bind(addr: SocketAddr) -> Result<TcpStoreServer, StoreError> {
        TcpStoreServer::bind_with_secret(addr, None)
    }

    /// Binds `addr` and starts serving the clients that prove they know
    /// `secret` (none: clients without a secret; a client with one is then
    /// refused, and told so).
    pub fn bind_with_secret(
        addr: SocketAddr,
        secret: Option<JobSecret>,
    ) -> Result<TcpStoreServer, StoreError> {
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
            max_clients: AtomicUsize::new(usize::MAX),
            secret,
            refused: Mutex::new((0, None)),
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

    /// Serves at most `n` connections at once; a connection beyond them is
    /// closed as soon as it is accepted (and logged with its address), so
    /// that a flood of connections costs neither a thread each nor the
    /// descriptors the job's own clients need. A job sets it from its world
    /// size; the default is no limit.
    pub fn limit_clients(&self, n: usize) {
        self.shared.max_clients.store(n, Ordering::SeqCst);
    }

    /// The address the server listens on (with the real port if bound to
    /// port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// How many connections failed authentication so far, and why the last
    /// one did (for a rank that waits for peers in vain to say why).
    pub fn auth_refusals(&self) -> (usize, Option<String>) {
        self.shared
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
    let served = shared.clients().streams.len();
    if served >= shared.max_clients.load(Ordering::SeqCst) {
        tracing::warn!(
            %peer,
            "tcp store server: refused a connection: {served} clients already, the most this job has"
        );
        let _ = stream.shutdown(Shutdown::Both);
        return;
    }
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
    /// The client did not authenticate.
    Refused(AuthError),
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
    let end = serve_requests(shared, stream, peer);
    let stopping = shared.stop.load(Ordering::SeqCst);
    match end {
        End::Clean => tracing::debug!(%peer, "tcp store client disconnected"),
        End::Stopping => {}
        End::Io(_) if stopping => {}
        End::Refused(why) => {
            tracing::warn!(
                %peer,
                "tcp store server {}: refused client {peer}: {why}",
                shared.addr
            );
            let mut refused = shared
                .refused
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            refused.0 += 1;
            refused.1 = Some(why.to_string());
        }
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

impl From<ReadError> for End {
    fn from(e: ReadError) -> End {
        match e {
            ReadError::Io(e) => End::from(e),
            ReadError::Decode(e) => End::Fault(e.to_string()),
        }
    }
}

impl From<DecodeError> for End {
    fn from(e: DecodeError) -> End {
        End::Fault(e.to_string())
    }
}

impl From<EncodeError> for End {
    fn from(e: EncodeError) -> End {
        End::Fault(format!("cannot encode the reply: {e}"))
    }
}

fn serve_requests(shared: &ServerShared, stream: TcpStream, peer: SocketAddr) -> End {
    // Nothing the client sends is read before it is authenticated.
    if let Err(e) = auth::authenticate(
        &stream,
        Role::Accepting,
        shared.secret.as_ref(),
        STORE_CONTEXT,
        &format!("client {peer}"),
        Instant::now() + AUTH_TIMEOUT,
    ) {
        return End::Refused(e);
    }
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => return End::Io(e),
    };
    let mut reader = BufReader::new(stream);
    let result = (|| -> Result<(), End> {
        // Handshake, bounded in time so silent connections do not linger.
        reader.get_ref().set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        read_fixed::<8, _>(&mut reader, HANDSHAKE, |d| d.magic(&MAGIC))?;
        let version = read_fixed::<2, _>(&mut reader, HANDSHAKE, |d| d.u16("version"))?;
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
            let mut reply = Writer::new();
            match Request::read(op[0], &mut reader)? {
                Request::Set { key, value } => {
                    shared.map.set(&key, &value);
                    reply.u8(ST_OK);
                }
                Request::Get { key, wait_ms } => {
                    let wait = Duration::from_millis(wait_ms).min(MAX_GET_WAIT);
                    let deadline = Instant::now() + wait;
                    match shared.map.wait_for(&key, deadline) {
                        Wait::Found(value) => {
                            reply.u8(ST_OK).bytes_prefixed(Prefix::U32, &value)?;
                        }
                        Wait::TimedOut => {
                            reply.u8(ST_NOT_FOUND);
                        }
                        Wait::Closed => return Err(End::Stopping),
                    }
                }
                Request::TryGet { key } => match shared.map.try_get(&key) {
                    Some(value) => {
                        reply.u8(ST_OK).bytes_prefixed(Prefix::U32, &value)?;
                    }
                    None => {
                        reply.u8(ST_NOT_FOUND);
                    }
                },
                Request::Add { key, delta } => match shared.map.add(&key, delta) {
                    Ok(new) => {
                        reply.u8(ST_OK).i64(new);
                    }
                    Err(e) => {
                        reply.u8(ST_ERR).str_prefixed(Prefix::U32, &e.to_string())?;
                    }
                },
            }
            if shared.stop.load(Ordering::SeqCst) {
                return Err(End::Stopping);
            }
            writer.write_all(reply.as_bytes())?;
        }
    })();
    match result {
        Ok(()) => End::Clean,
        Err(end) => end,
    }
}

// ---------------------------------------------------------------- client

/// A client of a [`TcpStoreServer`]. One connection, shared by the threads
/// that use it (requests are serialized).
///
/// If a request fails half-way (an I/O error or a read timeout), the
/// connection is not reused: later requests fail with
/// [`StoreError::Closed`].
#[derive(Debug)]
pub struct TcpStore {
    server: SocketAddr,
    client: Client,
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

/// Whether setting up a connection failed because the server hung up
/// during authentication, before it said anything of the store's protocol
/// (not because it answered something wrong).
fn hung_up_during_setup(e: &StoreError) -> bool {
    let hung_up = |e: &io::Error| {
        matches!(
            e.kind(),
            ErrorKind::UnexpectedEof
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
        )
    };
    match e {
        StoreError::Auth {
            source: AuthError::Closed { .. },
            ..
        } => true,
        StoreError::Auth {
            source: AuthError::Io { source, .. },
            ..
        } => hung_up(source),
        // After authentication the server has spoken: a reply cut short
        // is a broken server, not one going away.
        _ => false,
    }
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
    /// `deadline`, without a secret (see
    /// [`connect_with_secret`](Self::connect_with_secret)).
    pub fn connect(addr: SocketAddr, deadline: Instant) -> Result<TcpStore, StoreError> {
        TcpStore::connect_with_secret(addr, deadline, None)
    }

    /// [`connect`](Self::connect), proving knowledge of `secret` to the
    /// server and checking that the server knows it too. A server of
    /// another job fails with [`StoreError::Auth`] naming it.
    pub fn connect_with_secret(
        addr: SocketAddr,
        deadline: Instant,
        secret: Option<&JobSecret>,
    ) -> Result<TcpStore, StoreError> {
        let store = describe_addr(addr);
        let handshake_wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(5));
        let handshake = |conn: &mut Conn| {
            let io = |doing: &str, source| StoreError::Io {
                what: format!("{doing} {store}"),
                source,
            };
            auth::authenticate(
                &conn.writer,
                Role::Connecting,
                secret,
                STORE_CONTEXT,
                &format!("the tcp store at {addr}"),
                Instant::now() + handshake_wait,
            )
            .map_err(|source| StoreError::Auth {
                store: store.clone(),
                source,
            })?;
            conn.writer
                .write_all(&hello())
                .map_err(|e| io("sending handshake to", e))?;
            let version = read_fixed::<10, _>(&mut conn.reader, HANDSHAKE, |d| {
                d.magic(&MAGIC)?;
                d.u16("version")
            })
            .map_err(|e| match e {
                ReadError::Io(source) => io("reading handshake reply from", source),
                ReadError::Decode(e) => {
                    StoreError::Protocol(format!("{store} answered the handshake: {e}"))
                }
            })?;
            if version != VERSION {
                return Err(StoreError::Protocol(format!(
                    "{store} speaks protocol version {version}, this client speaks {VERSION}"
                )));
            }
            Ok(())
        };
        // A server that closes a connection before its handshake is done is
        // going away (a communicator of this job shutting down while the
        // next one starts on the same port) or full: try again until the
        // deadline. A server of another job is not retried: it proves that
        // its secret differs, it does not hang up.
        let mut backoff = Duration::from_millis(10);
        let client = loop {
            match Client::connect(
                addr,
                store.clone(),
                deadline,
                DEFAULT_TIMEOUT,
                handshake_wait,
                handshake,
            ) {
                Ok(client) => break client,
                Err(e) if hung_up_during_setup(&e) && Instant::now() + backoff < deadline => {
                    tracing::debug!(server = %addr, "store closed the connection during setup, retrying: {e}");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        };
        tracing::debug!(server = %addr, local = %client.local_addr(), "connected to tcp store");
        Ok(TcpStore {
            server: addr,
            client,
        })
    }

    /// The local address of this client's connection: the interface that
    /// routes to the server.
    pub fn local_addr(&self) -> SocketAddr {
        self.client.local_addr()
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
        request: &Request,
        wait: Duration,
        parse: impl FnOnce(&mut BufReader<TcpStream>) -> Result<T, ReadError>,
    ) -> Result<T, StoreError> {
        let key = request.key();
        let op_name = request.name();
        self.check_len(key, "key", key.len())?;
        // Lengths are checked against TCP_MAX_LEN, which a u32 holds.
        let bytes = request.encode().map_err(|e| {
            StoreError::Protocol(format!(
                "{}: cannot encode {op_name} of key {:?}: {e}",
                self.describe(),
                short_key(key)
            ))
        })?;

        let wait = wait.max(Duration::from_millis(1));
        self.client.request(op_name, key, |conn| {
            conn.writer.set_read_timeout(Some(wait))?;
            conn.writer.write_all(&bytes)?;
            parse(&mut conn.reader)
        })
    }
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.check_len(key, "value", value.len())?;
        let request = Request::Set {
            key: key.to_owned(),
            value: value.to_vec(),
        };
        self.roundtrip(&request, DEFAULT_TIMEOUT, read_set_reply)
    }

    fn set_within(&self, key: &str, value: &[u8], wait: Duration) -> Result<(), StoreError> {
        self.check_len(key, "value", value.len())?;
        let request = Request::Set {
            key: key.to_owned(),
            value: value.to_vec(),
        };
        self.roundtrip(&request, wait, read_set_reply)
    }

    fn try_get_within(&self, key: &str, wait: Duration) -> Result<Option<Vec<u8>>, StoreError> {
        let request = Request::TryGet {
            key: key.to_owned(),
        };
        self.roundtrip(&request, wait, read_value_reply)
    }

    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, StoreError> {
        let start = Instant::now();
        let left = deadline.saturating_duration_since(start);
        let wait_ms = u64::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
        let request = Request::Get {
            key: key.to_owned(),
            wait_ms,
        };
        let value = self.roundtrip(&request, left + GET_MARGIN, read_value_reply)?;
        value.ok_or_else(|| StoreError::Timeout {
            key: key.to_owned(),
            waited: start.elapsed(),
            store: self.describe(),
        })
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let request = Request::TryGet {
            key: key.to_owned(),
        };
        self.roundtrip(&request, DEFAULT_TIMEOUT, read_value_reply)
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        let request = Request::Add {
            key: key.to_owned(),
            delta,
        };
        self.roundtrip(&request, DEFAULT_TIMEOUT, read_add_reply)?
            .map_err(|detail| StoreError::Counter {
                key: key.to_owned(),
                store: self.describe(),
                detail,
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
    fn connections_beyond_the_limit_are_closed_and_the_others_served() {
        let server = TcpStoreServer::bind(loopback()).unwrap();
        server.limit_clients(2);
        let a = TcpStore::connect(server.local_addr(), soon(5000)).unwrap();
        let b = TcpStore::connect(server.local_addr(), soon(5000)).unwrap();
        // The third is accepted by the kernel, then closed by the server.
        let third = TcpStore::connect(server.local_addr(), soon(2000));
        match third {
            Err(_) => {}
            Ok(c) => assert!(c.set("k", b"v").is_err(), "a third client was served"),
        }
        a.set("k", b"1").unwrap();
        assert_eq!(b.get("k", soon(2000)).unwrap(), b"1");
        // A slot frees when a client leaves.
        drop(a);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let c = TcpStore::connect(server.local_addr(), soon(2000));
            if let Ok(c) = c {
                if c.set("k", b"2").is_ok() {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no slot freed after a client left"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_store_that_hangs_up_during_setup_is_tried_again_until_the_next_one_serves() {
        // The port's first listener hangs up on its connections, as a
        // store shutting down does; then a store of the same job takes the
        // port (the next communicator of a job started on the same port).
        let secret = JobSecret::from_key([7u8; 32]);
        let old = TcpListener::bind(loopback()).unwrap();
        let addr = old.local_addr().unwrap();
        let (started, started_rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            let (hung_up, _) = old.accept().unwrap();
            drop(hung_up);
            drop(old);
            let server = TcpStoreServer::bind_with_secret(addr, Some(secret)).unwrap();
            started.send(()).unwrap();
            server
        });
        let secret = JobSecret::from_key([7u8; 32]);
        let client = TcpStore::connect_with_secret(addr, soon(10_000), Some(&secret)).unwrap();
        started_rx.recv().unwrap();
        client.set("ready", b"yes").unwrap();
        assert_eq!(client.get("ready", soon(5000)).unwrap(), b"yes");
        drop(server.join().unwrap());

        // A store of another job is not tried again: its secret differs,
        // and the client says so at once.
        let other =
            TcpStoreServer::bind_with_secret(loopback(), Some(JobSecret::from_key([8u8; 32])))
                .unwrap();
        let t0 = Instant::now();
        let err = TcpStore::connect_with_secret(other.local_addr(), soon(10_000), Some(&secret))
            .unwrap_err();
        assert!(err.to_string().contains("secret differs"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
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

    /// Writes `bytes` on a raw connection (after the greetings of an
    /// unauthenticated client when `greet`) and checks the server closes it.
    fn assert_dropped(server: &TcpStoreServer, bytes: &[u8], half_close: bool) {
        assert_dropped_after(server, bytes, half_close, true);
    }

    fn assert_dropped_after(server: &TcpStoreServer, bytes: &[u8], half_close: bool, greet: bool) {
        let mut raw = TcpStream::connect(server.local_addr()).unwrap();
        if greet {
            auth::authenticate(
                &raw,
                Role::Connecting,
                None,
                STORE_CONTEXT,
                "store",
                soon(5000),
            )
            .unwrap();
        }
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
        assert_dropped_after(&server, &garbage, false, false);
        assert_dropped_after(&server, b"GET / HTTP/1.1\r\n\r\n", false, false);
        // A client of a build that does not authenticate.
        assert_dropped_after(&server, &hello(), false, false);
        assert_eq!(server.auth_refusals_soon(3), 3);
        // Garbage after the greetings.
        assert_dropped(&server, &garbage, false);
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
        assert!(
            matches!(
                err,
                StoreError::Auth {
                    source: AuthError::NotOxccl { .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        assert!(err.to_string().contains("not an oxccl peer"), "{err}");
        fake.join().unwrap();
    }

    impl TcpStoreServer {
        /// The refusals, once there are `n` (they are counted by the
        /// client's thread after the client is told).
        fn auth_refusals_soon(&self, n: usize) -> usize {
            let until = Instant::now() + Duration::from_secs(5);
            while self.auth_refusals().0 < n && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.auth_refusals().0
        }
    }

    #[test]
    fn tcp_store_refuses_clients_without_the_secret_and_keeps_serving() {
        crate::test_log::warnings();
        let ours = JobSecret::from_text("our job").unwrap();
        let theirs = JobSecret::from_text("another job").unwrap();
        let server = TcpStoreServer::bind_with_secret(loopback(), Some(ours.clone())).unwrap();
        let addr = server.local_addr();
        let client = TcpStore::connect_with_secret(addr, soon(5000), Some(&ours)).unwrap();
        client.set("k", b"v").unwrap();
        assert_eq!(client.add("n", 5).unwrap(), 5);

        // A rank of another job: refused, and told why.
        let start = Instant::now();
        let err = TcpStore::connect_with_secret(addr, soon(5000), Some(&theirs)).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(
            matches!(&err, StoreError::Auth { source, .. } if source.is_wrong_secret()),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with(&format!("the tcp store at {addr} belongs to another job")),
            "{err}"
        );
        assert_eq!(server.auth_refusals_soon(1), 1);
        let (_, why) = server.auth_refusals();
        let why = why.unwrap();
        assert!(why.contains("belongs to another job"), "{why}");
        assert!(why.starts_with("client 127.0.0.1:"), "{why}");
        // Logged as a warning with the client's address.
        let logged = crate::test_log::warnings();
        assert!(
            logged.lines().any(|l| l.contains(&format!(
                "tcp store server {addr}: refused client 127.0.0.1:"
            )) && l.contains("belongs to another job")),
            "{logged}"
        );

        // A client without a secret: refused, naming the variable to set.
        let err = TcpStore::connect(addr, soon(5000)).unwrap_err();
        assert!(err.to_string().contains("OXCCL_JOB_SECRET"), "{err}");
        assert_eq!(server.auth_refusals_soon(2), 2);

        // The job's clients go on, and nothing was changed.
        assert_eq!(client.get("k", soon(1000)).unwrap(), b"v");
        let fresh = TcpStore::connect_with_secret(addr, soon(5000), Some(&ours)).unwrap();
        assert_eq!(fresh.get("k", soon(1000)).unwrap(), b"v");
        assert_eq!(fresh.add("n", 0).unwrap(), 5);
        assert_eq!(server.auth_refusals().0, 2);
    }

    #[test]
    fn an_authenticating_client_is_told_when_the_server_has_no_secret() {
        let (server, _client) = server_and_client();
        let s = JobSecret::from_text("ours").unwrap();
        let err =
            TcpStore::connect_with_secret(server.local_addr(), soon(5000), Some(&s)).unwrap_err();
        assert!(err.to_string().contains("has no job secret"), "{err}");
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

    fn key() -> impl proptest::strategy::Strategy<Value = String> {
        ".{0,12}"
    }

    fn request() -> impl proptest::strategy::Strategy<Value = Request> {
        use proptest::prelude::*;
        prop_oneof![
            (key(), proptest::collection::vec(any::<u8>(), 0..40))
                .prop_map(|(key, value)| Request::Set { key, value }),
            (key(), any::<u64>()).prop_map(|(key, wait_ms)| Request::Get { key, wait_ms }),
            key().prop_map(|key| Request::TryGet { key }),
            (key(), any::<i64>()).prop_map(|(key, delta)| Request::Add { key, delta }),
        ]
    }

    /// Reads a whole request (op byte and body) from `bytes`.
    fn read_request(mut bytes: &[u8]) -> Result<(Request, usize), ReadError> {
        let op = read_fixed::<1, _>(&mut bytes, REQUEST, |d| d.u8("op"))?;
        let request = Request::read(op, &mut bytes)?;
        Ok((request, bytes.len()))
    }

    #[test]
    fn request_layout_is_fixed() {
        let request = Request::Set {
            key: "k".into(),
            value: b"vv".to_vec(),
        };
        assert_eq!(
            request.encode().unwrap(),
            [OP_SET, 1, 0, 0, 0, b'k', 2, 0, 0, 0, b'v', b'v']
        );
        let request = Request::Add {
            key: String::new(),
            delta: -1,
        };
        assert_eq!(
            request.encode().unwrap(),
            [OP_ADD, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255]
        );
        assert_eq!(hello()[..8], MAGIC);
        assert_eq!(hello()[8..], VERSION.to_le_bytes());
        let e = read_request(&[77, 1, 0, 0, 0, b'k']).unwrap_err();
        assert!(
            matches!(&e, ReadError::Decode(e) if e.to_string() == "tcp store request: invalid op: unknown request op 77"),
            "{e:?}"
        );
    }

    proptest::proptest! {
        #[test]
        fn requests_round_trip(request in request()) {
            let bytes = request.encode().unwrap();
            let (back, left) = read_request(&bytes).unwrap();
            proptest::prop_assert_eq!(back, request);
            proptest::prop_assert_eq!(left, 0);
        }

        #[test]
        fn replies_round_trip(value in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40), n in proptest::prelude::any::<i64>()) {
            let mut w = Writer::new();
            w.u8(ST_OK).bytes_prefixed(Prefix::U32, &value).unwrap();
            w.u8(ST_NOT_FOUND).u8(ST_OK).i64(n).u8(ST_ERR).str_prefixed(Prefix::U32, "bad").unwrap();
            w.u8(ST_OK);
            let mut r = w.as_bytes();
            proptest::prop_assert_eq!(read_value_reply(&mut r).unwrap(), Some(value));
            proptest::prop_assert_eq!(read_value_reply(&mut r).unwrap(), None);
            proptest::prop_assert_eq!(read_add_reply(&mut r).unwrap(), Ok(n));
            proptest::prop_assert_eq!(read_add_reply(&mut r).unwrap(), Err("bad".to_owned()));
            read_set_reply(&mut r).unwrap();
            proptest::prop_assert!(r.is_empty());
        }

        #[test]
        fn arbitrary_requests_and_replies_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = read_request(&bytes);
            let _ = read_value_reply(&mut &bytes[..]);
            let _ = read_add_reply(&mut &bytes[..]);
            let _ = read_set_reply(&mut &bytes[..]);
        }

        #[test]
        fn truncated_and_mutated_requests_fail_cleanly(request in request(), cut in 0usize..64, at in 0usize..64, flip in 1u8..=255) {
            let bytes = request.encode().unwrap();
            let cut = cut.min(bytes.len().saturating_sub(1));
            let truncated = read_request(&bytes[..cut]);
            let ended_early = matches!(&truncated, Err(ReadError::Io(e)) if e.kind() == ErrorKind::UnexpectedEof);
            proptest::prop_assert!(ended_early, "{:?}", truncated);
            let mut mutated = bytes.clone();
            let at = at % mutated.len();
            mutated[at] ^= flip;
            // Decodes to something, or fails with an error: never panics.
            let _ = read_request(&mutated);
        }
    }

    #[test]
    fn announced_lengths_over_the_limit_are_refused_before_reading() {
        let mut bytes = vec![OP_SET];
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = read_request(&bytes).unwrap_err();
        assert!(
            matches!(
                &e,
                ReadError::Decode(DecodeError::TooLong { field: "key", .. })
            ),
            "{e:?}"
        );
    }
}
