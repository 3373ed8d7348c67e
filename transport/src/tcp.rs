//! TCP links: socket options, connecting and accepting with a handshake.
//!
//! Every connection starts with authentication ([`crate::auth`]):
//! both sides prove they know the job's secret (or, without one, exchange
//! greetings that say so) before anything else is read. Then the
//! connecting side sends a [`Hello`]. The
//! accepting side checks magic, protocol version, job id, world size and the
//! sender's rank, answers with a [`HelloReply`], and only then hands the
//! connection to the engine. Anything else that connects (a port scanner, a
//! health check, a rank of another job) is logged and dropped while the
//! accept goes on, so it cannot disturb the job. Handshakes of several
//! connections proceed at once: a silent stray does not delay the real peer.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::auth::{self, AuthError, Handshake, JobSecret, Role, link_context};
use crate::wire::{Hello, HelloReply, PROTOCOL_VERSION, refuse};
use crate::{StreamLink, TransportError};

/// Socket settings of TCP links.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpOptions {
    /// SO_SNDBUF in bytes; `None` leaves the kernel's autotuning on (usually best:
    /// setting it caps the buffer at `net.core.wmem_max`).
    pub send_buffer: Option<usize>,
    /// SO_RCVBUF in bytes; `None` leaves the kernel's autotuning on.
    pub recv_buffer: Option<usize>,
    /// TCP_NOTSENT_LOWAT in bytes: how much a link to another host keeps
    /// queued unsent in the kernel (links within the host are left alone).
    /// `None` leaves the system's default (no limit). With a
    /// limit, the frames of a rank's links leave in the order the engine
    /// writes them instead of sharing the wire: without it a send of the
    /// next step, written into a second socket while the first still holds
    /// most of its frame, takes half the link from the frame the peers
    /// wait for.
    pub unsent_limit: Option<usize>,
}

impl TcpOptions {
    fn apply(&self, stream: &TcpStream) -> io::Result<()> {
        stream.set_nodelay(true)?;
        let sock = SockRef::from(stream);
        if let Some(n) = self.send_buffer {
            sock.set_send_buffer_size(n)?;
        }
        if let Some(n) = self.recv_buffer {
            sock.set_recv_buffer_size(n)?;
        }
        if let Some(n) = self.unsent_limit {
            // Within one host there is no wire that two sockets share, and
            // the cap only costs wake-ups (4 ranks over loopback TCP on 2
            // cores: allreduce and broadcast of 1 MiB 17-19% slower).
            // An ordering aid, not a need: a kernel without the option
            // (before Linux 3.12) gets a link without it.
            if !same_host(stream) {
                if let Err(e) = crate::sockopt::set_tcp_notsent_lowat(stream, n) {
                    tracing::debug!("TCP_NOTSENT_LOWAT not set on a link: {e}");
                }
            }
        }
        Ok(())
    }
}

/// Whether both ends of `stream` are on this host: a loopback address, or
/// the same address at both ends.
fn same_host(stream: &TcpStream) -> bool {
    match (stream.local_addr(), stream.peer_addr()) {
        (Ok(local), Ok(peer)) => peer.ip().is_loopback() || peer.ip() == local.ip(),
        _ => false,
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// A listening socket that accepts ring connections from peers.
#[derive(Debug)]
pub struct Listener {
    inner: TcpListener,
    addr: SocketAddr,
}

impl Listener {
    /// Binds an ephemeral port on `ip`.
    pub fn bind(ip: IpAddr) -> Result<Listener, TransportError> {
        let what = || format!("binding a listening socket on {ip}");
        let socket = Socket::new(
            Domain::for_address(SocketAddr::new(ip, 0)),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .map_err(|e| TransportError::io(what(), e))?;
        socket
            .set_reuse_address(true)
            .map_err(|e| TransportError::io(what(), e))?;
        socket
            .bind(&SocketAddr::new(ip, 0).into())
            .map_err(|e| TransportError::io(what(), e))?;
        socket
            .listen(128)
            .map_err(|e| TransportError::io(what(), e))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| TransportError::io(what(), e))?;
        let inner: TcpListener = socket.into();
        let addr = inner
            .local_addr()
            .map_err(|e| TransportError::io(what(), e))?;
        Ok(Listener { inner, addr })
    }

    /// The address peers connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Accepts the connection whose [`Hello`] equals `expect` (its `from` is the
    /// expected peer), refusing and logging every other connection meanwhile.
    ///
    /// Returns the link and the number of connections refused.
    pub fn accept_peer(
        &self,
        expect: Hello,
        secret: Option<&JobSecret>,
        options: TcpOptions,
        deadline: Instant,
    ) -> Result<(StreamLink, usize), TransportError> {
        let (mut links, refused) = self.accept_peers(&[expect], secret, options, deadline)?;
        match links.pop() {
            Some(l) => Ok((l, refused)),
            None => Err(TransportError::Protocol {
                peer: expect.from as usize,
                reason: "accepted no connection".into(),
            }),
        }
    }

    /// Accepts one connection for each [`Hello`] of `expect`, in any order,
    /// refusing and logging every other connection meanwhile. Each must
    /// first prove it knows `secret` (none: it must have none either).
    ///
    /// Returns the links in the order of `expect`, and the number of
    /// connections refused.
    pub fn accept_peers(
        &self,
        expect: &[Hello],
        secret: Option<&JobSecret>,
        options: TcpOptions,
        deadline: Instant,
    ) -> Result<(Vec<StreamLink>, usize), TransportError> {
        self.accept_peers_parking(expect, None, secret, options, deadline)
    }

    /// [`accept_peers`](Self::accept_peers) for links made on first use:
    /// a connection of this job to this rank with the same purpose as the
    /// expected ones but from another peer is a link that peer needs
    /// before this rank does; it is accepted and kept in `park` (see
    /// [`Parked`]) for a later call, not refused.
    pub fn accept_peers_parking(
        &self,
        expect: &[Hello],
        mut park: Option<&mut Parked>,
        secret: Option<&JobSecret>,
        options: TcpOptions,
        deadline: Instant,
    ) -> Result<(Vec<StreamLink>, usize), TransportError> {
        let park_as = park.as_ref().map(|p| p.template);
        // When every expected peer is in, connections still mid-handshake
        // get this long to finish and be parked.
        const PARK_GRACE: Duration = Duration::from_secs(1);
        let mut all_in: Option<Instant> = None;
        let mut found: Vec<Option<StreamLink>> = expect.iter().map(|_| None).collect();
        let Some(own) = expect.first().map(|h| h.to) else {
            return Ok((Vec::new(), 0));
        };
        let context = link_context(own);
        struct Pending {
            stream: TcpStream,
            addr: SocketAddr,
            auth: Handshake,
            buf: [u8; Hello::LEN],
            filled: usize,
            since: Instant,
        }
        // Connections that failed authentication, and the last reason: a
        // wait that ends in vain says so.
        let mut auth_refused = 0usize;
        let mut last_auth: Option<String> = None;
        const STRAY_PATIENCE: Duration = Duration::from_secs(10);
        let start = Instant::now();
        let mut pending: Vec<Pending> = Vec::new();
        let mut refused = 0usize;
        loop {
            // Take every connection waiting in the backlog.
            loop {
                match self.inner.accept() {
                    Ok((stream, addr)) => {
                        let auth = Handshake::new(
                            Role::Accepting,
                            secret,
                            &context,
                            format!("connection from {addr}"),
                        )?;
                        let mut p = Pending {
                            stream,
                            addr,
                            auth,
                            buf: [0; Hello::LEN],
                            filled: 0,
                            since: Instant::now(),
                        };
                        // The greeting goes out at once (48 bytes fit a
                        // fresh socket's buffer).
                        if let Err(e) = p
                            .stream
                            .set_nonblocking(true)
                            .and_then(|()| send_now(&p.stream, &mut p.auth))
                        {
                            tracing::warn!("dropping connection from {addr} on {}: {e}", self.addr);
                            continue;
                        }
                        pending.push(p);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        return Err(TransportError::io(format!("accepting on {}", self.addr), e));
                    }
                }
            }
            // Advance every handshake, in order of arrival (a stray that
            // came before the expected peer gets its refusal first).
            let mut i = 0;
            while i < pending.len() {
                let p = &mut pending[i];
                let verdict: Option<Result<usize, String>> = if !p.auth.is_done() {
                    match authenticate_step_on(&p.stream, &mut p.auth) {
                        Ok(()) => None,
                        Err(e) => {
                            if let Some(e) = e.auth() {
                                auth_refused += 1;
                                last_auth = Some(e.to_string());
                            }
                            Some(Err(e.to_string()))
                        }
                    }
                    .or_else(|| {
                        (!p.auth.is_done() && p.since.elapsed() > STRAY_PATIENCE)
                            .then(|| Err(format!("did not authenticate within {STRAY_PATIENCE:?}")))
                    })
                } else {
                    match p.stream.read(&mut p.buf[p.filled..]) {
                        Ok(0) => Some(Err("closed before completing the handshake".into())),
                        Ok(n) => {
                            p.filled += n;
                            if p.filled == Hello::LEN {
                                Some(check_hello(&p.buf, expect, &found, &p.stream, park_as))
                            } else {
                                None
                            }
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                            ) =>
                        {
                            if p.since.elapsed() > STRAY_PATIENCE {
                                Some(Err(format!("sent no handshake within {STRAY_PATIENCE:?}")))
                            } else {
                                None
                            }
                        }
                        Err(e) => Some(Err(format!("failed during the handshake: {e}"))),
                    }
                };
                match verdict {
                    None => i += 1,
                    Some(Ok(k)) => {
                        let p = pending.remove(i);
                        let want = match expect.get(k) {
                            Some(w) => *w,
                            // A peer to keep for later (`check_hello`).
                            None => {
                                Hello::decode(&p.buf).map_err(|e| TransportError::Protocol {
                                    peer: 0,
                                    reason: format!("a hello that was read twice differs: {e}"),
                                })?
                            }
                        };
                        // The reply is 12 bytes on a fresh socket: it fits the send buffer.
                        p.stream
                            .set_nonblocking(false)
                            .and_then(|_| {
                                p.stream.set_write_timeout(Some(
                                    remaining(deadline).max(Duration::from_millis(100)),
                                ))
                            })
                            .and_then(|_| (&p.stream).write_all(&HelloReply::Accept.encode()))
                            .and_then(|_| options.apply(&p.stream))
                            .map_err(|e| {
                                TransportError::io(
                                    format!(
                                        "answering the handshake of rank {} at {}",
                                        want.from, p.addr
                                    ),
                                    e,
                                )
                            })?;
                        tracing::info!(
                            "accepted rank {} from {} on {}",
                            want.from,
                            p.addr,
                            self.addr
                        );
                        let link = StreamLink::tcp(want.from as usize, p.stream)?;
                        match (found.get_mut(k), park.as_deref_mut()) {
                            (Some(slot), _) => *slot = Some(link),
                            (None, Some(park)) => park.links.push(link),
                            (None, None) => {}
                        }
                        if found.iter().all(Option::is_some) {
                            let since = *all_in.get_or_insert_with(Instant::now);
                            if park.is_some() && !pending.is_empty() && since.elapsed() < PARK_GRACE
                            {
                                continue;
                            }
                            for other in &pending {
                                tracing::warn!(
                                    "dropping connection from {} on {}: the expected peers arrived first",
                                    other.addr,
                                    self.addr
                                );
                            }
                            return Ok((found.into_iter().flatten().collect(), refused));
                        }
                    }
                    Some(Err(reason)) => {
                        let p = pending.remove(i);
                        tracing::warn!(
                            "refused connection from {} on {}: {reason}",
                            p.addr,
                            self.addr
                        );
                        refused += 1;
                    }
                }
            }
            if let Some(since) = all_in {
                // Parking: the expected peers are in, and what was still
                // mid-handshake is done or had its grace.
                if pending.is_empty() || since.elapsed() >= PARK_GRACE {
                    return Ok((found.into_iter().flatten().collect(), refused));
                }
            }
            let left = remaining(deadline);
            if left.is_zero() {
                let missing: Vec<String> = expect
                    .iter()
                    .zip(&found)
                    .filter(|(_, f)| f.is_none())
                    .map(|(e, _)| e.from.to_string())
                    .collect();
                return Err(TransportError::Timeout {
                    what: format!(
                        "waiting for rank {} to connect to {}{}{}",
                        missing.join(", "),
                        self.addr,
                        if refused > 0 {
                            format!(" ({refused} other connections refused)")
                        } else {
                            String::new()
                        },
                        match &last_auth {
                            Some(why) =>
                                format!("; {auth_refused} failed authentication, the last: {why}"),
                            None => String::new(),
                        }
                    ),
                    waited: start.elapsed(),
                });
            }
            let mut fds = Vec::with_capacity(pending.len() + 1);
            fds.push(PollFd::new(&self.inner, PollFlags::IN));
            for p in &pending {
                fds.push(PollFd::new(&p.stream, PollFlags::IN));
            }
            // Wake at least once a second to expire silent strays.
            let ts = Timespec::try_from(left.min(Duration::from_secs(1))).unwrap_or_default();
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    return Err(TransportError::io(
                        format!("waiting for connections on {}", self.addr),
                        e.into(),
                    ));
                }
            }
        }
    }
}

/// Why an accepted connection's authentication stopped.
enum StepError {
    /// It did not authenticate.
    Auth(AuthError),
    /// The connection failed.
    Io(io::Error),
}

impl StepError {
    fn auth(&self) -> Option<&AuthError> {
        match self {
            StepError::Auth(e) => Some(e),
            StepError::Io(_) => None,
        }
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Auth(e) => write!(f, "{e}"),
            StepError::Io(e) => write!(f, "failed during authentication: {e}"),
        }
    }
}

/// Sends what the handshake has to send on a nonblocking socket; its
/// messages are small enough for a fresh socket's buffer, so a full buffer
/// is an error.
fn send_now(stream: &TcpStream, hs: &mut Handshake) -> io::Result<()> {
    while !hs.output().is_empty() {
        match (&*stream).write(hs.output()) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => hs.sent(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads what the peer sent of its authentication and answers it, without
/// blocking.
fn authenticate_step_on(stream: &TcpStream, hs: &mut Handshake) -> Result<(), StepError> {
    while !hs.is_done() {
        match (&*stream).read(hs.input()) {
            Ok(0) => {
                return Err(StepError::Auth(AuthError::Closed {
                    peer: hs.peer().to_owned(),
                }));
            }
            Ok(n) => hs.received(n).map_err(StepError::Auth)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if auth::closed(&e) => {
                return Err(StepError::Auth(AuthError::Closed {
                    peer: hs.peer().to_owned(),
                }));
            }
            Err(e) => return Err(StepError::Io(e)),
        }
        send_now(stream, hs).map_err(StepError::Io)?;
    }
    Ok(())
}

/// Checks a received hello against the ones expected and not yet found;
/// returns the index of the one it is. On refusal tells the peer why.
fn check_hello(
    buf: &[u8; Hello::LEN],
    expected: &[Hello],
    found: &[Option<StreamLink>],
    stream: &TcpStream,
    park_as: Option<Hello>,
) -> Result<usize, String> {
    let hello = Hello::decode(buf).map_err(|e| e.to_string())?;
    let expected_now = expected
        .iter()
        .zip(found)
        .any(|(e, f)| f.is_none() && e.from == hello.from);
    if let Some(t) = park_as {
        let same_job = (
            hello.version,
            hello.job,
            hello.world,
            hello.to,
            hello.purpose,
        ) == (t.version, t.job, t.world, t.to, t.purpose);
        if same_job && !expected_now && hello.from < hello.world && hello.from != hello.to {
            // A link a peer makes before this rank needs it: kept (`usize::MAX`).
            return Ok(usize::MAX);
        }
    }
    let open = |i: &usize| found[*i].is_none();
    let k = (0..expected.len())
        .filter(open)
        .find(|&i| expected[i].from == hello.from)
        .or_else(|| (0..expected.len()).find(open))
        .unwrap_or(0);
    let expect = &expected[k];
    let code = if hello.version != expect.version {
        Some((
            refuse::VERSION,
            format!(
                "protocol version {} (ours is {})",
                hello.version, expect.version
            ),
        ))
    } else if hello.job != expect.job {
        Some((
            refuse::JOB,
            format!("job {:#x} (ours is {:#x})", hello.job, expect.job),
        ))
    } else if hello.world != expect.world {
        Some((
            refuse::WORLD,
            format!("world {} (ours is {})", hello.world, expect.world),
        ))
    } else if hello.to != expect.to || hello.from != expect.from || hello.purpose != expect.purpose
    {
        Some((
            refuse::RANK,
            format!(
                "rank {} connecting to rank {} (purpose {}), expected rank {} to rank {} (purpose {})",
                hello.from, hello.to, hello.purpose, expect.from, expect.to, expect.purpose
            ),
        ))
    } else {
        None
    };
    match code {
        None => Ok(k),
        Some((code, why)) => {
            // Best effort: tell a real oxccl peer why it was refused.
            let _ = (&*stream).write(&HelloReply::Refuse(code).encode());
            Err(format!("oxccl peer of {why}"))
        }
    }
}

/// Links that peers made to this rank before it needed them, kept by
/// [`Listener::accept_peers_parking`] until it does.
#[derive(Debug)]
pub struct Parked {
    /// What a connection must say to be kept: this job, world, rank and
    /// purpose (`from` is ignored).
    pub template: Hello,
    /// The links kept, each to its peer ([`Endpoint::peer`](crate::Endpoint::peer)).
    pub links: Vec<StreamLink>,
}

impl Parked {
    /// Nothing kept yet, for connections like `template`.
    pub fn new(template: Hello) -> Parked {
        Parked {
            template,
            links: Vec::new(),
        }
    }

    /// Takes the link kept from `peer`, if one is.
    pub fn take(&mut self, peer: usize) -> Option<StreamLink> {
        use crate::Endpoint;
        let i = self.links.iter().position(|l| l.peer() == peer)?;
        Some(self.links.swap_remove(i))
    }
}

/// A connection whose handshake (authentication, hello and reply) runs on
/// a thread of its own, while this rank accepts its own peers.
///
/// Connecting is split in two so that every rank can first connect to its
/// next peer and then accept from its previous one without a deadlock:
/// authentication needs both sides to take turns, so the connecting side
/// cannot wait for its answers before it accepts.
#[derive(Debug)]
pub struct PendingConnect {
    done: mpsc::Receiver<Result<TcpStream, TransportError>>,
    addr: SocketAddr,
    peer: usize,
    options: TcpOptions,
}

/// Connects to `addr` (retrying while nobody listens there, until
/// `deadline`) and starts the handshake: authenticating with `secret`,
/// then sending `hello` and reading the reply, all before `deadline`.
pub fn connect_start(
    addr: SocketAddr,
    hello: Hello,
    secret: Option<&JobSecret>,
    options: TcpOptions,
    deadline: Instant,
) -> Result<PendingConnect, TransportError> {
    let peer = hello.to as usize;
    let start = Instant::now();
    let mut backoff = Duration::from_millis(5);
    let stream = loop {
        let left = remaining(deadline);
        if left.is_zero() {
            return Err(TransportError::Timeout {
                what: format!("connecting to rank {peer} at {addr}"),
                waited: start.elapsed(),
            });
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => break s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                ) =>
            {
                std::thread::sleep(backoff.min(remaining(deadline)));
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => continue,
            Err(e) => {
                return Err(TransportError::io(
                    format!("connecting to rank {peer} at {addr}"),
                    e,
                ));
            }
        }
    };
    // The greeting's nonce is drawn here, so that a failure shows at once.
    let hs = Handshake::new(
        Role::Connecting,
        secret,
        &link_context(hello.to),
        format!("rank {peer} at {addr}"),
    )?;
    let (tx, done) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("oxccl-connect-{peer}"))
        .spawn(move || {
            // The receiver may be gone (the rank failed meanwhile): fine.
            let _ = tx.send(handshake(stream, hs, hello, addr, deadline));
        })
        .map_err(|e| TransportError::io(format!("starting the handshake with rank {peer}"), e))?;
    Ok(PendingConnect {
        done,
        addr,
        peer,
        options,
    })
}

/// The connecting side's handshake: authentication, the hello, the reply.
fn handshake(
    stream: TcpStream,
    mut hs: Handshake,
    hello: Hello,
    addr: SocketAddr,
    deadline: Instant,
) -> Result<TcpStream, TransportError> {
    let peer = hello.to;
    auth::drive(&stream, &mut hs, deadline)?;
    let what = || format!("sending the handshake to rank {peer} at {addr}");
    stream
        .set_write_timeout(Some(remaining(deadline).max(Duration::from_millis(100))))
        .map_err(|e| TransportError::io(what(), e))?;
    (&stream)
        .write_all(&hello.encode())
        .map_err(|e| TransportError::io(what(), e))?;
    let start = Instant::now();
    let mut buf = [0u8; HelloReply::LEN];
    let mut filled = 0;
    while filled < buf.len() {
        let left = remaining(deadline);
        if left.is_zero() {
            return Err(TransportError::Timeout {
                what: format!("waiting for rank {peer} at {addr} to answer the handshake"),
                waited: start.elapsed(),
            });
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| TransportError::io("setting a read timeout", e))?;
        match (&stream).read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(TransportError::Handshake {
                    addr: addr.to_string(),
                    reason: format!("rank {peer} closed the connection during the handshake"),
                });
            }
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                return Err(TransportError::io(
                    format!("reading the handshake reply of rank {peer} at {addr}"),
                    e,
                ));
            }
        }
    }
    match HelloReply::decode(&buf) {
        Ok(HelloReply::Accept) => Ok(stream),
        Ok(HelloReply::Refuse(code)) => Err(TransportError::Handshake {
            addr: addr.to_string(),
            reason: format!("rank {peer} refused us: {}", HelloReply::reason(code)),
        }),
        Err(e) => Err(TransportError::Handshake {
            addr: addr.to_string(),
            reason: e.to_string(),
        }),
    }
}

impl PendingConnect {
    /// The handshake's error, if it has failed already (without waiting):
    /// a rank whose accept failed reports this first, as it says more.
    pub fn failed_now(&self) -> Option<TransportError> {
        match self.done.try_recv() {
            Ok(Err(e)) => Some(e),
            _ => None,
        }
    }

    /// Waits for the handshake to end and returns the link.
    pub fn finish(self, deadline: Instant) -> Result<StreamLink, TransportError> {
        let PendingConnect {
            done,
            addr,
            peer,
            options,
        } = self;
        let start = Instant::now();
        // The handshake's own reads end by its deadline; the margin lets
        // its error (which says more than this one) arrive first.
        let stream = match done.recv_timeout(remaining(deadline) + Duration::from_secs(2)) {
            Ok(r) => r?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(TransportError::Timeout {
                    what: format!("waiting for the handshake with rank {peer} at {addr}"),
                    waited: start.elapsed(),
                });
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(TransportError::Handshake {
                    addr: addr.to_string(),
                    reason: format!("the handshake with rank {peer} ended without a result"),
                });
            }
        };
        stream
            .set_read_timeout(None)
            .and_then(|_| stream.set_write_timeout(None))
            .and_then(|_| options.apply(&stream))
            .map_err(|e| TransportError::io(format!("configuring the link to rank {peer}"), e))?;
        tracing::info!("connected to rank {peer} at {addr}");
        StreamLink::tcp(peer, stream)
    }
}

/// The hello a rank sends to `to`, for a connection of `purpose`.
pub fn hello(job: u64, world: usize, from: usize, to: usize, purpose: u32) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        job,
        world: world as u32,
        from: from as u32,
        to: to as u32,
        purpose,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::IoSlice;
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{Endpoint, Link};

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[test]
    fn handshake_connects_and_strays_are_refused() {
        let l = Listener::bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let addr = l.local_addr();
        // A stray that sends garbage, one that stays silent, and a peer of another job.
        let mut garbage = TcpStream::connect(addr).unwrap();
        garbage.write_all(&[0xAB; 64]).unwrap();
        let _silent = TcpStream::connect(addr).unwrap();
        let other_job = connect_start(
            addr,
            hello(99, 2, 0, 1, 0),
            None,
            TcpOptions::default(),
            soon(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let real = std::thread::spawn(move || {
            let p = connect_start(
                addr,
                hello(7, 2, 0, 1, 0),
                None,
                TcpOptions::default(),
                soon(),
            )
            .unwrap();
            p.finish(soon()).unwrap()
        });
        let (mut link, refused) = l
            .accept_peer(hello(7, 2, 0, 1, 0), None, TcpOptions::default(), soon())
            .unwrap();
        assert_eq!(link.peer(), 0);
        assert!(refused >= 1, "refused {refused}");
        let mut sender = real.join().unwrap();
        assert_eq!(sender.peer(), 1);
        assert_eq!(sender.try_write(&[IoSlice::new(b"ping")]).unwrap(), 4);
        let mut buf = [0u8; 4];
        while crate::wait(Some(&link), None, Duration::from_secs(5))
            .unwrap()
            .readable
        {
            if link
                .try_read(&mut [std::io::IoSliceMut::new(&mut buf)])
                .unwrap()
                == 4
            {
                break;
            }
        }
        assert_eq!(&buf, b"ping");
        // The peer of the other job is told why it was refused... if it was
        // processed before the real peer arrived; either way it gets an error.
        assert!(
            other_job
                .finish(Instant::now() + Duration::from_secs(2))
                .is_err()
        );
    }

    #[test]
    fn accept_times_out_naming_the_rank() {
        let l = Listener::bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let e = l
            .accept_peer(
                hello(1, 3, 2, 0, 0),
                None,
                TcpOptions::default(),
                Instant::now() + Duration::from_millis(100),
            )
            .unwrap_err();
        assert!(e.to_string().contains("waiting for rank 2"), "{e}");
    }

    #[test]
    fn connect_times_out_when_nobody_listens() {
        // Bind then drop to find a port with no listener.
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = connect_start(
            addr,
            hello(1, 2, 0, 1, 0),
            None,
            TcpOptions::default(),
            Instant::now() + Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(matches!(e, TransportError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("rank 1"), "{e}");
    }

    fn secret(s: &str) -> JobSecret {
        JobSecret::from_text(s).unwrap()
    }

    #[test]
    fn a_stray_with_another_secret_is_dropped_and_the_real_peer_connects() {
        crate::test_log::warnings();
        let ours = secret("ours");
        let l = Listener::bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let addr = l.local_addr();
        // A rank of another job whose hello is exactly the expected one.
        let stray = connect_start(
            addr,
            hello(7, 2, 0, 1, 0),
            Some(&secret("theirs")),
            TcpOptions::default(),
            soon(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let real = {
            let ours = ours.clone();
            std::thread::spawn(move || {
                connect_start(
                    addr,
                    hello(7, 2, 0, 1, 0),
                    Some(&ours),
                    TcpOptions::default(),
                    soon(),
                )
                .unwrap()
                .finish(soon())
            })
        };
        let (link, refused) = l
            .accept_peer(
                hello(7, 2, 0, 1, 0),
                Some(&ours),
                TcpOptions::default(),
                soon(),
            )
            .unwrap();
        assert_eq!(link.peer(), 0);
        assert_eq!(refused, 1);
        let logged = crate::test_log::warnings();
        assert!(
            logged
                .lines()
                .any(|l| l.contains("refused connection from 127.0.0.1:")
                    && l.contains(&format!("on {addr}"))
                    && l.contains("belongs to another job")),
            "{logged}"
        );
        assert_eq!(real.join().unwrap().unwrap().peer(), 1);
        // The stray is told, naming the rank and address it reached.
        let e = stray.finish(soon()).unwrap_err();
        assert!(
            matches!(&e, TransportError::Auth(a) if a.is_wrong_secret()),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with(&format!("rank 1 at {addr} belongs to another job")),
            "{e}"
        );
    }

    #[test]
    fn a_wait_in_vain_names_the_failed_authentication() {
        let l = Listener::bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let addr = l.local_addr();
        let stray = connect_start(
            addr,
            hello(7, 2, 0, 1, 0),
            Some(&secret("theirs")),
            TcpOptions::default(),
            soon(),
        )
        .unwrap();
        let start = Instant::now();
        let e = l
            .accept_peer(
                hello(7, 2, 0, 1, 0),
                Some(&secret("ours")),
                TcpOptions::default(),
                Instant::now() + Duration::from_millis(500),
            )
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(3));
        let msg = e.to_string();
        assert!(msg.contains("waiting for rank 0"), "{msg}");
        assert!(msg.contains("1 failed authentication"), "{msg}");
        assert!(msg.contains("belongs to another job"), "{msg}");
        assert!(
            stray
                .finish(soon())
                .unwrap_err()
                .to_string()
                .contains("another job")
        );
    }

    #[test]
    fn a_peer_without_the_secret_is_told_which_variable_to_set() {
        let l = Listener::bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let addr = l.local_addr();
        let bare = connect_start(
            addr,
            hello(7, 2, 0, 1, 0),
            None,
            TcpOptions::default(),
            soon(),
        )
        .unwrap();
        let e = l
            .accept_peer(
                hello(7, 2, 0, 1, 0),
                Some(&secret("ours")),
                TcpOptions::default(),
                Instant::now() + Duration::from_millis(500),
            )
            .unwrap_err();
        assert!(e.to_string().contains("has no job secret"), "{e}");
        let e = bare.finish(soon()).unwrap_err();
        assert!(e.to_string().contains("OXCCL_JOB_SECRET"), "{e}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod unsent_tests {
    use super::*;

    #[test]
    fn the_unsent_cap_is_left_off_links_within_the_host() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(same_host(&s));
        let options = TcpOptions {
            unsent_limit: Some(128 << 10),
            ..TcpOptions::default()
        };
        options.apply(&s).unwrap();
        assert_eq!(crate::sockopt::tcp_notsent_lowat(&s).unwrap(), 0);
        assert!(s.nodelay().unwrap());
    }
}
