//! Helpers shared by the device-backend tests: element generators with the
//! interesting values (NaN, ±inf, ±0, subnormals, extremes) and a comparison
//! that is bit for bit except that any NaN equals any NaN.

#![allow(dead_code)]

use half::{bf16, f16};
use oxccl_kernels::{DType, ReduceOp, Reducer, reference::ReferenceReducer};

/// Lengths (in elements) every backend is checked at: empty, one, around a
/// 256-invocation workgroup (in elements and in 4-byte words), and large odd.
pub const LENGTHS: [usize; 10] = [0, 1, 3, 5, 255, 256, 257, 1023, 1025, 100_003];

/// splitmix64: a tiny deterministic generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// One element of `dtype`: mostly interesting values, otherwise random bits.
pub fn element(dtype: DType, rng: &mut Rng) -> Vec<u8> {
    let sel = rng.next() % 16;
    let bits = rng.next();
    let small = (bits % 2001) as f64 / 8.0 - 125.0;
    macro_rules! float {
        ($t:ty, $bits:ty, $from:expr, $from_bits:expr) => {{
            let v: $t = match sel {
                0 => <$t>::NAN,
                1 => <$t>::INFINITY,
                2 => <$t>::NEG_INFINITY,
                3 => $from(-0.0),
                4 => $from(0.0),
                5 => $from_bits(1 + (bits % 7) as $bits),
                6 => <$t>::MAX,
                7 => <$t>::MIN_POSITIVE,
                8 => $from(-(bits as f64 % 1e4)),
                9..=12 => $from(small),
                _ => $from_bits(bits as $bits),
            };
            bytemuck::bytes_of(&v).to_vec()
        }};
    }
    macro_rules! int {
        ($t:ty) => {{
            let v: $t = match sel {
                0 => <$t>::MIN,
                1 => <$t>::MAX,
                2 => 0,
                3 => 1,
                4 => (bits % 5) as $t,
                5 => <$t>::MAX.wrapping_sub((bits % 3) as $t),
                _ => bits as $t,
            };
            bytemuck::bytes_of(&v).to_vec()
        }};
    }
    match dtype {
        DType::I8 => int!(i8),
        DType::U8 => int!(u8),
        DType::I32 => int!(i32),
        DType::U32 => int!(u32),
        DType::I64 => int!(i64),
        DType::U64 => int!(u64),
        DType::F32 => float!(f32, u32, |x: f64| x as f32, f32::from_bits),
        DType::F64 => float!(f64, u64, |x: f64| x, f64::from_bits),
        DType::F16 => float!(f16, u16, f16::from_f64, f16::from_bits),
        DType::BF16 => float!(bf16, u16, bf16::from_f64, bf16::from_bits),
    }
}

/// `len` random elements of `dtype` as bytes.
pub fn buffer(dtype: DType, len: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(len * dtype.size());
    for _ in 0..len {
        out.extend_from_slice(&element(dtype, rng));
    }
    out
}

pub fn is_nan(dtype: DType, e: &[u8]) -> bool {
    match dtype {
        DType::F16 => bytemuck::pod_read_unaligned::<f16>(e).is_nan(),
        DType::BF16 => bytemuck::pod_read_unaligned::<bf16>(e).is_nan(),
        DType::F32 => bytemuck::pod_read_unaligned::<f32>(e).is_nan(),
        DType::F64 => bytemuck::pod_read_unaligned::<f64>(e).is_nan(),
        _ => false,
    }
}

/// Bit-for-bit equality, except that any NaN equals any NaN.
pub fn assert_same(dtype: DType, what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let size = dtype.size();
    for (i, (g, w)) in got
        .chunks_exact(size)
        .zip(want.chunks_exact(size))
        .enumerate()
    {
        let same = g == w || (is_nan(dtype, g) && is_nan(dtype, w));
        assert!(
            same,
            "{what}: element {i} differs: got {g:02x?}, want {w:02x?}"
        );
    }
}

/// The reference's `op(dst, src)`.
pub fn reference_reduce(dtype: DType, op: ReduceOp, dst: &[u8], src: &[u8]) -> Vec<u8> {
    let mut want = dst.to_vec();
    ReferenceReducer
        .reduce(dtype, op, &mut want, src)
        .expect("reference reduce");
    want
}

/// The reference's avg scaling.
pub fn reference_avg(dtype: DType, dst: &[u8], n: usize) -> Vec<u8> {
    let mut want = dst.to_vec();
    ReferenceReducer
        .finish_avg(dtype, &mut want, n)
        .expect("reference avg");
    want
}

/// Whether the environment variable `name` is set to "1".
pub fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}
