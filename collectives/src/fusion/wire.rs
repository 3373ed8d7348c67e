//! What ranks tell rank 0 in a coordination round, what rank 0 answers, and
//! how rank 0 decides (pure: no I/O, no clock but the one passed in).
//! Messages are written and read with the transport's codec.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use oxccl_kernels::{DType, ReduceOp};
use oxccl_transport::codec::{DecodeError, Prefix, Reader, Writer};

use crate::descriptor::{read_dtype, read_kind, read_op};
use crate::schedule::Kind;

/// What a submitted tensor is: every rank must submit the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    /// AllReduce, AllGather or Broadcast.
    pub kind: Kind,
    /// Element type.
    pub dtype: DType,
    /// Reduction (Sum for kinds that do not reduce).
    pub op: ReduceOp,
    /// Root of a broadcast (0 otherwise).
    pub root: usize,
    /// Elements this rank submits.
    pub count: usize,
}

impl Meta {
    /// Normalizes the fields that do not take part in `kind`.
    pub fn new(kind: Kind, dtype: DType, op: ReduceOp, root: usize, count: usize) -> Meta {
        Meta {
            kind,
            dtype,
            op: if kind == Kind::AllReduce {
                op
            } else {
                ReduceOp::Sum
            },
            root: if kind == Kind::Broadcast { root } else { 0 },
            count,
        }
    }

    /// Bytes of the buffer the collective works on (the gathered output
    /// for allgather). Saturates: the count comes from a peer, and a size
    /// past the address space is larger than any threshold anyway.
    pub fn bytes(&self, world: usize) -> usize {
        let n = self.count.saturating_mul(self.dtype.size());
        if self.kind == Kind::AllGather {
            n.saturating_mul(world)
        } else {
            n
        }
    }

    /// Tensors fuse only with tensors of the same key.
    pub fn key(&self) -> (u8, u8, u8, usize) {
        (self.kind as u8, self.dtype as u8, self.op as u8, self.root)
    }
}

impl fmt::Display for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::AllReduce => write!(
                f,
                "allreduce ({} {}, {} elements)",
                self.dtype, self.op, self.count
            ),
            Kind::Broadcast => write!(
                f,
                "broadcast ({} from rank {}, {} elements)",
                self.dtype, self.root, self.count
            ),
            _ => write!(f, "allgather ({}, {} elements)", self.dtype, self.count),
        }
    }
}

/// One pending tensor, as a rank reports it to rank 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub name: String,
    pub meta: Meta,
    /// Order of submission on that rank.
    pub seq: u64,
    /// Milliseconds since it was submitted.
    pub age_ms: u64,
    /// Whether that rank submitted the name again before it completed.
    pub duplicate: bool,
}

/// Everything one rank reports in a coordination round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RequestList {
    /// The rank is shutting its engine down.
    pub shutdown: bool,
    pub requests: Vec<Request>,
}

/// Rank 0's decision on one tensor name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Response {
    /// Every rank submitted it alike: run it (in list order).
    Ready { name: String, meta: Meta },
    /// Fail it on every rank that holds it.
    Error { name: String, message: String },
}

/// Rank 0's answer to a coordination round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ResponseList {
    pub responses: Vec<Response>,
    /// Stall warnings rank 0 issued this round.
    pub warnings: Vec<String>,
    /// Ranks that shut their engine down.
    pub shutdown_ranks: Vec<usize>,
    /// A stall past OXCCL_STALL_SHUTDOWN_SECS: fail every handle, stop.
    pub abort: Option<String>,
}

/// Format names of the coordination messages, as decoding errors name them.
pub(crate) const REQUESTS: &str = "fusion request list";
pub(crate) const RESPONSES: &str = "fusion response list";

/// The longest name or message a coordination message carries.
const MAX_TEXT: usize = 16 << 20;
/// Fewest bytes of one [`Request`], [`Response`], warning and shutdown rank
/// on the wire: counts that the bytes left cannot hold are refused before
/// anything is allocated for them.
const MIN_REQUEST: usize = 8 + META_LEN + 8 + 8 + 1;
const MIN_RESPONSE: usize = 1 + 8 + 8;
const MIN_TEXT: usize = 8;
const RANK_LEN: usize = 8;
/// Bytes of a [`Meta`].
const META_LEN: usize = 3 + 8 + 8;

fn write_meta(w: &mut Writer, m: &Meta) {
    w.u8(m.kind as u8)
        .u8(m.dtype as u8)
        .u8(m.op as u8)
        .u64(m.root as u64)
        .u64(m.count as u64);
}

fn read_meta(r: &mut Reader<'_>) -> Result<Meta, DecodeError> {
    Ok(Meta {
        kind: read_kind(r)?,
        dtype: read_dtype(r)?,
        op: read_op(r)?,
        root: r.u64_usize("root")?,
        count: r.u64_usize("count")?,
    })
}

fn read_text(r: &mut Reader<'_>, field: &'static str) -> Result<String, DecodeError> {
    Ok(r.str_prefixed(field, Prefix::U64, MAX_TEXT)?.to_owned())
}

impl RequestList {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(u8::from(self.shutdown))
            .u64(self.requests.len() as u64);
        for r in &self.requests {
            w.str_u64_prefixed(&r.name);
            write_meta(&mut w, &r.meta);
            w.u64(r.seq).u64(r.age_ms).u8(u8::from(r.duplicate));
        }
        w.into_bytes()
    }

    /// Decodes what a rank sent; every malformed input is an error, never a panic.
    pub fn decode(b: &[u8]) -> Result<RequestList, DecodeError> {
        let mut r = Reader::new(REQUESTS, b);
        let shutdown = r.u8("shutdown")? != 0;
        let n = r.count("request count", Prefix::U64, MIN_REQUEST)?;
        let mut requests = Vec::with_capacity(n);
        for _ in 0..n {
            requests.push(Request {
                name: read_text(&mut r, "name")?,
                meta: read_meta(&mut r)?,
                seq: r.u64("seq")?,
                age_ms: r.u64("age")?,
                duplicate: r.u8("duplicate")? != 0,
            });
        }
        r.finish()?;
        Ok(RequestList { shutdown, requests })
    }
}

impl ResponseList {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u64(self.responses.len() as u64);
        for r in &self.responses {
            match r {
                Response::Ready { name, meta } => {
                    w.u8(0).str_u64_prefixed(name);
                    write_meta(&mut w, meta);
                }
                Response::Error { name, message } => {
                    w.u8(1).str_u64_prefixed(name).str_u64_prefixed(message);
                }
            }
        }
        w.u64(self.warnings.len() as u64);
        for s in &self.warnings {
            w.str_u64_prefixed(s);
        }
        w.u64(self.shutdown_ranks.len() as u64);
        for r in &self.shutdown_ranks {
            w.u64(*r as u64);
        }
        match &self.abort {
            Some(m) => {
                w.u8(1).str_u64_prefixed(m);
            }
            None => {
                w.u8(0);
            }
        }
        w.into_bytes()
    }

    /// Decodes rank 0's answer; every malformed input is an error, never a panic.
    pub fn decode(b: &[u8]) -> Result<ResponseList, DecodeError> {
        let mut r = Reader::new(RESPONSES, b);
        let n = r.count("response count", Prefix::U64, MIN_RESPONSE)?;
        let mut out = ResponseList {
            responses: Vec::with_capacity(n),
            ..ResponseList::default()
        };
        for _ in 0..n {
            let tag = r.u8("response tag")?;
            let name = read_text(&mut r, "name")?;
            out.responses.push(match tag {
                0 => Response::Ready {
                    name,
                    meta: read_meta(&mut r)?,
                },
                1 => Response::Error {
                    name,
                    message: read_text(&mut r, "error message")?,
                },
                t => return Err(r.invalid("response tag", format!("bad response tag {t}"))),
            });
        }
        let n = r.count("warning count", Prefix::U64, MIN_TEXT)?;
        out.warnings.reserve(n);
        for _ in 0..n {
            out.warnings.push(read_text(&mut r, "warning")?);
        }
        let n = r.count("shutdown rank count", Prefix::U64, RANK_LEN)?;
        out.shutdown_ranks.reserve(n);
        for _ in 0..n {
            out.shutdown_ranks.push(r.u64_usize("shutdown rank")?);
        }
        if r.u8("abort flag")? != 0 {
            out.abort = Some(read_text(&mut r, "abort message")?);
        }
        r.finish()?;
        Ok(out)
    }
}

/// Stall settings and rank 0's memory of the warnings it gave.
#[derive(Debug, Default)]
pub(crate) struct Stall {
    pub warning: Duration,
    pub shutdown: Option<Duration>,
    warned: HashMap<String, Instant>,
}

impl Stall {
    pub fn new(warning: Duration, shutdown: Option<Duration>) -> Stall {
        Stall {
            warning,
            shutdown,
            warned: HashMap::new(),
        }
    }
}

/// "rank 1" or "ranks 0, 2".
pub(crate) fn ranks(rs: &[usize]) -> String {
    let list: Vec<String> = rs.iter().map(|r| r.to_string()).collect();
    match rs.len() {
        1 => format!("rank {}", list.join(", ")),
        _ => format!("ranks {}", list.join(", ")),
    }
}

/// Rank 0's decision from every rank's list (`lists[r]` is rank `r`'s).
///
/// A name every rank submitted alike is ready; ready names are ordered by
/// rank 0's submission order. A name submitted twice on some rank, or
/// differently by different ranks, is an error once every rank has
/// submitted it. A name only some ranks submitted waits; past the stall
/// warning it is named in a warning, past the stall shutdown it aborts.
pub(crate) fn coordinate(lists: &[RequestList], stall: &mut Stall, now: Instant) -> ResponseList {
    let world = lists.len();
    let mut out = ResponseList {
        shutdown_ranks: (0..world).filter(|r| lists[*r].shutdown).collect(),
        ..ResponseList::default()
    };
    let mut by_name: BTreeMap<&str, Vec<(usize, &Request)>> = BTreeMap::new();
    for (rank, list) in lists.iter().enumerate() {
        for req in &list.requests {
            by_name.entry(&req.name).or_default().push((rank, req));
        }
    }
    let mut ready = Vec::new();
    let mut stalled = Vec::new();
    for (name, subs) in &by_name {
        let submitted: Vec<usize> = subs.iter().map(|(r, _)| *r).collect();
        if submitted.len() < world {
            let age = subs.iter().map(|(_, q)| q.age_ms).max().unwrap_or(0);
            let missing: Vec<usize> = (0..world).filter(|r| !submitted.contains(r)).collect();
            stalled.push((name.to_string(), subs[0].1.meta, submitted, missing, age));
            continue;
        }
        let dups: Vec<usize> = subs
            .iter()
            .filter(|(_, q)| q.duplicate)
            .map(|(r, _)| *r)
            .collect();
        if !dups.is_empty() {
            out.responses.push(Response::Error {
                name: name.to_string(),
                message: format!(
                    "tensor '{name}' was submitted again before it completed, on {}",
                    ranks(&dups)
                ),
            });
            continue;
        }
        let first = subs[0].1.meta;
        if subs.iter().all(|(_, q)| q.meta == first) {
            let seq0 = subs.iter().find(|(r, _)| *r == 0).map_or(0, |(_, q)| q.seq);
            ready.push((seq0, name.to_string(), first));
            continue;
        }
        let mut groups: Vec<(Meta, Vec<usize>)> = Vec::new();
        for (r, q) in subs {
            match groups.iter_mut().find(|(m, _)| *m == q.meta) {
                Some((_, rs)) => rs.push(*r),
                None => groups.push((q.meta, vec![*r])),
            }
        }
        let parts: Vec<String> = groups
            .iter()
            .map(|(m, rs)| format!("{} submitted {m}", ranks(rs)))
            .collect();
        out.responses.push(Response::Error {
            name: name.to_string(),
            message: format!(
                "tensor '{name}' differs between ranks: {}",
                parts.join("; ")
            ),
        });
    }
    ready.sort_by_key(|(seq, _, _)| *seq);
    let errors = std::mem::take(&mut out.responses);
    out.responses = ready
        .into_iter()
        .map(|(_, name, meta)| Response::Ready { name, meta })
        .chain(errors)
        .collect();

    stall
        .warned
        .retain(|n, _| stalled.iter().any(|s| s.0 == *n));
    let mut aborted = Vec::new();
    for (name, meta, submitted, missing, age_ms) in stalled {
        let age = Duration::from_millis(age_ms);
        let text = format!(
            "tensor '{name}' ({meta}) was submitted by {} {:.1} s ago; {} {} not submitted it",
            ranks(&submitted),
            age.as_secs_f64(),
            ranks(&missing),
            if missing.len() == 1 { "has" } else { "have" }
        );
        if stall.shutdown.is_some_and(|s| age >= s) {
            aborted.push(text);
        } else if age >= stall.warning
            && stall
                .warned
                .get(&name)
                .is_none_or(|t| now.duration_since(*t) >= stall.warning)
        {
            stall.warned.insert(name, now);
            out.warnings.push(text);
        }
    }
    if !aborted.is_empty() {
        out.abort = Some(format!(
            "stalled past OXCCL_STALL_SHUTDOWN_SECS: {}",
            aborted.join("; ")
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn meta(count: usize) -> Meta {
        Meta::new(Kind::AllReduce, DType::F32, ReduceOp::Sum, 0, count)
    }

    fn req(name: &str, count: usize, seq: u64) -> Request {
        Request {
            name: name.into(),
            meta: meta(count),
            seq,
            age_ms: 0,
            duplicate: false,
        }
    }

    #[test]
    fn lists_round_trip_and_garbage_is_an_error() {
        let l = RequestList {
            shutdown: true,
            requests: vec![req("a", 3, 1), req("bé", 0, 2)],
        };
        assert_eq!(RequestList::decode(&l.encode()).unwrap(), l);
        let r = ResponseList {
            responses: vec![
                Response::Ready {
                    name: "a".into(),
                    meta: meta(4),
                },
                Response::Error {
                    name: "b".into(),
                    message: "m".into(),
                },
            ],
            warnings: vec!["w".into()],
            shutdown_ranks: vec![1, 3],
            abort: Some("x".into()),
        };
        assert_eq!(ResponseList::decode(&r.encode()).unwrap(), r);
        let bytes = r.encode();
        for cut in 0..bytes.len() {
            assert!(ResponseList::decode(&bytes[..cut]).is_err());
        }
        assert!(RequestList::decode(&[0, 255, 255, 255, 255, 255, 255, 255, 255]).is_err());
    }

    #[test]
    fn ready_in_rank0_order_and_errors_name_ranks() {
        let mut stall = Stall::new(Duration::from_secs(60), None);
        let lists = vec![
            RequestList {
                shutdown: false,
                requests: vec![req("b", 1, 0), req("a", 1, 1), req("m", 2, 2)],
            },
            RequestList {
                shutdown: false,
                requests: vec![
                    req("a", 1, 0),
                    req("m", 3, 1),
                    req("b", 1, 2),
                    req("p", 1, 3),
                ],
            },
        ];
        let out = coordinate(&lists, &mut stall, Instant::now());
        let names: Vec<&str> = out
            .responses
            .iter()
            .map(|r| match r {
                Response::Ready { name, .. } | Response::Error { name, .. } => name.as_str(),
            })
            .collect();
        assert_eq!(names, ["b", "a", "m"]);
        let Response::Error { message, .. } = &out.responses[2] else {
            panic!("{out:?}")
        };
        assert_eq!(
            message,
            "tensor 'm' differs between ranks: rank 0 submitted allreduce (f32 sum, 2 elements); \
             rank 1 submitted allreduce (f32 sum, 3 elements)"
        );
        assert!(out.warnings.is_empty() && out.abort.is_none());
    }

    #[test]
    fn duplicates_and_stalls() {
        let mut stall = Stall::new(Duration::from_secs(1), Some(Duration::from_secs(5)));
        let mut dup = req("d", 1, 0);
        dup.duplicate = true;
        let mut old = req("s", 1, 1);
        old.age_ms = 2000;
        let lists = vec![
            RequestList {
                shutdown: false,
                requests: vec![dup, old.clone()],
            },
            RequestList {
                shutdown: true,
                requests: vec![req("d", 1, 0)],
            },
            RequestList {
                shutdown: false,
                requests: vec![req("d", 1, 0), old.clone()],
            },
        ];
        let now = Instant::now();
        let out = coordinate(&lists, &mut stall, now);
        assert_eq!(
            out.responses,
            vec![Response::Error {
                name: "d".into(),
                message: "tensor 'd' was submitted again before it completed, on rank 0".into()
            }]
        );
        assert_eq!(out.shutdown_ranks, vec![1]);
        assert_eq!(
            out.warnings,
            vec![
                "tensor 's' (allreduce (f32 sum, 1 elements)) was submitted by ranks 0, 2 2.0 s ago; \
                 rank 1 has not submitted it"
                    .to_string()
            ]
        );
        // Warned once per period.
        let again = coordinate(&lists, &mut stall, now + Duration::from_millis(10));
        assert!(again.warnings.is_empty());
        let mut lists = lists;
        lists[0].requests[1].age_ms = 6000;
        let out = coordinate(&lists, &mut stall, now);
        assert!(
            out.abort
                .as_deref()
                .unwrap()
                .starts_with("stalled past OXCCL_STALL_SHUTDOWN_SECS: tensor 's'"),
            "{out:?}"
        );
    }

    mod codec {
        use super::*;
        use proptest::prelude::*;

        fn any_meta() -> impl Strategy<Value = Meta> {
            (
                0..Kind::ALL.len(),
                0..DType::ALL.len(),
                0..ReduceOp::ALL.len(),
                any::<u64>(),
                any::<u64>(),
            )
                .prop_map(|(k, t, o, root, count)| Meta {
                    kind: Kind::ALL[k],
                    dtype: DType::ALL[t],
                    op: ReduceOp::ALL[o],
                    root: root as usize,
                    count: count as usize,
                })
        }

        fn request_list() -> impl Strategy<Value = RequestList> {
            let request = (
                ".{0,8}",
                any_meta(),
                any::<u64>(),
                any::<u64>(),
                any::<bool>(),
            )
                .prop_map(|(name, meta, seq, age_ms, duplicate)| Request {
                    name,
                    meta,
                    seq,
                    age_ms,
                    duplicate,
                });
            (any::<bool>(), proptest::collection::vec(request, 0..4))
                .prop_map(|(shutdown, requests)| RequestList { shutdown, requests })
        }

        fn response_list() -> impl Strategy<Value = ResponseList> {
            let response = prop_oneof![
                (".{0,8}", any_meta()).prop_map(|(name, meta)| Response::Ready { name, meta }),
                (".{0,8}", ".{0,8}").prop_map(|(name, message)| Response::Error { name, message }),
            ];
            (
                proptest::collection::vec(response, 0..4),
                proptest::collection::vec(".{0,8}", 0..3),
                proptest::collection::vec(any::<u64>(), 0..3),
                proptest::option::of(".{0,8}"),
            )
                .prop_map(|(responses, warnings, ranks, abort)| ResponseList {
                    responses,
                    warnings,
                    shutdown_ranks: ranks.into_iter().map(|r| r as usize).collect(),
                    abort,
                })
        }

        #[test]
        fn errors_name_the_format_and_field() {
            let e = RequestList::decode(&[0, 255, 255, 255, 255, 255, 255, 255, 255]).unwrap_err();
            assert!(
                matches!(
                    e,
                    DecodeError::TooLong {
                        field: "request count",
                        ..
                    }
                ),
                "{e:?}"
            );
            let mut bytes = ResponseList::default().encode();
            bytes.push(0);
            assert_eq!(
                ResponseList::decode(&bytes).unwrap_err().to_string(),
                "fusion response list: 1 trailing bytes after the end of the message"
            );
            let mut bytes = vec![1, 0, 0, 0, 0, 0, 0, 0, 7];
            bytes.extend_from_slice(&[0; MIN_RESPONSE]);
            assert_eq!(
                ResponseList::decode(&bytes).unwrap_err().to_string(),
                "fusion response list: invalid response tag: bad response tag 7"
            );
        }

        proptest! {
            #[test]
            fn lists_round_trip(l in request_list(), r in response_list()) {
                prop_assert_eq!(RequestList::decode(&l.encode()), Ok(l));
                prop_assert_eq!(ResponseList::decode(&r.encode()), Ok(r));
            }

            #[test]
            fn arbitrary_bytes_decode_or_fail(b in proptest::collection::vec(any::<u8>(), 0..128)) {
                let _ = RequestList::decode(&b);
                let _ = ResponseList::decode(&b);
            }

            #[test]
            fn truncated_and_mutated_lists_fail_cleanly(
                l in request_list(), r in response_list(),
                cut in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(),
                flip in 1u8..=255,
            ) {
                let bytes = l.encode();
                prop_assert!(RequestList::decode(&bytes[..cut.index(bytes.len())]).is_err());
                let mut m = bytes.clone();
                let i = at.index(m.len());
                m[i] ^= flip;
                let _ = RequestList::decode(&m);
                let bytes = r.encode();
                prop_assert!(ResponseList::decode(&bytes[..cut.index(bytes.len())]).is_err());
                let mut m = bytes.clone();
                let i = at.index(m.len());
                m[i] ^= flip;
                let _ = ResponseList::decode(&m);
            }
        }
    }
}
