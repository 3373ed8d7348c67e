//! The exchanges (alltoall, alltoallv, gather, scatter, allgatherv,
//! reduce-scatter with per-rank counts) against a naive reference, with
//! in-process ranks over both in-process transports, and their refusals of
//! bad arguments.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use oxccl::{
    Communicator, Config, DType, Descriptor, ErrorKind, Exchange, Kind, ReduceOp, SingleCopy,
    Transport, run_in_process,
};
use oxccl_tools::pattern::{Uneven, check_call, fill, value};
use proptest::prelude::*;

fn config(transport: Transport, slice_bytes: usize) -> Config {
    Config {
        transport,
        slice_bytes,
        timeout: Duration::from_secs(30),
        shm_bytes: 4096,
        // Over shared memory every frame goes by single copy where the
        // call takes it (all but gather, and scatter up to 1 MiB a block).
        shm_single_copy: SingleCopy::From(1),
        ..Config::default()
    }
}

const TRANSPORTS: [Transport; 2] = [Transport::Shm, Transport::Tcp];

/// Alltoall, gather and scatter: every world from 1 to 8, counts 0, 1, odd
/// and large, every dtype (cycled over the cases), both transports; the
/// number of wrong elements on every rank must be 0.
#[test]
fn equal_blocks_match_the_reference() {
    let mut t = 0;
    for transport in TRANSPORTS {
        for world in 1..=8 {
            for count in [0usize, 1, 7, 3000] {
                for kind in [Kind::AllToAll, Kind::Gather, Kind::Scatter] {
                    let dtype = DType::ALL[t % DType::ALL.len()];
                    t += 1;
                    let d = Descriptor {
                        kind,
                        dtype,
                        op: ReduceOp::Sum,
                        root: (count + world) % world,
                        count,
                    };
                    let wrong = run_in_process(world, config(transport, 1024), |c| {
                        check_call(c, &d, false).unwrap()
                    })
                    .unwrap();
                    assert!(
                        wrong.iter().all(|&w| w == 0),
                        "{transport:?} world {world}: {}: wrong elements per rank {wrong:?}",
                        d.call(0)
                    );
                }
            }
        }
    }
}

/// Element `i` of what rank `from` sends rank `to` in the v-calls, as an f64.
fn element(from: usize, to: usize, i: usize) -> f64 {
    value(ReduceOp::Sum, from * 8 + to, i) as f64
}

/// Counts `counts[from][to]` for an alltoallv, with displacements that
/// leave gaps, and each rank's expected output.
fn all_to_all_v_case(world: usize, counts: &[Vec<usize>], dtype: DType) -> Vec<Vec<u8>> {
    let size = dtype.size();
    run_in_process(
        world,
        config(Transport::Shm, 512),
        |c: &mut Communicator| {
            let r = c.rank();
            let send_counts: Vec<usize> = (0..world).map(|p| counts[r][p]).collect();
            let recv_counts: Vec<usize> = (0..world).map(|p| counts[p][r]).collect();
            // Blocks in reverse rank order, one element of gap after each.
            let mut send_displs = vec![0; world];
            let mut at = 0;
            for p in (0..world).rev() {
                send_displs[p] = at;
                at += send_counts[p] + 1;
            }
            let mut input = vec![0u8; at * size];
            for p in 0..world {
                let s = send_displs[p] * size;
                fill_with(dtype, &mut input[s..s + send_counts[p] * size], |i| {
                    element(r, p, i)
                });
            }
            let mut recv_displs = vec![0; world];
            let mut at = 1;
            for p in 0..world {
                recv_displs[p] = at;
                at += recv_counts[p] + 2;
            }
            let mut output = vec![0x5Au8; at * size];
            c.run_exchange(
                Exchange::AllToAllV {
                    send_counts: &send_counts,
                    send_displs: &send_displs,
                    recv_counts: &recv_counts,
                    recv_displs: &recv_displs,
                },
                dtype,
                &input,
                &mut output,
            )
            .unwrap();
            // What arrived, and the gaps untouched.
            let mut want = vec![0x5Au8; at * size];
            for p in 0..world {
                let s = recv_displs[p] * size;
                fill_with(dtype, &mut want[s..s + recv_counts[p] * size], |i| {
                    element(p, r, i)
                });
            }
            assert_eq!(output, want, "rank {r} of {world}, counts {counts:?}");
            output
        },
    )
    .unwrap()
}

/// Writes `f(i)` as `dtype` into element `i` of `out`.
fn fill_with(dtype: DType, out: &mut [u8], f: impl Fn(usize) -> f64) {
    let size = dtype.size();
    for (i, e) in out.chunks_exact_mut(size).enumerate() {
        // `fill` writes pattern values; reuse its encoding through a
        // one-element buffer of the value wanted.
        let v = f(i);
        let bytes: Vec<u8> = match dtype {
            DType::I8 => (v as i8).to_le_bytes().to_vec(),
            DType::U8 => (v as i64 as u8).to_le_bytes().to_vec(),
            DType::I32 => (v as i32).to_le_bytes().to_vec(),
            DType::U32 => (v as i64 as u32).to_le_bytes().to_vec(),
            DType::I64 => (v as i64).to_le_bytes().to_vec(),
            DType::U64 => (v as i64 as u64).to_le_bytes().to_vec(),
            DType::F16 => oxccl::f16::from_f64(v).to_le_bytes().to_vec(),
            DType::BF16 => oxccl::bf16::from_f64(v).to_le_bytes().to_vec(),
            DType::F32 => (v as f32).to_le_bytes().to_vec(),
            DType::F64 => v.to_le_bytes().to_vec(),
        };
        e.copy_from_slice(&bytes);
    }
}

#[test]
fn all_to_all_v_with_uneven_and_empty_blocks() {
    // Rank 0 sends nothing to anyone; rank 2 receives nothing from rank 1.
    let counts = [[0, 0, 0, 0], [3, 1, 0, 2000], [1, 5, 7, 0], [2, 2, 9, 4]];
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        let n = 1 + i % 4;
        let c: Vec<Vec<usize>> = counts[..n].iter().map(|row| row[..n].to_vec()).collect();
        all_to_all_v_case(n, &c, dtype);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("OXCCL_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(16)
    ))]

    /// Random worlds and counts (many empty), every dtype.
    #[test]
    fn all_to_all_v_random(world in 1usize..=6, seed in any::<u64>(), t in 0..DType::ALL.len()) {
        let counts: Vec<Vec<usize>> = (0..world)
            .map(|a| (0..world).map(|b| {
                let h = seed.wrapping_mul(6364136223846793005).wrapping_add(((a * 8 + b) as u64).wrapping_mul(1442695040888963407));
                let h = (h >> 33) as usize;
                if h % 3 == 0 { 0 } else { h % 700 }
            }).collect())
            .collect();
        all_to_all_v_case(world, &counts, DType::ALL[t]);
    }
}

/// Allgatherv and reduce-scatter with per-rank counts, including empty
/// ranks, every op on f32 and i32, both transports.
#[test]
fn variable_counts_gather_and_reduce() {
    for transport in TRANSPORTS {
        for world in 1..=5 {
            let counts: Vec<usize> = (0..world).map(|p| [5, 0, 1, 1200, 3][p]).collect();
            let total: usize = counts.iter().sum();
            let displs: Vec<usize> = counts
                .iter()
                .scan(0, |at, &c| {
                    let d = *at;
                    *at += c;
                    Some(d)
                })
                .collect();
            run_in_process(world, config(transport, 256), |c: &mut Communicator| {
                let r = c.rank();
                let input: Vec<f32> = (0..counts[r]).map(|i| (r * 1000 + i) as f32).collect();
                let mut out = vec![-1.0f32; total];
                c.all_gather_v(&input, &mut out, &counts).unwrap();
                for p in 0..world {
                    for i in 0..counts[p] {
                        assert_eq!(out[displs[p] + i], (p * 1000 + i) as f32);
                    }
                }
                for op in ReduceOp::ALL {
                    let d = Descriptor {
                        kind: Kind::AllReduce,
                        dtype: DType::I32,
                        op,
                        root: 0,
                        count: total,
                    };
                    let mut inp = vec![0u8; total * 4];
                    fill(DType::I32, op, r, 0, &mut inp);
                    let inp: Vec<i32> = bytemuck_i32(&inp);
                    let mut out = vec![7i32; counts[r]];
                    c.reduce_scatter_v(&inp, &mut out, &counts, op).unwrap();
                    for (i, got) in out.iter().enumerate() {
                        let at = displs[r] + i;
                        let vals: Vec<i64> = (0..world).map(|q| value(op, q, at)).collect();
                        let want = reference(op, &vals);
                        assert_eq!(
                            i64::from(*got),
                            want,
                            "{}, rank {r}, element {i}",
                            d.call(0)
                        );
                    }
                }
            })
            .unwrap();
        }
    }
}

fn bytemuck_i32(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn reference(op: ReduceOp, v: &[i64]) -> i64 {
    match op {
        ReduceOp::Sum => v.iter().sum(),
        ReduceOp::Prod => v.iter().product(),
        ReduceOp::Min => *v.iter().min().unwrap(),
        ReduceOp::Max => *v.iter().max().unwrap(),
        ReduceOp::Avg => v.iter().sum::<i64>() / v.len() as i64,
    }
}

/// Bad arguments are refused on the rank that passed them, before anything
/// is sent, with a message that says what is wrong; the communicator stays
/// usable.
#[test]
fn bad_arguments_are_refused_before_anything_is_sent() {
    let msgs = run_in_process(2, config(Transport::Shm, 1024), |c: &mut Communicator| {
        let mut errs = Vec::new();
        let mut take = |r: oxccl::Result<()>| {
            let e = r.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
            errs.push(e.to_string());
        };
        let input = vec![1.0f32; 8];
        let mut out = vec![0.0f32; 8];
        // Not divisible by the world.
        take(c.all_to_all(&input[..7], &mut out[..7]));
        // Output of the wrong length.
        take(c.all_to_all(&input, &mut out[..6]));
        // A root out of range.
        take(c.gather(&input[..4], &mut out, 2));
        // Counts of the wrong length, overlapping and overrunning ranges.
        take(c.all_to_all_v(&input, &[1], &[0], &mut out, &[1, 1], &[0, 1]));
        take(c.all_to_all_v(&input, &[2, 2], &[0, 2], &mut out, &[2, 2], &[0, 1]));
        take(c.all_to_all_v(&input, &[2, 2], &[0, 7], &mut out, &[2, 2], &[0, 2]));
        take(c.all_gather_v(&input[..3], &mut out, &[4, 4]));
        // Still usable: a good call goes through.
        let mut all = vec![0.0f32; 8];
        c.all_to_all(&input, &mut all).unwrap();
        errs
    })
    .unwrap();
    let m = &msgs[0];
    assert!(
        m[0].contains("does not divide by the world size 2") || m[0].contains("expected"),
        "{}",
        m[0]
    );
    assert!(
        m[1].contains("output has 6 elements, expected 8"),
        "{}",
        m[1]
    );
    assert!(
        m[2].contains("root 2 is not below the world size 2"),
        "{}",
        m[2]
    );
    assert!(
        m[3].contains("send_counts has 1 entries, expected one per rank (2)"),
        "{}",
        m[3]
    );
    assert!(m[4].contains("overlap"), "{}", m[4]);
    assert!(
        m[5].contains("input has 8 elements, needs at least 9"),
        "{}",
        m[5]
    );
    assert!(
        m[6].contains("input has 3 elements, expected 4"),
        "{}",
        m[6]
    );
}

/// Ranks that disagree on a count fail on the receiving side naming both
/// counts, and the sender learns of it too.
#[test]
fn counts_that_disagree_are_named_on_both_sides() {
    let errs = run_in_process(2, config(Transport::Shm, 1024), |c: &mut Communicator| {
        let r = c.rank();
        let input = vec![1.0f32; 16];
        let mut out = vec![0.0f32; 16];
        // Rank 0 sends rank 1 three elements; rank 1 expects four.
        let (sc, rc) = if r == 0 {
            (vec![1, 3], vec![1, 4])
        } else {
            (vec![4, 1], vec![4, 1])
        };
        c.all_to_all_v(&input, &sc, &[0, 4], &mut out, &rc, &[0, 8])
            .unwrap_err()
            .to_string()
    })
    .unwrap();
    // Whichever rank finds it first names the other's message; the other
    // fails with that report, or finds it too.
    for e in &errs {
        assert!(e.contains("mismatch"), "{e}");
        assert!(e.contains("rank 0") && e.contains("rank 1"), "{e}");
        assert!(
            e.contains("sends this rank 3 elements and expects 4 from it")
                || e.contains("sends this rank 4 elements and expects 4 from it"),
            "{e}"
        );
    }
}

/// A communicator keeps its last exchange (layout, links, plan) for a loop
/// of the same call: a sequence that repeats calls, then changes one
/// argument at a time (count, root, dtype, kind, per-rank counts), with
/// other calls in between, must be right at every call.
#[test]
fn repeated_and_changed_calls_reuse_nothing_stale() {
    let d = |kind, dtype, root, count| Descriptor {
        kind,
        dtype,
        op: if kind == Kind::ReduceScatterV {
            ReduceOp::Max
        } else {
            ReduceOp::Sum
        },
        root,
        count,
    };
    let (f32_, i64_) = (DType::F32, DType::I64);
    let calls = [
        d(Kind::AllToAll, f32_, 0, 5),
        d(Kind::AllToAll, f32_, 0, 5),
        d(Kind::AllToAll, f32_, 0, 6),
        d(Kind::AllToAll, i64_, 0, 6),
        d(Kind::AllReduce, f32_, 0, 7),
        d(Kind::AllToAll, i64_, 0, 6),
        d(Kind::Gather, f32_, 0, 5),
        d(Kind::Gather, f32_, 1, 5),
        d(Kind::Gather, f32_, 1, 5),
        d(Kind::Scatter, f32_, 1, 5),
        d(Kind::Scatter, f32_, 2, 9),
        d(Kind::AllToAllV, f32_, 0, 11),
        d(Kind::AllToAllV, f32_, 0, 11),
        d(Kind::AllToAllV, f32_, 0, 13),
        d(Kind::AllGatherV, i64_, 0, 13),
        d(Kind::AllGatherV, i64_, 0, 14),
        d(Kind::ReduceScatterV, i64_, 0, 14),
        d(Kind::ReduceScatterV, i64_, 0, 14),
        d(Kind::AllToAll, f32_, 0, 5),
    ];
    for transport in TRANSPORTS {
        for world in [3, 4] {
            let wrong = run_in_process(world, config(transport, 1024), |c| {
                calls
                    .iter()
                    .map(|d| match d.kind {
                        Kind::AllToAllV | Kind::AllGatherV | Kind::ReduceScatterV => {
                            let u = Uneven {
                                kind: d.kind,
                                dtype: d.dtype,
                                op: d.op,
                                count: d.count,
                                world,
                            };
                            let (counts, layout) = (u.counts(), u.layout(c.rank()));
                            let mut out = vec![0xA5u8; u.output_len(c.rank())];
                            c.run_exchange(
                                u.exchange(&counts, &layout),
                                d.dtype,
                                &u.input(c.rank()),
                                &mut out,
                            )
                            .unwrap();
                            u.count_wrong(c.rank(), &out)
                        }
                        _ => check_call(c, d, false).unwrap(),
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap();
            for (rank, w) in wrong.iter().enumerate() {
                for (d, &n) in calls.iter().zip(w) {
                    assert_eq!(
                        n,
                        0,
                        "{transport:?} world {world} rank {rank}: {}",
                        d.call(0)
                    );
                }
            }
        }
    }
}
