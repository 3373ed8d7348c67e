//! What the `*_perf` binaries print: nccl-tests' header, rows and footer, and
//! the arithmetic behind the columns (counts, bus bandwidth factors).

use oxccl::{DType, Kind, ReduceOp};

use crate::options::Options;

/// nccl-tests' bus bandwidth factor of `kind` on `world` ranks: the share of
/// the data each rank's link carries relative to the size, so that busbw can
/// be compared with the link speed whatever the rank count.
pub fn bus_factor(kind: Kind, world: usize) -> f64 {
    let n = world.max(1) as f64;
    match kind {
        Kind::AllReduce => 2.0 * (n - 1.0) / n,
        Kind::AllGather | Kind::ReduceScatter => (n - 1.0) / n,
        Kind::Broadcast | Kind::Reduce | Kind::Barrier | Kind::SendRecv => 1.0,
        Kind::AllToAll
        | Kind::AllToAllV
        | Kind::Gather
        | Kind::Scatter
        | Kind::AllGatherV
        | Kind::ReduceScatterV => (n - 1.0) / n,
    }
}

/// The element count of a call of `kind` for a size of `bytes` as nccl-tests
/// counts it (the `count` column, and the [`oxccl::Descriptor`]'s count):
/// elements per rank for allgather (sent) and reduce-scatter (received),
/// elements of the buffer otherwise.
pub fn count_for(kind: Kind, bytes: usize, dtype: DType, world: usize) -> usize {
    let elems = bytes / dtype.size();
    match kind {
        Kind::AllGather
        | Kind::ReduceScatter
        | Kind::AllToAll
        | Kind::AllToAllV
        | Kind::Gather
        | Kind::Scatter
        | Kind::AllGatherV
        | Kind::ReduceScatterV => elems / world.max(1),
        Kind::Barrier => 0,
        _ => elems,
    }
}

/// The size in bytes a row reports for `count` (rounded down from the
/// requested size to whole elements, and for allgather and reduce-scatter to
/// whole elements on every rank): the bytes of all ranks' data.
pub fn row_bytes(kind: Kind, count: usize, dtype: DType, world: usize) -> usize {
    match kind {
        Kind::AllGather
        | Kind::ReduceScatter
        | Kind::AllToAll
        | Kind::AllToAllV
        | Kind::Gather
        | Kind::Scatter
        | Kind::AllGatherV
        | Kind::ReduceScatterV => count * dtype.size() * world,
        _ => count * dtype.size(),
    }
}

/// The name a binary prints for `kind`'s op column: `none` where no op applies.
pub fn redop_name(kind: Kind, op: ReduceOp) -> &'static str {
    match kind {
        Kind::AllReduce | Kind::Reduce | Kind::ReduceScatter => op.name(),
        _ => "none",
    }
}

/// The root column: the root of broadcast, reduce, gather and scatter, -1
/// for the others.
pub fn root_column(kind: Kind, root: usize) -> i64 {
    match kind {
        Kind::Broadcast | Kind::Reduce | Kind::Gather | Kind::Scatter => {
            i64::try_from(root).unwrap_or(i64::MAX)
        }
        _ => -1,
    }
}

/// One timed variant (out of place or in place) of one row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measure {
    /// Average time of one call, in microseconds (combined over ranks per `-a`).
    pub time_us: f64,
    /// Algorithm bandwidth: size / time, in GB/s (1e9 bytes per second).
    pub algbw: f64,
    /// Bus bandwidth: algbw × the collective's factor, in GB/s.
    pub busbw: f64,
    /// Wrong elements summed over ranks; `None` when results were not checked.
    pub wrong: Option<u64>,
}

impl Measure {
    /// The measure of a call on `bytes` that took `time_us` on average.
    pub fn new(kind: Kind, world: usize, bytes: usize, time_us: f64, wrong: Option<u64>) -> Self {
        let secs = time_us / 1e6;
        let algbw = if secs > 0.0 {
            bytes as f64 / 1e9 / secs
        } else {
            0.0
        };
        Measure {
            time_us,
            algbw,
            busbw: algbw * bus_factor(kind, world),
            wrong,
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Size in bytes (all ranks' data for allgather and reduce-scatter).
    pub size: usize,
    /// Element count (per rank for allgather and reduce-scatter).
    pub count: usize,
    /// nccl-tests' dtype name.
    pub dtype: DType,
    /// The op column (`none` where no op applies).
    pub redop: &'static str,
    /// The root column (-1 where no root applies).
    pub root: i64,
    /// Out-of-place result, if that variant ran.
    pub out_of_place: Option<Measure>,
    /// In-place result, if that variant ran.
    pub in_place: Option<Measure>,
}

/// nccl-tests' time column: fewer decimals as the time grows.
pub fn format_time(us: f64) -> String {
    if us >= 10000.0 {
        format!("{us:7.0}")
    } else if us >= 100.0 {
        format!("{us:7.1}")
    } else {
        format!("{us:7.2}")
    }
}

fn format_measure(m: Option<&Measure>) -> String {
    match m {
        Some(m) => {
            let wrong = m.wrong.map_or_else(|| "N/A".to_string(), |w| w.to_string());
            format!(
                "  {}  {:6.2}  {:6.2}  {:>5}",
                format_time(m.time_us),
                m.algbw,
                m.busbw,
                wrong
            )
        }
        None => format!("  {:>7}  {:>6}  {:>6}  {:>5}", "N/A", "N/A", "N/A", "N/A"),
    }
}

/// A row exactly as nccl-tests prints it.
pub fn format_row(r: &Row) -> String {
    format!(
        "{:>12}  {:>12}  {:>8}  {:>6}  {:>6}{}{}",
        r.size,
        r.count,
        r.dtype.nccl_name(),
        r.redop,
        r.root,
        format_measure(r.out_of_place.as_ref()),
        format_measure(r.in_place.as_ref())
    )
}

/// Where one rank runs, for the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankInfo {
    /// Process id.
    pub pid: u32,
    /// Host name.
    pub host: String,
    /// The group of the split it runs in (`NCCL_TESTS_SPLIT`; 0 unsplit).
    pub group: u32,
}

/// Bytes of one rank's record in the exchange that builds the header.
pub const RANK_INFO_LEN: usize = 64;

impl RankInfo {
    /// This process's record.
    pub fn here() -> RankInfo {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "localhost".to_string());
        RankInfo {
            pid: std::process::id(),
            host,
            group: 0,
        }
    }

    /// A fixed-size record: the pid, the group, then the host name
    /// (truncated, zero-padded).
    pub fn encode(&self) -> [u8; RANK_INFO_LEN] {
        let mut b = [0u8; RANK_INFO_LEN];
        b[..4].copy_from_slice(&self.pid.to_le_bytes());
        b[4..8].copy_from_slice(&self.group.to_le_bytes());
        let host = self.host.as_bytes();
        let n = host.len().min(RANK_INFO_LEN - 8);
        b[8..8 + n].copy_from_slice(&host[..n]);
        b
    }

    /// Reads a record written by [`encode`](Self::encode).
    pub fn decode(b: &[u8]) -> RankInfo {
        let word = |at: usize| {
            let mut w = [0u8; 4];
            if let Some(p) = b.get(at..at + 4) {
                w.copy_from_slice(p);
            }
            u32::from_le_bytes(w)
        };
        let host = b.get(8..).unwrap_or_default();
        let end = host.iter().position(|&c| c == 0).unwrap_or(host.len());
        RankInfo {
            pid: word(0),
            host: String::from_utf8_lossy(&host[..end]).into_owned(),
            group: word(4),
        }
    }
}

/// The header: settings, one line per rank, and the column titles.
pub fn header(opts: &Options, ranks: &[RankInfo]) -> String {
    let mut s = format!(
        "# nThread 1 nGpus 1 minBytes {} maxBytes {} step: {} warmup iters: {} iters: {} agg iters: 1 validation: {} graph: 0\n",
        opts.min_bytes,
        opts.max_bytes,
        opts.step_description(),
        opts.warmup,
        opts.iters,
        u8::from(opts.check),
    );
    s.push_str("#\n# Using devices\n");
    for (r, info) in ranks.iter().enumerate() {
        s.push_str(&format!(
            "#  Rank {r:2} Group {:2} Pid {:6} on {:>10} device {r:2} [{}] oxccl\n",
            info.group, info.pid, info.host, opts.device
        ));
    }
    s.push_str("#\n");
    s.push_str(&format!(
        "# {:>10}  {:>12}  {:>8}  {:>6}  {:>6}           out-of-place                       in-place          \n",
        "", "", "", "", ""
    ));
    s.push_str(&format!(
        "# {:>10}  {:>12}  {:>8}  {:>6}  {:>6}  {:>7}  {:>6}  {:>6}  {:>6}  {:>7}  {:>6}  {:>6}  {:>6}\n",
        "size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong", "time", "algbw",
        "busbw", "#wrong"
    ));
    s.push_str(&format!(
        "# {:>10}  {:>12}  {:>8}  {:>6}  {:>6}  {:>7}  {:>6}  {:>6}  {:>5}  {:>7}  {:>6}  {:>6}  {:>5}\n",
        "(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)",
        ""
    ));
    s
}

/// The mean bus bandwidth of every measure of `rows` (0 when there is none).
pub fn avg_busbw(rows: &[Row]) -> f64 {
    let bws: Vec<f64> = rows
        .iter()
        .flat_map(|r| [r.out_of_place, r.in_place])
        .flatten()
        .map(|m| m.busbw)
        .collect();
    if bws.is_empty() {
        0.0
    } else {
        bws.iter().sum::<f64>() / bws.len() as f64
    }
}

/// C's `%g`: six significant digits, trailing zeros dropped.
pub fn format_g(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let exp = v.abs().log10().floor() as i32;
    if !(-4..6).contains(&exp) {
        let s = format!("{v:.5e}");
        return match s.split_once('e') {
            Some((m, e)) => {
                let m = if m.contains('.') {
                    m.trim_end_matches('0').trim_end_matches('.')
                } else {
                    m
                };
                let e: i32 = e.parse().unwrap_or(0);
                format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
            }
            None => s,
        };
    }
    let decimals = usize::try_from(5 - exp).unwrap_or(0);
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// The footer: the total of wrong elements and the mean bus bandwidth.
pub fn footer(wrong: u64, avg_busbw: f64) -> String {
    format!(
        "# Out of bounds values : {wrong} {}\n# Avg bus bandwidth    : {} \n#\n",
        if wrong == 0 { "OK" } else { "FAILED" },
        format_g(avg_busbw)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bus_factors_match_nccl_tests() {
        assert_eq!(bus_factor(Kind::AllReduce, 2), 1.0);
        assert_eq!(bus_factor(Kind::AllReduce, 4), 1.5);
        assert_eq!(bus_factor(Kind::AllReduce, 1), 0.0);
        assert_eq!(bus_factor(Kind::AllGather, 4), 0.75);
        assert_eq!(bus_factor(Kind::ReduceScatter, 2), 0.5);
        assert_eq!(bus_factor(Kind::Broadcast, 8), 1.0);
        assert_eq!(bus_factor(Kind::Reduce, 8), 1.0);
        // alltoall.cu, gather.cu, scatter.cu: (n-1)/n; sendrecv.cu: 1.
        assert_eq!(bus_factor(Kind::AllToAll, 4), 0.75);
        assert_eq!(bus_factor(Kind::Gather, 2), 0.5);
        assert_eq!(bus_factor(Kind::Scatter, 4), 0.75);
        assert_eq!(bus_factor(Kind::SendRecv, 4), 1.0);
        assert_eq!(count_for(Kind::AllToAll, 4096, DType::F32, 4), 256);
        assert_eq!(row_bytes(Kind::Gather, 256, DType::F32, 4), 4096);
        assert_eq!(count_for(Kind::SendRecv, 4096, DType::F32, 4), 1024);
        assert_eq!(root_column(Kind::Gather, 2), 2);
        assert_eq!(root_column(Kind::SendRecv, 2), -1);
        let m = Measure::new(Kind::AllReduce, 4, 1_000_000, 1000.0, Some(0));
        assert!((m.algbw - 1.0).abs() < 1e-12);
        assert!((m.busbw - 1.5).abs() < 1e-12);
        assert_eq!(Measure::new(Kind::AllReduce, 4, 8, 0.0, None).algbw, 0.0);
    }

    #[test]
    fn counts_per_rank_and_row_sizes() {
        // allreduce, broadcast, reduce: the whole buffer.
        for k in [Kind::AllReduce, Kind::Broadcast, Kind::Reduce] {
            assert_eq!(count_for(k, 4096, DType::F32, 4), 1024);
            assert_eq!(row_bytes(k, 1024, DType::F32, 4), 4096);
            assert_eq!(count_for(k, 1001, DType::F64, 4), 125);
        }
        // allgather, reduce-scatter: the size counts every rank's data.
        for k in [Kind::AllGather, Kind::ReduceScatter] {
            assert_eq!(count_for(k, 4096, DType::F32, 4), 256);
            assert_eq!(row_bytes(k, 256, DType::F32, 4), 4096);
            assert_eq!(count_for(k, 4096, DType::BF16, 3), 682);
            assert_eq!(row_bytes(k, 682, DType::BF16, 3), 4092);
            assert_eq!(count_for(k, 8, DType::F64, 2), 0);
        }
        assert_eq!(redop_name(Kind::AllGather, ReduceOp::Max), "none");
        assert_eq!(redop_name(Kind::Broadcast, ReduceOp::Max), "none");
        assert_eq!(redop_name(Kind::ReduceScatter, ReduceOp::Max), "max");
        assert_eq!(root_column(Kind::AllReduce, 3), -1);
        assert_eq!(root_column(Kind::Reduce, 3), 3);
    }

    #[test]
    fn rows_are_formatted_like_nccl_tests() {
        let row = Row {
            size: 1048576,
            count: 262144,
            dtype: DType::F32,
            redop: "sum",
            root: -1,
            out_of_place: Some(Measure {
                time_us: 1234.5678,
                algbw: 0.849_3,
                busbw: 1.273_9,
                wrong: Some(0),
            }),
            in_place: Some(Measure {
                time_us: 55.556,
                algbw: 18.87,
                busbw: 28.31,
                wrong: Some(12),
            }),
        };
        assert_eq!(
            format_row(&row),
            "     1048576        262144     float     sum      -1   1234.6    0.85    1.27      0    55.56   18.87   28.31     12"
        );
        let row = Row {
            out_of_place: None,
            in_place: Some(Measure {
                time_us: 123456.0,
                algbw: 0.0,
                busbw: 0.0,
                wrong: None,
            }),
            redop: "none",
            root: 0,
            dtype: DType::BF16,
            ..row
        };
        assert_eq!(
            format_row(&row),
            "     1048576        262144  bfloat16    none       0      N/A     N/A     N/A    N/A   123456    0.00    0.00    N/A"
        );
        assert_eq!(format_time(9.999), "  10.00");
        assert_eq!(format_time(99.5), "  99.50");
    }

    #[test]
    fn header_and_footer() {
        let opts = crate::options::Options::parse_from([
            "x", "-b", "8", "-e", "1M", "-f", "8", "-n", "3", "-w", "1",
        ])
        .unwrap();
        let ranks = [
            RankInfo {
                pid: 1234,
                host: "node".into(),
                group: 0,
            },
            RankInfo {
                pid: 1235,
                host: "node".into(),
                group: 1,
            },
        ];
        let h = header(&opts, &ranks);
        assert!(h.starts_with(
            "# nThread 1 nGpus 1 minBytes 8 maxBytes 1048576 step: 8(factor) warmup iters: 1 iters: 3 agg iters: 1 validation: 1 graph: 0\n"
        ));
        assert!(h.contains("#  Rank  1 Group  1 Pid   1235 on       node device  1 [cpu] oxccl\n"));
        let titles = h.lines().find(|l| l.contains("redop")).unwrap();
        let row = format_row(&Row {
            size: 8,
            count: 2,
            dtype: DType::F32,
            redop: "sum",
            root: -1,
            out_of_place: None,
            in_place: None,
        });
        // As in nccl-tests, "#wrong" is one column wider than its values (twice).
        assert_eq!(titles.len(), row.len() + 2);
        assert_eq!(
            footer(0, 1.25),
            "# Out of bounds values : 0 OK\n# Avg bus bandwidth    : 1.25 \n#\n"
        );
        assert!(footer(3, 0.0).starts_with("# Out of bounds values : 3 FAILED\n"));
        assert_eq!(format_g(0.123456789), "0.123457");
        assert_eq!(format_g(1234567.0), "1.23457e+06");
        assert_eq!(format_g(0.00001234), "1.234e-05");
        assert_eq!(format_g(2.0), "2");
    }

    #[test]
    fn rank_info_round_trips() {
        let i = RankInfo {
            pid: 77,
            host: "h".repeat(100),
            group: 3,
        };
        let d = RankInfo::decode(&i.encode());
        assert_eq!((d.pid, d.group), (77, 3));
        assert_eq!(d.host.len(), RANK_INFO_LEN - 8);
        assert_eq!(RankInfo::decode(&[]).pid, 0);
    }

    #[test]
    fn average_bus_bandwidth_counts_every_measure() {
        let m = |busbw| {
            Some(Measure {
                time_us: 1.0,
                algbw: 0.0,
                busbw,
                wrong: None,
            })
        };
        let row = |a, b| Row {
            size: 0,
            count: 0,
            dtype: DType::U8,
            redop: "none",
            root: -1,
            out_of_place: a,
            in_place: b,
        };
        assert_eq!(avg_busbw(&[]), 0.0);
        assert_eq!(avg_busbw(&[row(m(1.0), m(2.0)), row(None, m(6.0))]), 3.0);
    }
}
