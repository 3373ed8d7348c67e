//! The UCX link across processes (feature `ucx`), over UCX's TCP and
//! shared-memory transports (`UCX_TLS=tcp`, `UCX_TLS=sm`): every
//! collective and exchange on 2 to 4 ranks, and a rank killed mid-call.
//! (A mismatched call over UCX is in `collectives/tests/ucx.rs`.)

#![cfg(feature = "ucx")]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use rustix::process::Signal;

/// UCX's transports this test runs over: shared memory (posix, sysv, cma)
/// and TCP, as `UCX_TLS` names them.
const TLS: [&str; 2] = ["tcp", "sm"];

/// `oxrun` over UCX with `UCX_TLS=tls`.
fn oxrun(n: usize, args: &[&str], tls: &str, vars: &[(&str, &str)]) -> (bool, String, String) {
    let mut all = vec![("OXCCL_TRANSPORT", "ucx"), ("UCX_TLS", tls)];
    all.extend_from_slice(vars);
    common::oxrun(n, args, &all)
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
                common::assert_every_kind_ok(
                    &stdout,
                    &common::RING_KINDS,
                    n,
                    &format!("{n} ranks UCX_TLS={tls} {args:?}"),
                );
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
            common::assert_exchange_ok(&stdout, kind, n, &format!("UCX_TLS={tls} {args:?}"));
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

/// Kills rank `victim` of a 4-rank job looping 1 MiB allreduces over UCX
/// and checks that every other rank fails within `bound` with an error
/// naming it; over UCX's TCP, with UCX's own status text.
fn kill_rank_of_4(tls: &str, victim: usize, bound: Duration) {
    let survivors = common::signal_rank_of_4(
        &[("OXCCL_TRANSPORT", "ucx"), ("UCX_TLS", tls)],
        victim,
        Signal::KILL,
        60,
    );
    let mut failures = Vec::new();
    let mut ucx_said = 0;
    for s in &survivors {
        eprintln!(
            "UCX_TLS={tls}: rank {} after {:?}: {}",
            s.rank, s.took, s.line
        );
        ucx_said += usize::from(s.line.contains("(UCX status "));
        let named = s.line.contains(&format!("rank {victim} failed"));
        if s.status.success() || s.took > bound || !named {
            failures.push(format!(
                "rank {} after {:?} ({}): {}",
                s.rank, s.took, s.status, s.stderr
            ));
        }
    }
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
