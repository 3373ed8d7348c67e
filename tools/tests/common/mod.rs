//! What the multi-process suites share: starting `oxccl-check` under
//! `oxrun` or by hand, and signalling one rank of a looping job to see what
//! every survivor says.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

pub const OXRUN: &str = env!("CARGO_BIN_EXE_oxrun");
pub const CHECK: &str = env!("CARGO_BIN_EXE_oxccl-check");

/// Every ring collective oxccl-check runs with `-c all`, as its lines name them.
pub const RING_KINDS: [&str; 6] = [
    "all_reduce",
    "broadcast",
    "reduce ",
    "all_gather",
    "reduce_scatter",
    "barrier",
];

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn stderr_of(c: &mut Child) -> String {
    let mut s = String::new();
    c.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

/// `oxrun -n N oxccl-check ARGS` with `OXCCL_TIMEOUT=60` and `vars`:
/// whether it succeeded, its stdout and its stderr.
pub fn oxrun(n: usize, args: &[&str], vars: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(OXRUN)
        .args(["-n", &n.to_string(), "--timeout", "120", "--", CHECK])
        .args(args)
        .env("OXCCL_TIMEOUT", "60")
        .envs(vars.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts that rank 0 printed a line for each of `kinds` that says the
/// call ran on `n` ranks and checked out.
pub fn assert_every_kind_ok(stdout: &str, kinds: &[&str], n: usize, context: &str) {
    for kind in kinds {
        assert_line_ok(
            stdout,
            |l| l.contains(kind),
            n,
            &format!("{context}, {kind}"),
        );
    }
}

/// Asserts that rank 0 printed a line for the exchange `kind` (one whose
/// name starts the line) that says it ran on `n` ranks and checked out.
pub fn assert_exchange_ok(stdout: &str, kind: &str, n: usize, context: &str) {
    let start = format!("{kind} ");
    assert_line_ok(stdout, |l| l.starts_with(&start), n, context);
}

/// Rank 0's first line that `is` picks (after its "[0] " prefix) must say
/// `n` ranks and "result OK".
fn assert_line_ok(stdout: &str, is: impl Fn(&str) -> bool, n: usize, context: &str) {
    let line = stdout
        .lines()
        .find(|l| l.strip_prefix("[0] ").is_some_and(&is))
        .unwrap_or_else(|| panic!("{context}: no line:\n{stdout}"));
    assert!(
        line.contains(&format!("{n} ranks")) && line.ends_with("result OK"),
        "{context}: {line}"
    );
}

/// What a surviving rank did after another rank of its job was signalled.
#[derive(Debug)]
pub struct Survivor {
    pub rank: usize,
    /// From the signal to its exit.
    pub took: Duration,
    pub status: ExitStatus,
    pub stderr: String,
    /// Its `oxccl-check: ...` error line ("" if none).
    pub line: String,
}

/// Starts 4 ranks (by hand, torchrun-style variables plus `vars`) looping
/// 1 MiB allreduces with `OXCCL_TIMEOUT=timeout_s`, sends `sig` to rank
/// `victim` once every rank is running, and returns what each other rank
/// did (a rank still running a minute later is killed). The victim is
/// killed and reaped.
pub fn signal_rank_of_4(
    vars: &[(&str, &str)],
    victim: usize,
    sig: Signal,
    timeout_s: u32,
) -> Vec<Survivor> {
    let port = free_port().to_string();
    let mut ranks: Vec<Child> = (0..4)
        .map(|r| {
            Command::new(CHECK)
                .args([
                    "-c",
                    "all_reduce",
                    "-b",
                    "1M",
                    "-i",
                    "100000000",
                    "-w",
                    "0",
                    "--no-check",
                ])
                .env("OXCCL_RANK", r.to_string())
                .env("OXCCL_WORLD_SIZE", "4")
                .env("OXCCL_MASTER_ADDR", "127.0.0.1")
                .env("OXCCL_MASTER_PORT", &port)
                .env("OXCCL_TIMEOUT", timeout_s.to_string())
                .envs(vars.iter().copied())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(3000));
    for c in &mut ranks {
        assert!(
            c.try_wait().unwrap().is_none(),
            "a rank ended before the signal: {}",
            stderr_of(c)
        );
    }
    let pid = Pid::from_raw(ranks[victim].id() as i32).unwrap();
    kill_process(pid, sig).unwrap();
    let at = Instant::now();
    let mut survivors = Vec::new();
    for (rank, c) in ranks.iter_mut().enumerate() {
        if rank == victim {
            continue;
        }
        let status = loop {
            if let Some(s) = c.try_wait().unwrap() {
                break s;
            }
            if at.elapsed() > Duration::from_secs(60) {
                let _ = c.kill();
                break c.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = at.elapsed();
        let stderr = stderr_of(c);
        let line = stderr
            .lines()
            .find(|l| l.starts_with("oxccl-check: "))
            .unwrap_or("")
            .to_owned();
        survivors.push(Survivor {
            rank,
            took,
            status,
            stderr,
            line,
        });
    }
    // The victim: killed (which also ends a stop) and reaped.
    let _ = ranks[victim].kill();
    let _ = ranks[victim].wait();
    survivors
}
