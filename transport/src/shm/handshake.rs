//! The handshake that makes a ring's stream links shared-memory links: each
//! rank offers a segment on the link from its previous rank, answers the
//! offer on the link to its next rank, and reads the answer to its own
//! offer (see [`upgrade_ring`](super::upgrade_ring)). It runs over the
//! sockets, which stay on as the doorbells.

use std::io::{IoSlice, IoSliceMut};
use std::time::Instant;

use super::segment::{Created, Mapping, create_segment, open_segment};
use super::{Policy, ShmLink};
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

/// Writes all of `bytes` on a nonblocking link before `deadline`.
fn send_all(
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
fn recv_exact(
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
    let mut offer = Vec::with_capacity(64);
    offer.extend_from_slice(OFFER_MAGIC);
    offer.push(policy.code());
    match &created {
        Ok(c) => {
            offer.push(1);
            offer.extend_from_slice(&c.nonce.to_le_bytes());
            offer.extend_from_slice(&(capacity as u64).to_le_bytes());
            let name = c.name.to_bytes();
            offer.extend_from_slice(&(name.len() as u16).to_le_bytes());
            offer.extend_from_slice(name);
        }
        Err(reason) => {
            offer.push(0);
            offer.extend_from_slice(&0u64.to_le_bytes());
            offer.extend_from_slice(&0u64.to_le_bytes());
            let r = &reason.as_bytes()[..reason.len().min(MAX_NAME)];
            offer.extend_from_slice(&(r.len() as u16).to_le_bytes());
            offer.extend_from_slice(r);
        }
    }
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
    let mut fixed = [0u8; 8 + 1 + 1 + 8 + 8 + 2];
    recv_exact(&mut next, &mut fixed, deadline, "a shared-memory offer")?;
    let bad = |reason: String| TransportError::Protocol {
        peer: next.peer(),
        reason,
    };
    if &fixed[..8] != OFFER_MAGIC {
        return Err(bad("expected a shared-memory offer".into()));
    }
    let peer_policy =
        Policy::from_code(fixed[8]).ok_or_else(|| bad(format!("unknown policy {}", fixed[8])))?;
    let offered = fixed[9] == 1;
    let nonce = u64::from_le_bytes(fixed[10..18].try_into().unwrap_or([0; 8]));
    let peer_capacity = u64::from_le_bytes(fixed[18..26].try_into().unwrap_or([0; 8]));
    let text_len = u16::from_le_bytes([fixed[26], fixed[27]]) as usize;
    if text_len > MAX_NAME {
        return Err(bad(format!("offer text of {text_len} bytes")));
    }
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
    let mut reply = Vec::with_capacity(64);
    reply.extend_from_slice(REPLY_MAGIC);
    reply.push(policy.code());
    let reason = match &opened {
        Ok(_) => {
            reply.push(1);
            String::new()
        }
        Err(r) => {
            reply.push(0);
            r.clone()
        }
    };
    let r = &reason.as_bytes()[..reason.len().min(MAX_NAME)];
    reply.extend_from_slice(&(r.len() as u16).to_le_bytes());
    reply.extend_from_slice(r);
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
    let mut fixed = [0u8; 8 + 1 + 1 + 2];
    recv_exact(&mut prev, &mut fixed, deadline, "a shared-memory answer")?;
    let bad = |reason: String| TransportError::Protocol {
        peer: prev.peer(),
        reason,
    };
    if &fixed[..8] != REPLY_MAGIC {
        return Err(bad("expected a shared-memory answer".into()));
    }
    let peer_policy =
        Policy::from_code(fixed[8]).ok_or_else(|| bad(format!("unknown policy {}", fixed[8])))?;
    let accepted = fixed[9] == 1;
    let text_len = u16::from_le_bytes([fixed[10], fixed[11]]) as usize;
    if text_len > MAX_NAME {
        return Err(bad(format!("answer text of {text_len} bytes")));
    }
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
