//! Time per synthetic training step of ResNet-50 or BERT-base gradients:
//! through the fusion engine, vs. one allreduce of a pre-packed buffer of the
//! same bytes, vs. one allreduce per tensor. The modes take turns round by
//! round (one timed step of each per round), so that load from elsewhere on
//! the machine hits them alike; ratios are medians of the per-round ratios.
//!
//! `oxrun -n 2 -- target/release/fusion_perf --model resnet50 [--steps 7]`

use std::time::Instant;

use clap::{Parser, ValueEnum};
use oxccl::fusion::FusionEngine;
use oxccl::{Communicator, ReduceOp};

/// Gradient tensor sizes (elements) in forward layer order.
fn resnet50() -> Vec<usize> {
    let mut t = vec![7 * 7 * 3 * 64, 64, 64];
    let mut inp = 64;
    for (blocks, w) in [(3, 64), (4, 128), (6, 256), (3, 512)] {
        for b in 0..blocks {
            t.extend([inp * w, w, w, 9 * w * w, w, w, w * 4 * w, 4 * w, 4 * w]);
            if b == 0 {
                t.extend([inp * 4 * w, 4 * w, 4 * w]);
            }
            inp = 4 * w;
        }
    }
    t.extend([2048 * 1000, 1000]);
    t
}

fn bert_base() -> Vec<usize> {
    let h = 768;
    let mut t = vec![30522 * h, 512 * h, 2 * h, h, h];
    for _ in 0..12 {
        t.extend([h * h, h, h * h, h, h * h, h, h * h, h, h, h]);
        t.extend([h * 4 * h, 4 * h, 4 * h * h, h, h, h]);
    }
    t.extend([h * h, h]);
    t
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The gradient sizes a model's backward pass produces.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Model {
    /// ResNet-50: 161 tensors, 25.6 M float32 parameters.
    Resnet50,
    /// BERT-base: 199 tensors, 110 M float32 parameters.
    BertBase,
}

impl Model {
    fn name(self) -> &'static str {
        match self {
            Model::Resnet50 => "resnet50",
            Model::BertBase => "bert-base",
        }
    }
}

/// Time per synthetic training step through the fusion engine, vs. one
/// pre-packed allreduce and vs. one allreduce per tensor. Run under oxrun
/// (or any launcher oxccl bootstraps from).
#[derive(Parser, Debug)]
#[command(name = "fusion_perf")]
struct Args {
    /// Whose gradient tensors to reduce.
    #[arg(long, value_enum, default_value = "resnet50")]
    model: Model,
    /// Timed rounds (each times one step of every mode).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
}

fn main() -> oxccl::Result<()> {
    let args = Args::parse();
    let (model, steps) = (args.model, args.steps as usize);
    let sizes = match model {
        Model::Resnet50 => resnet50(),
        Model::BertBase => bert_base(),
    };
    let steps = steps.max(1);
    let total: usize = sizes.iter().sum();
    oxccl_tools::init_logging(&oxccl::Config::from_env()?.debug);
    let mut comm = Communicator::from_env()?;
    let (rank, world) = (comm.rank(), comm.world());
    let threshold = comm.config().fusion_threshold;
    let mut grads: Vec<Vec<f32>> = sizes.iter().map(|n| vec![1.0f32; *n]).collect();

    // The three modes take turns, one step each per round, so that load from
    // elsewhere on the machine hits them alike; the ratios are medians of the
    // per-round ratios. The engine gives the communicator back at the end of
    // each round; its first step of a round (negotiation, cold cache) is not
    // timed.
    let mut packed = vec![1.0f32; total];
    let mut t_packed = Vec::new();
    let mut t_each = Vec::new();
    let mut t_engine = Vec::new();
    let mut stats = oxccl::fusion::FusionStats::default();
    for round in 0..=steps {
        // One allreduce of a pre-packed buffer (the lower bound for fusion).
        comm.barrier()?;
        let t = Instant::now();
        comm.all_reduce_in_place(&mut packed, ReduceOp::Sum)?;
        let p = t.elapsed().as_secs_f64();

        // One allreduce per tensor, in reverse layer order.
        comm.barrier()?;
        let t = Instant::now();
        for g in grads.iter_mut().rev() {
            comm.all_reduce_in_place(g, ReduceOp::Sum)?;
        }
        let n = t.elapsed().as_secs_f64();

        // The fusion engine: submit in reverse layer order, wait for all.
        comm.barrier()?;
        let engine = FusionEngine::new(comm)?;
        let mut e = 0.0;
        for s in 0..2 {
            let t = Instant::now();
            let handles: Vec<_> = grads
                .drain(..)
                .enumerate()
                .rev()
                .map(|(i, g)| engine.allreduce_async(format!("grad.{i}"), g, ReduceOp::Sum))
                .collect();
            let mut back = Vec::with_capacity(handles.len());
            for h in handles {
                back.push(h.wait()?);
            }
            back.reverse();
            grads = back;
            if s > 0 {
                e = t.elapsed().as_secs_f64();
            }
        }
        stats = engine.stats();
        comm = engine.shutdown()?;
        // Round 0 warms up (page faults, socket buffers) and is not timed.
        if round > 0 {
            t_packed.push(p);
            t_each.push(n);
            t_engine.push(e);
        }
    }
    drop(packed);

    if rank == 0 {
        // Median, lowest and highest of the per-round ratios a / b.
        let ratio = |a: &[f64], b: &[f64]| {
            let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
            let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = r.iter().copied().fold(0.0, f64::max);
            (median(r), lo, hi)
        };
        let (e_p, n_e) = (ratio(&t_engine, &t_packed), ratio(&t_each, &t_engine));
        let (e, p, n) = (median(t_engine), median(t_packed), median(t_each));
        let mb = (total * 4) as f64 / 1e6;
        println!(
            "fusion_perf {}: {} tensors, {:.1} M params ({mb:.1} MB f32), {world} ranks, \
             threshold {} B, median of {steps} rounds (one step of each mode per round)",
            model.name(),
            sizes.len(),
            total as f64 / 1e6,
            threshold
        );
        println!("{:<28} {:>12} {:>12}", "mode", "ms/step", "vs packed");
        for (name, t) in [
            ("fusion engine", e),
            ("one pre-packed allreduce", p),
            ("one allreduce per tensor", n),
        ] {
            println!("{name:<28} {:>12.2} {:>11.2}x", t * 1e3, t / p);
        }
        println!(
            "engine/packed {:.2}x (target <= 1.15x); per-tensor/engine {:.2}x (target >= 3x at 2 ranks) \
             (medians of the per-round ratios)",
            e_p.0, n_e.0
        );
        println!(
            "per-round ratios: engine/packed {:.2}-{:.2}x, per-tensor/engine {:.2}-{:.2}x",
            e_p.1, e_p.2, n_e.1, n_e.2
        );
        println!(
            "engine stats (last round): {} cycles, {} coordination rounds, {} cache hits, {} collectives ({} fused)",
            stats.cycles,
            stats.coordination_rounds,
            stats.cache_hits,
            stats.collectives,
            stats.fused_collectives
        );
    }
    Ok(())
}
