//! Soak: long sequences of random collectives (kind, dtype, op, count,
//! root, in or out of place) on one communicator per world and transport,
//! every result checked against the reference on every rank. The ranks are
//! threads that meet through a unique id, as separate processes do, over
//! loopback TCP or shared-memory segments.
//!
//! `OXCCL_SOAK_CALLS` calls per world (2, 3, 4 ranks) and transport
//! (shared memory, TCP); 300 by default, the short run of the test
//! command. The long run (README, "Reliability"):
//! `OXCCL_SOAK_CALLS=17000 cargo test --release -p oxccl --test soak -- --nocapture`.
//! `OXCCL_SOAK_SEED` replays a run; the seed is printed.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use oxccl::{Communicator, Config, DType, Descriptor, Kind, ReduceOp, Transport, UniqueId};
use oxccl_tools::pattern::check_call;

/// splitmix64: the same sequence on every rank from the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Call `i` of a run: counts 0 and 1, small, not divisible by the world,
/// and now and then large enough for many slices.
fn call(rng: &mut Rng, world: usize) -> (Descriptor, bool) {
    // The collectives with equal counts on every rank (the others need
    // per-rank counts): those of the ring, alltoall, gather and scatter.
    const KINDS: [Kind; 9] = [
        Kind::AllReduce,
        Kind::Broadcast,
        Kind::Reduce,
        Kind::AllGather,
        Kind::ReduceScatter,
        Kind::Barrier,
        Kind::AllToAll,
        Kind::Gather,
        Kind::Scatter,
    ];
    let kind = KINDS[rng.below(KINDS.len())];
    let count = match rng.below(10) {
        0 => 0,
        1 => 1,
        2..=5 => 2 + rng.below(62),
        6..=8 => 64 + rng.below(5000),
        _ => 20_000 + rng.below(60_000),
    };
    let d = Descriptor {
        kind,
        dtype: DType::ALL[rng.below(DType::ALL.len())],
        op: ReduceOp::ALL[rng.below(ReduceOp::ALL.len())],
        root: rng.below(world),
        count: if kind == Kind::Barrier { 0 } else { count },
    };
    // The exchanges have no in-place form.
    (d, kind.on_ring() && rng.below(2) == 0)
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn random_collectives_match_the_reference_on_every_rank() {
    let calls = env("OXCCL_SOAK_CALLS").unwrap_or(300) as usize;
    let seed = env("OXCCL_SOAK_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!("soak: {calls} calls per world and transport, OXCCL_SOAK_SEED={seed}");
    let mut total = 0;
    for transport in [Transport::Shm, Transport::Tcp] {
        for world in 2..=4 {
            let start = Instant::now();
            let config = Config {
                transport,
                timeout: Duration::from_secs(60),
                // A small ring, so that frames wrap and fill it.
                shm_bytes: 4096,
                ..Config::default()
            };
            let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
            let ranks: Vec<_> = (0..world)
                .map(|r| {
                    let config = config.clone();
                    std::thread::spawn(move || {
                        let mut comm =
                            Communicator::init_with_config(&id, r, world, config).unwrap();
                        let mut rng = Rng(seed ^ (world as u64) << 32);
                        let mut wrong = Vec::new();
                        for i in 0..calls {
                            let (d, in_place) = call(&mut rng, world);
                            let what = d.call(i as u64);
                            let n = check_call(&mut comm, &d, in_place)
                                .unwrap_or_else(|e| panic!("call {i}, {what}: {e}"));
                            if n > 0 {
                                wrong.push(format!(
                                    "call {i}, {what} in place {in_place}: {n} wrong"
                                ));
                            }
                        }
                        wrong
                    })
                })
                .collect();
            let wrong: Vec<Vec<String>> = ranks.into_iter().map(|t| t.join().unwrap()).collect();
            for (rank, w) in wrong.iter().enumerate() {
                assert!(
                    w.is_empty(),
                    "{transport:?}, world {world}, rank {rank}, seed {seed}: {w:?}"
                );
            }
            total += calls;
            println!(
                "soak: {transport:?}, {world} ranks: {calls} calls, 0 wrong, {:.1} s",
                start.elapsed().as_secs_f64()
            );
        }
    }
    println!("soak: {total} calls, 0 wrong on every rank");
}
