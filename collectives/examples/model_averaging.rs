//! Model averaging (local SGD): every rank takes several SGD steps on its own
//! shard, then the parameters are averaged over all ranks through the fusion
//! engine. Prints `final` and the parameters.
//!
//! `oxrun -n 4 -- target/release/examples/model_averaging`

mod common;

use common::{BATCH, Model, ROUNDS, final_line, local_round};
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
    for round in 0..ROUNDS {
        local_round(&mut model, round, rank, world);
        let hw = engine.allreduce_async("w", model.w.clone(), ReduceOp::Avg);
        let hb = engine.allreduce_async("b", vec![model.b], ReduceOp::Avg);
        model.w = hw.wait()?;
        model.b = hb.wait()?[0];
    }
    println!("{}", final_line(&model.params()));
    Ok(())
}
