//! What an authenticated stream link becomes (`OXCCL_TRANSPORT`): shared
//! memory with a rank of this host, UCX (feature `ucx`) with a rank of
//! another host when both have an RDMA device or when asked everywhere,
//! else the socket it is.

use std::time::Instant;

use oxccl_transport::{MessageLink, StreamLink, TransportError, shm};

use crate::config::{Config, Transport};

/// The ring's links: to the next rank, from the previous.
type RingLinks = (Box<dyn MessageLink>, Box<dyn MessageLink>);

/// Whether and where links go over UCX.
#[cfg(feature = "ucx")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UcxUse {
    /// Never (`tcp`, `shm`).
    Never,
    /// To ranks of other hosts when both have an RDMA device (`auto`).
    Remote,
    /// To every peer (`ucx`).
    Always,
}

/// Upgrades a rank's stream links as its configuration says; kept for the
/// links made on first use ([`crate::lazy`]).
#[derive(Debug)]
pub(crate) struct Upgrader {
    policy: shm::Policy,
    shm_bytes: usize,
    single_copy: Option<usize>,
    #[cfg(feature = "ucx")]
    ucx: UcxUse,
    /// The rank's UCP context and worker, when it may use UCX: always for
    /// `ucx`, and for `auto` when UCX reports an RDMA device here.
    #[cfg(feature = "ucx")]
    worker: Option<oxccl_transport::ucx::Worker>,
}

impl Upgrader {
    /// The upgrader of `config` on a host that is `crowded` (more of the
    /// job's ranks than CPUs); creates the UCX worker where it may be used.
    pub(crate) fn new(config: &Config, crowded: bool) -> Result<Upgrader, TransportError> {
        let policy = match config.transport {
            Transport::Auto => shm::Policy::Auto,
            Transport::Tcp => shm::Policy::Never,
            Transport::Shm => shm::Policy::Require,
            #[cfg(feature = "ucx")]
            Transport::Ucx => shm::Policy::Never,
        };
        #[cfg(feature = "ucx")]
        let (ucx, worker) = {
            use oxccl_transport::ucx;
            match config.transport {
                Transport::Ucx => (UcxUse::Always, Some(ucx::worker()?)),
                Transport::Auto if ucx::rdma_available() => (UcxUse::Remote, Some(ucx::worker()?)),
                Transport::Auto => (UcxUse::Remote, None),
                _ => (UcxUse::Never, None),
            }
        };
        Ok(Upgrader {
            policy,
            shm_bytes: config.shm_bytes,
            single_copy: config.shm_single_copy.threshold(crowded),
            #[cfg(feature = "ucx")]
            ucx,
            #[cfg(feature = "ucx")]
            worker,
        })
    }

    /// The ring's links: to the next rank and from the previous.
    pub(crate) fn ring(
        &self,
        next: StreamLink,
        prev: StreamLink,
        deadline: Instant,
    ) -> Result<RingLinks, TransportError> {
        #[cfg(feature = "ucx")]
        if self.ucx != UcxUse::Never {
            // The side that offers shared memory on a link is the one the
            // link comes from, as in `shm::upgrade_ring`.
            let mut v = self.pairs(vec![(next, false), (prev, true)], deadline)?;
            let prev = v.pop();
            let next = v.pop();
            return next.zip(prev).ok_or_else(|| TransportError::Protocol {
                peer: 0,
                reason: "the ring's links were lost while upgrading them".into(),
            });
        }
        let up = shm::upgrade_ring(
            next,
            prev,
            self.policy,
            self.shm_bytes,
            self.single_copy,
            deadline,
        )?;
        Ok((up.next, up.prev))
    }

    /// Links to other peers, each with whether this side offers shared
    /// memory on it; in the order given.
    pub(crate) fn pairs(
        &self,
        links: Vec<(StreamLink, bool)>,
        deadline: Instant,
    ) -> Result<Vec<Box<dyn MessageLink>>, TransportError> {
        #[cfg(feature = "ucx")]
        let links = {
            use oxccl_transport::ucx;
            match (self.ucx, &self.worker) {
                (UcxUse::Always, Some(w)) => {
                    let streams = links.into_iter().map(|(l, _)| l).collect();
                    return Ok(ucx::upgrade(w, streams, deadline)?
                        .into_iter()
                        .map(|l| Box::new(l) as Box<dyn MessageLink>)
                        .collect());
                }
                (UcxUse::Remote, w) => {
                    let (streams, offers): (Vec<StreamLink>, Vec<bool>) = links.into_iter().unzip();
                    let up = ucx::upgrade_remote(w.as_ref(), streams, deadline)?;
                    let mut out: Vec<Option<Box<dyn MessageLink>>> = Vec::new();
                    let mut rest = Vec::new();
                    for (i, (l, offers)) in up.into_iter().zip(offers).enumerate() {
                        match l {
                            Ok(u) => out.push(Some(Box::new(u))),
                            Err(s) => {
                                out.push(None);
                                rest.push((i, (s, offers)));
                            }
                        }
                    }
                    let (at, rest): (Vec<usize>, Vec<_>) = rest.into_iter().unzip();
                    let upgraded = shm::upgrade_pairs(
                        rest,
                        self.policy,
                        self.shm_bytes,
                        self.single_copy,
                        deadline,
                    )?;
                    for (i, l) in at.into_iter().zip(upgraded) {
                        out[i] = Some(l);
                    }
                    return Ok(out.into_iter().flatten().collect());
                }
                _ => links,
            }
        };
        Ok(shm::upgrade_pairs(
            links,
            self.policy,
            self.shm_bytes,
            self.single_copy,
            deadline,
        )?
        .into_iter()
        .map(|l| l as Box<dyn MessageLink>)
        .collect())
    }
}
