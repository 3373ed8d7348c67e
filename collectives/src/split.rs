//! Communicator split, as NCCL's `ncclCommSplit` and MPI's
//! `MPI_Comm_split`: the ranks that pass the same color form a new
//! communicator, ordered by key (ties by their rank in the parent).
//!
//! Every rank's color and key travel in one allgather on the parent, so all
//! ranks see the same table and compute the same groups without the store.
//! Each group then bootstraps as any communicator does (a store, a job id,
//! links, the settings check), through the parent's store under keys of
//! its own (`split/<n>/<color>`, `n` counting the parent's splits, the same
//! on every rank since a split is a collective call), with the parent's job
//! secret. The new communicators are independent of the parent and of each
//! other: they have their own links, run at the same time as the parent,
//! and fail on their own; their errors name ranks in the parent's
//! numbering too.

use std::sync::Arc;

use oxccl_transport::store::PrefixStore;

use crate::{Communicator, Error, Result};

impl Communicator {
    /// Splits this communicator: ranks that pass the same `color` form a
    /// new one, ordered by `key` and then by their rank here; a rank that
    /// passes `None` (NCCL's `NCCL_SPLIT_NOCOLOR`) takes part in the
    /// exchange and gets `None`. A collective call: every rank calls it,
    /// in the same order as its other calls. The new communicator has this
    /// one's settings.
    pub fn split(&mut self, color: Option<u32>, key: i64) -> Result<Option<Communicator>> {
        let world = self.world();
        let mine = [color.map_or(-1, i64::from), key];
        let mut table = vec![0i64; 2 * world];
        self.all_gather(&mine, &mut table)?;
        let n = self.origin.splits;
        self.origin.splits += 1;
        let Some(color) = color else {
            return Ok(None);
        };
        let mut members: Vec<(i64, usize)> = table
            .chunks_exact(2)
            .enumerate()
            .filter(|(_, e)| e[0] == i64::from(color))
            .map(|(r, e)| (e[1], r))
            .collect();
        members.sort_unstable();
        let rank = members
            .iter()
            .position(|&(_, r)| r == self.rank())
            .ok_or_else(|| {
                Error::Internal(format!(
                    "rank {}: split: this rank's color {color} is not in the table the ranks exchanged",
                    self.rank()
                ))
            })?;
        let parents: Vec<usize> = members.iter().map(|&(_, r)| r).collect();
        tracing::info!(
            "rank {}: split {n}, color {color}: rank {rank} of {} (ranks here: {parents:?})",
            self.rank(),
            members.len()
        );
        let store = Arc::new(PrefixStore::new(
            self.origin.store.clone(),
            &format!("{}/split/{n}/{color}", self.origin.key_prefix),
        ));
        let mut child = crate::bootstrap::join(
            store,
            rank,
            members.len(),
            self.config().clone(),
            self.origin.secret.clone(),
            self.crowded,
        )?;
        // Its failures name ranks in this communicator's numbering too
        // (and, split again, in the first one's: the nearest parent's).
        // The store lives in this rank's process when it serves it.
        child.server = self.server.clone();
        child.parent_ranks = Some(parents);
        Ok(Some(child))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use oxccl_transport::store::{MemStore, Store};

    use crate::Communicator;
    use crate::config::{Config, host_cpus};

    /// The ranks of a job count themselves host by host at bootstrap; a
    /// split communicator keeps its parent's verdict (the parent's other
    /// ranks still share the CPUs), a shrunk one counts again.
    #[test]
    fn crowding_is_counted_at_bootstrap_and_kept_by_splits() {
        let cpus = host_cpus();
        // One rank more than CPUs, so the parent is crowded and its
        // two-rank child would not be by its own count.
        let world = if cpus < 16 {
            cpus + 1
        } else {
            println!(
                "crowding test: this host has {cpus} CPUs; with 3 ranks the parent is not crowded, \
                 so a split's inheriting the parent's verdict is not exercised here"
            );
            3
        };
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let config = Config {
            timeout: Duration::from_secs(30),
            ..Config::default()
        };
        let seen: Vec<(bool, usize, bool, bool)> = std::thread::scope(|s| {
            let ranks: Vec<_> = (0..world)
                .map(|r| {
                    let (store, config) = (store.clone(), config.clone());
                    s.spawn(move || {
                        let mut c = Communicator::with_store(store, r, world, config).unwrap();
                        let child = c.split(Some(u32::from(r >= 2)), 0).unwrap().unwrap();
                        let shrunk = c.shrink(&[]).unwrap();
                        (c.crowded, child.world(), child.crowded, shrunk.crowded)
                    })
                })
                .collect();
            ranks.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, &(parent, child_world, child, shrunk)) in seen.iter().enumerate() {
            assert_eq!(parent, world > cpus, "rank {r}");
            assert_eq!(child, parent, "rank {r}: child of {child_world}");
            assert_eq!(shrunk, world > cpus, "rank {r}");
        }
    }
}
