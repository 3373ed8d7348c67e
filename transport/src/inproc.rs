//! In-process links: Unix socket pairs between the threads of one process.
//!
//! They are real file descriptors, so an in-process group runs exactly the
//! engine code a TCP job runs, which makes thread-based tests meaningful.

use std::os::unix::net::UnixStream;

use crate::{StreamLink, TransportError};

/// The two links of one rank in a ring: to `rank + 1` and from `rank - 1`.
#[derive(Debug)]
pub struct RingLinks {
    /// Link on which this rank sends to the next rank.
    pub next: StreamLink,
    /// Link on which this rank receives from the previous rank.
    pub prev: StreamLink,
}

/// Creates the ring links of `world` in-process ranks, indexed by rank.
/// A world of 1 has no links (`None`).
pub fn ring(world: usize) -> Result<Vec<Option<RingLinks>>, TransportError> {
    if world <= 1 {
        return Ok((0..world).map(|_| None).collect());
    }
    // pair r connects rank r (sending end) to rank r+1 (receiving end).
    let mut send_ends = Vec::with_capacity(world);
    let mut recv_ends = Vec::with_capacity(world);
    for r in 0..world {
        let (a, b) =
            UnixStream::pair().map_err(|e| TransportError::io("creating a socket pair", e))?;
        send_ends.push(StreamLink::unix((r + 1) % world, a)?);
        recv_ends.push(StreamLink::unix(r, b)?);
    }
    // rank r receives on the pair of rank r-1.
    recv_ends.rotate_right(1);
    Ok(send_ends
        .into_iter()
        .zip(recv_ends)
        .map(|(next, prev)| Some(RingLinks { next, prev }))
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::Endpoint;

    #[test]
    fn ring_peers_are_neighbours() {
        let links = ring(4).unwrap();
        for (r, l) in links.iter().enumerate() {
            let l = l.as_ref().unwrap();
            assert_eq!(l.next.peer(), (r + 1) % 4);
            assert_eq!(l.prev.peer(), (r + 3) % 4);
        }
        assert!(ring(1).unwrap()[0].is_none());
    }
}
