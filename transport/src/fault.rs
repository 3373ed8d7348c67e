//! A fault-injecting in-memory link, for testing what drives links.
//!
//! A [`FaultLink`] pair carries bytes through two in-memory queues, and
//! misbehaves as its [`Faults`] say: it moves at most a few bytes per call
//! (down to one), reports "nothing now" on some calls although it could
//! move bytes (delayed readiness), fails after a number of bytes, or closes.
//! A socket pair next to the queues rings a doorbell for every write and
//! carries the hang-up, so that [`wait`](crate::wait) and
//! [`wait_watching`](crate::wait_watching) sleep and wake on it as on a
//! real link. Faults are drawn from a seed: a failing test replays exactly.
//! Each end counts the calls of [`Endpoint::withdraw`] made on it.

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::TransportError;
use crate::link::{Capabilities, Endpoint, Link, ShutdownHandle};
use crate::{MemoryKind, MemoryKinds};

/// How one end of a [`FaultLink`] misbehaves. The default is a well-behaved
/// link with unbounded buffering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    /// The most bytes one `try_write` or `try_read` moves (at least 1).
    pub max_chunk: usize,
    /// One call in this many (drawn from the seed) moves nothing although it
    /// could; 0 never.
    pub stall_one_in: u32,
    /// After this many bytes written and read through this end, every call
    /// fails with [`TransportError::Io`]; `None` never.
    pub fail_after: Option<u64>,
    /// The most bytes in flight towards the peer; a full queue makes
    /// `try_write` move nothing.
    pub capacity: usize,
    /// Seed of the stalls.
    pub seed: u64,
    /// The link takes host memory by address ([`crate::Lent::Device`]) for
    /// frames of more than this many bytes, as UCX takes device memory
    /// ([`Capabilities::by_address`]); `None`: it takes none.
    pub by_address_over: Option<usize>,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            max_chunk: usize::MAX,
            stall_one_in: 0,
            fail_after: None,
            capacity: usize::MAX,
            seed: 1,
            by_address_over: None,
        }
    }
}

/// One direction: the bytes in flight, and whether its writer is gone.
#[derive(Debug, Default)]
struct Pipe {
    bytes: Mutex<VecDeque<u8>>,
    closed: AtomicBool,
}

impl Pipe {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<u8>> {
        self.bytes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One end of an in-memory link that injects faults (see the module docs).
#[derive(Debug)]
pub struct FaultLink {
    peer: usize,
    tx: Arc<Pipe>,
    rx: Arc<Pipe>,
    /// Our end of the doorbell (nonblocking): readable when the peer wrote,
    /// hung up when the peer is gone.
    bell: UnixStream,
    faults: Faults,
    moved: u64,
    rng: u64,
    /// Calls of [`Endpoint::withdraw`] so far.
    withdrawals: usize,
    /// What the framing last asked of record ends ([`Link::set_record_ends`]).
    record_ends: Option<bool>,
}

/// A connected pair: `a` is rank `a_rank`'s end (its peer is `b_rank`), `b`
/// the other. Each end misbehaves as its own [`Faults`] say.
pub fn pair(
    a_rank: usize,
    b_rank: usize,
    a_faults: Faults,
    b_faults: Faults,
) -> Result<(FaultLink, FaultLink), TransportError> {
    let (x, y) = UnixStream::pair().map_err(|e| TransportError::io("creating a doorbell", e))?;
    let (ab, ba) = (Arc::new(Pipe::default()), Arc::new(Pipe::default()));
    let end =
        |peer, tx, rx, bell: UnixStream, faults: Faults| -> Result<FaultLink, TransportError> {
            bell.set_nonblocking(true)
                .map_err(|e| TransportError::io("making a doorbell nonblocking", e))?;
            Ok(FaultLink {
                peer,
                tx,
                rx,
                bell,
                faults,
                moved: 0,
                rng: faults.seed | 1,
                withdrawals: 0,
                record_ends: None,
            })
        };
    Ok((
        end(b_rank, ab.clone(), ba.clone(), x, a_faults)?,
        end(a_rank, ba, ab, y, b_faults)?,
    ))
}

/// The links of a ring of `world` ranks, indexed by rank, as (to the next
/// rank, from the previous rank); `faults(r)` describes the ends of rank `r`.
/// A world of 1 has no links.
pub fn ring(
    world: usize,
    faults: impl Fn(usize) -> Faults,
) -> Result<Vec<Option<(FaultLink, FaultLink)>>, TransportError> {
    if world <= 1 {
        return Ok((0..world).map(|_| None).collect());
    }
    let mut next = Vec::with_capacity(world);
    let mut prev = Vec::with_capacity(world);
    for r in 0..world {
        let to = (r + 1) % world;
        let (a, b) = pair(r, to, faults(r), faults(to))?;
        next.push(a);
        prev.push(b);
    }
    prev.rotate_right(1);
    Ok(next.into_iter().zip(prev).map(Some).collect())
}

impl FaultLink {
    /// Whether this call stalls, and how many bytes it may move.
    fn allowance(&mut self) -> Result<Option<usize>, TransportError> {
        if let Some(limit) = self.faults.fail_after {
            if self.moved >= limit {
                return Err(TransportError::io(
                    format!("link to rank {} (fault injected)", self.peer),
                    std::io::Error::other(format!("failed after {limit} bytes")),
                ));
            }
        }
        if self.faults.stall_one_in > 0 {
            // xorshift64*
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            let draw = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
            if draw % u64::from(self.faults.stall_one_in) == 0 {
                return Ok(None);
            }
        }
        let mut n = self.faults.max_chunk.max(1);
        if let Some(limit) = self.faults.fail_after {
            n = n.min(usize::try_from(limit - self.moved).unwrap_or(usize::MAX));
        }
        Ok(Some(n))
    }

    /// How many times [`Endpoint::withdraw`] was called on this end. The queues
    /// copy the bytes in `try_write`, so a withdrawal changes nothing else;
    /// a test counts them to check that what drives the link takes back a
    /// partial write before it lets go of the buffer.
    pub fn withdrawals(&self) -> usize {
        self.withdrawals
    }

    /// Whether the framing last asked for each write to end a record
    /// ([`Link::set_record_ends`]); `None` before it asked.
    pub fn record_ends(&self) -> Option<bool> {
        self.record_ends
    }

    /// Closes this end: the peer reads what is queued, then the end of the stream.
    pub fn close(&self) {
        self.tx.closed.store(true, Ordering::SeqCst);
        let _ = self.bell.shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for FaultLink {
    fn drop(&mut self) {
        self.close();
    }
}

impl Endpoint for FaultLink {
    fn peer(&self) -> usize {
        self.peer
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.bell.as_fd()
    }

    fn withdraw(&mut self) {
        self.withdrawals += 1;
    }

    fn shutdown_handle(&self) -> Result<ShutdownHandle, TransportError> {
        let bell = self
            .bell
            .try_clone()
            .map_err(|e| TransportError::io("duplicating a doorbell", e))?;
        let tx = self.tx.clone();
        Ok(ShutdownHandle::unix(bell)
            .with_hook(Arc::new(move || tx.closed.store(true, Ordering::SeqCst))))
    }

    fn describe(&self) -> String {
        format!("fault link to rank {} ({:?})", self.peer, self.faults)
    }

    fn capabilities(&self) -> Capabilities {
        match self.faults.by_address_over {
            Some(over) => Capabilities {
                by_address: MemoryKinds::NONE.with(MemoryKind::Host),
                by_address_over: over,
                ..Capabilities::default()
            },
            None => Capabilities::default(),
        }
    }
}

impl Link for FaultLink {
    fn set_record_ends(&mut self, on: bool) {
        self.record_ends = Some(on);
    }

    fn try_write(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, TransportError> {
        if self.rx.closed.load(Ordering::SeqCst) {
            return Err(TransportError::PeerClosed {
                peer: self.peer,
                how: "closed (fault link)".into(),
            });
        }
        let Some(mut allowed) = self.allowance()? else {
            return Ok(0);
        };
        let mut n = 0;
        {
            let mut q = self.tx.queue();
            allowed = allowed.min(self.faults.capacity.saturating_sub(q.len()));
            for b in bufs {
                let take = b.len().min(allowed - n);
                q.extend(&b[..take]);
                n += take;
                if n == allowed {
                    break;
                }
            }
        }
        if n > 0 {
            self.moved += n as u64;
            // The doorbell only wakes a sleeper: a full socket is as good.
            let _ = (&self.bell).write(&[1]);
        }
        Ok(n)
    }

    fn try_read(&mut self, bufs: &mut [IoSliceMut<'_>]) -> Result<usize, TransportError> {
        let want: usize = bufs.iter().map(|b| b.len()).sum();
        let Some(allowed) = self.allowance()? else {
            return Ok(0);
        };
        let mut q = self.rx.queue();
        // The doorbell stays rung while bytes are queued (a stall or a
        // partial read leaves it so, as a socket with unread bytes stays
        // readable): it is drained only when this read finds or leaves the
        // queue empty, under the queue's lock, and a writer rings after
        // queueing, so a sleeper never misses bytes.
        let drain = |q: &VecDeque<u8>| {
            if q.is_empty() {
                let mut sink = [0u8; 64];
                while matches!((&self.bell).read(&mut sink), Ok(n) if n > 0) {}
            }
        };
        if q.is_empty() {
            drain(&q);
            if want > 0 && self.rx.closed.load(Ordering::SeqCst) {
                return Err(TransportError::PeerClosed {
                    peer: self.peer,
                    how: "end of stream (fault link)".into(),
                });
            }
            return Ok(0);
        }
        let mut n = 0;
        let limit = allowed.min(q.len());
        for b in bufs.iter_mut() {
            let take = b.len().min(limit - n);
            for (d, s) in b[..take].iter_mut().zip(q.drain(..take)) {
                *d = s;
            }
            n += take;
            if n == limit {
                break;
            }
        }
        drain(&q);
        drop(q);
        self.moved += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::{wait, wait_watching};

    fn read_all(l: &mut FaultLink, n: usize) -> Result<Vec<u8>, TransportError> {
        let mut out = vec![0u8; n];
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while got < n {
            assert!(Instant::now() < deadline, "stuck at {got} of {n}");
            got += l.try_read(&mut [IoSliceMut::new(&mut out[got..])])?;
        }
        Ok(out)
    }

    #[test]
    fn delivers_a_byte_at_a_time_with_stalls_in_order() {
        let slow = Faults {
            max_chunk: 1,
            stall_one_in: 3,
            seed: 9,
            ..Faults::default()
        };
        let (mut a, mut b) = pair(0, 1, slow, slow).unwrap();
        assert_eq!((a.peer(), b.peer()), (1, 0));
        let data: Vec<u8> = (0..200u8).collect();
        let (mut sent, mut calls, mut stalls) = (0, 0, 0);
        while sent < data.len() {
            let n = a
                .try_write(&[
                    IoSlice::new(&data[sent.min(100)..100]),
                    IoSlice::new(&data[sent.max(100)..]),
                ])
                .unwrap();
            assert!(n <= 1);
            calls += 1;
            stalls += usize::from(n == 0);
            sent += n;
        }
        assert!(
            stalls > 0 && stalls < calls,
            "{stalls} stalls in {calls} calls"
        );
        assert_eq!(read_all(&mut b, 200).unwrap(), data);
    }

    #[test]
    fn fails_after_the_given_bytes() {
        let faults = Faults {
            fail_after: Some(10),
            ..Faults::default()
        };
        let (mut a, _b) = pair(0, 1, faults, Faults::default()).unwrap();
        assert_eq!(a.try_write(&[IoSlice::new(&[7; 25])]).unwrap(), 10);
        let e = a
            .try_write(&[IoSlice::new(&[7; 5])])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rank 1") && e.contains("failed after 10 bytes"),
            "{e}"
        );
    }

    #[test]
    fn a_closed_peer_delivers_its_bytes_then_the_end() {
        let (mut a, mut b) = pair(0, 1, Faults::default(), Faults::default()).unwrap();
        a.try_write(&[IoSlice::new(b"last words")]).unwrap();
        drop(a);
        assert_eq!(read_all(&mut b, 10).unwrap(), b"last words");
        match b.try_read(&mut [IoSliceMut::new(&mut [0u8; 4])]) {
            Err(TransportError::PeerClosed { peer: 0, .. }) => {}
            other => panic!("expected the end of the stream, got {other:?}"),
        }
        assert!(matches!(
            b.try_write(&[IoSlice::new(b"x")]),
            Err(TransportError::PeerClosed { peer: 0, .. })
        ));
    }

    #[test]
    fn capacity_blocks_writes_until_read() {
        let small = Faults {
            capacity: 4,
            ..Faults::default()
        };
        let (mut a, mut b) = pair(0, 1, small, small).unwrap();
        assert_eq!(a.try_write(&[IoSlice::new(b"abcdef")]).unwrap(), 4);
        assert_eq!(a.try_write(&[IoSlice::new(b"ef")]).unwrap(), 0);
        assert_eq!(read_all(&mut b, 4).unwrap(), b"abcd");
        assert_eq!(a.try_write(&[IoSlice::new(b"ef")]).unwrap(), 2);
    }

    /// A read that leaves bytes queued (a chunk of them, or a stall) leaves
    /// the doorbell rung: a sleeper wakes at once, as on a socket with
    /// unread bytes. (It was drained on every read, and three ranks each
    /// asleep over a stalled last frame hung until their deadline.)
    #[test]
    fn bytes_left_queued_keep_the_doorbell_rung() {
        let one = Faults {
            max_chunk: 1,
            ..Faults::default()
        };
        let (mut a, mut b) = pair(0, 1, Faults::default(), one).unwrap();
        a.try_write(&[IoSlice::new(b"abc")]).unwrap();
        for left in [2, 1] {
            assert_eq!(
                b.try_read(&mut [IoSliceMut::new(&mut [0u8; 8])]).unwrap(),
                1
            );
            let start = Instant::now();
            let r = wait(Some(&b), None, Duration::from_secs(2)).unwrap();
            assert!(
                r.readable && start.elapsed() < Duration::from_secs(1),
                "{left} bytes queued, slept {:?}",
                start.elapsed()
            );
        }
        assert_eq!(
            b.try_read(&mut [IoSliceMut::new(&mut [0u8; 8])]).unwrap(),
            1
        );
        // Empty now: the doorbell is quiet until the next write.
        let r = wait(Some(&b), None, Duration::from_millis(100)).unwrap();
        assert!(!r.readable);
    }

    #[test]
    fn a_sleeper_wakes_on_a_write_and_on_a_hang_up() {
        let (mut a, b) = pair(0, 1, Faults::default(), Faults::default()).unwrap();
        let start = Instant::now();
        let t = std::thread::spawn(move || {
            let r = wait(Some(&b), None, Duration::from_secs(10)).unwrap();
            (r, b)
        });
        std::thread::sleep(Duration::from_millis(50));
        a.try_write(&[IoSlice::new(b"x")]).unwrap();
        let (r, b) = t.join().unwrap();
        assert!(r.readable && start.elapsed() < Duration::from_secs(5));
        // The writer's peer hangs up: a watcher of it wakes.
        let t = std::thread::spawn(move || {
            wait_watching(None, None, Some(&a), Duration::from_secs(10)).unwrap()
        });
        std::thread::sleep(Duration::from_millis(50));
        drop(b);
        assert!(t.join().unwrap().hung_up);
    }

    #[test]
    fn a_ring_connects_neighbours() {
        let links = ring(3, |_| Faults::default()).unwrap();
        for (r, l) in links.iter().enumerate() {
            let (next, prev) = l.as_ref().unwrap();
            assert_eq!((next.peer(), prev.peer()), ((r + 1) % 3, (r + 2) % 3));
        }
        let mut links: Vec<_> = links.into_iter().map(Option::unwrap).collect();
        links[0].0.try_write(&[IoSlice::new(b"hi")]).unwrap();
        assert_eq!(read_all(&mut links[1].1, 2).unwrap(), b"hi");
        assert!(ring(1, |_| Faults::default()).unwrap()[0].is_none());
    }
}
