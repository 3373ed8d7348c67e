//! The CUDA backend against the reference reducer. Without libcuda (or
//! without a device) the runtime tests print why and return, unless
//! `OXCCL_REQUIRE_CUDA=1` (set by ci/gpu-test), when they fail; one test
//! checks that every entry point then fails with a clean error.

#![cfg(feature = "cuda")]

mod common;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use common::*;
use oxccl_kernels::cuda::{CudaBuffer, CudaReducer, CudaSettings, SOURCE, probe};
use oxccl_kernels::{DType, DeviceMemory, KernelError, ReduceOp};

fn settings() -> CudaSettings {
    CudaSettings {
        ordinal: 0,
        // Where ci/gpu-test's venv keeps cuda_fp16.h; tests read the
        // environment, the library never does.
        include_dirs: std::env::var_os("OXCCL_CUDA_INCLUDE")
            .map(PathBuf::from)
            .into_iter()
            .collect(),
    }
}

fn reducer() -> Option<Arc<CudaReducer>> {
    static R: OnceLock<Option<Arc<CudaReducer>>> = OnceLock::new();
    R.get_or_init(|| match CudaReducer::new(&settings()) {
        Ok(r) => {
            eprintln!("CUDA tests on {r:?}");
            Some(r)
        }
        Err(e) => {
            assert!(
                !env_flag("OXCCL_REQUIRE_CUDA"),
                "OXCCL_REQUIRE_CUDA=1 but: {e}"
            );
            eprintln!("skipping CUDA runtime test: {e}");
            None
        }
    })
    .clone()
}

#[test]
fn entry_points_fail_cleanly_without_a_driver() {
    match probe() {
        Ok(()) => {
            eprintln!("libcuda and libnvrtc found: checking that the reducer opens or errors");
            match CudaReducer::new(&settings()) {
                Ok(r) => eprintln!("opened {r:?}"),
                Err(e) => {
                    assert!(matches!(
                        e,
                        KernelError::Unavailable { .. } | KernelError::Device { .. }
                    ));
                    eprintln!("driver present, no usable device: {e}");
                }
            }
        }
        Err(e) => {
            eprintln!("no CUDA here: {e}");
            let reason = |e: &KernelError| match e {
                KernelError::Unavailable {
                    backend: "cuda",
                    reason,
                } => reason.clone(),
                other => panic!("expected Unavailable, got {other:?}"),
            };
            let why = reason(&e);
            assert!(
                why == "CUDA driver not found (libcuda.so)" || why.starts_with("NVRTC not found"),
                "{why}"
            );
            // Every constructor returns the same error; none panics.
            let err = CudaReducer::new(&settings()).expect_err("no driver");
            assert_eq!(reason(&err), why);
            assert_eq!(err.to_string(), format!("cuda backend unavailable: {why}"));
            let err = CudaReducer::new(&CudaSettings {
                ordinal: 3,
                ..settings()
            })
            .expect_err("no driver");
            assert_eq!(reason(&err), why);
        }
    }
}

#[test]
fn source_declares_every_kernel() {
    for dtype in DType::ALL {
        assert!(
            SOURCE.contains(&format!("OXCCL_REDUCE({dtype}, ")),
            "no reduce kernels for {dtype}"
        );
    }
    for float in ["f32", "f64", "f16", "bf16"] {
        assert!(
            SOURCE.contains(&format!("oxccl_avg_{float}(")),
            "avg {float}"
        );
    }
    for int in ["i8", "u8", "i32", "u32", "i64", "u64"] {
        assert!(
            SOURCE.contains(&format!("OXCCL_AVG_INT({int}, ")),
            "avg {int}"
        );
    }
}

fn check_reduce(dtype: DType) {
    let Some(r) = reducer() else { return };
    let size = dtype.size();
    let max = LENGTHS.iter().max().copied().unwrap_or(0);
    let mut dev = CudaBuffer::new(Arc::clone(&r), (max + 2) * size).expect("alloc");
    let mut rng = Rng(dtype as u64 + 1);
    for op in ReduceOp::ALL {
        for len in LENGTHS {
            for off in [0, 1] {
                let init = buffer(dtype, max + 2, &mut rng);
                let src = buffer(dtype, len, &mut rng);
                dev.write(0, &init).expect("write");
                dev.reduce_from_host(dtype, op, off * size, &src)
                    .expect("reduce_from_host");
                let got = dev.to_host().expect("read");
                let range = off * size..(off + len) * size;
                let mut want = init.clone();
                want[range.clone()].copy_from_slice(&reference_reduce(
                    dtype,
                    op,
                    &init[range.clone()],
                    &src,
                ));
                let what = format!("cuda {dtype} {op} len {len} offset {off}");
                assert_same(dtype, &what, &got, &want);
                assert_eq!(got[..range.start], init[..range.start], "{what}: head");
                assert_eq!(got[range.end..], init[range.end..], "{what}: tail");
            }
        }
    }
    for n in [2, 3, 7, 300, 70_000, 3_000_000_000usize] {
        for len in [0, 1, 5, 257, 100_003] {
            let init = buffer(dtype, max + 2, &mut rng);
            dev.write(0, &init).expect("write");
            dev.finish_avg(dtype, size, len * size, n).expect("avg");
            let got = dev.to_host().expect("read");
            let mut want = init.clone();
            want[size..(len + 1) * size].copy_from_slice(&reference_avg(
                dtype,
                &init[size..(len + 1) * size],
                n,
            ));
            assert_same(
                dtype,
                &format!("cuda {dtype} avg/{n} len {len}"),
                &got,
                &want,
            );
        }
    }
}

macro_rules! per_dtype {
    ($($name:ident => $d:ident;)*) => {$(
        #[test]
        fn $name() {
            check_reduce(DType::$d);
        }
    )*};
}

per_dtype! {
    cuda_i8_matches_reference => I8;
    cuda_u8_matches_reference => U8;
    cuda_i32_matches_reference => I32;
    cuda_u32_matches_reference => U32;
    cuda_i64_matches_reference => I64;
    cuda_u64_matches_reference => U64;
    cuda_f16_matches_reference => F16;
    cuda_f32_matches_reference => F32;
    cuda_f64_matches_reference => F64;
    cuda_bf16_matches_reference => BF16;
}

#[test]
fn cuda_misaligned_read_write_and_reduce() {
    let Some(r) = reducer() else { return };
    let init: Vec<u8> = (0..37u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(1))
        .collect();
    let mut dev = CudaBuffer::from_host(Arc::clone(&r), &init).expect("alloc");
    let mut model = init.clone();
    for off in 0..9 {
        for len in 0..14 {
            let data: Vec<u8> = (0..len).map(|i| 200 - (off * 16 + i) as u8).collect();
            dev.write(off, &data).expect("write");
            model[off..off + len].copy_from_slice(&data);
            assert_eq!(dev.to_host().expect("read"), model, "write at {off}+{len}");
        }
    }
    // f16 at a 2-byte (not 4- or 16-byte) offset, u8 at odd offsets: the
    // scalar path of the kernels.
    let mut rng = Rng(5);
    for (dtype, off) in [
        (DType::F16, 2),
        (DType::U8, 3),
        (DType::BF16, 6),
        (DType::I8, 1),
    ] {
        let len = 1025;
        let init = buffer(dtype, len + 8, &mut rng);
        let src = buffer(dtype, len, &mut rng);
        let mut dev = CudaBuffer::from_host(Arc::clone(&r), &init).expect("alloc");
        dev.reduce_from_host(dtype, ReduceOp::Sum, off, &src)
            .expect("reduce");
        let mut want = init.clone();
        let end = off + len * dtype.size();
        want[off..end].copy_from_slice(&reference_reduce(
            dtype,
            ReduceOp::Sum,
            &init[off..end],
            &src,
        ));
        assert_same(
            dtype,
            &format!("{dtype} at {off}"),
            &dev.to_host().expect("read"),
            &want,
        );
    }
    assert!(
        dev.reduce_from_host(DType::F32, ReduceOp::Sum, 2, &[0; 4])
            .is_err()
    );
}

/// The operations by address (the path where UCX moves CUDA memory
/// itself): reduce, copy, read, write and average between two device
/// buffers, against the reference.
#[test]
fn cuda_operations_by_address_match_the_reference() {
    let Some(r) = reducer() else { return };
    let mut rng = Rng(99);
    for dtype in [DType::F32, DType::BF16, DType::I64] {
        let n = 1000;
        let size = dtype.size();
        let a0 = buffer(dtype, n, &mut rng);
        let b0 = buffer(dtype, n, &mut rng);
        let mut a = CudaBuffer::from_host(Arc::clone(&r), &a0).expect("alloc");
        let b = CudaBuffer::from_host(Arc::clone(&r), &b0).expect("alloc");
        let (src, ops) = b.addressed().expect("CUDA memory has an address");
        let half = n / 2 * size;
        {
            let (dst, _) = a.addressed_mut().expect("address");
            let (lo, hi) = dst.split_at(half);
            ops.reduce(
                dtype,
                ReduceOp::Sum,
                lo,
                src.slice(0..half).expect("within"),
            )
            .expect("reduce");
            ops.copy(hi, src.slice(half..n * size).expect("within"))
                .expect("copy");
        }
        let mut want = reference_reduce(dtype, ReduceOp::Sum, &a0[..half], &b0[..half]);
        want.extend_from_slice(&b0[half..]);
        assert_same(
            dtype,
            "reduce and copy by address",
            &a.to_host().expect("read"),
            &want,
        );
        let mut host = vec![0u8; half];
        ops.read(src.slice(0..half).expect("within"), &mut host)
            .expect("read by address");
        assert_eq!(host, b0[..half]);
        {
            let (dst, _) = a.addressed_mut().expect("address");
            ops.write(dst.slice(0..half).expect("within"), &b0[half..2 * half])
                .expect("write");
        }
        assert_eq!(a.to_host().expect("read")[..half], b0[half..2 * half]);
    }
}
