//! Real processes on this host, over shared memory (what `auto` picks here)
//! and over loopback TCP: jobs started through `oxrun`, through
//! torchrun-style variables, and a rank killed with SIGKILL or stopped with SIGSTOP mid-allreduce.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{CHECK, OXRUN, free_port, oxrun, signal_rank_of_4, stderr_of};
use rustix::process::Signal;

/// oxrun's secret authenticates the job: with OXCCL_AUTH=require the ranks
/// have one (or init would fail), and the collectives run over both links.
#[test]
fn an_oxrun_job_is_authenticated() {
    for transport in ["shm", "tcp"] {
        let (ok, stdout, stderr) = oxrun(
            3,
            &["-c", "all_reduce", "-b", "64K", "-i", "1"],
            &[
                ("OXCCL_AUTH", "require"),
                ("OXCCL_TRANSPORT", transport),
                ("OXCCL_DEBUG", "info"),
            ],
        );
        assert!(ok, "{transport}:\n{stdout}\n{stderr}");
        assert!(stdout.contains("all_reduce"), "{stdout}");
        for r in 0..3 {
            let said = format!("rank {r}: every link authenticated with the job secret");
            assert!(
                stderr.contains(&said),
                "{transport}: no '{said}' in:\n{stderr}"
            );
        }
    }
    // Without oxrun's secret (OXCCL_AUTH=require, and the ranks' secret
    // taken away by a wrapper), init fails naming the variable.
    let out = Command::new(OXRUN)
        .args([
            "-n",
            "2",
            "--timeout",
            "60",
            "--",
            "/usr/bin/env",
            "-u",
            "OXCCL_JOB_SECRET",
            CHECK,
        ])
        .args(["-c", "all_reduce", "-b", "1K", "-i", "1"])
        .env("OXCCL_TIMEOUT", "10")
        .env("OXCCL_AUTH", "require")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("OXCCL_JOB_SECRET"), "{stderr}");
}

#[test]
fn every_collective_through_oxrun_with_2_and_4_ranks_over_shm_and_tcp() {
    for (n, transport) in [(2, "shm"), (4, "shm"), (2, "tcp"), (4, "tcp")] {
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
        ] {
            let (ok, stdout, stderr) = oxrun(n, args, &[("OXCCL_TRANSPORT", transport)]);
            assert!(ok, "{n} ranks {transport} {args:?}:\n{stdout}\n{stderr}");
            common::assert_every_kind_ok(
                &stdout,
                &common::RING_KINDS,
                n,
                &format!("{n} ranks {transport} {args:?}"),
            );
        }
    }
}

/// The exchanges and sends/receives across processes, 2 to 4 ranks over
/// both transports: their links beyond the ring are made on first use over
/// TCP (and become shared memory on one host), and every result checks
/// out, also with per-rank counts of 0, half and all of a block.
#[test]
fn every_exchange_through_oxrun_with_2_to_4_ranks_over_shm_and_tcp() {
    let kinds = [
        "all_to_all",
        "gather",
        "scatter",
        "send_recv",
        "all_to_all_v",
        "all_gather_v",
        "reduce_scatter_v",
    ];
    for (n, transport) in [(2, "shm"), (3, "tcp"), (4, "shm"), (4, "tcp")] {
        for kind in kinds {
            for args in [
                &["-b", "300K", "-i", "2", "-r", "1"][..],
                &["-b", "999", "-d", "bf16", "-o", "avg", "-r", "1"][..],
            ] {
                let mut all = vec!["-c", kind];
                all.extend_from_slice(args);
                let (ok, stdout, stderr) = oxrun(n, &all, &[("OXCCL_TRANSPORT", transport)]);
                assert!(ok, "{n} ranks {transport} {all:?}:\n{stdout}\n{stderr}");
                common::assert_exchange_ok(&stdout, kind, n, &format!("{transport} {all:?}"));
            }
        }
    }
}

/// Every algorithm forced, across processes, on worlds that are and are
/// not powers of two: their pair links connect over TCP and become shared
/// memory like the ring's, and every result checks out.
#[test]
fn every_algorithm_across_processes_over_shm_and_tcp() {
    for algo in ["halving_doubling", "recursive_doubling", "tree"] {
        for (n, transport) in [(3, "shm"), (4, "tcp"), (5, "shm")] {
            let args = ["-c", "all", "-b", "4100", "-o", "sum", "-r", "2"];
            let (ok, stdout, stderr) = oxrun(
                n,
                &args,
                &[("OXCCL_TRANSPORT", transport), ("OXCCL_ALGO", algo)],
            );
            assert!(ok, "{algo} {n} ranks {transport}:\n{stdout}\n{stderr}");
            let checked = stdout
                .lines()
                .filter(|l| l.starts_with("[0] ") && l.ends_with("result OK"))
                .count();
            assert!(checked >= 6, "{algo} {n} ranks {transport}:\n{stdout}");
        }
    }
}

/// Starts `n` ranks of `oxccl-check` with the environment `vars(rank)` sets.
fn spawn_ranks(
    n: usize,
    args: &[&str],
    vars: impl Fn(usize) -> Vec<(String, String)>,
) -> Vec<Child> {
    (0..n)
        .map(|r| {
            Command::new(CHECK)
                .args(args)
                .envs(vars(r))
                .env("OXCCL_TIMEOUT", "60")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

#[test]
fn torchrun_variables_are_enough() {
    let port = free_port().to_string();
    let mut ranks = spawn_ranks(3, &["-c", "all_reduce", "-b", "64K"], |r| {
        vec![
            ("RANK".into(), r.to_string()),
            ("WORLD_SIZE".into(), "3".into()),
            ("MASTER_ADDR".into(), "127.0.0.1".into()),
            ("MASTER_PORT".into(), port.clone()),
        ]
    });
    for c in &mut ranks {
        let status = c.wait().unwrap();
        let err = stderr_of(c);
        assert!(status.success(), "{err}");
    }
}

#[test]
fn auto_picks_shared_memory_on_one_host_and_tcp_when_asked() {
    let args = ["-c", "all_reduce", "-b", "64K"];
    let (ok, stdout, stderr) = oxrun(3, &args, &[("OXCCL_DEBUG", "info")]);
    assert!(ok, "{stdout}\n{stderr}");
    for r in 0..3 {
        let line = stderr
            .lines()
            .find(|l| l.contains(&format!("rank {r}: to rank")))
            .unwrap_or_else(|| panic!("rank {r} did not log its links:\n{stderr}"));
        assert_eq!(line.matches("over shm /oxccl-").count(), 2, "{line}");
    }
    let (ok, stdout, stderr) = oxrun(
        3,
        &args,
        &[("OXCCL_DEBUG", "info"), ("OXCCL_TRANSPORT", "tcp")],
    );
    assert!(ok, "{stdout}\n{stderr}");
    assert!(!stderr.contains("over shm"), "{stderr}");
    assert_eq!(stderr.matches(": to rank").count(), 3, "{stderr}");
    assert_eq!(stderr.matches("over tcp 127.0.0.1").count(), 6, "{stderr}");
}

#[test]
fn a_rank_killed_mid_allreduce_over_shm_is_named_by_every_survivor_within_10s() {
    signal_rank_of_4_on("shm", 2, Signal::KILL, 60, Duration::from_secs(10));
}

#[test]
fn a_rank_killed_mid_allreduce_over_tcp_is_named_by_every_survivor_within_10s() {
    signal_rank_of_4_on("tcp", 2, Signal::KILL, 60, Duration::from_secs(10));
}

/// Rank 0 serves the store: the survivors cannot read the reports there,
/// and still name rank 0, not the neighbour that passed its failure on.
#[test]
fn a_killed_rank_0_is_named_by_every_survivor_within_2s_on_both_transports() {
    for transport in ["shm", "tcp"] {
        signal_rank_of_4_on(transport, 0, Signal::KILL, 60, Duration::from_secs(2));
    }
}

/// A stopped rank 0 stops the store too: the survivors give up on it within
/// the failure protocol's grace (half of OXCCL_TIMEOUT), not the store
/// client's 30 s, and name rank 0.
#[test]
fn a_stopped_rank_0_is_named_by_every_survivor_within_twice_the_timeout_on_both_transports() {
    for transport in ["shm", "tcp"] {
        signal_rank_of_4_on(transport, 0, Signal::STOP, 2, Duration::from_secs(4));
    }
}

/// The rank an error message names as the origin: its first "rank N failed",
/// else the rank its own timeout waited on.
fn origin_named(msg: &str) -> Option<usize> {
    let after = |pat: &str, end: &str| {
        msg.match_indices(pat).find_map(|(i, _)| {
            let rest = &msg[i + pat.len()..];
            let n = rest.bytes().take_while(u8::is_ascii_digit).count();
            (n > 0 && rest[n..].starts_with(end)).then(|| rest[..n].parse().ok())?
        })
    };
    after("rank ", " failed")
        .or_else(|| after("data from rank ", ""))
        .or_else(|| after("rank ", " to take data"))
}

/// Sends `sig` to rank `victim` of a looping 4-rank job and checks that
/// every other rank fails within `bound` with an error naming `victim` as
/// the origin (rank `victim`'s neighbours may add that the other neighbour
/// hung up too, having learned of it first).
fn signal_rank_of_4_on(
    transport: &str,
    victim: usize,
    sig: Signal,
    timeout_s: u32,
    bound: Duration,
) {
    let survivors = signal_rank_of_4(&[("OXCCL_TRANSPORT", transport)], victim, sig, timeout_s);
    let mut failures = Vec::new();
    for s in &survivors {
        eprintln!(
            "{transport}: rank {} after {:?}: {}",
            s.rank, s.took, s.line
        );
        if s.status.success() || s.took > bound || origin_named(&s.line) != Some(victim) {
            failures.push(format!(
                "rank {} after {:?} ({}): {}",
                s.rank, s.took, s.status, s.stderr
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{transport}, rank {victim} signalled ({sig:?}), bound {bound:?}:\n{}",
        failures.join("\n")
    );
}

#[test]
fn a_missing_launcher_variable_is_named() {
    let out = Command::new(CHECK)
        .env_remove("OXCCL_RANK")
        .env("OXCCL_WORLD_SIZE", "2")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("OXCCL_RANK: is not set, but OXCCL_WORLD_SIZE is"),
        "{err}"
    );
}
