//! Connection authentication: both ends of every connection oxccl makes or
//! accepts (the TCP store, ring and pair links) prove that they know the
//! job's secret before any other byte on it is trusted.
//!
//! # Protocol
//!
//! Each side sends a greeting at once, without waiting for the other's:
//!
//! | bytes | field |
//! |---|---|
//! | 6 | magic `OXAUTH` |
//! | 2 | version (u16, [`VERSION`]) |
//! | 1 | mode: 0 no secret, 1 HMAC-SHA-256 |
//! | 7 | reserved (zero) |
//! | 32 | nonce, fresh random bytes |
//!
//! When both sides have a secret, each then sends a 32-byte proof,
//! `HMAC-SHA-256(key, "oxccl-auth-v1" || role || own nonce || peer nonce ||
//! u32 context length || context)`, where role is 1 for the connecting side
//! and 2 for the accepting side (a proof reflected back is refused) and the
//! context binds the purpose (the store, or a link to a given rank). Each
//! side checks the other's proof in constant time ([`Mac::verify_slice`]).
//! The secret never crosses the wire, and a recorded proof is worthless
//! against a fresh nonce.
//!
//! When neither side has a secret the greetings are all: the connection goes
//! on unauthenticated (`OXCCL_AUTH=off`, or `auto` without a secret). When
//! one has a secret and the other not, both say so by name instead of
//! failing with a generic error later. A peer whose first bytes are another
//! oxccl format (an older build that does not authenticate), or no oxccl
//! format at all, is told apart from one whose secret differs.
//!
//! [`Handshake`] is the protocol as a state machine without I/O, which the
//! nonblocking accept loop of [`tcp`](crate::tcp) drives; [`authenticate`]
//! drives it over a blocking socket with a deadline.

#![deny(unsafe_code)]

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::codec::{DecodeError, Reader, Writer};

type HmacSha256 = Hmac<Sha256>;

/// First bytes of a greeting.
pub const MAGIC: [u8; 6] = *b"OXAUTH";
/// Version of the authentication protocol.
pub const VERSION: u16 = 1;
/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a greeting.
pub const GREETING_LEN: usize = 48;
/// Bytes of a proof.
pub const PROOF_LEN: usize = 32;
/// Bytes of a greeting read before its magic and version are checked, so
/// that a peer of another format is told apart before its message is whole.
const HEAD_LEN: usize = 8;
/// Every proof starts with it.
const LABEL: &[u8] = b"oxccl-auth-v1";
/// The format's name in decoding errors.
const FORMAT: &str = "auth greeting";
/// The longest context accepted (contexts are short labels).
const MAX_CONTEXT: usize = 256;

const MODE_NONE: u8 = 0;
const MODE_HMAC: u8 = 1;

/// A job's secret: the 32-byte key both ends of a connection prove they know.
///
/// Its `Debug` form does not show the key.
#[derive(Clone, PartialEq, Eq)]
pub struct JobSecret {
    key: [u8; 32],
}

impl fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JobSecret(..)")
    }
}

impl JobSecret {
    /// The secret whose key is `key` (as a [`UniqueId`] carries it).
    ///
    /// [`UniqueId`]: https://docs.rs/oxccl
    pub fn from_key(key: [u8; 32]) -> JobSecret {
        JobSecret { key }
    }

    /// The key.
    pub fn key(&self) -> &[u8; 32] {
        &self.key
    }

    /// The secret a text names (`OXCCL_JOB_SECRET`, or a secret file's
    /// contents): surrounding white space is dropped; text of at least 32
    /// hex digits (an even count) is read as the bytes it spells, any other
    /// text as its UTF-8 bytes; the key is SHA-256 of those bytes under a
    /// domain label. So `oxrun`'s hex secrets and passphrases both work,
    /// and every rank given the same text derives the same key.
    pub fn from_text(text: &str) -> Result<JobSecret, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("is empty".into());
        }
        let material = decode_hex(text).unwrap_or_else(|| text.as_bytes().to_vec());
        let mut h = Sha256::new();
        h.update(b"oxccl-job-secret-v1\0");
        h.update(&material);
        Ok(JobSecret {
            key: h.finalize().into(),
        })
    }

    /// A fresh random secret.
    pub fn random() -> Result<JobSecret, AuthError> {
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).map_err(|e| AuthError::Randomness(e.to_string()))?;
        Ok(JobSecret { key })
    }

    /// Fresh random text for `OXCCL_JOB_SECRET`: 32 random bytes as 64 hex
    /// digits (what `oxrun` gives its ranks).
    pub fn random_text() -> Result<String, AuthError> {
        Ok(hex(JobSecret::random()?.key()))
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let b = text.as_bytes();
    if b.len() < 32 || b.len() % 2 != 0 {
        return None;
    }
    b.chunks(2)
        .map(|p| {
            let s = std::str::from_utf8(p).ok()?;
            u8::from_str_radix(s, 16).ok()
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Which end of the connection a side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that connected.
    Connecting,
    /// The side that accepted.
    Accepting,
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Connecting => 1,
            Role::Accepting => 2,
        }
    }

    fn other(self) -> Role {
        match self {
            Role::Connecting => Role::Accepting,
            Role::Accepting => Role::Connecting,
        }
    }
}

/// Why a connection was not authenticated. Every message names the peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The peer's proof is wrong: it does not know this job's secret.
    #[error(
        "{peer} belongs to another job: its secret differs from this rank's \
         (every rank of a job needs the same OXCCL_JOB_SECRET)"
    )]
    WrongSecret {
        /// The peer, as in "rank 0 at 10.0.0.1:29500".
        peer: String,
    },
    /// The peer speaks no oxccl format at all.
    #[error("{peer} is not an oxccl peer: {why}")]
    NotOxccl {
        /// The peer.
        peer: String,
        /// What it sent instead.
        why: String,
    },
    /// The peer speaks oxccl but opens with another format: a build that
    /// does not authenticate connections.
    #[error(
        "{peer} is an oxccl build that does not authenticate connections; \
         every rank must run the same oxccl"
    )]
    Unauthenticating {
        /// The peer.
        peer: String,
    },
    /// The peer speaks another version of this protocol.
    #[error("{peer} speaks authentication version {theirs}, this rank speaks {ours}")]
    Version {
        /// The peer.
        peer: String,
        /// Its version.
        theirs: u16,
        /// Ours.
        ours: u16,
    },
    /// This side has a secret and the peer has none.
    #[error(
        "{peer} has no job secret (OXCCL_AUTH=off there, or no OXCCL_JOB_SECRET), \
         but this rank authenticates: every rank of a job needs the same secret"
    )]
    PeerHasNoSecret {
        /// The peer.
        peer: String,
    },
    /// The peer has a secret and this side has none.
    #[error(
        "{peer} authenticates with a job secret but this rank has none: set \
         OXCCL_JOB_SECRET (or OXCCL_JOB_SECRET_FILE) to the job's secret on every rank"
    )]
    NoSecretHere {
        /// The peer.
        peer: String,
    },
    /// The peer's greeting breaks the format.
    #[error("{peer} sent a malformed authentication greeting: {source}")]
    Malformed {
        /// The peer.
        peer: String,
        /// What is wrong with it.
        #[source]
        source: Box<DecodeError>,
    },
    /// The peer closed the connection before authentication was done.
    #[error("{peer} closed the connection during authentication")]
    Closed {
        /// The peer.
        peer: String,
    },
    /// The deadline passed before authentication was done.
    #[error("{peer} did not complete authentication within {waited:.1?}")]
    Timeout {
        /// The peer.
        peer: String,
        /// How long it was given.
        waited: Duration,
    },
    /// The connection failed.
    #[error("authenticating {peer}: {source}")]
    Io {
        /// The peer.
        peer: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// No random bytes for a nonce or a secret.
    #[error("no randomness for authentication: {0}")]
    Randomness(String),
}

impl AuthError {
    /// Whether the peer proved it has another secret: a rank of another job.
    pub fn is_wrong_secret(&self) -> bool {
        matches!(self, AuthError::WrongSecret { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the peer's greeting.
    Greeting,
    /// Reading the peer's proof.
    Proof { peer_nonce: [u8; NONCE_LEN] },
    /// Done: authenticated when `checked`.
    Done { checked: bool },
}

/// One side of the handshake, without I/O: send [`output`](Self::output),
/// read exactly [`input`](Self::input)'s length of bytes into it and pass
/// their count to [`received`](Self::received), until [`is_done`](Self::is_done).
/// It never asks for a byte past its own messages, so the stream carries
/// what follows untouched.
pub struct Handshake {
    role: Role,
    secret: Option<JobSecret>,
    context: Vec<u8>,
    nonce: [u8; NONCE_LEN],
    peer: String,
    out: Vec<u8>,
    buf: [u8; GREETING_LEN],
    filled: usize,
    state: State,
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshake")
            .field("role", &self.role)
            .field("authenticating", &self.secret.is_some())
            .field("peer", &self.peer)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// Starts the handshake of `role` with `secret` (none: unauthenticated)
    /// for a connection of `context` (the same on both sides) to `peer`
    /// (named in errors). Its greeting is ready in [`output`](Self::output).
    pub fn new(
        role: Role,
        secret: Option<&JobSecret>,
        context: &[u8],
        peer: impl Into<String>,
    ) -> Result<Handshake, AuthError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|e| AuthError::Randomness(e.to_string()))?;
        Ok(Handshake::with_nonce(role, secret, context, peer, nonce))
    }

    /// [`new`](Self::new) with a given nonce (tests replay with it).
    fn with_nonce(
        role: Role,
        secret: Option<&JobSecret>,
        context: &[u8],
        peer: impl Into<String>,
        nonce: [u8; NONCE_LEN],
    ) -> Handshake {
        let mode = if secret.is_some() {
            MODE_HMAC
        } else {
            MODE_NONE
        };
        let mut w = Writer::with_capacity(GREETING_LEN);
        w.bytes(&MAGIC).u16(VERSION).u8(mode).zeros(7).bytes(&nonce);
        Handshake {
            role,
            secret: secret.cloned(),
            context: context[..context.len().min(MAX_CONTEXT)].to_vec(),
            nonce,
            peer: peer.into(),
            out: w.into_bytes(),
            buf: [0; GREETING_LEN],
            filled: 0,
            state: State::Greeting,
        }
    }

    /// The peer, as errors name it.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Bytes to send now (empty when there are none).
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Marks the first `n` bytes of [`output`](Self::output) as sent.
    pub fn sent(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
    }

    /// Where to read the next bytes into: exactly as many as the handshake
    /// still needs of the current message (empty when done).
    pub fn input(&mut self) -> &mut [u8] {
        let want = match self.state {
            State::Greeting if self.filled < HEAD_LEN => HEAD_LEN,
            State::Greeting => GREETING_LEN,
            State::Proof { .. } => PROOF_LEN,
            State::Done { .. } => self.filled,
        };
        &mut self.buf[self.filled..want]
    }

    /// Whether the handshake is over (successfully).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done { .. })
    }

    /// Whether both sides proved they know the secret (false when the
    /// handshake is not done, or neither side had a secret).
    pub fn authenticated(&self) -> bool {
        matches!(self.state, State::Done { checked: true })
    }

    /// Takes `n` bytes read into [`input`](Self::input). An error is final:
    /// the connection must be closed. A count past what `input` asked for
    /// counts as all of it (the bytes beyond were never in the buffer).
    pub fn received(&mut self, n: usize) -> Result<(), AuthError> {
        let before = self.filled;
        let asked = self.input().len();
        self.filled += n.min(asked);
        match self.state {
            State::Greeting => {
                if before < HEAD_LEN && self.filled >= HEAD_LEN {
                    self.check_head()?;
                }
                if self.filled == GREETING_LEN {
                    self.take_greeting()?;
                }
            }
            State::Proof { peer_nonce } => {
                if self.filled == PROOF_LEN {
                    self.check_proof(&peer_nonce)?;
                }
            }
            State::Done { .. } => {}
        }
        Ok(())
    }

    /// Checks the greeting's magic and version as soon as they are here.
    fn check_head(&self) -> Result<(), AuthError> {
        let head = &self.buf[..HEAD_LEN];
        if head[..MAGIC.len()] != MAGIC {
            if head.starts_with(b"OXCCL") {
                return Err(AuthError::Unauthenticating {
                    peer: self.peer.clone(),
                });
            }
            return Err(AuthError::NotOxccl {
                peer: self.peer.clone(),
                why: format!(
                    "its first bytes are 0x{} ({:?}), not an oxccl greeting",
                    hex(head),
                    String::from_utf8_lossy(head)
                ),
            });
        }
        let theirs = u16::from_le_bytes([head[6], head[7]]);
        if theirs != VERSION {
            return Err(AuthError::Version {
                peer: self.peer.clone(),
                theirs,
                ours: VERSION,
            });
        }
        Ok(())
    }

    fn take_greeting(&mut self) -> Result<(), AuthError> {
        let malformed = |source| AuthError::Malformed {
            peer: self.peer.clone(),
            source: Box::new(source),
        };
        let (mode, peer_nonce) = (|| -> Result<(u8, [u8; NONCE_LEN]), DecodeError> {
            let mut r = Reader::new(FORMAT, &self.buf);
            r.magic(&MAGIC)?;
            r.u16("version")?;
            let mode = r.u8("mode")?;
            if mode != MODE_NONE && mode != MODE_HMAC {
                return Err(r.invalid("mode", format!("unknown mode {mode}")));
            }
            r.skip("reserved", 7)?;
            let nonce = r.array("nonce")?;
            r.finish()?;
            Ok((mode, nonce))
        })()
        .map_err(malformed)?;
        if peer_nonce == self.nonce {
            return Err(AuthError::NotOxccl {
                peer: self.peer.clone(),
                why: "it sent this side's own greeting back (an echo)".into(),
            });
        }
        self.filled = 0;
        match (&self.secret, mode) {
            (None, MODE_NONE) => {
                self.state = State::Done { checked: false };
                Ok(())
            }
            (Some(_), MODE_NONE) => Err(AuthError::PeerHasNoSecret {
                peer: self.peer.clone(),
            }),
            (None, _) => Err(AuthError::NoSecretHere {
                peer: self.peer.clone(),
            }),
            (Some(secret), _) => {
                let proof = proof(secret, self.role, &self.nonce, &peer_nonce, &self.context)
                    .finalize()
                    .into_bytes();
                self.out.extend_from_slice(&proof);
                self.state = State::Proof { peer_nonce };
                Ok(())
            }
        }
    }

    fn check_proof(&mut self, peer_nonce: &[u8; NONCE_LEN]) -> Result<(), AuthError> {
        let Some(secret) = &self.secret else {
            return Err(AuthError::NoSecretHere {
                peer: self.peer.clone(),
            });
        };
        proof(
            secret,
            self.role.other(),
            peer_nonce,
            &self.nonce,
            &self.context,
        )
        .verify_slice(&self.buf[..PROOF_LEN])
        .map_err(|_| AuthError::WrongSecret {
            peer: self.peer.clone(),
        })?;
        self.filled = 0;
        self.state = State::Done { checked: true };
        Ok(())
    }
}

/// The MAC of `role`'s proof: it proves `own` (its nonce) answers `peer`'s.
fn proof(
    secret: &JobSecret,
    role: Role,
    own: &[u8; NONCE_LEN],
    peer: &[u8; NONCE_LEN],
    context: &[u8],
) -> HmacSha256 {
    // HMAC takes keys of any length; 32 bytes cannot fail.
    let mut mac = match <HmacSha256 as Mac>::new_from_slice(secret.key()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts a key of any length"),
    };
    mac.update(LABEL);
    mac.update(&[role.code()]);
    mac.update(own);
    mac.update(peer);
    mac.update(&(context.len() as u32).to_le_bytes());
    mac.update(context);
    mac
}

/// Runs `hs` to its end over a blocking `stream` before `deadline`; returns
/// whether the peer was authenticated (false: neither side has a secret).
/// The stream's timeouts are put back as they were.
pub fn drive(stream: &TcpStream, hs: &mut Handshake, deadline: Instant) -> Result<bool, AuthError> {
    let start = Instant::now();
    let io = |peer: &str, source| AuthError::Io {
        peer: peer.to_owned(),
        source,
    };
    let saved = (
        stream.read_timeout().map_err(|e| io(hs.peer(), e))?,
        stream.write_timeout().map_err(|e| io(hs.peer(), e))?,
    );
    let result = run(stream, hs, deadline, start);
    // Put the caller's timeouts back even after a failure (best effort then).
    let restored = stream
        .set_read_timeout(saved.0)
        .and_then(|()| stream.set_write_timeout(saved.1));
    let authenticated = result?;
    restored.map_err(|e| io(hs.peer(), e))?;
    Ok(authenticated)
}

fn run(
    stream: &TcpStream,
    hs: &mut Handshake,
    deadline: Instant,
    start: Instant,
) -> Result<bool, AuthError> {
    let timeout = |hs: &Handshake| AuthError::Timeout {
        peer: hs.peer().to_owned(),
        waited: start.elapsed(),
    };
    let io = |hs: &Handshake, source| AuthError::Io {
        peer: hs.peer().to_owned(),
        source,
    };
    loop {
        while !hs.output().is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timeout(hs));
            }
            stream
                .set_write_timeout(Some(left))
                .map_err(|e| io(hs, e))?;
            match (&*stream).write(hs.output()) {
                Ok(0) => {
                    return Err(AuthError::Closed {
                        peer: hs.peer().to_owned(),
                    });
                }
                Ok(n) => hs.sent(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(timeout(hs));
                }
                Err(e) if closed(&e) => {
                    return Err(AuthError::Closed {
                        peer: hs.peer().to_owned(),
                    });
                }
                Err(e) => return Err(io(hs, e)),
            }
        }
        if hs.is_done() {
            return Ok(hs.authenticated());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timeout(hs));
        }
        stream.set_read_timeout(Some(left)).map_err(|e| io(hs, e))?;
        match (&*stream).read(hs.input()) {
            Ok(0) => {
                return Err(AuthError::Closed {
                    peer: hs.peer().to_owned(),
                });
            }
            Ok(n) => hs.received(n)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if deadline <= Instant::now() {
                    return Err(timeout(hs));
                }
            }
            Err(e) if closed(&e) => {
                return Err(AuthError::Closed {
                    peer: hs.peer().to_owned(),
                });
            }
            Err(e) => return Err(io(hs, e)),
        }
    }
}

/// Whether `e` says the peer closed or reset the connection.
pub(crate) fn closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// Authenticates the connection `stream` as `role` with `secret` (none:
/// unauthenticated, which a peer with a secret refuses by name) for
/// `context`, before `deadline`; `peer` names the other end in errors.
/// Returns whether the peer proved it knows the secret.
pub fn authenticate(
    stream: &TcpStream,
    role: Role,
    secret: Option<&JobSecret>,
    context: &[u8],
    peer: &str,
    deadline: Instant,
) -> Result<bool, AuthError> {
    let mut hs = Handshake::new(role, secret, context, peer)?;
    drive(stream, &mut hs, deadline)
}

/// The context of a connection to the TCP store.
pub const STORE_CONTEXT: &[u8] = b"store";

/// The context of a link to the listener of rank `to`.
pub fn link_context(to: u32) -> Vec<u8> {
    let mut w = Writer::with_capacity(8);
    w.bytes(b"link").u32(to);
    w.into_bytes()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    fn secret(s: &str) -> JobSecret {
        JobSecret::from_text(s).unwrap()
    }

    /// Runs two handshakes against each other in memory.
    fn exchange(
        a: &mut Handshake,
        b: &mut Handshake,
    ) -> (Result<(), AuthError>, Result<(), AuthError>) {
        let mut ra = Ok(());
        let mut rb = Ok(());
        for _ in 0..8 {
            let to_b = a.output().to_vec();
            a.sent(to_b.len());
            let to_a = b.output().to_vec();
            b.sent(to_a.len());
            if rb.is_ok() {
                rb = feed(b, &to_b);
            }
            if ra.is_ok() {
                ra = feed(a, &to_a);
            }
            if (a.is_done() || ra.is_err()) && (b.is_done() || rb.is_err()) {
                break;
            }
        }
        (ra, rb)
    }

    /// Feeds bytes one at a time, as a slow stream would.
    fn feed(hs: &mut Handshake, mut bytes: &[u8]) -> Result<(), AuthError> {
        while !bytes.is_empty() && !hs.is_done() {
            let input = hs.input();
            if input.is_empty() {
                break;
            }
            input[0] = bytes[0];
            bytes = &bytes[1..];
            hs.received(1)?;
        }
        Ok(())
    }

    fn pair(a: Option<&JobSecret>, b: Option<&JobSecret>) -> (Handshake, Handshake) {
        (
            Handshake::new(Role::Connecting, a, b"ctx", "server").unwrap(),
            Handshake::new(Role::Accepting, b, b"ctx", "client").unwrap(),
        )
    }

    #[test]
    fn the_right_secret_authenticates_both_ways() {
        let s = secret("correct horse battery staple");
        let (mut a, mut b) = pair(Some(&s), Some(&s));
        let (ra, rb) = exchange(&mut a, &mut b);
        ra.unwrap();
        rb.unwrap();
        assert!(a.authenticated() && b.authenticated());
        assert!(a.input().is_empty() && b.output().is_empty());
    }

    #[test]
    fn a_wrong_secret_fails_on_both_sides_naming_another_job() {
        let (mut a, mut b) = pair(Some(&secret("job one")), Some(&secret("job two")));
        let (ra, rb) = exchange(&mut a, &mut b);
        for (e, who) in [(ra.unwrap_err(), "server"), (rb.unwrap_err(), "client")] {
            assert!(e.is_wrong_secret(), "{e}");
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("{who} belongs to another job")),
                "{msg}"
            );
            assert!(msg.contains("secret differs"), "{msg}");
        }
    }

    #[test]
    fn contexts_must_match() {
        let s = secret("x");
        let mut a = Handshake::new(Role::Connecting, Some(&s), &link_context(1), "a").unwrap();
        let mut b = Handshake::new(Role::Accepting, Some(&s), &link_context(2), "b").unwrap();
        let (ra, rb) = exchange(&mut a, &mut b);
        assert!(ra.unwrap_err().is_wrong_secret());
        assert!(rb.unwrap_err().is_wrong_secret());
    }

    #[test]
    fn no_secret_on_either_side_goes_on_unauthenticated() {
        let (mut a, mut b) = pair(None, None);
        let (ra, rb) = exchange(&mut a, &mut b);
        ra.unwrap();
        rb.unwrap();
        assert!(a.is_done() && !a.authenticated() && b.is_done() && !b.authenticated());
    }

    #[test]
    fn a_secret_on_one_side_only_is_named_on_both() {
        let s = secret("only here");
        let (mut a, mut b) = pair(Some(&s), None);
        let (ra, rb) = exchange(&mut a, &mut b);
        let ea = ra.unwrap_err();
        assert!(matches!(ea, AuthError::PeerHasNoSecret { .. }), "{ea}");
        assert!(ea.to_string().contains("server has no job secret"), "{ea}");
        let eb = rb.unwrap_err();
        assert!(matches!(eb, AuthError::NoSecretHere { .. }), "{eb}");
        assert!(eb.to_string().contains("OXCCL_JOB_SECRET"), "{eb}");
    }

    #[test]
    fn a_reflected_proof_is_refused() {
        // An attacker without the secret echoes our proof back with its own
        // greeting: the role in the MAC makes the reflection fail.
        let s = secret("s");
        let mut victim = Handshake::new(Role::Accepting, Some(&s), b"ctx", "attacker").unwrap();
        let greeting = victim.output().to_vec();
        victim.sent(greeting.len());
        let mut theirs = Handshake::new(Role::Connecting, None, b"ctx", "v").unwrap();
        let mut g = theirs.output().to_vec();
        theirs.sent(g.len());
        g[8] = MODE_HMAC;
        feed(&mut victim, &g).unwrap();
        let proof = victim.output().to_vec();
        assert_eq!(proof.len(), PROOF_LEN);
        let e = feed(&mut victim, &proof).unwrap_err();
        assert!(e.is_wrong_secret(), "{e}");
    }

    #[test]
    fn an_echoed_greeting_is_not_oxccl() {
        let s = secret("s");
        let mut hs = Handshake::new(Role::Accepting, Some(&s), b"ctx", "echo").unwrap();
        let g = hs.output().to_vec();
        let e = feed(&mut hs, &g).unwrap_err();
        assert!(matches!(e, AuthError::NotOxccl { .. }), "{e}");
    }

    #[test]
    fn a_replayed_response_fails_against_a_fresh_nonce() {
        let s = secret("s");
        // A recorded session: client nonce 1, server nonce 2.
        let mut client =
            Handshake::with_nonce(Role::Connecting, Some(&s), b"ctx", "server", [1; 32]);
        let mut server =
            Handshake::with_nonce(Role::Accepting, Some(&s), b"ctx", "client", [2; 32]);
        let client_greeting = client.output().to_vec();
        let (rc, rs) = exchange(&mut client, &mut server);
        rc.unwrap();
        rs.unwrap();
        // The attacker recorded the client's greeting and proof (greeting
        // then the proof it sent after seeing the server's nonce 2).
        let recorded_proof = proof(&s, Role::Connecting, &[1; 32], &[2; 32], b"ctx")
            .finalize()
            .into_bytes()
            .to_vec();
        // Replayed to a server whose nonce is fresh: refused.
        let mut fresh = Handshake::new(Role::Accepting, Some(&s), b"ctx", "replayer").unwrap();
        feed(&mut fresh, &client_greeting).unwrap();
        assert_eq!(fresh.output().len(), GREETING_LEN + PROOF_LEN);
        let e = feed(&mut fresh, &recorded_proof).unwrap_err();
        assert!(e.is_wrong_secret(), "{e}");
        // The same replay against the recorded server nonce would pass:
        // the nonce is what refuses it.
        let mut same = Handshake::with_nonce(Role::Accepting, Some(&s), b"ctx", "r", [2; 32]);
        feed(&mut same, &client_greeting).unwrap();
        feed(&mut same, &recorded_proof).unwrap();
        assert!(same.authenticated());
    }

    #[test]
    fn other_greetings_are_told_apart() {
        let s = secret("s");
        let try_bytes = |b: &[u8]| {
            let mut hs = Handshake::new(Role::Accepting, Some(&s), b"ctx", "peer").unwrap();
            feed(&mut hs, b).unwrap_err()
        };
        let e = try_bytes(b"GET / HTTP/1.1\r\n");
        assert!(matches!(e, AuthError::NotOxccl { .. }), "{e}");
        assert!(e.to_string().contains("not an oxccl peer"), "{e}");
        // A ring hello or a store handshake of a build that does not authenticate.
        let e = try_bytes(b"OXCCL\0\0\0");
        assert!(matches!(e, AuthError::Unauthenticating { .. }), "{e}");
        let e = try_bytes(b"OXCCLKV\0\x01\0");
        assert!(matches!(e, AuthError::Unauthenticating { .. }), "{e}");
        // Another version of this protocol.
        let e = try_bytes(b"OXAUTH\x02\0");
        assert!(
            matches!(
                e,
                AuthError::Version {
                    theirs: 2,
                    ours: 1,
                    ..
                }
            ),
            "{e}"
        );
        // Right head, unknown mode.
        let mut g = Handshake::new(Role::Connecting, Some(&s), b"ctx", "x")
            .unwrap()
            .output()
            .to_vec();
        g[8] = 9;
        let e = try_bytes(&g);
        assert!(matches!(e, AuthError::Malformed { .. }), "{e}");
    }

    #[test]
    fn secrets_from_text() {
        let hexed = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        // Hex is read as bytes, so case does not matter; other text as text.
        assert_eq!(
            secret(hexed),
            secret(&hexed.to_uppercase()),
            "hex is case-insensitive"
        );
        assert_eq!(secret(&format!(" {hexed}\n")), secret(hexed));
        assert_ne!(secret("pass phrase"), secret("pass phrasf"));
        assert_ne!(secret(hexed).key(), &[0u8; 32]);
        assert!(JobSecret::from_text("  \n").is_err());
        let r = JobSecret::random_text().unwrap();
        assert_eq!(r.len(), 64);
        assert_ne!(r, JobSecret::random_text().unwrap());
        assert_eq!(format!("{:?}", secret(hexed)), "JobSecret(..)");
    }

    /// A connected pair of sockets.
    fn sockets() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[test]
    fn over_sockets_both_ways() {
        let (c, s) = sockets();
        let k = secret("k");
        let k2 = k.clone();
        let t = std::thread::spawn(move || {
            authenticate(
                &s,
                Role::Accepting,
                Some(&k2),
                STORE_CONTEXT,
                "client",
                soon(5000),
            )
        });
        assert!(
            authenticate(
                &c,
                Role::Connecting,
                Some(&k),
                STORE_CONTEXT,
                "server",
                soon(5000)
            )
            .unwrap()
        );
        assert!(t.join().unwrap().unwrap());
        // Nothing more was read or written: the stream is free for what follows.
        (&c).write_all(b"after").unwrap();
    }

    #[test]
    fn over_sockets_a_wrong_secret_fails_both_sides_within_the_deadline() {
        let (c, s) = sockets();
        let t = std::thread::spawn(move || {
            authenticate(
                &s,
                Role::Accepting,
                Some(&secret("a")),
                b"c",
                "client",
                soon(2000),
            )
        });
        let start = Instant::now();
        let e = authenticate(
            &c,
            Role::Connecting,
            Some(&secret("b")),
            b"c",
            "rank 0 at x",
            soon(2000),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("rank 0 at x belongs to another job"),
            "{e}"
        );
        assert!(t.join().unwrap().unwrap_err().is_wrong_secret());
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_silent_peer_times_out_at_the_deadline() {
        let (c, _s) = sockets();
        let start = Instant::now();
        let e = authenticate(
            &c,
            Role::Connecting,
            Some(&secret("k")),
            b"c",
            "silent",
            soon(200),
        )
        .unwrap_err();
        assert!(matches!(e, AuthError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("silent did not complete"), "{e}");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[test]
    fn a_peer_that_closes_mid_handshake_is_named() {
        let (c, s) = sockets();
        // Half a greeting, then the peer is gone.
        let g = Handshake::new(Role::Accepting, Some(&secret("k")), b"c", "x")
            .unwrap()
            .output()
            .to_vec();
        (&s).write_all(&g[..20]).unwrap();
        drop(s);
        let e = authenticate(
            &c,
            Role::Connecting,
            Some(&secret("k")),
            b"c",
            "quitter",
            soon(2000),
        )
        .unwrap_err();
        assert!(matches!(e, AuthError::Closed { .. }), "{e}");
        assert!(e.to_string().contains("quitter closed"), "{e}");
    }

    #[test]
    fn a_peer_that_closes_after_the_greeting_is_named() {
        let (c, s) = sockets();
        let t = std::thread::spawn(move || {
            let mut hs = Handshake::new(Role::Accepting, Some(&secret("k")), b"c", "x").unwrap();
            (&s).write_all(hs.output()).unwrap();
            let mut g = [0u8; GREETING_LEN];
            (&s).read_exact(&mut g).unwrap();
            hs.sent(GREETING_LEN);
        });
        let e = authenticate(
            &c,
            Role::Connecting,
            Some(&secret("k")),
            b"c",
            "quitter",
            soon(2000),
        )
        .unwrap_err();
        t.join().unwrap();
        assert!(matches!(e, AuthError::Closed { .. }), "{e}");
    }

    #[test]
    fn garbage_is_refused_at_once() {
        let (c, s) = sockets();
        (&s).write_all(&[0xAB; 64]).unwrap();
        let start = Instant::now();
        let e = authenticate(
            &c,
            Role::Connecting,
            Some(&secret("k")),
            b"c",
            "noise",
            soon(5000),
        )
        .unwrap_err();
        assert!(matches!(e, AuthError::NotOxccl { .. }), "{e}");
        assert!(e.to_string().contains("0xabababab"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
