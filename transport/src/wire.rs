//! The wire format: the connection handshake and the frame header.
//!
//! All integers are little-endian. A connection starts with the connecting
//! side sending a [`Hello`] and the accepting side answering with a
//! [`HelloReply`]; after that the stream carries frames, each a
//! [`FrameHeader`] followed by `len` payload bytes.

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

    /// Encodes the hello.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.world.to_le_bytes());
        b[16..20].copy_from_slice(&self.from.to_le_bytes());
        b[20..24].copy_from_slice(&self.to.to_le_bytes());
        b[24..28].copy_from_slice(&self.purpose.to_le_bytes());
        b[32..40].copy_from_slice(&self.job.to_le_bytes());
        b
    }

    /// Decodes a hello, refusing a wrong magic.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Hello, String> {
        if b[0..8] != MAGIC {
            return Err("not an oxccl peer (bad magic)".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut job = [0u8; 8];
        job.copy_from_slice(&b[32..40]);
        Ok(Hello {
            version: u16::from_le_bytes([b[8], b[9]]),
            job: u64::from_le_bytes(job),
            world: u32_at(12),
            from: u32_at(16),
            to: u32_at(20),
            purpose: u32_at(24),
        })
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

    /// Encodes the reply.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&MAGIC);
        let code = match self {
            HelloReply::Accept => 0,
            HelloReply::Refuse(c) => *c,
        };
        b[8..12].copy_from_slice(&code.to_le_bytes());
        b
    }

    /// Decodes a reply.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<HelloReply, String> {
        if b[0..8] != MAGIC {
            return Err("reply is not from an oxccl peer (bad magic)".into());
        }
        let code = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        Ok(if code == 0 {
            HelloReply::Accept
        } else {
            HelloReply::Refuse(code)
        })
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.tag.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.tag.step.to_le_bytes());
        b[20..24].copy_from_slice(&self.tag.slice.to_le_bytes());
        b[24..40].copy_from_slice(&self.descriptor);
        b
    }

    /// Decodes a header, refusing a wrong magic.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<FrameHeader, String> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let magic = u32_at(0);
        if magic != FRAME_MAGIC {
            return Err(format!(
                "bad frame magic {magic:#010x} (stream out of step or not an oxccl peer)"
            ));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[8..16]);
        let mut descriptor = [0u8; DESCRIPTOR_LEN];
        descriptor.copy_from_slice(&b[24..40]);
        Ok(FrameHeader {
            len: u32_at(4),
            tag: Tag {
                seq: u64::from_le_bytes(seq),
                step: u32_at(16),
                slice: u32_at(20),
            },
            descriptor,
        })
    }
}

#[cfg(test)]
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
        assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[1] ^= 1;
        assert!(FrameHeader::decode(&bad).is_err());
    }
}
