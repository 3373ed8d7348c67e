//! `oxccl-chaos`: kills or stops a random rank of a looping job at a random
//! moment and checks that every survivor fails in time, naming that rank.
//!
//! `oxccl-chaos run` starts, for each trial, the ranks of a job (this same
//! binary's `job` subcommand: allreduces of a few sizes, in a loop, until it
//! fails) directly, with the variables `oxrun` would set, so that it knows
//! every rank's pid and the moment each exits. Once every rank has
//! completed a first round of calls it waits a random moment, sends
//! SIGKILL (`--scenario kill`) or SIGSTOP (`--scenario stop`, with
//! `OXCCL_TIMEOUT` set to `--stop-timeout`) to a random rank (rank 0, which
//! serves the store, included), and classifies each survivor:
//!
//! * right: it exited with an error whose culprit is the signalled rank,
//!   within the scenario's bound;
//! * late: as right, after the bound;
//! * wrong: an error naming another rank, or none;
//! * clean: it exited 0;
//! * hang: still running at `--hang` seconds after the signal (then killed).
//!
//! The culprit of an error message is the origin it names: the first
//! "rank N failed" in it; in a message without one (this rank's own
//! timeout, a closed link), the first of "data from rank N", "rank N to
//! take data", "rank N closed" and "mismatch with rank N".
//!
//! Counts are printed per scenario and transport; the exit status is 1 on
//! any late, wrong, clean or hang survivor, or a trial that could not start.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use oxccl::{Communicator, Config, ReduceOp};
use rustix::process::{Pid, Signal, kill_process};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Kill or stop a random rank of a looping job; check every survivor names it"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the trials and print the counts.
    Run(RunArgs),
    /// One rank of the looping job (started by `run`; reads the launcher
    /// variables like any oxccl program).
    Job,
}

#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    /// Trials per scenario and transport.
    #[arg(short = 'n', long, default_value_t = 10)]
    trials: usize,
    /// Seed of the random choices [default: the clock]; printed.
    #[arg(long)]
    seed: Option<u64>,
    /// Scenarios to run.
    #[arg(long, value_delimiter = ',', default_value = "kill,stop")]
    scenario: Vec<Scenario>,
    /// Transports to run on.
    #[arg(long, value_delimiter = ',', default_value = "shm,tcp")]
    transport: Vec<String>,
    /// Ranks per job.
    #[arg(long, default_value_t = 4)]
    world: usize,
    /// Signal only these ranks (comma-separated) [default: any rank].
    #[arg(long, value_delimiter = ',')]
    victim: Vec<usize>,
    /// Longest random wait, in milliseconds, from the first round of calls
    /// to the signal.
    #[arg(long, default_value_t = 1500)]
    max_delay_ms: u64,
    /// Seconds a survivor may take to fail after a SIGKILL.
    #[arg(long, default_value_t = 2.0)]
    kill_bound: f64,
    /// `OXCCL_TIMEOUT` of the ranks in the stop scenario, in seconds.
    #[arg(long, default_value_t = 5)]
    stop_timeout: u64,
    /// Seconds a survivor may take to fail after a SIGSTOP.
    #[arg(long, default_value_t = 10.0)]
    stop_bound: f64,
    /// Seconds after the signal at which a survivor still running is a hang.
    #[arg(long, default_value_t = 45.0)]
    hang: f64,
    /// Print every survivor's outcome, not only the bad ones.
    #[arg(short, long)]
    verbose: bool,
    /// The job program [default: this binary's `job` subcommand].
    #[arg(long)]
    job: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// SIGKILL of a rank.
    Kill,
    /// SIGSTOP of a rank, with a short OXCCL_TIMEOUT.
    Stop,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Kill => "kill",
            Scenario::Stop => "stop",
        }
    }
}

/// A small, seeded generator (splitmix64): trials are reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

/// What became of one survivor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Right,
    Late,
    Wrong,
    Clean,
    Hang,
}

#[derive(Debug, Default)]
struct Tally {
    trials: usize,
    not_started: usize,
    right: usize,
    late: usize,
    wrong: usize,
    clean: usize,
    hang: usize,
    /// Seconds from the signal to each survivor's exit (hangs excluded).
    times: Vec<f64>,
    /// Trials that signalled rank 0.
    rank0: usize,
    /// A few bad outcomes, to show.
    examples: Vec<String>,
}

impl Tally {
    fn bad(&self) -> usize {
        self.not_started + self.late + self.wrong + self.clean + self.hang
    }
}

/// The rank an error message names as the origin of the failure: the
/// first "rank N failed" (an error passed on names its origin first, then
/// the cause reported there); in a message without one, the first "data
/// from rank N", "rank N to take data" (a timeout), "rank N closed" or
/// "mismatch with rank N".
fn culprit(msg: &str) -> Option<usize> {
    let find = |patterns: &[(&str, &str)]| -> Option<usize> {
        let mut best: Option<(usize, usize)> = None; // (position, rank)
        for &(before, after) in patterns {
            let mut from = 0;
            while let Some(i) = msg[from..].find(before) {
                let start = from + i + before.len();
                let digits = msg[start..].bytes().take_while(u8::is_ascii_digit).count();
                from = start;
                if digits == 0 || !msg[start + digits..].starts_with(after) {
                    continue;
                }
                if let Ok(r) = msg[start..start + digits].parse::<usize>() {
                    if best.is_none_or(|(p, _)| start < p) {
                        best = Some((start, r));
                    }
                    break;
                }
            }
        }
        best.map(|(_, r)| r)
    };
    find(&[("rank ", " failed")]).or_else(|| {
        find(&[
            ("data from rank ", ""),
            ("rank ", " to take data"),
            ("rank ", " closed"),
            ("mismatch with rank ", ""),
        ])
    })
}

fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// A rank of a trial's job.
struct Rank {
    child: Child,
    pid: u32,
    stdout: PathBuf,
    stderr: PathBuf,
    exited: Option<(Instant, std::process::ExitStatus)>,
}

fn signal(pid: u32, sig: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, sig);
    }
}

/// Kills and reaps every rank still running, and removes the shared-memory
/// segments they created (named `/oxccl-PID-…` after their creator).
fn clean_up(ranks: &mut [Rank]) {
    for r in ranks.iter_mut() {
        if r.exited.is_none() {
            signal(r.pid, Signal::KILL);
            if let Ok(st) = r.child.wait() {
                r.exited = Some((Instant::now(), st));
            }
        }
    }
    if let Ok(dir) = fs::read_dir("/dev/shm") {
        let prefixes: Vec<String> = ranks.iter().map(|r| format!("oxccl-{}-", r.pid)).collect();
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if prefixes.iter().any(|p| name.starts_with(p)) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// The error line a job rank printed, or its last line of stderr.
fn error_line(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("oxccl-chaos job: "))
        .or_else(|| text.lines().last())
        .unwrap_or("")
        .to_owned()
}

struct TrialSetup<'a> {
    args: &'a RunArgs,
    program: &'a Path,
    scenario: Scenario,
    transport: &'a str,
    dir: PathBuf,
}

/// Runs one trial, adding its outcomes to `tally`.
fn trial(s: &TrialSetup<'_>, rng: &mut Rng, tally: &mut Tally) {
    let args = s.args;
    tally.trials += 1;
    let victim = if args.victim.is_empty() {
        rng.below(args.world as u64) as usize
    } else {
        args.victim[rng.below(args.victim.len() as u64) as usize]
    };
    let delay = Duration::from_millis(rng.below(args.max_delay_ms + 1));
    if victim == 0 {
        tally.rank0 += 1;
    }
    let label = format!(
        "{} {} trial {}: rank {victim} after {} ms",
        s.scenario.name(),
        s.transport,
        tally.trials,
        delay.as_millis()
    );
    let _ = fs::remove_dir_all(&s.dir);
    if let Err(e) = fs::create_dir_all(&s.dir) {
        tally.not_started += 1;
        tally
            .examples
            .push(format!("{label}: cannot create {}: {e}", s.dir.display()));
        return;
    }
    let port = match free_port() {
        Ok(p) => p.to_string(),
        Err(e) => {
            tally.not_started += 1;
            tally.examples.push(format!("{label}: no free port: {e}"));
            return;
        }
    };
    let secret = oxccl::JobSecret::random_text().unwrap_or_default();
    let mut ranks: Vec<Rank> = Vec::with_capacity(args.world);
    for r in 0..args.world {
        let stdout = s.dir.join(format!("{r}.out"));
        let stderr = s.dir.join(format!("{r}.err"));
        let (Ok(out), Ok(err)) = (File::create(&stdout), File::create(&stderr)) else {
            break;
        };
        let mut cmd = Command::new(s.program);
        if args.job.is_none() {
            cmd.arg("job");
        }
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("OXCCL_RANK", r.to_string())
            .env("OXCCL_WORLD_SIZE", args.world.to_string())
            .env("OXCCL_LOCAL_RANK", r.to_string())
            .env("OXCCL_MASTER_ADDR", "127.0.0.1")
            .env("OXCCL_MASTER_PORT", &port)
            .env("OXCCL_JOB_SECRET", &secret)
            .env("OXCCL_TRANSPORT", s.transport)
            .env_remove("OXCCL_JOB_SECRET_FILE");
        if s.scenario == Scenario::Stop {
            cmd.env("OXCCL_TIMEOUT", args.stop_timeout.to_string());
        }
        match cmd.spawn() {
            Ok(child) => ranks.push(Rank {
                pid: child.id(),
                child,
                stdout,
                stderr,
                exited: None,
            }),
            Err(e) => {
                tally
                    .examples
                    .push(format!("{label}: cannot start rank {r}: {e}"));
                break;
            }
        }
    }
    if ranks.len() < args.world {
        tally.not_started += 1;
        clean_up(&mut ranks);
        return;
    }

    // Every rank through a first round of calls (at most 60 s), or one ended.
    let ready_by = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        let all = ranks
            .iter()
            .all(|r| fs::read_to_string(&r.stdout).is_ok_and(|t| t.contains("ready")));
        let ended = ranks
            .iter_mut()
            .any(|r| r.child.try_wait().ok().flatten().is_some());
        if all && !ended {
            break true;
        }
        if ended || Instant::now() > ready_by {
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if !ready {
        let errs: Vec<String> = ranks.iter().map(|r| error_line(&r.stderr)).collect();
        tally.not_started += 1;
        tally
            .examples
            .push(format!("{label}: the job did not start: {errs:?}"));
        clean_up(&mut ranks);
        return;
    }
    std::thread::sleep(delay);
    // A rank that ended during the delay: the job failed by itself.
    if let Some(r) = ranks
        .iter_mut()
        .position(|r| r.child.try_wait().ok().flatten().is_some())
    {
        tally.not_started += 1;
        tally.examples.push(format!(
            "{label}: rank {r} ended before the signal: {}",
            error_line(&ranks[r].stderr)
        ));
        clean_up(&mut ranks);
        return;
    }
    let sig = match s.scenario {
        Scenario::Kill => Signal::KILL,
        Scenario::Stop => Signal::STOP,
    };
    signal(ranks[victim].pid, sig);
    let at = Instant::now();
    let (bound, hang) = (
        Duration::from_secs_f64(match s.scenario {
            Scenario::Kill => args.kill_bound,
            Scenario::Stop => args.stop_bound,
        }),
        Duration::from_secs_f64(args.hang),
    );
    // Every survivor's exit, polled every 2 ms, until the hang deadline.
    loop {
        let mut running = 0;
        for (r, rank) in ranks.iter_mut().enumerate() {
            if r == victim && s.scenario == Scenario::Stop {
                continue;
            }
            if rank.exited.is_none() {
                match rank.child.try_wait() {
                    Ok(Some(st)) => rank.exited = Some((Instant::now(), st)),
                    _ if r != victim => running += 1,
                    _ => {}
                }
            }
        }
        if running == 0 || at.elapsed() > hang {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for (r, rank) in ranks.iter().enumerate() {
        if r == victim {
            continue;
        }
        let (outcome, detail) = match rank.exited {
            None => (Outcome::Hang, format!("still running after {hang:?}")),
            Some((t, st)) => {
                let took = t.duration_since(at);
                tally.times.push(took.as_secs_f64());
                let line = error_line(&rank.stderr);
                let outcome = if st.success() {
                    Outcome::Clean
                } else if culprit(&line) != Some(victim) {
                    Outcome::Wrong
                } else if took > bound {
                    Outcome::Late
                } else {
                    Outcome::Right
                };
                (
                    outcome,
                    format!("after {:.3} s: {line}", took.as_secs_f64()),
                )
            }
        };
        match outcome {
            Outcome::Right => tally.right += 1,
            Outcome::Late => tally.late += 1,
            Outcome::Wrong => tally.wrong += 1,
            Outcome::Clean => tally.clean += 1,
            Outcome::Hang => tally.hang += 1,
        }
        if outcome != Outcome::Right || args.verbose {
            let shown = format!("{label}: survivor rank {r}: {outcome:?} {detail}");
            println!("  {shown}");
            if outcome != Outcome::Right && tally.examples.len() < 5 {
                tally.examples.push(shown);
            }
        }
    }
    clean_up(&mut ranks);
    let _ = fs::remove_dir_all(&s.dir);
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn run(args: &RunArgs) -> ExitCode {
    if args.world < 2 {
        eprintln!("oxccl-chaos: --world must be at least 2");
        return ExitCode::from(2);
    }
    if let Some(v) = args.victim.iter().find(|&&v| v >= args.world) {
        eprintln!(
            "oxccl-chaos: --victim {v} is not a rank of a world of {}",
            args.world
        );
        return ExitCode::from(2);
    }
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let program = match &args.job {
        Some(p) => p.clone(),
        None => match std::env::current_exe() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("oxccl-chaos: cannot find this program's path: {e}");
                return ExitCode::from(2);
            }
        },
    };
    println!(
        "oxccl-chaos: seed {seed}; {} trials each of {:?} on {:?}, {} ranks; kill bound {} s; stop: OXCCL_TIMEOUT={} s, bound {} s; hang at {} s",
        args.trials,
        args.scenario.iter().map(|s| s.name()).collect::<Vec<_>>(),
        args.transport,
        args.world,
        args.kill_bound,
        args.stop_timeout,
        args.stop_bound,
        args.hang
    );
    let mut rng = Rng(seed);
    let mut results = Vec::new();
    let started = Instant::now();
    for &scenario in &args.scenario {
        for transport in &args.transport {
            let mut tally = Tally::default();
            let setup = TrialSetup {
                args,
                program: &program,
                scenario,
                transport,
                dir: std::env::temp_dir().join(format!("oxccl-chaos-{}", std::process::id())),
            };
            for _ in 0..args.trials {
                trial(&setup, &mut rng, &mut tally);
            }
            results.push((scenario, transport.clone(), tally));
        }
    }
    println!(
        "\n{:<6} {:<4} {:>6} {:>6} {:>6} {:>5} {:>5} {:>5} {:>5} {:>8}  exit after the signal, s: min / median / p90 / max",
        "", "", "trials", "rank0", "right", "late", "wrong", "clean", "hang", "unstarted"
    );
    let mut bad = 0;
    for (scenario, transport, t) in &mut results {
        t.times.sort_by(f64::total_cmp);
        println!(
            "{:<6} {:<4} {:>6} {:>6} {:>6} {:>5} {:>5} {:>5} {:>5} {:>8}  {:.3} / {:.3} / {:.3} / {:.3}",
            scenario.name(),
            transport,
            t.trials,
            t.rank0,
            t.right,
            t.late,
            t.wrong,
            t.clean,
            t.hang,
            t.not_started,
            quantile(&t.times, 0.0),
            quantile(&t.times, 0.5),
            quantile(&t.times, 0.9),
            quantile(&t.times, 1.0),
        );
        bad += t.bad();
    }
    for (scenario, transport, t) in &results {
        for e in &t.examples {
            println!("example ({} {transport}): {e}", scenario.name());
        }
    }
    println!(
        "oxccl-chaos: seed {seed}, {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        if bad == 0 {
            "every survivor named the signalled rank in time".to_owned()
        } else {
            format!("{bad} bad outcomes")
        }
    );
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One rank of the looping job: allreduces of 1 KiB, 256 KiB and 4 MiB,
/// checked on their first element, until a call fails. Prints `ready` after
/// the first round.
fn job() -> ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("oxccl-chaos job: {e}");
            return ExitCode::FAILURE;
        }
    };
    oxccl_tools::init_logging(&config.debug);
    let mut comm = match Communicator::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("oxccl-chaos job: {e}");
            return ExitCode::FAILURE;
        }
    };
    let world = comm.world() as f32;
    let mut bufs: Vec<Vec<f32>> = [256, 64 << 10, 1 << 20]
        .into_iter()
        .map(|n| vec![0f32; n])
        .collect();
    for round in 0u64.. {
        for b in &mut bufs {
            b.fill(1.0);
            if let Err(e) = comm.all_reduce_in_place(b, ReduceOp::Sum) {
                eprintln!("oxccl-chaos job: {e}");
                return ExitCode::FAILURE;
            }
            if b.first().copied() != Some(world) {
                eprintln!(
                    "oxccl-chaos job: rank {}: wrong result {:?}, expected {world}",
                    comm.rank(),
                    b.first()
                );
                return ExitCode::FAILURE;
            }
        }
        if round == 0 {
            println!("ready");
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(args) => run(&args),
        Cmd::Job => job(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_culprit_is_the_origin_the_message_names() {
        let cases = [
            (
                "rank 1: all_reduce #3: rank 0 failed: it closed its connection",
                Some(0),
            ),
            (
                "rank 2: all_reduce #3: rank 1 failed: rank 1: all_reduce #3: no progress for 5.0s while waiting for data from rank 0 (step 1, slice 0) (OXCCL_TIMEOUT)",
                // Rank 1 is named the origin, whatever its cause says.
                Some(1),
            ),
            (
                "rank 2: c: rank 0 failed: the rendezvous store that rank 0 serves is gone; rank 1 closed its connection",
                Some(0),
            ),
            (
                "rank 3: c: no progress for 5.0s while waiting for data from rank 2 (step 1) (OXCCL_TIMEOUT)",
                Some(2),
            ),
            (
                "rank 2: all_reduce #3: rank 3 failed (reported by rank 1): it closed its connection (end of stream; rank 1 has hung up too)",
                Some(3),
            ),
            (
                "rank 3: c: no progress for 5.0s while waiting for rank 0 to take data (2 of 6 frames sent) (OXCCL_TIMEOUT)",
                Some(0),
            ),
            (
                "rank 12: c: collective mismatch with rank 10, which called x",
                Some(10),
            ),
            ("rank 2: c: something else", None),
            ("", None),
        ];
        for (msg, want) in cases {
            assert_eq!(culprit(msg), want, "{msg}");
        }
    }

    #[test]
    fn the_generator_is_seeded() {
        let (mut a, mut b) = (Rng(7), Rng(7));
        let xs: Vec<u64> = (0..8).map(|_| a.below(4)).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.below(4)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&x| x < 4));
        assert_ne!(Rng(8).next(), Rng(7).next());
    }
}
