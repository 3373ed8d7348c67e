//! Only the job gets in: ranks authenticate the store and their links with
//! the job's secret, and a rank with another secret (or none) fails at init
//! on both sides with an error that says so.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxccl::config::{AuthMode, Config, launch_from_lookup};
use oxccl::{Communicator, ErrorKind, JobSecret, ReduceOp, Result, UniqueId};
use oxccl_transport::store::{FileStore, MemStore, Store};

fn secret(s: &str) -> JobSecret {
    JobSecret::from_text(s).unwrap()
}

fn config(secret: Option<JobSecret>, timeout_ms: u64) -> Config {
    Config {
        timeout: Duration::from_millis(timeout_ms),
        job_secret: secret,
        ..Config::default()
    }
}

fn sum(mut c: Communicator) -> i64 {
    let mut v = vec![c.rank() as i64 + 1; 1000];
    c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    v[0]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `world` ranks from oxrun-style launcher variables, rank r with
/// `configs[r]`, each on a thread, returning what each made of it.
fn launch(port: u16, configs: Vec<Config>) -> Vec<(Result<i64>, Duration)> {
    let world = configs.len();
    let handles: Vec<_> = configs
        .into_iter()
        .enumerate()
        .map(|(r, c)| {
            let vars: HashMap<&str, String> = [
                ("OXCCL_RANK", r.to_string()),
                ("OXCCL_WORLD_SIZE", world.to_string()),
                ("OXCCL_MASTER_ADDR", "127.0.0.1".to_string()),
                ("OXCCL_MASTER_PORT", port.to_string()),
            ]
            .into_iter()
            .collect();
            let launch = launch_from_lookup(&move |k: &str| vars.get(k).cloned()).unwrap();
            std::thread::spawn(move || {
                let start = Instant::now();
                (
                    Communicator::from_launch(&launch, c).map(sum),
                    start.elapsed(),
                )
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn ranks_with_the_same_secret_build_a_world() {
    let s = secret("the job's secret");
    let c = Config {
        auth: AuthMode::Require,
        ..config(Some(s), 20_000)
    };
    let out = launch(free_port(), vec![c.clone(), c.clone(), c]);
    for (r, _) in out {
        assert_eq!(r.unwrap(), 6);
    }
}

#[test]
fn a_rank_with_another_secret_fails_on_both_sides_within_the_timeout() {
    let port = free_port();
    let out = launch(
        port,
        vec![
            config(Some(secret("ours")), 2000),
            config(Some(secret("theirs")), 2000),
        ],
    );
    // Rank 1 is refused by rank 0's store at once, and told why.
    let (r1, took1) = &out[1];
    let e1 = r1.as_ref().unwrap_err();
    let msg = e1.to_string();
    assert!(
        msg.contains(&format!(
            "the tcp store at 127.0.0.1:{port} belongs to another job: its secret differs"
        )),
        "{msg}"
    );
    assert_eq!(e1.kind(), ErrorKind::Remote, "{msg}");
    assert!(*took1 < Duration::from_secs(2), "{took1:?}");
    // Rank 0 waits for rank 1 until its timeout and says why it never came.
    let (r0, took0) = &out[0];
    let e0 = r0.as_ref().unwrap_err().to_string();
    assert!(e0.contains("ranks never did (1)"), "{e0}");
    assert!(e0.contains("failed authentication"), "{e0}");
    assert!(e0.contains("belongs to another job"), "{e0}");
    assert!(*took0 < Duration::from_secs(6), "{took0:?}");
}

#[test]
fn a_rank_without_a_secret_is_told_to_set_one() {
    let out = launch(
        free_port(),
        vec![config(Some(secret("ours")), 2000), config(None, 2000)],
    );
    let e1 = out[1].0.as_ref().unwrap_err().to_string();
    assert!(
        e1.contains("authenticates with a job secret but this rank has none"),
        "{e1}"
    );
    assert!(e1.contains("OXCCL_JOB_SECRET"), "{e1}");
    let e0 = out[0].0.as_ref().unwrap_err().to_string();
    assert!(e0.contains("has no job secret"), "{e0}");
}

/// Ranks that meet through a store the application brings (no store
/// authentication) still authenticate their ring links.
#[test]
fn ring_links_refuse_a_rank_with_another_secret() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let start = Instant::now();
    let handles: Vec<_> = [secret("ours"), secret("theirs")]
        .into_iter()
        .enumerate()
        .map(|(r, s)| {
            let store = store.clone();
            std::thread::spawn(move || {
                Communicator::with_store(store, r, 2, config(Some(s), 2000))
                    .map(|_| ())
                    .unwrap_err()
                    .to_string()
            })
        })
        .collect();
    let errors: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (r, e) in errors.iter().enumerate() {
        let peer = 1 - r;
        assert!(e.starts_with(&format!("rank {r}: bootstrap")), "{e}");
        assert!(
            e.contains(&format!("rank {peer} at 127.0.0.1:"))
                && e.contains("belongs to another job"),
            "{e}"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(8));

    // The same with the same secret works.
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let handles: Vec<_> = (0..2)
        .map(|r| {
            let store = store.clone();
            std::thread::spawn(move || {
                sum(
                    Communicator::with_store(store, r, 2, config(Some(secret("ours")), 20_000))
                        .unwrap(),
                )
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 3);
    }
}

#[test]
fn require_without_a_secret_is_an_error_naming_the_variables() {
    let c = Config {
        auth: AuthMode::Require,
        ..config(None, 2000)
    };
    let e = Communicator::with_store(Arc::new(MemStore::new()), 0, 2, c).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("OXCCL_AUTH"), "{msg}");
    assert!(msg.contains("OXCCL_JOB_SECRET"), "{msg}");
}

#[test]
fn a_unique_id_carries_the_secret() {
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    assert!(id.has_secret());
    let bytes = id.to_bytes();
    // A forged id (another secret, same store): refused by the store.
    let mut forged = bytes;
    forged[60] ^= 0xFF;
    let forged = UniqueId::from_bytes(&forged).unwrap();
    let e = Communicator::init_with_config(&forged, 1, 2, config(None, 2000))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("belongs to another job"), "{e}");
    // The real id works, with no secret in the environment: the id's is used.
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            let id = UniqueId::from_bytes(&bytes).unwrap();
            std::thread::spawn(move || {
                sum(Communicator::init_with_config(&id, r, 2, config(None, 20_000)).unwrap())
            })
        })
        .collect();
    for h in ranks {
        assert_eq!(h.join().unwrap(), 3);
    }
}

/// The file store's shared directory holds no trace of the secret.
#[test]
fn the_file_store_never_holds_the_secret() {
    let text = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let s = secret(text);
    let dir = std::env::temp_dir().join(format!("oxccl-auth-filestore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            let store = Arc::new(FileStore::new(&dir).unwrap());
            let s = s.clone();
            std::thread::spawn(move || {
                sum(Communicator::with_store(store, r, 2, config(Some(s), 20_000)).unwrap())
            })
        })
        .collect();
    for h in ranks {
        assert_eq!(h.join().unwrap(), 3);
    }
    let mut files = 0;
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            files += 1;
            let bytes = std::fs::read(&path).unwrap();
            let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
            assert!(!has(text.as_bytes()), "{} holds the secret", path.display());
            assert!(!has(s.key()), "{} holds the key", path.display());
            assert!(
                !has(&s.key()[..8]),
                "{} holds part of the key",
                path.display()
            );
        }
    }
    assert!(files > 0, "the job wrote nothing to {}", dir.display());
    let _ = std::fs::remove_dir_all(&dir);
}
