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
//! * **Poison** is the communicator's: after a failure, later calls fail at
//!   once with the original cause.

use std::sync::Arc;
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
    pub cause: String,
}

/// The longest cause a report carries.
pub(crate) const MAX_CAUSE: usize = 64 << 10;

impl Report {
    pub(crate) const FORMAT: &'static str = "failure report";

    /// `origin: u64`, then the cause as UTF-8 with a `u32` length (cut at
    /// [`MAX_CAUSE`] bytes, on a character boundary).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut end = self.cause.len().min(MAX_CAUSE);
        while !self.cause.is_char_boundary(end) {
            end -= 1;
        }
        let mut w = Writer::new();
        w.u64(self.origin as u64)
            .str_prefixed(Prefix::U32, &self.cause[..end])
            .map(|w| w.as_bytes().to_vec())
            .unwrap_or_default()
    }

    pub(crate) fn parse(bytes: &[u8]) -> Result<Report, DecodeError> {
        let mut r = Reader::new(Self::FORMAT, bytes);
        let origin = r.u64_usize("origin")?;
        let cause = r.str_prefixed("cause", Prefix::U32, MAX_CAUSE)?.to_string();
        r.finish()?;
        Ok(Report { origin, cause })
    }
}

/// The failure protocol of one rank of a communicator.
#[derive(Debug)]
pub(crate) struct Failures {
    rank: usize,
    store: Arc<dyn Store>,
    key_prefix: String,
    timeout: Duration,
}

impl Failures {
    pub(crate) fn new(
        rank: usize,
        store: Arc<dyn Store>,
        key_prefix: String,
        timeout: Duration,
    ) -> Failures {
        Failures {
            rank,
            store,
            key_prefix,
            timeout,
        }
    }

    fn key(&self, rank: usize) -> String {
        format!("{}/abort/{rank}", self.key_prefix)
    }

    /// Turns an engine failure of `call` into its error, naming the origin.
    pub(crate) fn attribute(&self, call: String, e: EngineError, aborted_here: bool) -> Error {
        let rank = self.rank;
        match e {
            _ if aborted_here => {
                Error::InvalidUsage(format!("rank {rank}: {call}: aborted by the application"))
            }
            EngineError::Transport(TransportError::PeerClosed { peer, how }) => {
                match self.store.try_get(&self.key(peer)) {
                    Ok(Some(bytes)) => self.remote(call, peer, &bytes),
                    other => {
                        let store_note = match other {
                            Err(_) => format!(
                                " (the rendezvous store at {} is unreachable too)",
                                self.store.describe()
                            ),
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
                match self.await_report(peer) {
                    Some(bytes) => self.remote(call, peer, &bytes),
                    None => Error::Remote {
                        rank,
                        call,
                        origin: peer,
                        reporter: None,
                        cause: "it withdrew a transfer mid-frame: its call failed, \
                                and it reported no cause (a panic?)"
                            .into(),
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
                self.report(&Report {
                    origin: rank,
                    cause: own.to_string(),
                });
                match self.await_report(peer) {
                    // The rank we waited for failed first (often: it timed out
                    // waiting for the rank that is really stuck); its cause
                    // is the better one.
                    Some(bytes) => self.remote(call, peer, &bytes),
                    None => own,
                }
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

    /// The error of a call that failed because `peer` reported `bytes`.
    fn remote(&self, call: String, peer: usize, bytes: &[u8]) -> Error {
        let r = Report::parse(bytes).unwrap_or_else(|e| Report {
            origin: peer,
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
                cause: cause.clone(),
            },
            Error::Mismatch {
                call, peer, theirs, ..
            } => Report {
                origin: rank,
                cause: format!(
                    "collective mismatch: rank {rank} called {call} but rank {peer} called {theirs}"
                ),
            },
            other => Report {
                origin: rank,
                cause: other.to_string(),
            },
        };
        self.report(&report);
    }

    fn report(&self, report: &Report) {
        if let Err(store_err) = self.store.set(&self.key(self.rank), &report.encode()) {
            tracing::warn!(
                "rank {}: could not report the failure to the store: {store_err}",
                self.rank
            );
        }
    }

    /// After timing out waiting for `peer`, or after it withdrew a
    /// transfer: its report, if it makes one within a grace of half the
    /// timeout (at most 5 s).
    fn await_report(&self, peer: usize) -> Option<Vec<u8>> {
        let key = self.key(peer);
        let grace = (self.timeout / 2).min(Duration::from_secs(5));
        let until = Instant::now() + grace;
        loop {
            match self.store.try_get(&key) {
                Ok(Some(report)) => return Some(report),
                Ok(None) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) | Err(_) => return None,
            }
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
            store.clone(),
            "job".into(),
            Duration::from_millis(100),
        )
    }

    #[test]
    fn reports_round_trip_and_garbage_is_refused() {
        let r = Report {
            origin: 3,
            cause: "it died\nwith two lines".into(),
        };
        assert_eq!(Report::parse(&r.encode()).unwrap(), r);
        let mut long = Report {
            origin: 1,
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
        let patient = Failures::new(1, store.clone(), "job".into(), Duration::from_secs(4));
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
    fn a_timed_out_rank_reports_first_and_defers_to_the_rank_it_waited_on() {
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
        // Rank 0 waited on rank 1, which reported: rank 1's cause, passed on.
        let e0 = r0.attribute("c".into(), timeout(1), false);
        match e0 {
            Error::Remote {
                origin: 1,
                reporter: Some(1),
                ref cause,
                ..
            } => assert!(cause.contains("data from rank 2"), "{cause}"),
            other => panic!("{other:?}"),
        }
    }
}
