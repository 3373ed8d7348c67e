//! Fuzz targets of every decoder of untrusted bytes in this crate: the
//! descriptor every frame carries, failure reports, the fusion engine's
//! coordination messages (and rank 0's decision on them), the unique id,
//! and what bootstrap reads from the store (the job id, every rank's
//! settings). Proptest, as in the transport's targets (see there and the
//! README's reliability section); `OXCCL_FUZZ_CASES` sets the cases.

#![allow(clippy::unwrap_used)]

// Shared with the transport's targets: case counts and mutations.
#[path = "../../transport/src/fuzz/mutate.rs"]
mod mutate;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use oxccl_kernels::{DType, ReduceOp};
use oxccl_transport::codec::{DecodeError, Reader};
use oxccl_transport::store::{MemStore, Store};
use proptest::prelude::*;

use crate::bootstrap::{UniqueId, differ, read_job};
use crate::descriptor::Descriptor;
use crate::failure::{MAX_CAUSE, Report};
use crate::fusion::plan::buckets;
use crate::fusion::wire::{
    self, Meta, Request, RequestList, Response, ResponseList, Stall, coordinate,
};
use crate::schedule::Kind;
use mutate::{any_bytes, config, edge_u64, mutate, mutations};

/// Asserts that `e` is an error of `format` whose message starts with it.
fn named(e: &DecodeError, format: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(e.format(), format, "{}", e);
    prop_assert!(e.to_string().starts_with(format), "{}", e);
    Ok(())
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::AllReduce),
        Just(Kind::Broadcast),
        Just(Kind::Reduce),
        Just(Kind::AllGather),
        Just(Kind::ReduceScatter),
        Just(Kind::Barrier),
    ]
}

fn dtype() -> impl Strategy<Value = DType> {
    (0u8..10).prop_map(|v| DType::from_u8(v).unwrap())
}

fn op() -> impl Strategy<Value = ReduceOp> {
    (0u8..5).prop_map(|v| ReduceOp::from_u8(v).unwrap())
}

fn count() -> impl Strategy<Value = usize> {
    edge_u64().prop_map(|v| v as usize)
}

fn descriptor() -> impl Strategy<Value = Descriptor> {
    (kind(), dtype(), op(), any::<u32>(), count()).prop_map(|(kind, dtype, op, root, count)| {
        Descriptor {
            kind,
            dtype,
            op,
            root: root as usize,
            count,
        }
    })
}

/// `d` as a peer reads it: the op and root of kinds that do not use them
/// are not sent.
fn normalized(d: Descriptor) -> Descriptor {
    Descriptor {
        op: if d.reduces() { d.op } else { ReduceOp::Sum },
        root: if d.rooted() { d.root } else { 0 },
        ..d
    }
}

fn meta() -> impl Strategy<Value = Meta> {
    (kind(), dtype(), op(), count(), count()).prop_map(|(k, d, o, root, n)| Meta {
        kind: k,
        dtype: d,
        op: o,
        root,
        count: n,
    })
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,8}", "[ab]{0,2}"]
}

fn request_list() -> impl Strategy<Value = RequestList> {
    let request = (text(), meta(), edge_u64(), edge_u64(), any::<bool>()).prop_map(
        |(name, meta, seq, age_ms, duplicate)| Request {
            name,
            meta,
            seq,
            age_ms,
            duplicate,
        },
    );
    (any::<bool>(), proptest::collection::vec(request, 0..5))
        .prop_map(|(shutdown, requests)| RequestList { shutdown, requests })
}

fn response_list() -> impl Strategy<Value = ResponseList> {
    let response = prop_oneof![
        (text(), meta()).prop_map(|(name, meta)| Response::Ready { name, meta }),
        (text(), text()).prop_map(|(name, message)| Response::Error { name, message }),
    ];
    (
        proptest::collection::vec(response, 0..5),
        proptest::collection::vec(text(), 0..3),
        proptest::collection::vec(count(), 0..3),
        proptest::option::of(text()),
    )
        .prop_map(
            |(responses, warnings, shutdown_ranks, abort)| ResponseList {
                responses,
                warnings,
                shutdown_ranks,
                abort,
            },
        )
}

/// Runs what a rank does with rank 0's answer before it runs anything:
/// groups the ready tensors into buckets. Every tensor is in one bucket.
fn plan_ready(r: &ResponseList, world: usize, threshold: usize) -> Result<(), TestCaseError> {
    let metas: Vec<Meta> = r
        .responses
        .iter()
        .filter_map(|r| match r {
            Response::Ready { meta, .. } => Some(*meta),
            Response::Error { .. } => None,
        })
        .collect();
    let plan = buckets(&metas, world, threshold, usize::MAX);
    let mut seen: Vec<usize> = plan.concat();
    seen.sort_unstable();
    prop_assert_eq!(seen, (0..metas.len()).collect::<Vec<_>>());
    Ok(())
}

fn unique_id() -> impl Strategy<Value = UniqueId> {
    let ip = prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
    ];
    (
        ip,
        any::<u16>(),
        edge_u64(),
        proptest::option::of(any::<[u8; 32]>()),
    )
        .prop_map(|(ip, port, job, secret)| {
            UniqueId::from_parts(SocketAddr::new(ip, port), job, secret)
        })
}

/// Checks a unique id's decoding of `b`: a value that encodes back to the
/// same id, or an invalid-argument error naming the format.
fn check_unique_id(b: &[u8; UniqueId::LEN]) -> Result<(), TestCaseError> {
    match UniqueId::from_bytes(b) {
        Ok(id) => {
            prop_assert_eq!(&b[..8], b"OXCCLUID");
            prop_assert_eq!(UniqueId::from_bytes(&id.to_bytes()).unwrap(), id);
        }
        Err(e) => {
            prop_assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument, "{}", e);
            prop_assert!(e.to_string().contains("unique id"), "{}", e);
            named(&UniqueId::parse(b).unwrap_err(), UniqueId::FORMAT)?;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    // -------------------------------------------------------- descriptor

    #[test]
    fn fuzz_descriptor_arbitrary_bytes(b in any_bytes(40)) {
        let mut r = Reader::new(Descriptor::FORMAT, &b);
        let got = Descriptor::read(&mut r).and_then(|d| r.finish().map(|()| d));
        match got {
            Ok(d) => {
                prop_assert_eq!(b.len(), oxccl_transport::wire::DESCRIPTOR_LEN);
                prop_assert_eq!(Descriptor::parse(&d.encode()).unwrap(), normalized(d));
            }
            Err(e) => named(&e, Descriptor::FORMAT)?,
        }
    }

    #[test]
    fn fuzz_descriptor_round_trip_and_mutations(d in descriptor(), ms in mutations()) {
        prop_assert_eq!(Descriptor::parse(&d.encode()).unwrap(), normalized(d));
        let b = mutate(d.encode().to_vec(), &ms);
        let mut r = Reader::new(Descriptor::FORMAT, &b);
        match Descriptor::read(&mut r).and_then(|d| r.finish().map(|()| d)) {
            Ok(m) => prop_assert_eq!(Descriptor::parse(&m.encode()).unwrap(), normalized(m)),
            Err(e) => named(&e, Descriptor::FORMAT)?,
        }
    }

    // -------------------------------------------------------- failure report

    #[test]
    fn fuzz_failure_report(
        b in any_bytes(96),
        origin in count(),
        // A rank (u64::MAX encodes "none": no rank is that large).
        waited_on in proptest::option::of(0usize..1 << 30),
        settled: bool,
        cause in ".{0,40}",
        ms in mutations(),
    ) {
        let report = Report { origin, waited_on, settled, cause };
        for b in [b, mutate(report.encode(), &ms)] {
            match Report::parse(&b) {
                Ok(r) => {
                    prop_assert!(r.cause.len() <= MAX_CAUSE);
                    prop_assert_eq!(Report::parse(&r.encode()).unwrap(), r);
                }
                Err(e) => named(&e, Report::FORMAT)?,
            }
        }
        prop_assert_eq!(Report::parse(&report.encode()).unwrap(), report);
    }

    // -------------------------------------------------------- fusion

    #[test]
    fn fuzz_fusion_requests_arbitrary_bytes(b in any_bytes(200)) {
        match RequestList::decode(&b) {
            Ok(l) => prop_assert_eq!(RequestList::decode(&l.encode()).unwrap(), l),
            Err(e) => named(&e, wire::REQUESTS)?,
        }
    }

    #[test]
    fn fuzz_fusion_responses_arbitrary_bytes(b in any_bytes(200), world in 1usize..9, threshold in count()) {
        match ResponseList::decode(&b) {
            Ok(l) => {
                prop_assert_eq!(ResponseList::decode(&l.encode()).unwrap(), l.clone());
                plan_ready(&l, world, threshold)?;
            }
            Err(e) => named(&e, wire::RESPONSES)?,
        }
    }

    /// Rank 0 decides on lists from every rank, some of them mutated:
    /// whatever decodes is decided on without a panic, every name gets one
    /// answer at most, and the answer round-trips and plans.
    #[test]
    fn fuzz_fusion_coordination(
        lists in proptest::collection::vec(request_list(), 1..5),
        ms in proptest::collection::vec(proptest::option::of(mutations()), 4),
        warning in edge_u64(),
        shutdown in proptest::option::of(edge_u64()),
        threshold in count(),
    ) {
        for l in &lists {
            prop_assert_eq!(&RequestList::decode(&l.encode()).unwrap(), l);
        }
        let mut decoded = Vec::new();
        for (l, m) in lists.iter().zip(ms.iter().cycle()) {
            let bytes = match m {
                Some(m) => mutate(l.encode(), m),
                None => l.encode(),
            };
            match RequestList::decode(&bytes) {
                Ok(d) => decoded.push(d),
                Err(e) => named(&e, wire::REQUESTS)?,
            }
        }
        if decoded.is_empty() {
            return Ok(());
        }
        let mut stall = Stall::new(Duration::from_millis(warning), shutdown.map(Duration::from_millis));
        let out = coordinate(&decoded, &mut stall, Instant::now());
        let mut names: Vec<&str> = out.responses.iter().map(|r| match r {
            Response::Ready { name, .. } | Response::Error { name, .. } => name.as_str(),
        }).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        prop_assert_eq!(names.len(), before, "a name answered twice: {:?}", out);
        prop_assert_eq!(ResponseList::decode(&out.encode()).unwrap(), out.clone());
        plan_ready(&out, decoded.len(), threshold)?;
    }

    #[test]
    fn fuzz_fusion_round_trip_and_mutations(req in request_list(), resp in response_list(), ms in mutations(), world in 1usize..9, threshold in count()) {
        prop_assert_eq!(RequestList::decode(&req.encode()).unwrap(), req.clone());
        prop_assert_eq!(ResponseList::decode(&resp.encode()).unwrap(), resp.clone());
        match RequestList::decode(&mutate(req.encode(), &ms)) {
            Ok(l) => prop_assert_eq!(RequestList::decode(&l.encode()).unwrap(), l),
            Err(e) => named(&e, wire::REQUESTS)?,
        }
        match ResponseList::decode(&mutate(resp.encode(), &ms)) {
            Ok(l) => plan_ready(&l, world, threshold)?,
            Err(e) => named(&e, wire::RESPONSES)?,
        }
    }

    // -------------------------------------------------------- unique id

    #[test]
    fn fuzz_unique_id_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), UniqueId::LEN), keep_magic in any::<bool>()) {
        let mut b: [u8; UniqueId::LEN] = b.try_into().unwrap();
        if keep_magic {
            b[..8].copy_from_slice(b"OXCCLUID");
        }
        check_unique_id(&b)?;
    }

    #[test]
    fn fuzz_unique_id_round_trip_and_mutations(id in unique_id(), ms in mutations()) {
        let bytes = id.to_bytes();
        prop_assert_eq!(UniqueId::from_bytes(&bytes).unwrap(), id);
        let mut b = mutate(bytes.to_vec(), &ms);
        // The byte form is fixed-size: what a caller passes is 128 bytes.
        b.resize(UniqueId::LEN, 0);
        check_unique_id(&b.try_into().unwrap())?;
    }

    // -------------------------------------------------------- bootstrap

    /// The job id rank 0 wrote in the store, as any store client could
    /// have overwritten it: 8 bytes, or an internal error saying so.
    #[test]
    fn fuzz_bootstrap_job_id(v in any_bytes(16)) {
        let store = MemStore::new();
        store.set("oxccl/job", &v).unwrap();
        match read_job(&store, "oxccl/job", 1, Instant::now() + Duration::from_secs(5)) {
            Ok(job) => prop_assert_eq!(&job.to_le_bytes()[..], &v[..]),
            Err(e) => {
                prop_assert_ne!(v.len(), 8);
                prop_assert!(e.to_string().contains("malformed job id"), "{}", e);
            }
        }
    }

    /// Another rank's settings as rank 0 reads them from the store: any
    /// text. The first setting that differs is named, or none.
    #[test]
    fn fuzz_bootstrap_settings(theirs in prop_oneof![".{0,80}", "([A-Z_]{1,6}=[a-z0-9]{0,3}\n){0,4}"], r in count()) {
        let mine = "OXCCL_A=1\nOXCCL_B=x=y\nOXCCL_C=\n";
        match differ(mine, &theirs, r) {
            Some((name, reason)) => {
                prop_assert!(mine.lines().any(|l| l.split_once('=').is_some_and(|(k, _)| k == name)), "{}", name);
                prop_assert!(reason.contains(&format!("rank {r}")), "{}", reason);
            }
            None => {
                for l in mine.lines() {
                    prop_assert!(theirs.lines().any(|t| t == l) || theirs.lines().any(|t| t.split_once('=') == l.split_once('=')), "{:?} lacks {:?}", theirs, l);
                }
            }
        }
        prop_assert_eq!(differ(mine, mine, r), None);
    }
}

// ------------------------------------------------------------ findings

/// Found by `fuzz_fusion_round_trip_and_mutations`: a count in rank 0's
/// answer (a peer's bytes) multiplied by the element size overflowed in
/// `Meta::bytes` while the ready tensors were grouped into buckets: a panic
/// in debug builds, a wrong small size (and a fused copy of a tensor that
/// does not fit) in release builds. The size now saturates, so such a
/// tensor goes alone and its own call refuses it against the local one.
#[test]
fn regression_fusion_huge_count_from_a_peer_is_planned_alone() {
    let huge = Meta::new(
        Kind::AllGather,
        DType::F64,
        ReduceOp::Sum,
        0,
        usize::MAX / 4,
    );
    assert_eq!(huge.bytes(8), usize::MAX);
    let small = Meta::new(Kind::AllGather, DType::F64, ReduceOp::Sum, 0, 1);
    let answer = ResponseList {
        responses: vec![
            Response::Ready {
                name: "a".into(),
                meta: small,
            },
            Response::Ready {
                name: "b".into(),
                meta: huge,
            },
        ],
        ..ResponseList::default()
    };
    let decoded = ResponseList::decode(&answer.encode()).unwrap();
    assert_eq!(decoded, answer);
    assert_eq!(
        buckets(&[small, huge], 8, 1 << 20, usize::MAX),
        vec![vec![1], vec![0]]
    );
    // Near the threshold's own limit, the running sum saturates too.
    assert_eq!(
        buckets(&[small, small], 1, usize::MAX - 1, usize::MAX),
        vec![vec![0, 1]]
    );
}
