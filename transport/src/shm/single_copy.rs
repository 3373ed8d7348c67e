//! Single copy: the writer posts a large buffer's address in its control
//! block and the reader copies it with `process_vm_readv` straight into its
//! own buffer; and the probe, when a link is made, of whether the kernel
//! lets the reader read the writer's memory at all.
//!
//! # Safety
//!
//! `process_vm_readv` writes only into memory of ours that its local iovecs
//! describe (the probe's token, or the unfilled parts of the caller's
//! buffers, exclusively borrowed for the call), and reads the other
//! process's memory with the kernel's checks of permission and address, so
//! a bad remote address is an error, never an access in this process. A
//! posted transfer's bytes belong to the writer's caller, who leaves them
//! alone until they are reported written; a writer that gives them up
//! before the reader is done first marks the link shut (an abort, a drop)
//! or the transfer withdrawn (its call failed: [`ShmLink::withdraw_posted`]),
//! and the reader checks both marks after each copy and discards the copy
//! if either is set, so bytes the caller may already have reused are never
//! delivered.

use std::io::IoSlice;
use std::sync::atomic::{Ordering, fence};

use super::ShmLink;
use super::segment::{
    Ctrl, Mapping, PULLABLE_NO, PULLABLE_YES, SHUT, SOURCE_OFFSET, SOURCE_PID, SOURCE_PULLABLE,
    SOURCE_TOKEN, SOURCE_TOKEN_ADDR,
};
use crate::TransportError;

/// A single-copy transfer the writer posted: the caller's bytes at `addr`,
/// of which the first `reported` were reported written (the reader copied
/// them).
#[derive(Debug, Clone, Copy)]
pub(super) struct Posted {
    addr: usize,
    len: usize,
    reported: usize,
}

impl Mapping {
    /// Publishes this process as the writer of direction `dir`, for the
    /// reader's single-copy probe.
    pub(super) fn publish_source(&self, dir: usize) {
        let at = SOURCE_OFFSET[dir];
        self.word(at + SOURCE_TOKEN_ADDR)
            .store(&*self.token as *const u64 as u64, Ordering::Relaxed);
        self.word(at + SOURCE_TOKEN)
            .store(*self.token, Ordering::Relaxed);
        self.word(at + SOURCE_PID)
            .store(u64::from(std::process::id()), Ordering::Release);
    }

    /// As the reader of direction `dir`: tries to read the writer's token
    /// from its memory and records the verdict for the writer.
    fn probe_source(&self, dir: usize) -> Result<i32, String> {
        let at = SOURCE_OFFSET[dir];
        let verdict = self.read_token(at);
        self.word(at + SOURCE_PULLABLE).store(
            if verdict.is_ok() {
                PULLABLE_YES
            } else {
                PULLABLE_NO
            },
            Ordering::Release,
        );
        verdict
    }

    /// The writer's process id, once its token is read back.
    fn read_token(&self, at: usize) -> Result<i32, String> {
        let pid = self.word(at + SOURCE_PID).load(Ordering::Acquire);
        if pid == 0 {
            return Err("the writer did not publish its process id".into());
        }
        let pid = i32::try_from(pid).map_err(|_| format!("process id {pid} out of range"))?;
        let addr = self.word(at + SOURCE_TOKEN_ADDR).load(Ordering::Relaxed);
        let want = self.word(at + SOURCE_TOKEN).load(Ordering::Relaxed);
        let mut got = 0u64;
        let local = libc::iovec {
            iov_base: (&mut got as *mut u64).cast(),
            iov_len: 8,
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: 8,
        };
        // SAFETY: `local` describes `got`, 8 writable bytes of ours that live
        // across the call; `remote` is only read, by the kernel, in the other
        // process, which checks its permission and the address.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(format!(
                "process_vm_readv of process {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        if n != 8 || got != want {
            return Err(format!(
                "process {pid} does not hold the token at {addr:#x} (another pid namespace?)"
            ));
        }
        Ok(pid)
    }
}

impl ShmLink {
    /// As the reader: checks once whether we may read the writer's memory,
    /// and tells the writer. Logs why not.
    pub(super) fn probe(&self) {
        let rx = 1 - self.tx;
        match self.map.probe_source(rx) {
            Ok(pid) => self.source_pid.set(pid),
            Err(why) => tracing::debug!(
                "shared-memory link from rank {}: no single copy ({why}); bytes go through the ring",
                self.peer
            ),
        }
    }

    /// Whether the reader said it may read our memory.
    #[inline]
    pub(super) fn may_post(&self) -> bool {
        if self.pullable.get() == 0 {
            let v = self.map.word(SOURCE_OFFSET[self.tx] + SOURCE_PULLABLE);
            self.pullable.set(v.load(Ordering::Acquire));
        }
        self.pullable.get() == PULLABLE_YES
    }

    /// As the writer: reports how many bytes of the posted transfer the
    /// reader copied since the last call; the caller passes the rest of the
    /// transfer's bytes as `bufs[0]`.
    #[inline]
    pub(super) fn poll_posted(
        &self,
        posted: Posted,
        bufs: &[IoSlice<'_>],
    ) -> Result<usize, TransportError> {
        let pulled = self.map.ctrl(self.tx).pulled.load(Ordering::Acquire);
        let new = pulled
            .checked_sub(self.pulled_seen.get())
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n <= posted.len - posted.reported)
            .ok_or_else(|| {
                self.peer_wrote(format!(
                    "its single-copy progress went from {} to {pulled} bytes, \
                     on a transfer of {} bytes of which {} were copied",
                    self.pulled_seen.get(),
                    posted.len,
                    posted.reported
                ))
            })?;
        let first = bufs.iter().find(|b| !b.is_empty());
        let rest_at = posted.addr + posted.reported;
        match first {
            Some(b) if b.as_ptr() as usize == rest_at => {
                let n = new.min(b.len());
                self.pulled_seen.set(self.pulled_seen.get() + n as u64);
                let reported = posted.reported + n;
                self.posted
                    .set((reported < posted.len).then_some(Posted { reported, ..posted }));
                Ok(n)
            }
            _ => Err(TransportError::io(
                format!("writing to rank {}", self.peer),
                std::io::Error::other(format!(
                    "a single-copy write's remaining bytes moved (expected them at {rest_at:#x}): \
                     callers must pass the rest of a partial write again, unchanged, at the same address"
                )),
            )),
        }
    }

    /// As the writer: posts `buf` for the reader to copy, its bytes entering
    /// the stream at ring position `at`.
    pub(super) fn post(&self, ctrl: &Ctrl, at: u64, buf: &[u8]) {
        ctrl.pull_at.store(at, Ordering::Relaxed);
        ctrl.pull_addr.store(buf.as_ptr() as u64, Ordering::Relaxed);
        ctrl.pull_len.store(buf.len() as u64, Ordering::Relaxed);
        self.posted.set(Some(Posted {
            addr: buf.as_ptr() as usize,
            len: buf.len(),
            reported: 0,
        }));
        let posted = self.pulls_posted.get() + 1;
        self.pulls_posted.set(posted);
        ctrl.pull_posted.store(posted, Ordering::Release);
        fence(Ordering::SeqCst);
        if ctrl.reader_waiting.load(Ordering::Relaxed) != 0 {
            self.ring_doorbell();
        }
    }

    /// As the writer: takes back the posted transfer, if one is posted
    /// ([`Endpoint::withdraw`](crate::Endpoint::withdraw)), so that our caller may
    /// free or reuse its bytes at once; the link stays up (no `SHUT`).
    ///
    /// The mark is the transfer's number in `pull_withdrawn`, stored and then
    /// fenced (sequentially consistent) before we return, that is before the
    /// caller may touch the bytes again. The reader fences after each copy
    /// and then loads the mark (`pull`): a copy whose load does not see it
    /// was ordered before our fence, so it read the bytes still posted; a
    /// copy that may have read reused bytes sees the mark and is discarded.
    /// Bytes the reader copied and counted before that are the call's, and
    /// stay delivered. Only atomics, and at most a doorbell whose failure is
    /// ignored: this runs while a panic unwinds, and must not panic.
    pub(super) fn withdraw_posted(&self) {
        if self.posted.get().is_none() {
            return;
        }
        let ctrl = self.map.ctrl(self.tx);
        ctrl.pull_withdrawn
            .store(self.pulls_posted.get(), Ordering::Release);
        fence(Ordering::SeqCst);
        self.posted.set(None);
        self.withdrawn.set(true);
        // A reader sleeps only with nothing to copy, which a pending
        // transfer is not; but waking one costs nothing on this path.
        if ctrl.reader_waiting.load(Ordering::Relaxed) != 0 {
            self.ring_doorbell();
        }
    }

    /// As the writer: the error of a write after
    /// [`withdraw_posted`](Self::withdraw_posted) took a transfer back.
    pub(super) fn withdrawn_write_error(&self) -> TransportError {
        TransportError::io(
            format!("writing to rank {}", self.peer),
            std::io::Error::other(
                "a single-copy transfer to it was withdrawn (its call failed): \
                 the stream lost those bytes and takes no more",
            ),
        )
    }

    /// As the reader: copies up to the rest of the pending transfer straight
    /// from the writer's memory into `dst` (the unfilled parts of the
    /// caller's buffers), returning how many bytes.
    pub(super) fn pull(&self, ctrl: &Ctrl, dst: &[libc::iovec]) -> Result<usize, TransportError> {
        // The pending transfer's number; the writer stores it as the mark of
        // a withdrawal (any other value marks none of ours: only equality
        // counts, so no value of the word can mislead us about another).
        let number = self.pulls_done.get().wrapping_add(1);
        if ctrl.pull_withdrawn.load(Ordering::Acquire) == number {
            return Err(self.withdrawn_error());
        }
        // The writer's words, checked every time: they must not move while
        // the transfer is pending, but only the writer keeps that promise.
        let addr = ctrl.pull_addr.load(Ordering::Relaxed);
        let len = ctrl.pull_len.load(Ordering::Relaxed);
        let progress = self.pull_progress.get();
        if len == 0 {
            return Err(self.peer_wrote("it posted an empty single-copy transfer".into()));
        }
        if addr
            .checked_add(len)
            .and_then(|end| usize::try_from(end).ok())
            .is_none()
        {
            return Err(self.peer_wrote(format!(
                "it posted a single-copy transfer of {len} bytes at {addr:#x}, \
                 past the end of the address space"
            )));
        }
        // Both fit in a usize (their sum does), and `progress < len` below.
        let (addr, len) = (addr as usize, len as usize);
        let left = len
            .checked_sub(progress)
            .filter(|&l| l > 0)
            .ok_or_else(|| {
                self.peer_wrote(format!(
                    "it shrank a pending single-copy transfer to {len} bytes \
                     after {progress} were copied"
                ))
            })?;
        let want = dst.iter().map(|v| v.iov_len).sum::<usize>().min(left);
        if want == 0 {
            return Ok(0);
        }
        let remote = libc::iovec {
            iov_base: (addr + progress) as *mut libc::c_void,
            iov_len: want,
        };
        // SAFETY: every `dst` entry describes unfilled bytes of the caller's
        // buffers (exclusively borrowed by `try_read` for this call); the
        // kernel writes at most `want` bytes there. The remote range is only
        // read, in the writer's process, with the kernel's checks: a bad
        // address is an error, never an access in ours.
        let n = unsafe {
            libc::process_vm_readv(
                self.source_pid.get(),
                dst.as_ptr(),
                dst.len() as libc::c_ulong,
                &remote,
                1,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ESRCH) => TransportError::PeerClosed {
                    peer: self.peer,
                    how: "its process is gone (a single-copy transfer found no process)".into(),
                },
                _ => TransportError::io(
                    format!(
                        "copying {want} bytes from rank {} (process {}) by single copy",
                        self.peer,
                        self.source_pid.get()
                    ),
                    e,
                ),
            });
        }
        // The writer's bytes were valid while it had not given up: an abort
        // stores SHUT, and a failed call the transfer's number in
        // `pull_withdrawn` (`withdraw_posted`), each followed by a fence,
        // before its caller may touch them again; so a copy that, after this
        // fence, still sees neither mark copied the bytes it posted. One
        // that sees a mark is discarded: nothing of it is counted or
        // reported, and the caller's buffer holds no delivered byte of it.
        fence(Ordering::SeqCst);
        if self.is_shut() {
            return Err(self.shut_error());
        }
        if ctrl.pull_withdrawn.load(Ordering::Relaxed) == number {
            return Err(self.withdrawn_error());
        }
        if n == 0 {
            return Err(self.peer_wrote(format!(
                "it posted a single-copy transfer whose bytes at {addr:#x} cannot be read"
            )));
        }
        // The kernel copies at most `want <= left` bytes.
        let n = (n as usize).min(want);
        let pulled = self.pulled_total.get() + n as u64;
        self.pulled_total.set(pulled);
        ctrl.pulled.store(pulled, Ordering::Release);
        if n == left {
            self.pull_progress.set(0);
            self.pulls_done.set(self.pulls_done.get() + 1);
        } else {
            self.pull_progress.set(progress + n);
        }
        fence(Ordering::SeqCst);
        if ctrl.writer_waiting.load(Ordering::Relaxed) != 0 {
            self.ring_doorbell();
        }
        Ok(n)
    }

    /// As the reader: whether the writer's single-copy transfer is pending,
    /// refusing a count that cannot be (at most one is pending) and a
    /// transfer posted although we told the writer we cannot read it.
    #[inline]
    pub(super) fn pending(&self, ctrl: &Ctrl) -> Result<bool, TransportError> {
        let posted = ctrl.pull_posted.load(Ordering::Acquire);
        let done = self.pulls_done.get();
        if posted == done {
            return Ok(false);
        }
        if posted != done.wrapping_add(1) {
            return Err(self.peer_wrote(format!(
                "its count of single-copy transfers posted is {posted}, \
                 but {done} were completed and at most one may be pending"
            )));
        }
        if self.source_pid.get() == 0 {
            return Err(self.peer_wrote(
                "it posted a single-copy transfer, but this rank cannot read its memory \
                 and told it so"
                    .into(),
            ));
        }
        Ok(true)
    }
}

impl Drop for ShmLink {
    fn drop(&mut self) {
        if self.posted.get().is_some() {
            // The posted bytes belong to our caller, who may free them once
            // we are gone: the reader must not copy them any more.
            self.map.word(SHUT).store(1, Ordering::Release);
            fence(Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::shm::tests::{expect_closed, expect_protocol, stream};
    use crate::shm::{MIN_CAPACITY, pair};
    use crate::wait;
    use crate::{Endpoint, Link, link::Direction};
    use std::io::IoSliceMut;
    use std::sync::Arc;
    use std::time::Duration;

    /// Whether `a`'s reader may read `a`'s memory (some sandboxes forbid
    /// `process_vm_readv`); a test that needs it says why it skips.
    fn single_copy_here(a: &ShmLink) -> bool {
        if a.may_post() {
            return true;
        }
        let why = a
            .map
            .read_token(SOURCE_OFFSET[a.tx])
            .err()
            .unwrap_or_default();
        eprintln!(
            "skipping: no single copy on this machine ({why}); the ring path is tested alone"
        );
        false
    }

    /// What reads how many bytes the reader `b` got by single copy.
    fn pulled_counter(b: &ShmLink) -> impl Fn() -> u64 + use<> {
        let (map, rx) = (Arc::clone(&b.map), 1 - b.tx);
        move || map.ctrl(rx).pulled.load(Ordering::Acquire)
    }

    #[test]
    fn single_copy_carries_a_stream_with_partial_copies_and_sleeps() {
        // Writes of two buffers of up to 35 KB, reads of up to 50 KB, in a
        // ring of 4 KiB: buffers at the threshold or above go by single
        // copy (often copied in several reads), the others through the
        // ring, interleaved; both sides sleep when blocked.
        for (min, all) in [(1, true), (1000, false), (30_000, false)] {
            let (mut a, b) = pair(0, 1, MIN_CAPACITY).unwrap();
            a.set_single_copy(Some(min));
            if !single_copy_here(&a) {
                return;
            }
            let pulled = pulled_counter(&b);
            stream(Box::new(a), Box::new(b), 3_000_000, 70_001);
            let got = pulled();
            if all {
                assert_eq!(got, 3_000_000, "threshold {min}");
            } else {
                assert!(got > 0 && got < 3_000_000, "threshold {min}: {got}");
            }
        }
    }

    #[test]
    fn a_shut_link_drops_a_posted_transfer_but_delivers_committed_bytes() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        if !single_copy_here(&a) {
            return;
        }
        assert_eq!(a.try_write(&[IoSlice::new(b"done.")]).unwrap(), 5);
        a.commit();
        let big = [7u8; 100];
        // Posted, not copied: nothing is reported written yet.
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 0);
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 0);
        a.shutdown_handle().unwrap().shutdown();
        let mut buf = [0u8; 200];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut buf)]).unwrap(), 5);
        assert_eq!(&buf[..5], b"done.");
        expect_closed(b.try_read(&mut [IoSliceMut::new(&mut buf[5..])]), 0);
        assert!(
            buf[5..].iter().all(|&x| x == 0),
            "abandoned bytes were copied"
        );
        expect_closed(a.try_write(&[IoSlice::new(&big)]), 1);
    }

    #[test]
    fn a_writer_dropped_with_a_posted_transfer_fails_its_reader() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        if !single_copy_here(&a) {
            return;
        }
        let big = vec![7u8; 100];
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 0);
        drop(a);
        drop(big);
        let mut buf = [0u8; 200];
        expect_closed(b.try_read(&mut [IoSliceMut::new(&mut buf)]), 0);
    }

    /// Asserts that a read failed because rank `peer` withdrew its transfer.
    fn expect_withdrawn(r: Result<usize, TransportError>, peer: usize) {
        match r {
            Err(e @ TransportError::Withdrawn { peer: p }) if p == peer => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("rank {peer} withdrew a transfer")),
                    "{msg}"
                );
            }
            other => panic!("expected rank {peer}'s withdrawal, got {other:?}"),
        }
    }

    #[test]
    fn a_withdrawn_transfer_delivers_nothing_copied_after_the_withdrawal() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        if !single_copy_here(&a) {
            return;
        }
        let pulled = pulled_counter(&b);
        let mut big: Vec<u8> = (0..100u8).collect();
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 0);
        let mut got = [0u8; 100];
        assert_eq!(
            b.try_read(&mut [IoSliceMut::new(&mut got[..40])]).unwrap(),
            40
        );
        assert_eq!(got[..40], big[..40]);
        // The writer's call fails: it takes the transfer back (the link
        // stays up) and its caller reuses the buffer.
        a.withdraw();
        big.fill(0xEE);
        expect_withdrawn(b.try_read(&mut [IoSliceMut::new(&mut got[40..])]), 0);
        assert!(
            got[40..].iter().all(|&x| x == 0),
            "bytes were copied after the withdrawal"
        );
        assert_eq!(pulled(), 40, "the 40 bytes copied before it count");
        // It stays that way: the reader fails again, and the writer's
        // stream, which lost the rest of the transfer, takes nothing more.
        expect_withdrawn(b.try_read(&mut [IoSliceMut::new(&mut got[40..])]), 0);
        assert!(a.try_write(&[IoSlice::new(b"more")]).is_err());
        assert!(
            a.arm(Direction::Write).unwrap().is_none(),
            "a writer that withdrew must not sleep before its write fails"
        );
        // Not shut: that is the failure handling's to do, after withdraw.
        assert!(!a.is_shut() && !b.is_shut());
    }

    #[test]
    fn withdrawing_with_nothing_posted_changes_nothing() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        a.withdraw();
        assert_eq!(a.try_write(&[IoSlice::new(b"ring")]).unwrap(), 4);
        a.withdraw();
        let mut got = [0u8; 4];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut got)]).unwrap(), 4);
        assert_eq!(&got, b"ring");
        if !single_copy_here(&a) {
            return;
        }
        // A transfer copied to the end before the withdrawal was written.
        let big = [3u8; 100];
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 0);
        let mut all = [0u8; 100];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut all)]).unwrap(), 100);
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 100);
        a.withdraw();
        assert_eq!(a.try_write(&[IoSlice::new(b"next")]).unwrap(), 4);
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut got)]).unwrap(), 4);
        assert_eq!((&all, &got), (&big, b"next"));
    }

    #[test]
    fn a_copy_racing_a_withdrawal_delivers_only_the_posted_bytes() {
        // The reader copies 16 MiB (milliseconds) while the writer withdraws
        // and overwrites its buffer at some point of it: the reader either
        // finished before (and delivers the posted bytes) or fails.
        const LEN: usize = 16 << 20;
        let (mut failed, mut delivered) = (0, 0);
        for round in 0..8u32 {
            let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
            a.set_single_copy(Some(16));
            if !single_copy_here(&a) {
                return;
            }
            let mut big = vec![0x5Au8; LEN];
            assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 0);
            let (tx, rx) = std::sync::mpsc::channel();
            let reader = std::thread::spawn(move || {
                let mut got = vec![0u8; LEN];
                tx.send(()).unwrap();
                let r = b.try_read(&mut [IoSliceMut::new(&mut got)]);
                (r, got)
            });
            rx.recv().unwrap();
            let t0 = std::time::Instant::now();
            while t0.elapsed() < Duration::from_micros(u64::from(round) * 300) {
                std::hint::spin_loop();
            }
            a.withdraw();
            big.fill(0xEE);
            let (r, got) = reader.join().unwrap();
            match r {
                Ok(n) => {
                    delivered += 1;
                    let wrong = got[..n].iter().filter(|&&x| x != 0x5A).count();
                    assert_eq!(
                        wrong, 0,
                        "round {round}: {wrong} of {n} bytes delivered were overwritten"
                    );
                }
                Err(TransportError::Withdrawn { peer: 0 }) => failed += 1,
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        eprintln!("{failed} reads failed, {delivered} finished before the withdrawal");
    }

    #[test]
    fn a_posted_transfer_is_reported_as_the_reader_copies_it() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        if !single_copy_here(&a) {
            return;
        }
        let pulled = pulled_counter(&b);
        let hdr = *b"hdr";
        let big: Vec<u8> = (0..100u8).collect();
        // The small buffer goes through the ring, the large one is posted.
        let bufs = [IoSlice::new(&hdr), IoSlice::new(&big)];
        assert_eq!(a.try_write(&bufs).unwrap(), 3);
        // A sleeping writer wakes when the reader copies.
        assert!(
            a.arm(Direction::Write).unwrap().is_some(),
            "nothing copied yet"
        );
        a.disarm(Direction::Write);
        let mut got = [0u8; 40];
        assert_eq!(
            b.try_read(&mut [IoSliceMut::new(&mut got[..3])]).unwrap(),
            3
        );
        assert_eq!(&got[..3], b"hdr");
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut got)]).unwrap(), 40);
        assert_eq!(got[..], big[..40]);
        assert_eq!(pulled(), 40);
        assert!(
            a.arm(Direction::Write).unwrap().is_none(),
            "40 bytes copied"
        );
        a.disarm(Direction::Write);
        // Reported only through the rest of the same buffer.
        assert_eq!(a.try_write(&[IoSlice::new(&big[..10])]).unwrap(), 10);
        assert!(matches!(
            a.try_write(&[IoSlice::new(&hdr)]),
            Err(TransportError::Io { .. })
        ));
        assert_eq!(a.try_write(&[IoSlice::new(&big[10..])]).unwrap(), 30);
        assert_eq!(a.try_write(&[IoSlice::new(&big[40..])]).unwrap(), 0);
        let mut rest = [0u8; 100];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut rest)]).unwrap(), 60);
        assert_eq!(rest[..60], big[40..]);
        assert_eq!(a.try_write(&[IoSlice::new(&big[40..])]).unwrap(), 60);
        // Done: the ring carries the next bytes again.
        assert_eq!(a.try_write(&[IoSlice::new(b"after")]).unwrap(), 5);
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut rest)]).unwrap(), 5);
        assert_eq!(&rest[..5], b"after");
        assert_eq!(pulled(), 100);
    }

    #[test]
    fn a_transfer_copied_before_the_reader_left_counts_as_written() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(1));
        if !single_copy_here(&a) {
            return;
        }
        let last = *b"last frame";
        assert_eq!(a.try_write(&[IoSlice::new(&last)]).unwrap(), 0);
        let mut got = [0u8; 10];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut got)]).unwrap(), 10);
        drop(b);
        let r = wait(None, Some(&a), Duration::from_secs(5)).unwrap();
        assert!(r.writable);
        assert_eq!(a.try_write(&[IoSlice::new(&last)]).unwrap(), 10);
        expect_closed(a.try_write(&[IoSlice::new(&last)]), 1);
    }

    #[test]
    fn single_copy_only_while_the_caller_allows_it() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        if !single_copy_here(&a) {
            return;
        }
        let pulled = pulled_counter(&b);
        let big = vec![5u8; 1000];
        let mut got = vec![0u8; 1000];
        a.allow_single_copy(false);
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 1000);
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut got)]).unwrap(), 1000);
        assert_eq!(pulled(), 0);
        a.allow_single_copy(true);
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 0);
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut got)]).unwrap(), 1000);
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 1000);
        assert_eq!((pulled(), &got), (1000, &big));
    }

    #[test]
    fn a_reader_that_cannot_read_the_writer_keeps_the_ring() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        // As if the writer were another process's namesake: the token differs.
        let src = SOURCE_OFFSET[a.tx];
        let token = a.map.word(src + SOURCE_TOKEN);
        token.store(token.load(Ordering::Relaxed) ^ 1, Ordering::Relaxed);
        b.probe();
        a.pullable.set(0);
        assert_eq!(
            a.map.word(src + SOURCE_PULLABLE).load(Ordering::Relaxed),
            PULLABLE_NO
        );
        let pulled = pulled_counter(&b);
        let big = vec![5u8; 1000];
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 1000);
        let mut got = vec![0u8; 1000];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut got)]).unwrap(), 1000);
        assert_eq!(got, big);
        assert_eq!(pulled(), 0);
    }

    #[test]
    fn words_a_side_writes_itself_are_never_loaded_back() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        if !single_copy_here(&a) {
            return;
        }
        let map = Arc::clone(&a.map);
        let ctrl = map.ctrl(0);
        // Rank 1 scribbles over rank 0's head and count of posted transfers.
        ctrl.head.store(u64::MAX - 1, Ordering::Relaxed);
        ctrl.pull_posted.store(u64::MAX, Ordering::Relaxed);
        let big: Vec<u8> = (0..100u8).collect();
        let bufs = [IoSlice::new(b"hdr"), IoSlice::new(&big)];
        assert_eq!(a.try_write(&bufs).unwrap(), 3);
        // Rank 0 scribbles over rank 1's tail and count of bytes copied.
        ctrl.tail.store(u64::MAX - 1, Ordering::Relaxed);
        ctrl.pulled.store(u64::MAX - 1, Ordering::Relaxed);
        let mut got = [0u8; 103];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut got)]).unwrap(), 3);
        assert_eq!(
            b.try_read(&mut [IoSliceMut::new(&mut got[3..])]).unwrap(),
            100
        );
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 100);
        assert_eq!((&got[..3], &got[3..]), (&b"hdr"[..], &big[..]));
    }

    /// Posts a transfer of `len` bytes at `addr` as rank 0 would, at ring
    /// position `at`, as its transfer number `count`.
    fn forge_post(ctrl: &Ctrl, count: u64, at: u64, addr: u64, len: u64) {
        ctrl.pull_at.store(at, Ordering::Relaxed);
        ctrl.pull_addr.store(addr, Ordering::Relaxed);
        ctrl.pull_len.store(len, Ordering::Relaxed);
        ctrl.pull_posted.store(count, Ordering::Release);
    }

    #[test]
    fn a_forged_single_copy_post_fails_the_reader_naming_the_writer() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        let map = Arc::clone(&a.map);
        let ctrl = map.ctrl(0);
        let mine = [0u8; 100];
        let addr = mine.as_ptr() as u64;
        let mut buf = [0u8; 64];
        let mut read = |b: &mut ShmLink| b.try_read(&mut [IoSliceMut::new(&mut buf)]);
        // Posted although rank 1 found that it cannot read rank 0's memory
        // (as if its probe had failed).
        b.source_pid.set(0);
        forge_post(ctrl, 1, 0, addr, 100);
        expect_protocol(read(&mut b), 0, &["rank 0", "single-copy", "cannot read"]);
        // From here on, as if the probe had succeeded: no copy is attempted
        // before the checks anyway.
        b.source_pid.set(std::process::id() as i32);
        // More than one pending, or a count that went back.
        forge_post(ctrl, 2, 0, addr, 100);
        expect_protocol(read(&mut b), 0, &["single-copy transfer", "2"]);
        forge_post(ctrl, u64::MAX, 0, addr, 100);
        expect_protocol(read(&mut b), 0, &["single-copy transfer"]);
        // Empty.
        forge_post(ctrl, 1, 0, addr, 0);
        expect_protocol(read(&mut b), 0, &["empty single-copy transfer"]);
        // Past the end of the address space.
        forge_post(ctrl, 1, 0, u64::MAX - 10, 100);
        expect_protocol(read(&mut b), 0, &["single-copy", "address space"]);
        // Anchored elsewhere than where the ring's bytes end.
        forge_post(ctrl, 0, 0, 0, 0);
        assert_eq!(a.try_write(&[IoSlice::new(b"0123456789")]).unwrap(), 10);
        forge_post(ctrl, 1, 3, addr, 100);
        expect_protocol(
            read(&mut b),
            0,
            &["single-copy", "ring position 3", "head is 10"],
        );
        forge_post(ctrl, 1, u64::MAX, addr, 100);
        expect_protocol(read(&mut b), 0, &["single-copy", "ring position"]);
    }

    #[test]
    fn a_pending_transfer_changed_under_the_reader_fails_it() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        if !single_copy_here(&a) {
            return;
        }
        let map = Arc::clone(&a.map);
        let ctrl = map.ctrl(0);
        let big: Vec<u8> = (0..100u8).collect();
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 0);
        let mut got = [0u8; 100];
        assert_eq!(
            b.try_read(&mut [IoSliceMut::new(&mut got[..40])]).unwrap(),
            40
        );
        // Its address moved to where the rest wraps around.
        let addr = ctrl.pull_addr.load(Ordering::Relaxed);
        ctrl.pull_addr.store(u64::MAX - 10, Ordering::Relaxed);
        expect_protocol(
            b.try_read(&mut [IoSliceMut::new(&mut got[40..])]),
            0,
            &["single-copy", "address space"],
        );
        // Its length shrank below what was copied.
        ctrl.pull_addr.store(addr, Ordering::Relaxed);
        ctrl.pull_len.store(30, Ordering::Relaxed);
        expect_protocol(
            b.try_read(&mut [IoSliceMut::new(&mut got[40..])]),
            0,
            &["single-copy", "30 bytes", "40"],
        );
        // An address the kernel refuses is an error too, not a crash.
        ctrl.pull_len.store(100, Ordering::Relaxed);
        ctrl.pull_addr.store(8, Ordering::Relaxed);
        assert!(b.try_read(&mut [IoSliceMut::new(&mut got[40..])]).is_err());
    }

    #[test]
    fn single_copy_progress_out_of_place_fails_the_writer_naming_the_reader() {
        let (mut a, mut b) = pair(0, 1, MIN_CAPACITY).unwrap();
        a.set_single_copy(Some(16));
        if !single_copy_here(&a) {
            return;
        }
        let map = Arc::clone(&b.map);
        let ctrl = map.ctrl(0);
        let big: Vec<u8> = (0..100u8).collect();
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 0);
        // More copied than was posted.
        ctrl.pulled.store(500, Ordering::Release);
        expect_protocol(
            a.try_write(&[IoSlice::new(&big)]),
            1,
            &["rank 1", "single-copy", "500"],
        );
        // Gone back.
        ctrl.pulled.store(0, Ordering::Release);
        let mut got = [0u8; 40];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut got)]).unwrap(), 40);
        assert_eq!(a.try_write(&[IoSlice::new(&big)]).unwrap(), 40);
        ctrl.pulled.store(10, Ordering::Release);
        expect_protocol(
            a.try_write(&[IoSlice::new(&big[40..])]),
            1,
            &["single-copy", "10"],
        );
        ctrl.pulled.store(u64::MAX, Ordering::Release);
        expect_protocol(
            a.try_write(&[IoSlice::new(&big[40..])]),
            1,
            &["single-copy"],
        );
    }
}
