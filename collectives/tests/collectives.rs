//! Every collective against the reference, with in-process ranks on threads
//! (the same engine as multi-process jobs), over both in-process transports:
//! shared-memory rings (of the smallest capacity, so that they wrap and fill
//! all the time) and socket pairs.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use oxccl::{
    Algo, Communicator, Config, DType, Descriptor, Kind, ReduceOp, SingleCopy, Transport,
    run_in_process,
};
use oxccl_kernels::Reducer;
use oxccl_kernels::reference::ReferenceReducer;
use oxccl_tools::pattern::{check_call, count_wrong, input};
use proptest::prelude::*;

/// `small_bytes` 0 sends every allreduce around the ring; a large one sends
/// small allreduces through the gather path. Over shared memory, the
/// collectives that use single copies (allgather, broadcast) use them for
/// every frame, and the others go through a ring smaller than most frames.
fn config(slice_bytes: usize, small_bytes: usize) -> Config {
    Config {
        slice_bytes,
        small_bytes,
        timeout: Duration::from_secs(30),
        shm_bytes: 4096,
        shm_single_copy: SingleCopy::From(1),
        ..Config::default()
    }
}

/// Runs `d` on a fresh in-process world and returns each rank's wrong-element count.
fn run(
    d: Descriptor,
    world: usize,
    slice_bytes: usize,
    in_place: bool,
    small_bytes: usize,
    transport: Transport,
    algo: Algo,
) -> Vec<usize> {
    run_in_process(
        world,
        Config {
            transport,
            algo,
            ..config(slice_bytes, small_bytes)
        },
        |comm: &mut Communicator| check_call(comm, &d, in_place).unwrap(),
    )
    .unwrap()
}

/// The automatic choice, and every algorithm forced where it can run `kind`.
fn algos(kind: Kind) -> Vec<Algo> {
    let mut v = vec![Algo::Auto, Algo::RING];
    match kind {
        Kind::AllReduce | Kind::Barrier => {
            v.push(Algo::Only("halving_doubling"));
            v.push(Algo::Only("recursive_doubling"));
        }
        Kind::Broadcast | Kind::Reduce => v.push(Algo::Only("tree")),
        _ => {}
    }
    v
}

fn assert_right(d: Descriptor, world: usize, slice_bytes: usize, in_place: bool) {
    for transport in [Transport::Shm, Transport::Tcp] {
        for small_bytes in [0, 1 << 20] {
            for algo in algos(d.kind) {
                let wrong = run(
                    d,
                    world,
                    slice_bytes,
                    in_place,
                    small_bytes,
                    transport,
                    algo,
                );
                assert!(
                    wrong.iter().all(|w| *w == 0),
                    "{} world {world} slice {slice_bytes} in_place {in_place} small {small_bytes} {transport:?} {algo:?}: wrong elements per rank {wrong:?}",
                    d.call(0)
                );
            }
        }
    }
}

#[test]
fn every_kind_dtype_and_op() {
    // The exchanges: tests/exchange.rs.
    for kind in Kind::ALL.into_iter().filter(|k| k.on_ring()) {
        for dtype in DType::ALL {
            for op in ReduceOp::ALL {
                if kind != Kind::AllReduce
                    && kind != Kind::Reduce
                    && kind != Kind::ReduceScatter
                    && op != ReduceOp::Sum
                {
                    continue;
                }
                let count = if kind == Kind::Barrier { 0 } else { 37 };
                let d = Descriptor {
                    kind,
                    dtype,
                    op,
                    root: 2,
                    count,
                };
                assert_right(d, 3, 3 * dtype.size(), false);
                assert_right(d, 4, 5 * dtype.size(), true);
            }
        }
    }
}

#[test]
fn edge_counts_and_worlds() {
    for world in 1..=8 {
        for count in [0, 1, world - 1, world, world + 1, 1001] {
            for kind in [
                Kind::AllReduce,
                Kind::AllGather,
                Kind::ReduceScatter,
                Kind::Broadcast,
                Kind::Reduce,
            ] {
                let d = Descriptor {
                    kind,
                    dtype: DType::I32,
                    op: ReduceOp::Sum,
                    root: world - 1,
                    count,
                };
                assert_right(d, world, 4, false);
                assert_right(d, world, 1 << 20, true);
            }
        }
    }
}

#[test]
fn large_odd_count_many_slices() {
    let d = Descriptor {
        kind: Kind::AllReduce,
        dtype: DType::F32,
        op: ReduceOp::Sum,
        root: 0,
        count: 1_000_003,
    };
    assert_right(d, 4, 4096, false);
    assert_right(d, 3, 64 * 1024, true);
    let d = Descriptor {
        kind: Kind::AllReduce,
        dtype: DType::BF16,
        op: ReduceOp::Avg,
        root: 0,
        count: 300_007,
    };
    assert_right(d, 5, 1000, false);
}

/// Random floats (not exactly summable): within a tolerance of the reference.
#[test]
fn random_floats_within_tolerance() {
    let world = 5;
    let count = 10_007;
    let inputs: Vec<Vec<f32>> = (0..world)
        .map(|r| {
            (0..count)
                .map(|i| (((i * 2654435761usize + r * 97) % 100_000) as f32 / 7919.0) - 6.0)
                .collect()
        })
        .collect();
    let outs = run_in_process(world, config(4096, 0), |comm| {
        let mut out = vec![0f32; count];
        comm.all_reduce(&inputs[comm.rank()], &mut out, ReduceOp::Sum)
            .unwrap();
        out
    })
    .unwrap();
    let refs: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
    let want = oxccl_kernels::reference::reduce_all(ReduceOp::Sum, &refs);
    // Five terms of magnitude <= 7: reordering changes a sum by a few ulps of 35.
    let tol = 4.0 * world as f32 * f32::EPSILON * 35.0;
    for out in &outs {
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= tol,
                "element {i}: {a} vs {b} (tolerance {tol})"
            );
        }
        assert_eq!(out, &outs[0], "every rank holds the same bits");
    }
}

#[test]
fn nan_and_infinity_propagate() {
    let outs = run_in_process(3, config(8, 0), |comm| {
        let mut v = match comm.rank() {
            0 => vec![f32::NAN, 1.0, f32::INFINITY, 2.0],
            1 => vec![1.0, f32::NAN, 1.0, f32::NEG_INFINITY],
            _ => vec![1.0, 2.0, 3.0, 4.0],
        };
        comm.all_reduce_in_place(&mut v, ReduceOp::Max).unwrap();
        v
    })
    .unwrap();
    for v in outs {
        assert!(v[0].is_nan() && v[1].is_nan());
        assert_eq!(v[2], f32::INFINITY);
        assert_eq!(v[3], 4.0);
    }
}

#[test]
fn typed_api_shapes() {
    let outs = run_in_process(4, config(16, 1 << 16), |comm| {
        let r = comm.rank() as u64;
        let mut gathered = vec![0u64; 8];
        comm.all_gather(&[r, r * 10], &mut gathered).unwrap();
        let mut mine = [0i32; 2];
        comm.reduce_scatter(&[1, 2, 3, 4, 5, 6, 7, 8], &mut mine, ReduceOp::Sum)
            .unwrap();
        let mut b = vec![r as i8; 3];
        comm.broadcast_in_place(&mut b, 3).unwrap();
        let mut avg = [r as f64];
        comm.all_reduce_in_place(&mut avg, ReduceOp::Avg).unwrap();
        let mut iavg = [r as i32 * 2 + 1];
        comm.all_reduce_in_place(&mut iavg, ReduceOp::Avg).unwrap();
        let mut red = [0u8; 1];
        comm.reduce(&[r as u8 + 1], &mut red, ReduceOp::Prod, 1)
            .unwrap();
        comm.barrier().unwrap();
        (
            gathered,
            mine,
            b,
            avg[0],
            iavg[0],
            red[0],
            comm.stats().collectives,
        )
    })
    .unwrap();
    for (rank, (gathered, mine, b, avg, iavg, red, n)) in outs.into_iter().enumerate() {
        assert_eq!(gathered, vec![0, 0, 1, 10, 2, 20, 3, 30]);
        let c = rank as i32 * 2;
        assert_eq!(mine, [4 * (c + 1), 4 * (c + 2)]);
        assert_eq!(b, vec![3i8; 3]);
        assert_eq!(avg, 1.5);
        assert_eq!(
            iavg,
            (1 + 3 + 5 + 7) / 4,
            "integer avg is the truncated mean"
        );
        if rank == 1 {
            assert_eq!(red, 24);
        } else {
            assert_eq!(red, 0, "a non-root's output is untouched");
        }
        assert_eq!(n, 7);
    }
}

#[test]
fn repeated_and_alternating_calls_reuse_plans_only_where_they_may() {
    // A communicator keeps the last call's plan: identical calls in a row
    // reuse it, and every change of shape (count, place, op, kind, the small
    // path and the ring) must build the right one again.
    for transport in [Transport::Shm, Transport::Tcp] {
        let outs = run_in_process(
            3,
            Config {
                transport,
                ..config(8, 64)
            },
            |comm| {
                let r = comm.rank() as u32;
                let mut results = Vec::new();
                for count in [5usize, 5, 6, 5, 40, 40, 5, 1] {
                    for in_place in [false, true, true, false] {
                        let input: Vec<u32> = (0..count as u32).map(|i| i * 3 + r).collect();
                        let mut out = vec![0u32; count];
                        if in_place {
                            out.copy_from_slice(&input);
                            comm.all_reduce_in_place(&mut out, ReduceOp::Sum).unwrap();
                        } else {
                            comm.all_reduce(&input, &mut out, ReduceOp::Sum).unwrap();
                        }
                        results.push(out);
                        let mut gathered = vec![0u32; count * 3];
                        comm.all_gather(&input, &mut gathered).unwrap();
                        results.push(gathered);
                    }
                }
                results
            },
        )
        .unwrap();
        for out in &outs {
            let mut k = 0;
            for count in [5usize, 5, 6, 5, 40, 40, 5, 1] {
                let want_sum: Vec<u32> = (0..count as u32).map(|i| 3 * (i * 3) + 3).collect();
                let want_gather: Vec<u32> = (0..3u32)
                    .flat_map(|r| (0..count as u32).map(move |i| i * 3 + r))
                    .collect();
                for _ in 0..4 {
                    assert_eq!(out[k], want_sum, "{transport:?} call {k}");
                    assert_eq!(out[k + 1], want_gather, "{transport:?} call {}", k + 1);
                    k += 2;
                }
            }
        }
    }
}

#[test]
fn reference_oracle_agrees_with_pattern() {
    // The pattern's expectations and the reference reducer agree on a case
    // computed by hand: 3 ranks, sum, element 0 is 3 + 16 + 29 (mod 17) - 24.
    let d = Descriptor {
        kind: Kind::AllReduce,
        dtype: DType::I64,
        op: ReduceOp::Sum,
        root: 0,
        count: 1,
    };
    let want: i64 = (0..3).map(|r| ((r * 13 + 3) % 17) as i64 - 8).sum();
    let mut acc = input(&d, 3, 0);
    for r in 1..3 {
        ReferenceReducer
            .reduce(DType::I64, ReduceOp::Sum, &mut acc, &input(&d, 3, r))
            .unwrap();
    }
    assert_eq!(i64::from_le_bytes(acc.clone().try_into().unwrap()), want);
    assert_eq!(count_wrong(&d, 3, 0, &acc), 0);
}

fn kinds() -> impl Strategy<Value = Kind> {
    prop::sample::select(vec![
        Kind::AllReduce,
        Kind::Broadcast,
        Kind::Reduce,
        Kind::AllGather,
        Kind::ReduceScatter,
        Kind::Barrier,
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn random_calls_match_the_reference(
        kind in kinds(),
        dtype in prop::sample::select(DType::ALL.to_vec()),
        op in prop::sample::select(ReduceOp::ALL.to_vec()),
        world in 1usize..=8,
        count in prop_oneof![Just(0usize), Just(1), 2usize..64, 64usize..5000],
        root in 0usize..8,
        slice_elems in prop_oneof![Just(1usize), 2usize..16, Just(1 << 16)],
        in_place: bool,
        small in prop::sample::select(vec![0usize, 1 << 16]),
        transport in prop::sample::select(vec![Transport::Shm, Transport::Tcp]),
        pick in 0usize..4,
    ) {
        let count = if kind == Kind::Barrier { 0 } else { count };
        let d = Descriptor { kind, dtype, op, root: root % world, count };
        let options = algos(kind);
        let algo = options[pick % options.len()];
        let wrong = run(d, world, slice_elems * dtype.size(), in_place, small, transport, algo);
        prop_assert!(wrong.iter().all(|w| *w == 0), "{} {algo:?}: {:?}", d.call(0), wrong);
    }
}

/// `OXCCL_ALGO` forces an algorithm at any size: every allreduce
/// algorithm on a tiny and a large buffer, on worlds that are and are not
/// powers of two; exact on every rank.
#[test]
fn the_algorithm_override_runs_every_algorithm_at_any_size() {
    let names = [
        "ring",
        "gather_reduce",
        "halving_doubling",
        "recursive_doubling",
    ];
    for (algo, count) in names
        .into_iter()
        .flat_map(|n| [(Algo::Only(n), 3), (Algo::Only(n), 50_000)])
    {
        for world in [2, 3, 4, 6] {
            let d = Descriptor {
                kind: Kind::AllReduce,
                dtype: DType::I32,
                op: ReduceOp::Sum,
                root: 0,
                count,
            };
            let wrong = run_in_process(
                world,
                Config {
                    algo,
                    ..config(4096, 64 << 10)
                },
                |comm: &mut Communicator| {
                    let mut buf = input(&d, world, comm.rank());
                    comm.run_bytes(d, None, &mut buf).unwrap();
                    count_wrong(&d, world, comm.rank(), &buf)
                },
            )
            .unwrap();
            assert_eq!(wrong, vec![0; world], "{algo:?} world {world}");
        }
    }
}
