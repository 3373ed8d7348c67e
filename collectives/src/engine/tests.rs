//! The engine's own tests: real `run` loops, one thread per rank, over
//! fault-injecting links (a byte at a time, stalls, failures, silence).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use oxccl_kernels::reference::{ReferenceReducer, reduce_all};
use oxccl_kernels::{DType, ReduceOp};
use oxccl_transport::TransportError;
use oxccl_transport::fault::{self, FaultLink, Faults};
use oxccl_transport::wire::DESCRIPTOR_LEN;

use super::{EngineError, Input, Job, Output, run};
use crate::links::Links;
use crate::schedule::{Kind, Shape, chunk_range, plan};

/// Slices of 7 elements, or of 2048 (8 KiB frames, received in place) for
/// counts from 10,000.
fn shape(kind: Kind, world: usize, rank: usize, count: usize) -> Shape {
    Shape {
        kind,
        world,
        rank,
        count,
        elem: 4,
        root: world - 1,
        avg: false,
        out_of_place: true,
        slice_elems: if count >= 10_000 { 2048 } else { 7 },
    }
}

fn input(rank: usize, count: usize) -> Vec<i32> {
    (0..count)
        .map(|i| (i * 31 + rank * 1000) as i32 % 977 - 400)
        .collect()
}

/// Runs `kind` on every rank over `links` (a rank given `None` for its
/// links does not take part); returns each rank's output or error.
fn run_world(
    kind: Kind,
    count: usize,
    links: Vec<Option<(FaultLink, FaultLink)>>,
    timeout: Duration,
) -> Vec<Result<Vec<i32>, EngineError>> {
    let world = links.len();
    std::thread::scope(|s| {
        let threads: Vec<_> = links
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                s.spawn(move || {
                    let (mut next, mut prev) = l?;
                    let sh = shape(kind, world, rank, count);
                    let p = plan(&sh);
                    let full = input(rank, count);
                    let own: Vec<i32> = match kind {
                        Kind::AllGather => full[chunk_range(count, world, rank)].to_vec(),
                        _ => full,
                    };
                    let mut out = vec![0i32; count];
                    let mut staging = Vec::new();
                    let mut links =
                        Links::new(Box::new(&mut next), Box::new(&mut prev), Vec::new());
                    let result = run(
                        Some(&mut links),
                        Job {
                            plan: &p,
                            seq: 1,
                            descriptor: [kind as u8; DESCRIPTOR_LEN],
                            input: Some(Input::Host(bytemuck::cast_slice(&own))),
                            output: Output::Host(bytemuck::cast_slice_mut(&mut out)),
                            dtype: DType::I32,
                            op: ReduceOp::Sum,
                            world,
                            reducer: &ReferenceReducer,
                            staging: &mut staging,
                            timeout,
                            spin: Duration::from_micros(50),
                            single_copy_from: None,
                        },
                    );
                    // A failed rank closes its links, as a communicator does.
                    Some(result.map(|()| out))
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap().unwrap_or(Ok(Vec::new())))
            .collect()
    })
}

fn expected(kind: Kind, world: usize, count: usize) -> Vec<i32> {
    let ins: Vec<Vec<i64>> = (0..world)
        .map(|r| input(r, count).iter().map(|&x| i64::from(x)).collect())
        .collect();
    let refs: Vec<&[i64]> = ins.iter().map(Vec::as_slice).collect();
    let v: Vec<i64> = match kind {
        Kind::AllReduce => reduce_all(ReduceOp::Sum, &refs),
        Kind::Broadcast => ins[world - 1].clone(),
        Kind::AllGather => {
            let mut v = vec![0; count];
            for (r, x) in ins.iter().enumerate() {
                let c = chunk_range(count, world, r);
                v[c.clone()].copy_from_slice(&x[c]);
            }
            v
        }
        _ => unreachable!("not used here"),
    };
    v.into_iter().map(|x| x as i32).collect()
}

#[test]
fn links_that_deliver_a_byte_at_a_time_and_stall_give_exact_results() {
    for (kind, chunk, count) in [
        (Kind::AllReduce, 1, 100),
        (Kind::AllGather, 1, 100),
        (Kind::Broadcast, 1, 100),
        (Kind::AllReduce, 5, 100),
        (Kind::AllGather, 999, 30_000),
        (Kind::Broadcast, 999, 30_000),
        (Kind::AllReduce, 999, 30_000),
    ] {
        let faults = |r: usize| Faults {
            max_chunk: chunk,
            stall_one_in: 2,
            capacity: 64 * chunk,
            seed: 7 + r as u64,
            ..Faults::default()
        };
        let links = fault::ring(3, faults).unwrap();
        let outs = run_world(kind, count, links, Duration::from_secs(20));
        for (r, o) in outs.into_iter().enumerate() {
            assert_eq!(
                o.unwrap(),
                expected(kind, 3, count),
                "{kind:?} {count} rank {r}"
            );
        }
    }
}

#[test]
fn a_link_that_fails_mid_call_fails_its_rank_and_its_neighbours_name_it() {
    let faults = |r: usize| Faults {
        max_chunk: 16,
        fail_after: (r == 1).then_some(300),
        ..Faults::default()
    };
    let links = fault::ring(3, faults).unwrap();
    let start = Instant::now();
    let outs = run_world(Kind::AllReduce, 1000, links, Duration::from_secs(20));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let errors: Vec<String> = outs
        .iter()
        .map(|o| match o {
            Err(e) => format!("{e:?}"),
            Ok(_) => "completed".into(),
        })
        .collect();
    assert!(
        errors[1].contains("failed after 300 bytes"),
        "{}",
        errors[1]
    );
    // Rank 1 left, and its neighbours fail at once (well before the 20 s
    // timeout) with a closed link: rank 1's, or the other survivor's when
    // that one gave up first. Which went first is the failure protocol's to
    // settle (it reads the origin from the store), not the engine's.
    for r in [0, 2] {
        assert!(
            matches!(
                &outs[r],
                Err(EngineError::Transport(TransportError::PeerClosed { .. }))
            ),
            "rank {r}: {}",
            errors[r]
        );
    }
}

#[test]
fn a_silent_neighbour_times_out_naming_it() {
    let links = fault::ring(2, |_| Faults::default()).unwrap();
    let mut links: Vec<_> = links.into_iter().collect();
    // Rank 1 holds its links open but never calls.
    let silent = links[1].take();
    let start = Instant::now();
    let outs = run_world(Kind::AllReduce, 1000, links, Duration::from_millis(300));
    let waited = start.elapsed();
    match &outs[0] {
        Err(EngineError::Timeout { peer: 1, what, .. }) => {
            assert!(what.starts_with("data from rank 1 (step 0"), "{what}");
        }
        other => panic!("expected a timeout naming rank 1, got {other:?}"),
    }
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(5));
    drop(silent);
}

#[test]
fn a_neighbour_that_closes_mid_frame_is_reported() {
    // Rank 1 writes the first bytes of a frame, then its link closes.
    let faults = |r: usize| Faults {
        max_chunk: 3,
        fail_after: (r == 1).then_some(10),
        ..Faults::default()
    };
    let links = fault::ring(2, faults).unwrap();
    let outs = run_world(Kind::AllGather, 64, links, Duration::from_secs(20));
    assert!(
        matches!(
            &outs[0],
            Err(EngineError::Transport(TransportError::PeerClosed {
                peer: 1,
                ..
            }))
        ),
        "{:?}",
        outs[0]
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// Whatever link fails at whatever byte, every rank returns promptly,
    /// and no rank returns a wrong result: it completes exactly or fails.
    #[test]
    fn a_failure_anywhere_never_hangs_and_never_gives_a_wrong_result(
        kind in proptest::sample::select(vec![Kind::AllReduce, Kind::AllGather, Kind::Broadcast]),
        world in 2usize..=4,
        count in 0usize..300,
        failing in 0usize..4,
        after in 0u64..3000,
        chunk in 1usize..64,
    ) {
        let failing = failing % world;
        let faults = |r: usize| Faults {
            max_chunk: chunk,
            fail_after: (r == failing).then_some(after),
            seed: after,
            ..Faults::default()
        };
        let start = Instant::now();
        let outs = run_world(kind, count, fault::ring(world, faults).unwrap(), Duration::from_secs(20));
        proptest::prop_assert!(start.elapsed() < Duration::from_secs(10));
        let want = expected(kind, world, count);
        for (r, o) in outs.into_iter().enumerate() {
            if let Ok(v) = o {
                proptest::prop_assert_eq!(&v, &want, "rank {} completed with a wrong result", r);
            }
        }
    }
}

/// A reducer that panics, as a bug in a kernel would.
#[derive(Debug)]
struct PanickingReducer;

impl oxccl_kernels::Reducer for PanickingReducer {
    fn name(&self) -> &'static str {
        "panicking"
    }
    fn reduce(
        &self,
        _: DType,
        _: ReduceOp,
        _: &mut [u8],
        _: &[u8],
    ) -> Result<(), oxccl_kernels::KernelError> {
        panic!("a reducer bug");
    }
    fn finish_avg(
        &self,
        _: DType,
        _: &mut [u8],
        _: usize,
    ) -> Result<(), oxccl_kernels::KernelError> {
        panic!("a reducer bug");
    }
}

/// Runs rank `rank`'s allreduce of `count` elements in a world of two over
/// `next` and `prev`, with `reducer`; returns its output or error.
fn run_rank(
    rank: usize,
    count: usize,
    next: &mut FaultLink,
    prev: &mut FaultLink,
    reducer: &dyn oxccl_kernels::Reducer,
    timeout: Duration,
) -> Result<Vec<i32>, EngineError> {
    let p = plan(&shape(Kind::AllReduce, 2, rank, count));
    let own = input(rank, count);
    let mut out = vec![0i32; count];
    let mut staging = Vec::new();
    let mut links = Links::new(Box::new(next), Box::new(prev), Vec::new());
    run(
        Some(&mut links),
        Job {
            plan: &p,
            seq: 1,
            descriptor: [Kind::AllReduce as u8; DESCRIPTOR_LEN],
            input: Some(Input::Host(bytemuck::cast_slice(&own))),
            output: Output::Host(bytemuck::cast_slice_mut(&mut out)),
            dtype: DType::I32,
            op: ReduceOp::Sum,
            world: 2,
            reducer,
            staging: &mut staging,
            timeout,
            spin: Duration::from_micros(50),
            single_copy_from: Some(0),
        },
    )
    .map(|()| out)
}

/// The links of a world of two: rank 0's (to rank 1, from rank 1), then
/// rank 1's. Rank 0's link to rank 1 holds `capacity` bytes in flight.
fn two_ranks(capacity: usize) -> ((FaultLink, FaultLink), (FaultLink, FaultLink)) {
    let small = Faults {
        capacity,
        ..Faults::default()
    };
    let (to1, from0) = fault::pair(0, 1, small, Faults::default()).unwrap();
    let (to0, from1) = fault::pair(1, 0, Faults::default(), Faults::default()).unwrap();
    ((to1, from1), (to0, from0))
}

#[test]
fn a_call_that_fails_mid_frame_withdraws_before_it_returns() {
    // Rank 1 never calls: rank 0's first frame (a 40-byte header and its
    // payload) stops after 20 bytes, and its wait for rank 1's data times
    // out. The buffers the frame came from are the caller's again once
    // `run` returns, so the partial write is withdrawn before.
    let ((mut next, mut prev), _silent) = two_ranks(20);
    let r = run_rank(
        0,
        1000,
        &mut next,
        &mut prev,
        &ReferenceReducer,
        Duration::from_millis(200),
    );
    assert!(
        matches!(r, Err(EngineError::Timeout { peer: 1, .. })),
        "{r:?}"
    );
    assert_eq!(next.withdrawals(), 1, "the partial frame was not withdrawn");
    assert_eq!(prev.withdrawals(), 0, "only the link written to withdraws");
}

#[test]
fn a_call_that_panics_withdraws_before_the_panic_leaves_it() {
    // Rank 0's reducer panics on the first frame it receives, while its own
    // first frame is partly sent (its link holds 20 bytes). A caller that
    // catches the panic (the C API does) may free its buffers at once.
    let ((mut next0, mut prev0), (mut next1, mut prev1)) = two_ranks(20);
    std::thread::scope(|s| {
        let rank1 = s.spawn(|| {
            let r = run_rank(
                1,
                1000,
                &mut next1,
                &mut prev1,
                &ReferenceReducer,
                Duration::from_secs(20),
            );
            (r, next1.withdrawals())
        });
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_rank(
                0,
                1000,
                &mut next0,
                &mut prev0,
                &PanickingReducer,
                Duration::from_secs(20),
            )
        }));
        let withdrawn0 = next0.withdrawals();
        // Rank 0 leaves (a communicator would be dropped or aborted).
        next0.close();
        prev0.close();
        let (r1, withdrawn1) = rank1.join().unwrap();
        assert!(caught.is_err(), "the reducer did not panic: {caught:?}");
        assert_eq!(withdrawn0, 1, "the panic did not withdraw");
        assert!(r1.is_err(), "rank 1 completed: {r1:?}");
        // Rank 1 failed too, and withdrew whatever it had in flight.
        assert_eq!(withdrawn1, 1);
    });
}

#[test]
fn a_call_that_completes_withdraws_nothing() {
    let ((mut next0, mut prev0), (mut next1, mut prev1)) = two_ranks(20);
    let (r0, r1) = std::thread::scope(|s| {
        let rank1 = s.spawn(|| {
            run_rank(
                1,
                1000,
                &mut next1,
                &mut prev1,
                &ReferenceReducer,
                Duration::from_secs(20),
            )
        });
        let r0 = run_rank(
            0,
            1000,
            &mut next0,
            &mut prev0,
            &ReferenceReducer,
            Duration::from_secs(20),
        );
        (r0, rank1.join().unwrap())
    });
    let want: Vec<i32> = input(0, 1000)
        .iter()
        .zip(input(1, 1000))
        .map(|(a, b)| a + b)
        .collect();
    assert_eq!((r0.unwrap(), r1.unwrap()), (want.clone(), want));
    for l in [&next0, &prev0, &next1, &prev1] {
        assert_eq!(l.withdrawals(), 0);
    }
}
