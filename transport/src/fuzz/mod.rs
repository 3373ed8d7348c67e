//! Fuzz targets of every decoder of untrusted bytes in this crate, and of
//! the state machines that peers drive (the auth handshake, a store
//! server's session, a shared-memory ring's peer-written words).
//!
//! Coverage-guided fuzzing (cargo-fuzz) is not available here (see the
//! README's reliability section), so these are proptest targets: arbitrary
//! bytes, valid encodings with mutations (bit flips, edge values in fields,
//! truncation, extension), and round trips of valid values. Each asserts
//! that nothing panics, that errors are typed and name their format (or
//! their peer), and that what decodes is what was meant. `OXCCL_FUZZ_CASES`
//! sets the cases of every target (default [`mutate::DEFAULT_CASES`]); the
//! README has the long run's command and counts.

#![allow(clippy::unwrap_used)]

pub(crate) mod mutate;

use std::io::{ErrorKind, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use crate::auth::{self, AuthError, GREETING_LEN, Handshake, JobSecret, PROOF_LEN, Role};
use crate::codec::{DecodeError, Prefix, Reader};
use crate::shm::handshake::{AnswerHead, OfferHead};
use crate::shm::{MIN_CAPACITY, Policy};
use crate::store::tcp::{
    self, ReadError, Request, read_add_reply, read_fixed, read_set_reply, read_value_reply,
};
use crate::store::{Store, StoreError, TcpStore, TcpStoreServer, torch};
use crate::wire::{DESCRIPTOR_LEN, FrameHeader, Hello, HelloReply, Tag};
use crate::{Link, TransportError};
use mutate::{any_bytes, config, config_scaled, edge_u64, mutate, mutations};

/// Asserts that `e` is an error of `format` whose message starts with it.
fn named(e: &DecodeError, format: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(e.format(), format, "{}", e);
    prop_assert!(e.to_string().starts_with(format), "{}", e);
    Ok(())
}

/// Decodes all of `b` as one message of `format` with `read`.
fn whole<T>(
    format: &'static str,
    b: &[u8],
    read: impl FnOnce(&mut Reader<'_>) -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    let mut r = Reader::new(format, b);
    let v = read(&mut r)?;
    r.finish()?;
    Ok(v)
}

/// A stream's read error: the input ended (a truncation), or a decoding
/// error of `format`.
fn stream_error(e: &ReadError, format: &str) -> Result<(), TestCaseError> {
    match e {
        ReadError::Io(io) => {
            prop_assert_eq!(io.kind(), ErrorKind::UnexpectedEof, "{}", io);
            Ok(())
        }
        ReadError::Decode(d) => named(d, format),
    }
}

fn frame_header() -> impl Strategy<Value = FrameHeader> {
    (
        edge_u64(),
        edge_u64(),
        edge_u64(),
        edge_u64(),
        any::<[u8; DESCRIPTOR_LEN]>(),
    )
        .prop_map(|(seq, step, slice, len, descriptor)| FrameHeader {
            tag: Tag {
                seq,
                step: step as u32,
                slice: slice as u32,
            },
            len: len as u32,
            descriptor,
        })
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        any::<u16>(),
        edge_u64(),
        edge_u64(),
        edge_u64(),
        edge_u64(),
        edge_u64(),
    )
        .prop_map(|(version, job, world, from, to, purpose)| Hello {
            version,
            job,
            world: world as u32,
            from: from as u32,
            to: to as u32,
            purpose: purpose as u32,
        })
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![".{0,12}", "[a-z/]{0,4}"]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (key(), any_bytes(64)).prop_map(|(key, value)| Request::Set { key, value }),
        (key(), edge_u64()).prop_map(|(key, wait_ms)| Request::Get { key, wait_ms }),
        key().prop_map(|key| Request::TryGet { key }),
        (key(), edge_u64()).prop_map(|(key, d)| Request::Add {
            key,
            delta: d as i64
        }),
    ]
}

/// Reads a whole request (op byte and body) from `bytes`; returns it and
/// the bytes it took.
fn read_request(bytes: &[u8]) -> Result<(Request, usize), ReadError> {
    let mut r = bytes;
    let op = read_fixed::<1, _>(&mut r, tcp::REQUEST, |d| d.u8("op"))?;
    let request = Request::read(op, &mut r)?;
    Ok((request, bytes.len() - r.len()))
}

/// A reader of codec primitives, for driving a [`Reader`] at random.
#[derive(Debug, Clone)]
enum ReadOp {
    U8,
    U16,
    U32,
    U64,
    I64,
    U64Usize,
    Bytes(usize),
    Skip(usize),
    LenPrefix(Prefix, usize),
    Count(Prefix, usize),
    BytesPrefixed(Prefix, usize),
    StrPrefixed(Prefix, usize),
    Str(usize),
    Magic(Vec<u8>),
}

fn prefix() -> impl Strategy<Value = Prefix> {
    prop_oneof![
        Just(Prefix::U8),
        Just(Prefix::U16),
        Just(Prefix::U32),
        Just(Prefix::U64)
    ]
}

fn read_op() -> impl Strategy<Value = ReadOp> {
    let n = prop_oneof![0usize..80, Just(usize::MAX), any::<usize>()];
    prop_oneof![
        Just(ReadOp::U8),
        Just(ReadOp::U16),
        Just(ReadOp::U32),
        Just(ReadOp::U64),
        Just(ReadOp::I64),
        Just(ReadOp::U64Usize),
        n.clone().prop_map(ReadOp::Bytes),
        n.clone().prop_map(ReadOp::Skip),
        (prefix(), n.clone()).prop_map(|(p, m)| ReadOp::LenPrefix(p, m)),
        (prefix(), n.clone()).prop_map(|(p, m)| ReadOp::Count(p, m)),
        (prefix(), n.clone()).prop_map(|(p, m)| ReadOp::BytesPrefixed(p, m)),
        (prefix(), n.clone()).prop_map(|(p, m)| ReadOp::StrPrefixed(p, m)),
        n.prop_map(ReadOp::Str),
        proptest::collection::vec(any::<u8>(), 0..10).prop_map(ReadOp::Magic),
    ]
}

// ------------------------------------------------------------ auth handshake

fn secret(n: u8) -> JobSecret {
    JobSecret::from_key([n; 32])
}

/// Feeds `input` to `hs` in pieces of the sizes in `chunks` (cycled),
/// claiming `extra` more bytes than were put in when a piece fills what the
/// handshake asked for. Stops when the handshake is done, fails or the input
/// is spent; every step takes at least one byte, so it ends.
fn feed(
    hs: &mut Handshake,
    input: &[u8],
    chunks: &[usize],
    extra: usize,
) -> Result<(), TestCaseError> {
    let mut pos = 0;
    let mut step = 0;
    while !hs.is_done() && pos < input.len() {
        prop_assert!(hs.output().len() <= GREETING_LEN + PROOF_LEN);
        let want = hs.input().len();
        prop_assert!(want > 0, "a handshake that is not done asks for nothing");
        let c = chunks[step % chunks.len()]
            .max(1)
            .min(want)
            .min(input.len() - pos);
        step += 1;
        hs.input()[..c].copy_from_slice(&input[pos..pos + c]);
        pos += c;
        let claimed = if c == want {
            c.saturating_add(extra)
        } else {
            c
        };
        if let Err(e) = hs.received(claimed) {
            prop_assert!(e.to_string().contains("fuzz peer"), "{}", e);
            prop_assert!(!hs.is_done());
            return Ok(());
        }
    }
    if hs.is_done() {
        prop_assert!(hs.input().is_empty());
    }
    Ok(())
}

/// How one side's handshake ended (`None`: it had not when the exchange stopped).
type Outcome = Option<Result<(), AuthError>>;

/// Runs two handshakes against each other, passing bytes in pieces of the
/// sizes in `chunks`; returns each side's outcome (`None`: still running
/// when the other failed).
fn exchange(a: &mut Handshake, b: &mut Handshake, chunks: &[usize]) -> (Outcome, Outcome) {
    let mut step = 0;
    let mut results: [Outcome; 2] = [None, None];
    // Each round moves at least one byte while either side has output; the
    // two messages of each side are 80 bytes at most.
    for _ in 0..400 {
        let mut moved = false;
        for i in [1, 0] {
            if results
                .iter()
                .any(|r| r.as_ref().is_some_and(Result::is_err))
            {
                break;
            }
            // i: the side that receives.
            let (from, to) = if i == 1 {
                (&mut *a, &mut *b)
            } else {
                (&mut *b, &mut *a)
            };
            let want = to.input().len();
            let have = from.output().len();
            let c = chunks[step % chunks.len()].max(1).min(want).min(have);
            step += 1;
            if c == 0 {
                continue;
            }
            let bytes = from.output()[..c].to_vec();
            from.sent(c);
            to.input()[..c].copy_from_slice(&bytes);
            moved = true;
            match to.received(c) {
                Ok(()) if to.is_done() => results[i] = Some(Ok(())),
                Ok(()) => {}
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        if !moved {
            break;
        }
    }
    let [ra, rb] = results;
    (ra, rb)
}

// ------------------------------------------------------------ tcp store session

/// Panics in the store server's client threads, which no test joins.
static STORE_PANICS: AtomicUsize = AtomicUsize::new(0);

/// One server for every case of the session target (a server per case
/// would cost an accept loop each), with a hook that counts panics in its
/// threads.
fn store_server() -> &'static TcpStoreServer {
    static SERVER: OnceLock<TcpStoreServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("oxccl-store-"))
            {
                STORE_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
        TcpStoreServer::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap()
    })
}

/// What a fuzzed client sends after authenticating.
#[derive(Debug, Clone)]
enum Sent {
    /// A valid request (a `get` waits 20 ms at most).
    Request(Request),
    /// Bytes that start with any op byte but `get`'s (so that the server
    /// never waits long for a key), or none.
    Garbage(Vec<u8>),
}

fn sent() -> impl Strategy<Value = Sent> {
    prop_oneof![
        4 => request().prop_map(|r| match r {
            Request::Get { key, wait_ms } => Sent::Request(Request::Get { key, wait_ms: wait_ms % 20 }),
            r => Sent::Request(r),
        }),
        1 => any_bytes(40).prop_map(|mut b| {
            if b.first() == Some(&2) {
                b[0] = 0;
            }
            Sent::Garbage(b)
        }),
    ]
}

// ------------------------------------------------------------ shm ring

/// What a step of the ring target does.
#[derive(Debug, Clone)]
enum RingOp {
    /// The writer writes this many bytes, in up to three buffers.
    Write(Vec<usize>),
    /// The reader reads into buffers of these sizes.
    Read(Vec<usize>),
    /// A peer-written word gets a value (see `ShmLink::scribble`): written
    /// through the writer's or the reader's mapping.
    Scribble(bool, usize, u64),
    /// The writer sends buffers of at least this many bytes by single copy.
    SingleCopy(Option<usize>),
    /// The writer allows single copies or not.
    Allow(bool),
    /// The writer commits what it wrote.
    Commit,
    /// The writer withdraws a posted transfer.
    Withdraw,
}

fn ring_op() -> impl Strategy<Value = RingOp> {
    let len = prop_oneof![0usize..64, 0usize..3 * MIN_CAPACITY];
    prop_oneof![
        3 => proptest::collection::vec(len.clone(), 1..3).prop_map(RingOp::Write),
        3 => proptest::collection::vec(len, 1..3).prop_map(RingOp::Read),
        3 => (any::<bool>(), any::<usize>(), edge_u64()).prop_map(|(w, i, v)| RingOp::Scribble(w, i, v)),
        1 => prop_oneof![Just(None), (1usize..5000).prop_map(Some)].prop_map(RingOp::SingleCopy),
        1 => any::<bool>().prop_map(RingOp::Allow),
        1 => Just(RingOp::Commit),
        1 => Just(RingOp::Withdraw),
    ]
}

/// A link's error after a peer wrote bad words: a protocol error naming
/// the peer, or the link shut or closed.
fn ring_error(e: &TransportError, peer: usize) -> Result<(), TestCaseError> {
    let text = e.to_string();
    match e {
        TransportError::Protocol { peer: p, .. } => {
            prop_assert_eq!(*p, peer, "{}", text);
            prop_assert!(text.contains(&format!("rank {peer}")), "{}", text);
        }
        _ => prop_assert!(
            text.contains(&format!("rank {peer}")) || text.contains("shut"),
            "{}",
            text
        ),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    // -------------------------------------------------------- codec

    /// Any sequence of reads on any bytes: a value or a typed error naming
    /// the format, never a read past the end.
    #[test]
    fn fuzz_codec_reader(b in any_bytes(256), ops in proptest::collection::vec(read_op(), 0..12)) {
        let mut r = Reader::new("fuzz format", &b);
        for op in ops {
            let before = r.position();
            let result = match op {
                ReadOp::U8 => r.u8("f").map(|_| 1),
                ReadOp::U16 => r.u16("f").map(|_| 2),
                ReadOp::U32 => r.u32("f").map(|_| 4),
                ReadOp::U64 => r.u64("f").map(|_| 8),
                ReadOp::I64 => r.i64("f").map(|_| 8),
                ReadOp::U64Usize => r.u64_usize("f").map(|_| 8),
                ReadOp::Bytes(n) => r.bytes("f", n).map(|s| { assert_eq!(s.len(), n); n }),
                ReadOp::Skip(n) => r.skip("f", n).map(|()| n),
                ReadOp::LenPrefix(p, max) => r.len_prefix("f", p, max).map(|n| { assert!(n <= max); p.width() }),
                ReadOp::Count(p, item) => r.count("f", p, item).map(|n| {
                    assert!(n.saturating_mul(item.max(1)) <= b.len());
                    p.width()
                }),
                ReadOp::BytesPrefixed(p, max) => r.bytes_prefixed("f", p, max).map(|s| { assert!(s.len() <= max); p.width() + s.len() }),
                ReadOp::StrPrefixed(p, max) => r.str_prefixed("f", p, max).map(|s| { assert!(s.len() <= max); p.width() + s.len() }),
                ReadOp::Str(n) => r.str("f", n).map(|s| s.len()),
                ReadOp::Magic(m) => r.magic(&m).map(|()| m.len()),
            };
            prop_assert!(r.position() <= b.len());
            match result {
                Ok(n) => prop_assert_eq!(r.position(), before + n),
                Err(e) => named(&e, "fuzz format")?,
            }
        }
        let left = r.remaining();
        match r.finish() {
            Ok(()) => prop_assert_eq!(left, 0),
            Err(e) => {
                prop_assert_eq!(&e, &DecodeError::TrailingBytes { format: "fuzz format", count: left });
            }
        }
    }

    // -------------------------------------------------------- frame header

    #[test]
    fn fuzz_frame_header_arbitrary_bytes(b in any_bytes(96)) {
        match whole(FrameHeader::FORMAT, &b, FrameHeader::read) {
            // No padding: what decodes is exactly what encodes back.
            Ok(h) => prop_assert_eq!(&h.encode()[..], &b[..]),
            Err(e) => named(&e, FrameHeader::FORMAT)?,
        }
        if let Ok(a) = <[u8; FrameHeader::LEN]>::try_from(&b[..]) {
            match FrameHeader::parse(&a) {
                Ok(h) => prop_assert_eq!(h.encode(), a),
                Err(e) => prop_assert!(matches!(e, DecodeError::BadMagic { format: "frame header", .. }), "{}", e),
            }
        }
    }

    #[test]
    fn fuzz_frame_header_round_trip_and_mutations(h in frame_header(), ms in mutations()) {
        prop_assert_eq!(FrameHeader::parse(&h.encode()).unwrap(), h);
        let b = mutate(h.encode().to_vec(), &ms);
        match whole(FrameHeader::FORMAT, &b, FrameHeader::read) {
            Ok(d) => prop_assert_eq!(&d.encode()[..], &b[..]),
            Err(e) => named(&e, FrameHeader::FORMAT)?,
        }
    }

    // -------------------------------------------------------- hello

    #[test]
    fn fuzz_hello_arbitrary_bytes(b in any_bytes(96)) {
        match whole(Hello::FORMAT, &b, Hello::read) {
            Ok(h) => {
                prop_assert_eq!(b.len(), Hello::LEN);
                prop_assert_eq!(&b[..8], &crate::wire::MAGIC[..]);
                prop_assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
            }
            Err(e) => named(&e, Hello::FORMAT)?,
        }
        match whole(HelloReply::FORMAT, &b, HelloReply::read) {
            Ok(r) => prop_assert_eq!(&r.encode()[..], &b[..]),
            Err(e) => named(&e, HelloReply::FORMAT)?,
        }
    }

    #[test]
    fn fuzz_hello_round_trip_and_mutations(h in hello(), code in edge_u64(), ms in mutations()) {
        prop_assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let reply = if code == 0 { HelloReply::Accept } else { HelloReply::Refuse(code as u32 | 1) };
        prop_assert_eq!(HelloReply::decode(&reply.encode()).unwrap(), reply);
        let b = mutate(h.encode().to_vec(), &ms);
        match whole(Hello::FORMAT, &b, Hello::read) {
            Ok(d) => prop_assert_eq!(Hello::decode(&d.encode()).unwrap(), d),
            Err(e) => named(&e, Hello::FORMAT)?,
        }
        let b = mutate(reply.encode().to_vec(), &ms);
        match whole(HelloReply::FORMAT, &b, HelloReply::read) {
            Ok(d) => prop_assert_eq!(&d.encode()[..], &b[..]),
            Err(e) => named(&e, HelloReply::FORMAT)?,
        }
    }

    // -------------------------------------------------------- tcp store

    #[test]
    fn fuzz_tcp_store_request_arbitrary_bytes(b in any_bytes(128)) {
        match read_request(&b) {
            // No padding: the bytes taken are the request's encoding.
            Ok((r, took)) => prop_assert_eq!(r.encode().unwrap(), &b[..took]),
            Err(e) => stream_error(&e, tcp::REQUEST)?,
        }
    }

    #[test]
    fn fuzz_tcp_store_request_round_trip_and_mutations(r in request(), ms in mutations()) {
        let bytes = r.encode().unwrap();
        let (back, took) = read_request(&bytes).unwrap();
        prop_assert_eq!(back, r);
        prop_assert_eq!(took, bytes.len());
        let b = mutate(bytes, &ms);
        match read_request(&b) {
            Ok((r, took)) => prop_assert_eq!(r.encode().unwrap(), &b[..took]),
            Err(e) => stream_error(&e, tcp::REQUEST)?,
        }
    }

    /// Replies as a client reads them: any bytes, read as a random sequence
    /// of the three kinds of reply.
    #[test]
    fn fuzz_tcp_store_replies(b in any_bytes(128), kinds in proptest::collection::vec(0u8..3, 1..6)) {
        let mut r = &b[..];
        for k in kinds {
            let result = match k {
                0 => read_value_reply(&mut r).map(drop),
                1 => read_set_reply(&mut r),
                _ => read_add_reply(&mut r).map(drop),
            };
            if let Err(e) = result {
                stream_error(&e, tcp::REPLY)?;
                break;
            }
        }
    }

    /// The store server's handshake decoder, on any bytes.
    #[test]
    fn fuzz_tcp_store_handshake(b in any_bytes(16), ms in mutations()) {
        for b in [b, mutate([&tcp::MAGIC[..], &tcp::VERSION.to_le_bytes()].concat(), &ms)] {
            let mut r = &b[..];
            let got = read_fixed::<8, _>(&mut r, tcp::HANDSHAKE, |d| d.magic(&tcp::MAGIC))
                .and_then(|()| read_fixed::<2, _>(&mut r, tcp::HANDSHAKE, |d| d.u16("version")));
            match got {
                Ok(v) => {
                    prop_assert_eq!(&b[..8], &tcp::MAGIC[..]);
                    prop_assert_eq!(v, u16::from_le_bytes([b[8], b[9]]));
                }
                Err(e) => stream_error(&e, tcp::HANDSHAKE)?,
            }
        }
    }

    // -------------------------------------------------------- torch store

    /// Torch's replies as this client reads them, on any bytes.
    #[test]
    fn fuzz_torch_store_replies(b in any_bytes(128), kinds in proptest::collection::vec(0u8..4, 1..6), nonce in any::<u32>()) {
        let mut r = &b[..];
        for k in kinds {
            let result = match k {
                0 => torch::read_value(&mut r).map(|v| assert!(v.len() <= crate::store::TORCH_MAX_VALUE)),
                1 => torch::read_pong(&mut r, nonce, ""),
                2 => torch::read_u8(&mut r, "status").map(drop),
                _ => read_fixed::<8, _>(&mut r, torch::REPLY, |d| d.i64("counter")).map(drop),
            };
            if let Err(e) = result {
                stream_error(&e, torch::REPLY)?;
                break;
            }
        }
    }

    #[test]
    fn fuzz_torch_store_value_round_trip_and_mutations(v in any_bytes(64), nonce in any::<u32>(), ms in mutations()) {
        let mut w = crate::codec::Writer::new();
        w.bytes_u64_prefixed(&v).u32(nonce);
        let bytes = w.into_bytes();
        let mut r = &bytes[..];
        prop_assert_eq!(torch::read_value(&mut r).unwrap(), v);
        torch::read_pong(&mut r, nonce, "").unwrap();
        prop_assert!(r.is_empty());
        let b = mutate(bytes, &ms);
        let mut r = &b[..];
        match torch::read_value(&mut r).and_then(|_| torch::read_pong(&mut r, nonce, "")) {
            Ok(()) => {}
            Err(e) => stream_error(&e, torch::REPLY)?,
        }
    }

    // -------------------------------------------------------- store counters

    /// A counter's value as any store holds it (written by any client).
    #[test]
    fn fuzz_store_counter(v in any_bytes(16), delta in edge_u64()) {
        let delta = delta as i64;
        match crate::store::decode_counter(&v) {
            Some(n) => {
                prop_assert_eq!(v.len(), 8);
                prop_assert_eq!(crate::store::counter_add(Some(&v), delta).ok(), n.checked_add(delta));
            }
            None => {
                prop_assert_ne!(v.len(), 8);
                prop_assert!(crate::store::counter_add(Some(&v), delta).is_err());
            }
        }
    }

    // -------------------------------------------------------- auth

    /// Any bytes, in any pieces, to either side, with or without a secret:
    /// an error naming the peer, or a handshake that is done without a
    /// proof (an unauthenticating greeting), never a panic or a hang. A
    /// claimed count past what was asked for counts as what was asked.
    #[test]
    fn fuzz_auth_handshake_arbitrary_input(
        input in any_bytes(200),
        head in prop_oneof![Just(None), Just(Some(0u8)), Just(Some(1u8))],
        chunks in proptest::collection::vec(1usize..60, 1..5),
        extra in prop_oneof![Just(0usize), 1usize..100, Just(usize::MAX)],
        accepting in any::<bool>(),
        with_secret in any::<bool>(),
    ) {
        // Often start with a valid greeting head, to get past the magic.
        let mut input = input;
        if let Some(mode) = head {
            let mut g = auth::MAGIC.to_vec();
            g.extend_from_slice(&auth::VERSION.to_le_bytes());
            g.push(mode);
            g.extend_from_slice(&input);
            input = g;
        }
        let role = if accepting { Role::Accepting } else { Role::Connecting };
        let s = secret(7);
        let mut hs = Handshake::new(role, with_secret.then_some(&s), b"ctx", "fuzz peer").unwrap();
        feed(&mut hs, &input, &chunks, extra)?;
        // Random bytes never hold the proof of a secret.
        prop_assert!(!hs.authenticated());
    }

    /// The job's secret as a user gives it (`OXCCL_JOB_SECRET`, a secret
    /// file): any text is a secret unless blank; hex digits name bytes,
    /// whatever their case.
    #[test]
    fn fuzz_job_secret_text(text in prop_oneof![".{0,80}", "[0-9a-fA-F]{30,70}", "\\PC{0,40}"]) {
        match JobSecret::from_text(&text) {
            Ok(s) => {
                prop_assert!(!text.trim().is_empty());
                let upper = JobSecret::from_text(&text.to_ascii_uppercase()).unwrap();
                let lower = JobSecret::from_text(&text.to_ascii_lowercase()).unwrap();
                let t = text.trim();
                if t.len() >= 32 && t.len() % 2 == 0 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
                    prop_assert_eq!(upper.key(), lower.key());
                    prop_assert!(s.key() == upper.key());
                }
            }
            Err(e) => {
                prop_assert!(text.trim().is_empty());
                prop_assert_eq!(e, "is empty");
            }
        }
    }

    /// Two sides in random pieces: authenticated when the secrets match,
    /// done unauthenticated when neither has one, else both refuse by name.
    #[test]
    fn fuzz_auth_handshake_pairs(
        sa in prop_oneof![Just(None), Just(Some(1u8)), Just(Some(2u8))],
        sb in prop_oneof![Just(None), Just(Some(1u8)), Just(Some(2u8))],
        chunks in proptest::collection::vec(1usize..60, 1..5),
        ctx_b in prop_oneof![Just(b"ctx".to_vec()), any_bytes(8)],
    ) {
        let (ka, kb) = (sa.map(secret), sb.map(secret));
        let mut a = Handshake::new(Role::Connecting, ka.as_ref(), b"ctx", "fuzz peer a").unwrap();
        let mut b = Handshake::new(Role::Accepting, kb.as_ref(), &ctx_b, "fuzz peer b").unwrap();
        let (ra, rb) = exchange(&mut a, &mut b, &chunks);
        match (sa, sb) {
            (Some(x), Some(y)) if x == y && ctx_b == b"ctx" => {
                prop_assert!(matches!((&ra, &rb), (Some(Ok(())), Some(Ok(())))), "{:?} {:?}", ra, rb);
                prop_assert!(a.authenticated() && b.authenticated());
            }
            (None, None) => {
                prop_assert!(matches!((&ra, &rb), (Some(Ok(())), Some(Ok(())))), "{:?} {:?}", ra, rb);
                prop_assert!(!a.authenticated() && !b.authenticated());
            }
            (Some(_), Some(_)) => {
                // Different secrets or contexts: refused as another job.
                let errors: Vec<_> = [&ra, &rb].into_iter().flatten().filter_map(|r| r.as_ref().err()).collect();
                prop_assert!(!errors.is_empty(), "{:?} {:?}", ra, rb);
                for e in errors {
                    prop_assert!(e.is_wrong_secret(), "{}", e);
                }
            }
            _ => {
                let errors: Vec<_> = [&ra, &rb].into_iter().flatten().filter_map(|r| r.as_ref().err()).collect();
                prop_assert!(!errors.is_empty(), "{:?} {:?}", ra, rb);
                for e in errors {
                    prop_assert!(e.to_string().contains("secret"), "{}", e);
                }
            }
        }
    }

    /// A real greeting (and proof) with mutations, to a side with the same
    /// secret: refused by name unless the mutation hit reserved bytes.
    #[test]
    fn fuzz_auth_handshake_mutated_greeting(ms in mutations(), chunks in proptest::collection::vec(1usize..60, 1..5)) {
        let s = secret(3);
        let mut a = Handshake::new(Role::Connecting, Some(&s), b"ctx", "fuzz peer").unwrap();
        let mut b = Handshake::new(Role::Accepting, Some(&s), b"ctx", "fuzz peer").unwrap();
        // b's greeting to a, so that a's proof follows its greeting.
        let greeting = b.output().to_vec();
        a.input().copy_from_slice(&greeting[..8]);
        a.received(8).unwrap();
        a.input().copy_from_slice(&greeting[8..]);
        a.received(40).unwrap();
        let sent = mutate(a.output().to_vec(), &ms);
        feed(&mut b, &sent, &chunks, 0)?;
        if b.is_done() {
            prop_assert!(b.authenticated());
        }
    }

    // -------------------------------------------------------- shm handshake

    #[test]
    fn fuzz_shm_offer_and_answer_arbitrary_bytes(b in any_bytes(64)) {
        if let Ok(a) = <[u8; OfferHead::LEN]>::try_from(&b[..]) {
            match OfferHead::decode(&a) {
                Ok(h) => {
                    prop_assert!(h.text_len <= 200);
                    prop_assert_eq!(&h.encode(&b[..0])[..OfferHead::LEN - 2], &b[..OfferHead::LEN - 2]);
                }
                Err(e) => named(&e, "shared-memory offer")?,
            }
        }
        if let Ok(a) = <[u8; AnswerHead::LEN]>::try_from(&b[..]) {
            match AnswerHead::decode(&a) {
                Ok(h) => {
                    prop_assert!(h.text_len <= 200);
                    prop_assert_eq!(&h.encode(&b[..0])[..AnswerHead::LEN - 2], &b[..AnswerHead::LEN - 2]);
                }
                Err(e) => named(&e, "shared-memory answer")?,
            }
        }
    }

    #[test]
    fn fuzz_shm_offer_and_answer_round_trip_and_mutations(
        policy in prop_oneof![Just(Policy::Auto), Just(Policy::Never), Just(Policy::Require)],
        flag in any::<bool>(),
        nonce in edge_u64(),
        capacity in edge_u64(),
        text in any_bytes(300),
        ms in mutations(),
    ) {
        let cut = text.len().min(200);
        let offer = OfferHead { policy, offered: flag, nonce, capacity, text_len: cut };
        let bytes = offer.encode(&text);
        prop_assert_eq!(bytes.len(), OfferHead::LEN + cut);
        let head: [u8; OfferHead::LEN] = bytes[..OfferHead::LEN].try_into().unwrap();
        prop_assert_eq!(OfferHead::decode(&head).unwrap(), offer);
        prop_assert_eq!(&bytes[OfferHead::LEN..], &text[..cut]);
        let b = mutate(bytes, &ms);
        if let Ok(a) = <[u8; OfferHead::LEN]>::try_from(b.get(..OfferHead::LEN).unwrap_or(&[])) {
            if let Err(e) = OfferHead::decode(&a) {
                named(&e, "shared-memory offer")?;
            }
        }
        let answer = AnswerHead { policy, accepted: flag, text_len: cut };
        let bytes = answer.encode(&text);
        let head: [u8; AnswerHead::LEN] = bytes[..AnswerHead::LEN].try_into().unwrap();
        prop_assert_eq!(AnswerHead::decode(&head).unwrap(), answer);
        let b = mutate(bytes, &ms);
        if let Ok(a) = <[u8; AnswerHead::LEN]>::try_from(b.get(..AnswerHead::LEN).unwrap_or(&[])) {
            if let Err(e) = AnswerHead::decode(&a) {
                named(&e, "shared-memory answer")?;
            }
        }
    }
}

proptest! {
    // A memfd and a socket pair per case: a few times slower than the
    // decoders' cases, which is fine.
    #![proptest_config(config())]

    /// A ring pair driven by random writes and reads while a peer scribbles
    /// over the words it shares: every call returns a count within its
    /// buffers or an error naming the peer, never a panic; with no scribble
    /// the bytes read are the bytes written.
    #[test]
    fn fuzz_shm_ring_peer_words(ops in proptest::collection::vec(ring_op(), 1..24)) {
        // The writer's buffers live until the links are gone: a posted
        // transfer's bytes are read from where they are.
        let mut arena: Vec<Vec<u8>> = Vec::new();
        let (mut a, mut b) = crate::shm::pair(0, 1, MIN_CAPACITY).unwrap();
        let clean = !ops.iter().any(|o| matches!(o, RingOp::Scribble(..) | RingOp::Withdraw));
        let (mut written, mut read) = (Vec::<u8>::new(), Vec::<u8>::new());
        // The message being written: (buffer, bytes of it written). As a
        // caller must, the rest of a partial write is passed again as it was.
        let mut out: Vec<(usize, usize)> = Vec::new();
        let mut next = 0u8;
        for op in ops {
            match op {
                RingOp::Write(lens) => {
                    if out.iter().all(|&(i, o)| o == arena[i].len()) {
                        out.clear();
                        for n in lens {
                            arena.push((0..n).map(|_| { next = next.wrapping_add(1); next }).collect());
                            out.push((arena.len() - 1, 0));
                        }
                    }
                    let slices: Vec<IoSlice<'_>> = out.iter().map(|&(i, o)| IoSlice::new(&arena[i][o..])).collect();
                    let total: usize = slices.iter().map(|s| s.len()).sum();
                    match a.try_write(&slices) {
                        Ok(n) => {
                            prop_assert!(n <= total);
                            let mut left = n;
                            for (i, o) in out.iter_mut() {
                                let take = left.min(arena[*i].len() - *o);
                                written.extend_from_slice(&arena[*i][*o..*o + take]);
                                *o += take;
                                left -= take;
                            }
                        }
                        Err(e) => ring_error(&e, 1)?,
                    }
                }
                RingOp::Read(lens) => {
                    let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0u8; n]).collect();
                    let total: usize = lens.iter().sum();
                    let mut slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                    match b.try_read(&mut slices) {
                        Ok(n) => {
                            prop_assert!(n <= total);
                            read.extend(bufs.concat().into_iter().take(n));
                        }
                        Err(e) => ring_error(&e, 0)?,
                    }
                }
                RingOp::Scribble(through_writer, word, value) => {
                    if through_writer { a.scribble(word, value) } else { b.scribble(word, value) }
                }
                RingOp::SingleCopy(min) => a.set_single_copy(min),
                RingOp::Allow(yes) => a.allow_single_copy(yes),
                RingOp::Commit => crate::Endpoint::commit(&mut a),
                RingOp::Withdraw => crate::Endpoint::withdraw(&mut a),
            }
            if clean {
                // The bytes of a posted transfer may be read before the
                // writer is told: what is read and what is written are both
                // the start of the stream of bytes given to the writer.
                let stream = arena.concat();
                prop_assert!(read.len() <= stream.len() && written.len() <= stream.len());
                prop_assert_eq!(&read[..], &stream[..read.len()]);
                prop_assert_eq!(&written[..], &stream[..written.len()]);
            }
        }
    }
}

proptest! {
    // A connection per case, which waits for the server's accept loop (it
    // polls every 20 ms): an eighth of the cases, and at most 20,000 (more
    // would run out of ephemeral ports: each closed connection waits a
    // minute in TIME_WAIT).
    #![proptest_config(config_scaled(8, 20_000))]

    /// A client session with the store server: valid requests, garbage and
    /// cuts, in any order. The server answers every valid request, drops
    /// the client at the first bad byte, never panics, and keeps serving
    /// others.
    #[test]
    fn fuzz_tcp_store_server_session(
        hello_ms in prop_oneof![3 => Just(None), 1 => mutations().prop_map(Some)],
        script in proptest::collection::vec(sent(), 0..8),
    ) {
        let server = store_server();
        let addr = server.local_addr();
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        auth::authenticate(&stream, Role::Connecting, None, auth::STORE_CONTEXT, "fuzz store", deadline).unwrap();
        let mut hello = [&tcp::MAGIC[..], &tcp::VERSION.to_le_bytes()].concat();
        let good_hello = hello_ms.is_none();
        if let Some(ms) = &hello_ms {
            hello = mutate(hello, ms);
        }
        let mut bytes = hello.clone();
        // Requests before the first garbage are answered.
        let mut answered = Vec::new();
        let mut clean = good_hello;
        for s in &script {
            match s {
                Sent::Request(r) => {
                    bytes.extend_from_slice(&r.encode().unwrap());
                    if clean {
                        answered.push(r.clone());
                    }
                }
                Sent::Garbage(g) => {
                    bytes.extend_from_slice(g);
                    clean = clean && g.is_empty();
                }
            }
        }
        let mut w = &stream;
        // The server may drop the connection before taking all of it.
        let _ = w.write_all(&bytes);
        let _ = stream.shutdown(Shutdown::Write);
        let mut replies = Vec::new();
        let started = Instant::now();
        let ended = (&stream).read_to_end(&mut replies);
        prop_assert!(started.elapsed() < Duration::from_secs(10), "the server held a finished client");
        if let Err(e) = ended {
            prop_assert!(matches!(e.kind(), ErrorKind::ConnectionReset), "{}", e);
        }
        if hello == [&tcp::MAGIC[..], &tcp::VERSION.to_le_bytes()].concat() || good_hello {
            prop_assert!(replies.len() >= 10, "no handshake answer");
            let mut r = &replies[10..];
            for req in &answered {
                let got = match req {
                    Request::Set { .. } => read_set_reply(&mut r),
                    Request::Get { .. } | Request::TryGet { .. } => read_value_reply(&mut r).map(drop),
                    Request::Add { .. } => read_add_reply(&mut r).map(drop),
                };
                prop_assert!(got.is_ok(), "{:?} got {:?}", req, got);
            }
        }
        prop_assert_eq!(STORE_PANICS.load(Ordering::SeqCst), 0);
        // Others are still served: a client connected before (a new one per
        // case would wait for the accept loop's poll, 20 ms, each time).
        static OTHER: OnceLock<TcpStore> = OnceLock::new();
        let other = OTHER.get_or_init(|| TcpStore::connect(addr, Instant::now() + Duration::from_secs(10)).unwrap());
        other.set("fuzz/alive", b"yes").unwrap();
        prop_assert_eq!(other.try_get("fuzz/alive").unwrap(), Some(b"yes".to_vec()));
    }
}

// ------------------------------------------------------------ findings

/// Found by `fuzz_auth_handshake_arbitrary_input`: `received` added a
/// count to its fill level unchecked, so `usize::MAX` overflowed (a panic
/// in debug builds), and a count past what `input` asked for (48 claimed
/// while 32 bytes of a proof were asked) left the fill level past the
/// message: the proof was never checked, and the next `input` sliced its
/// buffer backwards (a panic). A count past what was asked now counts as
/// what was asked.
#[test]
fn regression_auth_received_past_what_was_asked() {
    let s = secret(9);
    let mut a = Handshake::new(Role::Connecting, Some(&s), b"ctx", "fuzz peer").unwrap();
    let b = Handshake::new(Role::Accepting, Some(&s), b"ctx", "fuzz peer").unwrap();
    let greeting = b.output().to_vec();
    a.input().copy_from_slice(&greeting[..8]);
    a.received(8).unwrap();
    a.input().copy_from_slice(&greeting[8..]);
    a.received(40).unwrap();
    // Now a proof of 32 bytes is asked for; 48 are claimed.
    assert_eq!(a.input().len(), PROOF_LEN);
    a.input().fill(0);
    let e = a.received(GREETING_LEN).unwrap_err();
    assert!(e.is_wrong_secret(), "{e}");
    // And a count that would overflow.
    let mut c = Handshake::new(Role::Accepting, None, b"ctx", "fuzz peer").unwrap();
    c.input().copy_from_slice(&greeting[..8]);
    c.received(usize::MAX).unwrap();
    assert_eq!(c.input().len(), GREETING_LEN - 8);
}

/// What a hostile store server answers a client's hello with.
fn hostile_answer() -> impl Strategy<Value = Vec<u8>> {
    let hello = [&tcp::MAGIC[..], &tcp::VERSION.to_le_bytes()].concat();
    let valid = {
        let hello = hello.clone();
        proptest::collection::vec(
            prop_oneof![
                Just(vec![0u8]),
                Just(vec![1u8]),
                (any_bytes(8)).prop_map(|v| {
                    let mut w = crate::codec::Writer::new();
                    w.u8(0).u32(v.len() as u32).bytes(&v);
                    w.into_bytes()
                }),
                any::<i64>().prop_map(|n| {
                    let mut w = crate::codec::Writer::new();
                    w.u8(0).i64(n);
                    w.into_bytes()
                }),
            ],
            0..4,
        )
        .prop_map(move |replies| [hello.clone(), replies.concat()].concat())
    };
    prop_oneof![
        1 => any_bytes(64),
        1 => any_bytes(64).prop_map(move |b| [hello.clone(), b].concat()),
        2 => (valid, mutations(), any::<bool>()).prop_map(|(b, ms, m)| if m { mutate(b, &ms) } else { b }),
    ]
}

proptest! {
    // A listener, a thread and a connection per case (see the server
    // session's target).
    #![proptest_config(config_scaled(8, 20_000))]

    /// The store client against a hostile server: it authenticates, then
    /// answers with any bytes (a hello or not, replies or garbage) and
    /// closes. Connecting and every request end at once, in a value or an
    /// error, never a panic; after a failed request the connection is not
    /// reused.
    #[test]
    fn fuzz_tcp_store_client_session(answer in hostile_answer(), ops in proptest::collection::vec(0u8..4, 1..5), key in key()) {
        let listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = answer.clone();
        let server = std::thread::spawn(move || -> std::io::Result<()> {
            let (s, _) = listener.accept()?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            auth::authenticate(&s, Role::Accepting, None, auth::STORE_CONTEXT, "fuzz client", deadline)
                .map_err(std::io::Error::other)?;
            let mut hello = [0u8; 10];
            (&s).read_exact(&mut hello)?;
            // The client may give up before reading all of it.
            let _ = (&s).write_all(&sent);
            s.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            let _ = (&s).read_to_end(&mut rest);
            Ok(())
        });
        let started = Instant::now();
        let good_hello = answer.starts_with(&[&tcp::MAGIC[..], &tcp::VERSION.to_le_bytes()].concat());
        match TcpStore::connect(addr, Instant::now() + Duration::from_secs(5)) {
            Err(e) => {
                prop_assert!(!good_hello, "{}", e);
                prop_assert!(e.to_string().contains(&addr.to_string()), "{}", e);
            }
            Ok(store) => {
                prop_assert!(good_hello);
                let mut failed = false;
                for op in ops {
                    let soon = Instant::now() + Duration::from_millis(200);
                    let result = match op {
                        0 => store.set(&key, b"v").map(drop),
                        1 => store.get(&key, soon).map(drop),
                        2 => store.try_get(&key).map(drop),
                        _ => store.add(&key, 1).map(drop),
                    };
                    match result {
                        Ok(()) => prop_assert!(!failed, "a request succeeded on a broken connection"),
                        Err(e) => {
                            prop_assert!(e.to_string().contains(&addr.to_string()), "{}", e);
                            if failed {
                                prop_assert!(matches!(e, StoreError::Closed { .. }), "{}", e);
                            }
                            // "Not found" and a counter's error are answers;
                            // anything else leaves the connection out of step.
                            let answer = matches!(e, StoreError::Timeout { .. } | StoreError::Counter { .. });
                            failed |= !answer;
                        }
                    }
                }
            }
        }
        prop_assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        // The server thread ends once the client is gone.
        let _ = server.join().unwrap();
    }
}

/// What a hostile torch store answers: its pong to the handshake's ping
/// (or not), then replies or garbage.
fn hostile_torch_answer() -> impl Strategy<Value = Vec<u8>> {
    let pong = std::process::id().to_le_bytes().to_vec();
    let piece = prop_oneof![
        Just(vec![0u8]),
        Just(vec![1u8]),
        Just(std::process::id().to_le_bytes().to_vec()),
        any_bytes(8).prop_map(|v| {
            let mut w = crate::codec::Writer::new();
            w.bytes_u64_prefixed(&v);
            w.into_bytes()
        }),
        any::<i64>().prop_map(|n| n.to_le_bytes().to_vec()),
    ];
    let valid = {
        let pong = pong.clone();
        proptest::collection::vec(piece, 0..5)
            .prop_map(move |replies| [pong.clone(), replies.concat()].concat())
    };
    prop_oneof![
        1 => any_bytes(64),
        1 => any_bytes(64).prop_map(move |b| [pong.clone(), b].concat()),
        2 => (valid, mutations(), any::<bool>()).prop_map(|(b, ms, m)| if m { mutate(b, &ms) } else { b }),
    ]
}

proptest! {
    // A listener, a thread and a connection per case (see the server
    // session's target).
    #![proptest_config(config_scaled(8, 20_000))]

    /// The torch store client against a hostile torch server, as
    /// `fuzz_tcp_store_client_session` for oxccl's own store.
    #[test]
    fn fuzz_torch_store_client_session(answer in hostile_torch_answer(), ops in proptest::collection::vec(0u8..4, 1..5), key in key()) {
        let listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = answer.clone();
        let server = std::thread::spawn(move || -> std::io::Result<()> {
            let (s, _) = listener.accept()?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            // Validate (query type and magic) and a ping (type and nonce).
            let mut hello = [0u8; 10];
            (&s).read_exact(&mut hello)?;
            let _ = (&s).write_all(&sent);
            s.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            let _ = (&s).read_to_end(&mut rest);
            Ok(())
        });
        let started = Instant::now();
        let good_pong = answer.starts_with(&std::process::id().to_le_bytes());
        match crate::store::TorchStore::connect(addr, Instant::now() + Duration::from_secs(5)) {
            Err(e) => {
                prop_assert!(!good_pong, "{}", e);
                prop_assert!(e.to_string().contains(&addr.to_string()), "{}", e);
            }
            Ok(store) => {
                prop_assert!(good_pong);
                let mut failed = false;
                for op in ops {
                    let soon = Instant::now() + Duration::from_millis(200);
                    let result = match op {
                        0 => store.set(&key, b"v").map(drop),
                        1 => store.get(&key, soon).map(drop),
                        2 => store.try_get(&key).map(drop),
                        _ => store.add(&key, 1).map(drop),
                    };
                    match result {
                        Ok(()) => prop_assert!(!failed, "a request succeeded on a broken connection"),
                        Err(e) => {
                            prop_assert!(e.to_string().contains(&addr.to_string()), "{}", e);
                            if failed {
                                prop_assert!(matches!(e, StoreError::Closed { .. }), "{}", e);
                            }
                            failed |= !matches!(e, StoreError::Timeout { .. });
                        }
                    }
                }
            }
        }
        prop_assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        let _ = server.join().unwrap();
    }
}

/// The shared-memory offer and answer, now read with the codec: a bad
/// magic, an unknown policy, a yes/no byte other than 0 or 1 (once read as
/// no) and a text past its limit are refused, each by name.
#[test]
fn shm_offer_and_answer_errors_name_the_format_and_field() {
    let offer = OfferHead {
        policy: Policy::Auto,
        offered: true,
        nonce: 7,
        capacity: 4096,
        text_len: 0,
    }
    .encode(b"/oxccl-x");
    let head = |b: &[u8]| -> [u8; OfferHead::LEN] { b[..OfferHead::LEN].try_into().unwrap() };
    let cases: [(usize, u8, &str); 4] = [
        (0, b'X', "shared-memory offer: bad magic"),
        (
            8,
            3,
            "shared-memory offer: invalid policy: unknown policy 3",
        ),
        (
            9,
            2,
            "shared-memory offer: invalid offered: 2 is neither 0 nor 1",
        ),
        (
            27,
            1,
            "shared-memory offer: text of length 264 exceeds the limit of 200",
        ),
    ];
    for (at, v, want) in cases {
        let mut b = offer.clone();
        b[at] = v;
        let e = OfferHead::decode(&head(&b)).unwrap_err().to_string();
        assert!(e.starts_with(want), "{e}");
    }
    let answer = AnswerHead {
        policy: Policy::Require,
        accepted: false,
        text_len: 0,
    }
    .encode(b"why");
    let mut b: [u8; AnswerHead::LEN] = answer[..AnswerHead::LEN].try_into().unwrap();
    b[9] = 9;
    let e = AnswerHead::decode(&b).unwrap_err().to_string();
    assert!(
        e.starts_with("shared-memory answer: invalid accepted: 9 is neither 0 nor 1"),
        "{e}"
    );
}
