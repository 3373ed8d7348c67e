//! A simulator that runs the plans of every rank against each other, in one
//! thread, with a seeded random delivery order and the reference reducer.

#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;

use oxccl_kernels::reference::{ReferenceReducer, reduce_all};
use oxccl_kernels::{DType, ReduceOp, Reducer};
use proptest::prelude::*;

use super::*;

struct Rank {
    plan: Plan,
    progress: Progress,
    input: Vec<u8>,
    input_offset: usize,
    output: Vec<u8>,
}

/// xorshift64*: enough randomness to shuffle delivery, reproducible from a seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Runs one collective (`inputs` one per rank, outputs of `out_len` bytes)
/// and returns each rank's output.
fn simulate(
    shape: Shape,
    dtype: DType,
    rop: ReduceOp,
    inputs: &[Vec<u8>],
    out_len: usize,
    seed: u64,
) -> Vec<Vec<u8>> {
    let world = shape.world;
    let mut ranks: Vec<Rank> = (0..world)
        .map(|r| {
            let s = Shape { rank: r, ..shape };
            let mut output = vec![0u8; out_len];
            if !s.out_of_place {
                output[..inputs[r].len()].copy_from_slice(&inputs[r]);
            }
            let input = if s.out_of_place {
                inputs[r].clone()
            } else {
                Vec::new()
            };
            let p = plan(&s);
            let off = p.input_offset;
            Rank {
                plan: p,
                input_offset: off,
                progress: Progress::default(),
                input,
                output,
            }
        })
        .collect();
    let mut wires: Vec<VecDeque<(u32, u32, Vec<u8>)>> = vec![VecDeque::new(); world];
    let mut rng = Rng(seed | 1);
    for rk in ranks.iter_mut() {
        // A deferrable prologue runs last here, the latest the engine may run
        // it: a frame that read its range would then carry stale bytes.
        if let Some(r) = rk
            .plan
            .prologue_copy
            .clone()
            .filter(|_| !rk.plan.prologue_deferrable)
        {
            let off = rk.input_offset;
            rk.output[r.clone()].copy_from_slice(&rk.input[r.start - off..r.end - off]);
        }
        if let Some(r) = rk.plan.local_avg.clone() {
            ReferenceReducer
                .finish_avg(dtype, &mut rk.output[r], world)
                .unwrap();
        }
    }
    let mut idle = 0;
    while ranks.iter().any(|r| !r.progress.done(&r.plan)) {
        assert!(idle < 1_000_000, "deadlock");
        let r = (rng.next() % world as u64) as usize;
        let rk = &mut ranks[r];
        if rng.next() % 2 == 0 {
            let Some(op) = rk.progress.next_send(&rk.plan).cloned() else {
                idle += 1;
                continue;
            };
            let data = match op.src {
                Src::Input if shape.out_of_place => {
                    let off = rk.input_offset;
                    rk.input[op.range.start - off..op.range.end - off].to_vec()
                }
                _ => rk.output[op.range.clone()].to_vec(),
            };
            wires[r].push_back((op.step, op.slice, data));
            rk.progress.handle_sent();
        } else {
            let Some(op) = rk.progress.next_recv(&rk.plan).cloned() else {
                idle += 1;
                continue;
            };
            let from = (r + world - 1) % world;
            let Some((step, slice, data)) = wires[from].pop_front() else {
                idle += 1;
                continue;
            };
            assert_eq!(
                (step, slice),
                (op.step, op.slice),
                "rank {r}: frame out of order"
            );
            assert_eq!(data.len(), op.range.len(), "rank {r}: frame length");
            match op.commit {
                Commit::Copy => rk.output[op.range.clone()].copy_from_slice(&data),
                Commit::Discard => {}
                Commit::Reduce { with, finish_avg } => {
                    if with == Src::Input && shape.out_of_place {
                        rk.output[op.range.clone()].copy_from_slice(&rk.input[op.range.clone()]);
                    }
                    ReferenceReducer
                        .reduce(dtype, rop, &mut rk.output[op.range.clone()], &data)
                        .unwrap();
                    if finish_avg {
                        ReferenceReducer
                            .finish_avg(dtype, &mut rk.output[op.range.clone()], world)
                            .unwrap();
                    }
                }
            }
            rk.progress.handle_received();
        }
        idle = 0;
    }
    assert!(wires.iter().all(|w| w.is_empty()), "frames left on a wire");
    for rk in ranks.iter_mut() {
        if let Some(r) = rk
            .plan
            .prologue_copy
            .clone()
            .filter(|_| rk.plan.prologue_deferrable)
        {
            // Deferrable means untouched by every frame until then.
            let overlaps = |x: &std::ops::Range<usize>| x.start < r.end && r.start < x.end;
            assert!(
                !rk.plan.recvs.iter().any(|op| overlaps(&op.range)),
                "a frame lands in the deferred prologue's range {r:?}"
            );
            assert!(
                !rk.plan
                    .sends
                    .iter()
                    .any(|op| op.src == Src::Output && overlaps(&op.range)),
                "a frame reads the deferred prologue's range {r:?} from the output"
            );
            let off = rk.input_offset;
            rk.output[r.clone()].copy_from_slice(&rk.input[r.start - off..r.end - off]);
        }
    }
    ranks.into_iter().map(|r| r.output).collect()
}

/// Integer inputs: exact comparison, so the test also catches a value reduced twice.
fn inputs(world: usize, count: usize) -> Vec<Vec<i64>> {
    (0..world)
        .map(|r| {
            (0..count)
                .map(|i| (i as i64 * 7 + r as i64 * 1000 + 3) % 9973 - 4000)
                .collect()
        })
        .collect()
}

fn bytes(v: &[i64]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn shape(
    kind: Kind,
    world: usize,
    count: usize,
    root: usize,
    op: ReduceOp,
    oop: bool,
    slice: usize,
) -> Shape {
    Shape {
        kind,
        world,
        rank: 0,
        count,
        elem: 8,
        root,
        avg: op == ReduceOp::Avg,
        out_of_place: oop,
        slice_elems: slice,
    }
}

fn check(s: Shape, op: ReduceOp, seed: u64) {
    let Shape {
        kind,
        world,
        count,
        root,
        out_of_place: oop,
        slice_elems: slice,
        ..
    } = s;
    let ins = inputs(world, count);
    let refs: Vec<&[i64]> = ins.iter().map(|v| v.as_slice()).collect();
    let raw: Vec<Vec<u8>> = ins
        .iter()
        .enumerate()
        .map(|(r, v)| match kind {
            // Out of place, an allgather's input is the rank's own chunk only.
            Kind::AllGather if oop => bytes(&v[chunk_range(count, world, r)]),
            _ => bytes(v),
        })
        .collect();
    let outs = simulate(s, DType::I64, op, &raw, count * 8, seed);
    let outs: Vec<Vec<i64>> = outs
        .iter()
        .map(|o| {
            o.chunks_exact(8)
                .map(bytemuck::pod_read_unaligned::<i64>)
                .collect()
        })
        .collect();
    let reduced = reduce_all(op, &refs);
    let ctx =
        format!("{kind:?} world {world} count {count} root {root} {op} oop {oop} slice {slice}");
    match kind {
        Kind::AllReduce => outs.iter().for_each(|o| assert_eq!(o, &reduced, "{ctx}")),
        Kind::Reduce => assert_eq!(outs[root], reduced, "{ctx}"),
        Kind::Broadcast => outs.iter().for_each(|o| assert_eq!(o, &ins[root], "{ctx}")),
        Kind::ReduceScatter => {
            for (r, o) in outs.iter().enumerate() {
                let c = chunk_range(count, world, r);
                assert_eq!(o[c.clone()], reduced[c], "{ctx} rank {r}");
            }
        }
        Kind::AllGather => {
            // Each rank contributes its own chunk of its input.
            let mut want = vec![0i64; count];
            for (r, v) in ins.iter().enumerate() {
                let c = chunk_range(count, world, r);
                want[c.clone()].copy_from_slice(&v[c]);
            }
            outs.iter().for_each(|o| assert_eq!(o, &want, "{ctx}"));
        }
        Kind::Barrier => {}
    }
}

#[test]
fn edge_cases() {
    for kind in Kind::ALL {
        for world in 1usize..=5 {
            for count in [0, 1, world.saturating_sub(1), world, 2 * world + 1, 37] {
                for oop in [false, true] {
                    for slice in [1, 2, 1000] {
                        let count = if kind == Kind::Barrier { 0 } else { count };
                        check(
                            shape(kind, world, count, world / 2, ReduceOp::Sum, oop, slice),
                            ReduceOp::Sum,
                            42,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn every_op() {
    for op in ReduceOp::ALL {
        for kind in [Kind::AllReduce, Kind::Reduce, Kind::ReduceScatter] {
            check(shape(kind, 4, 23, 1, op, true, 3), op, 7);
            check(shape(kind, 3, 23, 2, op, false, 3), op, 8);
        }
    }
}

#[test]
fn send_dependencies_point_backwards() {
    for kind in Kind::ALL {
        for rank in 0..4 {
            let s = Shape {
                rank,
                ..shape(kind, 4, 50, 2, ReduceOp::Sum, true, 4)
            };
            let p = plan(&s);
            for op in &p.sends {
                if let Some(i) = op.after_recv {
                    assert!(i < p.recvs.len());
                    let r = &p.recvs[i];
                    // Forwarded data: the send covers exactly what was received.
                    assert!(
                        op.range == r.range || op.range.is_empty(),
                        "{kind:?} {op:?} after {r:?}"
                    );
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn random_shapes_and_delivery_orders(
        kind in prop::sample::select(Kind::ALL.to_vec()),
        world in 1usize..=8,
        count in 0usize..200,
        root in 0usize..8,
        op in prop::sample::select(ReduceOp::ALL.to_vec()),
        oop: bool,
        slice in 1usize..50,
        seed: u64,
    ) {
        let count = if kind == Kind::Barrier { 0 } else { count };
        check(shape(kind, world, count, root % world, op, oop, slice), op, seed);
    }
}
