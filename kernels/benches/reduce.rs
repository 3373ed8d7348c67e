//! Throughput of the host reducers on 4 MiB buffers, next to a memcpy of the
//! same size (the bound a reduction of two streams into one cannot beat by
//! much: it reads two buffers and writes one, a memcpy reads one and writes one).

// criterion_group! and criterion_main! generate undocumented items.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use oxccl_kernels::cpu::CpuReducer;
use oxccl_kernels::reference::ReferenceReducer;
use oxccl_kernels::{DType, ReduceOp, Reducer};

const BYTES: usize = 4 << 20;

/// A buffer of `BYTES` bytes holding small finite values of `dtype`
/// (so that sums and products stay away from overflow and NaN).
fn buffer(dtype: DType, seed: u64) -> Vec<u64> {
    let mut words = vec![0u64; BYTES / 8];
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
    let mut x = seed;
    for e in bytes.chunks_exact_mut(dtype.size()) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v = 1.0 + ((x >> 40) % 1000) as f64 / 1000.0;
        let (small, int) = ((x >> 33) % 100, x >> 20);
        match dtype {
            DType::F32 => e.copy_from_slice(&(v as f32).to_ne_bytes()),
            DType::F64 => e.copy_from_slice(&v.to_ne_bytes()),
            DType::F16 => e.copy_from_slice(&half::f16::from_f64(v).to_ne_bytes()),
            DType::BF16 => e.copy_from_slice(&half::bf16::from_f64(v).to_ne_bytes()),
            DType::I8 | DType::U8 => e[0] = small as u8,
            _ => e.copy_from_slice(&int.to_ne_bytes()[..e.len()]),
        }
    }
    words
}

fn reduce(c: &mut Criterion) {
    let mut group = c.benchmark_group("reduce_4MiB");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Bytes(BYTES as u64));

    {
        let src = buffer(DType::F32, 1);
        let mut dst = buffer(DType::F32, 2);
        group.bench_function("memcpy", |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&mut dst);
            })
        });
    }

    let cases: [(&str, &dyn Reducer, DType, ReduceOp); 9] = [
        ("cpu/f32/sum", &CpuReducer, DType::F32, ReduceOp::Sum),
        ("cpu/f16/sum", &CpuReducer, DType::F16, ReduceOp::Sum),
        ("cpu/bf16/sum", &CpuReducer, DType::BF16, ReduceOp::Sum),
        ("cpu/f64/sum", &CpuReducer, DType::F64, ReduceOp::Sum),
        ("cpu/i32/sum", &CpuReducer, DType::I32, ReduceOp::Sum),
        ("cpu/i8/sum", &CpuReducer, DType::I8, ReduceOp::Sum),
        ("cpu/f32/max", &CpuReducer, DType::F32, ReduceOp::Max),
        ("cpu/f32/prod", &CpuReducer, DType::F32, ReduceOp::Prod),
        (
            "reference/f32/sum",
            &ReferenceReducer,
            DType::F32,
            ReduceOp::Sum,
        ),
    ];
    for (name, reducer, dtype, op) in cases {
        let src = buffer(dtype, 1);
        let mut dst = buffer(dtype, 2);
        group.bench_function(name, |b| {
            b.iter(|| {
                let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut dst);
                reducer
                    .reduce(
                        dtype,
                        op,
                        black_box(dst),
                        bytemuck::cast_slice(black_box(&src)),
                    )
                    .expect("equal lengths");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, reduce);
criterion_main!(benches);
