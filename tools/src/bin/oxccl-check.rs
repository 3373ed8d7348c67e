//! `oxccl-check`: runs collectives on every rank of a job, checks each
//! result element against the exact expected value, and reports the time.
//!
//! Start it under a launcher: `oxrun -n 4 -- oxccl-check`.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use oxccl::config::parse_bytes;
use oxccl::{Batch, Communicator, Config, DType, Descriptor, Kind, ReduceOp};
use oxccl_tools::devices::{MakeBuffer, buffer_factory};
use oxccl_tools::pattern;

/// Runs collectives across the ranks of a job, checks every element of every
/// result, and prints the median time and bandwidth (on rank 0).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Collective: all_reduce, broadcast, reduce, all_gather, reduce_scatter,
    /// barrier, or all (those six); or an exchange: all_to_all, gather,
    /// scatter, or send_recv (each rank sends to the next, receives from the
    /// previous), out of place only.
    #[arg(short, long, default_value = "all_reduce")]
    collective: String,
    /// Size in bytes as nccl-tests counts it (allgather: the gathered output;
    /// reduce-scatter: the input); suffixes K, M, G.
    #[arg(short, long, default_value = "64M", value_parser = |s: &str| parse_bytes("--bytes", s).map_err(|e| e.to_string()))]
    bytes: usize,
    /// Element type (f32, f16, bf16, f64, i8, u8, i32, u32, i64, u64, or nccl-tests' names).
    #[arg(short, long, default_value = "f32")]
    dtype: DType,
    /// Reduction: sum, prod, min, max, avg.
    #[arg(short, long, default_value = "sum")]
    op: ReduceOp,
    /// Root of broadcast and reduce.
    #[arg(short, long, default_value_t = 0)]
    root: usize,
    /// Timed iterations.
    #[arg(short, long, default_value_t = 5)]
    iters: usize,
    /// Untimed warm-up iterations.
    #[arg(short, long, default_value_t = 1)]
    warmup: usize,
    /// Run in place (output over input).
    #[arg(long)]
    in_place: bool,
    /// Skip checking the results (only time the calls).
    #[arg(long)]
    no_check: bool,
    /// Where the buffers live: cpu (host memory), hostdev (host memory
    /// handled as a device buffer reached by address), wgpu or cuda (device
    /// memory, reduced on the device; needs the crate feature of that name).
    #[arg(long, default_value = "cpu")]
    device: Device,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Device {
    Cpu,
    /// Host memory handled as a device buffer reached by address.
    Hostdev,
    Wgpu,
    Cuda,
}

/// The buffer factory of `device`, or `None` for host memory.
fn device_buffers(device: Device) -> Result<Option<MakeBuffer>, String> {
    let config = Config::from_env().map_err(|e| e.to_string())?;
    let local = oxccl::config::launch_from_lookup(&oxccl::config::ProcessEnv)
        .ok()
        .and_then(|l| l.local_rank);
    let name = format!("{device:?}").to_lowercase();
    buffer_factory(&name, &config, local).map_err(|e| e.to_string())
}

fn kinds(name: &str) -> Result<Vec<Kind>, String> {
    let ring = Kind::ALL.into_iter().filter(|k| k.on_ring());
    if name == "all" {
        return Ok(ring.collect());
    }
    let exchanges = [
        Kind::AllToAll,
        Kind::Gather,
        Kind::Scatter,
        Kind::SendRecv,
        Kind::AllToAllV,
        Kind::AllGatherV,
        Kind::ReduceScatterV,
    ];
    ring.chain(exchanges)
        .find(|k| k.name() == name || k.name().replace('_', "") == name)
        .map(|k| vec![k])
        .ok_or_else(|| format!("unknown collective '{name}'"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let kinds = match kinds(&args.collective) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("oxccl-check: {e}");
            return ExitCode::from(2);
        }
    };
    match Config::from_env() {
        Ok(config) => oxccl_tools::init_logging(&config.debug),
        Err(e) => {
            eprintln!("oxccl-check: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut comm = match Communicator::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("oxccl-check: {e}");
            return ExitCode::FAILURE;
        }
    };
    let make = match device_buffers(args.device) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("oxccl-check: rank {}: {e}", comm.rank());
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for kind in kinds {
        if let Err(e) = run(&mut comm, &args, kind, make.as_ref()) {
            eprintln!("oxccl-check: {e}");
            failed = true;
            break;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run(
    comm: &mut Communicator,
    args: &Args,
    kind: Kind,
    make: Option<&MakeBuffer>,
) -> Result<(), String> {
    if matches!(
        kind,
        Kind::AllToAllV | Kind::AllGatherV | Kind::ReduceScatterV
    ) {
        return run_uneven(comm, args, kind, make);
    }
    let (world, rank) = (comm.world(), comm.rank());
    let size = args.dtype.size();
    let elems = args.bytes / size;
    let count = match kind {
        Kind::AllGather | Kind::ReduceScatter | Kind::AllToAll | Kind::Gather | Kind::Scatter => {
            elems / world
        }
        Kind::Barrier => 0,
        _ => elems,
    };
    let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
    let d = Descriptor {
        kind,
        dtype: args.dtype,
        op: args.op,
        // A message's sender: the previous rank's data arrives here.
        root: if kind == Kind::SendRecv {
            prev
        } else {
            args.root
        },
        count,
    };
    let exchange = pattern::exchange(&d);
    if (exchange.is_some() || kind == Kind::SendRecv) && args.in_place {
        return Err(format!("{} has no in-place form", kind.name()));
    }
    let input = pattern::input(&d, world, rank);
    let out_len = pattern::output_len(&d, world, rank);
    let mut times = Vec::with_capacity(args.iters);
    let mut wrong = 0;
    let mut output = vec![
        0u8;
        if args.in_place && kind == Kind::ReduceScatter {
            count * world * size
        } else {
            out_len
        }
    ];
    // Device buffers: the input, and the output (or in-place buffer).
    let mut dev = match make {
        Some(make) => Some((
            make(&input).map_err(|e| e.to_string())?,
            make(&output).map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    for i in 0..args.warmup + args.iters {
        let t = Instant::now();
        if args.in_place {
            // Lay the input where an in-place call expects it.
            match kind {
                Kind::AllGather => {
                    output[rank * count * size..(rank + 1) * count * size].copy_from_slice(&input)
                }
                _ => output.copy_from_slice(&input),
            }
        }
        match (&mut dev, args.in_place) {
            (None, _) if kind == Kind::SendRecv => {
                let mut b = Batch::new();
                b.send_bytes(&input, d.dtype, next)
                    .recv_bytes(&mut output, d.dtype, prev);
                comm.run_batch(b)
            }
            (Some((inp, out)), _) if kind == Kind::SendRecv => {
                let mut b = Batch::new();
                b.send_device(&**inp, d.dtype, next)
                    .recv_device(&mut **out, d.dtype, prev);
                comm.run_batch(b)
            }
            (None, _) if exchange.is_some() => match exchange {
                Some(x) => comm.run_exchange(x, d.dtype, &input, &mut output),
                None => Ok(()),
            },
            (Some((inp, out)), _) if exchange.is_some() => match exchange {
                Some(x) => comm.run_exchange_device(x, d.dtype, inp.as_ref(), out.as_mut()),
                None => Ok(()),
            },
            (None, true) => comm.run_bytes(d, None, &mut output),
            (None, false) => comm.run_bytes(d, Some(&input), &mut output),
            (Some((_, out)), true) => out
                .write(0, &output)
                .map_err(|e| oxccl::Error::InvalidArgument(e.to_string()))
                .and_then(|()| comm.run_device(d, None, out.as_mut())),
            (Some((inp, out)), false) => comm.run_device(d, Some(inp.as_ref()), out.as_mut()),
        }
        .map_err(|e| e.to_string())?;
        let took = t.elapsed();
        if let Some((_, out)) = &dev {
            out.read(0, &mut output).map_err(|e| e.to_string())?;
        }
        if i >= args.warmup {
            times.push(took);
        }
        let result = match (kind, args.in_place) {
            (Kind::ReduceScatter, true) => &output[rank * count * size..(rank + 1) * count * size],
            _ => &output[..],
        };
        if !args.no_check {
            wrong += pattern::count_wrong(&d, world, rank, result);
        }
    }
    if wrong > 0 {
        return Err(format!(
            "rank {rank}: {}: {wrong} wrong elements",
            d.call(0)
        ));
    }
    times.sort();
    let median = times.get(times.len() / 2).copied().unwrap_or_default();
    if rank == 0 {
        let n = world as f64;
        let factor = match kind {
            Kind::AllReduce => 2.0 * (n - 1.0) / n,
            Kind::AllGather
            | Kind::ReduceScatter
            | Kind::AllToAll
            | Kind::Gather
            | Kind::Scatter => (n - 1.0) / n,
            _ => 1.0,
        };
        let bytes = match kind {
            Kind::AllGather
            | Kind::ReduceScatter
            | Kind::AllToAll
            | Kind::Gather
            | Kind::Scatter => count * world * size,
            _ => count * size,
        };
        let secs = median.as_secs_f64().max(1e-9);
        let algbw = bytes as f64 / secs / 1e9;
        println!(
            "{:<14} {:>5} {:>4} {:>12} bytes, {world} ranks{}: median {:>10.1} us over {} iterations, algbw {:.2} GB/s, busbw {:.2} GB/s, {}",
            kind.name(),
            args.dtype.nccl_name(),
            if d.reduces() { args.op.name() } else { "-" },
            bytes,
            if args.in_place { ", in place" } else { "" },
            secs * 1e6,
            times.len(),
            algbw,
            algbw * factor,
            if args.no_check {
                "not checked"
            } else {
                "result OK"
            },
        );
    }
    Ok(())
}

/// The calls of per-rank counts ([`pattern::Uneven`]: blocks of 0, half
/// and all of `--bytes / world`), checked and timed like the others.
fn run_uneven(
    comm: &mut Communicator,
    args: &Args,
    kind: Kind,
    make: Option<&MakeBuffer>,
) -> Result<(), String> {
    let (world, rank) = (comm.world(), comm.rank());
    if args.in_place {
        return Err(format!("{} has no in-place form", kind.name()));
    }
    let u = pattern::Uneven {
        kind,
        dtype: args.dtype,
        op: args.op,
        count: args.bytes / args.dtype.size() / world,
        world,
    };
    let (counts, layout) = (u.counts(), u.layout(rank));
    let x = u.exchange(&counts, &layout);
    let input = u.input(rank);
    let mut output = vec![0xA5u8; u.output_len(rank)];
    let mut dev = match make {
        Some(make) => Some((
            make(&input).map_err(|e| e.to_string())?,
            make(&output).map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    let (mut times, mut wrong) = (Vec::new(), 0);
    for i in 0..args.warmup + args.iters {
        let t = Instant::now();
        match &mut dev {
            None => comm.run_exchange(x, args.dtype, &input, &mut output),
            Some((inp, out)) => comm.run_exchange_device(x, args.dtype, &**inp, &mut **out),
        }
        .map_err(|e| e.to_string())?;
        let took = t.elapsed();
        if let Some((_, out)) = &dev {
            out.read(0, &mut output).map_err(|e| e.to_string())?;
        }
        if i >= args.warmup {
            times.push(took);
        }
        if !args.no_check {
            wrong += u.count_wrong(rank, &output);
        }
    }
    if wrong > 0 {
        return Err(format!(
            "rank {rank}: {}: {wrong} wrong elements",
            kind.name()
        ));
    }
    times.sort();
    let median = times.get(times.len() / 2).copied().unwrap_or_default();
    if rank == 0 {
        println!(
            "{:<14} {:>5} {:>4} blocks of 0 to {} elements, {world} ranks: median {:>10.1} us over {} iterations, {}",
            kind.name(),
            args.dtype.nccl_name(),
            if kind == Kind::ReduceScatterV {
                args.op.name()
            } else {
                "-"
            },
            u.count,
            median.as_secs_f64() * 1e6,
            times.len(),
            if args.no_check {
                "not checked"
            } else {
                "result OK"
            },
        );
    }
    Ok(())
}
