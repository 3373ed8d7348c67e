//! Links made on first use.
//!
//! At init a rank connects to its ring neighbours and to the peers of the
//! algorithms that run every collective (`algo::pair_peers`). The
//! exchanges (alltoall, gather, scatter, sends and receives) talk to any
//! rank; their links are made when a call first needs them, and kept:
//!
//! * between processes ([`TcpConnector`]), as at init: each rank keeps its
//!   listener; of two ranks the lower connects to the higher's address in
//!   the store, both prove the job's secret, and the link is offered
//!   shared memory when both share a host. A peer may connect before this
//!   rank needs it (a send posted early): the connection is accepted and
//!   kept ([`Parked`]) until this rank asks for that peer. A rank that
//!   needs several peers connects to and accepts all of them at once, so
//!   no two ranks wait for each other.
//! * between threads of one process ([`MemConnector`]): the first of a
//!   pair to ask makes both ends and leaves the other's for it.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use oxccl_transport::auth::JobSecret;
use oxccl_transport::store::Store;
use oxccl_transport::tcp::{self, Listener, Parked, TcpOptions};
use oxccl_transport::{MessageLink, TransportError};

use crate::upgrade::Upgrader;

/// The purpose code of a link made on first use, in the handshake.
pub(crate) const LAZY: u32 = 3;

/// Makes links to peers when a call first needs them.
pub(crate) trait Connector: Send + fmt::Debug {
    /// Links to each of `peers` (none of them this rank, none already
    /// linked), in any order, by `deadline`. Every peer named must be
    /// making its link to this rank at about the same time.
    fn connect(
        &mut self,
        peers: &[usize],
        deadline: Instant,
    ) -> Result<Vec<Box<dyn MessageLink>>, TransportError>;
}

/// Links between processes, through the store (see the module docs).
pub(crate) struct TcpConnector {
    pub rank: usize,
    pub world: usize,
    pub job: u64,
    pub store: Arc<dyn Store>,
    /// The prefix of the keys `addr/<rank>`.
    pub prefix: String,
    pub listener: Listener,
    pub secret: Option<JobSecret>,
    pub options: TcpOptions,
    /// What the links become (shared memory, UCX), as at init.
    pub upgrader: Upgrader,
    pub parked: Parked,
}

impl fmt::Debug for TcpConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TcpConnector(rank {} on {}, {} parked)",
            self.rank,
            self.listener.local_addr(),
            self.parked.links.len()
        )
    }
}

impl TcpConnector {
    fn addr_of(&self, peer: usize, deadline: Instant) -> Result<SocketAddr, TransportError> {
        let raw = self
            .store
            .get(&format!("{}/addr/{peer}", self.prefix), deadline)
            .map_err(|e| TransportError::Protocol {
                peer,
                reason: format!("reading its address from the store: {e}"),
            })?;
        String::from_utf8_lossy(&raw)
            .parse()
            .map_err(|_| TransportError::Protocol {
                peer,
                reason: "its address in the store is malformed".into(),
            })
    }
}

impl Connector for TcpConnector {
    fn connect(
        &mut self,
        peers: &[usize],
        deadline: Instant,
    ) -> Result<Vec<Box<dyn MessageLink>>, TransportError> {
        let (rank, world, job) = (self.rank, self.world, self.job);
        let mut pending = Vec::new();
        let mut expect = Vec::new();
        let mut links = Vec::new();
        for &q in peers {
            if q > rank {
                let hello = tcp::hello(job, world, rank, q, LAZY);
                let addr = self.addr_of(q, deadline)?;
                pending.push(tcp::connect_start(
                    addr,
                    hello,
                    self.secret.as_ref(),
                    self.options,
                    deadline,
                )?);
            } else if let Some(l) = self.parked.take(q) {
                links.push((l, false));
            } else {
                expect.push(tcp::hello(job, world, q, rank, LAZY));
            }
        }
        if !expect.is_empty() {
            let (accepted, refused) = self.listener.accept_peers_parking(
                &expect,
                Some(&mut self.parked),
                self.secret.as_ref(),
                self.options,
                deadline,
            )?;
            if refused > 0 {
                tracing::warn!("rank {rank}: refused {refused} connections while linking");
            }
            links.extend(accepted.into_iter().map(|l| (l, false)));
        }
        for p in pending {
            links.push((p.finish(deadline)?, true));
        }
        let links = self.upgrader.pairs(links, deadline)?;
        for l in &links {
            tracing::debug!(
                "rank {rank}: linked to rank {} over {}",
                l.peer(),
                l.describe()
            );
        }
        Ok(links)
    }
}

/// Makes both ends of a link between `a` and `b`: `a`'s, then `b`'s.
pub(crate) type MakePair = dyn Fn(usize, usize) -> Result<(Box<dyn MessageLink>, Box<dyn MessageLink>), TransportError>
    + Send
    + Sync;

/// Ends of links left by the rank that made them for their owners:
/// `(maker, owner)` to the owner's end.
pub(crate) type LeftEnds = Arc<Mutex<HashMap<(usize, usize), Box<dyn MessageLink>>>>;

/// Links between the threads of one process (see the module docs).
pub(crate) struct MemConnector {
    pub rank: usize,
    /// Ends left for their owners.
    pub left: LeftEnds,
    pub make: Arc<MakePair>,
}

impl fmt::Debug for MemConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemConnector(rank {})", self.rank)
    }
}

impl Connector for MemConnector {
    fn connect(
        &mut self,
        peers: &[usize],
        _deadline: Instant,
    ) -> Result<Vec<Box<dyn MessageLink>>, TransportError> {
        let mut left = self.left.lock().map_err(|_| TransportError::Protocol {
            peer: self.rank,
            reason: "a rank panicked while making links".into(),
        })?;
        let mut out = Vec::with_capacity(peers.len());
        for &q in peers {
            match left.remove(&(q, self.rank)) {
                Some(mine) => out.push(mine),
                None => {
                    let (mine, theirs) = (self.make)(self.rank, q)?;
                    left.insert((self.rank, q), theirs);
                    out.push(mine);
                }
            }
        }
        Ok(out)
    }
}
