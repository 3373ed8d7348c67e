//! The handshake that makes a ring's stream links shared-memory links: each
//! rank offers a segment on the link from its previous rank, answers the
//! offer on the link to its next rank, and reads the answer to its own
//! offer (see [`upgrade_ring`](super::upgrade_ring)). It runs over the
//! sockets, which stay on as the doorbells.

use std::io::{IoSlice, IoSliceMut};
use std::time::Instant;

use super::segment::{Created, Mapping, create_segment, open_segment};
use super::{Policy, ShmLink};
use crate::codec::{DecodeError, Prefix, Reader, Writer};
use crate::{Endpoint, Link, StreamLink, TransportError};

const OFFER_MAGIC: &[u8; 8] = b"OXSHOFR1";
const REPLY_MAGIC: &[u8; 8] = b"OXSHREP1";
const MAX_NAME: usize = 200;

impl Policy {
    fn code(self) -> u8 {
        match self {
            Policy::Auto => 0,
            Policy::Never => 1,
            Policy::Require => 2,
        }
    }

    fn from_code(c: u8) -> Option<Policy> {
        match c {
            0 => Some(Policy::Auto),
            1 => Some(Policy::Never),
            2 => Some(Policy::Require),
            _ => None,
        }
    }
}

/// Format names of the handshake's messages, as decoding errors name them.
const OFFER: &str = "shared-memory offer";
const ANSWER: &str = "shared-memory answer";

/// Reads a policy code (one byte).
fn read_policy(r: &mut Reader<'_>) -> Result<Policy, DecodeError> {
    let c = r.u8("policy")?;
    Policy::from_code(c).ok_or_else(|| r.invalid("policy", format!("unknown policy {c}")))
}

/// Reads a yes/no byte (0 or 1).
fn read_flag(r: &mut Reader<'_>, field: &'static str) -> Result<bool, DecodeError> {
    match r.u8(field)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(r.invalid(field, format!("{v} is neither 0 nor 1"))),
    }
}

/// The fixed part of an offer; `text_len` bytes follow it: the segment's
/// name, or why this rank offers none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OfferHead {
    /// The offering rank's policy.
    pub policy: Policy,
    /// Whether a segment is offered.
    pub offered: bool,
    /// The segment's nonce (0 without one).
    pub nonce: u64,
    /// The ring capacity of the segment (0 without one).
    pub capacity: u64,
    /// Bytes of the text that follows (at most `MAX_NAME`).
    pub text_len: usize,
}

impl OfferHead {
    /// Encoded size in bytes.
    pub(crate) const LEN: usize = 8 + 1 + 1 + 8 + 8 + 2;

    /// The offer: this head and `text` (cut at `MAX_NAME` bytes, which
    /// `text_len` is set to).
    pub(crate) fn encode(&self, text: &[u8]) -> Vec<u8> {
        let text = &text[..text.len().min(MAX_NAME)];
        let mut w = Writer::with_capacity(Self::LEN + text.len());
        w.bytes(OFFER_MAGIC)
            .u8(self.policy.code())
            .u8(u8::from(self.offered))
            .u64(self.nonce)
            .u64(self.capacity)
            // At most MAX_NAME bytes: a u16 holds the length.
            .u16(text.len() as u16)
            .bytes(text);
        w.into_bytes()
    }

    /// Decodes the fixed part of a peer's offer.
    pub(crate) fn decode(b: &[u8; Self::LEN]) -> Result<OfferHead, DecodeError> {
        let mut r = Reader::new(OFFER, b);
        r.magic(OFFER_MAGIC)?;
        let head = OfferHead {
            policy: read_policy(&mut r)?,
            offered: read_flag(&mut r, "offered")?,
            nonce: r.u64("nonce")?,
            capacity: r.u64("capacity")?,
            text_len: r.len_prefix("text", Prefix::U16, MAX_NAME)?,
        };
        r.finish()?;
        Ok(head)
    }
}

/// The fixed part of an answer; `text_len` bytes follow it: why the
/// segment was not taken (empty when it was).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AnswerHead {
    /// The answering rank's policy.
    pub policy: Policy,
    /// Whether the segment was mapped.
    pub accepted: bool,
    /// Bytes of the text that follows (at most `MAX_NAME`).
    pub text_len: usize,
}

impl AnswerHead {
    /// Encoded size in bytes.
    pub(crate) const LEN: usize = 8 + 1 + 1 + 2;

    /// The answer: this head and `text` (cut at `MAX_NAME` bytes).
    pub(crate) fn encode(&self, text: &[u8]) -> Vec<u8> {
        let text = &text[..text.len().min(MAX_NAME)];
        let mut w = Writer::with_capacity(Self::LEN + text.len());
        w.bytes(REPLY_MAGIC)
            .u8(self.policy.code())
            .u8(u8::from(self.accepted))
            // At most MAX_NAME bytes: a u16 holds the length.
            .u16(text.len() as u16)
            .bytes(text);
        w.into_bytes()
    }

    /// Decodes the fixed part of a peer's answer.
    pub(crate) fn decode(b: &[u8; Self::LEN]) -> Result<AnswerHead, DecodeError> {
        let mut r = Reader::new(ANSWER, b);
        r.magic(REPLY_MAGIC)?;
        let head = AnswerHead {
            policy: read_policy(&mut r)?,
            accepted: read_flag(&mut r, "accepted")?,
            text_len: r.len_prefix("text", Prefix::U16, MAX_NAME)?,
        };
        r.finish()?;
        Ok(head)
    }
}

/// Writes all of `bytes` on a nonblocking link before `deadline`.
pub(crate) fn send_all(
    link: &mut StreamLink,
    bytes: &[u8],
    deadline: Instant,
    what: &str,
) -> Result<(), TransportError> {
    let mut done = 0;
    while done < bytes.len() {
        let n = link.try_write(&[IoSlice::new(&bytes[done..])])?;
        done += n;
        if n == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Timeout {
                    what: format!("sending {what} to rank {}", link.peer()),
                    waited: Instant::now().duration_since(deadline),
                });
            }
            crate::wait(None, Some(&*link), left)?;
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes from a nonblocking link before `deadline`.
pub(crate) fn recv_exact(
    link: &mut StreamLink,
    buf: &mut [u8],
    deadline: Instant,
    what: &str,
) -> Result<(), TransportError> {
    let started = Instant::now();
    let mut done = 0;
    while done < buf.len() {
        let n = link.try_read(&mut [IoSliceMut::new(&mut buf[done..])])?;
        done += n;
        if n == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Timeout {
                    what: format!("waiting for {what} from rank {}", link.peer()),
                    waited: started.elapsed(),
                });
            }
            crate::wait(Some(&*link), None, left)?;
        }
    }
    Ok(())
}

/// Step 1: creates a segment and offers it on `prev` (or says why this rank
/// offers none). Returns the segment, kept until the answer arrives, or why
/// there is none.
pub(super) fn offer(
    prev: &mut StreamLink,
    policy: Policy,
    capacity: usize,
    deadline: Instant,
) -> Result<Result<Created, String>, TransportError> {
    let created = if policy == Policy::Never {
        Err("this rank has OXCCL_TRANSPORT=tcp".to_string())
    } else {
        create_segment(capacity).map_err(|e| e.to_string())
    };
    let offer = match &created {
        Ok(c) => OfferHead {
            policy,
            offered: true,
            nonce: c.nonce,
            capacity: capacity as u64,
            text_len: 0,
        }
        .encode(c.name.to_bytes()),
        Err(reason) => OfferHead {
            policy,
            offered: false,
            nonce: 0,
            capacity: 0,
            text_len: 0,
        }
        .encode(reason.as_bytes()),
    };
    send_all(prev, &offer, deadline, "a shared-memory offer")?;
    Ok(created)
}

/// Step 2: reads the offer on `next`, maps the offered segment when both
/// ranks agree, and answers. Returns `next` as a [`ShmLink`], or the socket
/// it was.
pub(super) fn answer(
    mut next: StreamLink,
    policy: Policy,
    capacity: usize,
    single_copy: Option<usize>,
    deadline: Instant,
) -> Result<Box<dyn Link>, TransportError> {
    let mut fixed = [0u8; OfferHead::LEN];
    recv_exact(&mut next, &mut fixed, deadline, "a shared-memory offer")?;
    let OfferHead {
        policy: peer_policy,
        offered,
        nonce,
        capacity: peer_capacity,
        text_len,
    } = OfferHead::decode(&fixed).map_err(|e| TransportError::Protocol {
        peer: next.peer(),
        reason: e.to_string(),
    })?;
    let mut text = vec![0u8; text_len];
    recv_exact(&mut next, &mut text, deadline, "a shared-memory offer")?;
    let text = String::from_utf8_lossy(&text).into_owned();
    let opened: Result<Mapping, String> = if policy == Policy::Never {
        Err("this rank has OXCCL_TRANSPORT=tcp".into())
    } else if peer_policy == Policy::Never {
        Err(format!("rank {} has OXCCL_TRANSPORT=tcp", next.peer()))
    } else if !offered {
        Err(format!(
            "rank {} could not offer a segment: {text}",
            next.peer()
        ))
    } else if usize::try_from(peer_capacity).ok() != Some(capacity) {
        Err(format!(
            "ranks disagree on the ring capacity ({peer_capacity} and {capacity} bytes; OXCCL_SHM_BYTES)"
        ))
    } else {
        open_segment(&text, nonce, capacity)
    };
    let reason = match &opened {
        Ok(_) => String::new(),
        Err(r) => r.clone(),
    };
    let reply = AnswerHead {
        policy,
        accepted: opened.is_ok(),
        text_len: 0,
    }
    .encode(reason.as_bytes());
    let sent = send_all(&mut next, &reply, deadline, "a shared-memory answer");
    let next_link: Box<dyn Link> = match opened {
        Ok(map) => {
            sent?;
            let peer = next.peer();
            let mut link = ShmLink::new(peer, map, capacity, 1, next, &text);
            link.set_single_copy(single_copy);
            Box::new(link)
        }
        Err(reason) => {
            if policy == Policy::Require || peer_policy == Policy::Require {
                // This error, not a failed send of the answer: the peer
                // reaches the same verdict and may have closed already.
                return Err(TransportError::Handshake {
                    addr: next.describe(),
                    reason: format!(
                        "OXCCL_TRANSPORT=shm, but rank {} cannot share memory with this rank: {reason}",
                        next.peer()
                    ),
                });
            }
            sent?;
            Box::new(next)
        }
    };
    Ok(next_link)
}

/// Step 3: reads the answer to the offer of step 1 on `prev`. Returns
/// `prev` as a [`ShmLink`] through the segment `created`, or the socket it
/// was.
pub(super) fn read_answer(
    mut prev: StreamLink,
    created: Result<Created, String>,
    policy: Policy,
    capacity: usize,
    single_copy: Option<usize>,
    deadline: Instant,
) -> Result<Box<dyn Link>, TransportError> {
    let mut fixed = [0u8; AnswerHead::LEN];
    recv_exact(&mut prev, &mut fixed, deadline, "a shared-memory answer")?;
    let AnswerHead {
        policy: peer_policy,
        accepted,
        text_len,
    } = AnswerHead::decode(&fixed).map_err(|e| TransportError::Protocol {
        peer: prev.peer(),
        reason: e.to_string(),
    })?;
    let mut text = vec![0u8; text_len];
    recv_exact(&mut prev, &mut text, deadline, "a shared-memory answer")?;
    let prev_link: Box<dyn Link> = match created {
        Ok(c) if accepted => {
            let name = c.name.to_string_lossy().into_owned();
            // The name goes now (Unlinker), the mapping stays.
            let Created { map, _unlink, .. } = c;
            drop(_unlink);
            let peer = prev.peer();
            let mut link = ShmLink::new(peer, map, capacity, 0, prev, &name);
            link.set_single_copy(single_copy);
            Box::new(link)
        }
        created => {
            let reason = match created {
                Err(r) => r,
                Ok(_) => String::from_utf8_lossy(&text).into_owned(),
            };
            if policy == Policy::Require || peer_policy == Policy::Require {
                return Err(TransportError::Handshake {
                    addr: prev.describe(),
                    reason: format!(
                        "OXCCL_TRANSPORT=shm, but rank {} cannot share memory with this rank: {reason}",
                        prev.peer()
                    ),
                });
            }
            Box::new(prev)
        }
    };
    Ok(prev_link)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::shm::tests::stream;
    use crate::shm::{Upgraded, upgrade_ring};
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    /// Two ranks in a ring of 2 over Unix socket pairs (standing in for TCP).
    fn ring_of_two() -> [(StreamLink, StreamLink); 2] {
        let (a0, b0) = std::os::unix::net::UnixStream::pair().unwrap();
        let (a1, b1) = std::os::unix::net::UnixStream::pair().unwrap();
        // pair 0: rank 0 -> rank 1; pair 1: rank 1 -> rank 0.
        [
            (
                StreamLink::unix(1, a0).unwrap(),
                StreamLink::unix(1, b1).unwrap(),
            ),
            (
                StreamLink::unix(0, a1).unwrap(),
                StreamLink::unix(0, b0).unwrap(),
            ),
        ]
    }

    fn upgrade_both(p0: Policy, p1: Policy) -> [Result<Upgraded, TransportError>; 2] {
        let [(n0, q0), (n1, q1)] = ring_of_two();
        let t = std::thread::spawn(move || upgrade_ring(n1, q1, p1, 8192, None, soon()));
        // Rank 0 sends buffers of 1000 bytes and more by single copy.
        let r0 = upgrade_ring(n0, q0, p0, 8192, Some(1000), soon());
        [r0, t.join().unwrap()]
    }

    #[test]
    fn ring_upgrade_gives_working_shm_links_and_leaves_no_names() {
        let [r0, r1] = upgrade_both(Policy::Auto, Policy::Require);
        let (u0, u1) = (r0.unwrap(), r1.unwrap());
        for l in [&u0.next, &u0.prev, &u1.next, &u1.prev] {
            assert!(l.describe().starts_with("shm /oxccl-"), "{}", l.describe());
            let name = l.describe()[4..].split(' ').next().unwrap().to_string();
            assert!(
                !std::path::Path::new(&format!("/dev/shm{name}")).exists(),
                "{name} was not unlinked"
            );
        }
        stream(u0.next, u1.prev, 100_000, 70_001);
        stream(u1.next, u0.prev, 100_000, 70_001);
    }

    #[test]
    fn tcp_on_either_side_keeps_the_sockets() {
        let [r0, r1] = upgrade_both(Policy::Never, Policy::Auto);
        let (u0, u1) = (r0.unwrap(), r1.unwrap());
        for l in [&u0.next, &u0.prev, &u1.next, &u1.prev] {
            assert_eq!(l.describe(), "in-process socket pair");
        }
        stream(u0.next, u1.prev, 100_000, 70_001);
    }

    #[test]
    fn required_shm_against_tcp_fails_on_both_sides_with_the_reason() {
        let [r0, r1] = upgrade_both(Policy::Never, Policy::Require);
        for r in [r0, r1] {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("OXCCL_TRANSPORT"), "{e}");
        }
    }
}
