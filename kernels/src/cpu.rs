//! The host reducer, written so that the compiler vectorizes it.
//!
//! Every kernel is a fixed-width loop (`chunks_exact` of `LANES` elements,
//! branch-free element operations) over typed slices. The typed slices come
//! from `bytemuck::try_cast_slice` when the byte buffers are aligned for the
//! element type; when they are not, blocks of `BLOCK` elements are copied
//! into aligned stack arrays, reduced there and copied back.
//!
//! f16 and bf16 are computed in f32 and rounded back to nearest-even after
//! each operation, exactly as the reference does per element: f16 in blocks of
//! `HALF_BLOCK` elements through `half`'s (hardware) slice conversions, bf16
//! by a branch-free conversion inlined into the element loop.
//!
//! Results are bit-identical to [`ReferenceReducer`](crate::reference::ReferenceReducer)
//! (NaN payloads aside); the tests below check that for every dtype and op.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::reference::Arith;
use crate::{DType, KernelError, ReduceOp, Reducer, check_len, check_reduce_args};

/// Elements per iteration of the vectorized loops.
const LANES: usize = 32;
/// Elements per block copied to the stack when the buffers are misaligned.
const BLOCK: usize = 64;
/// Elements per block widened to f32 for f16 and bf16.
const HALF_BLOCK: usize = 256;

/// Vectorized host reducer.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuReducer;

/// `dst[i] = f(dst[i], src[i])` in fixed-width chunks the compiler vectorizes.
#[inline(always)]
fn zip_slices<T: Copy, F: Fn(T, T) -> T>(dst: &mut [T], src: &[T], f: F) {
    let mut d = dst.chunks_exact_mut(LANES);
    let mut s = src.chunks_exact(LANES);
    for (dc, sc) in (&mut d).zip(&mut s) {
        for (a, b) in dc.iter_mut().zip(sc) {
            *a = f(*a, *b);
        }
    }
    for (a, b) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *a = f(*a, *b);
    }
}

/// `dst[i] = f(dst[i])` in fixed-width chunks the compiler vectorizes.
#[inline(always)]
fn map_slice<T: Copy, F: Fn(T) -> T>(dst: &mut [T], f: F) {
    let mut d = dst.chunks_exact_mut(LANES);
    for dc in &mut d {
        for a in dc.iter_mut() {
            *a = f(*a);
        }
    }
    for a in d.into_remainder() {
        *a = f(*a);
    }
}

/// Applies `kernel` to `dst` and `src` viewed as `[T]`: directly when both
/// byte slices are aligned for `T`, else block by block through aligned stack
/// copies of at most `B` elements. The lengths are checked by the caller.
#[inline(always)]
fn with_typed<T: bytemuck::Pod, const B: usize>(
    dst: &mut [u8],
    src: &[u8],
    kernel: impl Fn(&mut [T], &[T]),
) {
    if let (Ok(d), Ok(s)) = (
        bytemuck::try_cast_slice_mut::<u8, T>(dst),
        bytemuck::try_cast_slice::<u8, T>(src),
    ) {
        kernel(d, s);
        return;
    }
    let size = size_of::<T>();
    let mut a = [T::zeroed(); B];
    let mut b = [T::zeroed(); B];
    for (dc, sc) in dst.chunks_mut(B * size).zip(src.chunks(B * size)) {
        let n = dc.len() / size;
        let (a, b) = (&mut a[..n], &mut b[..n]);
        bytemuck::cast_slice_mut::<T, u8>(a).copy_from_slice(dc);
        bytemuck::cast_slice_mut::<T, u8>(b).copy_from_slice(sc);
        kernel(a, b);
        dc.copy_from_slice(bytemuck::cast_slice::<T, u8>(a));
    }
}

/// Like [`with_typed`], for `dst` alone.
#[inline(always)]
fn with_typed_mut<T: bytemuck::Pod, const B: usize>(dst: &mut [u8], kernel: impl Fn(&mut [T])) {
    if let Ok(d) = bytemuck::try_cast_slice_mut::<u8, T>(dst) {
        kernel(d);
        return;
    }
    let size = size_of::<T>();
    let mut a = [T::zeroed(); B];
    for dc in dst.chunks_mut(B * size) {
        let a = &mut a[..dc.len() / size];
        bytemuck::cast_slice_mut::<T, u8>(a).copy_from_slice(dc);
        kernel(a);
        dc.copy_from_slice(bytemuck::cast_slice::<T, u8>(a));
    }
}

/// Integer arithmetic: wrapping, as the reference defines it.
trait Int: bytemuck::Pod + Ord + Arith {
    fn wadd(self, other: Self) -> Self;
    fn wmul(self, other: Self) -> Self;
}

macro_rules! int_impl {
    ($($t:ty),*) => {$(
        impl Int for $t {
            #[inline(always)]
            fn wadd(self, other: Self) -> Self { self.wrapping_add(other) }
            #[inline(always)]
            fn wmul(self, other: Self) -> Self { self.wrapping_mul(other) }
        }
    )*};
}
int_impl!(i8, u8, i32, u32, i64, u64);

fn reduce_int<T: Int>(op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => {
            with_typed::<T, BLOCK>(dst, src, |d, s| zip_slices(d, s, T::wadd))
        }
        ReduceOp::Prod => with_typed::<T, BLOCK>(dst, src, |d, s| zip_slices(d, s, T::wmul)),
        ReduceOp::Max => with_typed::<T, BLOCK>(dst, src, |d, s| zip_slices(d, s, Ord::max)),
        ReduceOp::Min => with_typed::<T, BLOCK>(dst, src, |d, s| zip_slices(d, s, Ord::min)),
    }
}

fn avg_int<T: Int>(dst: &mut [u8], n: usize) {
    // Integer division does not vectorize; it runs once per collective.
    with_typed_mut::<T, BLOCK>(dst, |d| map_slice(d, |x| x.div_count(n)));
}

/// f32 and f64 arithmetic.
trait Float: bytemuck::Pod + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self> {
    const NAN: Self;
    fn is_nan(self) -> bool;
    fn fmax(self, other: Self) -> Self;
    fn fmin(self, other: Self) -> Self;
    fn div_usize(self, n: usize) -> Self;
}

macro_rules! float_impl {
    ($($t:ty),*) => {$(
        impl Float for $t {
            const NAN: Self = <$t>::NAN;
            #[inline(always)]
            fn is_nan(self) -> bool { <$t>::is_nan(self) }
            #[inline(always)]
            fn fmax(self, other: Self) -> Self { <$t>::max(self, other) }
            #[inline(always)]
            fn fmin(self, other: Self) -> Self { <$t>::min(self, other) }
            #[inline(always)]
            fn div_usize(self, n: usize) -> Self { self / n as $t }
        }
    )*};
}
float_impl!(f32, f64);

/// NaN-propagating maximum, written as a select so that it vectorizes.
#[inline(always)]
fn nan_max<T: Float>(a: T, b: T) -> T {
    let m = a.fmax(b);
    if a.is_nan() | b.is_nan() { T::NAN } else { m }
}

/// NaN-propagating minimum, written as a select so that it vectorizes.
#[inline(always)]
fn nan_min<T: Float>(a: T, b: T) -> T {
    let m = a.fmin(b);
    if a.is_nan() | b.is_nan() { T::NAN } else { m }
}

/// Combines float slices with `op`.
#[inline(always)]
fn zip_float<T: Float>(op: ReduceOp, d: &mut [T], s: &[T]) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => zip_slices(d, s, |a, b| a + b),
        ReduceOp::Prod => zip_slices(d, s, |a, b| a * b),
        ReduceOp::Max => zip_slices(d, s, nan_max),
        ReduceOp::Min => zip_slices(d, s, nan_min),
    }
}

fn reduce_float<T: Float>(op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    let op = if op == ReduceOp::Avg {
        ReduceOp::Sum
    } else {
        op
    };
    with_typed::<T, BLOCK>(dst, src, |d, s| zip_float(op, d, s));
}

fn avg_float<T: Float>(dst: &mut [u8], n: usize) {
    // A true division (not a multiply by the reciprocal), as the reference does.
    with_typed_mut::<T, BLOCK>(dst, |d| map_slice(d, |x| x.div_usize(n)));
}

/// f16 and bf16: stored in 16 bits, computed in f32 and rounded back to
/// nearest-even after each operation, as the reference does.
trait Half: bytemuck::Pod {
    /// `d[i] = round(op(d[i] as f32, s[i] as f32))`; `op` is not `Avg`.
    fn zip(op: ReduceOp, d: &mut [Self], s: &[Self]);
    /// `d[i] = round(d[i] as f32 / divisor)`.
    fn div(d: &mut [Self], divisor: f32);
}

/// f16 goes through `half`'s slice conversions, which use the hardware
/// (x86 F16C, aarch64 fp16) where the CPU has it, a block at a time; a
/// branch-free software conversion under the baseline x86-64 target was half
/// as fast.
impl Half for f16 {
    fn zip(op: ReduceOp, d: &mut [Self], s: &[Self]) {
        let mut a = [0f32; HALF_BLOCK];
        let mut b = [0f32; HALF_BLOCK];
        for (dc, sc) in d.chunks_mut(HALF_BLOCK).zip(s.chunks(HALF_BLOCK)) {
            let (a, b) = (&mut a[..dc.len()], &mut b[..dc.len()]);
            dc.convert_to_f32_slice(a);
            sc.convert_to_f32_slice(b);
            zip_float(op, a, b);
            dc.convert_from_f32_slice(a);
        }
    }

    fn div(d: &mut [Self], divisor: f32) {
        let mut a = [0f32; HALF_BLOCK];
        for dc in d.chunks_mut(HALF_BLOCK) {
            let a = &mut a[..dc.len()];
            dc.convert_to_f32_slice(a);
            map_slice(a, |x| x / divisor);
            dc.convert_from_f32_slice(a);
        }
    }
}

/// bf16 is converted inline by branch-free code of our own (widening is a
/// shift), so that widen, combine and round fuse into one vectorized loop.
impl Half for bf16 {
    fn zip(op: ReduceOp, d: &mut [Self], s: &[Self]) {
        #[inline(always)]
        fn lift(f: impl Fn(f32, f32) -> f32) -> impl Fn(bf16, bf16) -> bf16 {
            move |a, b| bf16_from_f32(f(bf16_to_f32(a), bf16_to_f32(b)))
        }
        match op {
            ReduceOp::Sum | ReduceOp::Avg => zip_slices(d, s, lift(|a, b| a + b)),
            ReduceOp::Prod => zip_slices(d, s, lift(|a, b| a * b)),
            ReduceOp::Max => zip_slices(d, s, lift(nan_max)),
            ReduceOp::Min => zip_slices(d, s, lift(nan_min)),
        }
    }

    fn div(d: &mut [Self], divisor: f32) {
        map_slice(d, |x| bf16_from_f32(bf16_to_f32(x) / divisor));
    }
}

/// bf16 to f32 (exact).
#[inline(always)]
fn bf16_to_f32(x: bf16) -> f32 {
    f32::from_bits(u32::from(x.to_bits()) << 16)
}

/// f32 to bf16, rounding to nearest even; NaN stays NaN (quiet). Bit-exact
/// with `bf16::from_f32` (tested over every f32).
#[inline(always)]
fn bf16_from_f32(x: f32) -> bf16 {
    let x = x.to_bits();
    let nan = x & 0x7FFF_FFFF > 0x7F80_0000;
    // Round up when the dropped half is above one half, or exactly one half
    // and the kept part is odd.
    let round_up = (x & 0x8000 != 0) & (x & 0x1_7FFF != 0);
    let rounded = (x >> 16).wrapping_add(u32::from(round_up));
    let quiet_nan = (x >> 16) | 0x0040;
    bf16::from_bits((if nan { quiet_nan } else { rounded }) as u16)
}

fn reduce_half<H: Half>(op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    let op = if op == ReduceOp::Avg {
        ReduceOp::Sum
    } else {
        op
    };
    with_typed::<H, HALF_BLOCK>(dst, src, |d, s| H::zip(op, d, s));
}

fn avg_half<H: Half>(dst: &mut [u8], n: usize) {
    let divisor = n as f32;
    with_typed_mut::<H, HALF_BLOCK>(dst, |d| H::div(d, divisor));
}

impl Reducer for CpuReducer {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn reduce(
        &self,
        dtype: DType,
        op: ReduceOp,
        dst: &mut [u8],
        src: &[u8],
    ) -> Result<(), KernelError> {
        check_reduce_args(dtype, dst, src)?;
        match dtype {
            DType::I8 => reduce_int::<i8>(op, dst, src),
            DType::U8 => reduce_int::<u8>(op, dst, src),
            DType::I32 => reduce_int::<i32>(op, dst, src),
            DType::U32 => reduce_int::<u32>(op, dst, src),
            DType::I64 => reduce_int::<i64>(op, dst, src),
            DType::U64 => reduce_int::<u64>(op, dst, src),
            DType::F16 => reduce_half::<f16>(op, dst, src),
            DType::BF16 => reduce_half::<bf16>(op, dst, src),
            DType::F32 => reduce_float::<f32>(op, dst, src),
            DType::F64 => reduce_float::<f64>(op, dst, src),
        }
        Ok(())
    }

    fn finish_avg(
        &self,
        dtype: DType,
        dst: &mut [u8],
        contributions: usize,
    ) -> Result<(), KernelError> {
        check_len(dtype, dst.len())?;
        if contributions <= 1 {
            return Ok(());
        }
        let n = contributions;
        match dtype {
            DType::I8 => avg_int::<i8>(dst, n),
            DType::U8 => avg_int::<u8>(dst, n),
            DType::I32 => avg_int::<i32>(dst, n),
            DType::U32 => avg_int::<u32>(dst, n),
            DType::I64 => avg_int::<i64>(dst, n),
            DType::U64 => avg_int::<u64>(dst, n),
            DType::F16 => avg_half::<f16>(dst, n),
            DType::BF16 => avg_half::<bf16>(dst, n),
            DType::F32 => avg_float::<f32>(dst, n),
            DType::F64 => avg_float::<f64>(dst, n),
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::reference::ReferenceReducer;

    // The generators and comparison shared with the device-backend tests.
    use crate::test_common::{Rng, assert_same, element};

    /// A buffer of `len` elements starting `offset` bytes into an 8-aligned
    /// allocation (offset 1 makes the typed cast fail for multi-byte types).
    struct Buf {
        words: Vec<u64>,
        offset: usize,
        bytes: usize,
    }

    impl Buf {
        fn new(dtype: DType, len: usize, offset: usize, rng: &mut Rng) -> Buf {
            let bytes = len * dtype.size();
            let mut buf = Buf {
                words: vec![0; (bytes + offset).div_ceil(8)],
                offset,
                bytes,
            };
            let data = buf.as_mut();
            for e in data.chunks_exact_mut(dtype.size()) {
                e.copy_from_slice(&element(dtype, rng));
            }
            buf
        }
        fn as_ref(&self) -> &[u8] {
            &bytemuck::cast_slice(&self.words)[self.offset..self.offset + self.bytes]
        }
        fn as_mut(&mut self) -> &mut [u8] {
            &mut bytemuck::cast_slice_mut(&mut self.words)[self.offset..self.offset + self.bytes]
        }
    }

    fn check_reduce(dtype: DType, op: ReduceOp, len: usize, offsets: (usize, usize), seed: u64) {
        let mut rng = Rng(seed);
        let mut dst = Buf::new(dtype, len, offsets.0, &mut rng);
        let src = Buf::new(dtype, len, offsets.1, &mut rng);
        let mut want = dst.as_ref().to_vec();
        ReferenceReducer
            .reduce(dtype, op, &mut want, src.as_ref())
            .unwrap();
        CpuReducer
            .reduce(dtype, op, dst.as_mut(), src.as_ref())
            .unwrap();
        let what = format!("{dtype} {op} len {len} offsets {offsets:?} seed {seed}");
        assert_same(dtype, &what, dst.as_ref(), &want);
    }

    fn check_avg(dtype: DType, n: usize, len: usize, offset: usize, seed: u64) {
        let mut rng = Rng(seed);
        let mut dst = Buf::new(dtype, len, offset, &mut rng);
        let mut want = dst.as_ref().to_vec();
        ReferenceReducer.finish_avg(dtype, &mut want, n).unwrap();
        CpuReducer.finish_avg(dtype, dst.as_mut(), n).unwrap();
        let what = format!("{dtype} avg/{n} len {len} offset {offset} seed {seed}");
        assert_same(dtype, &what, dst.as_ref(), &want);
    }

    const LENGTHS: [usize; 10] = [0, 1, 15, 16, 17, 63, 64, 65, 257, 1000];
    const OFFSETS: [(usize, usize); 4] = [(0, 0), (1, 0), (0, 1), (1, 1)];

    #[test]
    fn matches_reference_at_edge_lengths() {
        for dtype in DType::ALL {
            for op in ReduceOp::ALL {
                for len in LENGTHS {
                    for offsets in OFFSETS {
                        check_reduce(dtype, op, len, offsets, len as u64 * 31 + 7);
                    }
                }
            }
        }
    }

    #[test]
    fn finish_avg_matches_reference() {
        for dtype in DType::ALL {
            for n in [0, 1, 2, 3, 7, 127, 128, 255, 256, 300] {
                for len in [0, 1, 17, 65, 1000] {
                    for offset in [0, 1] {
                        check_avg(dtype, n, len, offset, n as u64 ^ len as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn signed_zero_and_nan_in_min_max() {
        let cases: [(f32, f32); 6] = [
            (0.0, -0.0),
            (-0.0, 0.0),
            (f32::NAN, 1.0),
            (1.0, f32::NAN),
            (f32::INFINITY, f32::NAN),
            (f32::NEG_INFINITY, 3.0),
        ];
        for op in [ReduceOp::Max, ReduceOp::Min] {
            let mut want: Vec<f32> = cases.iter().map(|c| c.0).collect();
            let mut got = want.clone();
            let src: Vec<f32> = cases.iter().map(|c| c.1).collect();
            let src = bytemuck::cast_slice(&src);
            ReferenceReducer
                .reduce(DType::F32, op, bytemuck::cast_slice_mut(&mut want), src)
                .unwrap();
            CpuReducer
                .reduce(DType::F32, op, bytemuck::cast_slice_mut(&mut got), src)
                .unwrap();
            let (got, want) = (bytemuck::cast_slice(&got), bytemuck::cast_slice(&want));
            assert_same(DType::F32, op.name(), got, want);
        }
    }

    fn check_bf16_narrowing(bits: u32) {
        let x = f32::from_bits(bits);
        let (got, want) = (bf16_from_f32(x), bf16::from_f32(x));
        let ok = got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan());
        assert!(ok, "bf16 of {bits:#010x}: {got:?} != {want:?}");
    }

    #[test]
    fn bf16_conversions_match_half_crate() {
        for bits in 0..=u16::MAX {
            let b = bf16::from_bits(bits);
            let (got, want) = (bf16_to_f32(b), b.to_f32());
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()));
        }
        // Every rounding-relevant low half around every bf16 value, plus a
        // prime stride through all f32.
        for high in 0..=u32::from(u16::MAX) {
            for low in [0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF] {
                check_bf16_narrowing((high << 16) | low);
            }
        }
        for bits in (0..=u32::MAX).step_by(65_537) {
            check_bf16_narrowing(bits);
        }
    }

    /// Every f32 (seconds in release): `cargo test -p oxccl-kernels --release -- --ignored`.
    #[test]
    #[ignore = "exhaustive, slow"]
    fn bf16_narrowing_exhaustive() {
        for bits in 0..=u32::MAX {
            check_bf16_narrowing(bits);
        }
    }

    #[test]
    fn rejects_bad_lengths() {
        let mut d = [0u8; 4];
        assert!(matches!(
            CpuReducer.reduce(DType::F32, ReduceOp::Sum, &mut d, &[0u8; 8]),
            Err(KernelError::LengthMismatch { .. })
        ));
        let mut d = [0u8; 6];
        assert!(matches!(
            CpuReducer.reduce(DType::F32, ReduceOp::Sum, &mut d, &[0u8; 6]),
            Err(KernelError::Misaligned { .. })
        ));
        assert!(matches!(
            CpuReducer.finish_avg(DType::F64, &mut d, 2),
            Err(KernelError::Misaligned { .. })
        ));
    }

    fn any_len() -> impl Strategy<Value = usize> {
        prop_oneof![prop::sample::select(LENGTHS.to_vec()), 0usize..5000,]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn reduce_matches_reference(
            dtype in prop::sample::select(DType::ALL.to_vec()),
            op in prop::sample::select(ReduceOp::ALL.to_vec()),
            len in any_len(),
            offsets in prop::sample::select(OFFSETS.to_vec()),
            seed in any::<u64>(),
        ) {
            check_reduce(dtype, op, len, offsets, seed);
        }

        #[test]
        fn avg_matches_reference(
            dtype in prop::sample::select(DType::ALL.to_vec()),
            n in prop_oneof![prop::sample::select(vec![1usize, 2, 3, 7, 300]), 0usize..100_000],
            len in any_len(),
            offset in 0usize..2,
            seed in any::<u64>(),
        ) {
            check_avg(dtype, n, len, offset, seed);
        }
    }
}
