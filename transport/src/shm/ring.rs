//! The byte ring of each direction and its doorbell: writes and reads
//! through the ring, the eventcount that lets a side sleep on the socket
//! ([`Endpoint::arm`], [`Endpoint::disarm`]), and commit and shutdown.
//!
//! # Safety
//!
//! The rings follow the header page, `HEADER_LEN + 2 * capacity` bytes in
//! all (the mapping's length, checked when it was mapped), and a copy stays
//! inside its direction's ring: it starts at a position modulo the capacity
//! and stops at the ring's end. Ring bytes between `tail` and `head` belong
//! to the reader, the rest to the writer; each side copies only within its
//! own part and publishes with a release store that the other side loads
//! with acquire. Bytes are copied with `copy_nonoverlapping` through raw
//! pointers, never through Rust references to the shared memory, which the
//! other process writes.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use super::ShmLink;
use super::segment::{Ctrl, HEADER_LEN, SHUT};
use crate::link::{Capabilities, Direction, Endpoint, Medium, ShutdownHandle};
use crate::{Link, TransportError};

/// A long write (or read) publishes its progress at least this often, so
/// that the other side starts copying out (or refilling) while this side
/// still copies: the two copies of a large frame overlap instead of
/// following each other.
const PUBLISH_BYTES: usize = 64 * 1024;

impl ShmLink {
    /// Bytes of the ring of direction `dir` start here.
    fn data(&self, dir: usize) -> *mut u8 {
        // SAFETY: HEADER_LEN + 2 * capacity == len (checked when mapped), so
        // the start of either ring is inside the mapping.
        unsafe { self.map.base.as_ptr().add(HEADER_LEN + dir * self.capacity) }
    }

    /// The ring's occupancy `head - tail`, refusing impossible values as the
    /// fault of the peer, which wrote the head (`peer_head`: we read) or the
    /// tail (we write).
    fn used(&self, head: u64, tail: u64, peer_head: bool) -> Result<usize, TransportError> {
        let cap = self.capacity;
        match head.checked_sub(tail) {
            Some(u) if u <= cap as u64 => Ok(u as usize),
            Some(u) => Err(self.peer_wrote(if peer_head {
                format!(
                    "its shared-memory ring head is {u} bytes ahead of the tail, \
                     more than the {cap}-byte ring holds (head {head}, tail {tail})"
                )
            } else {
                format!(
                    "its shared-memory ring tail is {u} bytes behind the head, \
                     more than the {cap}-byte ring holds (head {head}, tail {tail})"
                )
            })),
            None => {
                let d = tail - head;
                Err(self.peer_wrote(if peer_head {
                    format!(
                        "its shared-memory ring head is {d} bytes behind the tail \
                         (head {head}, tail {tail})"
                    )
                } else {
                    format!(
                        "its shared-memory ring tail is {d} bytes ahead of the head \
                         (head {head}, tail {tail})"
                    )
                }))
            }
        }
    }

    /// Makes the bytes written up to `head` visible to the reader, and wakes
    /// it if it sleeps. The fence orders the store before the flag's load
    /// (the eventcount's half on this side; `arm` keeps the other).
    fn publish_head(&self, ctrl: &Ctrl, head: u64) {
        self.head.set(head);
        ctrl.head.store(head, Ordering::Release);
        fence(Ordering::SeqCst);
        if ctrl.reader_waiting.load(Ordering::Relaxed) != 0 {
            self.ring_doorbell();
        }
    }

    /// Gives the bytes read up to `tail` back to the writer, and wakes it if
    /// it sleeps waiting for room.
    fn publish_tail(&self, ctrl: &Ctrl, tail: u64) {
        self.tail.set(tail);
        ctrl.tail.store(tail, Ordering::Release);
        fence(Ordering::SeqCst);
        if ctrl.writer_waiting.load(Ordering::Relaxed) != 0 {
            self.ring_doorbell();
        }
    }

    /// Sends one doorbell byte; a full socket already has bytes pending.
    pub(super) fn ring_doorbell(&self) {
        match rustix::net::send(
            self.doorbell.fd(),
            &[1u8],
            rustix::net::SendFlags::NOSIGNAL | rustix::net::SendFlags::DONTWAIT,
        ) {
            Ok(_) | Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => self.closed.set(true),
        }
    }

    /// Reads pending doorbell bytes; notes the end of the stream.
    fn drain_doorbell(&self) -> Result<(), TransportError> {
        let mut buf = [0u8; 64];
        loop {
            match rustix::io::read(self.doorbell.fd(), &mut buf) {
                Ok(0) => {
                    self.closed.set(true);
                    return Ok(());
                }
                Ok(_) => continue,
                Err(rustix::io::Errno::AGAIN) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(
                    rustix::io::Errno::CONNRESET
                    | rustix::io::Errno::PIPE
                    | rustix::io::Errno::NOTCONN,
                ) => {
                    self.closed.set(true);
                    return Ok(());
                }
                Err(e) => {
                    return Err(TransportError::io(
                        format!("reading the doorbell of the link to rank {}", self.peer),
                        e.into(),
                    ));
                }
            }
        }
    }
}

impl Endpoint for ShmLink {
    fn peer(&self) -> usize {
        self.peer
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.doorbell.fd()
    }

    fn arm(&self, dir: Direction) -> Result<Option<Direction>, TransportError> {
        self.drain_doorbell()?;
        if self.closed.get() || self.is_shut() || (dir == Direction::Write && self.withdrawn.get())
        {
            // Ready: the next try_read/try_write reports it.
            return Ok(None);
        }
        let ready = match dir {
            Direction::Read => {
                let ctrl = self.map.ctrl(1 - self.tx);
                ctrl.reader_waiting.store(1, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                ctrl.head.load(Ordering::Relaxed) != self.tail.get()
                    || ctrl.pull_posted.load(Ordering::Relaxed) != self.pulls_done.get()
            }
            Direction::Write if self.posted.get().is_some() => {
                let ctrl = self.map.ctrl(self.tx);
                ctrl.writer_waiting.store(1, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                ctrl.pulled.load(Ordering::Relaxed) != self.pulled_seen.get()
            }
            Direction::Write => {
                let ctrl = self.map.ctrl(self.tx);
                ctrl.writer_waiting.store(1, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                // Ready unless exactly full: room, or an impossible tail
                // that the next write reports.
                let used = self
                    .head
                    .get()
                    .wrapping_sub(ctrl.tail.load(Ordering::Relaxed));
                used != self.capacity as u64
            }
        };
        if ready {
            self.disarm(dir);
            return Ok(None);
        }
        // Both the peer's doorbell and its end of stream make the socket readable.
        Ok(Some(Direction::Read))
    }

    fn disarm(&self, dir: Direction) {
        // A wake-up may have been the end of the stream: note it now, so the
        // next try_read/try_write reports it instead of spinning first.
        let _ = self.drain_doorbell();
        match dir {
            Direction::Read => self
                .map
                .ctrl(1 - self.tx)
                .reader_waiting
                .store(0, Ordering::Relaxed),
            Direction::Write => self
                .map
                .ctrl(self.tx)
                .writer_waiting
                .store(0, Ordering::Relaxed),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            cheap_polling: true,
            medium: Medium::SharedMemory,
            ..Capabilities::default()
        }
    }

    fn withdraw(&mut self) {
        self.withdraw_posted();
    }

    fn commit(&mut self) {
        self.map
            .ctrl(self.tx)
            .committed
            .store(self.head.get(), Ordering::Release);
    }

    fn shutdown_handle(&self) -> Result<ShutdownHandle, TransportError> {
        let map = Arc::clone(&self.map);
        let mark = move || {
            map.word(SHUT).store(1, Ordering::Release);
            // Before our caller may touch a posted transfer's bytes again
            // (see `pull`).
            fence(Ordering::SeqCst);
        };
        Ok(self.doorbell.shutdown_handle()?.with_hook(Arc::new(mark)))
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

impl Link for ShmLink {
    fn try_write(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, TransportError> {
        if self.is_shut() {
            return Err(self.shut_error());
        }
        if self.withdrawn.get() {
            return Err(self.withdrawn_write_error());
        }
        if let Some(posted) = self.posted.get() {
            // Nothing else enters the stream before the posted bytes. The
            // reader may have copied them all and then left.
            let n = self.poll_posted(posted, bufs)?;
            if n == 0 && self.closed.get() {
                return Err(self.closed_error());
            }
            return Ok(n);
        }
        if self.closed.get() {
            return Err(self.closed_error());
        }
        let ctrl = self.map.ctrl(self.tx);
        let head = self.head.get();
        let mut free = self.capacity - self.used(head, self.tail_seen.get(), false)?;
        let want: usize = bufs.iter().map(|b| b.len()).sum();
        if free < want {
            let tail = ctrl.tail.load(Ordering::Acquire);
            free = self.capacity - self.used(head, tail, false)?;
            self.tail_seen.set(tail);
        }
        if free == 0 {
            return Ok(0);
        }
        let data = self.data(self.tx);
        let mut pos = (head % self.capacity as u64) as usize;
        let mut written = 0usize;
        let mut published = 0usize;
        for b in bufs {
            if b.len() >= self.single_copy_min && self.single_copy_allowed && self.may_post() {
                // Everything before it is in the ring (else `free` ran out
                // and the loop ended): the reader copies this one itself.
                if written > published {
                    self.publish_head(ctrl, head + written as u64);
                }
                self.post(ctrl, head + written as u64, b);
                return Ok(written);
            }
            let mut src: &[u8] = b;
            while !src.is_empty() && free > 0 {
                let n = src
                    .len()
                    .min(free)
                    .min(self.capacity - pos)
                    .min(PUBLISH_BYTES);
                // SAFETY: `pos + n <= capacity`, so the destination lies in
                // this direction's ring; those bytes are outside `tail..head`,
                // i.e. the writer's part, which the reader does not touch
                // until the release store of `head` below; `src` is our own
                // memory and cannot overlap the mapping's ring bytes, which
                // are never handed out as Rust slices.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), data.add(pos), n) };
                src = &src[n..];
                free -= n;
                written += n;
                // `n <= capacity - pos`: at most one wrap, no division.
                pos += n;
                if pos == self.capacity {
                    pos = 0;
                }
                if written - published >= PUBLISH_BYTES {
                    self.publish_head(ctrl, head + written as u64);
                    published = written;
                }
            }
            if free == 0 {
                break;
            }
        }
        if written > published {
            self.publish_head(ctrl, head + written as u64);
        }
        Ok(written)
    }

    fn try_read(&mut self, bufs: &mut [IoSliceMut<'_>]) -> Result<usize, TransportError> {
        let rx = 1 - self.tx;
        let ctrl = self.map.ctrl(rx);
        let tail = self.tail.get();
        // A posted transfer: its bytes follow the ring's up to `pull_at`,
        // and the ring holds nothing after. The writer published `head` up
        // to there before posting, and moves it no further until the
        // transfer completes: loaded after the count, `head` is `pull_at`.
        let pending = self.pending(ctrl)?;
        let mut head = ctrl.head.load(Ordering::Acquire);
        if pending {
            let at = ctrl.pull_at.load(Ordering::Relaxed);
            if at != head {
                return Err(self.peer_wrote(format!(
                    "it posted a single-copy transfer at ring position {at}, \
                     but its ring head is {head}"
                )));
            }
        }
        let shut = self.is_shut();
        if shut {
            // Like a reset socket, a shut link fails at once, except that the
            // bytes of collectives the writer completed still arrive: the rest
            // (a posted transfer included) belongs to a call it abandoned.
            // `committed` never passes `head` once stored, but may pass the
            // `head` loaded above.
            head = head.min(ctrl.committed.load(Ordering::Acquire));
            if head <= tail {
                return Err(self.shut_error());
            }
        }
        let mut avail = self.used(head, tail, true)?;
        if avail == 0 {
            if pending && !shut {
                let mut dst = [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; 4];
                let mut k = 0;
                for b in bufs.iter_mut().filter(|b| !b.is_empty()).take(dst.len()) {
                    dst[k] = libc::iovec {
                        iov_base: b.as_mut_ptr().cast(),
                        iov_len: b.len(),
                    };
                    k += 1;
                }
                return self.pull(ctrl, &dst[..k]);
            }
            if self.closed.get() {
                return Err(self.closed_error());
            }
            return Ok(0);
        }
        let data = self.data(rx);
        let mut pos = (tail % self.capacity as u64) as usize;
        let mut read = 0usize;
        let mut published = 0usize;
        for b in bufs.iter_mut() {
            let mut dst: &mut [u8] = b;
            while !dst.is_empty() && avail > 0 {
                let n = dst
                    .len()
                    .min(avail)
                    .min(self.capacity - pos)
                    .min(PUBLISH_BYTES);
                // SAFETY: `pos + n <= capacity`, inside the ring of direction
                // `rx`; the bytes lie in `tail..head`, published by the
                // writer's release store that the acquire load above saw, and
                // the writer does not touch them until we advance `tail`.
                unsafe { std::ptr::copy_nonoverlapping(data.add(pos), dst.as_mut_ptr(), n) };
                dst = &mut dst[n..];
                avail -= n;
                read += n;
                pos += n;
                if pos == self.capacity {
                    pos = 0;
                }
                if read - published >= PUBLISH_BYTES {
                    self.publish_tail(ctrl, tail + read as u64);
                    published = read;
                }
            }
            if avail == 0 {
                break;
            }
        }
        if read > published {
            self.publish_tail(ctrl, tail + read as u64);
        }
        Ok(read)
    }

    fn allow_single_copy(&mut self, allowed: bool) {
        self.single_copy_allowed = allowed;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::shm::tests::{expect_closed, expect_protocol, stream};
    use crate::shm::{MIN_CAPACITY, pair};
    use crate::wait;
    use std::time::{Duration, Instant};

    #[test]
    fn long_writes_and_reads_publish_as_they_go() {
        // Pieces of up to 600 KB in a 1 MiB ring: one call copies many
        // PUBLISH_BYTES steps and publishes after each.
        let (a, b) = pair(0, 1, 1 << 20).unwrap();
        stream(Box::new(a), Box::new(b), 40_000_000, 600_001);
    }

    #[test]
    fn closed_peer_is_reported_after_its_bytes() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        assert_eq!(a.try_write(&[IoSlice::new(b"last words")]).unwrap(), 10);
        drop(a);
        // The bytes written before the close are still read.
        let r = wait(Some(&b), None, Duration::from_secs(5)).unwrap();
        assert!(r.readable);
        let mut buf = [0u8; 32];
        let n = b.try_read(&mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(&buf[..n], b"last words");
        // Then the close: the wait returns at once and the read fails.
        let r = wait(Some(&b), None, Duration::from_secs(5)).unwrap();
        assert!(r.readable);
        expect_closed(b.try_read(&mut [IoSliceMut::new(&mut buf)]), 0);
        expect_closed(b.try_write(&[IoSlice::new(b"x")]), 0);
    }

    #[test]
    fn a_shut_link_fails_both_sides_at_once_despite_bytes_in_flight() {
        // An abort (not a drop): the bytes already in the ring belong to a
        // collective the sender abandoned, so the reader must not use them,
        // and the writer must learn at its next write, as over a reset socket.
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        assert_eq!(a.try_write(&[IoSlice::new(b"abandoned")]).unwrap(), 9);
        assert_eq!(b.try_write(&[IoSlice::new(b"unread")]).unwrap(), 6);
        a.shutdown_handle().unwrap().shutdown();
        let mut buf = [0u8; 32];
        expect_closed(b.try_read(&mut [IoSliceMut::new(&mut buf)]), 0);
        expect_closed(b.try_write(&[IoSlice::new(b"x")]), 0);
        let r = wait(Some(&b), None, Duration::from_secs(5)).unwrap();
        assert!(r.readable, "a shut link must not put a waiter to sleep");
        // The side that shut it fails too.
        expect_closed(a.try_read(&mut [IoSliceMut::new(&mut buf)]), 1);
    }

    #[test]
    fn a_shut_link_still_delivers_the_bytes_of_completed_calls() {
        // The writer completed one call (commit) and abandoned the next.
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        assert_eq!(a.try_write(&[IoSlice::new(b"done.")]).unwrap(), 5);
        a.commit();
        assert_eq!(a.try_write(&[IoSlice::new(b"abandoned")]).unwrap(), 9);
        a.shutdown_handle().unwrap().shutdown();
        let r = wait(Some(&b), None, Duration::from_secs(5)).unwrap();
        assert!(r.readable, "a shut link must not put a waiter to sleep");
        let mut buf = [0u8; 3];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut buf)]).unwrap(), 3);
        let mut rest = [0u8; 32];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut rest)]).unwrap(), 2);
        assert_eq!((&buf, &rest[..2]), (b"don", &b"e."[..]));
        expect_closed(b.try_read(&mut [IoSliceMut::new(&mut rest)]), 0);
        expect_closed(b.try_write(&[IoSlice::new(b"x")]), 0);
    }

    #[test]
    fn a_watched_shm_link_reports_its_peer_going_away() {
        let (mut a, b) = pair(0, 1, MIN_CAPACITY).unwrap();
        // Bytes (and the doorbells they may ring) are not a hang-up.
        assert_eq!(a.try_write(&[IoSlice::new(b"bytes")]).unwrap(), 5);
        let r = crate::wait_watching(None, None, Some(&b), Duration::from_millis(30)).unwrap();
        assert!(!r.hung_up, "{r:?}");
        drop(a);
        let r = crate::wait_watching(None, None, Some(&b), Duration::from_secs(5)).unwrap();
        assert!(r.hung_up, "{r:?}");
    }

    #[test]
    fn a_blocked_writer_sleeps_until_the_reader_makes_room() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        let fill = vec![9u8; MIN_CAPACITY + 100];
        assert_eq!(a.try_write(&[IoSlice::new(&fill)]).unwrap(), MIN_CAPACITY);
        assert_eq!(a.try_write(&[IoSlice::new(&fill)]).unwrap(), 0);
        let t = std::thread::spawn(move || {
            let t0 = Instant::now();
            let r = wait(None, Some(&a), Duration::from_secs(10)).unwrap();
            (r, t0.elapsed(), a)
        });
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = [0u8; 100];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut buf)]).unwrap(), 100);
        let (r, waited, mut a) = t.join().unwrap();
        assert!(r.writable, "the writer woke without room");
        assert!(waited < Duration::from_secs(5), "woke only at the timeout");
        assert_eq!(a.try_write(&[IoSlice::new(&fill)]).unwrap(), 100);
    }

    #[test]
    fn shutdown_handle_wakes_a_sleeping_reader() {
        let (a, b) = pair(0, 1, MIN_CAPACITY).unwrap();
        let h = b.shutdown_handle().unwrap();
        let t = std::thread::spawn(move || {
            let r = wait(Some(&b), None, Duration::from_secs(10)).unwrap();
            (r, b)
        });
        std::thread::sleep(Duration::from_millis(50));
        h.shutdown();
        let (r, mut b) = t.join().unwrap();
        assert!(r.readable);
        let mut buf = [0u8; 4];
        assert!(matches!(
            b.try_read(&mut [IoSliceMut::new(&mut buf)]),
            Err(TransportError::PeerClosed { .. })
        ));
        drop(a);
    }

    #[test]
    fn a_ring_head_out_of_place_fails_the_reader_naming_the_writer() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        // Rank 0 writes direction 0; these are its words.
        let map = Arc::clone(&a.map);
        let ctrl = map.ctrl(0);
        let mut buf = [0u8; 64];
        ctrl.head.store(5000, Ordering::Release);
        expect_protocol(
            b.try_read(&mut [IoSliceMut::new(&mut buf)]),
            0,
            &["rank 0", "ring head", "5000 bytes ahead", "4096-byte"],
        );
        ctrl.head.store(u64::MAX, Ordering::Release);
        expect_protocol(
            b.try_read(&mut [IoSliceMut::new(&mut buf)]),
            0,
            &["ring head", "bytes ahead"],
        );
        // Behind the tail.
        ctrl.head.store(0, Ordering::Release);
        assert_eq!(a.try_write(&[IoSlice::new(b"0123456789")]).unwrap(), 10);
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut buf)]).unwrap(), 10);
        ctrl.head.store(3, Ordering::Release);
        expect_protocol(
            b.try_read(&mut [IoSliceMut::new(&mut buf)]),
            0,
            &["ring head", "7 bytes behind"],
        );
    }

    #[test]
    fn a_ring_tail_out_of_place_fails_the_writer_naming_the_reader() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        // Rank 1 reads direction 0; its tail is there.
        let map = Arc::clone(&b.map);
        let ctrl = map.ctrl(0);
        let fill = vec![1u8; MIN_CAPACITY];
        assert_eq!(a.try_write(&[IoSlice::new(b"0123456789")]).unwrap(), 10);
        // Past the head (a write that needs the tail loads it).
        ctrl.tail.store(20, Ordering::Release);
        expect_protocol(
            a.try_write(&[IoSlice::new(&fill)]),
            1,
            &["rank 1", "ring tail", "10 bytes ahead"],
        );
        ctrl.tail.store(u64::MAX, Ordering::Release);
        expect_protocol(
            a.try_write(&[IoSlice::new(&fill)]),
            1,
            &["ring tail", "bytes ahead"],
        );
        // Gone back further than the ring holds.
        ctrl.tail.store(0, Ordering::Release);
        let mut buf = vec![0u8; MIN_CAPACITY];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut buf)]).unwrap(), 10);
        assert_eq!(a.try_write(&[IoSlice::new(&fill)]).unwrap(), MIN_CAPACITY);
        assert_eq!(
            b.try_read(&mut [IoSliceMut::new(&mut buf[..100])]).unwrap(),
            100
        );
        ctrl.tail.store(0, Ordering::Release);
        expect_protocol(
            a.try_write(&[IoSlice::new(&fill[..200])]),
            1,
            &["ring tail", "4106 bytes behind", "4096-byte"],
        );
        // A writer about to sleep on a full ring wakes for an impossible
        // tail, to report it, rather than sleep until its deadline.
        let (mut a, b) = pair(0, 1, MIN_CAPACITY).unwrap();
        let map = Arc::clone(&b.map);
        let ctrl = map.ctrl(0);
        assert_eq!(a.try_write(&[IoSlice::new(&fill)]).unwrap(), MIN_CAPACITY);
        assert!(
            a.arm(Direction::Write).unwrap().is_some(),
            "the ring is full"
        );
        a.disarm(Direction::Write);
        ctrl.tail.store(u64::MAX, Ordering::Release);
        assert!(a.arm(Direction::Write).unwrap().is_none());
        expect_protocol(a.try_write(&[IoSlice::new(&fill)]), 1, &["ring tail"]);
    }
}
