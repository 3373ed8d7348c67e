//! k-means where only rank 0 has the data: it deals the points out with the
//! exchanges, every rank runs Lloyd iterations on its shard (per-centroid
//! sums and counts allreduced), and rank 0 gathers every point's cluster
//! and checks the result against k-means of the whole dataset on itself.
//!
//! `oxrun -n 3 -- target/release/examples/kmeans_scatter [POINTS]` (default
//! 1001, which no world of 2 to 4 divides). The dataset need not divide by
//! the world: rank p gets a block of `n / world` points, one more for the
//! first `n % world` ranks.
//!
//! - `scatter` deals each rank its point count (rank 0 alone knows `n`);
//! - `all_to_all_v`, with rank 0 the only sender, deals the points (a
//!   scatter with per-rank counts, no padding on the wire or in the shards);
//! - `gather` collects the labels, each rank's padded to the largest shard
//!   with `u32::MAX`, which rank 0 strips (gather takes equal blocks).
//!
//! The check is exact: coordinates lie on a 2^-22 grid, so the f64 sums are
//! exact whatever order the allreduce adds them in, and the centroids, the
//! iteration count and every label must equal the single-process run's bit
//! for bit. Rank 0 prints the check and exits 1 on a mismatch; every rank
//! prints `final` and the centroids (x, y interleaved).

mod common;

use std::time::Instant;

use common::{K, assign, block_counts, final_line, kmeans_until_stable, labels, lloyd, points_n};
use oxccl::{Communicator, ReduceOp};

const ROOT: usize = 0;
const DEFAULT_POINTS: usize = 1001;
const PAD: u32 = u32::MAX;

fn main() -> oxccl::Result<()> {
    // The library installs no log subscriber: show its warnings (OXCCL_DEBUG).
    oxccl_tools::init_logging(&oxccl::Config::from_env()?.debug);
    let mut comm = Communicator::from_env()?;
    let (rank, world) = (comm.rank(), comm.world());

    // Only rank 0 builds (and so knows the size of) the dataset.
    let data = if rank == ROOT {
        let n = match std::env::args().nth(1) {
            Some(a) => a
                .parse()
                .map_err(|e| oxccl::Error::InvalidArgument(format!("POINTS {a:?}: {e}")))?,
            None => DEFAULT_POINTS,
        };
        if n < K {
            return Err(oxccl::Error::InvalidArgument(format!(
                "{n} points: k-means from the first {K} points needs at least {K}"
            )));
        }
        points_n(n)
    } else {
        Vec::new()
    };
    // Points per rank and where each block starts (zeros off rank 0).
    let shards = block_counts(data.len(), world);
    let displs: Vec<usize> = shards
        .iter()
        .scan(0, |at, c| {
            *at += c;
            Some(*at - c)
        })
        .collect();

    // Each rank's count, then its points (x, y interleaved, in f64 elements).
    let t = Instant::now();
    let sent: Vec<u64> = shards.iter().map(|&c| c as u64).collect();
    let mut mine_count = [0u64];
    comm.scatter(&sent, &mut mine_count, ROOT)?;
    let n_mine = mine_count[0] as usize;
    let flat: Vec<f64> = data.iter().flatten().copied().collect();
    let zeros = vec![0usize; world];
    let (send_counts, send_displs) = if rank == ROOT {
        let twice = |v: &[usize]| v.iter().map(|x| 2 * x).collect::<Vec<_>>();
        (twice(&shards), twice(&displs))
    } else {
        (zeros.clone(), zeros.clone())
    };
    let mut recv_counts = zeros.clone();
    recv_counts[ROOT] = 2 * n_mine;
    let mut mine_flat = vec![0.0f64; 2 * n_mine];
    comm.all_to_all_v(
        &flat,
        &send_counts,
        &send_displs,
        &mut mine_flat,
        &recv_counts,
        &zeros,
    )?;
    let mine: Vec<[f64; 2]> = mine_flat.chunks_exact(2).map(|c| [c[0], c[1]]).collect();
    // The starting centroids: the first K points of the dataset.
    let mut start: Vec<f64> = flat.get(..2 * K).map_or(vec![0.0; 2 * K], <[f64]>::to_vec);
    comm.broadcast_in_place(&mut start, ROOT)?;
    let t_scatter = t.elapsed();

    let t = Instant::now();
    let mut centroids: Vec<[f64; 2]> = start.chunks_exact(2).map(|c| [c[0], c[1]]).collect();
    let iters = lloyd(&mut centroids, |c| {
        let (mut sums, mut counts) = assign(c, &mine);
        comm.all_reduce_in_place(&mut sums, ReduceOp::Sum)?;
        comm.all_reduce_in_place(&mut counts, ReduceOp::Sum)?;
        Ok::<_, oxccl::Error>((sums, counts))
    })?;
    let t_lloyd = t.elapsed();

    // Every rank sends a block of the largest shard's size (padded).
    let t = Instant::now();
    let mut block = [n_mine as u64];
    comm.all_reduce_in_place(&mut block, ReduceOp::Max)?;
    let block = block[0] as usize;
    let mut my_labels = labels(&centroids, &mine);
    my_labels.resize(block, PAD);
    let mut gathered = vec![0u32; if rank == ROOT { world * block } else { 0 }];
    comm.gather(&my_labels, &mut gathered, ROOT)?;
    let t_gather = t.elapsed();

    let flat_c: Vec<f64> = centroids.iter().flatten().copied().collect();
    if rank == ROOT {
        let mut got = Vec::with_capacity(data.len());
        let mut padding_ok = true;
        for (p, &c) in shards.iter().enumerate() {
            let b = &gathered[p * block..(p + 1) * block];
            got.extend_from_slice(&b[..c]);
            padding_ok &= b[c..].iter().all(|&l| l == PAD);
        }
        let t = Instant::now();
        let (want_c, want_l, want_iters) = kmeans_until_stable(&data);
        let t_single = t.elapsed();
        let wrong = got.iter().zip(&want_l).filter(|(a, b)| a != b).count();
        let same_c = centroids == want_c;
        let sizes: Vec<String> = shards.iter().map(|c| c.to_string()).collect();
        let ranks = if world == 1 { "rank" } else { "ranks" };
        println!(
            "{} points over {world} {ranks} ({}), {K} clusters: {iters} iterations in {:.2} ms \
             (scatter {:.2} ms, gather {:.2} ms); one process: {want_iters} iterations in {:.2} ms",
            data.len(),
            sizes.join(" + "),
            t_lloyd.as_secs_f64() * 1e3,
            t_scatter.as_secs_f64() * 1e3,
            t_gather.as_secs_f64() * 1e3,
            t_single.as_secs_f64() * 1e3,
        );
        let ok =
            wrong == 0 && got.len() == want_l.len() && padding_ok && same_c && iters == want_iters;
        if ok {
            println!(
                "check ok: {} labels, {K} centroids (bit for bit) and the iteration count match one process",
                got.len()
            );
        } else {
            println!(
                "check FAILED: {wrong} of {} labels differ, {} labels gathered, padding {}, \
                 centroids {}, iterations {iters} vs {want_iters}",
                want_l.len(),
                got.len(),
                if padding_ok { "intact" } else { "overwritten" },
                if same_c { "equal" } else { "differ" },
            );
            println!("{}", final_line(&flat_c));
            std::process::exit(1);
        }
    }
    println!("{}", final_line(&flat_c));
    Ok(())
}
