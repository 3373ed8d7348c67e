//! What a collective call is, as exchanged with every frame so that ranks
//! that disagree on a call are caught before any data is misread.

use std::fmt;

use oxccl_kernels::{DType, ReduceOp};
use oxccl_transport::wire::DESCRIPTOR_LEN;

use crate::schedule::Kind;

/// A collective call: kind, dtype, op, count and root.
///
/// `count` follows NCCL: elements of the buffer for allreduce, broadcast and
/// reduce; elements each rank sends for allgather; elements each rank
/// receives for reduce-scatter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Which collective.
    pub kind: Kind,
    /// Element type.
    pub dtype: DType,
    /// Reduction (ignored by broadcast, allgather and barrier).
    pub op: ReduceOp,
    /// Root of broadcast and reduce (0 otherwise).
    pub root: usize,
    /// Element count, as described above.
    pub count: usize,
}

impl Descriptor {
    /// Whether the op takes part in this kind of call.
    pub fn reduces(&self) -> bool {
        matches!(
            self.kind,
            Kind::AllReduce | Kind::Reduce | Kind::ReduceScatter
        )
    }

    /// Whether the root takes part in this kind of call.
    pub fn rooted(&self) -> bool {
        matches!(self.kind, Kind::Broadcast | Kind::Reduce)
    }

    /// The bytes every frame of the call carries. Fields that do not take
    /// part in the call are zeroed so that they cannot cause a false mismatch.
    pub fn encode(&self) -> [u8; DESCRIPTOR_LEN] {
        let mut b = [0u8; DESCRIPTOR_LEN];
        b[0] = self.kind as u8;
        b[1] = self.dtype as u8;
        b[2] = if self.reduces() { self.op as u8 } else { 0 };
        let root = if self.rooted() { self.root as u32 } else { 0 };
        b[4..8].copy_from_slice(&root.to_le_bytes());
        b[8..16].copy_from_slice(&(self.count as u64).to_le_bytes());
        b
    }

    /// Decodes a peer's descriptor.
    pub fn decode(b: &[u8; DESCRIPTOR_LEN]) -> Option<Descriptor> {
        let mut count = [0u8; 8];
        count.copy_from_slice(&b[8..16]);
        Some(Descriptor {
            kind: Kind::from_u8(b[0])?,
            dtype: DType::from_u8(b[1])?,
            op: ReduceOp::from_u8(b[2])?,
            root: u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize,
            count: usize::try_from(u64::from_le_bytes(count)).ok()?,
        })
    }

    /// The call with its sequence number, for messages: "all_reduce #3 (f32 sum, 1024 elements)".
    pub fn call(&self, seq: u64) -> String {
        format!("{} #{seq} ({self})", self.kind.name())
    }
}

impl fmt::Display for Descriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == Kind::Barrier {
            return f.write_str("no data");
        }
        write!(f, "{}", self.dtype)?;
        if self.reduces() {
            write!(f, " {}", self.op)?;
        }
        write!(f, ", {} elements", self.count)?;
        if self.rooted() {
            write!(f, ", root {}", self.root)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_ignores_unused_fields() {
        let d = Descriptor {
            kind: Kind::Reduce,
            dtype: DType::BF16,
            op: ReduceOp::Max,
            root: 3,
            count: 1 << 40,
        };
        assert_eq!(Descriptor::decode(&d.encode()), Some(d));
        assert_eq!(
            d.call(7),
            "reduce #7 (bf16 max, 1099511627776 elements, root 3)"
        );
        let a = Descriptor {
            kind: Kind::AllGather,
            root: 1,
            op: ReduceOp::Prod,
            ..d
        };
        let b = Descriptor {
            kind: Kind::AllGather,
            root: 0,
            op: ReduceOp::Sum,
            ..d
        };
        assert_eq!(a.encode(), b.encode());
        assert_eq!(a.call(0), "all_gather #0 (bf16, 1099511627776 elements)");
        assert_eq!(Descriptor::decode(&[0xFF; DESCRIPTOR_LEN]), None);
    }
}
