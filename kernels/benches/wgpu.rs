//! The wgpu reducer on whatever adapter wgpu finds (lavapipe here, which runs
//! the shaders on the CPU and is expected to be slower than the CPU reducer),
//! next to the CPU reducer, on 4 MiB buffers. Throughput counts the bytes of
//! one operand, as in benches/reduce.rs.

// criterion_group! and criterion_main! generate undocumented items.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use oxccl_kernels::cpu::CpuReducer;
use oxccl_kernels::wgpu::{WgpuBuffer, WgpuContext, WgpuReducer, WgpuSettings};
use oxccl_kernels::{DType, DeviceMemory, ReduceOp, Reducer};

const BYTES: usize = 4 << 20;

/// Small finite values of `dtype`, so that repeated sums stay finite.
fn buffer(dtype: DType) -> Vec<u8> {
    let mut out = vec![0u8; BYTES];
    for (i, e) in out.chunks_exact_mut(dtype.size()).enumerate() {
        let v = 1.0 + (i % 1000) as f32 / 1000.0;
        match dtype {
            DType::F32 => e.copy_from_slice(&v.to_ne_bytes()),
            DType::F16 => e.copy_from_slice(&half::f16::from_f32(v).to_ne_bytes()),
            DType::BF16 => e.copy_from_slice(&half::bf16::from_f32(v).to_ne_bytes()),
            _ => e[0] = (i % 100) as u8,
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let ctx = match WgpuContext::new(&WgpuSettings::default()) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("wgpu bench skipped: {e}");
            return;
        }
    };
    eprintln!("wgpu adapter: {:?}", ctx.adapter());
    let mut group = c.benchmark_group("wgpu_reduce_4MiB");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(BYTES as u64));

    for dtype in [DType::F32, DType::F16, DType::BF16, DType::U8] {
        let src = buffer(dtype);
        let mut dst = buffer(dtype);
        group.bench_function(format!("cpu/{dtype}/sum"), |b| {
            b.iter(|| {
                CpuReducer
                    .reduce(dtype, ReduceOp::Sum, black_box(&mut dst), black_box(&src))
                    .expect("cpu reduce")
            })
        });

        // Both operands resident on the device: the kernel alone (plus a wait).
        let reducer = WgpuReducer::new(Arc::clone(&ctx));
        let d = WgpuBuffer::from_host(Arc::clone(&ctx), &dst).expect("alloc");
        let s = WgpuBuffer::from_host(Arc::clone(&ctx), &src).expect("alloc");
        group.bench_function(format!("wgpu/{dtype}/sum"), |b| {
            b.iter(|| {
                reducer
                    .reduce(
                        dtype,
                        ReduceOp::Sum,
                        d.buffer(),
                        0,
                        s.buffer(),
                        0,
                        BYTES as u64,
                    )
                    .expect("wgpu reduce");
                ctx.synchronize().expect("sync");
            })
        });
    }

    // The collective's path for one received slice: stage the host bytes,
    // reduce on the device, read the result back.
    let src = buffer(DType::F32);
    let mut out = vec![0u8; BYTES];
    let mut dev = WgpuBuffer::from_host(Arc::clone(&ctx), &src).expect("alloc");
    group.bench_function("wgpu/f32/reduce_from_host+read", |b| {
        b.iter(|| {
            dev.reduce_from_host(DType::F32, ReduceOp::Sum, 0, black_box(&src))
                .expect("reduce");
            dev.read(0, &mut out).expect("read");
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
