//! The fusion engine with in-process ranks: results against the reference
//! reducer, the response cache, errors, stalls and the timeline.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use oxccl::fusion::{FusionEngine, Handle};
use oxccl::{Communicator, Config, Element, ErrorKind, ReduceOp, bf16, f16};
use oxccl_kernels::reference::reduce_all;
use proptest::prelude::*;

fn config(threshold: usize) -> Config {
    Config {
        fusion_threshold: threshold,
        cycle_time: Duration::from_millis(1),
        timeout: Duration::from_secs(30),
        ..Config::default()
    }
}

fn engines(world: usize, config: Config) -> Vec<FusionEngine> {
    Communicator::in_process(world, config)
        .unwrap()
        .into_iter()
        .map(|c| FusionEngine::new(c).unwrap())
        .collect()
}

/// Small integers every dtype holds exactly, so sums are exact in any order.
fn value(rank: usize, tensor: usize, i: usize) -> i64 {
    ((rank * 31 + tensor * 7 + i * 3) % 9) as i64 - 4
}

fn data<T: Element>(rank: usize, tensor: usize, n: usize, conv: fn(i64) -> T) -> Vec<T> {
    (0..n).map(|i| conv(value(rank, tensor, i))).collect()
}

/// One tensor of a test: dtype index, elements, kind (0 allreduce, 1 allgather, 2 broadcast), op.
#[derive(Debug, Clone)]
struct Spec {
    dtype: usize,
    count: usize,
    kind: usize,
    op: ReduceOp,
}

enum Any {
    F32(Handle<f32>),
    F64(Handle<f64>),
    I32(Handle<i32>),
    F16(Handle<f16>),
    BF16(Handle<bf16>),
    U8(Handle<u8>),
}

fn submit<T: Element>(
    e: &FusionEngine,
    t: usize,
    s: &Spec,
    conv: fn(i64) -> T,
    wrap: fn(Handle<T>) -> Any,
) -> Any {
    let name = format!("t{t}");
    let v = data(e.rank(), t, s.count, conv);
    wrap(match s.kind {
        0 => e.allreduce_async(name, v, s.op),
        1 => e.allgather_async(name, v),
        _ => e.broadcast_async(name, v, t % e.world()),
    })
}

fn expected<T: Element>(world: usize, t: usize, s: &Spec, conv: fn(i64) -> T) -> Vec<T> {
    let inputs: Vec<Vec<T>> = (0..world).map(|r| data(r, t, s.count, conv)).collect();
    match s.kind {
        0 => {
            let refs: Vec<&[T]> = inputs.iter().map(|v| v.as_slice()).collect();
            reduce_all(s.op, &refs)
        }
        1 => inputs.concat(),
        _ => inputs[t % world].clone(),
    }
}

fn check(world: usize, t: usize, s: &Spec, h: Any) {
    fn eq<T: Element>(got: Vec<T>, want: Vec<T>, t: usize) {
        assert_eq!(got, want, "tensor t{t}");
    }
    match h {
        Any::F32(h) => eq(h.wait().unwrap(), expected(world, t, s, |v| v as f32), t),
        Any::F64(h) => eq(h.wait().unwrap(), expected(world, t, s, |v| v as f64), t),
        Any::I32(h) => eq(h.wait().unwrap(), expected(world, t, s, |v| v as i32), t),
        Any::F16(h) => eq(
            h.wait().unwrap(),
            expected(world, t, s, |v| f16::from_f64(v as f64)),
            t,
        ),
        Any::BF16(h) => eq(
            h.wait().unwrap(),
            expected(world, t, s, |v| bf16::from_f64(v as f64)),
            t,
        ),
        Any::U8(h) => eq(h.wait().unwrap(), expected(world, t, s, |v| v as u8), t),
    }
}

fn submit_any(e: &FusionEngine, t: usize, s: &Spec) -> Any {
    match s.dtype {
        0 => submit(e, t, s, |v| v as f32, Any::F32),
        1 => submit(e, t, s, |v| v as f64, Any::F64),
        2 => submit(e, t, s, |v| v as i32, Any::I32),
        3 => submit(e, t, s, |v| f16::from_f64(v as f64), Any::F16),
        4 => submit(e, t, s, |v| bf16::from_f64(v as f64), Any::BF16),
        _ => submit(e, t, s, |v| v as u8, Any::U8),
    }
}

/// Submits `specs` on every rank, each rank in its own order, and checks every result.
fn run_step(engines: &[FusionEngine], specs: &[Spec], orders: &[Vec<usize>]) {
    let world = engines.len();
    let mut handles: Vec<Vec<(usize, Any)>> = Vec::new();
    for (e, order) in engines.iter().zip(orders) {
        handles.push(
            order
                .iter()
                .map(|&t| (t, submit_any(e, t, &specs[t])))
                .collect(),
        );
    }
    for hs in handles {
        for (t, h) in hs {
            check(world, t, &specs[t], h);
        }
    }
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    (
        0usize..6,
        prop_oneof![1usize..8, 8usize..200, 200usize..1500],
        prop_oneof![4 => Just(0usize), 1 => Just(1usize), 1 => Just(2usize)],
        prop_oneof![
            Just(ReduceOp::Sum),
            Just(ReduceOp::Max),
            Just(ReduceOp::Min),
            Just(ReduceOp::Avg)
        ],
    )
        .prop_map(|(dtype, count, kind, op)| Spec {
            dtype,
            count,
            kind,
            op,
        })
}

fn case_strategy() -> impl Strategy<Value = (usize, Vec<Spec>, Vec<Vec<usize>>)> {
    (1usize..=4, prop::collection::vec(spec_strategy(), 1..24)).prop_flat_map(|(world, specs)| {
        let n = specs.len();
        let orders = prop::collection::vec(Just((0..n).collect::<Vec<_>>()).prop_shuffle(), world);
        (Just(world), Just(specs), orders)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random tensors (1 element to above the 1 KiB threshold, mixed dtypes,
    /// ops and kinds) in a different random order on each rank, twice (the
    /// second time through the cache): every result equals the reference.
    #[test]
    fn fused_results_equal_the_reference((world, specs, orders) in case_strategy()) {
        let engines = engines(world, config(1024));
        run_step(&engines, &specs, &orders);
        let reversed: Vec<Vec<usize>> =
            orders.iter().map(|o| o.iter().rev().copied().collect()).collect();
        run_step(&engines, &specs, &reversed);
        let s = engines[0].stats();
        prop_assert_eq!(s.tensors, 2 * specs.len() as u64);
        prop_assert_eq!(s.failed, 0);
    }
}

/// Leaves every engine with a pending tensor only it has submitted, so that
/// no engine is idle: the next cycle (one `cycle_time` later) takes
/// everything submitted meanwhile at once.
fn prime(engines: &[FusionEngine]) -> Vec<Handle<u8>> {
    let hs = engines
        .iter()
        .map(|e| e.allreduce_async(format!("prime{}", e.rank()), vec![1u8], ReduceOp::Sum))
        .collect();
    std::thread::sleep(Duration::from_millis(30));
    hs
}

/// Completes the tensors of [`prime`].
fn unprime(engines: &[FusionEngine], hs: Vec<Handle<u8>>) {
    let mut all = hs;
    for e in engines {
        for q in 0..engines.len() {
            if q != e.rank() {
                all.push(e.allreduce_async(format!("prime{q}"), vec![1u8], ReduceOp::Sum));
            }
        }
    }
    for h in all {
        assert_eq!(h.wait().unwrap(), vec![engines.len() as u8]);
    }
}

fn slow(threshold: usize) -> Config {
    Config {
        cycle_time: Duration::from_millis(300),
        ..config(threshold)
    }
}

fn grads(n: usize) -> Vec<Spec> {
    (0..n)
        .map(|t| Spec {
            dtype: t % 2,
            count: 10 + 37 * t,
            kind: 0,
            op: ReduceOp::Sum,
        })
        .collect()
}

#[test]
fn repeated_steps_use_the_cache_and_a_new_pattern_is_negotiated() {
    let world = 3;
    let engines = engines(world, config(4096));
    let specs = grads(12);
    let fwd: Vec<usize> = (0..12).collect();
    let orders = vec![
        fwd.clone(),
        fwd.iter().rev().copied().collect(),
        vec![5, 0, 11, 3, 1, 10, 2, 4, 9, 6, 8, 7],
    ];
    run_step(&engines, &specs, &orders);
    let first = engines[0].stats();
    assert!(first.coordination_rounds >= 1, "{first:?}");
    assert_eq!(first.negotiated + first.cache_hits, 12, "{first:?}");
    for _ in 0..5 {
        run_step(&engines, &specs, &orders);
    }
    let later = engines[0].stats();
    assert_eq!(
        later.coordination_rounds, first.coordination_rounds,
        "steps after the first need no coordination: {later:?}"
    );
    assert_eq!(later.cache_hits - first.cache_hits, 5 * 12, "{later:?}");
    assert_eq!(later.cache_entries, 12);
    assert!(
        later.collectives < later.tensors,
        "tensors were fused: {later:?}"
    );

    // A changed pattern: new shapes for some names, new names, fewer tensors.
    let mut changed = grads(8);
    changed[2].count = 3;
    changed[5].dtype = 2;
    changed.push(Spec {
        dtype: 3,
        count: 5000,
        kind: 0,
        op: ReduceOp::Max,
    });
    let n = changed.len();
    let orders: Vec<Vec<usize>> = (0..world)
        .map(|r| (0..n).map(|i| (i + r * 3) % n).collect())
        .collect();
    run_step(&engines, &changed, &orders);
    let after = engines[0].stats();
    assert!(
        after.coordination_rounds > later.coordination_rounds,
        "{after:?}"
    );
    run_step(&engines, &changed, &orders);
    let again = engines[0].stats();
    assert_eq!(
        again.coordination_rounds, after.coordination_rounds,
        "{again:?}"
    );
    // Changed names took over their slots.
    assert_eq!(again.cache_entries, 12, "{again:?}");
    assert_eq!(again.failed, 0);
    for e in &engines {
        assert_eq!(e.stats().tensors, 6 * 12 + 2 * n as u64);
    }
}

#[test]
fn large_tensors_go_alone_and_small_ones_share_a_buffer() {
    let engines = engines(2, slow(1000));
    let primed = prime(&engines);
    let handles: Vec<_> = engines
        .iter()
        .map(|e| {
            let big = e.allreduce_async("big", vec![1.0f32; 1000], ReduceOp::Sum);
            let small: Vec<_> = (0..10)
                .map(|i| e.allreduce_async(format!("s{i}"), vec![i as f32; 10], ReduceOp::Sum))
                .collect();
            (big, small)
        })
        .collect();
    for (big, small) in handles {
        assert_eq!(big.wait().unwrap(), vec![2.0f32; 1000]);
        for (i, h) in small.into_iter().enumerate() {
            assert_eq!(h.wait().unwrap(), vec![2.0 * i as f32; 10]);
        }
    }
    let s = engines[0].stats();
    assert_eq!(
        (s.tensors, s.collectives, s.fused_collectives),
        (11, 2, 1),
        "{s:?}"
    );
    unprime(&engines, primed);
}

#[test]
fn mismatched_shapes_dtypes_and_ops_fail_on_every_rank_naming_them() {
    let engines = engines(3, config(1 << 20));
    let shape: Vec<_> = engines
        .iter()
        .map(|e| {
            e.allreduce_async(
                "w",
                vec![1.0f32; 4 + usize::from(e.rank() == 2)],
                ReduceOp::Sum,
            )
        })
        .collect();
    let op: Vec<_> = engines
        .iter()
        .map(|e| {
            let op = if e.rank() == 1 {
                ReduceOp::Max
            } else {
                ReduceOp::Sum
            };
            e.allreduce_async("b", vec![1i32; 4], op)
        })
        .collect();
    let ok: Vec<_> = engines
        .iter()
        .map(|e| e.allreduce_async("fine", vec![1u8; 4], ReduceOp::Sum))
        .collect();
    for h in shape {
        let e = h.wait().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidUsage);
        assert_eq!(
            e.to_string(),
            "invalid usage: tensor 'w' differs between ranks: ranks 0, 1 submitted allreduce \
             (f32 sum, 4 elements); rank 2 submitted allreduce (f32 sum, 5 elements)"
        );
    }
    for h in op {
        let e = h.wait().unwrap_err().to_string();
        assert!(
            e.contains("tensor 'b' differs between ranks")
                && e.contains("rank 1 submitted allreduce (i32 max, 4 elements)")
                && e.contains("ranks 0, 2 submitted allreduce (i32 sum, 4 elements)"),
            "{e}"
        );
    }
    for h in ok {
        assert_eq!(h.wait().unwrap(), vec![3u8; 4]);
    }
    // A dtype mismatch, after the name was cached with another dtype.
    let d: Vec<_> = engines
        .iter()
        .map(|e| e.allreduce_async("fine", vec![1u8; 4], ReduceOp::Sum))
        .collect();
    for h in d {
        h.wait().unwrap();
    }
    let f32s = engines[0].allreduce_async("fine", vec![1.0f32; 4], ReduceOp::Sum);
    let u8s: Vec<_> = engines[1..]
        .iter()
        .map(|e| e.allreduce_async("fine", vec![1u8; 4], ReduceOp::Sum))
        .collect();
    let e = f32s.wait().unwrap_err().to_string();
    assert!(
        e.contains("rank 0 submitted allreduce (f32 sum, 4 elements)")
            && e.contains("ranks 1, 2 submitted allreduce (u8 sum, 4 elements)"),
        "{e}"
    );
    for h in u8s {
        assert_eq!(h.wait().unwrap_err().to_string(), e);
    }
    // The engines still work.
    let hs: Vec<_> = engines
        .iter()
        .map(|e| e.broadcast_async("after", vec![e.rank() as i64; 3], 2))
        .collect();
    for h in hs {
        assert_eq!(h.wait().unwrap(), vec![2i64; 3]);
    }
}

/// A name submitted again while the engine still holds it fails every
/// rank's handles. The two submissions are made under a hold, so that the
/// engine takes them together: a duplicate is found where the engine
/// takes submissions, and one that comes after the first has run (here the
/// first can run as soon as rank 1 submits, and an idle engine wakes at
/// once for it) is a new submission of the name.
#[test]
fn a_name_submitted_twice_fails_on_every_rank() {
    let engines = engines(2, config(1 << 20));
    let hold = engines[0].hold();
    let first = engines[0].allreduce_async("g", vec![1.0f32; 4], ReduceOp::Sum);
    let second = engines[0].allreduce_async("g", vec![2.0f32; 4], ReduceOp::Sum);
    drop(hold);
    let other = engines[1].allreduce_async("g", vec![1.0f32; 4], ReduceOp::Sum);
    let want = "invalid usage: tensor 'g' was submitted again before it completed, on rank 0";
    for h in [first, second, other] {
        assert_eq!(h.wait().unwrap_err().to_string(), want);
    }
    assert_eq!(engines[1].stats().failed, 1);
}

#[test]
fn stalls_are_warned_about_then_fail_every_handle() {
    let cfg = Config {
        stall_warning: Duration::from_millis(100),
        stall_shutdown: Some(Duration::from_millis(600)),
        ..config(1 << 20)
    };
    let engines = engines(3, cfg);
    // Rank 2 never submits "late"; everyone submits "fine".
    let late: Vec<_> = engines[..2]
        .iter()
        .map(|e| e.allreduce_async("late", vec![1.0f32; 4], ReduceOp::Sum))
        .collect();
    let fine: Vec<_> = engines
        .iter()
        .map(|e| e.allreduce_async("fine", vec![1.0f32; 4], ReduceOp::Sum))
        .collect();
    for h in fine {
        assert_eq!(h.wait().unwrap(), vec![3.0f32; 4]);
    }
    for h in late {
        let e = h.wait().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidUsage);
        let e = e.to_string();
        assert!(
            e.contains("stalled past OXCCL_STALL_SHUTDOWN_SECS: tensor 'late' (allreduce (f32 sum, 4 elements)) was submitted by ranks 0, 1")
                && e.contains("rank 2 has not submitted it"),
            "{e}"
        );
    }
    for e in &engines {
        let w = e.stall_warnings();
        assert!(!w.is_empty(), "rank {}", e.rank());
        assert!(
            w[0].starts_with(
                "tensor 'late' (allreduce (f32 sum, 4 elements)) was submitted by ranks 0, 1"
            ) && w[0].ends_with("rank 2 has not submitted it"),
            "{w:?}"
        );
    }
    // The engine is closed: later submissions fail at once, naming the stall.
    let e = engines[2]
        .allreduce_async("next", vec![0u8; 1], ReduceOp::Sum)
        .wait()
        .unwrap_err();
    assert_eq!(e.cause_kind(), ErrorKind::InvalidUsage);
    assert!(
        e.to_string()
            .contains("stalled past OXCCL_STALL_SHUTDOWN_SECS: tensor 'late'"),
        "{e}"
    );
}

#[test]
fn wait_has_a_deadline() {
    let engines = engines(2, config(1 << 20));
    let h = engines[0].allreduce_async("alone", vec![1u32; 2], ReduceOp::Sum);
    let e = h.wait_timeout(Duration::from_millis(200)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(
        e.to_string().starts_with(
            "rank 0: fusion allreduce (u32 sum, 2 elements) of tensor 'alone': no progress"
        ),
        "{e}"
    );
}

#[test]
fn a_communicator_failure_fails_every_pending_handle() {
    let mut comms = Communicator::in_process(2, config(1 << 20)).unwrap();
    let c1 = comms.pop().unwrap();
    let c0 = comms.pop().unwrap();
    let abort = c1.abort_handle();
    let e0 = FusionEngine::new(c0).unwrap();
    let e1 = FusionEngine::new(c1).unwrap();
    let a = e0.allreduce_async("a", vec![1.0f32; 8], ReduceOp::Sum);
    let b = e0.allreduce_async("b", vec![1.0f64; 8], ReduceOp::Sum);
    abort.abort();
    for h in [a.wait().unwrap_err(), b.wait().unwrap_err()] {
        assert_eq!(h.kind(), ErrorKind::Aborted);
        assert_ne!(h.cause_kind(), ErrorKind::Aborted);
    }
    let late = e1.allreduce_async("c", vec![0u8; 1], ReduceOp::Sum).wait();
    assert_eq!(late.unwrap_err().kind(), ErrorKind::Aborted);
    e0.synchronize().unwrap();
}

#[test]
fn shutdown_fails_what_cannot_complete_and_returns_the_communicator() {
    let mut es = engines(2, config(1 << 20));
    let e1 = es.pop().unwrap();
    let e0 = es.pop().unwrap();
    let done: Vec<_> = [&e0, &e1]
        .iter()
        .map(|e| e.allgather_async("g", vec![e.rank() as u64 + 1; 2]))
        .collect();
    for h in done {
        assert_eq!(h.wait().unwrap(), vec![1, 1, 2, 2]);
    }
    e1.synchronize().unwrap();
    let orphan = e1.allreduce_async("orphan", vec![1.0f32], ReduceOp::Sum);
    let comm = e0.shutdown().unwrap();
    assert_eq!(comm.rank(), 0);
    let e = orphan.wait().unwrap_err().to_string();
    assert!(
        e.contains("tensor 'orphan' (allreduce (f32 sum, 1 elements)) cannot complete: rank 0 shut the fusion engine down"),
        "{e}"
    );
    drop(e1);
}

#[test]
fn timeline_is_a_chrome_trace_with_every_phase() {
    let dir = std::env::temp_dir().join(format!("oxccl-timeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("trace.json");
    let cfg = Config {
        timeline: Some(path.clone()),
        ..slow(1 << 20)
    };
    let es = engines(2, cfg);
    let primed = prime(&es);
    let hs: Vec<_> = es
        .iter()
        .flat_map(|e| {
            [
                e.allreduce_async("x", vec![1.0f32; 16], ReduceOp::Sum),
                e.allreduce_async("y", vec![1.0f32; 16], ReduceOp::Sum),
            ]
        })
        .collect();
    for h in hs {
        h.wait().unwrap();
    }
    unprime(&es, primed);
    drop(es);
    for (rank, p) in [(0, path.clone()), (1, dir.join("trace.json.1"))] {
        let text = std::fs::read_to_string(&p).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let events = v.as_array().unwrap();
        let tids: Vec<&serde_json::Value> = events
            .iter()
            .filter(|e| {
                e["name"] == "thread_name" && (e["args"]["name"] == "x" || e["args"]["name"] == "y")
            })
            .map(|e| &e["tid"])
            .collect();
        let phases: Vec<&str> = events
            .iter()
            .filter(|e| e["ph"] == "X" && tids.contains(&&e["tid"]))
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        for phase in ["NEGOTIATE", "PACK", "COLLECTIVE", "UNPACK"] {
            assert_eq!(
                phases.iter().filter(|p| **p == phase).count(),
                2,
                "{phase} in {text}"
            );
        }
        assert!(events.iter().all(|e| e["pid"] == rank));
        let coll = events
            .iter()
            .find(|e| e["name"] == "COLLECTIVE" && tids.contains(&&e["tid"]))
            .unwrap();
        assert_eq!(coll["args"]["bucket_bytes"], 128);
        assert_eq!(coll["args"]["bucket_tensors"], 2);
        assert!(
            events
                .iter()
                .any(|e| e["name"] == "thread_name" && e["args"]["name"] == "x")
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A caller that waits ([`FusionEngine::synchronize`], or `flush` before
/// waiting on handles) does not wait for the cycle timer: rank 0 has a
/// tensor pending that rank 1 submits only later, so rank 0's engine is
/// not idle and would take its next cycle a `cycle_time` (10 s here) after
/// the last; flushed, both complete as soon as rank 1 has submitted.
#[test]
fn synchronize_flushes_instead_of_waiting_for_the_cycle_timer() {
    let cfg = Config {
        cycle_time: Duration::from_secs(10),
        ..config(4096)
    };
    let engines = engines(2, cfg);
    let t0 = std::time::Instant::now();
    std::thread::scope(|s| {
        for e in &engines {
            s.spawn(move || {
                let r = e.rank();
                // Rank 0 submits "a" then "b"; rank 1 "b", then "a" later,
                // so that "a" stays pending on rank 0 after a cycle.
                let names = if r == 0 { ["a", "b"] } else { ["b", "a"] };
                let h0 =
                    e.allreduce_async(names[0].to_string(), vec![r as u32 + 1; 5], ReduceOp::Sum);
                if r == 1 {
                    std::thread::sleep(Duration::from_millis(200));
                }
                let h1 =
                    e.allreduce_async(names[1].to_string(), vec![r as u32 + 1; 5], ReduceOp::Sum);
                e.synchronize().unwrap();
                assert_eq!(h0.wait().unwrap(), vec![3; 5]);
                assert_eq!(h1.wait().unwrap(), vec![3; 5]);
            });
        }
    });
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "took {took:?}: the flushed cycles waited for the 10 s timer"
    );
    // Together: a shutdown is a cycle too.
    std::thread::scope(|s| {
        for e in engines {
            s.spawn(move || e.shutdown().unwrap());
        }
    });
}

/// Submissions under a hold reach the negotiation together: while rank 1
/// holds, its first tensors are not negotiated (nothing completes, though
/// rank 0 has submitted everything and flushes); once it drops, all of them
/// run in one fused collective on both ranks.
#[test]
fn a_hold_hands_its_submissions_over_together() {
    let engines = engines(2, config(1 << 20));
    std::thread::scope(|s| {
        for e in &engines {
            s.spawn(move || {
                let r = e.rank();
                let hold = e.hold();
                let hs: Vec<_> = (0..10)
                    .map(|t| {
                        let h = e.allreduce_async(
                            format!("t{t}"),
                            vec![r as f32 + 1.0; 7 + t],
                            ReduceOp::Sum,
                        );
                        if r == 1 && t == 0 {
                            // rank 0's cycles run meanwhile; t0 must not.
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        h
                    })
                    .collect();
                if r == 1 {
                    assert_eq!(e.stats().tensors, 0, "tensors ran while held");
                }
                drop(hold);
                e.synchronize().unwrap();
                for (t, h) in hs.into_iter().enumerate() {
                    assert_eq!(h.wait().unwrap(), vec![3.0f32; 7 + t]);
                }
                let st = e.stats();
                assert_eq!(
                    (st.tensors, st.collectives, st.fused_collectives),
                    (10, 1, 1),
                    "{st:?}"
                );
            });
        }
    });
}

/// An engine with nothing submitted cycles every 16 cycle times, not every
/// cycle time (its cycles only serve the other ranks), and a submission
/// still starts a cycle at once: 2 ranks idle for 300 ms at a cycle time
/// of 1 ms run about 19 cycles (300 before), then complete a tensor.
#[test]
fn idle_engines_cycle_every_sixteen_cycle_times() {
    let engines = engines(2, config(4096));
    std::thread::sleep(Duration::from_millis(300));
    let idle = engines[0].stats().cycles;
    assert!(
        (1..=30).contains(&idle),
        "{idle} cycles in 300 ms of an idle engine at 1 ms a cycle"
    );
    let hs: Vec<_> = engines
        .iter()
        .map(|e| e.allreduce_async("x", vec![1u32; 3], ReduceOp::Sum))
        .collect();
    for h in hs {
        assert_eq!(h.wait().unwrap(), vec![2u32; 3]);
    }
    assert!(engines[0].stats().cycles > idle);
}
