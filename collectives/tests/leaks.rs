//! Leaks: communicators created and destroyed many times in one process
//! leave nothing behind: no file descriptors, threads, listening sockets or
//! shared-memory segments. The only test of this binary, so that no other
//! test's threads or sockets come and go while it counts.
//!
//! `OXCCL_LEAK_CYCLES` cycles per transport (30 by default, the short run of
//! the test command); the long run (README, "Reliability"):
//! `OXCCL_LEAK_CYCLES=1000 cargo test --release -p oxccl --test leaks -- --nocapture`.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use oxccl::{Communicator, Config, ReduceOp, Transport, UniqueId};

/// What a process holds that a communicator may leave behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    fds: usize,
    threads: usize,
    listening: usize,
    shm_segments: usize,
}

impl Held {
    fn now() -> Held {
        let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let sockets: HashSet<String> = fds
            .iter()
            .filter_map(|l| l.strip_prefix("socket:[")?.strip_suffix(']'))
            .map(str::to_owned)
            .collect();
        // Listening TCP sockets of this process: state 0A in /proc/net/tcp*,
        // whose inode is one of this process's descriptors.
        let listening = ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .flat_map(|t| {
                t.lines()
                    .skip(1)
                    .filter_map(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        (f.get(3) == Some(&"0A")).then(|| f.get(9).map(|s| s.to_string()))?
                    })
                    .collect::<Vec<_>>()
            })
            .filter(|inode| sockets.contains(inode))
            .count();
        let shm_segments = std::fs::read_dir("/dev/shm")
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("oxccl"))
                    .count()
            })
            .unwrap_or(0);
        Held {
            fds: fds.len(),
            threads: std::fs::read_dir("/proc/self/task").unwrap().count(),
            listening,
            shm_segments,
        }
    }

    fn within(&self, base: &Held) -> bool {
        self.fds <= base.fds
            && self.threads <= base.threads
            && self.listening <= base.listening
            && self.shm_segments <= base.shm_segments
    }
}

/// One job: 3 ranks on threads meet through a fresh unique id, run one
/// allreduce, and drop their communicators.
fn cycle(transport: Transport) {
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let config = Config {
        transport,
        timeout: Duration::from_secs(20),
        ..Config::default()
    };
    let ranks: Vec<_> = (0..3)
        .map(|r| {
            let config = config.clone();
            std::thread::spawn(move || {
                let mut c: Communicator =
                    Communicator::init_with_config(&id, r, 3, config).unwrap();
                let mut v = vec![1.0f32; 4096];
                c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
                assert!(v.iter().all(|&x| x == 3.0));
            })
        })
        .collect();
    for t in ranks {
        t.join().unwrap();
    }
}

/// Waits up to 10 s for what the process holds to come back to `base`
/// (threads that serve a store or accept links end shortly after the
/// communicators are dropped).
fn settle(base: &Held) -> Held {
    let start = Instant::now();
    loop {
        let now = Held::now();
        if now.within(base) || start.elapsed() > Duration::from_secs(10) {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn create_and_destroy_cycles_leave_nothing_behind() {
    let cycles: usize = std::env::var("OXCCL_LEAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    for transport in [Transport::Shm, Transport::Tcp] {
        // Two cycles first: whatever a process sets up once (a logger, a
        // kernel's lazily opened files) is not a leak.
        cycle(transport);
        cycle(transport);
        let base = settle(&Held::now());
        let start = Instant::now();
        for _ in 0..cycles {
            cycle(transport);
        }
        let after = settle(&base);
        println!(
            "leaks: {transport:?}: {cycles} create/destroy cycles of 3 ranks in {:.1} s; held before {base:?}, after {after:?}",
            start.elapsed().as_secs_f64()
        );
        assert!(
            after.within(&base),
            "{transport:?}: after {cycles} cycles the process holds {after:?}, before {base:?}"
        );
    }
    // Unique ids never claimed each keep a store listening, up to a bound
    // (the oldest stop being served), so a process cannot exhaust its
    // descriptors by asking for ids.
    let base = settle(&Held::now());
    for _ in 0..200 {
        UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    }
    let after = Held::now();
    println!("leaks: 200 unclaimed unique ids: held before {base:?}, after {after:?}");
    assert!(
        after.listening <= base.listening + 64,
        "{after:?} against {base:?}"
    );
    assert!(
        after.threads <= base.threads + 64,
        "{after:?} against {base:?}"
    );
    assert!(after.fds <= base.fds + 64 * 2, "{after:?} against {base:?}");
}
