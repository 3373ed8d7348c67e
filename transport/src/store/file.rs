//! A store kept as files in a directory that all ranks share (a local
//! directory for ranks on one host, or a shared file system).
//!
//! Each key is one file whose name encodes the key ([`FileStore`] explains
//! how). Writes go to a temporary file in the same directory that is then
//! renamed over the key's file, so readers never see half a value.
//!
//! # Known limitation: stale locks
//!
//! [`Store::add`] serializes its read-modify-write with a lock file created
//! exclusively (`O_EXCL`) next to the key's file. A rank that dies while
//! holding it leaves the lock file behind, and later `add`s of that key fail
//! with [`StoreError::Locked`] after 30 s. Remove the `*.lock` file by hand
//! (or use a fresh directory per job). `O_EXCL` is atomic on local file
//! systems and on NFSv3 and later.

use std::fs::{self, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{Store, StoreError, counter_add, short_key};

/// How long [`Store::add`] tries to take a key's lock file.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// Longest encoded file name (most file systems allow 255 bytes; the lock
/// and temporary files add suffixes).
const MAX_NAME: usize = 200;

/// A store kept as files in a directory, for ranks that share a file system.
///
/// The file of key `k` is named `k_` followed by `k` with every byte outside
/// `[A-Za-z0-9_-]` written as `%XX` (upper-case hex), so any key maps to a
/// distinct, safe name (keys whose name would exceed 200 bytes are
/// refused). Lock files end in `.lock` and temporary files contain `.tmp.`;
/// neither can be mistaken for a key's file since `.` is always escaped.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

/// A random token per process, so that temporary files of ranks on
/// different hosts that happen to share a pid do not collide.
fn process_token() -> u64 {
    static TOKEN: OnceLock<u64> = OnceLock::new();
    *TOKEN.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(t.as_nanos());
        }
        h.finish()
    })
}

/// Encodes a key as a file name (see [`FileStore`]).
fn encode_key(key: &str) -> String {
    let mut name = String::with_capacity(2 + key.len());
    name.push_str("k_");
    for &b in key.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    name
}

/// Removes the lock file when dropped.
struct LockGuard<'a> {
    path: &'a Path,
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(self.path) {
            tracing::warn!(
                lock = %self.path.display(),
                error = %e,
                "file store: could not remove lock file; later adds of its key will time out"
            );
        }
    }
}

impl FileStore {
    /// Opens the store in `dir`, creating the directory if needed.
    pub fn new(dir: impl Into<PathBuf>) -> Result<FileStore, StoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            what: format!("creating directory of file store {}", dir.display()),
            source,
        })?;
        Ok(FileStore { dir })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn key_path(&self, key: &str) -> Result<PathBuf, StoreError> {
        let name = encode_key(key);
        if name.len() > MAX_NAME {
            return Err(StoreError::TooLarge {
                key: short_key(key),
                what: "key",
                len: name.len(),
                max: MAX_NAME,
                store: self.describe(),
            });
        }
        Ok(self.dir.join(name))
    }

    fn io(&self, doing: &str, key: &str, source: std::io::Error) -> StoreError {
        StoreError::Io {
            what: format!("{doing} key {:?} in {}", short_key(key), self.describe()),
            source,
        }
    }

    /// Reads a key's file; `None` if it does not exist.
    fn read(&self, key: &str, path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
        match fs::read(path) {
            Ok(value) => Ok(Some(value)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io("reading", key, e)),
        }
    }

    /// Writes a key's file atomically: a temporary file, then a rename.
    fn write(&self, key: &str, path: &Path, value: &[u8]) -> Result<(), StoreError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(
            ".tmp.{}.{:016x}.{}",
            std::process::id(),
            process_token(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = PathBuf::from(tmp);
        let written = (|| {
            let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            file.write_all(value)?;
            // Closing the file flushes it to the server on NFS
            // (close-to-open consistency) before the rename publishes it.
            drop(file);
            fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            // Best effort: the temporary file may not exist.
            let _ = fs::remove_file(&tmp);
            return Err(self.io("writing", key, e));
        }
        Ok(())
    }

    /// Takes the lock file of `path`, retrying until [`LOCK_WAIT`] passes.
    fn lock<'a>(&self, key: &str, lock: &'a Path) -> Result<LockGuard<'a>, StoreError> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(1);
        loop {
            match OpenOptions::new().write(true).create_new(true).open(lock) {
                Ok(mut file) => {
                    // The holder's pid helps whoever clears a stale lock;
                    // the lock works without it.
                    let _ = write!(file, "{}", std::process::id());
                    return Ok(LockGuard { path: lock });
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    if start.elapsed() >= LOCK_WAIT {
                        return Err(StoreError::Locked {
                            key: short_key(key),
                            lock: lock.display().to_string(),
                            waited: start.elapsed(),
                            store: self.describe(),
                        });
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(10));
                }
                Err(e) => return Err(self.io("creating lock file of", key, e)),
            }
        }
    }
}

impl Store for FileStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let path = self.key_path(key)?;
        self.write(key, &path, value)
    }

    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, StoreError> {
        let start = Instant::now();
        let path = self.key_path(key)?;
        let mut backoff = Duration::from_millis(1);
        loop {
            if let Some(value) = self.read(key, &path)? {
                return Ok(value);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::Timeout {
                    key: key.to_owned(),
                    waited: start.elapsed(),
                    store: self.describe(),
                });
            }
            std::thread::sleep(backoff.min(left));
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.key_path(key)?;
        self.read(key, &path)
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        let path = self.key_path(key)?;
        let mut lock = path.as_os_str().to_owned();
        lock.push(".lock");
        let lock = PathBuf::from(lock);
        let _guard = self.lock(key, &lock)?;
        let old = self.read(key, &path)?;
        let new = counter_add(old.as_deref(), delta)
            .map_err(|e| e.into_store_error(key, self.describe()))?;
        self.write(key, &path, &new.to_le_bytes())?;
        Ok(new)
    }

    fn describe(&self) -> String {
        format!("file store {}", self.dir.display())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::tests as common;
    use std::sync::Arc;

    /// A fresh directory, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static SEQ: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "oxccl-file-store-{name}-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn file_store_semantics() {
        let dir = TempDir::new("semantics");
        let store = FileStore::new(dir.0.join("nested/dir")).unwrap();
        assert!(store.dir().is_dir());
        assert!(store.describe().starts_with("file store "));
        common::basic_semantics(&store);
        // A second store on the same directory sees the same data.
        let other = FileStore::new(store.dir()).unwrap();
        assert_eq!(other.try_get("a").unwrap().as_deref(), Some(&b"two!"[..]));
        // No temporary or lock files are left behind.
        for entry in fs::read_dir(store.dir()).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(
                !name.contains(".tmp.") && !name.ends_with(".lock"),
                "{name}"
            );
        }
    }

    #[test]
    fn file_store_get_wakes_on_set() {
        let dir = TempDir::new("wakes");
        let getter = FileStore::new(&dir.0).unwrap();
        let setter = FileStore::new(&dir.0).unwrap();
        common::get_wakes(Arc::new(getter), Arc::new(setter));
    }

    #[test]
    fn file_store_get_times_out() {
        let dir = TempDir::new("timeout");
        common::get_times_out(&FileStore::new(&dir.0).unwrap());
    }

    #[test]
    fn file_store_concurrent_adds() {
        let dir = TempDir::new("adds");
        common::concurrent_adds(
            (0..8)
                .map(|_| Arc::new(FileStore::new(&dir.0).unwrap()) as Arc<dyn Store>)
                .collect(),
        );
    }

    #[test]
    fn file_store_odd_keys_round_trip() {
        let dir = TempDir::new("odd");
        let store = FileStore::new(&dir.0).unwrap();
        let keys = [
            "a/b c:1",
            "../escape",
            "a.lock",
            "x.tmp.1",
            "%41",
            "A",
            "",
            "ünïcode/ключ",
        ];
        for (i, key) in keys.iter().enumerate() {
            store.set(key, &[i as u8]).unwrap();
        }
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(store.try_get(key).unwrap(), Some(vec![i as u8]), "{key}");
        }
        // Every key is one file directly inside the directory.
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), keys.len());
        assert_eq!(encode_key("a/b c:1"), "k_a%2Fb%20c%3A1");
        assert_eq!(store.add("a/b c:1.n", 3).unwrap(), 3);
        let long = "x".repeat(300);
        assert!(matches!(
            store.set(&long, b"v"),
            Err(StoreError::TooLarge { .. })
        ));
    }

    #[test]
    fn file_store_add_waits_for_held_lock() {
        // A held lock (here: one left by "another rank") blocks add until
        // it is removed.
        let dir = TempDir::new("lock");
        let store = FileStore::new(&dir.0).unwrap();
        let lock = dir.0.join(format!("{}.lock", encode_key("n")));
        fs::write(&lock, b"12345").unwrap();
        let adder = {
            let store = store.clone();
            std::thread::spawn(move || store.add("n", 1))
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(store.try_get("n").unwrap().is_none());
        fs::remove_file(&lock).unwrap();
        assert_eq!(adder.join().unwrap().unwrap(), 1);
    }
}
