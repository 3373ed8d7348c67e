//! The UCX link across processes (feature `ucx`), over UCX's TCP and
//! shared-memory transports (`UCX_TLS=tcp`, `UCX_TLS=sm`): every
//! collective and exchange on 2 to 4 ranks, and a rank killed mid-call.
//! (A mismatched call over UCX is in `collectives/tests/ucx.rs`.)

#![cfg(feature = "ucx")]
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

const OXRUN: &str = env!("CARGO_BIN_EXE_oxrun");
const CHECK: &str = env!("CARGO_BIN_EXE_oxccl-check");

/// UCX's transports this test runs over: shared memory (posix, sysv, cma)
/// and TCP, as `UCX_TLS` names them.
const TLS: [&str; 2] = ["tcp", "sm"];

fn oxrun(n: usize, args: &[&str], tls: &str, vars: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(OXRUN)
        .args(["-n", &n.to_string(), "--timeout", "120", "--", CHECK])
        .args(args)
        .env("OXCCL_TIMEOUT", "60")
        .env("OXCCL_TRANSPORT", "ucx")
        .env("UCX_TLS", tls)
        .envs(vars.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The ranks say their ring links are UCX links, not sockets.
#[test]
fn oxccl_transport_ucx_links_every_rank_over_ucx() {
    for tls in TLS {
        let (ok, stdout, stderr) = oxrun(
            3,
            &["-c", "all_reduce", "-b", "64K", "-i", "1"],
            tls,
            &[("OXCCL_DEBUG", "info")],
        );
        assert!(ok, "{tls}:\n{stdout}\n{stderr}");
        for r in 0..3 {
            let line = stderr
                .lines()
                .find(|l| l.contains(&format!("rank {r}: to rank")))
                .unwrap_or_else(|| panic!("rank {r} did not log its links:\n{stderr}"));
            assert_eq!(line.matches("over ucx (control tcp").count(), 2, "{line}");
        }
    }
}

#[test]
fn every_collective_with_2_to_4_ranks_over_ucx_tcp_and_sm() {
    for tls in TLS {
        for n in [2, 3, 4] {
            for args in [
                &["-c", "all", "-b", "1M", "-i", "2"][..],
                &[
                    "-c",
                    "all",
                    "-b",
                    "4100",
                    "-d",
                    "bf16",
                    "-o",
                    "avg",
                    "-r",
                    "1",
                    "--in-place",
                ][..],
                &["-c", "all", "-b", "999", "-d", "i8", "-o", "max", "-r", "1"][..],
                &[
                    "-c", "all", "-b", "100K", "-d", "f64", "-o", "prod", "-r", "2",
                ][..],
            ] {
                if args.contains(&"-r") && args.contains(&"2") && n < 3 {
                    continue;
                }
                let (ok, stdout, stderr) = oxrun(n, args, tls, &[]);
                assert!(ok, "{n} ranks UCX_TLS={tls} {args:?}:\n{stdout}\n{stderr}");
                for kind in [
                    "all_reduce",
                    "broadcast",
                    "reduce ",
                    "all_gather",
                    "reduce_scatter",
                    "barrier",
                ] {
                    let line = stdout
                        .lines()
                        .find(|l| l.starts_with("[0] ") && l.contains(kind))
                        .unwrap_or_else(|| {
                            panic!("{n} ranks {args:?}: no line for {kind}:\n{stdout}")
                        });
                    assert!(
                        line.contains(&format!("{n} ranks")) && line.ends_with("result OK"),
                        "UCX_TLS={tls}: {line}"
                    );
                }
            }
        }
    }
}

/// The exchanges make their links on first use: over UCX too.
#[test]
fn every_exchange_over_ucx_tcp_and_sm() {
    let kinds = [
        "all_to_all",
        "gather",
        "scatter",
        "send_recv",
        "all_to_all_v",
        "all_gather_v",
        "reduce_scatter_v",
    ];
    for (tls, n) in [("tcp", 3), ("sm", 4)] {
        for kind in kinds {
            let args = ["-c", kind, "-b", "300K", "-i", "2", "-r", "1"];
            let (ok, stdout, stderr) = oxrun(n, &args, tls, &[]);
            assert!(ok, "{n} ranks UCX_TLS={tls} {args:?}:\n{stdout}\n{stderr}");
            let line = stdout
                .lines()
                .find(|l| l.starts_with(&format!("[0] {kind} ")))
                .unwrap_or_else(|| panic!("{n} ranks {args:?}: no line:\n{stdout}"));
            assert!(
                line.contains(&format!("{n} ranks")) && line.ends_with("result OK"),
                "UCX_TLS={tls}: {line}"
            );
        }
    }
}

/// Every algorithm's pair links over UCX.
#[test]
fn every_algorithm_over_ucx() {
    for algo in ["halving_doubling", "recursive_doubling", "tree"] {
        let args = ["-c", "all", "-b", "4100", "-o", "sum", "-r", "2"];
        let (ok, stdout, stderr) = oxrun(4, &args, "tcp", &[("OXCCL_ALGO", algo)]);
        assert!(ok, "{algo}:\n{stdout}\n{stderr}");
        let checked = stdout
            .lines()
            .filter(|l| l.starts_with("[0] ") && l.ends_with("result OK"))
            .count();
        assert!(checked >= 6, "{algo}:\n{stdout}");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn stderr_of(c: &mut Child) -> String {
    let mut s = String::new();
    c.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

/// Starts 4 ranks looping 1 MiB allreduces over UCX, kills rank `victim`
/// mid-loop, and checks that every other rank fails within `bound` with an
/// error naming it; over UCX's TCP, with UCX's own status text.
fn kill_rank_of_4(tls: &str, victim: usize, bound: Duration) {
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
                .env("OXCCL_TRANSPORT", "ucx")
                .env("UCX_TLS", tls)
                .env("OXCCL_TIMEOUT", "60")
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
            "a rank ended before the kill: {}",
            stderr_of(c)
        );
    }
    let pid = Pid::from_raw(ranks[victim].id() as i32).unwrap();
    kill_process(pid, Signal::KILL).unwrap();
    let at = Instant::now();
    let mut failures = Vec::new();
    let mut ucx_said = 0;
    for (r, c) in ranks.iter_mut().enumerate() {
        if r == victim {
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
        let err = stderr_of(c);
        let line = err
            .lines()
            .find(|l| l.starts_with("oxccl-check: "))
            .unwrap_or("")
            .to_owned();
        eprintln!("UCX_TLS={tls}: rank {r} after {took:?}: {line}");
        ucx_said += usize::from(line.contains("(UCX status "));
        let named = line.contains(&format!("rank {victim} failed"));
        if status.success() || took > bound || !named {
            failures.push(format!("rank {r} after {took:?} ({status}): {err}"));
        }
    }
    let _ = ranks[victim].wait();
    assert!(
        failures.is_empty(),
        "UCX_TLS={tls}, rank {victim} killed, bound {bound:?}:\n{}",
        failures.join("\n")
    );
    if tls == "tcp" {
        // UCX's TCP transport sees the peer go and says how.
        assert!(ucx_said > 0, "no survivor quoted UCX's status");
    }
}

#[test]
fn a_rank_killed_mid_allreduce_over_ucx_tcp_is_named_by_every_survivor_within_2s() {
    kill_rank_of_4("tcp", 2, Duration::from_secs(2));
}

#[test]
fn a_rank_killed_mid_allreduce_over_ucx_sm_is_named_by_every_survivor_within_2s() {
    kill_rank_of_4("sm", 1, Duration::from_secs(2));
}
