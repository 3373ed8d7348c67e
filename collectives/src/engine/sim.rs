//! A simulator that runs the engine's own code for every rank of a world in
//! one thread: each rank's [`Call`] is pumped in a seeded random order, over
//! fault-injecting links that deliver a few bytes (down to one) per call and
//! stall at random, with the reference reducer; one rank is slow and reads
//! whole frames, so that its peers run as far ahead of it as they can.
//! Every interleaving of
//! partial headers, partial payloads and stalls the seed draws is one the
//! engine meets on real links.

#![allow(clippy::unwrap_used)]

use oxccl_kernels::reference::{ReferenceReducer, reduce_all};
use oxccl_kernels::{DType, ReduceOp};
use oxccl_transport::fault::{self, Faults};
use proptest::prelude::*;

use super::{Call, Input, Job, Output};
use crate::algo::{self, Algorithm};
use crate::descriptor::Descriptor;
use crate::links;
use crate::schedule::*;

/// xorshift64*: enough randomness to shuffle turns, reproducible from a seed.
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
    algo: &dyn Algorithm,
    shape: Shape,
    dtype: DType,
    rop: ReduceOp,
    inputs: &[Vec<u8>],
    out_len: usize,
    seed: u64,
) -> Vec<Vec<u8>> {
    let world = shape.world;
    let mut rng = Rng(seed | 1);
    let plans: Vec<Plan> = (0..world)
        .map(|rank| algo.plan(&Shape { rank, ..shape }))
        .collect();
    for p in &plans {
        check_deferred_prologue(p);
    }
    let mut outputs: Vec<Vec<u8>> = (0..world)
        .map(|r| {
            let mut o = vec![0u8; out_len];
            if !shape.out_of_place {
                o[..inputs[r].len()].copy_from_slice(&inputs[r]);
            }
            o
        })
        .collect();
    // One rank is slow: pumped first, then only once the others have made
    // no progress for a while, over links that never stall, so its peers
    // run as far ahead as they can and it finds several whole frames
    // waiting at once (and posts receives early).
    let slow = (seed / 2) as usize % world.max(1);
    let faults: Vec<Faults> = (0..world)
        .map(|r| Faults {
            max_chunk: 1 + (rng.next() % 48) as usize,
            stall_one_in: 3,
            seed: seed ^ (r as u64 + 1),
            ..Faults::default()
        })
        .map(|f| {
            if f.seed == seed ^ (slow as u64 + 1) {
                Faults::default()
            } else {
                f
            }
        })
        .collect();
    let mut links: Vec<_> =
        links::in_process(world, |a, b| fault::pair(a, b, faults[a], faults[b])).unwrap();
    let mut stagings: Vec<Vec<u8>> = vec![Vec::new(); world];
    let mut calls: Vec<Call<'_>> = outputs
        .iter_mut()
        .zip(stagings.iter_mut())
        .enumerate()
        .map(|(r, (output, staging))| {
            Call::start(Job {
                plan: &plans[r],
                seq: 3,
                descriptor: [7; oxccl_transport::wire::DESCRIPTOR_LEN],
                input: shape
                    .out_of_place
                    .then(|| Input::Host(inputs[r].as_slice())),
                output: Output::Host(output.as_mut_slice()),
                dtype,
                op: rop,
                world,
                reducer: &ReferenceReducer,
                staging,
                scratch: None,
                timeout: std::time::Duration::from_secs(10),
                spin: std::time::Duration::ZERO,
                crowded: false,
                single_copy_from: None,
            })
            .unwrap()
        })
        .collect();
    let mut idle = 0;
    // The slow rank moves first (sending what needs nothing), then waits.
    let mut slow_first = true;
    while calls.iter().any(|c| !c.done()) {
        assert!(idle < 1_000_000, "deadlock");
        let r = (rng.next() % world as u64) as usize;
        let first = std::mem::take(&mut slow_first);
        let r = if first { slow } else { r };
        if r == slow && !first && idle < 8 * world && calls.iter().filter(|c| !c.done()).count() > 1
        {
            continue;
        }
        let (Some(l), false) = (links[r].as_mut(), calls[r].done()) else {
            idle += 1;
            continue;
        };
        // The deferred prologue runs at the end, the latest the engine may
        // run it: a frame that read its range would carry stale bytes.
        if calls[r].pump(l).unwrap().moved {
            idle = 0;
        } else {
            idle += 1;
        }
    }
    for mut call in calls {
        call.finish().unwrap();
    }
    drop(links);
    outputs
}

/// A deferrable prologue's range is untouched by every frame until the end.
fn check_deferred_prologue(p: &Plan) {
    let Some(r) = p.prologue_copy.clone().filter(|_| p.prologue_deferrable) else {
        return;
    };
    let overlaps = |x: &std::ops::Range<usize>| x.start < r.end && r.start < x.end;
    assert!(
        !p.recvs.iter().any(|op| overlaps(&op.range)),
        "a frame lands in the deferred prologue's range {r:?}"
    );
    assert!(
        !p.sends
            .iter()
            .any(|op| op.src == Src::Output && overlaps(&op.range)),
        "a frame reads the deferred prologue's range {r:?} from the output"
    );
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

/// Checks `s` with every algorithm that can run it.
fn check(s: Shape, op: ReduceOp, seed: u64) {
    let d = Descriptor {
        kind: s.kind,
        dtype: DType::I64,
        op,
        root: s.root,
        count: s.count,
    };
    for a in algo::ALL {
        // The small-message path's plan is the ring's allgather.
        if a.name() != "gather_reduce" && (a.name() == "ring" || a.supports(&d, s.world)) {
            check_with(a, s, op, seed);
        }
    }
}

fn check_with(algo: &dyn Algorithm, s: Shape, op: ReduceOp, seed: u64) {
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
    let outs = simulate(algo, s, DType::I64, op, &raw, count * 8, seed);
    let outs: Vec<Vec<i64>> = outs
        .iter()
        .map(|o| {
            o.chunks_exact(8)
                .map(bytemuck::pod_read_unaligned::<i64>)
                .collect()
        })
        .collect();
    let reduced = reduce_all(op, &refs);
    let ctx = format!(
        "{} {kind:?} world {world} count {count} root {root} {op} oop {oop} slice {slice}",
        algo.name()
    );
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
        // Exchanges: not simulated here (collectives/tests/exchange.rs, p2p.rs).
        Kind::AllToAll
        | Kind::Gather
        | Kind::Scatter
        | Kind::AllToAllV
        | Kind::AllGatherV
        | Kind::ReduceScatterV
        | Kind::SendRecv => {}
    }
}

#[test]
fn edge_cases() {
    for kind in Kind::ALL.into_iter().filter(|k| k.on_ring()) {
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

/// Frames over 4 KiB: copies are received in place, after their header.
#[test]
fn large_frames() {
    for kind in Kind::ALL.into_iter().filter(|k| k.on_ring()) {
        for world in [2, 3] {
            for oop in [false, true] {
                let count = if kind == Kind::Barrier { 0 } else { 3001 };
                check(
                    shape(kind, world, count, 1, ReduceOp::Sum, oop, 700),
                    ReduceOp::Sum,
                    5,
                );
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn random_shapes_and_delivery_orders(
        kind in prop::sample::select(Kind::ALL.into_iter().filter(|k| k.on_ring()).collect::<Vec<_>>()),
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
