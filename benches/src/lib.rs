//! Shared code of the oxccl benchmark binaries.
//!
//! `all_reduce_perf`, `all_gather_perf`, `broadcast_perf`,
//! `reduce_scatter_perf` and `reduce_perf` are thin mains over [`main`]: they
//! take nccl-tests' flags ([`Options`]), run under any launcher
//! (`Communicator::from_env()`), time each size out of place and in place,
//! check every element of one more call on every rank against
//! [`oxccl_tools::pattern`], and print nccl-tests' table on rank 0 ([`report`]).

#![forbid(unsafe_code)]

pub mod options;
pub mod report;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use oxccl::{Communicator, Config, DType, Descriptor, Kind, ReduceOp};
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

/// The whole program for `kind`: parses the flags, joins the job, runs,
/// prints. Exit status 0 when every result is right, 1 on wrong results or a
/// failure, 2 on bad flags.
pub fn main(kind: Kind) -> ExitCode {
    let program = program_name(kind);
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
    let mut stdout = std::io::stdout().lock();
    match run(&mut comm, kind, &opts, &mut stdout) {
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

/// Runs the benchmark of `kind` on this rank; rank 0 writes the table to `out`
/// (and the JSON file of `-J`).
pub fn run(
    comm: &mut Communicator,
    kind: Kind,
    opts: &Options,
    out: &mut dyn Write,
) -> Result<Summary, BenchError> {
    let (world, rank) = (comm.world(), comm.rank());
    let rooted = matches!(kind, Kind::Broadcast | Kind::Reduce);
    if rooted && opts.root >= world {
        return Err(BenchError::Usage(format!(
            "root {} (-r) is not a rank of this world of {world}",
            opts.root
        )));
    }
    let sizes = opts.sizes().map_err(BenchError::Usage)?;
    let local_rank = oxccl::config::launch_from_lookup(&oxccl::config::ProcessEnv)
        .ok()
        .and_then(|l| l.local_rank);
    let make = oxccl_tools::devices::buffer_factory(&opts.device, comm.config(), local_rank)?;
    let ranks = gather_rank_info(comm)?;
    let io = |source| BenchError::Io {
        what: "the table".into(),
        source,
    };
    let print = rank == 0;
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
    for &dtype in &opts.dtypes {
        for &op in &ops {
            for &size in &sizes {
                let row = run_row(comm, kind, opts, dtype, op, size, make.as_ref())?;
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
            write_json(path, kind, opts, world, &ranks, &rows, wrong, avg)?;
        }
    }
    Ok(Summary { rows, wrong })
}

/// Every rank's pid and host, in rank order.
fn gather_rank_info(comm: &mut Communicator) -> Result<Vec<RankInfo>, BenchError> {
    let mine = RankInfo::here().encode();
    let mut all = vec![0u8; mine.len() * comm.world()];
    comm.all_gather(&mine[..], &mut all)?;
    Ok(all
        .chunks_exact(report::RANK_INFO_LEN)
        .map(RankInfo::decode)
        .collect())
}

/// Times one size of one dtype and op, out of place and in place.
fn run_row(
    comm: &mut Communicator,
    kind: Kind,
    opts: &Options,
    dtype: DType,
    op: ReduceOp,
    size: usize,
    make: Option<&MakeBuffer>,
) -> Result<Row, BenchError> {
    let world = comm.world();
    let count = report::count_for(kind, size, dtype, world);
    let bytes = report::row_bytes(kind, count, dtype, world);
    let rooted = matches!(kind, Kind::Broadcast | Kind::Reduce);
    let d = Descriptor {
        kind,
        dtype,
        op,
        root: if rooted { opts.root } else { 0 },
        count,
    };
    let input = pattern::input(&d, world, comm.rank());
    let mut measure = |in_place: bool| -> Result<Measure, BenchError> {
        let (time_us, wrong) = time_and_check(comm, d, opts, &input, in_place, make)?;
        Ok(Measure::new(kind, world, bytes, time_us, wrong))
    };
    let out_of_place = if opts.out_of_place() {
        Some(measure(false)?)
    } else {
        None
    };
    let in_place = if opts.in_place() {
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
fn time_and_check(
    comm: &mut Communicator,
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
        Kind::AllGather => chunk * world,
        Kind::ReduceScatter if in_place => chunk * world,
        _ => chunk,
    };
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
    let call = |comm: &mut Communicator, buf: &mut [u8], dev: &mut DevicePair| match (dev, in_place)
    {
        (None, true) => comm.run_bytes(d, None, buf),
        (None, false) => comm.run_bytes(d, Some(input), buf),
        (Some((_, out)), true) => comm.run_device(d, None, out.as_mut()),
        (Some((inp, out)), false) => comm.run_device(d, Some(inp.as_ref()), out.as_mut()),
    };
    lay(&mut output);
    if let Some((_, out)) = &mut dev {
        out.write(0, &output).map_err(oxccl::Error::from)?;
    }
    for _ in 0..opts.warmup {
        call(comm, &mut output, &mut dev)?;
    }
    comm.barrier()?;
    let start = Instant::now();
    for _ in 0..opts.iters {
        call(comm, &mut output, &mut dev)?;
    }
    let local_us = start.elapsed().as_secs_f64() * 1e6 / opts.iters as f64;
    let time_us = combine_times(comm, opts.average, local_us)?;
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
    comm.all_reduce_in_place(&mut total, ReduceOp::Sum)?;
    Ok((time_us, Some(total[0])))
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
    kind: Kind,
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
        "program": program_name(kind),
        "collective": kind.name(),
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
    kind: Kind,
    opts: &Options,
    world: usize,
    ranks: &[RankInfo],
    rows: &[Row],
    wrong: u64,
    avg: f64,
) -> Result<(), BenchError> {
    let doc = json_document(kind, opts, world, ranks, rows, wrong, avg);
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
    fn in_process(world: usize, kind: Kind, args: &[&str]) -> Vec<(Summary, String)> {
        let o = opts(args);
        run_in_process(world, Config::default(), move |comm| {
            let mut out = Vec::new();
            run(comm, kind, &o, &mut out)
                .map(|s| (s, String::from_utf8_lossy(&out).into_owned()))
                .map_err(|e| oxccl::Error::InvalidArgument(e.to_string()))
        })
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
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
