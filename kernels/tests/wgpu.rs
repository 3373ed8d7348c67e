//! The wgpu backend against the reference reducer, run for real on whatever
//! adapter wgpu finds (lavapipe in CI). Without an adapter each test prints
//! why and returns, unless `OXCCL_REQUIRE_WGPU=1`, when it fails.

#![cfg(feature = "wgpu")]

mod common;

use std::sync::{Arc, OnceLock};

use common::*;
use oxccl_kernels::wgpu::{WgpuBuffer, WgpuContext, WgpuReducer, WgpuSettings, enumerate_adapters};
use oxccl_kernels::{DType, DeviceMemory, KernelError, ReduceOp};

fn settings() -> WgpuSettings {
    WgpuSettings {
        // Tests read the environment; the library never does.
        adapter_name: std::env::var("OXCCL_TEST_WGPU_ADAPTER").ok(),
        ..Default::default()
    }
}

fn open(settings: &WgpuSettings) -> Option<Arc<WgpuContext>> {
    match WgpuContext::new(settings) {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            assert!(
                !env_flag("OXCCL_REQUIRE_WGPU"),
                "OXCCL_REQUIRE_WGPU=1 but no wgpu adapter: {e}"
            );
            eprintln!("skipping: no wgpu adapter ({e}); run ci/wgpu-setup.sh for lavapipe");
            None
        }
    }
}

/// The context shared by the tests of this binary.
fn ctx() -> Option<Arc<WgpuContext>> {
    static CTX: OnceLock<Option<Arc<WgpuContext>>> = OnceLock::new();
    CTX.get_or_init(|| {
        let ctx = open(&settings());
        if let Some(c) = &ctx {
            eprintln!("wgpu tests on {:?}", c.adapter());
        }
        ctx
    })
    .clone()
}

const DTYPES: [DType; 9] = [
    DType::I8,
    DType::U8,
    DType::I32,
    DType::U32,
    DType::I64,
    DType::U64,
    DType::F16,
    DType::F32,
    DType::BF16,
];

#[test]
fn adapter_enumeration_finds_lavapipe() {
    let adapters = enumerate_adapters();
    eprintln!("adapters: {adapters:#?}");
    let lavapipe = adapters
        .iter()
        .any(|a| a.name.to_lowercase().contains("llvmpipe"));
    if env_flag("OXCCL_REQUIRE_WGPU") {
        assert!(lavapipe, "no llvmpipe adapter among {adapters:?}");
        let ctx = WgpuContext::new(&WgpuSettings {
            adapter_name: Some("LLVMPIPE".into()),
            ..Default::default()
        })
        .expect("open lavapipe by name");
        assert!(ctx.adapter().name.to_lowercase().contains("llvmpipe"));
    } else if !lavapipe {
        eprintln!("no lavapipe adapter here (run ci/wgpu-setup.sh)");
    }
    // A filter that matches nothing is a clear error, not a panic.
    let err = WgpuContext::new(&WgpuSettings {
        adapter_name: Some("no such adapter".into()),
        ..Default::default()
    })
    .expect_err("nothing matches");
    assert!(
        matches!(&err, KernelError::Unavailable { reason, .. } if reason.contains("no such adapter")),
        "{err}"
    );
}

/// `reduce_from_host` for every op and length, at element offsets 0 and 1
/// (offset 1 is not word-aligned for 1- and 2-byte types), with a guard
/// element after the range; one device buffer reused for every case.
fn check_reduce_from_host(dtype: DType) {
    let Some(ctx) = ctx() else { return };
    let size = dtype.size();
    let max = LENGTHS.iter().max().copied().unwrap_or(0);
    let mut dev = WgpuBuffer::new(ctx, (max + 2) * size).expect("alloc");
    let mut rng = Rng(dtype as u64 + 1);
    let mut cases = 0;
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
                let what = format!("{dtype} {op} len {len} offset {off}");
                assert_same(dtype, &what, &got[range.clone()], &want[range.clone()]);
                assert_eq!(
                    got[..range.start],
                    init[..range.start],
                    "{what}: head touched"
                );
                assert_eq!(got[range.end..], init[range.end..], "{what}: tail touched");
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 5 * LENGTHS.len() * 2);
}

/// `finish_avg` for several counts (including counts beyond i8/u8 and i32),
/// at element offsets 0 and 1.
fn check_avg(dtype: DType) {
    let Some(ctx) = ctx() else { return };
    let size = dtype.size();
    let lens = [0, 1, 5, 257, 1025, 100_003];
    let max = 100_003;
    let mut dev = WgpuBuffer::new(ctx, (max + 2) * size).expect("alloc");
    let mut rng = Rng(100 + dtype as u64);
    for n in [0, 1, 2, 3, 7, 300, 70_000, 3_000_000_000usize] {
        for len in lens {
            for off in [0, 1] {
                let init = buffer(dtype, max + 2, &mut rng);
                dev.write(0, &init).expect("write");
                dev.finish_avg(dtype, off * size, len * size, n)
                    .expect("finish_avg");
                let got = dev.to_host().expect("read");
                let range = off * size..(off + len) * size;
                let mut want = init.clone();
                want[range.clone()].copy_from_slice(&reference_avg(dtype, &init[range.clone()], n));
                let what = format!("{dtype} avg/{n} len {len} offset {off}");
                assert_same(dtype, &what, &got, &want);
                assert_eq!(
                    got[..range.start],
                    init[..range.start],
                    "{what}: head touched"
                );
                assert_eq!(got[range.end..], init[range.end..], "{what}: tail touched");
            }
        }
    }
}

macro_rules! per_dtype {
    ($($reduce:ident, $avg:ident => $d:ident;)*) => {$(
        #[test]
        fn $reduce() {
            check_reduce_from_host(DType::$d);
        }
        #[test]
        fn $avg() {
            check_avg(DType::$d);
        }
    )*};
}

per_dtype! {
    reduce_i8_matches_reference, avg_i8_matches_reference => I8;
    reduce_u8_matches_reference, avg_u8_matches_reference => U8;
    reduce_i32_matches_reference, avg_i32_matches_reference => I32;
    reduce_u32_matches_reference, avg_u32_matches_reference => U32;
    reduce_i64_matches_reference, avg_i64_matches_reference => I64;
    reduce_u64_matches_reference, avg_u64_matches_reference => U64;
    reduce_f16_matches_reference, avg_f16_matches_reference => F16;
    reduce_f32_matches_reference, avg_f32_matches_reference => F32;
    reduce_bf16_matches_reference, avg_bf16_matches_reference => BF16;
}

/// `WgpuReducer::reduce` between two device buffers whose ranges start at
/// different phases within their words.
#[test]
fn reducer_on_device_buffers_at_different_offsets() {
    let Some(ctx) = ctx() else { return };
    let reducer = WgpuReducer::new(Arc::clone(&ctx));
    let mut rng = Rng(7);
    for dtype in DTYPES {
        let size = dtype.size();
        for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Max, ReduceOp::Min] {
            for len in [1, 2, 5, 257, 1025] {
                let (doff, soff) = (size, 3 * size);
                let init = buffer(dtype, len + 4, &mut rng);
                let src_all = buffer(dtype, len + 4, &mut rng);
                let dst = WgpuBuffer::from_host(Arc::clone(&ctx), &init).expect("dst");
                let src = WgpuBuffer::from_host(Arc::clone(&ctx), &src_all).expect("src");
                reducer
                    .reduce(
                        dtype,
                        op,
                        dst.buffer(),
                        doff as u64,
                        src.buffer(),
                        soff as u64,
                        (len * size) as u64,
                    )
                    .expect("reduce");
                let got = dst.to_host().expect("read");
                let mut want = init.clone();
                want[doff..doff + len * size].copy_from_slice(&reference_reduce(
                    dtype,
                    op,
                    &init[doff..doff + len * size],
                    &src_all[soff..soff + len * size],
                ));
                let what = format!("{dtype} {op} len {len}");
                assert_same(dtype, &what, &got, &want);
                assert_eq!(got[..doff], init[..doff], "{what}: head touched");
                assert_eq!(
                    got[doff + len * size..],
                    init[doff + len * size..],
                    "{what}: tail"
                );
            }
        }
    }
}

/// Buffers larger than one binding are processed in windows.
#[test]
fn windowed_bindings_match_reference() {
    let Some(ctx) = open(&WgpuSettings {
        max_binding_size: Some(1024),
        ..settings()
    }) else {
        return;
    };
    let mut rng = Rng(11);
    for dtype in [DType::U8, DType::F16, DType::F32, DType::I64] {
        let size = dtype.size();
        let len = 10_001;
        for op in [ReduceOp::Sum, ReduceOp::Max] {
            let init = buffer(dtype, len + 2, &mut rng);
            let src = buffer(dtype, len, &mut rng);
            let mut dev = WgpuBuffer::from_host(Arc::clone(&ctx), &init).expect("alloc");
            dev.reduce_from_host(dtype, op, size, &src).expect("reduce");
            let got = dev.to_host().expect("read");
            let mut want = init.clone();
            want[size..(len + 1) * size].copy_from_slice(&reference_reduce(
                dtype,
                op,
                &init[size..(len + 1) * size],
                &src,
            ));
            assert_same(dtype, &format!("windowed {dtype} {op}"), &got, &want);
        }
        let init = buffer(dtype, len + 2, &mut rng);
        let mut dev = WgpuBuffer::from_host(Arc::clone(&ctx), &init).expect("alloc");
        dev.finish_avg(dtype, size, len * size, 3).expect("avg");
        let got = dev.to_host().expect("read");
        let mut want = init.clone();
        want[size..(len + 1) * size].copy_from_slice(&reference_avg(
            dtype,
            &init[size..(len + 1) * size],
            3,
        ));
        assert_same(dtype, &format!("windowed {dtype} avg"), &got, &want);
    }
}

/// More invocations than one dimension of workgroups holds (65535 × 256):
/// the 2-D grid covers every element.
#[test]
fn dispatch_beyond_one_grid_dimension() {
    let Some(ctx) = ctx() else { return };
    let len = 65_535 * 256 + 777;
    let dst: Vec<f32> = (0..len).map(|i| (i % 1000) as f32).collect();
    let src: Vec<f32> = (0..len).map(|i| (i % 7) as f32 * 0.25).collect();
    let mut dev = WgpuBuffer::from_host(ctx, bytemuck::cast_slice(&dst)).expect("alloc");
    dev.reduce_from_host(DType::F32, ReduceOp::Sum, 0, bytemuck::cast_slice(&src))
        .expect("reduce");
    let got = dev.to_host().expect("read");
    let got: &[f32] = bytemuck::cast_slice(&got);
    let bad = (0..len).find(|&i| got[i] != dst[i] + src[i]);
    assert_eq!(bad, None, "first wrong element");
}

#[test]
fn f64_is_unsupported_with_a_clear_error() {
    let Some(ctx) = ctx() else { return };
    let init: Vec<u8> = bytemuck::cast_slice(&[1.0f64, 2.0, 3.0]).to_vec();
    let mut dev = WgpuBuffer::from_host(Arc::clone(&ctx), &init).expect("alloc");
    let check = |r: Result<(), KernelError>| match r {
        Err(KernelError::Unsupported {
            backend: "wgpu",
            what,
        }) => {
            assert!(what.contains("f64"), "{what}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    };
    check(dev.reduce_from_host(DType::F64, ReduceOp::Sum, 0, &init));
    check(dev.finish_avg(DType::F64, 0, 24, 2));
    let other = WgpuBuffer::from_host(Arc::clone(&ctx), &init).expect("alloc");
    check(WgpuReducer::new(ctx).reduce(
        DType::F64,
        ReduceOp::Max,
        dev.buffer(),
        0,
        other.buffer(),
        0,
        24,
    ));
    assert_eq!(
        dev.to_host().expect("read"),
        init,
        "an unsupported call changed nothing"
    );
}

/// read and write at every byte offset and length within a few words: the
/// bytes around the range are never touched.
#[test]
fn misaligned_read_and_write() {
    let Some(ctx) = ctx() else { return };
    let init: Vec<u8> = (0..37u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(1))
        .collect();
    let mut dev = WgpuBuffer::from_host(ctx, &init).expect("alloc");
    assert_eq!(dev.len_bytes(), 37);
    let mut model = init.clone();
    for off in 0..9 {
        for len in 0..14 {
            let data: Vec<u8> = (0..len).map(|i| 200 - (off * 16 + i) as u8).collect();
            dev.write(off, &data).expect("write");
            model[off..off + len].copy_from_slice(&data);
            assert_eq!(dev.to_host().expect("read"), model, "write at {off}+{len}");
            let mut part = vec![0; len];
            dev.read(off + 3, &mut part).expect("read part");
            assert_eq!(
                part,
                model[off + 3..off + 3 + len],
                "read at {}+{len}",
                off + 3
            );
        }
    }
    // The last bytes of a buffer whose length is not a multiple of 4.
    dev.write(35, &[9, 8]).expect("write tail");
    let mut tail = [0; 3];
    dev.read(34, &mut tail).expect("read tail");
    assert_eq!(tail, [model[34], 9, 8]);
}

#[test]
fn rejects_bad_arguments() {
    let Some(ctx) = ctx() else { return };
    let mut dev = WgpuBuffer::new(ctx, 10).expect("alloc");
    assert!(dev.write(8, &[0; 3]).is_err(), "write past the end");
    assert!(dev.read(11, &mut []).is_err(), "read past the end");
    assert!(
        dev.reduce_from_host(DType::F16, ReduceOp::Sum, 1, &[0; 2])
            .is_err(),
        "offset not element-aligned"
    );
    assert!(matches!(
        dev.reduce_from_host(DType::F32, ReduceOp::Sum, 0, &[0; 6]),
        Err(KernelError::Misaligned { .. })
    ));
    assert!(
        dev.reduce_from_host(DType::U8, ReduceOp::Sum, 4, &[0; 7])
            .is_err(),
        "range past the end"
    );
    assert!(
        dev.finish_avg(DType::I64, 0, 8, 5_000_000_000).is_err(),
        "i64 count beyond u32"
    );
    assert_eq!(
        dev.to_host().expect("read"),
        vec![0; 10],
        "failed calls changed nothing"
    );
}

#[test]
fn pipelines_are_compiled_once_per_kernel() {
    let Some(ctx) = open(&settings()) else { return };
    assert_eq!(ctx.compiled_pipelines(), 0);
    let mut dev = WgpuBuffer::new(Arc::clone(&ctx), 64).expect("alloc");
    for _ in 0..3 {
        dev.reduce_from_host(DType::F32, ReduceOp::Sum, 0, &[0; 16])
            .expect("reduce");
        dev.reduce_from_host(DType::F32, ReduceOp::Avg, 16, &[0; 16])
            .expect("reduce");
    }
    assert_eq!(
        ctx.compiled_pipelines(),
        1,
        "avg reduces with the sum kernel"
    );
    dev.reduce_from_host(DType::U8, ReduceOp::Max, 1, &[1; 3])
        .expect("reduce");
    dev.finish_avg(DType::U8, 1, 3, 2).expect("avg");
    dev.write(1, &[7])
        .expect("unaligned write uses the copy kernel");
    assert_eq!(ctx.compiled_pipelines(), 4);
}

#[test]
fn device_memory_moves_between_threads() {
    let Some(ctx) = ctx() else { return };
    let mut mem: Box<dyn DeviceMemory> =
        Box::new(WgpuBuffer::from_host(ctx, bytemuck::cast_slice(&[1i32, 2, 3])).expect("alloc"));
    let out = std::thread::spawn(move || {
        mem.reduce_from_host(
            DType::I32,
            ReduceOp::Sum,
            4,
            bytemuck::cast_slice(&[10i32, 20]),
        )
        .expect("reduce");
        mem.finish_avg(DType::I32, 0, 12, 2).expect("avg");
        let mut out = [0u8; 12];
        mem.read(0, &mut out).expect("read");
        assert_eq!(mem.backend(), "wgpu");
        let scratch = mem.alloc_like(6).expect("alloc_like");
        assert_eq!(scratch.len_bytes(), 6);
        let mut zeros = [1u8; 6];
        scratch.read(0, &mut zeros).expect("read scratch");
        assert_eq!(zeros, [0; 6], "alloc_like is zeroed");
        out
    })
    .join()
    .expect("thread");
    assert_eq!(bytemuck::cast_slice::<u8, i32>(&out), [0, 6, 11]);
}

/// Every wait for the device is bounded: with a 1 ns timeout, a read behind
/// large reductions and a synchronize after more fail with an error
/// naming what was awaited, the timeout and the adapter; none hangs.
#[test]
fn waits_time_out_with_an_error_naming_what_was_awaited() {
    let Some(ctx) = open(&WgpuSettings {
        timeout: std::time::Duration::from_nanos(1),
        ..settings()
    }) else {
        return;
    };
    assert_eq!(ctx.timeout(), std::time::Duration::from_nanos(1));
    let adapter = ctx.adapter().name.clone();
    let len = 1 << 22;
    let bytes = len * 4;
    let src: Vec<f32> = (0..len).map(|i| (i % 7) as f32).collect();
    let mut dev = WgpuBuffer::new(ctx.clone(), bytes).expect("alloc");
    // Several reductions queued, so that the device is still busy when the
    // wait starts even if this thread is descheduled for a while.
    let reduce = |dev: &mut WgpuBuffer| {
        for _ in 0..4 {
            dev.reduce_from_host(DType::F32, ReduceOp::Sum, 0, bytemuck::cast_slice(&src))
                .expect("reduce is submitted, not waited for");
        }
    };
    let timed_out = |err: KernelError, what: &str| {
        let KernelError::Timeout { message, .. } = &err else {
            panic!("not a device timeout: {err}");
        };
        for part in ["did not finish", what, "within 1ns", adapter.as_str()] {
            assert!(message.contains(part), "'{part}' not in: {err}");
        }
    };

    // The device usually is still busy when a 1 ns wait starts; lavapipe
    // sometimes runs a submission to its end inside the submitting call,
    // under load. Try a few times with more work queued each time: the
    // bound is what is tested, and one timed-out wait of each kind shows
    // it. The error's text is checked deterministically by the kernel's
    // unit test `wait_result_names_what_timed_out`.
    const TRIES: usize = 6;
    let mut read_timed_out = false;
    let mut sync_timed_out = false;
    for attempt in 0..TRIES {
        for _ in 0..1 << attempt {
            reduce(&mut dev);
        }
        if !read_timed_out {
            if let Err(err) = dev.to_host() {
                timed_out(
                    err,
                    &format!(
                        "copying {bytes} bytes back to the host after reducing {bytes} bytes of f32 (sum)"
                    ),
                );
                read_timed_out = true;
            }
        }
        if !sync_timed_out {
            reduce(&mut dev);
            if let Err(err) = ctx.synchronize() {
                timed_out(
                    err,
                    &format!("(the last: reducing {bytes} bytes of f32 (sum))"),
                );
                sync_timed_out = true;
            }
        }
        if read_timed_out && sync_timed_out {
            return;
        }
    }
    println!(
        "SKIPPED in part: in {TRIES} tries the device finished within 1 ns \
         (read timed out: {read_timed_out}, synchronize timed out: {sync_timed_out})"
    );
    assert!(
        read_timed_out || sync_timed_out,
        "no wait timed out in {TRIES} tries with up to {} reductions of 16 MiB queued",
        4 << (TRIES - 1)
    );
}
