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

/// Under torchrun the agent serves a torch TCPStore on MASTER_PORT and
/// announces it (`TORCHELASTIC_USE_AGENT_STORE=True`): ranks are its clients,
/// and a process may create several communicators through it in turn.
/// The agent's store is played by a real torch `TCPStore` in a Python child.
#[test]
fn torchrun_agent_store_serves_the_rendezvous() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let required = std::env::var("OXCCL_REQUIRE_TORCH").is_ok_and(|v| v == "1");
    let server = "import time\nfrom torch.distributed import TCPStore\n\
                  s = TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\n\
                  print(s.port, flush=True)\ntime.sleep(120)\n";
    let mut child = match Command::new("python3")
        .args(["-c", server])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            assert!(
                !required,
                "OXCCL_REQUIRE_TORCH=1 but python3 cannot start: {e}"
            );
            println!("SKIPPED: python3 cannot start ({e}); the torchrun store test did not run");
            return;
        }
    };
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let Ok(port) = line.trim().parse::<u16>() else {
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            !required,
            "OXCCL_REQUIRE_TORCH=1 but torch's TCPStore did not start"
        );
        println!(
            "SKIPPED: torch is not installed (pip install torch); the torchrun store test did not run"
        );
        return;
    };
    let ranks: Vec<_> = (0..3)
        .map(|r| {
            let vars: HashMap<&str, String> = [
                ("RANK", r.to_string()),
                ("WORLD_SIZE", "3".to_string()),
                ("LOCAL_RANK", r.to_string()),
                ("MASTER_ADDR", "127.0.0.1".to_string()),
                ("MASTER_PORT", port.to_string()),
                ("TORCHELASTIC_USE_AGENT_STORE", "True".to_string()),
                ("TORCHELASTIC_RUN_ID", "test".to_string()),
                ("TORCHELASTIC_RESTART_COUNT", "0".to_string()),
            ]
            .into_iter()
            .collect();
            let launch = launch_from_lookup(&move |k: &str| vars.get(k).cloned()).unwrap();
            std::thread::spawn(move || {
                // Two communicators in turn, then one more while the second
                // is alive: each finds its own peers.
                let first = sum(Communicator::from_launch(&launch, config()).unwrap());
                let second = Communicator::from_launch(&launch, config()).unwrap();
                let third = sum(Communicator::from_launch(&launch, config()).unwrap());
                (first, sum(second), third)
            })
        })
        .collect();
    let results: Vec<_> = ranks.into_iter().map(|t| t.join().unwrap()).collect();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(results, vec![(6, 6, 6); 3]);
}

/// Settings that ranks must share are compared at init: a mismatch is an
/// error on every rank naming the setting, both ranks and both values.
#[test]
fn a_setting_that_ranks_disagree_on_is_named_on_every_rank() {
    use oxccl::Transport;
    use oxccl_transport::store::MemStore;
    type Change = fn(&mut Config);
    let cases: [(&str, Change, &str, &str); 4] = [
        ("OXCCL_ALGO", |c| c.algo = oxccl::Algo::RING, "auto", "ring"),
        (
            "OXCCL_SLICE_BYTES",
            |c| c.slice_bytes = 4096,
            "524288",
            "4096",
        ),
        (
            "OXCCL_SHM_BYTES",
            |c| c.shm_bytes = 64 << 10,
            "1048576",
            "65536",
        ),
        (
            "OXCCL_TRANSPORT",
            |c| c.transport = Transport::Tcp,
            "auto",
            "tcp",
        ),
    ];
    for (name, change, ours, theirs) in cases {
        let store: Arc<dyn oxccl_transport::store::Store> = Arc::new(MemStore::new());
        let ranks: Vec<_> = (0..3)
            .map(|r| {
                let store = store.clone();
                let mut c = config();
                if r == 2 {
                    change(&mut c);
                }
                std::thread::spawn(move || {
                    Communicator::with_store(store, r, 3, c)
                        .map(|_| ())
                        .unwrap_err()
                })
            })
            .collect();
        for (r, t) in ranks.into_iter().enumerate() {
            let e = t.join().unwrap();
            assert_eq!(e.kind(), oxccl::ErrorKind::InvalidArgument, "rank {r}: {e}");
            assert_eq!(
                e.to_string(),
                format!(
                    "{name}: rank 0 has {ours} but rank 2 has {theirs}; every rank must use the same value"
                ),
                "rank {r}"
            );
        }
    }
}

/// Rank 0 names the ranks that never came; the others say what they waited for.
#[test]
fn ranks_that_never_come_are_named() {
    use oxccl_transport::store::MemStore;
    let store: Arc<dyn oxccl_transport::store::Store> = Arc::new(MemStore::new());
    let short = Config {
        timeout: Duration::from_millis(500),
        ..Config::default()
    };
    let ranks: Vec<_> = [0, 2]
        .into_iter()
        .map(|r| {
            let (store, c) = (store.clone(), short.clone());
            std::thread::spawn(move || {
                Communicator::with_store(store, r, 4, c)
                    .map(|_| ())
                    .unwrap_err()
            })
        })
        .collect();
    let errors: Vec<String> = ranks
        .into_iter()
        .map(|t| t.join().unwrap().to_string())
        .collect();
    assert!(
        errors[0].starts_with("rank 0: bootstrap: no progress for")
            && errors[0].contains("2 of 4 ranks never did (1, 3)"),
        "{}",
        errors[0]
    );
    assert!(errors[1].starts_with("rank 2: bootstrap:"), "{}", errors[1]);
    assert!(
        errors[1].contains("rank 0 to see every rank register"),
        "{}",
        errors[1]
    );
    // Without rank 0, the others say that rank 0 is the one missing.
    let store: Arc<dyn oxccl_transport::store::Store> = Arc::new(MemStore::new());
    let e = Communicator::with_store(store, 1, 2, short)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("rank 1: bootstrap: no progress") && e.contains("rank 0 to start the job"),
        "{e}"
    );
    assert!(e.contains("it never did"), "{e}");
}

/// A timeout too long to add to the clock (set in code) is a valid setting:
/// every wait saturates instead of panicking.
#[test]
fn an_endless_timeout_does_not_overflow_the_clock() {
    let endless = Config {
        timeout: Duration::MAX,
        ..Config::default()
    };
    let dir = std::env::temp_dir().join(format!("oxccl-endless-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            let store = Arc::new(FileStore::new(&dir).unwrap());
            let c = endless.clone();
            std::thread::spawn(move || sum(Communicator::with_store(store, r, 2, c).unwrap()))
        })
        .collect();
    assert_eq!(sum_over(ranks), vec![3, 3]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One job's ranks build a communicator on the same port again and again,
/// each dropping the last one first (a framework that re-initialises):
/// a rank may reach rank 0's port while rank 0's last store shuts down,
/// or still serves (every other round, rank 0 keeps its last communicator,
/// and so its store, a while after the others have moved on), and every
/// round still builds a world.
#[test]
fn a_job_builds_communicators_on_one_port_one_after_another() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rounds = 12;
    let ranks: Vec<_> = (0..3)
        .map(|r| {
            let vars: HashMap<&str, String> = [
                ("RANK", r.to_string()),
                ("WORLD_SIZE", "3".to_string()),
                ("MASTER_ADDR", "127.0.0.1".to_string()),
                ("MASTER_PORT", port.to_string()),
            ]
            .into_iter()
            .collect();
            let launch = launch_from_lookup(&move |k: &str| vars.get(k).cloned()).unwrap();
            std::thread::spawn(move || {
                (0..rounds)
                    .map(|round| {
                        let mut c = Communicator::from_launch(&launch, config())
                            .unwrap_or_else(|e| panic!("rank {r}, round {round}: {e}"));
                        let mut v = vec![r as i64 + 1; 1000];
                        c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
                        if r == 0 && round % 2 == 1 {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        v[0]
                    })
                    .collect::<Vec<i64>>()
            })
        })
        .collect();
    for t in ranks {
        assert_eq!(t.join().unwrap(), vec![6; rounds]);
    }
}
