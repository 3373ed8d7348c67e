//! The `*_perf` binaries as real rank processes over loopback TCP, started
//! the way a launcher starts them (OXCCL_RANK, OXCCL_WORLD_SIZE,
//! OXCCL_MASTER_ADDR, OXCCL_MASTER_PORT), with their table parsed.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};

const ALL_REDUCE: &str = env!("CARGO_BIN_EXE_all_reduce_perf");
const ALL_GATHER: &str = env!("CARGO_BIN_EXE_all_gather_perf");
const BROADCAST: &str = env!("CARGO_BIN_EXE_broadcast_perf");
const REDUCE_SCATTER: &str = env!("CARGO_BIN_EXE_reduce_scatter_perf");
const REDUCE: &str = env!("CARGO_BIN_EXE_reduce_perf");
const ALLTOALL: &str = env!("CARGO_BIN_EXE_alltoall_perf");
const GATHER: &str = env!("CARGO_BIN_EXE_gather_perf");
const SCATTER: &str = env!("CARGO_BIN_EXE_scatter_perf");
const SENDRECV: &str = env!("CARGO_BIN_EXE_sendrecv_perf");
const HYPERCUBE: &str = env!("CARGO_BIN_EXE_hypercube_perf");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `world` ranks of `bin` with `args`; returns each rank's output, in rank order.
fn run_ranks(bin: &str, world: usize, args: &[&str]) -> Vec<Output> {
    let port = free_port().to_string();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(bin)
                .args(args)
                .env("OXCCL_RANK", rank.to_string())
                .env("OXCCL_WORLD_SIZE", world.to_string())
                .env("OXCCL_LOCAL_RANK", rank.to_string())
                .env("OXCCL_MASTER_ADDR", "127.0.0.1")
                .env("OXCCL_MASTER_PORT", &port)
                .env("OXCCL_TIMEOUT", "60")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A parsed table row: size, count, type, redop, root, then (time, algbw, busbw, #wrong) twice
/// (busbw `None` where the table says N/A).
#[derive(Debug)]
struct Row {
    size: usize,
    count: usize,
    dtype: String,
    redop: String,
    root: i64,
    busbw: [Option<f64>; 2],
    wrong: [String; 2],
}

fn rows(stdout: &str) -> Vec<Row> {
    stdout
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 13, "not a table row: {l}");
            Row {
                size: f[0].parse().unwrap(),
                count: f[1].parse().unwrap(),
                dtype: f[2].into(),
                redop: f[3].into(),
                root: f[4].parse().unwrap(),
                busbw: [f[7].parse().ok(), f[11].parse().ok()],
                wrong: [f[8].into(), f[12].into()],
            }
        })
        .collect()
}

/// Runs `bin` on 2 and 4 ranks over sizes 8 B .. 32 KiB and checks the table.
fn clean_run(bin: &str, redop: &str, root: i64, per_rank: bool) {
    clean_run_with(bin, redop, root, per_rank, true, &[]);
}

/// [`clean_run`] with `extra` flags; without `in_place`, the in-place
/// columns must say N/A.
fn clean_run_with(
    bin: &str,
    redop: &str,
    root: i64,
    per_rank: bool,
    in_place: bool,
    extra: &[&str],
) {
    for world in [2, 4] {
        let mut args = vec!["-b", "8", "-e", "32K", "-f", "8", "-n", "2", "-w", "1"];
        args.extend_from_slice(extra);
        let out = run_ranks(bin, world, &args);
        let report = || {
            out.iter()
                .enumerate()
                .map(|(r, o)| {
                    format!(
                        "rank {r}: {}\n{}\n{}",
                        o.status,
                        text(&o.stdout),
                        text(&o.stderr)
                    )
                })
                .collect::<String>()
        };
        assert!(out.iter().all(|o| o.status.success()), "{}", report());
        let stdout = text(&out[0].stdout);
        assert!(stdout.starts_with("# nThread 1 nGpus 1 minBytes 8 maxBytes 32768 step: 8(factor) warmup iters: 1 iters: 2 agg iters: 1 validation: 1 graph: 0\n"), "{stdout}");
        for r in 0..world {
            assert!(
                stdout.contains(&format!("#  Rank {r:2} Group  0 Pid")),
                "{stdout}"
            );
        }
        assert!(
            stdout.contains("# Out of bounds values : 0 OK\n"),
            "{stdout}"
        );
        assert!(stdout.contains("# Avg bus bandwidth    : "), "{stdout}");
        let rows = rows(&stdout);
        assert_eq!(rows.len(), 5, "{stdout}");
        for (row, want) in rows.iter().zip([8usize, 64, 512, 4096, 32768]) {
            let count = if per_rank { want / 4 / world } else { want / 4 };
            let size = if per_rank { count * 4 * world } else { want };
            assert_eq!((row.size, row.count), (size, count), "{stdout}");
            assert_eq!(row.dtype, "float");
            assert_eq!(row.redop, redop);
            assert_eq!(row.root, root);
            let in_place_wrong = if in_place { "0" } else { "N/A" };
            assert_eq!(row.wrong, ["0", in_place_wrong], "{stdout}");
            assert!(row.busbw[0].is_some_and(|b| b.is_finite() && b >= 0.0));
            assert_eq!(row.busbw[1].is_some(), in_place, "{stdout}");
        }
        // Other ranks print nothing.
        for o in &out[1..] {
            assert!(o.stdout.is_empty(), "{}", report());
        }
    }
}

#[test]
fn all_reduce_perf_on_2_and_4_ranks() {
    clean_run(ALL_REDUCE, "sum", -1, false);
}

#[test]
fn all_gather_perf_on_2_and_4_ranks() {
    clean_run(ALL_GATHER, "none", -1, true);
}

#[test]
fn broadcast_perf_on_2_and_4_ranks() {
    clean_run(BROADCAST, "none", 0, false);
}

#[test]
fn reduce_scatter_perf_on_2_and_4_ranks() {
    clean_run(REDUCE_SCATTER, "sum", -1, true);
}

#[test]
fn reduce_perf_on_2_and_4_ranks() {
    clean_run(REDUCE, "sum", 0, false);
}

#[test]
fn alltoall_perf_on_2_and_4_ranks() {
    clean_run_with(ALLTOALL, "none", -1, true, false, &[]);
}

#[test]
fn gather_perf_on_2_and_4_ranks() {
    clean_run_with(GATHER, "none", 1, true, false, &["-r", "1"]);
}

#[test]
fn scatter_perf_on_2_and_4_ranks() {
    clean_run_with(SCATTER, "none", 1, true, false, &["-r", "1"]);
}

#[test]
fn sendrecv_perf_on_2_and_4_ranks() {
    clean_run_with(SENDRECV, "none", -1, false, false, &[]);
}

#[test]
fn hypercube_perf_checks_clean_and_skips_other_worlds() {
    for world in [2, 4] {
        let out = run_ranks(
            HYPERCUBE,
            world,
            &["-b", "1K", "-e", "64K", "-f", "8", "-n", "2"],
        );
        let stdout = text(&out[0].stdout);
        assert!(out.iter().all(|o| o.status.success()), "{stdout}");
        assert!(
            stdout.contains("# Out of bounds values : 0 OK\n"),
            "{stdout}"
        );
        let rows = rows(&stdout);
        assert_eq!(rows.len(), 3, "{stdout}");
        assert!(rows.iter().all(|r| r.wrong == ["0", "0"]), "{stdout}");
    }
    let out = run_ranks(HYPERCUBE, 3, &["-b", "1K", "-e", "1K"]);
    assert!(out.iter().all(|o| o.status.success()));
    assert!(text(&out[0].stdout).contains("nRanks 3 is not a power of 2, skipping"));
}

#[test]
fn all_reduce_perf_every_dtype_and_op() {
    let out = run_ranks(
        ALL_REDUCE,
        2,
        &[
            "-b", "64", "-e", "1K", "-f", "4", "-n", "1", "-w", "0", "-d", "all", "-o", "all",
        ],
    );
    let stdout = text(&out[0].stdout);
    assert!(
        out.iter().all(|o| o.status.success()),
        "{stdout}\n{}",
        text(&out[0].stderr)
    );
    let rows = rows(&stdout);
    assert_eq!(rows.len(), 10 * 5 * 3, "{stdout}");
    assert!(rows.iter().all(|r| r.wrong == ["0", "0"]), "{stdout}");
    for t in [
        "int8", "uint8", "int32", "uint32", "int64", "uint64", "half", "float", "double",
        "bfloat16",
    ] {
        for op in ["sum", "prod", "max", "min", "avg"] {
            assert!(
                rows.iter().any(|r| r.dtype == t && r.redop == op),
                "{t} {op}\n{stdout}"
            );
        }
    }
}

#[test]
fn corrupted_results_are_counted_and_fail_the_run() {
    // Every rank changes 3 elements of its result before the check: 2 ranks x 3.
    let out = run_ranks(
        ALL_REDUCE,
        2,
        &["-b", "1K", "-e", "1K", "-n", "1", "--debug-corrupt", "3"],
    );
    let stdout = text(&out[0].stdout);
    for o in &out {
        assert_eq!(o.status.code(), Some(1), "{stdout}\n{}", text(&o.stderr));
    }
    assert_eq!(rows(&stdout)[0].wrong, ["6", "6"], "{stdout}");
    assert!(
        stdout.contains("# Out of bounds values : 12 FAILED"),
        "{stdout}"
    );
    assert!(text(&out[0].stderr).contains("12 wrong result elements"));
    // Reduce: only the root's result is defined, so only it counts.
    let out = run_ranks(
        REDUCE,
        2,
        &[
            "-b",
            "1K",
            "-e",
            "1K",
            "-n",
            "1",
            "-r",
            "1",
            "--debug-corrupt",
            "3",
        ],
    );
    let stdout = text(&out[0].stdout);
    assert!(out.iter().all(|o| o.status.code() == Some(1)), "{stdout}");
    assert_eq!(rows(&stdout)[0].wrong, ["3", "3"], "{stdout}");
}

#[test]
fn bad_flags_exit_2_with_a_clear_message() {
    for (args, want) in [
        (&["-d", "float128"][..], "unknown data type 'float128'"),
        (&["-o", "xor"][..], "unknown reduction op 'xor'"),
        (&["-b", "1Q"][..], "'1Q' is not a size in bytes"),
        (&["-b", "2M", "-e", "1M"][..], "larger than the largest"),
        (&["--device", "tpu"][..], "not one of cpu"),
    ] {
        let out = Command::new(ALL_REDUCE).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains(want),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    let out = Command::new(BROADCAST).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("--stepfactor"));
    // A root outside the world: every rank stops, rank 0 says why.
    let out = run_ranks(REDUCE, 2, &["-r", "2", "-b", "8", "-e", "8"]);
    assert!(out.iter().all(|o| o.status.code() == Some(2)));
    assert!(text(&out[0].stderr).contains("root 2 (-r) is not a rank of this world of 2"));
}

/// The scale model's binary on small worlds: one row per algorithm and
/// size that can run, select's pick among them, and at 64 ranks the
/// latency algorithms far ahead of the ring at 8 bytes.
#[test]
fn scale_model_prints_every_algorithm_and_the_pick() {
    let bin = env!("CARGO_BIN_EXE_scale_model");
    let out = Command::new(bin)
        .args([
            "--tsv", "--links", "tcp", "--worlds", "8,64", "--sizes", "8,64K",
        ])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let lines: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split('\t').collect())
        .filter(|f: &Vec<&str>| f.len() >= 7)
        .collect();
    let time = |world: &str, bytes: &str, algo: &str| -> f64 {
        lines
            .iter()
            .find(|f| f[1] == world && f[2] == bytes && f[3] == algo)
            .unwrap_or_else(|| panic!("no {algo} {world} {bytes}:\n{stdout}"))[4]
            .parse()
            .unwrap()
    };
    for algo in [
        "ring",
        "gather_reduce",
        "halving_doubling",
        "recursive_doubling",
    ] {
        for world in ["8", "64"] {
            for bytes in ["8", "65536"] {
                assert!(time(world, bytes, algo) > 0.0);
            }
        }
    }
    assert!(time("64", "8", "recursive_doubling") * 5.0 < time("64", "8", "ring"));
}
