//! Algorithms as types: each collective algorithm is a value that says
//! which calls it can run, what it costs on a given link, and how its plan
//! is built; [`select`] picks one per call, and `OXCCL_ALGO` overrides.
//!
//! Today's algorithms:
//!
//! * [`Ring`]: the pipelined ring of every collective: `world - 1` steps of a
//!   reduce-scatter and `world - 1` of an allgather for an allreduce, each
//!   chunk cut into slices so that sending, receiving and reducing overlap.
//!   Bandwidth-optimal: each rank sends `2 (world - 1) / world` of the buffer.
//! * [`GatherReduce`]: the small-message allreduce: one allgather of every
//!   rank's whole buffer (`world - 1` steps of one frame instead of
//!   `2 (world - 1)`), then each rank reduces the `world` buffers itself in
//!   rank order, so every rank gets the same bits. Latency-optimal on a ring
//!   for buffers small enough that sending `world - 1` of them costs less
//!   than the steps it saves.
//!
//! Each algorithm's cost is the usual latency/bandwidth model: `alpha` per
//! message, `beta` per byte on the wire, `gamma` per byte reduced. The
//! automatic choice is still the measured threshold `OXCCL_SMALL_BYTES`
//! (benches/RESULTS.md): the model's crossover on this two-core machine
//! depends on oversubscription, which the model does not capture yet.

use crate::config::{Algo, Config};
use crate::descriptor::Descriptor;
use crate::schedule::Kind;

/// A link's cost parameters, in seconds: the latency/bandwidth model the
/// algorithms' [`Algorithm::cost`] functions use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkModel {
    /// Per message (latency).
    pub alpha: f64,
    /// Per byte sent (inverse bandwidth).
    pub beta: f64,
    /// Per byte reduced (inverse reduction bandwidth).
    pub gamma: f64,
}

/// One collective algorithm.
pub trait Algorithm: Sync {
    /// Its name, as `OXCCL_ALGO` takes it and messages show it.
    fn name(&self) -> &'static str;
    /// Whether it can run `d` on a world of `world`.
    fn supports(&self, d: &Descriptor, world: usize) -> bool;
    /// Its modelled time, in seconds, for `d` on a world of `world`.
    fn cost(&self, d: &Descriptor, world: usize, link: &LinkModel) -> f64;
}

/// The pipelined ring (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Ring;

/// The small-message allreduce: gather everything, reduce locally.
#[derive(Debug, Clone, Copy)]
pub struct GatherReduce;

impl Algorithm for Ring {
    fn name(&self) -> &'static str {
        "ring"
    }

    fn supports(&self, _d: &Descriptor, _world: usize) -> bool {
        true
    }

    fn cost(&self, d: &Descriptor, world: usize, l: &LinkModel) -> f64 {
        let (p, n) = (world as f64, (d.count * d.dtype.size()) as f64);
        let steps = (p - 1.0).max(0.0);
        match d.kind {
            Kind::AllReduce => {
                2.0 * steps * l.alpha + 2.0 * steps / p * n * l.beta + steps / p * n * l.gamma
            }
            Kind::ReduceScatter => steps * l.alpha + steps / p * n * (l.beta + l.gamma),
            Kind::AllGather => steps * l.alpha + steps / p * n * l.beta,
            // A chain: the last rank hears after world - 1 hops, pipelined.
            Kind::Broadcast => steps * l.alpha + n * l.beta,
            Kind::Reduce => steps * l.alpha + n * (l.beta + l.gamma),
            Kind::Barrier => 2.0 * steps * l.alpha,
        }
    }
}

impl Algorithm for GatherReduce {
    fn name(&self) -> &'static str {
        "gather_reduce"
    }

    fn supports(&self, d: &Descriptor, world: usize) -> bool {
        d.kind == Kind::AllReduce && world > 1 && d.count > 0
    }

    fn cost(&self, d: &Descriptor, world: usize, l: &LinkModel) -> f64 {
        let (p, n) = (world as f64, (d.count * d.dtype.size()) as f64);
        let steps = (p - 1.0).max(0.0);
        steps * (l.alpha + n * l.beta) + steps * n * l.gamma
    }
}

/// Every algorithm, in the order `select` prefers them on a tie.
pub const ALL: [&dyn Algorithm; 2] = [&Ring, &GatherReduce];

/// The algorithm for `d` on a world of `world`: the one `OXCCL_ALGO`
/// names where it can run the call, else the automatic choice (the
/// small-message path for allreduces whose gathered size is at most
/// `OXCCL_SMALL_BYTES`, the ring for everything else).
pub fn select(d: &Descriptor, world: usize, config: &Config) -> &'static dyn Algorithm {
    let small = GatherReduce.supports(d, world)
        && d.count.saturating_mul(d.dtype.size()).saturating_mul(world) <= config.small_bytes;
    match config.algo {
        Algo::Ring => &Ring,
        Algo::GatherReduce if GatherReduce.supports(d, world) => &GatherReduce,
        Algo::GatherReduce | Algo::Auto if small => &GatherReduce,
        Algo::GatherReduce | Algo::Auto => &Ring,
    }
}

#[cfg(test)]
mod tests {
    use oxccl_kernels::{DType, ReduceOp};

    use super::*;

    fn d(kind: Kind, count: usize) -> Descriptor {
        Descriptor {
            kind,
            dtype: DType::F32,
            op: ReduceOp::Sum,
            root: 0,
            count,
        }
    }

    #[test]
    fn auto_keeps_the_measured_threshold_and_the_override_wins_where_it_can() {
        let auto = Config::default(); // 64 KiB gathered
        assert_eq!(
            select(&d(Kind::AllReduce, 4096), 4, &auto).name(),
            "gather_reduce"
        );
        assert_eq!(select(&d(Kind::AllReduce, 4097), 4, &auto).name(), "ring");
        assert_eq!(select(&d(Kind::AllReduce, 0), 4, &auto).name(), "ring");
        assert_eq!(select(&d(Kind::AllReduce, 10), 1, &auto).name(), "ring");
        assert_eq!(select(&d(Kind::AllGather, 10), 4, &auto).name(), "ring");
        let ring = Config {
            algo: Algo::Ring,
            ..Config::default()
        };
        assert_eq!(select(&d(Kind::AllReduce, 1), 4, &ring).name(), "ring");
        let gather = Config {
            algo: Algo::GatherReduce,
            ..Config::default()
        };
        assert_eq!(
            select(&d(Kind::AllReduce, 1 << 20), 4, &gather).name(),
            "gather_reduce"
        );
        // Where it cannot run the call, the override gives way.
        assert_eq!(select(&d(Kind::Broadcast, 10), 4, &gather).name(), "ring");
    }

    /// The models order the algorithms as their step counts say: the
    /// gather wins small buffers (fewer messages), the ring large ones (fewer
    /// bytes per rank), and the crossover moves down as the world grows.
    #[test]
    fn costs_cross_over_where_latency_meets_bandwidth() {
        let tcp = LinkModel {
            alpha: 6.6e-6,
            beta: 1.0 / 1.7e9,
            gamma: 1.0 / 10e9,
        };
        let crossover = |world: usize| {
            (1..=1 << 24)
                .map(|i| i * 256)
                .find(|&n| {
                    let x = d(Kind::AllReduce, n / 4);
                    Ring.cost(&x, world, &tcp) < GatherReduce.cost(&x, world, &tcp)
                })
                .unwrap_or(usize::MAX)
        };
        let (c2, c4, c16) = (crossover(2), crossover(4), crossover(16));
        assert!(c2 > c4 && c4 > c16, "{c2} {c4} {c16}");
        // At 4 ranks the model's crossover is near the measured 16 KiB per rank.
        assert!((8 << 10..=32 << 10).contains(&c4), "{c4}");
        for a in ALL {
            assert!(
                a.cost(&d(Kind::AllReduce, 1000), 8, &tcp) > 0.0,
                "{}",
                a.name()
            );
        }
    }
}
