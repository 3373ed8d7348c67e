//! Distributed k-means: every rank assigns its share of the points to the
//! nearest centroid; per-centroid coordinate sums (f64) and counts (u64) are
//! summed over all ranks through the fusion engine, and every rank moves the
//! centroids. Prints `final` and the centroids (x, y interleaved).
//!
//! `oxrun -n 4 -- target/release/examples/kmeans`

mod common;

use common::{ITERS, assign, final_line, initial_centroids, my_points, points, update};
use oxccl::fusion::FusionEngine;
use oxccl::{Communicator, ReduceOp};

fn main() -> oxccl::Result<()> {
    // The library installs no log subscriber: show its warnings (OXCCL_DEBUG).
    oxccl_tools::init_logging(&oxccl::Config::from_env()?.debug);
    let engine = FusionEngine::new(Communicator::from_env()?)?;
    let all = points();
    let mine = my_points(&all, engine.rank(), engine.world());
    let mut centroids = initial_centroids(&all);
    for _ in 0..ITERS {
        let (sums, counts) = assign(&centroids, &mine);
        let hs = engine.allreduce_async("sums", sums, ReduceOp::Sum);
        let hc = engine.allreduce_async("counts", counts, ReduceOp::Sum);
        let (sums, counts) = (hs.wait()?, hc.wait()?);
        update(&mut centroids, &sums, &counts);
    }
    let flat: Vec<f64> = centroids.iter().flatten().copied().collect();
    println!("{}", final_line(&flat));
    Ok(())
}
