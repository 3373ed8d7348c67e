//! Tests of the `oxrun` launcher, with `/bin/sh -c` as the ranks' program.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn oxrun() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_oxrun"));
    // Keep the children's environment predictable.
    for v in [
        "OXCCL_RANK",
        "OXCCL_JOB_SECRET",
        "OXCCL_JOB_SECRET_FILE",
        "RANK",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_RANK",
    ] {
        c.env_remove(v);
    }
    c
}

fn run(cmd: &mut Command) -> (Output, Duration) {
    let t = Instant::now();
    let out = cmd.output().unwrap();
    (out, t.elapsed())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sh(n: &str, script: &str) -> Command {
    let mut c = oxrun();
    c.args(["-n", n, "--", "/bin/sh", "-c", script]);
    c
}

#[test]
fn sets_variables_and_prefixes_output() {
    let (out, _) = run(&mut sh(
        "3",
        "echo rank=$OXCCL_RANK world=$OXCCL_WORLD_SIZE torch=$RANK/$WORLD_SIZE \
         local=$LOCAL_RANK lws=$LOCAL_WORLD_SIZE addr=$MASTER_ADDR/$OXCCL_MASTER_ADDR \
         port=$MASTER_PORT oxport=$OXCCL_MASTER_PORT; echo err >&2; printf 'no newline'",
    ));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let mut ports = Vec::new();
    for r in 0..3 {
        let prefix = format!("[{r}] rank={r} world=3 torch={r}/3 local={r} lws=3 ");
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no line for rank {r} in:\n{stdout}"));
        assert!(line.contains("addr=127.0.0.1/127.0.0.1"), "{line}");
        let port: u16 = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("port="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(line.ends_with(&format!("oxport={port}")), "{line}");
        assert_ne!(port, 0);
        ports.push(port);
        assert!(
            stdout.lines().any(|l| l == format!("[{r}] no newline")),
            "{stdout}"
        );
        assert!(
            stderr.lines().any(|l| l == format!("[{r}] err")),
            "{stderr}"
        );
    }
    assert!(ports.iter().all(|&p| p == ports[0]), "{ports:?}");
    assert!(stderr.contains("[1] err"));
}

#[test]
fn explicit_master_addr_and_port() {
    let mut c = oxrun();
    c.args([
        "-n",
        "2",
        "--master-addr",
        "10.1.2.3",
        "--master-port",
        "29555",
        "/bin/sh",
        "-c",
        "echo $MASTER_ADDR:$OXCCL_MASTER_PORT",
    ]);
    let (out, _) = run(&mut c);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("[0] 10.1.2.3:29555"), "{stdout}");
    assert!(stdout.contains("[1] 10.1.2.3:29555"), "{stdout}");
}

#[test]
fn clears_other_launchers_variables() {
    let mut c = sh(
        "2",
        "echo slurm=${SLURM_PROCID:-unset} ompi=${OMPI_COMM_WORLD_RANK:-unset} pmi=${PMI_RANK:-unset}",
    );
    c.env("SLURM_PROCID", "7")
        .env("OMPI_COMM_WORLD_RANK", "5")
        .env("PMI_RANK", "6")
        .env("UNRELATED_VAR", "kept");
    let (out, _) = run(&mut c);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    for r in 0..2 {
        assert!(
            stdout.contains(&format!("[{r}] slurm=unset ompi=unset pmi=unset")),
            "{stdout}"
        );
    }
    // Other variables are passed through.
    let (out, _) = run(oxrun().env("UNRELATED_VAR", "kept").args([
        "-n",
        "1",
        "/bin/sh",
        "-c",
        "echo $UNRELATED_VAR",
    ]));
    assert!(text(&out.stdout).contains("[0] kept"));
}

#[test]
fn failing_rank_stops_the_job_with_its_status() {
    let (out, elapsed) = run(&mut sh(
        "4",
        r#"if [ "$OXCCL_RANK" = 2 ]; then echo dying >&2; exit 3; fi; sleep 30"#,
    ));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
    assert!(stderr.contains("rank 2 exited with status 3"), "{stderr}");
    assert!(stderr.contains("[2] dying"), "{stderr}");
    // The rank's own output comes before oxrun's report.
    assert!(
        stderr.find("[2] dying").unwrap() < stderr.find("rank 2 exited").unwrap(),
        "{stderr}"
    );
}

#[test]
fn first_failure_determines_exit_code() {
    // Rank 0 fails at once with 5; rank 1 fails later (within the grace) with 7.
    let (out, _) = run(&mut sh(
        "2",
        r#"if [ "$OXCCL_RANK" = 0 ]; then exit 5; fi; sleep 0.5; exit 7"#,
    ));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("rank 0 exited with status 5"), "{stderr}");
}

#[test]
fn rank_killed_by_signal() {
    let (out, elapsed) = run(&mut sh(
        "3",
        r#"if [ "$OXCCL_RANK" = 1 ]; then kill -9 $$; fi; sleep 30"#,
    ));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(137), "{stderr}");
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
    assert!(stderr.contains("rank 1 was killed by signal 9"), "{stderr}");
}

#[test]
fn timeout_kills_the_job() {
    let (out, elapsed) = run(oxrun().args(["-n", "2", "--timeout", "1", "sleep", "30"]));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{stderr}");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert!(
        stderr.contains("job timed out after 1 s; killing 2 ranks still running"),
        "{stderr}"
    );
}

#[test]
fn missing_program_exits_127() {
    let (out, elapsed) =
        run(oxrun().args(["-n", "2", "/nonexistent/oxrun-test-no-such-program", "x"]));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(127), "{stderr}");
    assert!(stderr.contains("oxrun-test-no-such-program"), "{stderr}");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}

#[test]
fn usage_errors() {
    let (out, _) = run(oxrun().args(["-n", "0", "/bin/true"]));
    assert_eq!(out.status.code(), Some(2));
    let (out, _) = run(oxrun().args(["-n", "2"]));
    assert_eq!(out.status.code(), Some(2));
    let (out, _) = run(oxrun().args(["/bin/true"]));
    assert_eq!(out.status.code(), Some(2));
    let (out, _) = run(oxrun().args(["-n", "1", "--timeout", "0", "/bin/true"]));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn program_arguments_with_dashes_are_passed_through() {
    let (out, _) = run(oxrun().args(["-n", "1", "/bin/echo", "-n", "--help"]));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "[0] --help\n");
}

#[test]
fn help_documents_variables() {
    let (out, _) = run(oxrun().arg("--help"));
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for word in [
        "OXCCL_RANK",
        "MASTER_PORT",
        "SLURM_PROCID",
        "--timeout",
        "124",
    ] {
        assert!(help.contains(word), "missing {word} in:\n{help}");
    }
}

/// Processes started by the ranks are killed with the job, and do not keep
/// oxrun waiting on the output pipes they inherited.
#[cfg(target_os = "linux")]
#[test]
fn stopping_the_job_kills_processes_started_by_ranks() {
    let pidfile = std::env::temp_dir().join(format!("oxrun-test-{}.pid", std::process::id()));
    let _ = std::fs::remove_file(&pidfile);
    let script = format!(
        r#"if [ "$OXCCL_RANK" = 0 ]; then sleep 0.3; exit 1; fi; sleep 30 & echo $! > {}; wait"#,
        pidfile.display()
    );
    let (out, elapsed) = run(&mut sh("2", &script));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    assert!(stderr.contains("killing 1 rank still running"), "{stderr}");
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let _ = std::fs::remove_file(&pidfile);
    let stat = format!("/proc/{}/stat", pid.trim());
    let t = Instant::now();
    loop {
        // Gone, or a zombie waiting for init to reap it.
        match std::fs::read_to_string(&stat) {
            Err(_) => break,
            Ok(s) if s.rsplit(')').next().unwrap().trim_start().starts_with('Z') => break,
            Ok(s) => assert!(t.elapsed() < Duration::from_secs(2), "still alive: {s}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every rank of a job gets the same secret, fresh for each job; a secret
/// in oxrun's environment is passed on instead.
#[test]
fn gives_each_job_a_fresh_secret() {
    let secrets = |cmd: &mut Command| -> Vec<String> {
        let (out, _) = run(cmd);
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{stdout}\n{}",
            text(&out.stderr)
        );
        let mut v: Vec<String> = stdout
            .lines()
            .filter_map(|l| l.split_once("secret=").map(|(_, s)| s.to_string()))
            .collect();
        v.sort();
        v
    };
    let first = secrets(&mut sh("3", "echo secret=$OXCCL_JOB_SECRET"));
    assert_eq!(first.len(), 3, "{first:?}");
    assert!(first.iter().all(|s| *s == first[0]), "{first:?}");
    assert_eq!(first[0].len(), 64, "{first:?}");
    assert!(first[0].bytes().all(|b| b.is_ascii_hexdigit()), "{first:?}");
    let second = secrets(&mut sh("2", "echo secret=$OXCCL_JOB_SECRET"));
    assert_ne!(first[0], second[0], "two jobs got the same secret");
    let given = secrets(sh("2", "echo secret=$OXCCL_JOB_SECRET").env("OXCCL_JOB_SECRET", "mine"));
    assert_eq!(given, vec!["mine", "mine"]);
    let file = secrets(
        sh("1", "echo secret=$OXCCL_JOB_SECRET").env("OXCCL_JOB_SECRET_FILE", "/some/file"),
    );
    assert_eq!(file, vec![""]);
}

/// `--keep-going`: a rank killed by a signal is reported and the others
/// run to their end (exit 0 when they all exit 0); a rank that exits with
/// an error fails the job with its status, after the others finished.
#[test]
fn keep_going_lets_the_others_finish() {
    let mut c = oxrun();
    c.args(["--keep-going", "-n", "3", "--", "/bin/sh", "-c"])
        .arg("if [ \"$OXCCL_RANK\" = 1 ]; then kill -9 $$; fi; sleep 3; echo done");
    let (out, took) = run(&mut c);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("rank 1 was killed by signal 9"), "{stderr}");
    assert!(
        stdout.contains("[0] done") && stdout.contains("[2] done"),
        "{stdout}"
    );
    assert!(took >= Duration::from_secs(3), "{took:?}");

    let mut c = oxrun();
    c.args(["--keep-going", "-n", "2", "--", "/bin/sh", "-c"])
        .arg("if [ \"$OXCCL_RANK\" = 1 ]; then exit 3; fi; sleep 3; echo done");
    let (out, _) = run(&mut c);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("[0] done"));
}

/// Ranks that fit the CPUs are pinned one per CPU, as mpirun binds to
/// cores; `--bind-to none` leaves them where oxrun may run.
#[test]
fn ranks_are_pinned_to_cores_when_they_fit() {
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let own = own
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let lists = |extra: &[&str], n: &str| {
        let mut c = oxrun();
        c.args(extra).args([
            "-n",
            n,
            "--",
            "/bin/sh",
            "-c",
            "grep Cpus_allowed_list /proc/self/status",
        ]);
        let (out, _) = run(&mut c);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let mut v: Vec<(usize, String)> = text(&out.stdout)
            .lines()
            .map(|l| {
                let r: usize = l[1..l.find(']').unwrap()].parse().unwrap();
                (r, l.split_whitespace().last().unwrap().to_string())
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, l)| l).collect::<Vec<_>>()
    };
    let pinned = lists(&[], "1");
    assert!(
        !pinned[0].contains(['-', ',']),
        "rank 0 runs on {} (oxrun on {own})",
        pinned[0]
    );
    assert_eq!(lists(&["--bind-to", "none"], "1"), vec![own.clone()]);
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    if ncpu >= 2 {
        let two = lists(&[], "2");
        assert_ne!(two[0], two[1], "two ranks on one CPU: {two:?}");
    }
    // More ranks than CPUs: none is pinned.
    let many = lists(&[], &(ncpu + 1).to_string());
    assert!(many.iter().all(|l| *l == own), "{many:?} vs {own}");
}
