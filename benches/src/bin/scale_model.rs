//! Allreduce at scale, simulated: runs the real plans of every allreduce
//! algorithm (and of the one `select` picks) over a latency/bandwidth model
//! of a network with `oxccl::algo::model`, and prints a markdown table of
//! the times per world and size; `--svg` also draws time against world.
//!
//! `scale_model` prints the tables for the TCP model measured here and a
//! 100 Gbit/s datacenter network; `--alpha-us/--gbytes/--reduce-gbytes`
//! give a measured link instead, and `--tsv` prints one line per run for
//! scripts (ci/netns-scale.sh).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use oxccl::algo::model::{Limits, Shaping, simulate_many};
use oxccl::algo::{self, Algorithm, LinkModel};
use oxccl::{Config, DType, Descriptor, Kind, ReduceOp};
use oxccl_benches::options::parse_size;

/// The allreduce algorithms, in the table's column order.
const ALGOS: [&str; 4] = [
    "ring",
    "gather_reduce",
    "halving_doubling",
    "recursive_doubling",
];

#[derive(Debug, Parser)]
#[command(about = "Simulated allreduce time at scale, per algorithm and for select's pick")]
struct Args {
    /// Bytes per rank, comma-separated (suffixes K, M, G).
    #[arg(long, default_value = "8,64K,1M,64M,1G", value_delimiter = ',', value_parser = parse_size)]
    sizes: Vec<usize>,
    /// Worlds, comma-separated.
    #[arg(long, default_value = "8,16,64,256,1024,4096", value_delimiter = ',')]
    worlds: Vec<usize>,
    /// Links to model, comma-separated: tcp, datacenter, shm, or custom
    /// (the --alpha-us, --gbytes and --reduce-gbytes below).
    #[arg(long, default_value = "tcp,datacenter", value_delimiter = ',')]
    links: Vec<String>,
    /// Custom link: seconds per message, in microseconds.
    #[arg(long, default_value_t = 50.0)]
    alpha_us: f64,
    /// Custom link: bandwidth, GB/s (1e9 bytes).
    #[arg(long, default_value_t = 0.1)]
    gbytes: f64,
    /// Custom link: reduction bandwidth, GB/s.
    #[arg(long, default_value_t = 10.0)]
    reduce_gbytes: f64,
    /// Shape each rank's outbound link with a token bucket of this many
    /// bytes (as `tc tbf` does, suffixes K, M) and time a loop of calls,
    /// as all_reduce_perf does: `--warmup` calls, then the mean of `--calls`.
    /// Without it, one call over plain links.
    #[arg(long, value_parser = parse_size)]
    burst: Option<usize>,
    /// Shaped links: calls before the timed ones.
    #[arg(long, default_value_t = 4)]
    warmup: usize,
    /// Shaped links: calls timed.
    #[arg(long, default_value_t = 16)]
    calls: usize,
    /// Largest pipeline slice (default: oxccl's default OXCCL_SLICE_BYTES).
    #[arg(long, value_parser = parse_size)]
    slice: Option<usize>,
    /// Most ops (sends plus receives, all ranks) one simulation may build.
    #[arg(long, default_value_t = Limits::default().max_ops)]
    max_ops: u64,
    /// Print tab-separated lines (link, world, bytes, algorithm, simulated
    /// seconds, closed-form seconds, selected) instead of markdown.
    #[arg(long)]
    tsv: bool,
    /// Also write an SVG plot of time against world (log-log, one line per
    /// algorithm) for these sizes.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// The sizes the plot shows, comma-separated.
    #[arg(long, default_value = "64K,64M", value_delimiter = ',', value_parser = parse_size)]
    plot_sizes: Vec<usize>,
}

/// One simulated cell: seconds, or why there is none.
type Cell = Result<f64, String>;

struct Run {
    link: String,
    world: usize,
    bytes: usize,
    /// Per algorithm of [`ALGOS`]: simulated and closed-form seconds.
    times: Vec<(Cell, f64)>,
    selected: &'static str,
}

fn algorithm(name: &str) -> Option<&'static dyn Algorithm> {
    algo::ALL.iter().copied().find(|a| a.name() == name)
}

fn link(name: &str, a: &Args) -> Result<LinkModel, String> {
    match name {
        "tcp" => Ok(LinkModel::TCP),
        "datacenter" => Ok(LinkModel::DATACENTER),
        "shm" => Ok(LinkModel::SHM),
        "custom" => Ok(LinkModel {
            alpha: a.alpha_us * 1e-6,
            beta: 1.0 / (a.gbytes * 1e9),
            gamma: 1.0 / (a.reduce_gbytes * 1e9),
            // Allreduce only here: no chains to cut.
            pipelines: false,
            hd_byte_penalty: algo::HD_BYTE_PENALTY,
            crowded_slice: usize::MAX,
        }),
        _ => Err(format!(
            "unknown link '{name}': use tcp, datacenter, shm or custom"
        )),
    }
}

fn show(t: f64) -> String {
    if t < 1e-3 {
        format!("{:.1} µs", t * 1e6)
    } else if t < 1.0 {
        format!("{:.2} ms", t * 1e3)
    } else {
        format!("{:.2} s", t)
    }
}

fn show_bytes(b: usize) -> String {
    match b {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    let config = Config::default();
    let slice = a.slice.unwrap_or(config.slice_bytes);
    let limits = Limits { max_ops: a.max_ops };
    let mut models = Vec::new();
    for name in &a.links {
        match link(name, &a) {
            Ok(l) => models.push(l),
            Err(e) => {
                eprintln!("scale_model: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let started = Instant::now();
    // Per (world, size): per algorithm, per link. The plans are built once
    // for every link.
    let mut runs = Vec::new();
    for &world in &a.worlds {
        for &bytes in &a.sizes {
            let d = Descriptor {
                kind: Kind::AllReduce,
                dtype: DType::F32,
                op: ReduceOp::Sum,
                root: 0,
                count: bytes / 4,
            };
            let per_algo: Vec<Vec<(Cell, f64)>> = ALGOS
                .iter()
                .map(|n| {
                    let Some(alg) = algorithm(n) else {
                        return vec![(Err(format!("no algorithm {n}")), f64::NAN); models.len()];
                    };
                    let closed = models.iter().map(|l| alg.cost(&d, world, l));
                    let shaping = a.burst.map(|burst| Shaping {
                        burst: burst as f64,
                        warmup: a.warmup,
                        calls: a.calls,
                    });
                    let sims = simulate_many(alg, world, bytes, slice, &models, limits, shaping);
                    match sims {
                        Ok(v) => v
                            .into_iter()
                            .map(|r| r.map(|r| r.time).map_err(|e| e.to_string()))
                            .zip(closed)
                            .collect(),
                        Err(e) => closed.map(|c| (Err(e.to_string()), c)).collect(),
                    }
                })
                .collect();
            for (li, (name, l)) in a.links.iter().zip(&models).enumerate() {
                runs.push(Run {
                    link: name.clone(),
                    world,
                    bytes,
                    times: per_algo.iter().map(|v| v[li].clone()).collect(),
                    selected: algo::select(&d, world, &config, l).name(),
                });
            }
        }
    }
    let elapsed = started.elapsed();
    if a.tsv {
        for r in &runs {
            for (n, (sim, closed)) in ALGOS.iter().zip(&r.times) {
                let sim = sim.as_ref().map_or("nan".to_string(), |t| format!("{t:e}"));
                println!(
                    "{}\t{}\t{}\t{n}\t{sim}\t{closed:e}\t{}",
                    r.link,
                    r.world,
                    r.bytes,
                    u8::from(*n == r.selected)
                );
            }
        }
    } else {
        print!("{}", markdown(&runs, &a, slice));
        eprintln!(
            "simulated {} cells in {:.1?}",
            runs.len() * ALGOS.len(),
            elapsed
        );
    }
    if let Some(path) = &a.svg {
        let svg = plot(&runs, &a.plot_sizes);
        if let Err(e) = std::fs::write(path, svg) {
            eprintln!("scale_model: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn markdown(runs: &[Run], a: &Args, slice: usize) -> String {
    let mut out = String::new();
    for name in &a.links {
        let l = match link(name, a) {
            Ok(l) => l,
            Err(_) => continue,
        };
        let _ = writeln!(
            out,
            "\n#### {name}: alpha {:.1} µs, {:.2} GB/s, reduce {:.1} GB/s, slice {}\n",
            l.alpha * 1e6,
            1e-9 / l.beta,
            1e-9 / l.gamma,
            show_bytes(slice)
        );
        let _ = writeln!(
            out,
            "| ranks | bytes/rank | {} | select picks | pick / ring |",
            ALGOS.join(" | ")
        );
        let _ = writeln!(out, "|---:|---:|{}---|---:|", "---:|".repeat(ALGOS.len()));
        for r in runs.iter().filter(|r| &r.link == name) {
            let cells: Vec<String> = r
                .times
                .iter()
                .map(|(t, _)| t.as_ref().map_or("—".to_string(), |t| show(*t)))
                .collect();
            let pick = ALGOS.iter().position(|n| *n == r.selected);
            let (pick_time, ratio) = match pick.map(|i| &r.times[i].0) {
                Some(Ok(t)) => (
                    show(*t),
                    match &r.times[0].0 {
                        Ok(ring) if t / ring < 0.1 => format!("{:.4}", t / ring),
                        Ok(ring) => format!("{:.2}", t / ring),
                        Err(_) => "—".into(),
                    },
                ),
                _ => ("—".into(), "—".into()),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} {} | {} |",
                r.world,
                show_bytes(r.bytes),
                cells.join(" | "),
                r.selected,
                pick_time,
                ratio
            );
        }
    }
    out
}

/// A log-log plot per (link, size): time against world, one line per algorithm.
fn plot(runs: &[Run], sizes: &[usize]) -> String {
    const W: f64 = 420.0;
    const H: f64 = 300.0;
    const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let mut links: Vec<&str> = Vec::new();
    for r in runs {
        if !links.contains(&r.link.as_str()) {
            links.push(&r.link);
        }
    }
    let (cols, rows) = (sizes.len().max(1), links.len().max(1));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">"#,
        W * cols as f64,
        H * rows as f64 + 30.0
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (li, link) in links.iter().enumerate() {
        for (si, &bytes) in sizes.iter().enumerate() {
            let (x0, y0) = (si as f64 * W + 60.0, li as f64 * H + 30.0);
            let (pw, ph) = (W - 90.0, H - 80.0);
            let cell: Vec<&Run> = runs
                .iter()
                .filter(|r| r.link == *link && r.bytes == bytes)
                .collect();
            let pts: Vec<f64> = cell
                .iter()
                .flat_map(|r| r.times.iter().filter_map(|(t, _)| t.as_ref().ok().copied()))
                .filter(|t| *t > 0.0)
                .collect();
            let worlds: Vec<f64> = cell.iter().map(|r| r.world as f64).collect();
            if pts.is_empty() || worlds.is_empty() {
                continue;
            }
            let (tmin, tmax) = pts
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), t| (a.min(*t), b.max(*t)));
            let (lt0, lt1) = (
                tmin.log10().floor(),
                tmax.log10().ceil().max(tmin.log10().floor() + 1.0),
            );
            let (wmin, wmax) = worlds
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), w| (a.min(*w), b.max(*w)));
            let (lw0, lw1) = (wmin.log2(), wmax.log2().max(wmin.log2() + 1.0));
            let x = |w: f64| x0 + (w.log2() - lw0) / (lw1 - lw0) * pw;
            let y = |t: f64| y0 + ph - (t.log10() - lt0) / (lt1 - lt0) * ph;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" font-weight="bold">{link}, {} per rank</text>"#,
                x0,
                y0 - 10.0,
                show_bytes(bytes)
            );
            let _ = writeln!(
                s,
                r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
            );
            for e in lt0 as i32..=lt1 as i32 {
                let t = 10f64.powi(e);
                let _ = writeln!(
                    s,
                    r##"<line x1="{x0}" x2="{}" y1="{yy}" y2="{yy}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                    x0 + pw,
                    x0 - 4.0,
                    y(t) + 4.0,
                    show(t),
                    yy = y(t)
                );
            }
            for w in &worlds {
                let _ = writeln!(
                    s,
                    r##"<text x="{}" y="{}" text-anchor="middle">{w}</text>"##,
                    x(*w),
                    y0 + ph + 14.0
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">ranks</text>"#,
                x0 + pw / 2.0,
                y0 + ph + 28.0
            );
            for (ai, name) in ALGOS.iter().enumerate() {
                let line: Vec<String> = cell
                    .iter()
                    .filter_map(|r| {
                        r.times[ai]
                            .0
                            .as_ref()
                            .ok()
                            .filter(|t| **t > 0.0)
                            .map(|t| format!("{:.1},{:.1}", x(r.world as f64), y(*t)))
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
                    COLORS[ai],
                    line.join(" ")
                );
                let _ = writeln!(
                    s,
                    r#"<text x="{}" y="{}" fill="{}">{name}</text>"#,
                    x0 + 8.0,
                    y0 + 14.0 + 13.0 * ai as f64,
                    COLORS[ai]
                );
            }
            // Select's pick: a dot on its algorithm's line.
            for r in &cell {
                if let Some(ai) = ALGOS.iter().position(|n| *n == r.selected) {
                    if let Ok(t) = r.times[ai].0 {
                        let _ = writeln!(
                            s,
                            r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="black"/>"#,
                            x(r.world as f64),
                            y(t)
                        );
                    }
                }
            }
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="10" y="{}">simulated allreduce time (oxccl::algo::model); black dots: the algorithm select picks</text>"#,
        H * rows as f64 + 20.0
    );
    s.push_str("</svg>\n");
    s
}
