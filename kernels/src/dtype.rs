use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

/// Element type of a buffer. The discriminants are NCCL's `ncclDataType_t` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum DType {
    /// Signed 8-bit integer.
    I8 = 0,
    /// Unsigned 8-bit integer.
    U8 = 1,
    /// Signed 32-bit integer.
    I32 = 2,
    /// Unsigned 32-bit integer.
    U32 = 3,
    /// Signed 64-bit integer.
    I64 = 4,
    /// Unsigned 64-bit integer.
    U64 = 5,
    /// IEEE 754 half precision.
    F16 = 6,
    /// IEEE 754 single precision.
    F32 = 7,
    /// IEEE 754 double precision.
    F64 = 8,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16 = 9,
}

impl DType {
    /// Every dtype, in discriminant order.
    pub const ALL: [DType; 10] = [
        DType::I8,
        DType::U8,
        DType::I32,
        DType::U32,
        DType::I64,
        DType::U64,
        DType::F16,
        DType::F32,
        DType::F64,
        DType::BF16,
    ];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    /// Whether this is a floating-point type.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// Short lowercase name ("f32", "bf16", ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::I32 => "i32",
            DType::U32 => "u32",
            DType::I64 => "i64",
            DType::U64 => "u64",
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
        }
    }

    /// nccl-tests' name ("float", "half", "bfloat16", "int32", ...).
    pub const fn nccl_name(self) -> &'static str {
        match self {
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::I64 => "int64",
            DType::U64 => "uint64",
            DType::F16 => "half",
            DType::F32 => "float",
            DType::F64 => "double",
            DType::BF16 => "bfloat16",
        }
    }

    /// The dtype with NCCL discriminant `value`.
    pub fn from_u8(value: u8) -> Option<DType> {
        DType::ALL.get(usize::from(value)).copied()
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = String;

    /// Accepts our names ("f32") and nccl-tests' names ("float").
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        DType::ALL
            .into_iter()
            .find(|d| d.name() == lower || d.nccl_name() == lower)
            .or(match lower.as_str() {
                "char" => Some(DType::I8),
                "int" => Some(DType::I32),
                "float16" => Some(DType::F16),
                "float32" => Some(DType::F32),
                "float64" => Some(DType::F64),
                _ => None,
            })
            .ok_or_else(|| format!("unknown dtype '{s}'"))
    }
}

/// Reduction operation. The discriminants are NCCL's `ncclRedOp_t` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum ReduceOp {
    /// Sum.
    Sum = 0,
    /// Product.
    Prod = 1,
    /// Maximum (NaN propagates).
    Max = 2,
    /// Minimum (NaN propagates).
    Min = 3,
    /// Average: the sum divided by the number of ranks (integers: truncated toward zero).
    Avg = 4,
}

impl ReduceOp {
    /// Every op, in discriminant order.
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Prod,
        ReduceOp::Max,
        ReduceOp::Min,
        ReduceOp::Avg,
    ];

    /// Lowercase name, as nccl-tests prints it.
    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
            ReduceOp::Avg => "avg",
        }
    }

    /// The op with NCCL discriminant `value`.
    pub fn from_u8(value: u8) -> Option<ReduceOp> {
        ReduceOp::ALL.get(usize::from(value)).copied()
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ReduceOp {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        ReduceOp::ALL
            .into_iter()
            .find(|o| o.name() == lower)
            .ok_or_else(|| format!("unknown reduction op '{s}'"))
    }
}

/// A Rust type that is one of the [`DType`]s.
pub trait Element: bytemuck::Pod + Send + Sync + fmt::Debug + PartialEq + 'static {
    /// The dtype of this type.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(impl Element for $t { const DTYPE: DType = DType::$d; })*
    };
}

element!(i8 => I8, u8 => U8, i32 => I32, u32 => U32, i64 => I64, u64 => U64,
         f16 => F16, f32 => F32, f64 => F64, bf16 => BF16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discriminants_match_nccl() {
        for (i, d) in DType::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i);
            assert_eq!(DType::from_u8(i as u8), Some(*d));
        }
        assert_eq!(DType::from_u8(10), None);
        assert_eq!(ReduceOp::Avg as u8, 4);
        assert_eq!(ReduceOp::from_u8(5), None);
    }

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>(), Ok(d));
            assert_eq!(d.nccl_name().parse::<DType>(), Ok(d));
        }
        for o in ReduceOp::ALL {
            assert_eq!(o.name().parse::<ReduceOp>(), Ok(o));
        }
        assert!("float128".parse::<DType>().is_err());
    }
}
