//! The failure protocol: how a failed call becomes an error that names the
//! rank where the failure started, and how the other ranks learn of it.
//!
//! * **Report.** A rank that fails writes a [`Report`] (the origin rank and
//!   its cause) under its own key in the rendezvous store, then closes its
//!   links, so a neighbour that sees them close finds the cause waiting.
//! * **Attribute.** A rank whose neighbour closed reads that neighbour's
//!   report: the error names the origin and who passed it on. A rank that
//!   timed out reports its own cause first, then gives the rank it waited
//!   on a grace to report one (that rank is often waiting on the one really
//!   stuck), so every rank names the stuck one.
//! * **Follow.** A rank that timed out reports whom it waited on, so a
//!   rank that waited on it follows the chain of waits to the rank at its
//!   end, which reported nothing: the stuck one.
//! * **Without the store.** Every wait on the store in this protocol gives
//!   up after the grace (half of `OXCCL_TIMEOUT`, at most 5 s), never the
//!   store client's own 30 s. When the store is oxccl's TCP store, rank 0
//!   serves it, so a store that is gone (or does not answer) while a
//!   neighbour closed without a report, or while this rank waited, means
//!   rank 0's process is gone (or stopped): the error names rank 0. A rank
//!   0 that failed by itself keeps serving the reports, when its
//!   communicator is dropped, until every other rank but one has reported
//!   (at most the grace; see [`Failures::linger`]), so that this inference
//!   never blames a rank 0 that only passed a failure on.
//! * **Poison** is the communicator's: after a failure, later calls fail at
//!   once with the original cause.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use oxccl_transport::TransportError;
use oxccl_transport::codec::{DecodeError, Prefix, Reader, Writer};
use oxccl_transport::store::Store;

use crate::Error;
use crate::descriptor::Descriptor;
use crate::engine::EngineError;

/// One rank's failure report: where the failure started, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Report {
    pub origin: usize,
    /// The rank the origin waited on when it timed out: a suspect, whose
    /// own report (or silence) says more.
    pub waited_on: Option<usize>,
    /// The rank's last word: its call's error is decided. A timed-out
    /// rank's first report is not (it is still following the waits).
    pub settled: bool,
    pub cause: String,
}

/// The longest cause a report carries.
pub(crate) const MAX_CAUSE: usize = 64 << 10;

impl Report {
    pub(crate) const FORMAT: &'static str = "failure report";

    /// `origin: u64`, `waited_on: u64` (`u64::MAX`: none), `settled: u8`
    /// (0 or 1), then the cause
    /// as UTF-8 with a `u32` length (cut at [`MAX_CAUSE`] bytes, on a
    /// character boundary).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut end = self.cause.len().min(MAX_CAUSE);
        while !self.cause.is_char_boundary(end) {
            end -= 1;
        }
        let mut w = Writer::new();
        w.u64(self.origin as u64)
            .u64(self.waited_on.map_or(u64::MAX, |r| r as u64))
            .u8(u8::from(self.settled))
            .str_prefixed(Prefix::U32, &self.cause[..end])
            .map(|w| w.as_bytes().to_vec())
            .unwrap_or_default()
    }

    pub(crate) fn parse(bytes: &[u8]) -> Result<Report, DecodeError> {
        let mut r = Reader::new(Self::FORMAT, bytes);
        let origin = r.u64_usize("origin")?;
        let waited_on = match r.u64("waited_on")? {
            u64::MAX => None,
            w => Some(usize::try_from(w).map_err(|_| DecodeError::Invalid {
                format: Self::FORMAT,
                field: "waited_on",
                why: format!("{w} is not a rank"),
            })?),
        };
        let settled = match r.u8("settled")? {
            0 => false,
            1 => true,
            v => {
                return Err(DecodeError::Invalid {
                    format: Self::FORMAT,
                    field: "settled",
                    why: format!("{v} is not 0 or 1"),
                });
            }
        };
        let cause = r.str_prefixed("cause", Prefix::U32, MAX_CAUSE)?.to_string();
        r.finish()?;
        Ok(Report {
            origin,
            waited_on,
            settled,
            cause,
        })
    }
}

/// The failure protocol of one rank of a communicator.
#[derive(Debug)]
pub(crate) struct Failures {
    rank: usize,
    world: usize,
    store: Arc<dyn Store>,
    key_prefix: String,
    timeout: Duration,
    /// The rank whose process serves the store, when it is one of this
    /// communicator's (oxccl's TCP store: rank 0).
    store_host: Option<usize>,
    /// The rank this one last timed out waiting on (`usize::MAX`: none).
    waited_on: AtomicUsize,
}

/// What became of a wait for a rank's report.
enum Awaited {
    Report(Vec<u8>),
    /// None within the grace, from a store that answered.
    Silent,
    /// The store failed or did not answer.
    StoreGone(String),
}

impl Failures {
    pub(crate) fn new(
        rank: usize,
        world: usize,
        store: Arc<dyn Store>,
        key_prefix: String,
        timeout: Duration,
        store_host: Option<usize>,
    ) -> Failures {
        Failures {
            rank,
            world,
            store,
            key_prefix,
            timeout,
            store_host,
            waited_on: AtomicUsize::new(usize::MAX),
        }
    }

    fn key(&self, rank: usize) -> String {
        format!("{}/abort/{rank}", self.key_prefix)
    }

    /// How long a failing rank waits for another's report, and the longest
    /// any request of this protocol waits for the store: half the timeout,
    /// at most 5 s.
    fn grace(&self) -> Duration {
        (self.timeout / 2).min(Duration::from_secs(5))
    }

    /// The rank serving the store, when it is gone and it is neither this
    /// rank nor `peer` (which the caller names anyway).
    fn host_other_than(&self, peer: usize) -> Option<usize> {
        self.store_host
            .filter(|&h| h != self.rank && h != peer && h < self.world)
    }

    /// The error naming the store's host, `host`, gone or stopped: `what`
    /// says what this rank saw that its report would have explained.
    fn host_gone(&self, call: String, host: usize, store_err: &str, what: String) -> Error {
        Error::Remote {
            rank: self.rank,
            call,
            origin: host,
            reporter: None,
            cause: format!(
                "the rendezvous store that rank {host} serves ({}) is gone or does not answer \
                 ({store_err}): its process exited, was killed or is stopped; {what}",
                self.store.describe()
            ),
        }
    }

    /// Turns an engine failure of `call` into its error, naming the origin.
    pub(crate) fn attribute(&self, call: String, e: EngineError, aborted_here: bool) -> Error {
        let rank = self.rank;
        match e {
            _ if aborted_here => {
                Error::InvalidUsage(format!("rank {rank}: {call}: aborted by the application"))
            }
            EngineError::Transport(TransportError::PeerClosed { peer, how }) => {
                match self.store.try_get_within(&self.key(peer), self.grace()) {
                    Ok(Some(bytes)) => self.remote(call, peer, &bytes),
                    other => {
                        let store_note = match other {
                            Err(store_err) => {
                                if let Some(host) = self.host_other_than(peer) {
                                    return self.host_gone(
                                        call,
                                        host,
                                        &store_err.to_string(),
                                        format!(
                                            "rank {peer} closed its connection ({how}) without a report \
                                             it could leave there"
                                        ),
                                    );
                                }
                                format!(
                                    " (the rendezvous store at {} is unreachable too)",
                                    self.store.describe()
                                )
                            }
                            _ => String::new(),
                        };
                        Error::Remote {
                            rank,
                            call,
                            origin: peer,
                            reporter: None,
                            cause: format!(
                                "it closed its connection ({how}) without reporting an error: it exited, crashed or was killed{store_note}"
                            ),
                        }
                    }
                }
            }
            EngineError::Transport(TransportError::Withdrawn { peer }) => {
                // The peer is alive, and its call failed mid-frame: it
                // withdrew the frame before reporting why, so its report
                // may be on its way.
                let silent = |call| Error::Remote {
                    rank,
                    call,
                    origin: peer,
                    reporter: None,
                    cause: "it withdrew a transfer mid-frame: its call failed, \
                            and it reported no cause (a panic?)"
                        .into(),
                };
                match self.await_report(peer, Instant::now() + self.grace()) {
                    Awaited::Report(bytes) => self.remote(call, peer, &bytes),
                    Awaited::Silent => silent(call),
                    // The store went with its host: the peer's call most
                    // likely failed because that host died (seen in a chaos
                    // run: rank 0 SIGKILLed, rank 1 withdrew mid-frame, and
                    // rank 2 named rank 1).
                    Awaited::StoreGone(store_err) => match self.host_other_than(peer) {
                        Some(host) => self.host_gone(
                            call,
                            host,
                            &store_err,
                            format!(
                                "rank {peer} withdrew a transfer mid-frame (its call failed) \
                                 and could leave no report there"
                            ),
                        ),
                        None => silent(call),
                    },
                }
            }
            EngineError::Transport(source) => Error::Transport { rank, call, source },
            EngineError::Timeout { what, waited, peer } => {
                // Our own cause first, for the ranks that wait on us and are
                // about to look for it.
                let own = Error::Timeout {
                    rank,
                    call: call.clone(),
                    what,
                    waited,
                };
                self.waited_on.store(peer, Ordering::Relaxed);
                self.report(&Report {
                    origin: rank,
                    waited_on: Some(peer),
                    settled: false,
                    cause: own.to_string(),
                });
                self.follow_waits(call, peer, own)
            }
            EngineError::Mismatch {
                peer,
                descriptor,
                seq,
            } => Error::Mismatch {
                rank,
                call,
                peer,
                theirs: match Descriptor::parse(&descriptor) {
                    Ok(t) => t.call(seq),
                    Err(e) => format!("an unreadable call #{seq} ({e})"),
                },
            },
            EngineError::Protocol { peer, reason } => Error::Transport {
                rank,
                call,
                source: TransportError::Protocol { peer, reason },
            },
            EngineError::Kernel(source) => Error::Kernel { rank, call, source },
        }
    }

    /// After timing out waiting on `peer`: follows the chain of waits that
    /// the reports describe (the rank waited on timed out too, waiting on
    /// another, ...) to the first rank with a real cause, or to the rank
    /// at its end that reported nothing within the grace: the stuck one.
    /// `own` is this rank's timeout, the answer when `peer` itself is silent.
    fn follow_waits(&self, call: String, peer: usize, own: Error) -> Error {
        let until = Instant::now() + self.grace();
        let mut seen = vec![self.rank];
        let (mut at, mut via) = (peer, None::<(usize, String)>);
        loop {
            seen.push(at);
            match self.await_report(at, until) {
                Awaited::Report(bytes) => match Report::parse(&bytes) {
                    // `at` timed out too, waiting on a rank not yet seen:
                    // the suspect is further along.
                    Ok(Report {
                        waited_on: Some(next),
                        cause,
                        ..
                    }) if next < self.world && !seen.contains(&next) => {
                        via = Some((at, cause));
                        at = next;
                    }
                    // A real cause (or a wait back to a rank seen: a
                    // cycle, where `at`'s own word is the best there is).
                    _ => return self.remote(call, at, &bytes),
                },
                Awaited::Silent => {
                    return match via {
                        None => own,
                        Some((reporter, cause)) => Error::Remote {
                            rank: self.rank,
                            call,
                            origin: at,
                            reporter: Some(reporter),
                            cause: format!(
                                "it made no progress and reported nothing within {:.1?}: {cause}",
                                self.grace()
                            ),
                        },
                    };
                }
                Awaited::StoreGone(store_err) => {
                    return match self.host_other_than(at) {
                        Some(host) if via.is_none() => self.host_gone(
                            call,
                            host,
                            &store_err,
                            format!("this rank waited on rank {peer}: {own}"),
                        ),
                        _ => match via {
                            None => own,
                            Some((reporter, cause)) => Error::Remote {
                                rank: self.rank,
                                call,
                                origin: at,
                                reporter: Some(reporter),
                                cause,
                            },
                        },
                    };
                }
            }
        }
    }

    /// The error of a call that failed because `peer` reported `bytes`.
    fn remote(&self, call: String, peer: usize, bytes: &[u8]) -> Error {
        let r = Report::parse(bytes).unwrap_or_else(|e| Report {
            origin: peer,
            waited_on: None,
            settled: true,
            cause: format!("an unreadable report ({e})"),
        });
        Error::Remote {
            rank: self.rank,
            call,
            origin: r.origin,
            reporter: Some(peer),
            cause: r.cause,
        }
    }

    /// Tells the other ranks what `err` says: its origin and cause.
    pub(crate) fn publish(&self, err: &Error) {
        let rank = self.rank;
        let report = match err {
            Error::Remote { origin, cause, .. } => Report {
                origin: *origin,
                waited_on: None,
                settled: true,
                cause: cause.clone(),
            },
            Error::Mismatch {
                call, peer, theirs, ..
            } => Report {
                origin: rank,
                waited_on: None,
                settled: true,
                cause: format!(
                    "collective mismatch: rank {rank} called {call} but rank {peer} called {theirs}"
                ),
            },
            // This rank's own timeout is its last word: the rank it waited
            // on, for the ranks that follow the waits, is kept.
            Error::Timeout { .. } => Report {
                origin: rank,
                waited_on: match self.waited_on.load(Ordering::Relaxed) {
                    usize::MAX => None,
                    w => Some(w),
                },
                settled: true,
                cause: err.to_string(),
            },
            other => Report {
                origin: rank,
                waited_on: None,
                settled: true,
                cause: other.to_string(),
            },
        };
        self.report(&report);
    }

    fn report(&self, report: &Report) {
        if let Err(store_err) =
            self.store
                .set_within(&self.key(self.rank), &report.encode(), self.grace())
        {
            tracing::warn!(
                "rank {}: could not report the failure to the store: {store_err}",
                self.rank
            );
        }
    }

    /// `peer`'s report, if it makes one before `until`.
    fn await_report(&self, peer: usize, until: Instant) -> Awaited {
        let key = self.key(peer);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self
                .store
                .try_get_within(&key, left.max(Duration::from_millis(100)))
            {
                Ok(Some(report)) => return Awaited::Report(report),
                Ok(None) if !left.is_zero() => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => return Awaited::Silent,
                Err(e) => return Awaited::StoreGone(e.to_string()),
            }
        }
    }

    /// On the rank that serves the store, after a failure: waits until
    /// every other rank but one (the one that died or hung, which never
    /// reports) has settled its report (its call's error is decided, so it
    /// reads no more reports), at most the grace, so that the others can
    /// still read the reports they need to name the origin.
    /// The rank this one last timed out waiting on, if any.
    pub(crate) fn waited_on(&self) -> Option<usize> {
        match self.waited_on.load(Ordering::Relaxed) {
            usize::MAX => None,
            w => Some(w),
        }
    }

    pub(crate) fn linger(&self) {
        if self.store_host != Some(self.rank) || self.world < 2 {
            return;
        }
        let until = Instant::now() + self.grace();
        loop {
            let mut reported = 0;
            for r in 0..self.world {
                match self.store.try_get_within(&self.key(r), self.grace()) {
                    Ok(Some(bytes)) => {
                        if Report::parse(&bytes).is_ok_and(|r| r.settled) {
                            reported += 1;
                        }
                    }
                    Ok(None) => {}
                    Err(_) => return,
                }
            }
            if reported + 1 >= self.world || Instant::now() >= until {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use oxccl_transport::store::MemStore;

    use super::*;

    fn failures(rank: usize, store: &Arc<dyn Store>) -> Failures {
        Failures::new(
            rank,
            4,
            store.clone(),
            "job".into(),
            Duration::from_millis(100),
            None,
        )
    }

    /// A store whose server is gone: every request fails.
    #[derive(Debug)]
    struct GoneStore;

    impl Store for GoneStore {
        fn set(&self, _: &str, _: &[u8]) -> Result<(), oxccl_transport::store::StoreError> {
            Err(gone())
        }
        fn get(&self, _: &str, _: Instant) -> Result<Vec<u8>, oxccl_transport::store::StoreError> {
            Err(gone())
        }
        fn try_get(&self, _: &str) -> Result<Option<Vec<u8>>, oxccl_transport::store::StoreError> {
            Err(gone())
        }
        fn add(&self, _: &str, _: i64) -> Result<i64, oxccl_transport::store::StoreError> {
            Err(gone())
        }
        fn describe(&self) -> String {
            "a gone store".into()
        }
    }

    fn gone() -> oxccl_transport::store::StoreError {
        oxccl_transport::store::StoreError::Closed {
            store: "a gone store".into(),
            detail: "connection reset".into(),
        }
    }

    fn closed(peer: usize) -> EngineError {
        EngineError::Transport(TransportError::PeerClosed {
            peer,
            how: "end of stream".into(),
        })
    }

    fn timeout(peer: usize) -> EngineError {
        EngineError::Timeout {
            peer,
            what: format!("data from rank {peer}"),
            waited: Duration::from_millis(100),
        }
    }

    #[test]
    fn a_timed_out_rank_follows_the_waits_to_the_silent_rank() {
        // Rank 2 is stuck; rank 3 waited on it, rank 0 on rank 3, rank 1 on
        // rank 0: every one of them names rank 2, within the grace.
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let t0 = Instant::now();
        let e3 = failures(3, &store).attribute("c".into(), timeout(2), false);
        assert!(matches!(e3, Error::Timeout { .. }), "{e3}");
        for (rank, waited_on) in [(0, 3), (1, 0)] {
            let e = failures(rank, &store).attribute("c".into(), timeout(waited_on), false);
            match e {
                Error::Remote {
                    origin: 2,
                    reporter: Some(3),
                    ref cause,
                    ..
                } => assert!(cause.contains("reported nothing"), "{cause}"),
                other => panic!("rank {rank}: {other}"),
            }
        }
        // Three graces of 50 ms, one after the other.
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    #[test]
    fn the_store_host_lingers_until_every_other_rank_but_one_settled() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let at = |rank| {
            Failures::new(
                rank,
                4,
                store.clone(),
                "job".into(),
                Duration::from_millis(400),
                Some(0),
            )
        };
        // Ranks 0 and 3 settled; rank 2 timed out and still follows the
        // waits (its report is not settled): rank 0 serves it the grace.
        at(0).publish(&Error::Internal("x".into()));
        at(3).publish(&Error::Internal("y".into()));
        let r2 = at(2);
        let _ = r2.attribute("c".into(), timeout(1), false);
        // (That took rank 2 the grace: rank 1 never reports. Its report
        // is settled now; take it back to the provisional one.)
        r2.report(&Report {
            origin: 2,
            waited_on: Some(1),
            settled: false,
            cause: "no progress".into(),
        });
        let t = Instant::now();
        at(0).linger();
        assert!(
            t.elapsed() >= Duration::from_millis(190),
            "{:?}",
            t.elapsed()
        );
        // Rank 2 settles while rank 0 lingers: rank 0 stops at once.
        let settle = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            r2.publish(&Error::Internal("z".into()));
        });
        let t = Instant::now();
        at(0).linger();
        settle.join().unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(190),
            "{:?}",
            t.elapsed()
        );
        // A rank that does not serve the store never waits.
        let t = Instant::now();
        at(1).linger();
        assert!(t.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn a_gone_store_that_rank_0_served_names_rank_0() {
        let store: Arc<dyn Store> = Arc::new(GoneStore);
        let with_host = |rank| {
            Failures::new(
                rank,
                4,
                store.clone(),
                "job".into(),
                Duration::from_millis(100),
                Some(0),
            )
        };
        // Rank 2's neighbour closed without a report it could leave: rank
        // 0, which served the store, is gone.
        // Also when the neighbour withdrew a frame mid-way (its call
        // failed because rank 0 died): a chaos run's rank 2 named rank 1.
        let withdrawn = EngineError::Transport(TransportError::Withdrawn { peer: 1 });
        for e in [
            with_host(2).attribute("c".into(), closed(1), false),
            with_host(2).attribute("c".into(), timeout(1), false),
            with_host(2).attribute("c".into(), withdrawn, false),
        ] {
            match e {
                Error::Remote {
                    origin: 0,
                    reporter: None,
                    ref cause,
                    ..
                } => assert!(cause.contains("rank 0 serves"), "{cause}"),
                other => panic!("{other}"),
            }
        }
        // The neighbour is rank 0 itself: named as before.
        let e = with_host(1).attribute("c".into(), closed(0), false);
        assert!(
            matches!(e, Error::Remote { origin: 0, .. }) && e.to_string().contains("unreachable"),
            "{e}"
        );
        // A store of no rank of this world: the neighbour, as before.
        let e = Failures::new(
            2,
            4,
            store.clone(),
            "job".into(),
            Duration::from_millis(100),
            None,
        )
        .attribute("c".into(), closed(1), false);
        assert!(matches!(e, Error::Remote { origin: 1, .. }), "{e}");
    }

    #[test]
    fn reports_round_trip_and_garbage_is_refused() {
        let r = Report {
            origin: 3,
            waited_on: None,
            settled: true,
            cause: "it died\nwith two lines".into(),
        };
        assert_eq!(Report::parse(&r.encode()).unwrap(), r);
        let w = Report {
            waited_on: Some(2),
            settled: false,
            ..r
        };
        assert_eq!(Report::parse(&w.encode()).unwrap(), w);
        let mut long = Report {
            origin: 1,
            waited_on: None,
            settled: true,
            cause: "é".repeat(MAX_CAUSE),
        };
        let cut = Report::parse(&long.encode()).unwrap();
        assert!(cut.cause.len() <= MAX_CAUSE && long.cause.starts_with(&cut.cause));
        long.cause.truncate(10);
        let mut bytes = long.encode();
        bytes.push(0);
        for bad in [&b""[..], b"3", &bytes] {
            assert!(Report::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_closed_neighbour_is_named_through_its_report() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let (r1, r2) = (failures(1, &store), failures(2, &store));
        let closed = |peer| {
            EngineError::Transport(TransportError::PeerClosed {
                peer,
                how: "end of stream".into(),
            })
        };
        // Without a report: the neighbour itself, "without reporting an error".
        let e = r2.attribute("all_reduce #0".into(), closed(1), false);
        assert!(e.to_string().contains("without reporting an error"), "{e}");
        // Rank 1 learned that rank 0 failed and passed it on.
        r1.publish(&Error::Remote {
            rank: 1,
            call: "all_reduce #0".into(),
            origin: 0,
            reporter: None,
            cause: "out of memory".into(),
        });
        let e = r2.attribute("all_reduce #0".into(), closed(1), false);
        match e {
            Error::Remote {
                origin: 0,
                reporter: Some(1),
                ref cause,
                ..
            } => assert_eq!(cause, "out of memory"),
            other => panic!("{other:?}"),
        }
        // An application's abort is not blamed on anyone.
        let e = r2.attribute("x".into(), closed(1), true);
        assert!(e.to_string().contains("aborted by the application"), "{e}");
    }

    #[test]
    fn a_withdrawn_transfer_is_blamed_on_its_writer_through_its_report() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let (r0, r1) = (failures(0, &store), failures(1, &store));
        let withdrawn = || EngineError::Transport(TransportError::Withdrawn { peer: 0 });
        // No report within the grace: rank 0 itself, and what it did.
        let e = r1.attribute("c".into(), withdrawn(), false);
        match e {
            Error::Remote {
                origin: 0,
                reporter: None,
                ref cause,
                ..
            } => assert!(cause.contains("withdrew a transfer"), "{cause}"),
            other => panic!("{other:?}"),
        }
        // Rank 0 reports while rank 1 waits for it (a grace of 2 s): its cause.
        let patient = Failures::new(
            1,
            4,
            store.clone(),
            "job".into(),
            Duration::from_secs(4),
            None,
        );
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            r0.publish(&Error::Internal("a reducer bug".into()));
        });
        let e = patient.attribute("c".into(), withdrawn(), false);
        t.join().unwrap();
        match e {
            Error::Remote {
                origin: 0,
                reporter: Some(0),
                ref cause,
                ..
            } => assert!(cause.contains("a reducer bug"), "{cause}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_timed_out_rank_reports_first_and_follows_the_rank_it_waited_on() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let (r0, r1) = (failures(0, &store), failures(1, &store));
        let timeout = |peer| EngineError::Timeout {
            peer,
            what: format!("data from rank {peer}"),
            waited: Duration::from_millis(100),
        };
        // Rank 1 waited on rank 2, which never reports: its own timeout.
        let e1 = r1.attribute("c".into(), timeout(2), false);
        assert!(matches!(e1, Error::Timeout { .. }), "{e1}");
        // Rank 0 waited on rank 1, which reported that it waited on rank 2,
        // which reported nothing: rank 2, as rank 1 reported it.
        let e0 = r0.attribute("c".into(), timeout(1), false);
        match e0 {
            Error::Remote {
                origin: 2,
                reporter: Some(1),
                ref cause,
                ..
            } => assert!(cause.contains("data from rank 2"), "{cause}"),
            other => panic!("{other:?}"),
        }
    }
}
