//! What a collective call is, as exchanged with every frame so that ranks
//! that disagree on a call are caught before any data is misread. Written
//! and read with the transport's codec.

use std::fmt;

use oxccl_kernels::{DType, ReduceOp};
use oxccl_transport::codec::{ArrayWriter, DecodeError, Put, Reader};
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
    /// Root of broadcast, reduce, gather and scatter; the sender of a
    /// message between two ranks; in one message of a call of per-rank
    /// counts, the count its sender expects back from the receiver
    /// (truncated to 32 bits on the wire); 0 otherwise.
    pub root: usize,
    /// Element count, as described above.
    pub count: usize,
}

impl Descriptor {
    /// Whether the op takes part in this kind of call.
    pub fn reduces(&self) -> bool {
        matches!(
            self.kind,
            Kind::AllReduce | Kind::Reduce | Kind::ReduceScatter | Kind::ReduceScatterV
        )
    }

    /// Whether the root takes part in this kind of call.
    pub fn rooted(&self) -> bool {
        matches!(
            self.kind,
            Kind::Broadcast
                | Kind::Reduce
                | Kind::Gather
                | Kind::Scatter
                | Kind::SendRecv
                | Kind::AllToAllV
                | Kind::AllGatherV
                | Kind::ReduceScatterV
        )
    }

    /// The format's name in decoding errors.
    pub const FORMAT: &'static str = "descriptor";

    /// Appends the bytes every frame of the call carries to `w`. Fields
    /// that do not take part in the call are zeroed so that they cannot
    /// cause a false mismatch.
    #[inline]
    pub fn write<W: Put>(&self, w: &mut W) {
        let op = if self.reduces() { self.op as u8 } else { 0 };
        let root = if self.rooted() { self.root as u32 } else { 0 };
        w.put_u8(self.kind as u8)
            .put_u8(self.dtype as u8)
            .put_u8(op)
            .put_u8(0)
            .put_u32(root)
            .put_u64(self.count as u64);
    }

    /// Reads a peer's descriptor, refusing unknown kinds, dtypes and ops.
    pub fn read(r: &mut Reader<'_>) -> Result<Descriptor, DecodeError> {
        let kind = read_kind(r)?;
        let dtype = read_dtype(r)?;
        let op = read_op(r)?;
        r.skip("padding", 1)?;
        let root = r.u32("root")? as usize;
        let count = r.u64_usize("count")?;
        Ok(Descriptor {
            kind,
            dtype,
            op,
            root,
            count,
        })
    }

    /// The bytes every frame of the call carries (see [`Descriptor::write`]).
    #[inline]
    pub fn encode(&self) -> [u8; DESCRIPTOR_LEN] {
        let mut w = ArrayWriter::new();
        self.write(&mut w);
        w.finish()
    }

    /// Decodes a peer's descriptor with [`Descriptor::read`].
    pub fn parse(b: &[u8; DESCRIPTOR_LEN]) -> Result<Descriptor, DecodeError> {
        let mut r = Reader::new(Self::FORMAT, b);
        let d = Descriptor::read(&mut r)?;
        r.finish()?;
        Ok(d)
    }

    /// The call with its sequence number, for messages: "all_reduce #3 (f32 sum, 1024 elements)".
    pub fn call(&self, seq: u64) -> String {
        format!("{} #{seq} ({self})", self.kind.name())
    }
}

/// Reads a collective kind (one byte).
pub(crate) fn read_kind(r: &mut Reader<'_>) -> Result<Kind, DecodeError> {
    let v = r.u8("kind")?;
    Kind::from_u8(v).ok_or_else(|| r.invalid("kind", format!("unknown collective kind {v}")))
}

/// Reads a dtype (one byte).
pub(crate) fn read_dtype(r: &mut Reader<'_>) -> Result<DType, DecodeError> {
    let v = r.u8("dtype")?;
    DType::from_u8(v).ok_or_else(|| r.invalid("dtype", format!("unknown dtype {v}")))
}

/// Reads a reduction op (one byte).
pub(crate) fn read_op(r: &mut Reader<'_>) -> Result<ReduceOp, DecodeError> {
    let v = r.u8("op")?;
    ReduceOp::from_u8(v).ok_or_else(|| r.invalid("op", format!("unknown reduction op {v}")))
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
        if matches!(
            self.kind,
            Kind::AllToAllV | Kind::AllGatherV | Kind::ReduceScatterV
        ) {
            // One message of the call, as its sender describes it to its
            // receiver: its count, and the count it expects back (`root`).
            return write!(
                f,
                ", sends this rank {} elements and expects {} from it",
                self.count, self.root
            );
        }
        write!(f, ", {} elements", self.count)?;
        if self.kind == Kind::SendRecv {
            write!(f, " from rank {}", self.root)?;
        } else if self.rooted() {
            write!(f, ", root {}", self.root)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_and_ignores_unused_fields() {
        let d = Descriptor {
            kind: Kind::Reduce,
            dtype: DType::BF16,
            op: ReduceOp::Max,
            root: 3,
            count: 1 << 40,
        };
        assert_eq!(Descriptor::parse(&d.encode()).ok(), Some(d));
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
        assert!(Descriptor::parse(&[0xFF; DESCRIPTOR_LEN]).is_err());
    }

    #[test]
    fn layout_is_fixed_and_errors_name_the_field() {
        let d = Descriptor {
            kind: Kind::Broadcast,
            dtype: DType::F32,
            op: ReduceOp::Max,
            root: 0x0102_0304,
            count: 0x1112_1314_1516_1718,
        };
        let mut want = vec![d.kind as u8, d.dtype as u8, 0, 0, 4, 3, 2, 1];
        want.extend_from_slice(&[0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11]);
        assert_eq!(d.encode().to_vec(), want);
        let mut bad = d.encode();
        bad[1] = 0xEE;
        assert_eq!(
            Descriptor::parse(&bad).unwrap_err().to_string(),
            "descriptor: invalid dtype: unknown dtype 238"
        );
    }

    fn descriptor() -> impl Strategy<Value = Descriptor> {
        (
            0..Kind::ALL.len(),
            0..DType::ALL.len(),
            0..ReduceOp::ALL.len(),
            any::<u32>(),
            any::<u64>(),
        )
            .prop_map(|(k, t, o, root, count)| {
                let mut d = Descriptor {
                    kind: Kind::ALL[k],
                    dtype: DType::ALL[t],
                    op: ReduceOp::ALL[o],
                    root: root as usize,
                    count: count as usize,
                };
                // Fields that take no part in the call travel as zero.
                if !d.reduces() {
                    d.op = ReduceOp::from_u8(0).unwrap();
                }
                if !d.rooted() {
                    d.root = 0;
                }
                d
            })
    }

    proptest! {
        #[test]
        fn valid_descriptors_round_trip(d in descriptor()) {
            prop_assert_eq!(Descriptor::parse(&d.encode()), Ok(d));
        }

        #[test]
        fn arbitrary_bytes_decode_or_fail(b in any::<[u8; DESCRIPTOR_LEN]>(), cut in 0..DESCRIPTOR_LEN) {
            let _ = Descriptor::parse(&b);
            let truncated = Descriptor::read(&mut Reader::new(Descriptor::FORMAT, &b[..cut]));
            prop_assert!(truncated.is_err());
        }
    }
}
