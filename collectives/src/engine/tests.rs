//! The engine's own tests: real `run` loops, one thread per rank, over
//! fault-injecting links (a byte at a time, stalls, failures, silence).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use oxccl_kernels::reference::{ReferenceReducer, reduce_all};
use oxccl_kernels::{DType, ReduceOp};
use oxccl_transport::fault::{self, FaultLink, Faults};
use oxccl_transport::wire::DESCRIPTOR_LEN;
use oxccl_transport::{
    Capabilities, Endpoint, Incoming, MessageLink, Outgoing, Status, TransportError,
};

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
                            scratch: None,
                            timeout,
                            spin: Duration::from_micros(50),
                            crowded: false,
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
            scratch: None,
            timeout,
            spin: Duration::from_micros(50),
            crowded: false,
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
    // The receive posted on the other link is taken back too (an RDMA
    // adapter would otherwise write into the freed buffer).
    assert_eq!(prev.withdrawals(), 1, "the receive was not withdrawn");
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

/// A link that insists on registered memory, as RDMA does: it fails any
/// post from or into memory not registered first.
#[derive(Debug)]
struct Registering<'l> {
    inner: &'l mut FaultLink,
    /// Registered address ranges; `None`: registration is ignored (so
    /// every post fails), to show the check bites.
    regions: Option<Vec<std::ops::Range<usize>>>,
    posts: &'l std::sync::atomic::AtomicUsize,
}

impl Registering<'_> {
    fn check(&mut self, parts: &[oxccl_transport::Lent<'_>]) -> Result<(), TransportError> {
        self.posts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let regions = self.regions.as_deref().unwrap_or_default();
        for p in parts {
            let b = p.bytes();
            let at = b.as_ptr() as usize;
            if !b.is_empty()
                && !regions
                    .iter()
                    .any(|r| r.start <= at && at + b.len() <= r.end)
            {
                return Err(TransportError::Protocol {
                    peer: self.inner.peer(),
                    reason: format!("{} bytes at {at:#x} posted unregistered", b.len()),
                });
            }
        }
        Ok(())
    }
}

impl Endpoint for Registering<'_> {
    fn peer(&self) -> usize {
        self.inner.peer()
    }
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        Endpoint::fd(&*self.inner)
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            registration: true,
            ..Capabilities::default()
        }
    }
    fn withdraw(&mut self) {
        self.inner.withdraw()
    }
    fn shutdown_handle(&self) -> Result<oxccl_transport::ShutdownHandle, TransportError> {
        self.inner.shutdown_handle()
    }
    fn describe(&self) -> String {
        "registering".into()
    }
}

impl MessageLink for Registering<'_> {
    fn register(&mut self, mem: &[u8]) -> Result<(), TransportError> {
        if let Some(r) = &mut self.regions {
            let at = mem.as_ptr() as usize;
            r.push(at..at + mem.len());
        }
        Ok(())
    }
    fn post_send(&mut self, m: &mut Outgoing<'_>) -> Result<Status, TransportError> {
        self.check(m.payload())?;
        self.inner.post_send(m)
    }
    fn test_send(&mut self, m: &mut Outgoing<'_>) -> Result<Status, TransportError> {
        self.inner.test_send(m)
    }
    fn post_recv(&mut self, m: &mut Incoming<'_>) -> Result<Status, TransportError> {
        self.check(m.buffers())?;
        self.inner.post_recv(m)
    }
    fn test_recv(&mut self, m: &mut Incoming<'_>) -> Result<Status, TransportError> {
        self.inner.test_recv(m)
    }
}

/// Allreduces over links that need registration, out of place and in
/// place, with frames received in place (8 KiB) and staged: every post is
/// of registered memory, and the results are right. With registration
/// ignored by the link, the first post fails.
#[test]
fn every_posted_buffer_is_registered_first_where_the_link_asks() {
    for record in [true, false] {
        for in_place in [false, true] {
            let count = 10_000;
            let mut links = fault::ring(2, |_| Faults::default()).unwrap();
            let results: Vec<Result<(Vec<i32>, usize), EngineError>> = std::thread::scope(|s| {
                let threads: Vec<_> = links
                    .iter_mut()
                    .enumerate()
                    .map(|(rank, l)| {
                        let (next, prev) = l.as_mut().unwrap();
                        s.spawn(move || {
                            let mut sh = shape(Kind::AllReduce, 2, rank, count);
                            sh.out_of_place = !in_place;
                            let p = plan(&sh);
                            let own = input(rank, count);
                            let mut out = if in_place {
                                own.clone()
                            } else {
                                vec![0; count]
                            };
                            let mut staging = Vec::new();
                            let posts = std::sync::atomic::AtomicUsize::new(0);
                            let shut = [
                                next.shutdown_handle().unwrap(),
                                prev.shutdown_handle().unwrap(),
                            ];
                            let wrap = |inner| Registering {
                                inner,
                                regions: record.then(Vec::new),
                                posts: &posts,
                            };
                            let r = {
                                let mut links = Links::new(
                                    Box::new(wrap(next)),
                                    Box::new(wrap(prev)),
                                    Vec::new(),
                                );
                                run(
                                    Some(&mut links),
                                    Job {
                                        plan: &p,
                                        seq: 1,
                                        descriptor: [1; DESCRIPTOR_LEN],
                                        input: (!in_place)
                                            .then(|| Input::Host(bytemuck::cast_slice(&own))),
                                        output: Output::Host(bytemuck::cast_slice_mut(&mut out)),
                                        dtype: DType::I32,
                                        op: ReduceOp::Sum,
                                        world: 2,
                                        reducer: &ReferenceReducer,
                                        staging: &mut staging,
                                        scratch: None,
                                        timeout: Duration::from_millis(500),
                                        spin: Duration::from_micros(50),
                                        crowded: false,
                                        single_copy_from: None,
                                    },
                                )
                            };
                            if r.is_err() {
                                // As a communicator does: the peer fails at once.
                                shut.iter().for_each(|h| h.shutdown());
                            }
                            r.map(|()| (out, posts.into_inner()))
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).collect()
            });
            let want = expected(Kind::AllReduce, 2, count);
            for (rank, r) in results.into_iter().enumerate() {
                match (record, r) {
                    (true, Ok((out, posts))) => {
                        assert_eq!(out, want, "rank {rank}, in place {in_place}");
                        assert!(posts >= 4, "{posts} posts");
                    }
                    (
                        false,
                        Err(EngineError::Transport(TransportError::Protocol { reason, .. })),
                    ) if reason.contains("unregistered") => {}
                    (false, Err(_)) => {} // the peer of the rank that failed first
                    (record, other) => panic!("record {record}, rank {rank}: {other:?}"),
                }
            }
        }
    }
}

/// The engine's own cost of a small call, with no waiting: both ranks of a
/// 2-rank allgather of 8 bytes each (the small allreduce's exchange) are
/// pumped in turn in one thread over in-process shared-memory links, so
/// the time is all CPU work of the engine and the links. A measurement,
/// not a check (`--ignored`, in release; `OXCCL_BENCH_CALLS` sets the
/// calls per round):
/// `cargo test --release -p oxccl --lib small_call_cost -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement: run in release with --ignored --nocapture"]
fn small_call_cost() {
    use super::Call;
    use crate::algo::{Algorithm, Ring};
    let world = 2;
    let bytes = 8;
    let plans: Vec<_> = (0..world)
        .map(|rank| {
            Ring.plan(&Shape {
                kind: Kind::AllGather,
                world,
                rank,
                count: world * bytes / 4,
                elem: 4,
                root: 0,
                avg: false,
                out_of_place: false,
                slice_elems: bytes / 4,
            })
        })
        .collect();
    let links = crate::links::in_process(world, |a, b| oxccl_transport::shm::pair(a, b, 1 << 20));
    let mut links: Vec<Links<'_>> = links.unwrap().into_iter().map(Option::unwrap).collect();
    let [l0, l1] = &mut links[..] else {
        unreachable!("two ranks")
    };
    let (mut o0, mut o1) = (vec![1u8; world * bytes], vec![2u8; world * bytes]);
    let (mut s0, mut s1) = (Vec::new(), Vec::new());
    let calls: u64 = std::env::var("OXCCL_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let mut best = f64::MAX;
    for _round in 0..5 {
        let start = Instant::now();
        for seq in 0..calls {
            let mut c0 = Call::new(Job {
                plan: &plans[0],
                seq,
                descriptor: [7; DESCRIPTOR_LEN],
                input: None,
                output: Output::Host(o0.as_mut_slice()),
                dtype: DType::F32,
                op: ReduceOp::Sum,
                world,
                reducer: &ReferenceReducer,
                staging: &mut s0,
                scratch: None,
                timeout: Duration::from_secs(10),
                spin: Duration::ZERO,
                crowded: false,
                single_copy_from: None,
            });
            let mut c1 = Call::new(Job {
                plan: &plans[1],
                seq,
                descriptor: [7; DESCRIPTOR_LEN],
                input: None,
                output: Output::Host(o1.as_mut_slice()),
                dtype: DType::F32,
                op: ReduceOp::Sum,
                world,
                reducer: &ReferenceReducer,
                staging: &mut s1,
                scratch: None,
                timeout: Duration::from_secs(10),
                spin: Duration::ZERO,
                crowded: false,
                single_copy_from: None,
            });
            c0.begin().unwrap();
            c1.begin().unwrap();
            while !(c0.done() && c1.done()) {
                if !c0.done() {
                    c0.pump(l0).unwrap();
                }
                if !c1.done() {
                    c1.pump(l1).unwrap();
                }
            }
            c0.finish().unwrap();
            c1.finish().unwrap();
        }
        best = best.min(start.elapsed().as_nanos() as f64 / calls as f64);
    }
    assert_eq!(o0, o1, "both ranks gathered the same bytes");
    println!("small_call_cost: {best:.0} ns per call of both ranks (best of 5 rounds of {calls})");
}

/// What one turn of the engine's loop costs while it waits for a frame
/// that has not come: rank 0's call of the exchange in `small_call_cost`,
/// pumped with its peer silent. A rank sees the frame at the first turn
/// after it lands, so this is added to every small call's latency. A
/// measurement, like `small_call_cost`.
#[test]
#[ignore = "a measurement: run in release with --ignored --nocapture"]
fn waiting_turn_cost() {
    use super::Call;
    use crate::algo::{Algorithm, Ring};
    let world = 2;
    let plan = Ring.plan(&Shape {
        kind: Kind::AllGather,
        world,
        rank: 0,
        count: 4,
        elem: 4,
        root: 0,
        avg: false,
        out_of_place: false,
        slice_elems: 2,
    });
    let links = crate::links::in_process(world, |a, b| oxccl_transport::shm::pair(a, b, 1 << 20));
    let mut links: Vec<Links<'_>> = links.unwrap().into_iter().map(Option::unwrap).collect();
    let mut out = vec![1u8; 16];
    let mut staging = Vec::new();
    let mut call = Call::new(Job {
        plan: &plan,
        seq: 0,
        descriptor: [7; DESCRIPTOR_LEN],
        input: None,
        output: Output::Host(out.as_mut_slice()),
        dtype: DType::F32,
        op: ReduceOp::Sum,
        world,
        reducer: &ReferenceReducer,
        staging: &mut staging,
        scratch: None,
        timeout: Duration::from_secs(10),
        spin: Duration::ZERO,
        crowded: false,
        single_copy_from: None,
    });
    call.begin().unwrap();
    let turns = 2_000_000u32;
    let mut best = f64::MAX;
    for _round in 0..5 {
        let start = Instant::now();
        for _ in 0..turns {
            let p = call.pump(&mut links[0]).unwrap();
            assert!(!call.done() && !p.send_full);
        }
        best = best.min(start.elapsed().as_nanos() as f64 / f64::from(turns));
    }
    println!("waiting_turn_cost: {best:.1} ns per turn (best of 5 rounds of {turns})");
}

/// Device buffers (host memory reached by address, `HostDevice`) over
/// links that take such memory as it is, delivering a few bytes at a time
/// with stalls: frames over the links' threshold go from and into the
/// buffers by address, reductions run through the buffers' own operations
/// into device scratch, smaller frames through host staging; every result
/// against the reference. With a threshold of 0 no byte is staged.
#[test]
fn device_buffers_by_address_over_slow_links_give_exact_results() {
    use oxccl_kernels::hostdev::HostDevice;

    for over in [0usize, 16] {
        for world in [2, 3, 4] {
            for kind in [Kind::AllReduce, Kind::Broadcast, Kind::AllGather] {
                for count in [0, 1, 30, 10_001] {
                    let links = fault::ring(world, |r| Faults {
                        max_chunk: 1000,
                        stall_one_in: 4,
                        seed: r as u64 + 7,
                        by_address_over: Some(over),
                        ..Faults::default()
                    })
                    .unwrap();
                    let got: Vec<(Vec<i32>, usize)> = std::thread::scope(|s| {
                        let threads: Vec<_> = links
                            .into_iter()
                            .enumerate()
                            .map(|(rank, l)| {
                                s.spawn(move || {
                                    let (mut next, mut prev) = l.unwrap();
                                    let sh = shape(kind, world, rank, count);
                                    let p = plan(&sh);
                                    let full = input(rank, count);
                                    let own: Vec<i32> = match kind {
                                        Kind::AllGather => {
                                            full[chunk_range(count, world, rank)].to_vec()
                                        }
                                        _ => full,
                                    };
                                    let inp = HostDevice::from_host(bytemuck::cast_slice(&own));
                                    let mut out = HostDevice::zeroed(count * 4);
                                    let mut staging = Vec::new();
                                    let mut scratch = None;
                                    let mut links = Links::new(
                                        Box::new(&mut next),
                                        Box::new(&mut prev),
                                        Vec::new(),
                                    );
                                    run(
                                        Some(&mut links),
                                        Job {
                                            plan: &p,
                                            seq: 1,
                                            descriptor: [kind as u8; DESCRIPTOR_LEN],
                                            input: Some(Input::Device(&inp)),
                                            output: Output::Device(&mut out),
                                            dtype: DType::I32,
                                            op: ReduceOp::Sum,
                                            world,
                                            reducer: &ReferenceReducer,
                                            staging: &mut staging,
                                            scratch: Some(&mut scratch),
                                            timeout: Duration::from_secs(20),
                                            spin: Duration::from_micros(50),
                                            crowded: false,
                                            single_copy_from: None,
                                        },
                                    )
                                    .unwrap();
                                    let bytes = out.to_host();
                                    let v: Vec<i32> = bytes
                                        .chunks_exact(4)
                                        .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
                                        .collect();
                                    (v, inp.staged_bytes() + out.staged_bytes())
                                })
                            })
                            .collect();
                        threads.into_iter().map(|t| t.join().unwrap()).collect()
                    });
                    let want = expected(kind, world, count);
                    for (rank, (v, staged)) in got.iter().enumerate() {
                        let ctx = format!("{kind:?} world {world} count {count} over {over}");
                        assert_eq!(v, &want, "{ctx}: rank {rank}");
                        if over == 0 {
                            assert_eq!(*staged, 0, "{ctx}: rank {rank} staged");
                        }
                    }
                }
            }
        }
    }
}
