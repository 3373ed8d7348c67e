//! The in-process store, and the shared map that the TCP store's server
//! keeps.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::{CounterError, Store, StoreError, counter_add};

/// What a wait for a key came to.
#[derive(Debug)]
pub(crate) enum Wait {
    /// The key is set to this value.
    Found(Vec<u8>),
    /// The deadline passed first.
    TimedOut,
    /// The map was closed (its server is stopping).
    Closed,
}

#[derive(Debug, Default)]
struct MapState {
    entries: HashMap<String, Vec<u8>>,
    closed: bool,
}

/// A map whose readers can wait for keys to appear.
///
/// Mutex poisoning is recovered from: every update is a single `HashMap`
/// operation, so a panic elsewhere cannot leave the map half-updated.
#[derive(Debug, Default)]
pub(crate) struct SharedMap {
    state: Mutex<MapState>,
    changed: Condvar,
}

impl SharedMap {
    fn lock(&self) -> MutexGuard<'_, MapState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set(&self, key: &str, value: &[u8]) {
        self.lock().entries.insert(key.to_owned(), value.to_vec());
        self.changed.notify_all();
    }

    pub(crate) fn try_get(&self, key: &str) -> Option<Vec<u8>> {
        self.lock().entries.get(key).cloned()
    }

    /// Waits until `key` is set, `deadline` passes or the map is closed.
    pub(crate) fn wait_for(&self, key: &str, deadline: Instant) -> Wait {
        let mut state = self.lock();
        loop {
            if let Some(value) = state.entries.get(key) {
                return Wait::Found(value.clone());
            }
            if state.closed {
                return Wait::Closed;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Wait::TimedOut;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    pub(crate) fn add(&self, key: &str, delta: i64) -> Result<i64, CounterError> {
        let mut state = self.lock();
        let new = counter_add(state.entries.get(key).map(Vec::as_slice), delta)?;
        state
            .entries
            .insert(key.to_owned(), new.to_le_bytes().to_vec());
        drop(state);
        self.changed.notify_all();
        Ok(new)
    }

    /// Wakes every waiter and makes later waits return [`Wait::Closed`]
    /// (unless their key is set).
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

/// An in-process store: ranks that are threads of one process share clones
/// of it.
///
/// ```
/// use oxccl_transport::store::{MemStore, Store};
/// use std::time::{Duration, Instant};
/// let store = MemStore::new();
/// let other = store.clone();
/// other.set("addr/1", b"10.0.0.1:4000").unwrap();
/// let deadline = Instant::now() + Duration::from_secs(1);
/// assert_eq!(store.get("addr/1", deadline).unwrap(), b"10.0.0.1:4000");
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    map: Arc<SharedMap>,
}

impl MemStore {
    /// Creates an empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }
}

impl Store for MemStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.map.set(key, value);
        Ok(())
    }

    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, StoreError> {
        let start = Instant::now();
        match self.map.wait_for(key, deadline) {
            Wait::Found(value) => Ok(value),
            Wait::TimedOut => Err(StoreError::Timeout {
                key: key.to_owned(),
                waited: start.elapsed(),
                store: self.describe(),
            }),
            // A MemStore's map is never closed.
            Wait::Closed => Err(StoreError::Closed {
                store: self.describe(),
                detail: format!("closed while waiting for key {key:?}"),
            }),
        }
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.try_get(key))
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.map
            .add(key, delta)
            .map_err(|e| e.into_store_error(key, self.describe()))
    }

    fn describe(&self) -> String {
        "mem store".to_owned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::tests as common;
    use std::time::Duration;

    #[test]
    fn mem_store_semantics() {
        common::basic_semantics(&MemStore::new());
    }

    #[test]
    fn mem_store_get_wakes_on_set() {
        let store = MemStore::new();
        common::get_wakes(Arc::new(store.clone()), Arc::new(store));
    }

    #[test]
    fn mem_store_get_times_out() {
        common::get_times_out(&MemStore::new());
    }

    #[test]
    fn mem_store_concurrent_adds() {
        let store = MemStore::new();
        common::concurrent_adds(
            (0..8)
                .map(|_| Arc::new(store.clone()) as Arc<dyn Store>)
                .collect(),
        );
    }

    #[test]
    fn mem_store_survives_poisoning() {
        let store = MemStore::new();
        store.set("k", b"v").unwrap();
        let map = Arc::clone(&store.map);
        let _ = std::thread::spawn(move || {
            let _guard = map.state.lock();
            panic!("poison the store's mutex");
        })
        .join();
        assert!(store.map.state.is_poisoned());
        assert_eq!(store.try_get("k").unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(store.add("n", 2).unwrap(), 2);
        let deadline = Instant::now() + Duration::from_millis(10);
        assert!(matches!(
            store.get("absent", deadline),
            Err(StoreError::Timeout { .. })
        ));
    }

    #[test]
    fn shared_map_close_wakes_waiters() {
        let map = Arc::new(SharedMap::default());
        let waiter = {
            let map = Arc::clone(&map);
            std::thread::spawn(move || map.wait_for("k", Instant::now() + Duration::from_secs(30)))
        };
        std::thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        map.close();
        assert!(matches!(waiter.join().unwrap(), Wait::Closed));
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
