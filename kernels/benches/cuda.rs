//! Bandwidth of the CUDA reducer: `dst = op(dst, src)` reads two buffers and
//! writes one, so it moves 3 × the buffer size per call. Reports that rate as
//! a fraction of the device's peak memory bandwidth (from its memory clock and
//! bus width, or `OXCCL_PEAK_GBPS` when set), for 256 MiB buffers.
//!
//! Without a CUDA driver it prints why and exits successfully.

// criterion_group! and criterion_main! generate undocumented items.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use oxccl_kernels::cuda::{CudaReducer, CudaSettings};
use oxccl_kernels::{DType, ReduceOp};

const BYTES: usize = 256 << 20;

fn main() {
    let settings = CudaSettings {
        ordinal: 0,
        include_dirs: std::env::var_os("OXCCL_CUDA_INCLUDE")
            .map(Into::into)
            .into_iter()
            .collect(),
    };
    let reducer = match CudaReducer::new(&settings) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cuda bench skipped: {e}");
            return;
        }
    };
    let peak = match std::env::var("OXCCL_PEAK_GBPS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        Some(gbps) => gbps * 1e9,
        None => match reducer.peak_memory_bandwidth() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("cannot query peak bandwidth ({e}); set OXCCL_PEAK_GBPS");
                return;
            }
        },
    };
    println!(
        "{} (sm_{}{}), peak memory bandwidth {:.0} GB/s",
        reducer.device_name(),
        reducer.compute_capability().0,
        reducer.compute_capability().1,
        peak / 1e9
    );
    let mut dst = reducer.alloc(BYTES).expect("alloc dst");
    let src = reducer.alloc(BYTES).expect("alloc src");
    let cases = [
        (DType::F32, ReduceOp::Sum),
        (DType::F16, ReduceOp::Sum),
        (DType::BF16, ReduceOp::Sum),
        (DType::F64, ReduceOp::Sum),
        (DType::U8, ReduceOp::Sum),
        (DType::F32, ReduceOp::Max),
    ];
    println!(
        "{:<10} {:>10} {:>10} {:>8}",
        "case", "time", "GB/s", "of peak"
    );
    for (dtype, op) in cases {
        let run = |dst: &mut _| {
            reducer
                .reduce(dtype, op, dst, 0, &src, 0, BYTES)
                .expect("reduce");
        };
        run(&mut dst);
        reducer.synchronize().expect("sync");
        let iters = 20;
        let start = Instant::now();
        for _ in 0..iters {
            run(&mut dst);
        }
        reducer.synchronize().expect("sync");
        let t = start.elapsed().as_secs_f64() / f64::from(iters);
        let bw = 3.0 * BYTES as f64 / t;
        println!(
            "{:<10} {:>8.3}ms {:>10.1} {:>7.1}%",
            format!("{dtype}/{op}"),
            t * 1e3,
            bw / 1e9,
            100.0 * bw / peak
        );
    }

    // The same through criterion, for its statistics and history.
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    let mut group = c.benchmark_group("cuda_reduce_256MiB");
    group.throughput(Throughput::Bytes(3 * BYTES as u64));
    let r: Arc<CudaReducer> = Arc::clone(&reducer);
    group.bench_function("f32/sum", |b| {
        b.iter(|| {
            r.reduce(DType::F32, ReduceOp::Sum, &mut dst, 0, &src, 0, BYTES)
                .expect("reduce");
            r.synchronize().expect("sync");
        })
    });
    group.finish();
    c.final_summary();
}
