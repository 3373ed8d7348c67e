//! The wire format: the connection handshake and the frame header.
//!
//! All integers are little-endian. A connection starts with the connecting
//! side sending a [`Hello`] and the accepting side answering with a
//! [`HelloReply`]; after that the stream carries frames, each a
//! [`FrameHeader`] followed by `len` payload bytes. Each format is written
//! and read with the [`codec`](crate::codec).

use crate::codec::{ArrayWriter, DecodeError, Put, Reader, Writer};

/// First bytes of every handshake: "OXCCL" and three bytes of zero.
pub const MAGIC: [u8; 8] = *b"OXCCL\0\0\0";
/// Version of the wire format. Peers of different versions refuse each other.
pub const PROTOCOL_VERSION: u16 = 1;
/// Magic of every frame header, to catch a desynchronized stream early.
pub const FRAME_MAGIC: u32 = 0x4F58_4631; // "OXF1"

/// What the connecting rank says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version of the sender.
    pub version: u16,
    /// Identifier of the job (all ranks of one communicator share it).
    pub job: u64,
    /// Number of ranks in the sender's communicator.
    pub world: u32,
    /// The sender's rank.
    pub from: u32,
    /// The rank the sender believes it is connecting to.
    pub to: u32,
    /// What the connection is for (ring direction, channel, ...), chosen by the caller.
    pub purpose: u32,
}

impl Hello {
    /// Encoded size in bytes.
    pub const LEN: usize = 40;
    /// The format's name in decoding errors.
    pub const FORMAT: &'static str = "hello";

    /// Appends the hello to `w`.
    pub fn write(&self, w: &mut Writer) {
        w.bytes(&MAGIC)
            .u16(self.version)
            .zeros(2)
            .u32(self.world)
            .u32(self.from)
            .u32(self.to)
            .u32(self.purpose)
            .zeros(4)
            .u64(self.job);
    }

    /// Reads a hello, refusing a wrong magic. Padding is not checked.
    pub fn read(r: &mut Reader<'_>) -> Result<Hello, DecodeError> {
        r.magic(&MAGIC)?;
        let version = r.u16("version")?;
        r.skip("padding", 2)?;
        let world = r.u32("world")?;
        let from = r.u32("from")?;
        let to = r.u32("to")?;
        let purpose = r.u32("purpose")?;
        r.skip("padding", 4)?;
        let job = r.u64("job")?;
        Ok(Hello {
            version,
            job,
            world,
            from,
            to,
            purpose,
        })
    }

    /// Encodes the hello.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut w = Writer::with_capacity(Self::LEN);
        self.write(&mut w);
        w.into_array()
    }

    /// Decodes a hello, refusing a wrong magic.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Hello, DecodeError> {
        let mut r = Reader::new(Self::FORMAT, b);
        let hello = Hello::read(&mut r)?;
        r.finish()?;
        Ok(hello)
    }
}

/// The accepting side's answer to a [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloReply {
    /// Accepted.
    Accept,
    /// Refused; the code says why (see [`HelloReply::reason`]).
    Refuse(u32),
}

/// Refusal codes.
pub mod refuse {
    /// The protocol versions differ.
    pub const VERSION: u32 = 1;
    /// The job ids differ: the connection belongs to another job.
    pub const JOB: u32 = 2;
    /// The world sizes differ.
    pub const WORLD: u32 = 3;
    /// The sender is not the rank this side expects on this connection.
    pub const RANK: u32 = 4;
}

impl HelloReply {
    /// Encoded size in bytes.
    pub const LEN: usize = 12;
    /// The format's name in decoding errors.
    pub const FORMAT: &'static str = "hello reply";

    /// Appends the reply to `w`.
    pub fn write(&self, w: &mut Writer) {
        let code = match self {
            HelloReply::Accept => 0,
            HelloReply::Refuse(c) => *c,
        };
        w.bytes(&MAGIC).u32(code);
    }

    /// Reads a reply, refusing a wrong magic.
    pub fn read(r: &mut Reader<'_>) -> Result<HelloReply, DecodeError> {
        r.magic(&MAGIC)?;
        Ok(match r.u32("refusal code")? {
            0 => HelloReply::Accept,
            code => HelloReply::Refuse(code),
        })
    }

    /// Encodes the reply.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut w = Writer::with_capacity(Self::LEN);
        self.write(&mut w);
        w.into_array()
    }

    /// Decodes a reply.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<HelloReply, DecodeError> {
        let mut r = Reader::new(Self::FORMAT, b);
        let reply = HelloReply::read(&mut r)?;
        r.finish()?;
        Ok(reply)
    }

    /// Human-readable reason of a refusal code.
    pub fn reason(code: u32) -> &'static str {
        match code {
            refuse::VERSION => "protocol versions differ",
            refuse::JOB => "the connection belongs to another job",
            refuse::WORLD => "world sizes differ",
            refuse::RANK => "unexpected rank on this connection",
            _ => "unknown reason",
        }
    }
}

/// Identifies one frame: the collective's sequence number, the ring step and the slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Tag {
    /// Sequence number of the collective on its communicator.
    pub seq: u64,
    /// Ring step.
    pub step: u32,
    /// Slice within the step.
    pub slice: u32,
}

/// Size of the opaque descriptor carried by each frame.
pub const DESCRIPTOR_LEN: usize = 16;

/// The fixed header before each frame's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameHeader {
    /// Which frame this is.
    pub tag: Tag,
    /// Payload length in bytes.
    pub len: u32,
    /// Opaque bytes the sender attaches (the collective descriptor), so that
    /// the receiver can check both ranks are in the same call.
    pub descriptor: [u8; DESCRIPTOR_LEN],
}

impl FrameHeader {
    /// Encoded size in bytes.
    pub const LEN: usize = 40;
    /// The format's name in decoding errors.
    pub const FORMAT: &'static str = "frame header";

    /// Appends the header to `w`. Always inlined: into
    /// [`FrameHeader::encode`], on every frame, every offset is a constant
    /// and the header is six stores.
    #[inline(always)]
    pub fn write<W: Put>(&self, w: &mut W) {
        w.put_u32(FRAME_MAGIC)
            .put_u32(self.len)
            .put_u64(self.tag.seq)
            .put_u32(self.tag.step)
            .put_u32(self.tag.slice)
            .put_array(self.descriptor);
    }

    /// Reads a header, refusing a wrong magic (a stream out of step or not
    /// an oxccl peer).
    #[inline]
    pub fn read(r: &mut Reader<'_>) -> Result<FrameHeader, DecodeError> {
        r.magic_u32(FRAME_MAGIC)?;
        let len = r.u32("payload length")?;
        let seq = r.u64("sequence number")?;
        let step = r.u32("step")?;
        let slice = r.u32("slice")?;
        let descriptor = r.array("descriptor")?;
        Ok(FrameHeader {
            tag: Tag { seq, step, slice },
            len,
            descriptor,
        })
    }

    /// Encodes the header on the stack: this runs for every frame.
    #[inline]
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut w = ArrayWriter::new();
        self.write(&mut w);
        w.finish()
    }

    /// Decodes a header with [`FrameHeader::read`].
    #[inline]
    pub fn parse(b: &[u8; Self::LEN]) -> Result<FrameHeader, DecodeError> {
        let mut r = Reader::new(Self::FORMAT, b);
        let header = FrameHeader::read(&mut r)?;
        r.finish()?;
        Ok(header)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips() {
        let h = Hello {
            version: PROTOCOL_VERSION,
            job: 0xABCD_1234_5678_9ABC,
            world: 8,
            from: 3,
            to: 4,
            purpose: 7,
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[0] = b'X';
        assert!(Hello::decode(&bad).is_err());
    }

    #[test]
    fn reply_round_trips() {
        for r in [HelloReply::Accept, HelloReply::Refuse(refuse::JOB)] {
            assert_eq!(HelloReply::decode(&r.encode()), Ok(r));
        }
        assert_eq!(
            HelloReply::reason(refuse::JOB),
            "the connection belongs to another job"
        );
    }

    #[test]
    fn frame_header_round_trips() {
        let h = FrameHeader {
            tag: Tag {
                seq: u64::MAX - 1,
                step: 5,
                slice: 9,
            },
            len: 123_456,
            descriptor: [7; DESCRIPTOR_LEN],
        };
        assert_eq!(FrameHeader::parse(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[1] ^= 1;
        assert!(FrameHeader::parse(&bad).is_err());
    }

    #[test]
    fn layouts_are_fixed() {
        // The bytes on the wire, field by field, as oxccl has always sent them.
        let h = Hello {
            version: 0x0102,
            job: 0x1112_1314_1516_1718,
            world: 0x2122_2324,
            from: 0x3132_3334,
            to: 0x4142_4344,
            purpose: 0x5152_5354,
        };
        let mut want = Vec::new();
        want.extend_from_slice(b"OXCCL\0\0\0");
        want.extend_from_slice(&[0x02, 0x01, 0, 0]);
        want.extend_from_slice(&[0x24, 0x23, 0x22, 0x21, 0x34, 0x33, 0x32, 0x31]);
        want.extend_from_slice(&[0x44, 0x43, 0x42, 0x41, 0x54, 0x53, 0x52, 0x51, 0, 0, 0, 0]);
        want.extend_from_slice(&[0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11]);
        assert_eq!(h.encode().to_vec(), want);

        let mut want = b"OXCCL\0\0\0".to_vec();
        want.extend_from_slice(&[3, 0, 0, 0]);
        assert_eq!(HelloReply::Refuse(3).encode().to_vec(), want);

        let f = FrameHeader {
            tag: Tag {
                seq: 0x0102_0304_0506_0708,
                step: 0x1112_1314,
                slice: 0x2122_2324,
            },
            len: 0x3132_3334,
            descriptor: [9; DESCRIPTOR_LEN],
        };
        let mut want = vec![0x31, 0x46, 0x58, 0x4F, 0x34, 0x33, 0x32, 0x31];
        want.extend_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1, 0x14, 0x13, 0x12, 0x11]);
        want.extend_from_slice(&[0x24, 0x23, 0x22, 0x21]);
        want.extend_from_slice(&[9; DESCRIPTOR_LEN]);
        assert_eq!(f.encode().to_vec(), want);
    }

    #[test]
    fn errors_name_the_format() {
        let mut bad = HelloReply::Accept.encode();
        bad[0] = b'X';
        assert_eq!(
            HelloReply::decode(&bad).unwrap_err().to_string(),
            "hello reply: bad magic 0x585843434c000000 (not an oxccl hello reply)"
        );
        let mut bad = [0; FrameHeader::LEN];
        bad[..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        bad[0] ^= 1;
        let e = FrameHeader::parse(&bad).unwrap_err();
        assert!(matches!(e, DecodeError::BadMagic { .. }), "{e:?}");
        let short = [0u8; 20];
        let e = Hello::read(&mut Reader::new(Hello::FORMAT, &short)).unwrap_err();
        assert!(e.to_string().starts_with("hello: "), "{e}");
    }

    use proptest::prelude::*;

    fn tag() -> impl Strategy<Value = Tag> {
        (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(seq, step, slice)| Tag {
            seq,
            step,
            slice,
        })
    }

    proptest! {
        #[test]
        fn valid_values_round_trip(
            version in any::<u16>(), job in any::<u64>(), world in any::<u32>(),
            from in any::<u32>(), to in any::<u32>(), purpose in any::<u32>(),
            code in any::<u32>(), tag in tag(), len in any::<u32>(),
            descriptor in any::<[u8; DESCRIPTOR_LEN]>(),
        ) {
            let h = Hello { version, job, world, from, to, purpose };
            prop_assert_eq!(Hello::decode(&h.encode()), Ok(h));
            // The frame header's stack encoding is the growing writer's.
            let f = FrameHeader { tag, len, descriptor };
            let mut w = Writer::new();
            f.write(&mut w);
            prop_assert_eq!(w.as_bytes(), &f.encode()[..]);
            let reply = if code == 0 { HelloReply::Accept } else { HelloReply::Refuse(code) };
            prop_assert_eq!(HelloReply::decode(&reply.encode()), Ok(reply));
            let f = FrameHeader { tag, len, descriptor };
            prop_assert_eq!(FrameHeader::parse(&f.encode()), Ok(f));
        }

        #[test]
        fn arbitrary_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..48)) {
            // Any length, through the readers; exact lengths, through decode.
            let _ = Hello::read(&mut Reader::new(Hello::FORMAT, &bytes));
            let _ = HelloReply::read(&mut Reader::new(HelloReply::FORMAT, &bytes));
            let _ = FrameHeader::read(&mut Reader::new(FrameHeader::FORMAT, &bytes));
            if let Ok(b) = <[u8; Hello::LEN]>::try_from(&bytes[..bytes.len().min(Hello::LEN)]) {
                let _ = Hello::decode(&b);
                let _ = FrameHeader::parse(&b);
            }
            if let Ok(b) = <[u8; HelloReply::LEN]>::try_from(&bytes[..bytes.len().min(HelloReply::LEN)]) {
                let _ = HelloReply::decode(&b);
            }
        }

        #[test]
        fn truncated_and_mutated_encodings_fail_cleanly(
            tag in tag(), len in any::<u32>(), cut in 0usize..FrameHeader::LEN,
            at in 0usize..FrameHeader::LEN, flip in 1u8..=255,
        ) {
            let f = FrameHeader { tag, len, descriptor: [1; DESCRIPTOR_LEN] };
            let bytes = f.encode();
            let e = FrameHeader::read(&mut Reader::new(FrameHeader::FORMAT, &bytes[..cut]));
            let is_truncated = matches!(e, Err(DecodeError::Truncated { .. }));
            prop_assert!(is_truncated);
            let mut mutated = bytes;
            mutated[at] ^= flip;
            match FrameHeader::parse(&mutated) {
                Ok(g) => prop_assert!(at >= 4 && g != f),
                Err(e) => {
                    let is_magic = matches!(e, DecodeError::BadMagic { .. });
                    prop_assert!(at < 4 && is_magic);
                }
            }
        }
    }
}
