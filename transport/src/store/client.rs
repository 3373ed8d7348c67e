//! The client side that oxccl's TCP store and the torch store share: one
//! connection to a server, set up the same way, used by one request at a
//! time, and given up for good when a request fails half-way.

use std::io::{BufReader, ErrorKind};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::tcp::{ReadError, connect_retrying};
use super::{StoreError, short_key};

/// The two halves of a client's connection.
#[derive(Debug)]
pub(super) struct Conn {
    pub writer: TcpStream,
    pub reader: BufReader<TcpStream>,
}

/// A connection to a store server, shared by the threads of one client.
#[derive(Debug)]
pub(super) struct Client {
    /// The store's description, for messages ("tcp store 10.0.0.1:29500").
    store: String,
    local: SocketAddr,
    conn: Mutex<(Conn, Option<String>)>,
}

impl Client {
    /// Connects to `addr` (retrying while nothing listens there yet, until
    /// `deadline`), with Nagle off, writes that give up after
    /// `write_timeout` and reads after `read_timeout`, and runs the
    /// protocol's `handshake` on the connection before sharing it.
    pub(super) fn connect(
        addr: SocketAddr,
        store: String,
        deadline: Instant,
        write_timeout: Duration,
        read_timeout: Duration,
        handshake: impl FnOnce(&mut Conn) -> Result<(), StoreError>,
    ) -> Result<Client, StoreError> {
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
            .set_write_timeout(Some(write_timeout))
            .map_err(io("setting write timeout on connection to"))?;
        stream
            .set_read_timeout(Some(read_timeout))
            .map_err(io("setting read timeout on connection to"))?;
        let local = stream
            .local_addr()
            .map_err(io("reading local address of connection to"))?;
        let reader = stream.try_clone().map_err(io("cloning connection to"))?;
        let mut conn = Conn {
            writer: stream,
            reader: BufReader::new(reader),
        };
        handshake(&mut conn)?;
        Ok(Client {
            store,
            local,
            conn: Mutex::new((conn, None)),
        })
    }

    /// The local address of the connection: the interface that routes to the server.
    pub(super) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Runs request `op` on `key` through `f`, alone on the connection. A
    /// failure half-way leaves the connection out of step, so every later
    /// request fails at once with [`StoreError::Closed`] saying why.
    pub(super) fn request<T>(
        &self,
        op: &str,
        key: &str,
        f: impl FnOnce(&mut Conn) -> Result<T, ReadError>,
    ) -> Result<T, StoreError> {
        let mut guard = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let (conn, broken) = &mut *guard;
        if let Some(why) = broken {
            return Err(StoreError::Closed {
                store: self.store.clone(),
                detail: why.clone(),
            });
        }
        // Until the reply is read the connection is in an unknown state
        // (also if `f` panics: the lock is taken back from its poison).
        *broken = Some("an earlier request failed half-way".to_owned());
        match f(conn) {
            Ok(v) => {
                *broken = None;
                Ok(v)
            }
            Err(e) => {
                let err = self.failed(op, key, e);
                *broken = Some(err.to_string());
                Err(err)
            }
        }
    }

    /// The error of request `op` on `key` that failed with `e`.
    fn failed(&self, op: &str, key: &str, e: ReadError) -> StoreError {
        let store = self.store.clone();
        match e {
            // A malformed reply: the connection is out of step.
            ReadError::Decode(e) => StoreError::Protocol(format!(
                "malformed reply from {store} to {op} of key {:?}: {e}",
                short_key(key)
            )),
            ReadError::Io(source) => match source.kind() {
                ErrorKind::UnexpectedEof
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe => StoreError::Closed {
                    store,
                    detail: format!(
                        "server closed the connection during {op} of key {:?}: {source}",
                        short_key(key)
                    ),
                },
                _ => StoreError::Io {
                    what: format!("{op} of key {:?} in {store}", short_key(key)),
                    source,
                },
            },
        }
    }
}
