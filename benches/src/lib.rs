//! Shared code of the oxccl benchmark binaries.
//!
//! `all_reduce_perf`, `all_gather_perf`, `broadcast_perf`,
//! `reduce_scatter_perf`, `reduce_perf`, `alltoall_perf`, `gather_perf`,
//! `scatter_perf`, `sendrecv_perf` and `hypercube_perf` are thin mains over
//! [`main`]: they take nccl-tests' flags ([`Options`]), run under any
//! launcher (`Communicator::from_env()`), time each size out of place and in
//! place, check every element of one more call on every rank against
//! [`oxccl_tools::pattern`], and print nccl-tests' table on rank 0 ([`report`]).
//!
//! Alltoall, gather, scatter and sendrecv have no in-place form in oxccl
//! (`run_exchange` and batches take distinct buffers): they run out of place
//! only and print N/A in the in-place columns (nccl-tests runs alltoall and
//! sendrecv in place too but does not check them).

#![forbid(unsafe_code)]

pub mod options;
pub mod report;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use oxccl::{Batch, Communicator, Config, DType, Descriptor, Kind, ReduceOp};
use oxccl_tools::devices::MakeBuffer;
use oxccl_tools::pattern;

pub use options::{Average, Options};
use report::{Measure, RankInfo, Row};

/// Why a benchmark stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A collective (or the communicator's creation) failed.
    #[error(transparent)]
    Comm(#[from] oxccl::Error),
    /// Flags that do not fit this job (a root outside the world, ...).
    #[error("{0}")]
    Usage(String),
    /// Writing the table or the JSON file failed.
    #[error("writing {what}: {source}")]
    Io {
        /// What was being written.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// What a run measured (on rank 0; other ranks have the same wrong total).
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Every row, in the order printed.
    pub rows: Vec<Row>,
    /// Wrong elements over all rows, variants and ranks.
    pub wrong: u64,
}

/// What a `*_perf` binary times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bench {
    /// One call of an oxccl collective, exchange (alltoall, gather,
    /// scatter) or, for [`Kind::SendRecv`], nccl-tests' ring: a batch that
    /// sends to rank + 1 and receives from rank - 1.
    Collective(Kind),
    /// nccl-tests' `hypercube_perf`: an allgather in log2(world) steps, at
    /// step k a batch that exchanges the 2^k blocks gathered so far with
    /// rank XOR 2^k. Power-of-two worlds only (others print a line and skip,
    /// as nccl-tests does); host memory only.
    HyperCube,
}

impl From<Kind> for Bench {
    fn from(kind: Kind) -> Bench {
        Bench::Collective(kind)
    }
}

impl Bench {
    /// The kind whose sizes, buffers and expected data the benchmark uses
    /// (the hypercube's are an allgather's).
    pub fn kind(self) -> Kind {
        match self {
            Bench::Collective(k) => k,
            Bench::HyperCube => Kind::AllGather,
        }
    }

    /// The program name nccl-tests gives this benchmark.
    pub fn program_name(self) -> &'static str {
        match self {
            Bench::Collective(k) => program_name(k),
            Bench::HyperCube => "hypercube_perf",
        }
    }

    /// The name in the JSON file's `collective`.
    pub fn name(self) -> &'static str {
        match self {
            Bench::Collective(k) => k.name(),
            Bench::HyperCube => "hypercube",
        }
    }

    /// Whether oxccl can run it in place.
    pub fn has_in_place(self) -> bool {
        !matches!(
            self.kind(),
            Kind::AllToAll
                | Kind::AllToAllV
                | Kind::Gather
                | Kind::Scatter
                | Kind::SendRecv
                | Kind::AllGatherV
                | Kind::ReduceScatterV
        )
    }

    /// Whether `-r` names its root.
    pub fn rooted(self) -> bool {
        matches!(
            self,
            Bench::Collective(Kind::Broadcast | Kind::Reduce | Kind::Gather | Kind::Scatter)
        )
    }
}

/// The program name nccl-tests gives the benchmark of `kind`.
pub fn program_name(kind: Kind) -> &'static str {
    match kind {
        Kind::AllReduce => "all_reduce_perf",
        Kind::AllGather => "all_gather_perf",
        Kind::Broadcast => "broadcast_perf",
        Kind::ReduceScatter => "reduce_scatter_perf",
        Kind::Reduce => "reduce_perf",
        Kind::Barrier => "barrier_perf",
        Kind::AllToAll => "alltoall_perf",
        Kind::AllToAllV => "alltoallv_perf",
        Kind::Gather => "gather_perf",
        Kind::Scatter => "scatter_perf",
        Kind::AllGatherV => "all_gather_v_perf",
        Kind::ReduceScatterV => "reduce_scatter_v_perf",
        Kind::SendRecv => "sendrecv_perf",
    }
}

/// The whole program for `bench` (a [`Kind`] or [`Bench::HyperCube`]):
/// parses the flags, joins the job, runs, prints. Exit status 0 when every
/// result is right, 1 on wrong results or a failure, 2 on bad flags.
pub fn main(bench: impl Into<Bench>) -> ExitCode {
    let bench = bench.into();
    let program = bench.program_name();
    let opts = match Options::parse_from(std::env::args_os()) {
        Ok(o) => o,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match Config::from_env() {
        Ok(config) => oxccl_tools::init_logging(&config.debug),
        Err(e) => {
            eprintln!("{program}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut comm = match Communicator::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "{program}: {e}\n{program}: start it under a launcher (oxrun -n 2 -- {program} ...), or set OXCCL_RANK=0 OXCCL_WORLD_SIZE=1 for one rank"
            );
            return ExitCode::FAILURE;
        }
    };
    let rank = comm.rank();
    let var = |name: &str| std::env::var(name).ok();
    let split = match options::split_group(
        var("NCCL_TESTS_SPLIT_MASK").as_deref(),
        var("NCCL_TESTS_SPLIT").as_deref(),
        rank,
    ) {
        Ok(s) => s,
        Err(e) => {
            if rank == 0 {
                eprintln!("{program}: {e}");
            }
            return ExitCode::from(2);
        }
    };
    let mut stdout = std::io::stdout().lock();
    let result = match split {
        None => run(&mut comm, bench, &opts, &mut stdout),
        Some(group) => split_and_run(&mut comm, group, bench, &opts, &mut stdout),
    };
    match result {
        Ok(s) if s.wrong == 0 => ExitCode::SUCCESS,
        Ok(s) => {
            if rank == 0 {
                eprintln!(
                    "{program}: {} wrong result elements over all ranks",
                    s.wrong
                );
            }
            ExitCode::FAILURE
        }
        Err(BenchError::Usage(e)) => {
            if rank == 0 {
                eprintln!("{program}: {e}");
            }
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("{program}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the benchmark `bench` (a [`Kind`] or [`Bench::HyperCube`]) on this
/// rank; rank 0 writes the table to `out` (and the JSON file of `-J`).
pub fn run(
    comm: &mut Communicator,
    bench: impl Into<Bench>,
    opts: &Options,
    out: &mut dyn Write,
) -> Result<Summary, BenchError> {
    run_in(comm, None, bench.into(), opts, out)
}

/// Runs the benchmark in groups, as nccl-tests does under
/// `NCCL_TESTS_SPLIT` (or `_MASK`): `job` is split into communicators of
/// the ranks with the same `group` (ordered by their rank in `job`), which
/// must all be of one size; every group runs every call at the same time
/// (each timed loop starts after a barrier of the whole job), the times
/// are combined over every rank of every group (`-a`), wrong elements
/// counted over all, and the job's rank 0 writes the table.
pub fn split_and_run(
    job: &mut Communicator,
    group: u32,
    bench: impl Into<Bench>,
    opts: &Options,
    out: &mut dyn Write,
) -> Result<Summary, BenchError> {
    let mut comm = job
        .split(Some(group), job.rank() as i64)?
        .ok_or_else(|| oxccl::Error::Internal("split gave no communicator to a group".into()))?;
    let mut sizes = vec![0u64; job.world()];
    job.all_gather(&[comm.world() as u64], &mut sizes)?;
    if sizes.iter().any(|&s| s != sizes[0]) {
        return Err(BenchError::Usage(format!(
            "the split makes groups of different sizes ({sizes:?} ranks, by rank): every group \
             must have as many ranks"
        )));
    }
    run_in(&mut comm, Some((job, group)), bench.into(), opts, out)
}

/// [`run`] in a group of a split job, when `split` gives the job and this
/// rank's group.
fn run_in(
    comm: &mut Communicator,
    mut split: Option<(&mut Communicator, u32)>,
    bench: Bench,
    opts: &Options,
    out: &mut dyn Write,
) -> Result<Summary, BenchError> {
    let kind = bench.kind();
    let (world, rank) = (comm.world(), comm.rank());
    if bench.rooted() && opts.root >= world {
        return Err(BenchError::Usage(format!(
            "root {} (-r) is not a rank of this world of {world}",
            opts.root
        )));
    }
    if opts.in_place_only && !bench.has_in_place() {
        return Err(BenchError::Usage(format!(
            "{} has no in-place form in oxccl: drop --in-place-only",
            bench.program_name()
        )));
    }
    if bench == Bench::HyperCube && opts.device != "cpu" {
        return Err(BenchError::Usage(
            "hypercube_perf runs on host memory only (--device cpu)".into(),
        ));
    }
    let sizes = opts.sizes().map_err(BenchError::Usage)?;
    let local_rank = oxccl::config::launch_from_lookup(&oxccl::config::ProcessEnv)
        .ok()
        .and_then(|l| l.local_rank);
    let make = oxccl_tools::devices::buffer_factory(&opts.device, comm.config(), local_rank)?;
    let ranks = match &mut split {
        Some((job, group)) => gather_rank_info(job, *group)?,
        None => gather_rank_info(comm, 0)?,
    };
    let mut across = split.map(|(job, _)| job);
    let io = |source| BenchError::Io {
        what: "the table".into(),
        source,
    };
    let print = across.as_ref().map_or(rank, |j| j.rank()) == 0;
    if print {
        out.write_all(report::header(opts, &ranks).as_bytes())
            .and_then(|_| out.flush())
            .map_err(io)?;
    }
    let ops: Vec<ReduceOp> = if matches!(kind, Kind::AllReduce | Kind::Reduce | Kind::ReduceScatter)
    {
        opts.ops.clone()
    } else {
        vec![ReduceOp::Sum]
    };
    let mut rows = Vec::new();
    let mut wrong = 0u64;
    if bench == Bench::HyperCube && !world.is_power_of_two() {
        // As nccl-tests: a line, no rows, success.
        if print {
            writeln!(out, "nRanks {world} is not a power of 2, skipping")
                .and_then(|_| out.write_all(report::footer(0, 0.0).as_bytes()))
                .and_then(|_| out.flush())
                .map_err(io)?;
        }
        return Ok(Summary { rows, wrong });
    }
    for &dtype in &opts.dtypes {
        for &op in &ops {
            for &size in &sizes {
                let row = run_row(
                    comm,
                    across.as_deref_mut(),
                    bench,
                    opts,
                    dtype,
                    op,
                    size,
                    make.as_ref(),
                )?;
                wrong += [row.out_of_place, row.in_place]
                    .iter()
                    .flatten()
                    .filter_map(|m| m.wrong)
                    .sum::<u64>();
                if print {
                    writeln!(out, "{}", report::format_row(&row))
                        .and_then(|_| out.flush())
                        .map_err(io)?;
                }
                rows.push(row);
            }
        }
    }
    if print {
        let avg = report::avg_busbw(&rows);
        out.write_all(report::footer(wrong, avg).as_bytes())
            .and_then(|_| out.flush())
            .map_err(io)?;
        if let Some(path) = &opts.json {
            write_json(path, bench, opts, world, &ranks, &rows, wrong, avg)?;
        }
    }
    Ok(Summary { rows, wrong })
}

/// Every rank's pid, host and group, in rank order.
fn gather_rank_info(comm: &mut Communicator, group: u32) -> Result<Vec<RankInfo>, BenchError> {
    let mine = RankInfo {
        group,
        ..RankInfo::here()
    }
    .encode();
    let mut all = vec![0u8; mine.len() * comm.world()];
    comm.all_gather(&mine[..], &mut all)?;
    Ok(all
        .chunks_exact(report::RANK_INFO_LEN)
        .map(RankInfo::decode)
        .collect())
}

/// Times one size of one dtype and op, out of place and in place; `across`:
/// the job that `comm`'s group was split from.
#[allow(clippy::too_many_arguments)]
fn run_row(
    comm: &mut Communicator,
    mut across: Option<&mut Communicator>,
    bench: Bench,
    opts: &Options,
    dtype: DType,
    op: ReduceOp,
    size: usize,
    make: Option<&MakeBuffer>,
) -> Result<Row, BenchError> {
    let kind = bench.kind();
    let (world, rank) = (comm.world(), comm.rank());
    let mut count = report::count_for(kind, size, dtype, world);
    if bench == Bench::HyperCube {
        // nccl-tests' hypercube rounds each rank's block down to 4 elements.
        count -= count % 4;
    }
    let bytes = report::row_bytes(kind, count, dtype, world);
    let root = match kind {
        // The sender of the message this rank receives.
        Kind::SendRecv => (rank + world - 1) % world,
        _ if bench.rooted() => opts.root,
        _ => 0,
    };
    let d = Descriptor {
        kind,
        dtype,
        op,
        root,
        count,
    };
    let input = pattern::input(&d, world, rank);
    let mut measure = |in_place: bool| -> Result<Measure, BenchError> {
        let (time_us, wrong) = time_and_check(
            comm,
            across.as_deref_mut(),
            bench,
            d,
            opts,
            &input,
            in_place,
            make,
        )?;
        let mut m = Measure::new(kind, world, bytes, time_us, wrong);
        if bench == Bench::HyperCube {
            // nccl-tests' hypercube: algbw counts the (n-1)/n of the
            // gathered bytes each rank receives, and busbw equals it.
            m.algbw = m.busbw;
        }
        Ok(m)
    };
    let out_of_place = if opts.out_of_place() {
        Some(measure(false)?)
    } else {
        None
    };
    let in_place = if opts.in_place() && bench.has_in_place() {
        Some(measure(true)?)
    } else {
        None
    };
    Ok(Row {
        size: bytes,
        count,
        dtype,
        redop: report::redop_name(kind, op),
        root: report::root_column(kind, opts.root),
        out_of_place,
        in_place,
    })
}

/// The input and output buffers on a device, when `--device` names one.
type DevicePair = Option<(Box<dyn oxccl::DeviceMemory>, Box<dyn oxccl::DeviceMemory>)>;

/// What output buffers hold before the checked call, so that a call that
/// leaves an element unwritten is caught.
const POISON: u8 = 0xA5;

/// Runs `d` `-w` times untimed and `-n` times timed (after a barrier, the loop
/// timed as a whole), combines the ranks' times per `-a`, then (with `-c 1`)
/// runs it once more on fresh buffers and counts wrong elements over all ranks.
/// With `across` (the job `comm`'s group was split from), the barrier, the
/// times and the count are the whole job's.
#[allow(clippy::too_many_arguments)]
fn time_and_check(
    comm: &mut Communicator,
    mut across: Option<&mut Communicator>,
    bench: Bench,
    d: Descriptor,
    opts: &Options,
    input: &[u8],
    in_place: bool,
    make: Option<&MakeBuffer>,
) -> Result<(f64, Option<u64>), BenchError> {
    let (world, rank) = (comm.world(), comm.rank());
    let size = d.dtype.size();
    let chunk = d.count * size;
    let out_len = match d.kind {
        Kind::ReduceScatter if in_place => chunk * world,
        _ => pattern::output_len(&d, world, rank),
    };
    let exchange = pattern::exchange(&d);
    let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
    let mut output = vec![POISON; out_len];
    // Lays the input where an in-place call expects it.
    let lay = |buf: &mut [u8]| {
        if !in_place {
            buf.fill(POISON);
        } else if d.kind == Kind::AllGather {
            buf.fill(POISON);
            buf[rank * chunk..(rank + 1) * chunk].copy_from_slice(input);
        } else {
            buf.copy_from_slice(input);
        }
    };
    // With --device, the buffers live on the device; `output` mirrors them.
    let mut dev: DevicePair = match make {
        Some(make) => Some((make(input)?, make(&output)?)),
        None => None,
    };
    let call = |comm: &mut Communicator, buf: &mut [u8], dev: &mut DevicePair| {
        if bench == Bench::HyperCube {
            return hypercube(comm, d.dtype, (!in_place).then_some(input), buf);
        }
        if d.kind == Kind::SendRecv {
            let mut batch = Batch::new();
            match dev {
                None => batch
                    .send_bytes(input, d.dtype, next)
                    .recv_bytes(buf, d.dtype, prev),
                Some((inp, out)) => batch
                    .send_device(&**inp, d.dtype, next)
                    .recv_device(&mut **out, d.dtype, prev),
            };
            return comm.run_batch(batch);
        }
        match (exchange, dev, in_place) {
            (Some(x), None, _) => comm.run_exchange(x, d.dtype, input, buf),
            (Some(x), Some((inp, out)), _) => {
                comm.run_exchange_device(x, d.dtype, inp.as_ref(), out.as_mut())
            }
            (None, None, true) => comm.run_bytes(d, None, buf),
            (None, None, false) => comm.run_bytes(d, Some(input), buf),
            (None, Some((_, out)), true) => comm.run_device(d, None, out.as_mut()),
            (None, Some((inp, out)), false) => comm.run_device(d, Some(inp.as_ref()), out.as_mut()),
        }
    };
    lay(&mut output);
    if let Some((_, out)) = &mut dev {
        out.write(0, &output).map_err(oxccl::Error::from)?;
    }
    for _ in 0..opts.warmup {
        call(comm, &mut output, &mut dev)?;
    }
    across.as_deref_mut().unwrap_or(comm).barrier()?;
    let start = Instant::now();
    for _ in 0..opts.iters {
        call(comm, &mut output, &mut dev)?;
    }
    let local_us = start.elapsed().as_secs_f64() * 1e6 / opts.iters as f64;
    let time_us = combine_times(
        across.as_deref_mut().unwrap_or(comm),
        opts.average,
        local_us,
    )?;
    if !opts.check {
        return Ok((time_us, None));
    }
    lay(&mut output);
    if let Some((_, out)) = &mut dev {
        out.write(0, &output).map_err(oxccl::Error::from)?;
    }
    call(comm, &mut output, &mut dev)?;
    if let Some((_, out)) = &dev {
        out.read(0, &mut output).map_err(oxccl::Error::from)?;
    }
    let result = match (d.kind, in_place) {
        (Kind::ReduceScatter, true) => &mut output[rank * chunk..(rank + 1) * chunk],
        _ => &mut output[..],
    };
    for e in result.chunks_exact_mut(size).take(opts.debug_corrupt) {
        e[0] ^= 1;
    }
    let mine = pattern::count_wrong(&d, world, rank, result) as u64;
    let mut total = [mine];
    across
        .unwrap_or(comm)
        .all_reduce_in_place(&mut total, ReduceOp::Sum)?;
    Ok((time_us, Some(total[0])))
}

/// nccl-tests' hypercube allgather on host memory: `buf` holds one block per
/// rank; out of place (`input` given) this rank's block is copied in first.
/// At the step of `mask` (1, 2, 4, ...) the rank sends the `mask` blocks it
/// has gathered to rank XOR `mask` and receives that rank's `mask` blocks,
/// both in one batch.
fn hypercube(
    comm: &mut Communicator,
    dtype: DType,
    input: Option<&[u8]>,
    buf: &mut [u8],
) -> oxccl::Result<()> {
    let (rank, world) = (comm.rank(), comm.world());
    let block = buf.len() / world;
    if let Some(input) = input {
        buf[rank * block..(rank + 1) * block].copy_from_slice(input);
    }
    let mut mask = 1;
    while mask < world {
        let mine = rank & !(mask - 1);
        let theirs = mine ^ mask;
        let (send, recv): (&[u8], &mut [u8]) = if mine < theirs {
            let (lo, hi) = buf.split_at_mut(theirs * block);
            (&lo[mine * block..], &mut hi[..mask * block])
        } else {
            let (lo, hi) = buf.split_at_mut(mine * block);
            (&hi[..mask * block], &mut lo[theirs * block..])
        };
        let mut batch = Batch::new();
        batch
            .send_bytes(send, dtype, rank ^ mask)
            .recv_bytes(recv, dtype, rank ^ mask);
        comm.run_batch(batch)?;
        mask <<= 1;
    }
    Ok(())
}

/// Combines the ranks' times (`-a`) with an allreduce through the communicator.
fn combine_times(comm: &mut Communicator, how: Average, us: f64) -> Result<f64, BenchError> {
    let op = match how {
        Average::Rank0 => return Ok(us),
        Average::Mean => ReduceOp::Sum,
        Average::Min => ReduceOp::Min,
        Average::Max => ReduceOp::Max,
    };
    let mut t = [us];
    comm.all_reduce_in_place(&mut t, op)?;
    Ok(if how == Average::Mean {
        t[0] / comm.world() as f64
    } else {
        t[0]
    })
}

fn measure_json(m: Option<&Measure>) -> serde_json::Value {
    match m {
        Some(m) => serde_json::json!({
            "time_us": m.time_us,
            "algbw_gbps": m.algbw,
            "busbw_gbps": m.busbw,
            "wrong": m.wrong,
        }),
        None => serde_json::Value::Null,
    }
}

/// The JSON document of a run: settings, ranks and every row.
#[allow(clippy::too_many_arguments)]
pub fn json_document(
    bench: Bench,
    opts: &Options,
    world: usize,
    ranks: &[RankInfo],
    rows: &[Row],
    wrong: u64,
    avg_busbw: f64,
) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "size": r.size,
                "count": r.count,
                "type": r.dtype.nccl_name(),
                "redop": r.redop,
                "root": r.root,
                "out_of_place": measure_json(r.out_of_place.as_ref()),
                "in_place": measure_json(r.in_place.as_ref()),
            })
        })
        .collect();
    serde_json::json!({
        "library": "oxccl",
        "version": env!("CARGO_PKG_VERSION"),
        "program": bench.program_name(),
        "collective": bench.name(),
        "nranks": world,
        "device": opts.device,
        "settings": {
            "min_bytes": opts.min_bytes,
            "max_bytes": opts.max_bytes,
            "step": opts.step_description(),
            "iters": opts.iters,
            "warmup_iters": opts.warmup,
            "validation": opts.check,
            "average": opts.average.code(),
        },
        "ranks": ranks.iter().map(|i| serde_json::json!({"pid": i.pid, "host": i.host})).collect::<Vec<_>>(),
        "rows": rows,
        "wrong": wrong,
        "avg_busbw_gbps": avg_busbw,
    })
}

#[allow(clippy::too_many_arguments)]
fn write_json(
    path: &Path,
    bench: Bench,
    opts: &Options,
    world: usize,
    ranks: &[RankInfo],
    rows: &[Row],
    wrong: u64,
    avg: f64,
) -> Result<(), BenchError> {
    let doc = json_document(bench, opts, world, ranks, rows, wrong, avg);
    let io = |source| BenchError::Io {
        what: path.display().to_string(),
        source,
    };
    let text = serde_json::to_string_pretty(&doc).map_err(|e| io(e.into()))?;
    std::fs::write(path, text + "\n").map_err(io)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use oxccl::{Config, run_in_process};

    fn opts(args: &[&str]) -> Options {
        Options::parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap()
    }

    /// Runs `kind` on `world` in-process ranks; returns rank 0's summary and table.
    fn in_process(world: usize, bench: impl Into<Bench>, args: &[&str]) -> Vec<(Summary, String)> {
        let (o, bench) = (opts(args), bench.into());
        run_in_process(world, Config::default(), move |comm| {
            let mut out = Vec::new();
            run(comm, bench, &o, &mut out)
                .map(|s| (s, String::from_utf8_lossy(&out).into_owned()))
                .map_err(|e| oxccl::Error::InvalidArgument(e.to_string()))
        })
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
    }

    /// Split as `NCCL_TESTS_SPLIT=MOD 2` makes it: two groups of two run
    /// every call at once, their results checked and counted over the job,
    /// the job's rank 0 alone printing; groups of different sizes are
    /// refused on every rank.
    #[test]
    fn split_groups_run_at_once_and_report_once() {
        let o = opts(&[
            "-b", "1K", "-e", "64K", "-f", "64", "-n", "2", "-w", "1", "-d", "int32",
        ]);
        for (bench, kind) in [
            (Bench::from(Kind::AllReduce), "all_reduce"),
            (Bench::from(Kind::AllToAll), "alltoall"),
            (Bench::from(Kind::SendRecv), "sendrecv"),
        ] {
            let out = run_in_process(4, Config::default(), |comm| {
                let group = options::split_group(None, Some("MOD 2"), comm.rank())
                    .unwrap()
                    .unwrap();
                let mut out = Vec::new();
                let s = split_and_run(comm, group, bench, &o, &mut out).unwrap();
                (s, String::from_utf8_lossy(&out).into_owned())
            })
            .unwrap();
            for (r, (s, table)) in out.iter().enumerate() {
                assert_eq!(s.wrong, 0, "{kind} rank {r}");
                assert_eq!(s.rows.len(), 2, "{kind} rank {r}");
                assert_eq!(table.is_empty(), r != 0, "{kind} rank {r}");
            }
            let table = &out[0].1;
            assert!(table.contains("#  Rank  1 Group  1 "), "{kind}: {table}");
            assert!(table.contains("#  Rank  2 Group  0 "), "{kind}: {table}");
            assert!(
                table.contains("Out of bounds values : 0 OK"),
                "{kind}: {table}"
            );
            assert!(
                table.lines().any(|l| l.trim_start().starts_with("65536 ")),
                "{kind}: {table}"
            );
        }
        // Wrong elements are counted over the job: 3 on each of 4 ranks,
        // out of place and in place.
        let o = opts(&[
            "-b",
            "4K",
            "-e",
            "4K",
            "-n",
            "1",
            "-w",
            "0",
            "--debug-corrupt",
            "3",
        ]);
        let wrong = run_in_process(4, Config::default(), |comm| {
            let mut out = Vec::new();
            split_and_run(
                comm,
                (comm.rank() / 2) as u32,
                Kind::AllReduce,
                &o,
                &mut out,
            )
            .unwrap()
            .wrong
        })
        .unwrap();
        assert_eq!(wrong, [24; 4]);
        let refused = run_in_process(3, Config::default(), |comm| {
            let mut out = Vec::new();
            split_and_run(
                comm,
                (comm.rank() % 2) as u32,
                Kind::AllReduce,
                &o,
                &mut out,
            )
            .unwrap_err()
            .to_string()
        })
        .unwrap();
        for e in refused {
            assert!(
                e.contains("groups of different sizes ([2, 1, 2] ranks"),
                "{e}"
            );
        }
    }

    #[test]
    fn every_collective_every_dtype_checks_clean_in_process() {
        for kind in [
            Kind::AllReduce,
            Kind::AllGather,
            Kind::Broadcast,
            Kind::ReduceScatter,
            Kind::Reduce,
        ] {
            let res = in_process(
                3,
                kind,
                &[
                    "-b", "8", "-e", "4K", "-f", "8", "-n", "2", "-w", "1", "-d", "all", "-o",
                    "all", "-r", "2",
                ],
            );
            let (s, table) = &res[0];
            assert_eq!(s.wrong, 0, "{kind:?}\n{table}");
            let ops = if matches!(kind, Kind::AllGather | Kind::Broadcast) {
                1
            } else {
                5
            };
            assert_eq!(s.rows.len(), 10 * ops * 4, "{table}");
            assert!(table.contains("# Out of bounds values : 0 OK"), "{table}");
            // Only rank 0 prints.
            assert!(res[1].1.is_empty() && res[2].1.is_empty());
        }
    }

    #[test]
    fn exchanges_sendrecv_and_hypercube_check_clean_in_process() {
        for (bench, world) in [
            (Bench::Collective(Kind::AllToAll), 3),
            (Bench::Collective(Kind::Gather), 3),
            (Bench::Collective(Kind::Scatter), 3),
            (Bench::Collective(Kind::SendRecv), 3),
            (Bench::HyperCube, 4),
            (Bench::HyperCube, 2),
        ] {
            let res = in_process(
                world,
                bench,
                &[
                    "-b", "48", "-e", "48K", "-f", "8", "-n", "2", "-w", "1", "-d", "all", "-r",
                    "1",
                ],
            );
            let (s, table) = &res[0];
            assert_eq!(s.wrong, 0, "{bench:?}\n{table}");
            assert_eq!(s.rows.len(), 10 * 4, "{table}");
            for r in &s.rows {
                assert_eq!(r.out_of_place.unwrap().wrong, Some(0), "{table}");
                // In place only where oxccl has that form.
                assert_eq!(r.in_place.is_some(), bench == Bench::HyperCube, "{table}");
                let rooted = matches!(bench, Bench::Collective(Kind::Gather | Kind::Scatter));
                assert_eq!(r.root, if rooted { 1 } else { -1 });
            }
        }
        // nccl-tests' hypercube: algbw = busbw = (n-1)/n of the gathered bytes / time.
        let res = in_process(4, Bench::HyperCube, &["-b", "64K", "-e", "64K", "-n", "1"]);
        let m = res[0].0.rows[0].out_of_place.unwrap();
        assert_eq!(m.algbw, m.busbw);
        let want = 65536.0 * 0.75 / 1e9 / (m.time_us / 1e6);
        assert!((m.busbw - want).abs() < 1e-9 * want.max(1.0), "{m:?}");
    }

    #[test]
    fn hypercube_skips_other_worlds_and_exchanges_refuse_in_place_only() {
        let res = in_process(3, Bench::HyperCube, &["-b", "1K", "-e", "1K", "-n", "1"]);
        assert!(res[0].1.contains("nRanks 3 is not a power of 2, skipping"));
        assert!(res[0].0.rows.is_empty());
        let o = opts(&["--in-place-only"]);
        let errs = run_in_process(2, Config::default(), move |comm| {
            run(comm, Kind::AllToAll, &o, &mut Vec::new()).map(|_| ())
        })
        .unwrap();
        for e in errs {
            assert!(matches!(e, Err(BenchError::Usage(_))), "{e:?}");
        }
    }

    #[test]
    fn corruption_is_counted_on_every_rank() {
        let res = in_process(
            2,
            Kind::AllReduce,
            &["-b", "1K", "-e", "1K", "-n", "1", "--debug-corrupt", "3"],
        );
        let (s, table) = &res[0];
        assert_eq!(s.wrong, 12, "{table}");
        assert_eq!(s.rows[0].out_of_place.unwrap().wrong, Some(6));
        assert!(
            table.contains("# Out of bounds values : 12 FAILED"),
            "{table}"
        );
        assert_eq!(res[1].0.wrong, 12);
    }

    #[test]
    fn unchecked_runs_and_single_variants() {
        let res = in_process(
            2,
            Kind::Broadcast,
            &[
                "-b",
                "64",
                "-e",
                "64",
                "-c",
                "0",
                "--in-place-only",
                "-r",
                "1",
                "-a",
                "2",
            ],
        );
        let (s, table) = &res[0];
        let row = &s.rows[0];
        assert!(row.out_of_place.is_none());
        assert_eq!(row.in_place.unwrap().wrong, None);
        assert_eq!(row.root, 1);
        assert_eq!(row.redop, "none");
        assert!(table.contains("N/A"), "{table}");
    }

    #[test]
    fn a_root_outside_the_world_is_a_usage_error() {
        let o = opts(&["-r", "2"]);
        let errs = run_in_process(2, Config::default(), move |comm| {
            run(comm, Kind::Reduce, &o, &mut Vec::new()).map(|_| ())
        })
        .unwrap();
        for e in errs {
            match e {
                Err(BenchError::Usage(m)) => assert!(m.contains("root 2"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn json_has_every_row() {
        let dir = std::env::temp_dir().join(format!("oxccl-bench-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ag.json");
        let p = path.to_str().unwrap().to_string();
        in_process(
            2,
            Kind::AllGather,
            &["-b", "16", "-e", "64", "-f", "2", "-n", "1", "-J", &p],
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["collective"], "all_gather");
        assert_eq!(v["nranks"], 2);
        let rows = v["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[2]["size"], 64);
        assert_eq!(rows[2]["count"], 8);
        assert_eq!(rows[2]["redop"], "none");
        assert_eq!(rows[2]["in_place"]["wrong"], 0);
        assert!(rows[2]["out_of_place"]["busbw_gbps"].is_number());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
