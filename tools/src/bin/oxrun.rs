//! `oxrun`: starts N ranks of a program on this host, with the launcher
//! variables oxccl reads, prefixes their output with the rank, and stops the
//! whole job as soon as one rank fails.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use clap::Parser;

/// How often the children are polled.
const POLL: Duration = Duration::from_millis(15);
/// How long the other ranks get, after one failed, to notice and exit.
const GRACE: Duration = Duration::from_secs(2);
/// How long we wait for a rank to be reaped after SIGKILL.
const REAP: Duration = Duration::from_secs(5);
/// How long we wait for the output of an exited rank to drain.
const DRAIN_ONE: Duration = Duration::from_millis(200);
/// How long we wait, at the end, for all output to drain (a grandchild that
/// outlives its rank may hold a pipe open forever).
const DRAIN_ALL: Duration = Duration::from_secs(2);

/// "1 rank" or "3 ranks".
fn n_ranks(n: usize) -> String {
    if n == 1 {
        "1 rank".to_owned()
    } else {
        format!("{n} ranks")
    }
}

/// Exit code when the job runs past `--timeout`.
const EXIT_TIMEOUT: u8 = 124;
/// Exit code when the program cannot be executed (found but not runnable).
const EXIT_CANNOT_EXECUTE: u8 = 126;
/// Exit code when the program cannot be started (not found).
const EXIT_NOT_FOUND: u8 = 127;

/// Variables of other launchers that oxccl would also read and that could
/// contradict the ones oxrun sets; they are removed from the ranks' environment.
const CLEARED: &[&str] = &[
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMI_RANK",
    "PMI_SIZE",
    "MPI_LOCALRANKID",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
];

/// Start N local ranks of a program for oxccl (a small, local torchrun/mpirun).
///
/// Each rank's stdout and stderr lines are printed as `[RANK] line` on oxrun's
/// stdout and stderr. oxrun exits 0 when every rank exits 0; when one rank
/// fails, the others are stopped and oxrun exits with that rank's status.
#[derive(Debug, Parser)]
#[command(
    name = "oxrun",
    version,
    long_about = LONG_ABOUT,
    after_help = "Example: oxrun -n 4 --timeout 600 -- ./train --epochs 3"
)]
struct Cli {
    /// Number of ranks to start (the world size); at least 1.
    #[arg(short = 'n', long = "nproc", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    nproc: u32,

    /// Kill the whole job if it runs longer than SECS seconds (exit code 124).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    timeout: Option<Duration>,

    /// Address of rank 0, which serves the rendezvous store.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    master_addr: String,

    /// Port of the rendezvous store [default: a free port of 127.0.0.1].
    #[arg(long, value_name = "PORT")]
    master_port: Option<u16>,

    /// Keep the other ranks running when one fails (for programs that
    /// shrink their communicator and go on, as `dsgd --elastic`): oxrun
    /// reports each failure, waits for every rank, and exits 0 when every
    /// rank that was not killed by a signal exited 0.
    #[arg(long)]
    keep_going: bool,

    /// Pin each rank to a CPU (`core`: rank R to the R-th CPU oxrun may
    /// use, as mpirun's `--bind-to core`), or not (`none`). Default: core
    /// when the ranks fit the CPUs, else none (as mpirun when
    /// oversubscribed).
    #[arg(long, value_enum, value_name = "WHAT")]
    bind_to: Option<Bind>,

    /// The program to run, then its arguments (put `--` before them when they
    /// start with `-`).
    #[arg(value_name = "PROGRAM", required = true, num_args = 1..,
          trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

/// Where ranks run (`--bind-to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Bind {
    /// One CPU per rank.
    Core,
    /// Wherever the scheduler puts them.
    None,
}

const LONG_ABOUT: &str = "\
Start N local ranks of a program for oxccl (a small, local torchrun/mpirun).

Every rank R in 0..N is started with these environment variables:
  OXCCL_RANK=R  OXCCL_WORLD_SIZE=N  OXCCL_LOCAL_RANK=R
  OXCCL_MASTER_ADDR=ADDR  OXCCL_MASTER_PORT=PORT
and torchrun's, so that other libraries find them too:
  RANK=R  WORLD_SIZE=N  LOCAL_RANK=R  LOCAL_WORLD_SIZE=N
  MASTER_ADDR=ADDR  MASTER_PORT=PORT
and the job's secret, with which the ranks authenticate every connection:
  OXCCL_JOB_SECRET=64 hex digits, fresh random bytes for each job
(unless oxrun's own environment sets OXCCL_JOB_SECRET or
OXCCL_JOB_SECRET_FILE, which the ranks then inherit instead).
The variables of other launchers that oxccl also reads, and that would
contradict these, are removed: OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE,
OMPI_COMM_WORLD_LOCAL_RANK, PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID. Rank 0 inherits oxrun's stdin; the others read
from /dev/null.

Placement: when the ranks fit the CPUs oxrun may use, rank R is pinned to
the R-th of them (as mpirun binds to cores); with more ranks than CPUs none
is pinned. --bind-to core|none overrides.

Output: each line a rank writes to stdout (stderr) is printed on oxrun's
stdout (stderr) as `[R] line`, as it comes; lines are never interleaved.

Failure: when every rank exits 0, oxrun exits 0 (with --keep-going, see
below). As soon as one rank exits
with a non-zero status or is killed by a signal, oxrun reports it, gives the
other ranks 2 seconds to notice (oxccl ranks normally report the failure
themselves), then kills those still running with SIGKILL, and exits with the
status of the first rank that failed (128+SIGNAL if it was killed by a
signal). With --timeout, a job still running after SECS seconds is killed
with SIGKILL and oxrun exits 124. Killing the job also kills every process
the ranks started. If PROGRAM cannot be started, oxrun exits 127 (126 if it
exists but cannot be executed). With --keep-going, a failed rank is
reported and the others run on (a program that shrinks its communicator
goes on without it); oxrun exits when every rank has, 0 if every rank that
exited by itself exited 0 (the ranks killed by a signal are the failures
the job went on without), else with the first such rank's status.";

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("'{s}' must be a positive number of seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("'{s}': {e}"))
}

/// One started rank.
struct Rank {
    rank: usize,
    child: Child,
    /// Set once the child has been reaped.
    status: Option<ExitStatus>,
    /// The threads copying its stdout and stderr.
    readers: Vec<JoinHandle<()>>,
}

impl Rank {
    fn running(&self) -> bool {
        self.status.is_none()
    }

    /// Polls the child; returns its status if it exited just now.
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_some() {
            return None;
        }
        match self.child.try_wait() {
            Ok(Some(st)) => {
                self.status = Some(st);
                Some(st)
            }
            Ok(None) => None,
            Err(e) => {
                // Should not happen; treat it as a failure of this rank.
                eprintln!("oxrun: cannot wait for rank {}: {e}", self.rank);
                let _ = self.child.kill();
                let st = ExitStatus::from_raw(1 << 8);
                self.status = Some(st);
                Some(st)
            }
        }
    }

    fn kill(&mut self) {
        if self.running() {
            // Fails only if the child has exited but is not reaped yet.
            let _ = self.child.kill();
        }
    }
}

/// Copies `pipe` to `out` line by line, each line prefixed with `prefix`.
fn copy_lines<R: Read, W: Write>(pipe: R, prefix: &str, mut lock: impl FnMut() -> W) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    let mut buf = String::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        buf.clear();
        buf.push_str(prefix);
        buf.push_str(&String::from_utf8_lossy(&line));
        buf.push('\n');
        let mut out = lock();
        // Write errors (closed stdout) are ignored: keep draining the pipe so
        // the rank does not block on a full pipe.
        let _ = out.write_all(buf.as_bytes());
        let _ = out.flush();
    }
}

fn spawn_reader<R: Read + Send + 'static>(
    rank: usize,
    pipe: R,
    to_stderr: bool,
) -> io::Result<JoinHandle<()>> {
    let prefix = format!("[{rank}] ");
    let name = format!("oxrun-{}-{rank}", if to_stderr { "err" } else { "out" });
    thread::Builder::new().name(name).spawn(move || {
        if to_stderr {
            copy_lines(pipe, &prefix, || io::stderr().lock());
        } else {
            copy_lines(pipe, &prefix, || io::stdout().lock());
        }
    })
}

/// Waits until the given readers finish or `deadline` passes.
fn drain(readers: &mut Vec<JoinHandle<()>>, deadline: Instant) {
    loop {
        let mut i = 0;
        while i < readers.len() {
            if readers[i].is_finished() {
                let _ = readers.swap_remove(i).join();
            } else {
                i += 1;
            }
        }
        if readers.is_empty() || Instant::now() >= deadline {
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn describe(rank: usize, st: ExitStatus) -> String {
    if let Some(code) = st.code() {
        format!("oxrun: rank {rank} exited with status {code}")
    } else if let Some(sig) = st.signal() {
        let name = signal_name(sig)
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        let core = if st.core_dumped() {
            ", core dumped"
        } else {
            ""
        };
        format!("oxrun: rank {rank} was killed by signal {sig}{name}{core}")
    } else {
        format!("oxrun: rank {rank} ended with {st}")
    }
}

fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return None,
    })
}

/// The exit code oxrun reports for a failed rank.
fn exit_code(st: ExitStatus) -> u8 {
    if let Some(code) = st.code() {
        u8::try_from(code).ok().filter(|&c| c != 0).unwrap_or(1)
    } else if let Some(sig) = st.signal() {
        u8::try_from(128 + sig).unwrap_or(255)
    } else {
        1
    }
}

/// Kills the ranks still running, and every process they started, and reaps
/// the ranks (bounded).
fn kill_and_reap(ranks: &mut [Rank]) {
    for r in ranks.iter_mut() {
        r.kill();
    }
    kill_descendants();
    let deadline = Instant::now() + REAP;
    while ranks.iter().any(Rank::running) && Instant::now() < deadline {
        for r in ranks.iter_mut() {
            r.poll();
        }
        if ranks.iter().any(Rank::running) {
            thread::sleep(POLL);
        }
    }
    for r in ranks.iter().filter(|r| r.running()) {
        eprintln!("oxrun: rank {} did not exit after SIGKILL", r.rank);
    }
}

/// SIGKILLs every live descendant of oxrun: the ranks' own children (say, the
/// `sleep` a shell rank runs) would otherwise survive their rank and keep its
/// output pipes open. Since oxrun is a child subreaper, orphans of killed
/// ranks stay its descendants; a few rounds catch processes forked meanwhile.
fn kill_descendants() {
    for _ in 0..5 {
        let pids = descendants();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                // Fails only if it has exited meanwhile.
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The live (not zombie) descendants of oxrun, from /proc; empty where /proc
/// cannot be read.
fn descendants() -> Vec<i32> {
    let Ok(me) = i32::try_from(std::process::id()) else {
        return Vec::new();
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    // (pid, parent pid) of every live process.
    let mut procs: Vec<(i32, i32)> = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...", where comm may hold spaces and parens.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let (Some(state), Some(ppid)) = (fields.next(), fields.next()) else {
            continue;
        };
        if state == "Z" || state == "X" {
            continue;
        }
        if let Ok(ppid) = ppid.parse::<i32>() {
            procs.push((pid, ppid));
        }
    }
    let mut found = vec![me];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for &(pid, ppid) in &procs {
            if ppid == parent && pid != me && !found.contains(&pid) {
                found.push(pid);
            }
        }
        i += 1;
    }
    found.remove(0);
    found
}

/// Waits (bounded) for all output to be printed.
fn drain_all(ranks: &mut [Rank]) {
    let deadline = Instant::now() + DRAIN_ALL;
    for r in ranks.iter_mut() {
        drain(&mut r.readers, deadline);
    }
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
}

fn free_port() -> io::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// The CPUs oxrun may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The CPU rank `rank` is pinned to, if any: with `--bind-to core` (the
/// default when the ranks fit the CPUs oxrun may use, as mpirun's), the
/// rank-th of those CPUs.
fn bind_cpu(cli: &Cli, rank: usize) -> Option<usize> {
    let cpus = allowed_cpus();
    let fits = (cli.nproc as usize) <= cpus.len();
    match cli.bind_to {
        Some(Bind::None) => None,
        Some(Bind::Core) => cpus.get(rank % cpus.len().max(1)).copied(),
        None if fits => cpus.get(rank).copied(),
        None => None,
    }
}

/// Pins this thread to `cpu` for the spawn of rank `rank`; returns the
/// mask to restore, or `None` (logged) when pinning failed and the rank
/// runs unpinned.
fn pin_self(rank: usize, cpu: usize) -> Option<rustix::thread::CpuSet> {
    let saved = rustix::thread::sched_getaffinity(None).ok()?;
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    match rustix::thread::sched_setaffinity(None, &set) {
        Ok(()) => Some(saved),
        Err(e) => {
            eprintln!("oxrun: cannot pin rank {rank} to CPU {cpu}: {e}");
            None
        }
    }
}

fn spawn_rank(cli: &Cli, port: u16, secret: Option<&str>, rank: usize) -> io::Result<Rank> {
    let (program, args) = match cli.command.split_first() {
        Some(pa) => pa,
        None => return Err(io::Error::new(io::ErrorKind::InvalidInput, "no program")),
    };
    let world = cli.nproc.to_string();
    let rank_s = rank.to_string();
    let port_s = port.to_string();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if rank == 0 {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for v in CLEARED {
        cmd.env_remove(v);
    }
    cmd.env("OXCCL_RANK", &rank_s)
        .env("OXCCL_WORLD_SIZE", &world)
        .env("OXCCL_LOCAL_RANK", &rank_s)
        .env("OXCCL_MASTER_ADDR", &cli.master_addr)
        .env("OXCCL_MASTER_PORT", &port_s)
        .env("RANK", &rank_s)
        .env("WORLD_SIZE", &world)
        .env("LOCAL_RANK", &rank_s)
        .env("LOCAL_WORLD_SIZE", &world)
        .env("MASTER_ADDR", &cli.master_addr)
        .env("MASTER_PORT", &port_s);
    if let Some(secret) = secret {
        cmd.env("OXCCL_JOB_SECRET", secret);
    }
    // A child inherits the mask of the thread that starts it, before it
    // runs anything: pin this thread for the spawn, then put it back.
    let saved = bind_cpu(cli, rank).and_then(|cpu| pin_self(rank, cpu));
    let spawned = cmd.spawn();
    if let Some(mask) = saved {
        if let Err(e) = rustix::thread::sched_setaffinity(None, &mask) {
            eprintln!("oxrun: cannot restore its own CPU mask: {e}");
        }
    }
    let mut child = spawned?;
    let mut readers = Vec::with_capacity(2);
    let mut start_readers = || -> io::Result<()> {
        if let Some(out) = child.stdout.take() {
            readers.push(spawn_reader(rank, out, false)?);
        }
        if let Some(err) = child.stderr.take() {
            readers.push(spawn_reader(rank, err, true)?);
        }
        Ok(())
    };
    if let Err(e) = start_readers() {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(Rank {
        rank,
        child,
        status: None,
        readers,
    })
}

fn run(cli: &Cli) -> u8 {
    // Orphans of ranks (their children, once a rank dies) are re-parented to
    // oxrun, so that stopping the job can find and kill them.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        tracing::debug!("oxrun: cannot become a child subreaper: {e}");
    }
    let port = match cli.master_port {
        Some(p) => p,
        None => match free_port() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("oxrun: cannot find a free port on 127.0.0.1: {e}");
                return 1;
            }
        },
    };
    let program = cli
        .command
        .first()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();

    // One secret per job, unless the caller gives the ranks one already.
    let given = ["OXCCL_JOB_SECRET", "OXCCL_JOB_SECRET_FILE"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    let secret = if given {
        None
    } else {
        match oxccl::JobSecret::random_text() {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("oxrun: cannot make a job secret: {e}");
                return 1;
            }
        }
    };

    let start = Instant::now();
    let world = usize::try_from(cli.nproc).unwrap_or(usize::MAX);
    let mut ranks: Vec<Rank> = Vec::with_capacity(world);
    for rank in 0..world {
        match spawn_rank(cli, port, secret.as_deref(), rank) {
            Ok(r) => ranks.push(r),
            Err(e) => {
                eprintln!("oxrun: cannot start program '{program}' (rank {rank}): {e}");
                kill_and_reap(&mut ranks);
                drain_all(&mut ranks);
                return match e.kind() {
                    io::ErrorKind::PermissionDenied => EXIT_CANNOT_EXECUTE,
                    _ => EXIT_NOT_FOUND,
                };
            }
        }
    }

    let deadline = cli.timeout.map(|t| start + t);
    // With --keep-going: the first rank that failed, while the others run on.
    let mut first_failure: Option<ExitStatus> = None;
    // Main loop: until all ranks exited 0, one failed, or the time is up.
    let failure = loop {
        let mut failed = None;
        for r in ranks.iter_mut() {
            if let Some(st) = r.poll() {
                // Let this rank's last words come out before ours.
                drain(&mut r.readers, Instant::now() + DRAIN_ONE);
                if !st.success() {
                    eprintln!("{}", describe(r.rank, st));
                    failed.get_or_insert(st);
                }
            }
        }
        if failed.is_some() && !cli.keep_going {
            break failed;
        }
        if let Some(st) = failed {
            first_failure.get_or_insert(st);
        }
        if !ranks.iter().any(Rank::running) {
            break None;
        }
        if let Some(d) = deadline {
            if Instant::now() >= d {
                let still = ranks.iter().filter(|r| r.running()).count();
                let secs = cli.timeout.map(|t| t.as_secs_f64()).unwrap_or_default();
                eprintln!(
                    "oxrun: job timed out after {secs} s; killing {} still running",
                    n_ranks(still)
                );
                kill_and_reap(&mut ranks);
                drain_all(&mut ranks);
                return EXIT_TIMEOUT;
            }
        }
        thread::sleep(POLL);
    };

    let Some(first) = failure else {
        drain_all(&mut ranks);
        // Kept going: an error exit (not a signal) of any rank fails the job.
        let errored = ranks
            .iter()
            .filter_map(|r| r.status)
            .find(|st| st.code().is_some_and(|c| c != 0));
        return match (first_failure, errored) {
            (Some(_), Some(st)) => exit_code(st),
            (Some(_), None)
                if ranks
                    .iter()
                    .all(|r| r.status.is_some_and(|s| s.code().is_none())) =>
            {
                first_failure.map_or(1, exit_code)
            }
            _ => 0,
        };
    };

    // Grace period: the other ranks normally notice and exit on their own.
    let grace_end = Instant::now() + GRACE;
    while ranks.iter().any(Rank::running) && Instant::now() < grace_end {
        thread::sleep(POLL);
        for r in ranks.iter_mut() {
            if let Some(st) = r.poll() {
                if !st.success() {
                    eprintln!("{}", describe(r.rank, st));
                }
            }
        }
    }
    let still = ranks.iter().filter(|r| r.running()).count();
    if still > 0 {
        eprintln!(
            "oxrun: killing {} still running {} s after the first failure",
            n_ranks(still),
            GRACE.as_secs()
        );
    }
    // Also kills what the exited ranks left running.
    kill_and_reap(&mut ranks);
    drain_all(&mut ranks);
    exit_code(first)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ExitCode::from(run(&cli))
}
