//! The torch store client against a real PyTorch `TCPStore` server, started
//! by a Python process (`python3` with torch installed).
//!
//! Without torch the tests print why they do not run; CI installs torch and
//! sets `OXCCL_REQUIRE_TORCH=1`, which turns its absence into a failure.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxccl_transport::store::{PrefixStore, Store, StoreError, TorchStore};

/// A torch TCPStore server in a child process; killed on drop.
struct TorchServer {
    child: Child,
    addr: SocketAddr,
}

impl Drop for TorchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SERVER: &str = r#"
import sys, time, datetime
from torch.distributed import TCPStore
s = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
             timeout=datetime.timedelta(seconds=60))
print(s.port, flush=True)
# Torch's own client sets a key for the test to read, and reads ours.
s.set("from/torch", b"hello from torch")
got = s.get("from/oxccl")
print("torch read", got.decode(), flush=True)
time.sleep(120)
"#;

fn torch_server() -> Option<TorchServer> {
    let required = std::env::var("OXCCL_REQUIRE_TORCH").is_ok_and(|v| v == "1");
    let child = Command::new("python3")
        .args(["-c", SERVER])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                !required,
                "OXCCL_REQUIRE_TORCH=1 but python3 cannot start: {e}"
            );
            println!("SKIPPED: python3 cannot start ({e}); the torch store tests did not run");
            return None;
        }
    };
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut line).unwrap();
    let Ok(port) = line.trim().parse::<u16>() else {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
        let _ = child.kill();
        assert!(
            !required,
            "OXCCL_REQUIRE_TORCH=1 but no torch store started: {line}{err}"
        );
        println!(
            "SKIPPED: no torch TCPStore could start here (pip install torch); the torch store tests did not run: {}",
            err.lines().last().unwrap_or("")
        );
        return None;
    };
    // Keep reading the server's output in the background.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let server = TorchServer {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    SERVER_LINES.with(|c| *c.borrow_mut() = Some(rx));
    Some(server)
}

thread_local! {
    static SERVER_LINES: std::cell::RefCell<Option<std::sync::mpsc::Receiver<String>>> =
        const { std::cell::RefCell::new(None) };
}

fn soon(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

#[test]
fn speaks_torch_tcpstore_protocol() {
    let Some(server) = torch_server() else { return };
    let store = TorchStore::connect(server.addr, soon(20_000)).unwrap();
    assert!(store.describe().contains("torch store 127.0.0.1"));

    // A key torch's own client set, and one we set that torch's client reads.
    assert_eq!(
        store.get("from/torch", soon(10_000)).unwrap(),
        b"hello from torch"
    );
    store.set("from/oxccl", b"hello from oxccl").unwrap();
    let line = SERVER_LINES.with(|c| {
        c.borrow()
            .as_ref()
            .unwrap()
            .recv_timeout(Duration::from_secs(10))
    });
    assert_eq!(line.unwrap(), "torch read hello from oxccl");

    // set / get / try_get round trips, empty and large values.
    assert!(store.try_get("missing").unwrap().is_none());
    store.set("a", b"one").unwrap();
    assert_eq!(store.try_get("a").unwrap().as_deref(), Some(&b"one"[..]));
    store.set("a", b"two!").unwrap();
    assert_eq!(store.get("a", soon(1000)).unwrap(), b"two!");
    store.set("empty", b"").unwrap();
    assert_eq!(store.get("empty", soon(1000)).unwrap(), b"");
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    store.set("big", &big).unwrap();
    assert_eq!(store.get("big", soon(5000)).unwrap(), big);

    // Counters: torch's server adds and answers the new value.
    assert_eq!(store.add("n", 5).unwrap(), 5);
    assert_eq!(store.add("n", -7).unwrap(), -2);

    // A get that waits wakes when another client sets the key.
    let store = Arc::new(store);
    let setter = TorchStore::connect(server.addr, soon(5000)).unwrap();
    let getter = store.clone();
    let start = Instant::now();
    let waiter = std::thread::spawn(move || getter.get("late", soon(10_000)));
    std::thread::sleep(Duration::from_millis(200));
    setter.set("late", b"here").unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), b"here");
    assert!(start.elapsed() < Duration::from_secs(5));

    // A get of a key nobody sets times out near its deadline, and the
    // connection stays usable after the wait is cancelled.
    let start = Instant::now();
    match store.get("never/set", start + Duration::from_millis(300)) {
        Err(StoreError::Timeout { key, .. }) => assert_eq!(key, "never/set"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(store.get("a", soon(1000)).unwrap(), b"two!");

    // Keys under a prefix, as oxccl's bootstrap keeps them.
    let p = PrefixStore::new(store.clone(), "oxccl/torchelastic/run/attempt_0/1");
    p.set("oxccl/job", &7u64.to_le_bytes()).unwrap();
    assert_eq!(
        store
            .get("oxccl/torchelastic/run/attempt_0/1/oxccl/job", soon(1000))
            .unwrap(),
        7u64.to_le_bytes()
    );
}

#[test]
fn a_store_that_goes_away_fails_a_waiting_get_promptly() {
    let Some(mut server) = torch_server() else {
        return;
    };
    let store = Arc::new(TorchStore::connect(server.addr, soon(20_000)).unwrap());
    let getter = store.clone();
    let start = Instant::now();
    let waiter = std::thread::spawn(move || getter.get("never", soon(60_000)));
    std::thread::sleep(Duration::from_millis(200));
    let _ = server.child.kill();
    let _ = server.child.wait();
    let err = waiter.join().unwrap().unwrap_err();
    assert!(matches!(err, StoreError::Closed { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
    // The connection is marked broken: later calls fail at once.
    assert!(matches!(
        store.set("k", b"v"),
        Err(StoreError::Closed { .. })
    ));
}
