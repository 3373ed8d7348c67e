//! Data-parallel SGD through the fusion engine: every rank computes the
//! gradient of a logistic regression on its shard of each batch, the
//! gradients are averaged (allreduce avg, fused), and every rank steps.
//!
//! `oxrun -n 4 -- target/release/examples/dsgd`. Prints the loss of the first
//! and last step, then `final` and the weights (identical on every rank, and
//! equal, within float tolerance, to training on whole batches in one process).

mod common;

use common::{BATCH, LR, Model, STEPS, batch, final_line, shard};
use oxccl::fusion::FusionEngine;
use oxccl::{Communicator, ReduceOp};

fn main() -> oxccl::Result<()> {
    // The library installs no log subscriber: show its warnings (OXCCL_DEBUG).
    oxccl_tools::init_logging(&oxccl::Config::from_env()?.debug);
    let engine = FusionEngine::new(Communicator::from_env()?)?;
    let (rank, world) = (engine.rank(), engine.world());
    if BATCH % world != 0 {
        return Err(oxccl::Error::InvalidArgument(format!(
            "the batch of {BATCH} rows does not divide by {world} ranks"
        )));
    }
    let mut model = Model::new();
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let (xs, ys) = batch(step);
        let (gw, gb, loss) = model.grad(&xs, &ys, shard(rank, world));
        let hw = engine.allreduce_async("grad.w", gw, ReduceOp::Avg);
        let hb = engine.allreduce_async("grad.b", vec![gb], ReduceOp::Avg);
        let hl = engine.allreduce_async("loss", vec![loss], ReduceOp::Avg);
        let gw = hw.wait()?;
        let gb = hb.wait()?[0];
        losses.push(hl.wait()?[0]);
        model.step(&gw, gb, LR);
    }
    let s = engine.stats();
    println!(
        "loss {} -> {} (coordination rounds {}, cache hits {}, collectives {})",
        losses[0],
        losses[STEPS - 1],
        s.coordination_rounds,
        s.cache_hits,
        s.collectives
    );
    println!("{}", final_line(&model.params()));
    Ok(())
}
