//! Data-parallel SGD through the fusion engine: every rank computes the
//! gradient of a logistic regression on its shard of each batch, the
//! gradients are averaged (allreduce avg, fused), and every rank steps.
//!
//! `oxrun -n 4 -- target/release/examples/dsgd`. Prints the loss of the first
//! and last step, then `final` and the weights (identical on every rank, and
//! equal, within float tolerance, to training on whole batches in one process).
//!
//! `oxrun --keep-going -n 4 -- target/release/examples/dsgd --elastic`:
//! training that survives a rank's death. Rank 2 (`--die-rank R`) aborts at
//! step 20 (`--die-step S`) as a crash would; the others' allreduce fails
//! naming it, they shrink the communicator to the survivors
//! (`Communicator::shrink`) and finish the training on fewer ranks, each
//! rank taking its share of every batch, to the same weights as training
//! on whole batches in one process.

mod common;

use common::{BATCH, LR, Model, STEPS, batch, final_line, shard};
use oxccl::fusion::FusionEngine;
use oxccl::{Communicator, ReduceOp};

fn main() -> oxccl::Result<()> {
    // The library installs no log subscriber: show its warnings (OXCCL_DEBUG).
    oxccl_tools::init_logging(&oxccl::Config::from_env()?.debug);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--elastic") {
        return elastic(&args);
    }
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

/// The value after `--name` in `args`.
fn flag(args: &[String], name: &str) -> oxccl::Result<Option<usize>> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .map(Some)
            .ok_or_else(|| oxccl::Error::InvalidArgument(format!("{name} takes a number"))),
    }
}

/// Training that goes on after a rank dies (see the module docs). Each step
/// sums every rank's gradient times its share of rows and divides by the
/// batch, so any number of ranks computes the whole batch's gradient.
fn elastic(args: &[String]) -> oxccl::Result<()> {
    let die_rank = flag(args, "--die-rank")?.unwrap_or(2);
    let die_step = flag(args, "--die-step")?.unwrap_or(STEPS / 2);
    let mut comm = Communicator::from_env()?;
    let (first_rank, first_world) = (comm.rank(), comm.world());
    let mut model = Model::new();
    let mut losses = Vec::new();
    let mut step = 0;
    while step < STEPS {
        if first_rank == die_rank && step == die_step && first_world > 1 {
            eprintln!("rank {first_rank} dies at step {step}");
            std::process::abort();
        }
        let (xs, ys) = batch(step);
        let (r, w) = (comm.rank(), comm.world());
        let rows = BATCH * r / w..BATCH * (r + 1) / w;
        let n = rows.len() as f32;
        let mut sums: Vec<f32> = if rows.is_empty() {
            vec![0.0; model.params().len() + 1]
        } else {
            let (gw, gb, loss) = model.grad(&xs, &ys, rows);
            gw.iter().map(|g| g * n).chain([gb * n, loss * n]).collect()
        };
        match comm.all_reduce_in_place(&mut sums, ReduceOp::Sum) {
            Ok(()) => {
                let mean: Vec<f32> = sums.iter().map(|v| v / BATCH as f32).collect();
                let (gw, rest) = mean.split_at(mean.len() - 2);
                model.step(gw, rest[0], LR);
                losses.push(rest[1]);
                step += 1;
            }
            Err(e) => {
                println!("step {step}: {e}");
                comm = comm.shrink(&[])?;
                println!(
                    "shrank to {} ranks at step {step}: rank {first_rank} is now rank {}",
                    comm.world(),
                    comm.rank()
                );
                // Every survivor failed this step before stepping; the new
                // rank 0's model is everyone's, sent again to be sure.
                let mut p = model.params();
                comm.broadcast_in_place(&mut p, 0)?;
                let (w, b) = p.split_at(p.len() - 1);
                model.w.copy_from_slice(w);
                model.b = b[0];
            }
        }
    }
    println!(
        "loss {} -> {} ({} ranks at the end, {first_world} at the start)",
        losses[0],
        losses[STEPS - 1],
        comm.world()
    );
    println!("{}", final_line(&model.params()));
    Ok(())
}
