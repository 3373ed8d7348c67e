//! The examples, run as real processes through `oxrun`, against the same
//! math done here in one process.
//!
//! `cargo test` builds the examples into `target/<profile>/examples/`, next
//! to the `oxrun` binary; with a filtered run, build them first
//! (`cargo build -p oxccl --examples`).
#![allow(clippy::unwrap_used)]

#[path = "../../collectives/examples/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> PathBuf {
    let oxrun = PathBuf::from(env!("CARGO_BIN_EXE_oxrun"));
    let path = oxrun.parent().unwrap().join("examples").join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build -p oxccl --examples` (plain `cargo test` builds it)",
        path.display()
    );
    path
}

/// Runs `name` on `world` ranks; returns each rank's `final` values, in rank order, and stdout.
fn run(name: &str, world: usize) -> (Vec<Vec<f64>>, String) {
    run_with(name, world, &[])
}

/// [`run`] with arguments for the example.
fn run_with(name: &str, world: usize, args: &[&str]) -> (Vec<Vec<f64>>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_oxrun"))
        .args(["-n", &world.to_string(), "--timeout", "120", "--"])
        .arg(example(name))
        .args(args)
        .env_remove("OXCCL_RANK")
        .env_remove("RANK")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{name}:\n{stdout}\n{stderr}");
    let finals = (0..world)
        .map(|r| {
            let prefix = format!("[{r}] final ");
            let line = stdout
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("no final line of rank {r}:\n{stdout}"));
            line[prefix.len()..]
                .split(' ')
                .map(|v| v.parse().unwrap())
                .collect()
        })
        .collect();
    (finals, stdout)
}

fn assert_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "element {i}: {g} vs {w}\n{got:?}\n{want:?}"
        );
    }
}

fn same_on_every_rank(finals: &[Vec<f64>]) {
    for (r, f) in finals.iter().enumerate() {
        assert_eq!(f, &finals[0], "rank {r} differs from rank 0");
    }
}

#[test]
fn dsgd_matches_single_process_training_and_the_loss_falls() {
    let (model, first, last) = common::dsgd_reference();
    assert!(last < 0.6 * first, "reference loss {first} -> {last}");
    let want: Vec<f64> = model.params().iter().map(|v| f64::from(*v)).collect();
    for world in [2, 4] {
        let (finals, stdout) = run("dsgd", world);
        same_on_every_rank(&finals);
        assert_close(&finals[0], &want, 1e-4);
        let line = stdout.lines().find(|l| l.starts_with("[0] loss ")).unwrap();
        let losses: Vec<f32> = line["[0] loss ".len()..]
            .split(" (")
            .next()
            .unwrap()
            .split(" -> ")
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(losses[1] < 0.6 * losses[0], "{line}");
        assert!((losses[1] - last).abs() < 1e-3, "{line} vs {last}");
    }
}

#[test]
fn model_averaging_matches_single_process_replicas() {
    for world in [2, 3] {
        let want: Vec<f64> = common::averaging_reference(world)
            .params()
            .iter()
            .map(|v| f64::from(*v))
            .collect();
        let (finals, _) = run("model_averaging", world);
        same_on_every_rank(&finals);
        assert_close(&finals[0], &want, 1e-5);
    }
}

#[test]
fn kmeans_matches_single_process_kmeans() {
    let want: Vec<f64> = common::kmeans_reference().into_iter().flatten().collect();
    let (finals, _) = run("kmeans", 3);
    same_on_every_rank(&finals);
    assert_close(&finals[0], &want, 1e-9);
}

#[test]
fn kmeans_scatter_matches_single_process_kmeans_bit_for_bit() {
    // 1001 points divide by none of 2, 3, 4; 5 points on 4 ranks: 2 + 1 + 1 + 1.
    for (world, n) in [(1, 1001), (2, 1001), (3, 1001), (4, 1001), (4, 5)] {
        let (want, _, iters) = common::kmeans_until_stable(&common::points_n(n));
        let want: Vec<f64> = want.into_iter().flatten().collect();
        let (finals, stdout) = run_with("kmeans_scatter", world, &[&n.to_string()]);
        same_on_every_rank(&finals);
        // Exact: sums of the grid points are exact in any order.
        assert_eq!(finals[0], want, "{world} ranks, {n} points:\n{stdout}");
        for line in [
            format!("[0] check ok: {n} labels"),
            format!(": {iters} iterations in "),
        ] {
            assert!(
                stdout.contains(&line),
                "{world} ranks, {n} points: no {line:?}\n{stdout}"
            );
        }
    }
}

/// `dsgd --elastic` under `oxrun --keep-going`: rank 2 of 4 dies at step
/// 20; the other three shrink and finish, on both transports, to the
/// weights and loss of undisturbed training in one process.
#[test]
fn elastic_dsgd_survives_a_rank_and_reaches_the_same_model() {
    let (model, _, last) = common::dsgd_reference();
    let want: Vec<f64> = model.params().iter().map(|v| f64::from(*v)).collect();
    for transport in ["shm", "tcp"] {
        let out = Command::new(env!("CARGO_BIN_EXE_oxrun"))
            .args(["--keep-going", "-n", "4", "--timeout", "120", "--"])
            .arg(example("dsgd"))
            .arg("--elastic")
            .env("OXCCL_TRANSPORT", transport)
            .env_remove("OXCCL_RANK")
            .env_remove("RANK")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{transport}:\n{stdout}\n{stderr}");
        assert!(stderr.contains("rank 2 was killed by signal"), "{stderr}");
        for r in [0, 1, 3] {
            let shrank = format!("[{r}] shrank to 3 ranks at step 20");
            assert!(stdout.contains(&shrank), "{transport}: {shrank}:\n{stdout}");
            let prefix = format!("[{r}] final ");
            let line = stdout.lines().find(|l| l.starts_with(&prefix)).unwrap();
            let got: Vec<f64> = line[prefix.len()..]
                .split(' ')
                .map(|v| v.parse().unwrap())
                .collect();
            assert_close(&got, &want, 1e-4);
            let loss = stdout
                .lines()
                .find(|l| l.starts_with(&format!("[{r}] loss ")))
                .unwrap();
            let end: f32 = loss
                .split(" -> ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!((end - last).abs() < 1e-3, "{loss} vs {last}");
        }
        assert!(!stdout.contains("[2] final"), "{stdout}");
    }
}
