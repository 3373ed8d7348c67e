//! Creating communicators: from a unique id, from a file store on a shared
//! directory, and from launcher variables (read through a lookup function).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use oxccl::config::{Config, launch_from_lookup};
use oxccl::{Communicator, ReduceOp, UniqueId};
use oxccl_transport::store::FileStore;

fn config() -> Config {
    Config {
        timeout: Duration::from_secs(20),
        ..Config::default()
    }
}

/// Each thread's communicator sums rank + 1 over the world.
fn sum_over(ranks: Vec<std::thread::JoinHandle<i64>>) -> Vec<i64> {
    ranks.into_iter().map(|t| t.join().unwrap()).collect()
}

fn sum(mut c: Communicator) -> i64 {
    let mut v = vec![c.rank() as i64 + 1; 1000];
    c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    assert!(v.iter().all(|x| *x == v[0]));
    v[0]
}

#[test]
fn unique_id_ranks_meet_over_tcp() {
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    // The id crosses process boundaries as 128 bytes.
    let bytes = id.to_bytes();
    assert_eq!(UniqueId::from_bytes(&bytes).unwrap(), id);
    let mut bad = bytes;
    bad[0] ^= 1;
    assert!(
        UniqueId::from_bytes(&bad)
            .unwrap_err()
            .to_string()
            .contains("not an oxccl unique id")
    );
    let ranks: Vec<_> = (0..3)
        .map(|r| {
            let id = UniqueId::from_bytes(&bytes).unwrap();
            std::thread::spawn(move || {
                sum(Communicator::init_with_config(&id, r, 3, config()).unwrap())
            })
        })
        .collect();
    assert_eq!(sum_over(ranks), vec![6, 6, 6]);
}

#[test]
fn file_store_on_a_shared_directory() {
    let dir = std::env::temp_dir().join(format!("oxccl-filestore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ranks: Vec<_> = (0..4)
        .map(|r| {
            let store = Arc::new(FileStore::new(&dir).unwrap());
            std::thread::spawn(
                move || sum(Communicator::with_store(store, r, 4, config()).unwrap()),
            )
        })
        .collect();
    assert_eq!(sum_over(ranks), vec![10; 4]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn launcher_variables_build_a_world() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            let vars: HashMap<&str, String> = [
                ("OMPI_COMM_WORLD_RANK", r.to_string()),
                ("OMPI_COMM_WORLD_SIZE", "2".to_string()),
                ("MASTER_ADDR", "127.0.0.1".to_string()),
                ("MASTER_PORT", port.to_string()),
            ]
            .into_iter()
            .collect();
            let launch = launch_from_lookup(&move |k: &str| vars.get(k).cloned()).unwrap();
            assert_eq!(launch.source, "Open MPI");
            std::thread::spawn(move || sum(Communicator::from_launch(&launch, config()).unwrap()))
        })
        .collect();
    assert_eq!(sum_over(ranks), vec![3, 3]);
}

#[test]
fn bad_ranks_are_refused() {
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let e = Communicator::init_with_config(&id, 3, 3, config()).unwrap_err();
    assert!(
        e.to_string().contains("rank 3 is not in a world of 3"),
        "{e}"
    );
}
