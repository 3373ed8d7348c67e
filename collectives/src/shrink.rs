//! Going on after a failure, as NCCL's `ncclCommShrink`: the ranks that
//! survived a failure form a new communicator of themselves, with new
//! ranks in the old order.
//!
//! The survivors agree through the communicator's store (whose links are
//! gone, but whose store is not):
//!
//! 1. each survivor writes that it is in, with the ranks it leaves out:
//!    those the caller names and the rank its last failure started at;
//! 2. the first to take a ticket (an atomic counter in the store) decides:
//!    it waits until every rank that nobody left out has come, or for
//!    `OXCCL_TIMEOUT`, then writes the members: the ranks that came and
//!    that no caller named;
//! 3. every survivor reads the members and bootstraps the new communicator
//!    under keys of its own (`shrink/<n>/comm`), with the job's secret.
//!
//! A rank that comes after the members are decided gets an error saying
//! so. The store must outlive the failure: oxccl's own TCP store lives in
//! rank 0's process, so a job that loses rank 0 cannot shrink unless its
//! ranks met through a file store or torchrun's store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use oxccl_transport::store::{PrefixStore, Store};

use crate::{Communicator, Error, Result};

/// Encodes a list of ranks: comma-separated decimals.
fn encode(ranks: &[usize]) -> Vec<u8> {
    ranks
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(",")
        .into_bytes()
}

fn decode(b: &[u8]) -> Option<Vec<usize>> {
    let s = std::str::from_utf8(b).ok()?;
    if s.is_empty() {
        return Some(Vec::new());
    }
    s.split(',').map(|r| r.parse().ok()).collect()
}

impl Communicator {
    /// Forms a new communicator of the ranks that survived a failure of
    /// this one (see the module docs): every survivor calls it, with the
    /// ranks it knows to be gone in `exclude` (they are left out whether
    /// or not they come; the rank this rank's last failure started at is
    /// left out of the wait in any case). The new communicator numbers the
    /// members in their order here and names its ranks in this one's
    /// numbering too when it fails. Works on a healthy communicator as
    /// well (every rank that calls it stays).
    pub fn shrink(&mut self, exclude: &[usize]) -> Result<Communicator> {
        let (rank, world) = (self.rank(), self.world());
        if let Some(&bad) = exclude.iter().find(|&&r| r >= world) {
            return Err(Error::InvalidArgument(format!(
                "rank {rank}: shrink: rank {bad} to exclude is not below the world size {world}"
            )));
        }
        if exclude.contains(&rank) {
            return Err(Error::InvalidArgument(format!(
                "rank {rank}: shrink: this rank excludes itself"
            )));
        }
        let n = self.origin.shrinks;
        self.origin.shrinks += 1;
        let store: Arc<dyn Store> = Arc::new(PrefixStore::new(
            self.origin.store.clone(),
            &format!("{}/shrink/{n}", self.origin.key_prefix),
        ));
        let timeout = self.config().timeout;
        let store_err = |what: &str, e: oxccl_transport::store::StoreError| {
            tracing::warn!(
                "rank {rank}: shrink: {what}: {e} (a job that lost the rank serving the store cannot shrink)"
            );
            Error::Store { rank, source: e }
        };
        let mut left_out: Vec<usize> = exclude.to_vec();
        left_out.extend(self.suspect);
        left_out.sort_unstable();
        left_out.dedup();
        store
            .set(&format!("in/{rank}"), &encode(&left_out))
            .map_err(|e| store_err("announcing this rank", e))?;
        let ticket = store
            .add("ticket", 1)
            .map_err(|e| store_err("taking a ticket", e))?;
        if ticket == 1 {
            let members = self.decide(store.as_ref(), exclude, &left_out, timeout)?;
            store
                .set("members", &encode(&members))
                .map_err(|e| store_err("publishing the members", e))?;
        }
        let raw = store
            .get("members", crate::deadline_in(timeout * 2))
            .map_err(|e| store_err("waiting for the members", e))?;
        let members = decode(&raw).ok_or_else(|| {
            Error::Internal(format!(
                "rank {rank}: shrink: malformed member list in the store"
            ))
        })?;
        let Some(new_rank) = members.iter().position(|&r| r == rank) else {
            return Err(Error::InvalidUsage(format!(
                "rank {rank}: shrink: the survivors {members:?} were decided without this rank (it came too late, or a rank excluded it)"
            )));
        };
        tracing::info!(
            "rank {rank}: shrink {n}: rank {new_rank} of {} (ranks here: {members:?})",
            members.len()
        );
        let sub: Arc<dyn Store> = Arc::new(PrefixStore::new(store, "comm"));
        let mut child = crate::bootstrap::join(
            sub,
            new_rank,
            members.len(),
            self.config().clone(),
            self.origin.secret.clone(),
            false,
        )?;
        // The store lives in this rank's process when it serves it.
        child.server = self.server.clone();
        child.parent_ranks = Some(members);
        Ok(child)
    }

    /// On the first survivor: waits until every rank no survivor left out
    /// has come, or `timeout`; returns the ranks that came, but those a
    /// caller excluded.
    fn decide(
        &self,
        store: &dyn Store,
        exclude: &[usize],
        left_out: &[usize],
        timeout: Duration,
    ) -> Result<Vec<usize>> {
        let world = self.world();
        let until = Instant::now() + timeout;
        let mut came: Vec<Option<Vec<usize>>> = vec![None; world];
        loop {
            for (r, c) in came.iter_mut().enumerate() {
                if c.is_none() {
                    if let Ok(Some(v)) = store.try_get(&format!("in/{r}")) {
                        *c = Some(decode(&v).unwrap_or_default());
                    }
                }
            }
            // Ranks some survivor (or the caller) leaves out need not be awaited.
            let mut gone: Vec<usize> = left_out.to_vec();
            gone.extend(came.iter().flatten().flatten().copied());
            let waiting = (0..world).any(|r| came[r].is_none() && !gone.contains(&r));
            if !waiting || Instant::now() >= until {
                let members: Vec<usize> = (0..world)
                    .filter(|&r| came[r].is_some() && !exclude.contains(&r))
                    .collect();
                if waiting {
                    tracing::warn!(
                        "rank {}: shrink: went on without ranks that neither came nor were reported gone within {timeout:?}",
                        self.rank()
                    );
                }
                return Ok(members);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_lists_round_trip() {
        for v in [vec![], vec![0], vec![3, 1, 2000]] {
            assert_eq!(decode(&encode(&v)), Some(v));
        }
        assert_eq!(decode(b"1,x"), None);
    }
}
