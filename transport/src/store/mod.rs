//! Rendezvous key-value stores: where ranks meet before links exist.
//!
//! A [`Store`] maps string keys to byte values. Ranks publish their
//! addresses with [`Store::set`], wait for each other with [`Store::get`]
//! and count arrivals with [`Store::add`]. Values are opaque bytes; this
//! module knows nothing of dtypes or collectives.
//!
//! Implementations:
//!
//! * [`MemStore`]: in one process (tests, ranks that are threads);
//! * [`TcpStoreServer`] and [`TcpStore`]: rank 0 serves, every rank is a
//!   client;
//! * [`FileStore`]: a directory on a file system all ranks share;
//! * [`TorchStore`]: a client of PyTorch's `TCPStore` (torchrun's agent
//!   serves one on `MASTER_PORT`);
//! * [`PrefixStore`]: another store's keys under a prefix.
//!
//! Counters written by [`Store::add`] are stored as 8-byte little-endian
//! `i64` values, so [`Store::get`] of a counter key returns those 8 bytes
//! (see [`decode_counter`]).

use std::time::{Duration, Instant};

mod client;
mod file;
mod mem;
pub(crate) mod tcp;
pub(crate) mod torch;

pub use file::FileStore;
pub use mem::MemStore;
pub use tcp::{TCP_MAX_LEN, TcpStore, TcpStoreServer};
pub use torch::{TORCH_MAX_KEY, TORCH_MAX_VALUE, TorchStore};

/// A key-value store that ranks rendezvous through.
///
/// All methods may be called from several threads at once.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Sets `key` to `value` (overwrites).
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Returns the value of `key`, waiting until some rank sets it or
    /// `deadline` passes (then [`StoreError::Timeout`] naming the key).
    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, StoreError>;
    /// Returns the value if present, without waiting.
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Atomically adds `delta` to the i64 counter at `key` (absent = 0) and
    /// returns the new value.
    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError>;
    /// Short description for logs and errors, e.g. "tcp store
    /// 127.0.0.1:29500" or "file store /path".
    fn describe(&self) -> String;
    /// [`set`](Self::set), giving up once the store has not answered for
    /// `wait` (a store whose server is stopped or hung). Stores that answer
    /// from this process or a local file ignore `wait`. After giving up,
    /// later requests of a network store may fail at once.
    fn set_within(&self, key: &str, value: &[u8], wait: Duration) -> Result<(), StoreError> {
        let _ = wait;
        self.set(key, value)
    }
    /// [`try_get`](Self::try_get), giving up as [`set_within`](Self::set_within) does.
    fn try_get_within(&self, key: &str, wait: Duration) -> Result<Option<Vec<u8>>, StoreError> {
        let _ = wait;
        self.try_get(key)
    }
}

/// Another store's keys under a prefix: `key` is `prefix` + `key` there.
/// Jobs, restarts and communicators that share one server keep apart this
/// way, as torch's `PrefixStore` does.
#[derive(Debug)]
pub struct PrefixStore {
    inner: std::sync::Arc<dyn Store>,
    prefix: String,
}

impl PrefixStore {
    /// Keys of `inner` under `prefix` (joined with a `/`).
    pub fn new(inner: std::sync::Arc<dyn Store>, prefix: &str) -> PrefixStore {
        PrefixStore {
            inner,
            prefix: format!("{}/", prefix.trim_end_matches('/')),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

impl Store for PrefixStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.set(&self.key(key), value)
    }
    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, StoreError> {
        self.inner.get(&self.key(key), deadline)
    }
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.try_get(&self.key(key))
    }
    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.inner.add(&self.key(key), delta)
    }
    fn describe(&self) -> String {
        format!("{} (keys under {:?})", self.inner.describe(), self.prefix)
    }
    fn set_within(&self, key: &str, value: &[u8], wait: Duration) -> Result<(), StoreError> {
        self.inner.set_within(&self.key(key), value, wait)
    }
    fn try_get_within(&self, key: &str, wait: Duration) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.try_get_within(&self.key(key), wait)
    }
}

/// Errors of rendezvous stores. Every message names the store, and the key
/// where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the store and key (e.g. "connecting
        /// to tcp store 127.0.0.1:29500").
        what: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// [`Store::get`] reached its deadline before any rank set the key.
    #[error("timed out after {waited:.1?} waiting for key {key:?} in {store}")]
    Timeout {
        /// The key that was awaited.
        key: String,
        /// How long it was awaited.
        waited: Duration,
        /// The store's [`Store::describe`].
        store: String,
    },
    /// The TCP store's server could not be reached before the deadline
    /// (nothing listening, or no route).
    #[error("could not reach {store} within {waited:.1?}: {source}")]
    Unreachable {
        /// The store's [`Store::describe`].
        store: String,
        /// How long connecting was retried.
        waited: Duration,
        /// The last connection error.
        #[source]
        source: std::io::Error,
    },
    /// The connection to the store is gone: the server stopped, closed the
    /// connection, or an earlier request on it failed half-way.
    #[error("{store} is closed: {detail}")]
    Closed {
        /// The store's [`Store::describe`].
        store: String,
        /// What happened.
        detail: String,
    },
    /// A peer or file sent data that does not follow the store's format
    /// (wrong magic, wrong version, malformed frame).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The store's server did not authenticate (another job's store, a
    /// server without the job's secret, or no oxccl store at all).
    #[error("{source}")]
    Auth {
        /// The store's [`Store::describe`].
        store: String,
        /// Why.
        #[source]
        source: crate::auth::AuthError,
    },
    /// [`Store::add`] on a key whose value is not a counter, or whose sum
    /// overflows an `i64`.
    #[error("{store}: key {key:?}: {detail}")]
    Counter {
        /// The key.
        key: String,
        /// The store's [`Store::describe`].
        store: String,
        /// What is wrong with the value.
        detail: String,
    },
    /// A key or value is too large for the store.
    #[error("{store}: {what} of {len} bytes for key {key:?} exceeds the limit of {max} bytes")]
    TooLarge {
        /// The key (possibly shortened).
        key: String,
        /// "key" or "value".
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
        /// The store's [`Store::describe`].
        store: String,
    },
    /// The file store could not take the lock file of a key within its
    /// deadline. A rank that crashed while holding it leaves a stale lock
    /// file, which must be removed by hand.
    #[error(
        "{store}: could not lock key {key:?} within {waited:.1?} (lock file {lock}; \
         a stale lock left by a crashed rank must be removed by hand)"
    )]
    Locked {
        /// The key.
        key: String,
        /// The lock file's path.
        lock: String,
        /// How long locking was retried.
        waited: Duration,
        /// The store's [`Store::describe`].
        store: String,
    },
}

/// Decodes a counter value written by [`Store::add`] (8 bytes,
/// little-endian `i64`); `None` if `value` is not 8 bytes long.
pub fn decode_counter(value: &[u8]) -> Option<i64> {
    let bytes: [u8; 8] = value.try_into().ok()?;
    Some(i64::from_le_bytes(bytes))
}

/// Why a counter could not be added to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CounterError {
    /// The present value is not 8 bytes long.
    NotACounter { len: usize },
    /// The sum overflows an i64.
    Overflow { old: i64, delta: i64 },
}

impl std::fmt::Display for CounterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CounterError::NotACounter { len } => write!(
                f,
                "value of {len} bytes is not a counter (8-byte little-endian i64)"
            ),
            CounterError::Overflow { old, delta } => {
                write!(f, "adding {delta} to counter {old} overflows i64")
            }
        }
    }
}

impl CounterError {
    pub(crate) fn into_store_error(self, key: &str, store: String) -> StoreError {
        StoreError::Counter {
            key: key.to_owned(),
            store,
            detail: self.to_string(),
        }
    }
}

/// Adds `delta` to the counter `old` (absent = 0); returns the new value.
pub(crate) fn counter_add(old: Option<&[u8]>, delta: i64) -> Result<i64, CounterError> {
    let old = match old {
        None => 0,
        Some(bytes) => {
            decode_counter(bytes).ok_or(CounterError::NotACounter { len: bytes.len() })?
        }
    };
    old.checked_add(delta)
        .ok_or(CounterError::Overflow { old, delta })
}

/// Shortens a key for error messages.
pub(crate) fn short_key(key: &str) -> String {
    const MAX: usize = 200;
    if key.len() <= MAX {
        return key.to_owned();
    }
    let mut end = MAX;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &key[..end])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    //! Checks shared by every store implementation.

    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    /// set / get / try_get / add semantics.
    pub(crate) fn basic_semantics(store: &dyn Store) {
        assert!(store.try_get("missing").unwrap().is_none());
        store.set("a", b"one").unwrap();
        assert_eq!(store.try_get("a").unwrap().as_deref(), Some(&b"one"[..]));
        assert_eq!(store.get("a", soon(1000)).unwrap(), b"one");
        store.set("a", b"two!").unwrap();
        assert_eq!(store.get("a", soon(1000)).unwrap(), b"two!");
        store.set("empty", b"").unwrap();
        assert_eq!(store.get("empty", soon(1000)).unwrap(), b"");
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        store.set("big", &big).unwrap();
        assert_eq!(store.get("big", soon(1000)).unwrap(), big);

        assert_eq!(store.add("n", 5).unwrap(), 5);
        assert_eq!(store.add("n", -7).unwrap(), -2);
        assert_eq!(store.add("n", 0).unwrap(), -2);
        assert_eq!(
            decode_counter(&store.get("n", soon(1000)).unwrap()),
            Some(-2)
        );
        match store.add("a", 1) {
            Err(StoreError::Counter { key, .. }) => assert_eq!(key, "a"),
            other => panic!("expected a counter error, got {other:?}"),
        }
        store.set("max", &i64::MAX.to_le_bytes()).unwrap();
        assert!(matches!(
            store.add("max", 1),
            Err(StoreError::Counter { .. })
        ));
        assert!(!store.describe().is_empty());
    }

    /// A get blocked in one thread wakes when another thread sets the key.
    pub(crate) fn get_wakes(getter: Arc<dyn Store>, setter: Arc<dyn Store>) {
        let start = Instant::now();
        let waiter = std::thread::spawn(move || getter.get("late", soon(10_000)));
        std::thread::sleep(Duration::from_millis(100));
        setter.set("late", b"here").unwrap();
        assert_eq!(waiter.join().unwrap().unwrap(), b"here");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    /// A get of a key nobody sets times out near its deadline.
    pub(crate) fn get_times_out(store: &dyn Store) {
        let wait = Duration::from_millis(200);
        let start = Instant::now();
        let err = store.get("never/set", start + wait).unwrap_err();
        let took = start.elapsed();
        match &err {
            StoreError::Timeout { key, .. } => assert_eq!(key, "never/set"),
            other => panic!("expected a timeout, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("never/set"), "{msg}");
        assert!(msg.contains(&store.describe()), "{msg}");
        assert!(took >= wait, "returned early after {took:?}");
        assert!(took < 2 * wait, "returned late after {took:?}");
        // A deadline in the past still answers (with a timeout).
        assert!(matches!(
            store.get("never/set", Instant::now()),
            Err(StoreError::Timeout { .. })
        ));
    }

    /// 8 threads x 100 increments add up to exactly 800.
    pub(crate) fn concurrent_adds(stores: Vec<Arc<dyn Store>>) {
        assert_eq!(stores.len(), 8);
        let threads: Vec<_> = stores
            .into_iter()
            .map(|store| {
                std::thread::spawn(move || {
                    let mut last = 0;
                    for _ in 0..100 {
                        let now = store.add("counter", 1).unwrap();
                        assert!(now > last);
                        last = now;
                    }
                    store
                })
            })
            .collect();
        let stores: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(stores[0].add("counter", 0).unwrap(), 800);
        let value = stores[0].get("counter", soon(1000)).unwrap();
        assert_eq!(decode_counter(&value), Some(800));
    }

    #[test]
    fn prefix_store_keeps_keys_apart() {
        let inner: Arc<dyn Store> = Arc::new(crate::store::MemStore::new());
        let a = PrefixStore::new(inner.clone(), "job/a/");
        let b = PrefixStore::new(inner.clone(), "job/b");
        assert_eq!(a.add("n", 2).unwrap(), 2);
        assert_eq!(a.add("n", 3).unwrap(), 5);
        a.set("k", b"from a").unwrap();
        b.set("k", b"from b").unwrap();
        assert_eq!(
            inner.try_get("job/a/k").unwrap().as_deref(),
            Some(&b"from a"[..])
        );
        assert_eq!(b.get("k", soon(100)).unwrap(), b"from b");
        assert!(b.try_get("n").unwrap().is_none(), "a's counter is not b's");
        assert!(b.describe().contains("job/b/"));
        // Errors name the key as the inner store holds it.
        let e = b.get("never", soon(10)).unwrap_err().to_string();
        assert!(e.contains("job/b/never"), "{e}");
    }

    #[test]
    fn counter_add_rules() {
        assert_eq!(counter_add(None, 3), Ok(3));
        assert_eq!(counter_add(Some(&7i64.to_le_bytes()), -2), Ok(5));
        assert_eq!(
            counter_add(Some(b"abc"), 1),
            Err(CounterError::NotACounter { len: 3 })
        );
        assert!(matches!(
            counter_add(Some(&i64::MIN.to_le_bytes()), -1),
            Err(CounterError::Overflow { .. })
        ));
    }

    #[test]
    fn short_key_cuts_on_char_boundary() {
        assert_eq!(short_key("abc"), "abc");
        let long = "é".repeat(300);
        let short = short_key(&long);
        assert!(short.len() <= 203);
        assert!(short.ends_with("..."));
    }
}
