//! Helpers for the tests of the shared-memory modules, and the tests of a
//! whole link made by [`pair`].

use std::io::{IoSlice, IoSliceMut};
use std::time::Duration;

use super::{MIN_CAPACITY, pair};
use crate::{Endpoint, Link, TransportError, wait};

/// Asserts that a transfer failed because rank `peer` went away.
pub(super) fn expect_closed(r: Result<usize, TransportError>, peer: usize) {
    match r {
        Err(TransportError::PeerClosed { peer: p, .. }) if p == peer => {}
        other => panic!("expected PeerClosed from rank {peer}, got {other:?}"),
    }
}

/// Pushes `total` bytes of a counting pattern from `a` to `b` on two
/// threads, in odd-sized pieces, sleeping in `wait` when blocked.
/// Streams `total` bytes from `a` to `b` in pieces of varying size up to
/// `max_piece` (writes) and 5/7 of it (reads), and checks every byte.
pub(super) fn stream(mut a: Box<dyn Link>, mut b: Box<dyn Link>, total: usize, max_piece: usize) {
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let mut done = 0;
        let mut piece = 1;
        while done < total {
            let end = (done + piece).min(total);
            let half = done + (end - done) / 2;
            let n = a
                .try_write(&[
                    IoSlice::new(&data[done..half]),
                    IoSlice::new(&data[half..end]),
                ])
                .unwrap();
            done += n;
            if n == 0 {
                wait(None, Some(&*a), Duration::from_secs(10)).unwrap();
            }
            piece = piece * 3 % max_piece + 1;
        }
        a
    });
    let mut got = vec![0u8; total];
    let mut done = 0;
    let mut piece = 7;
    while done < total {
        let end = (done + piece).min(total);
        let n = b
            .try_read(&mut [IoSliceMut::new(&mut got[done..end])])
            .unwrap();
        done += n;
        if n == 0 {
            wait(Some(&*b), None, Duration::from_secs(10)).unwrap();
        }
        piece = piece * 5 % (max_piece / 7 * 5) + 1;
    }
    let _a = writer.join().unwrap();
    for (i, &v) in got.iter().enumerate() {
        assert_eq!(v, (i % 251) as u8, "byte {i}");
    }
}

/// Asserts that a transfer failed because rank `peer` wrote an
/// impossible value into the segment, and that the message says `words`.
pub(super) fn expect_protocol(r: Result<usize, TransportError>, peer: usize, words: &[&str]) {
    match r {
        Err(e @ TransportError::Protocol { peer: p, .. }) if p == peer => {
            let msg = e.to_string();
            for w in words {
                assert!(msg.contains(w), "{msg:?} does not say {w:?}");
            }
        }
        other => panic!("expected a protocol error from rank {peer}, got {other:?}"),
    }
}

#[test]
fn in_process_pair_carries_a_stream_across_wraps() {
    let (a, b) = pair(0, 1, MIN_CAPACITY).unwrap();
    assert_eq!(a.peer(), 1);
    assert_eq!(b.peer(), 0);
    stream(Box::new(a), Box::new(b), 3_000_000, 70_001);
    let (a, b) = pair(0, 1, MIN_CAPACITY).unwrap();
    // The other direction of the same kind of segment.
    stream(Box::new(b), Box::new(a), 1_000_000, 70_001);
}

/// The words of a segment that a peer writes and this side loads, by
/// number (for [`ShmLink::scribble`]): direction 0's control words first,
/// then direction 1's, then the shutdown mark and both sides' probe words.
pub(crate) const PEER_WORDS: usize = 2 * 9 + 1 + 2 * 4;

impl super::ShmLink {
    /// Stores `value` in the segment's peer-written word number `word`
    /// (modulo [`PEER_WORDS`]), as a faulty or hostile peer process could.
    pub(crate) fn scribble(&self, word: usize, value: u64) {
        use super::segment::{SHUT, SOURCE_OFFSET};
        use std::sync::atomic::Ordering::Release;
        let word = word % PEER_WORDS;
        if word < 18 {
            let c = self.map.ctrl(word / 9);
            let w = match word % 9 {
                0 => &c.head,
                1 => &c.committed,
                2 => &c.pull_posted,
                3 => &c.pull_at,
                4 => &c.pull_addr,
                5 => &c.pull_len,
                6 => &c.pull_withdrawn,
                7 => &c.tail,
                _ => &c.pulled,
            };
            w.store(value, Release);
        } else if word == 18 {
            self.map.word(SHUT).store(value, Release);
        } else {
            let k = word - 19;
            self.map
                .word(SOURCE_OFFSET[k / 4] + 8 * (k % 4))
                .store(value, Release);
        }
    }
}
