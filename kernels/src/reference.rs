//! The reference reducer: one element at a time, no cleverness.
//!
//! It defines the semantics that every other reducer must match, and it is the
//! oracle of the workspace's tests. Do not optimise it.

use half::{bf16, f16};

use crate::{DType, KernelError, ReduceOp, Reducer, check_len, check_reduce_args};

/// Naive element-by-element reducer (the test oracle).
#[derive(Debug, Default, Clone, Copy)]
pub struct ReferenceReducer;

/// One element type's arithmetic, as the reference defines it.
pub(crate) trait Arith: bytemuck::Pod {
    fn combine(op: ReduceOp, a: Self, b: Self) -> Self;
    fn div_count(self, n: usize) -> Self;
}

macro_rules! int_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            fn combine(op: ReduceOp, a: Self, b: Self) -> Self {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => a.wrapping_add(b),
                    ReduceOp::Prod => a.wrapping_mul(b),
                    ReduceOp::Max => a.max(b),
                    ReduceOp::Min => a.min(b),
                }
            }
            fn div_count(self, n: usize) -> Self {
                // n is a world size: it fits every integer type we divide by
                // except i8/u8 above 127/255 ranks, where the quotient is 0
                // (or -1..=0) anyway.
                match <$t>::try_from(n) {
                    Ok(d) if d != 0 => self / d,
                    _ => 0,
                }
            }
        }
    )*};
}
int_arith!(i8, u8, i32, u32, i64, u64);

macro_rules! float_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            fn combine(op: ReduceOp, a: Self, b: Self) -> Self {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => a + b,
                    ReduceOp::Prod => a * b,
                    ReduceOp::Max => if a.is_nan() || b.is_nan() { <$t>::NAN } else { a.max(b) },
                    ReduceOp::Min => if a.is_nan() || b.is_nan() { <$t>::NAN } else { a.min(b) },
                }
            }
            fn div_count(self, n: usize) -> Self {
                self / n as $t
            }
        }
    )*};
}
float_arith!(f32, f64);

macro_rules! half_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            fn combine(op: ReduceOp, a: Self, b: Self) -> Self {
                <$t>::from_f32(f32::combine(op, a.to_f32(), b.to_f32()))
            }
            fn div_count(self, n: usize) -> Self {
                <$t>::from_f32(self.to_f32() / n as f32)
            }
        }
    )*};
}
half_arith!(f16, bf16);

fn reduce_typed<T: Arith>(op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    let size = std::mem::size_of::<T>();
    for (d, s) in dst.chunks_exact_mut(size).zip(src.chunks_exact(size)) {
        let a: T = bytemuck::pod_read_unaligned(d);
        let b: T = bytemuck::pod_read_unaligned(s);
        d.copy_from_slice(bytemuck::bytes_of(&T::combine(op, a, b)));
    }
}

fn avg_typed<T: Arith>(dst: &mut [u8], n: usize) {
    let size = std::mem::size_of::<T>();
    for d in dst.chunks_exact_mut(size) {
        let a: T = bytemuck::pod_read_unaligned(d);
        d.copy_from_slice(bytemuck::bytes_of(&a.div_count(n)));
    }
}

/// Calls `$f::<T>($args)` with `T` the Rust type of `$dtype`.
macro_rules! dispatch {
    ($dtype:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            DType::I8 => $f::<i8>($($arg),*),
            DType::U8 => $f::<u8>($($arg),*),
            DType::I32 => $f::<i32>($($arg),*),
            DType::U32 => $f::<u32>($($arg),*),
            DType::I64 => $f::<i64>($($arg),*),
            DType::U64 => $f::<u64>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
        }
    };
}

impl Reducer for ReferenceReducer {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn reduce(
        &self,
        dtype: DType,
        op: ReduceOp,
        dst: &mut [u8],
        src: &[u8],
    ) -> Result<(), KernelError> {
        check_reduce_args(dtype, dst, src)?;
        dispatch!(dtype, reduce_typed(op, dst, src));
        Ok(())
    }

    fn finish_avg(
        &self,
        dtype: DType,
        dst: &mut [u8],
        contributions: usize,
    ) -> Result<(), KernelError> {
        check_len(dtype, dst.len())?;
        if contributions > 1 {
            dispatch!(dtype, avg_typed(dst, contributions));
        }
        Ok(())
    }
}

/// Reduces `inputs` (one slice per rank, all of one length) with `op` in rank
/// order, including the final averaging for `Avg`. The oracle for collectives.
pub fn reduce_all<T: crate::Element>(op: ReduceOp, inputs: &[&[T]]) -> Vec<T> {
    let Some((first, rest)) = inputs.split_first() else {
        return Vec::new();
    };
    let mut acc: Vec<T> = first.to_vec();
    for input in rest {
        ReferenceReducer
            .reduce(
                T::DTYPE,
                op,
                bytemuck::cast_slice_mut(&mut acc),
                bytemuck::cast_slice(input),
            )
            .expect("reference reduce: inputs of equal length");
    }
    if op == ReduceOp::Avg {
        ReferenceReducer
            .finish_avg(T::DTYPE, bytemuck::cast_slice_mut(&mut acc), inputs.len())
            .expect("reference avg");
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_semantics() {
        let out = reduce_all(ReduceOp::Sum, &[&[i8::MAX, 1][..], &[1, 2][..]]);
        assert_eq!(out, vec![i8::MIN, 3], "sum wraps");
        let out = reduce_all(ReduceOp::Avg, &[&[-7i32, 7][..], &[0, 0][..]]);
        assert_eq!(out, vec![-3, 3], "avg truncates toward zero");
        let out = reduce_all(ReduceOp::Min, &[&[3u64, 9][..], &[5, 1][..]]);
        assert_eq!(out, vec![3, 1]);
    }

    #[test]
    fn nan_propagates_through_min_max() {
        for op in [ReduceOp::Min, ReduceOp::Max] {
            let out = reduce_all(op, &[&[f32::NAN, 1.0][..], &[0.0, f32::NAN][..]]);
            assert!(out[0].is_nan() && out[1].is_nan(), "{op}: {out:?}");
        }
    }

    #[test]
    fn half_types_round_through_f32() {
        let a = [bf16::from_f32(1.0), bf16::from_f32(256.0)];
        let b = [bf16::from_f32(1.0), bf16::from_f32(1.0)];
        let out = reduce_all(ReduceOp::Sum, &[&a[..], &b[..]]);
        // 257 is not representable in bf16: round to nearest even gives 256.
        assert_eq!(out, vec![bf16::from_f32(2.0), bf16::from_f32(256.0)]);
    }

    #[test]
    fn rejects_bad_lengths() {
        let mut d = [0u8; 4];
        assert!(matches!(
            ReferenceReducer.reduce(DType::F32, ReduceOp::Sum, &mut d, &[0u8; 8]),
            Err(KernelError::LengthMismatch { .. })
        ));
        let mut d = [0u8; 6];
        assert!(matches!(
            ReferenceReducer.reduce(DType::F32, ReduceOp::Sum, &mut d, &[0u8; 6]),
            Err(KernelError::Misaligned { .. })
        ));
    }
}
