//! Sends and receives: alone, in batches posted in random orders, to
//! itself, over in-process transports and real TCP links made on first use
//! (ranks that meet through a unique id); and their failures: a send
//! without a receive, counts that disagree, peers out of range.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use oxccl::{
    Batch, Communicator, Config, DType, Descriptor, ErrorKind, Kind, ReduceOp, SingleCopy,
    Transport, UniqueId, run_in_process,
};
use oxccl_tools::pattern::{count_wrong, fill};
use proptest::prelude::*;

fn config(transport: Transport) -> Config {
    Config {
        transport,
        slice_bytes: 1000,
        timeout: Duration::from_secs(30),
        shm_bytes: 4096,
        // Over shared memory every frame goes by single copy where the
        // call takes it (all but gather, and scatter up to 1 MiB a block).
        shm_single_copy: SingleCopy::From(1),
        ..Config::default()
    }
}

const TRANSPORTS: [Transport; 2] = [Transport::Shm, Transport::Tcp];

/// The message of `count` elements of `dtype` that rank `from` sends.
fn message(dtype: DType, from: usize, count: usize) -> (Descriptor, Vec<u8>) {
    let d = Descriptor {
        kind: Kind::SendRecv,
        dtype,
        op: ReduceOp::Sum,
        root: from,
        count,
    };
    let mut v = vec![0u8; count * dtype.size()];
    fill(dtype, ReduceOp::Sum, from, 0, &mut v);
    (d, v)
}

/// Every rank sends to the next and receives from the previous, in one
/// batch and as a send then a receive on alternate ranks: worlds 1 to 8,
/// counts 0, 1, odd and large, every dtype, both transports.
#[test]
fn ring_shift_matches_the_reference() {
    let mut t = 0;
    for transport in TRANSPORTS {
        for world in 1..=8 {
            for count in [0usize, 1, 333, 5000] {
                let dtype = DType::ALL[t % DType::ALL.len()];
                t += 1;
                let wrong = run_in_process(world, config(transport), |c: &mut Communicator| {
                    let (r, w) = (c.rank(), c.world());
                    let (next, prev) = ((r + 1) % w, (r + w - 1) % w);
                    let (_, mine) = message(dtype, r, count);
                    let (d, _) = message(dtype, prev, count);
                    let mut got = vec![0xA5u8; mine.len()];
                    let mut b = Batch::new();
                    b.send_bytes(&mine, dtype, next)
                        .recv_bytes(&mut got, dtype, prev);
                    c.run_batch(b).unwrap();
                    let mut wrong = count_wrong(&d, w, r, &got);
                    // Blocking calls: even ranks send first, odd ranks
                    // receive first (a world of one sent to itself above).
                    if w > 1 {
                        got.fill(0xA5);
                        if r % 2 == 0 {
                            c.send::<u8>(&mine, next).unwrap();
                            c.recv::<u8>(&mut got, prev).unwrap();
                        } else {
                            c.recv::<u8>(&mut got, prev).unwrap();
                            c.send::<u8>(&mine, next).unwrap();
                        }
                        wrong += count_wrong(&d, w, r, &got);
                    }
                    wrong
                })
                .unwrap();
                assert!(
                    wrong.iter().all(|&w| w == 0),
                    "{transport:?} world {world}, {count} x {dtype}: wrong {wrong:?}"
                );
            }
        }
    }
}

/// A random set of messages between ranks (several per pair, to itself
/// too, empty ones), each rank posting its part in a random order of its
/// own, in one batch: everything arrives, in order per pair.
fn random_batch(world: usize, msgs: &[(usize, usize, usize)], seed: u64, transport: Transport) {
    let wrong = run_in_process(world, config(transport), |c: &mut Communicator| {
        let r = c.rank();
        // This rank's sends and receives, numbered per pair in list order.
        let mut nth = std::collections::HashMap::new();
        let mut mine = Vec::new();
        for &(from, to, count) in msgs {
            let k = nth.entry((from, to)).or_insert(0usize);
            let id = *k;
            *k += 1;
            if from == r || to == r {
                mine.push((from, to, count, id));
            }
        }
        // Each message's data: the sender's pattern, shifted by its number.
        let data = |from: usize, count: usize, id: usize| {
            let mut v = vec![0u8; count * 4];
            fill(DType::I32, ReduceOp::Sum, from, id * 7, &mut v);
            v
        };
        let sends: Vec<Vec<u8>> = mine
            .iter()
            .map(|&(from, _, count, id)| data(from, count, id))
            .collect();
        let mut recvs: Vec<Vec<u8>> = mine
            .iter()
            .map(|&(_, _, n, _)| vec![0xA5u8; n * 4])
            .collect();
        // A random posting order, the same relative order per pair.
        let mut order: Vec<usize> = (0..mine.len()).collect();
        let mut h = seed ^ (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for i in (1..order.len()).rev() {
            h = h
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            order.swap(i, (h >> 33) as usize % (i + 1));
        }
        // Twice, the same batch: the second runs the kept plan with new
        // message numbers.
        let mut wrong = 0;
        for _round in 0..2 {
            recvs.iter_mut().for_each(|v| v.fill(0xA5));
            let mut b = Batch::new();
            let mut posted = vec![false; mine.len()];
            let mut recv_slots: Vec<Option<&mut Vec<u8>>> = recvs.iter_mut().map(Some).collect();
            for &i in &order {
                // Post the earliest not-yet-posted message of the same pair
                // and direction as `i`, so pairs keep their order.
                let (from, to, _, _) = mine[i];
                let j = (0..mine.len())
                    .find(|&j| !posted[j] && mine[j].0 == from && mine[j].1 == to)
                    .unwrap();
                posted[j] = true;
                if from == r {
                    b.send_bytes(&sends[j], DType::I32, to);
                }
                if to == r {
                    let slot = recv_slots[j].take().unwrap();
                    b.recv_bytes(slot, DType::I32, from);
                }
            }
            c.run_batch(b).unwrap();
            for (j, &(from, to, count, id)) in mine.iter().enumerate() {
                if to == r {
                    wrong += usize::from(recvs[j] != data(from, count, id));
                }
            }
        }
        wrong
    })
    .unwrap();
    assert!(
        wrong.iter().all(|&w| w == 0),
        "{msgs:?}: wrong messages per rank {wrong:?}"
    );
}

#[test]
fn a_batch_that_deadlocks_when_posted_in_order_completes() {
    // Rank 0 sends to 1 then 3; rank 2 to 3 then 1; rank 1 receives from 2
    // first, rank 3 from 0 first. Taken in posting order, with messages
    // larger than the links hold, each rank would wait on another.
    let n = 1 << 20;
    for transport in TRANSPORTS {
        run_in_process(4, config(transport), |c: &mut Communicator| {
            let r = c.rank();
            let data = |from: usize| vec![from as f32 + 0.5; n];
            let (a, b) = (data(r), data(r));
            let (mut x, mut y) = (vec![0.0f32; n], vec![0.0f32; n]);
            let mut batch = Batch::new();
            match r {
                0 => batch.send(&a, 1).send(&b, 3),
                2 => batch.send(&a, 3).send(&b, 1),
                1 => batch.recv(&mut x, 2).recv(&mut y, 0),
                _ => batch.recv(&mut x, 0).recv(&mut y, 2),
            };
            c.run_batch(batch).unwrap();
            match r {
                1 => assert!(x == data(2) && y == data(0)),
                3 => assert!(x == data(0) && y == data(2)),
                _ => {}
            }
        })
        .unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("OXCCL_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24)
    ))]

    #[test]
    fn random_batches_in_random_orders(
        world in 1usize..=5,
        raw in proptest::collection::vec((0usize..5, 0usize..5, 0usize..3000), 0..14),
        seed in any::<u64>(),
        tcp in any::<bool>(),
    ) {
        let msgs: Vec<(usize, usize, usize)> =
            raw.into_iter().map(|(a, b, n)| (a % world, b % world, if n % 5 == 0 { 0 } else { n })).collect();
        let transport = if tcp { Transport::Tcp } else { Transport::Shm };
        random_batch(world, &msgs, seed, transport);
    }
}

/// Real TCP links between ranks that meet through a unique id: the links
/// to ranks beyond the ring are made on first use, also when a peer
/// connects before this rank needs it (it is kept until then), and kept.
#[test]
fn links_are_made_on_first_use_over_tcp() {
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let world = 6;
    let ranks: Vec<_> = (0..world)
        .map(|r| {
            std::thread::spawn(move || {
                let mut c = Communicator::init_with_config(
                    &id,
                    r,
                    world,
                    Config {
                        timeout: Duration::from_secs(20),
                        transport: Transport::Tcp,
                        ..Config::default()
                    },
                )
                .unwrap();
                // Rank r sends to r + 3 (not a neighbour); the receivers
                // first wait a little, so the senders connect early.
                let mut got = vec![0u32; 1000];
                if r < 3 {
                    c.send(&vec![r as u32; 1000], r + 3).unwrap();
                } else {
                    std::thread::sleep(Duration::from_millis(50 * r as u64));
                    c.recv(&mut got, r - 3).unwrap();
                    assert!(got.iter().all(|&x| x == (r - 3) as u32));
                }
                // Then every pair at once, twice: the links are kept.
                for round in 0..2u32 {
                    let input: Vec<u32> = (0..world as u32)
                        .map(|p| r as u32 * 100 + p + round)
                        .collect();
                    let mut out = vec![0u32; world];
                    c.all_to_all(&input, &mut out).unwrap();
                    for (p, x) in out.iter().enumerate() {
                        assert_eq!(*x, p as u32 * 100 + r as u32 + round);
                    }
                }
            })
        })
        .collect();
    for t in ranks {
        t.join().unwrap();
    }
}

/// A send whose receiver never posts times out naming the peer and the
/// call; counts that disagree fail on both ranks, naming both; a peer out
/// of range is refused before anything is sent.
#[test]
fn failures_name_the_peer_and_the_call() {
    let cfg = Config {
        timeout: Duration::from_secs(1),
        ..config(Transport::Shm)
    };
    let errs = run_in_process(2, cfg.clone(), |c: &mut Communicator| {
        if c.rank() == 0 {
            c.send(&[1.0f32; 10], 1).unwrap_err().to_string()
        } else {
            // Rank 1 never receives; it waits for rank 0 to give up.
            std::thread::sleep(Duration::from_secs(3));
            String::new()
        }
    })
    .unwrap();
    assert!(
        errs[0].contains("rank 0: send to rank 1 (f32, 10 elements)") && errs[0].contains("rank 1"),
        "{}",
        errs[0]
    );
    assert!(
        errs[0].contains("OXCCL_TIMEOUT") || errs[0].contains("no progress"),
        "{}",
        errs[0]
    );

    let errs = run_in_process(2, cfg.clone(), |c: &mut Communicator| {
        if c.rank() == 0 {
            c.send(&[1.0f32; 10], 1).unwrap_err().to_string()
        } else {
            let mut buf = [0.0f32; 12];
            c.recv(&mut buf, 0).unwrap_err().to_string()
        }
    })
    .unwrap();
    for e in &errs {
        assert!(e.contains("mismatch"), "{e}");
        assert!(
            e.contains("10 elements") && e.contains("12 elements"),
            "{e}"
        );
    }

    let errs = run_in_process(2, cfg, |c: &mut Communicator| {
        let e = c.send(&[1u8; 4], 5).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let mut b = Batch::new();
        b.send(&[1u8; 4], c.rank());
        let e2 = c.run_batch(b).unwrap_err();
        // Still usable after refusals.
        let mut got = [0u8; 4];
        let mut b = Batch::new();
        let peer = 1 - c.rank();
        b.send(&[7u8; 4], peer).recv(&mut got, peer);
        c.run_batch(b).unwrap();
        assert_eq!(got, [7; 4]);
        (e.to_string(), e2.to_string())
    })
    .unwrap();
    assert!(
        errs[0].0.contains("rank 5: no such rank in a world of 2"),
        "{}",
        errs[0].0
    );
    assert!(
        errs[0]
            .1
            .contains("1 sends to this rank itself but 0 receives from it"),
        "{}",
        errs[0].1
    );
}

/// Not a test: the cost of small messages, for `valgrind --tool=callgrind`
/// (instructions per call) or a wall clock. `OXCCL_BENCH_CALLS` calls of an
/// 8-byte exchange between 2 in-process ranks over shared memory, then as
/// many 4 KiB alltoalls on 4.
#[test]
#[ignore]
fn small_message_cost() {
    let calls: usize = std::env::var("OXCCL_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    // OXCCL_BENCH_ONLY=alltoall (say) runs only the sections whose name holds it.
    let only = std::env::var("OXCCL_BENCH_ONLY").unwrap_or_default();
    if "sendrecv 8 B, 2 ranks".contains(only.as_str()) {
        let t = std::time::Instant::now();
        run_in_process(2, config(Transport::Shm), |c: &mut Communicator| {
            let peer = 1 - c.rank();
            let (mine, mut got) = ([c.rank() as u64], [0u64]);
            for _ in 0..calls {
                let mut b = Batch::new();
                b.send(&mine, peer).recv(&mut got, peer);
                c.run_batch(b).unwrap();
            }
            assert_eq!(got[0], peer as u64);
        })
        .unwrap();
        println!(
            "sendrecv 8 B, 2 ranks: {:.2} us a call",
            t.elapsed().as_secs_f64() * 1e6 / calls as f64
        );
    }
    if "alltoall 4 KiB, 4 ranks".contains(only.as_str()) {
        let t = std::time::Instant::now();
        run_in_process(4, config(Transport::Shm), |c: &mut Communicator| {
            let input = vec![c.rank() as f32; 1024];
            let mut out = vec![0.0f32; 1024];
            for _ in 0..calls {
                c.all_to_all(&input, &mut out).unwrap();
            }
            assert_eq!(out[1023], 3.0);
        })
        .unwrap();
        println!(
            "alltoall 4 KiB, 4 ranks: {:.2} us a call",
            t.elapsed().as_secs_f64() * 1e6 / calls as f64
        );
    }
    if "alltoall 4 KiB, 2 ranks".contains(only.as_str()) {
        let t = std::time::Instant::now();
        run_in_process(2, config(Transport::Shm), |c: &mut Communicator| {
            let input = vec![c.rank() as f32; 1024];
            let mut out = vec![0.0f32; 1024];
            for _ in 0..calls {
                c.all_to_all(&input, &mut out).unwrap();
            }
            assert_eq!(out[1023], 1.0);
        })
        .unwrap();
        println!(
            "alltoall 4 KiB, 2 ranks: {:.2} us a call",
            t.elapsed().as_secs_f64() * 1e6 / calls as f64
        );
    }
    if "gather 4 KiB, 2 ranks".contains(only.as_str()) {
        let t = std::time::Instant::now();
        run_in_process(2, config(Transport::Shm), |c: &mut Communicator| {
            let input = vec![c.rank() as f32; 512];
            let mut out = vec![0.0f32; 1024];
            for _ in 0..calls {
                c.gather(&input, &mut out, 0).unwrap();
            }
        })
        .unwrap();
        println!(
            "gather 4 KiB, 2 ranks: {:.2} us a call",
            t.elapsed().as_secs_f64() * 1e6 / calls as f64
        );
    }
}
