//! Command-line flags of the `*_perf` binaries, as nccl-tests spells them.

use std::path::PathBuf;

use clap::Parser;
use oxccl::{DType, ReduceOp};

/// How the per-rank times of a timed loop are combined into the reported time (`-a`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Average {
    /// Rank 0's time.
    Rank0,
    /// The mean over ranks.
    Mean,
    /// The smallest time of any rank.
    Min,
    /// The largest time of any rank.
    Max,
}

impl Average {
    fn parse(s: &str) -> Result<Average, String> {
        match s.trim() {
            "0" => Ok(Average::Rank0),
            "1" => Ok(Average::Mean),
            "2" => Ok(Average::Min),
            "3" => Ok(Average::Max),
            _ => Err(format!(
                "'{s}' is not a way to combine times: use 0 (rank 0), 1 (average), 2 (min) or 3 (max)"
            )),
        }
    }

    /// nccl-tests' number for this mode.
    pub fn code(self) -> u8 {
        match self {
            Average::Rank0 => 0,
            Average::Mean => 1,
            Average::Min => 2,
            Average::Max => 3,
        }
    }
}

/// A list of dtypes (an alias, so that clap takes one value that names the whole list).
pub type DTypes = Vec<DType>;
/// A list of reduction ops (see [`DTypes`]).
pub type Ops = Vec<ReduceOp>;

/// Parses a byte count with an optional K, M or G suffix (powers of 1024, any case).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: usize = num.parse().map_err(|_| {
        format!("'{s}' is not a size in bytes (a whole number, optionally followed by K, M or G)")
    })?;
    n.checked_mul(1usize << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses `-d`: one dtype in nccl-tests' or oxccl's spelling, or `all`.
pub fn parse_dtypes(s: &str) -> Result<DTypes, String> {
    if s.eq_ignore_ascii_case("all") {
        // nccl-tests' order.
        return Ok(vec![
            DType::I8,
            DType::U8,
            DType::I32,
            DType::U32,
            DType::I64,
            DType::U64,
            DType::F16,
            DType::F32,
            DType::F64,
            DType::BF16,
        ]);
    }
    s.parse::<DType>().map(|d| vec![d]).map_err(|_| {
        format!(
            "unknown data type '{s}': use float, half, bfloat16, double, int8, uint8, int32, uint32, int64, uint64 or all"
        )
    })
}

/// Parses `-o`: one reduction op or `all`.
pub fn parse_ops(s: &str) -> Result<Ops, String> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(ReduceOp::ALL.to_vec());
    }
    s.parse::<ReduceOp>()
        .map(|o| vec![o])
        .map_err(|_| format!("unknown reduction op '{s}': use sum, prod, min, max, avg or all"))
}

fn parse_check(s: &str) -> Result<bool, String> {
    match s.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(format!("'{s}' is not 0 or 1")),
    }
}

fn parse_device(s: &str) -> Result<String, String> {
    let d = s.trim().to_ascii_lowercase();
    match d.as_str() {
        "cpu" | "hostdev" | "wgpu" | "cuda" => Ok(d),
        _ => Err(format!(
            "device '{s}' is not one of cpu (host memory), hostdev (host memory handled as a device \
             buffer by address), wgpu or cuda (device memory; built with that feature)"
        )),
    }
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) | Err(_) => Err(format!("'{s}' is not a whole number of at least 1")),
        Ok(n) => Ok(n),
    }
}

/// The flags of every `*_perf` binary (nccl-tests' names and defaults).
#[derive(Parser, Debug, Clone)]
#[command(
    version,
    about = "Times an oxccl collective over a range of sizes and checks its results, printing nccl-tests' table. \
             Run it under a launcher: oxrun -n 4 -- all_reduce_perf -b 8 -e 128M -f 2",
    after_help = "Sizes count every rank's data (allgather: the gathered output; reduce-scatter: the input). \
                  Exit status: 0 when every result is correct, 1 on wrong results or a failure, 2 on bad flags."
)]
pub struct Options {
    /// Smallest size in bytes (suffixes K, M, G).
    #[arg(short = 'b', long = "minbytes", value_name = "BYTES", default_value = "32M", value_parser = parse_size)]
    pub min_bytes: usize,
    /// Largest size in bytes (suffixes K, M, G).
    #[arg(short = 'e', long = "maxbytes", value_name = "BYTES", default_value = "32M", value_parser = parse_size)]
    pub max_bytes: usize,
    /// Increment between sizes in bytes (suffixes K, M, G), used when the step factor is 1.
    #[arg(short = 'i', long = "stepbytes", value_name = "BYTES", default_value = "1M", value_parser = parse_size)]
    pub step_bytes: usize,
    /// Multiplication factor between sizes (1: add the increment instead).
    #[arg(short = 'f', long = "stepfactor", value_name = "FACTOR", default_value = "1", value_parser = parse_positive)]
    pub step_factor: usize,
    /// Timed iterations per size.
    #[arg(short = 'n', long = "iters", value_name = "N", default_value = "20", value_parser = parse_positive)]
    pub iters: usize,
    /// Untimed warm-up iterations before each timed loop.
    #[arg(
        short = 'w',
        long = "warmup_iters",
        value_name = "N",
        default_value_t = 1
    )]
    pub warmup: usize,
    /// Check every result element (1) or not (0).
    #[arg(short = 'c', long = "check", value_name = "0/1", default_value = "1", value_parser = parse_check, action = clap::ArgAction::Set)]
    pub check: bool,
    /// Data type: float, half, bfloat16, double, int8, uint8, int32, uint32, int64, uint64, or all.
    #[arg(short = 'd', long = "datatype", value_name = "TYPE", default_value = "float", value_parser = parse_dtypes)]
    pub dtypes: DTypes,
    /// Reduction: sum, prod, min, max, avg, or all (ignored by broadcast and allgather).
    #[arg(short = 'o', long = "op", value_name = "OP", default_value = "sum", value_parser = parse_ops)]
    pub ops: Ops,
    /// Root rank of broadcast and reduce.
    #[arg(short = 'r', long = "root", value_name = "RANK", default_value_t = 0)]
    pub root: usize,
    /// How the ranks' times are combined: 0 rank 0, 1 average, 2 min, 3 max.
    #[arg(short = 'a', long = "average", value_name = "0-3", default_value = "1", value_parser = Average::parse)]
    pub average: Average,
    /// Also write every row to FILE as JSON (rank 0).
    #[arg(short = 'J', long = "output_file", value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Where the buffers live: cpu (host memory), hostdev (host memory
    /// handled as a device buffer reached by address), wgpu or cuda.
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: String,
    /// Run only the in-place variant (out-of-place columns show N/A).
    #[arg(long, conflicts_with = "out_of_place_only")]
    pub in_place_only: bool,
    /// Run only the out-of-place variant (in-place columns show N/A).
    #[arg(long)]
    pub out_of_place_only: bool,
    /// Testing aid: change this many result elements on every rank before the check.
    #[arg(long, hide = true, value_name = "N", default_value_t = 0)]
    pub debug_corrupt: usize,
}

impl Options {
    /// Parses `args` (the first is the program name) and checks the flags against each other.
    pub fn parse_from<I, T>(args: I) -> Result<Options, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let o = Options::try_parse_from(args)?;
        if let Err(e) = o.sizes() {
            let mut cmd = <Options as clap::CommandFactory>::command();
            return Err(cmd.error(clap::error::ErrorKind::ValueValidation, e));
        }
        Ok(o)
    }

    /// The sizes in bytes to time, from `-b` to `-e` by `-f` or `-i`, as nccl-tests steps them.
    pub fn sizes(&self) -> Result<Vec<usize>, String> {
        sizes(
            self.min_bytes,
            self.max_bytes,
            self.step_factor,
            self.step_bytes,
        )
    }

    /// The step as nccl-tests' header prints it: "2(factor)" or "1048576(bytes)".
    pub fn step_description(&self) -> String {
        if self.step_factor > 1 {
            format!("{}(factor)", self.step_factor)
        } else {
            format!("{}(bytes)", self.step_bytes)
        }
    }

    /// Whether the out-of-place variant runs.
    pub fn out_of_place(&self) -> bool {
        !self.in_place_only
    }

    /// Whether the in-place variant runs.
    pub fn in_place(&self) -> bool {
        !self.out_of_place_only
    }
}

/// Sizes from `min` to `max` (inclusive): multiplied by `factor` when it is
/// above 1, otherwise increased by `step`.
pub fn sizes(min: usize, max: usize, factor: usize, step: usize) -> Result<Vec<usize>, String> {
    if min > max {
        return Err(format!(
            "the smallest size (-b {min}) is larger than the largest (-e {max})"
        ));
    }
    if factor > 1 && min == 0 && max > 0 {
        return Err("-b 0 cannot grow by a factor (-f): start at 1 byte or more".into());
    }
    if factor <= 1 && step == 0 && min < max {
        return Err("the step (-i) is 0: sizes would never grow".into());
    }
    let mut out = Vec::new();
    let mut s = min;
    loop {
        out.push(s);
        let next = if factor > 1 {
            s.checked_mul(factor)
        } else {
            s.checked_add(step)
        };
        match next {
            Some(n) if n <= max && n > s => s = n,
            _ => break,
        }
    }
    Ok(out)
}

/// The group this rank runs in when nccl-tests' variables split the job
/// into communicators that run the benchmark at the same time:
/// `NCCL_TESTS_SPLIT_MASK` (hexadecimal, as nccl-tests reads it: the group
/// is `rank & mask`) or `NCCL_TESTS_SPLIT` (`AND m`, `OR m`, `MOD n`, `DIV
/// n`, or `&m`, `|m`, `%n`, `/n`; operands decimal or `0x` hexadecimal;
/// `NONE`). `None`: one group, the whole job.
pub fn split_group(
    mask: Option<&str>,
    split: Option<&str>,
    rank: usize,
) -> Result<Option<u32>, String> {
    let number = |what: &str, v: &str, radix16: bool| -> Result<u64, String> {
        let t = v.trim();
        let (digits, radix) = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            Some(h) => (h, 16),
            None if radix16 => (t, 16),
            None => (t, 10),
        };
        u64::from_str_radix(digits, radix).map_err(|_| format!("{what}: '{v}' is not a number"))
    };
    let rank = rank as u64;
    let group = if let Some(m) = mask {
        rank & number("NCCL_TESTS_SPLIT_MASK", m, true)?
    } else if let Some(s) = split {
        let t = s.trim();
        if t.eq_ignore_ascii_case("none") || t.is_empty() {
            return Ok(None);
        }
        let (op, arg) = match t.find(|c: char| c.is_ascii_digit()) {
            Some(i) => t.split_at(i),
            None => (t, ""),
        };
        let n = number("NCCL_TESTS_SPLIT", arg, false)?;
        match op.trim().to_ascii_uppercase().as_str() {
            "AND" | "&" => rank & n,
            "OR" | "|" => rank | n,
            "MOD" | "%" if n > 0 => rank % n,
            "DIV" | "/" if n > 0 => rank / n,
            "MOD" | "%" | "DIV" | "/" => {
                return Err(format!("NCCL_TESTS_SPLIT: '{s}' divides by zero"));
            }
            _ => {
                return Err(format!(
                    "NCCL_TESTS_SPLIT: '{s}' is not AND, OR, MOD or DIV and a number (nor NONE)"
                ));
            }
        }
    } else {
        return Ok(None);
    };
    u32::try_from(group)
        .map(Some)
        .map_err(|_| format!("the split puts rank {rank} in group {group}, beyond 2^32"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    #[test]
    fn split_groups_as_nccl_tests_reads_them() {
        let g = |mask: Option<&str>, split: Option<&str>, rank| split_group(mask, split, rank);
        assert_eq!(g(None, None, 5), Ok(None));
        // The mask is hexadecimal with or without 0x.
        assert_eq!(g(Some("0x1"), None, 5), Ok(Some(1)));
        assert_eq!(g(Some("10"), None, 19), Ok(Some(16)));
        assert_eq!(g(Some("7"), Some("MOD 2"), 13), Ok(Some(5)));
        assert_eq!(g(None, Some("MOD 2"), 5), Ok(Some(1)));
        assert_eq!(g(None, Some("%4"), 6), Ok(Some(2)));
        assert_eq!(g(None, Some("DIV 2"), 5), Ok(Some(2)));
        assert_eq!(g(None, Some("/ 0x2"), 5), Ok(Some(2)));
        assert_eq!(g(None, Some("and 6"), 7), Ok(Some(6)));
        assert_eq!(g(None, Some("OR 1"), 4), Ok(Some(5)));
        assert_eq!(g(None, Some("NONE"), 4), Ok(None));
        for bad in ["MOD 0", "XOR 1", "MOD", "MOD x"] {
            assert!(g(None, Some(bad), 1).is_err(), "{bad}");
        }
        assert!(
            g(Some("zz"), None, 1)
                .unwrap_err()
                .contains("NCCL_TESTS_SPLIT_MASK")
        );
    }

    fn parse(args: &[&str]) -> Result<Options, String> {
        Options::parse_from(std::iter::once("all_reduce_perf").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_follow_nccl_tests() {
        let o = parse(&[]).unwrap();
        assert_eq!((o.min_bytes, o.max_bytes), (32 << 20, 32 << 20));
        assert_eq!((o.step_factor, o.step_bytes), (1, 1 << 20));
        assert_eq!((o.iters, o.warmup, o.check, o.root), (20, 1, true, 0));
        assert_eq!(o.dtypes, vec![DType::F32]);
        assert_eq!(o.ops, vec![ReduceOp::Sum]);
        assert_eq!(o.average, Average::Mean);
        assert!(o.in_place() && o.out_of_place());
        assert_eq!(o.sizes().unwrap(), vec![32 << 20]);
    }

    #[test]
    fn size_suffixes() {
        assert_eq!(parse_size("8").unwrap(), 8);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("3M").unwrap(), 3 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert!(parse_size("1T").unwrap_err().contains("'1T' is not a size"));
        assert!(parse_size("").is_err());
        assert!(parse_size("-4K").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert!(
            parse_size(&format!("{}G", usize::MAX >> 20))
                .unwrap_err()
                .contains("too large")
        );
        let o = parse(&["-b", "8", "-e", "1M", "-f", "8"]).unwrap();
        assert_eq!(o.min_bytes, 8);
        assert_eq!(o.max_bytes, 1 << 20);
    }

    #[test]
    fn factor_and_increment_stepping() {
        let o = parse(&["-b", "8", "-e", "1M", "-f", "8"]).unwrap();
        assert_eq!(o.sizes().unwrap(), vec![8, 64, 512, 4096, 32768, 262144]);
        assert_eq!(o.step_description(), "8(factor)");
        let o = parse(&["-b", "1K", "-e", "4K", "-i", "1K"]).unwrap();
        assert_eq!(o.sizes().unwrap(), vec![1024, 2048, 3072, 4096]);
        assert_eq!(o.step_description(), "1024(bytes)");
        // -f above 1 wins over -i.
        let o = parse(&["-b", "1K", "-e", "4K", "-i", "1", "-f", "2"]).unwrap();
        assert_eq!(o.sizes().unwrap(), vec![1024, 2048, 4096]);
        // A last step past the maximum is not taken.
        assert_eq!(sizes(3, 10, 2, 0).unwrap(), vec![3, 6]);
        assert_eq!(sizes(0, 0, 2, 0).unwrap(), vec![0]);
        assert_eq!(sizes(0, 2, 1, 1).unwrap(), vec![0, 1, 2]);
        assert_eq!(sizes(usize::MAX - 1, usize::MAX, 2, 0).unwrap().len(), 1);
    }

    #[test]
    fn impossible_size_ranges_are_errors() {
        assert!(
            parse(&["-b", "2M", "-e", "1M"])
                .unwrap_err()
                .contains("larger than the largest")
        );
        assert!(
            parse(&["-b", "0", "-e", "1M", "-f", "2"])
                .unwrap_err()
                .contains("-b 0")
        );
        assert!(
            parse(&["-b", "1", "-e", "1M", "-i", "0"])
                .unwrap_err()
                .contains("never grow")
        );
        assert!(parse(&["-f", "0"]).unwrap_err().contains("at least 1"));
        assert!(parse(&["-n", "0"]).unwrap_err().contains("at least 1"));
    }

    #[test]
    fn dtype_and_op_lists() {
        let o = parse(&["-d", "all", "-o", "all"]).unwrap();
        assert_eq!(o.dtypes.len(), 10);
        assert_eq!(o.dtypes[0], DType::I8);
        assert_eq!(o.ops, ReduceOp::ALL.to_vec());
        for (name, d) in [
            ("float", DType::F32),
            ("half", DType::F16),
            ("bfloat16", DType::BF16),
            ("double", DType::F64),
            ("int8", DType::I8),
            ("uint8", DType::U8),
            ("int32", DType::I32),
            ("uint32", DType::U32),
            ("int64", DType::I64),
            ("uint64", DType::U64),
        ] {
            assert_eq!(parse(&["-d", name]).unwrap().dtypes, vec![d]);
        }
        for (name, op) in [
            ("sum", ReduceOp::Sum),
            ("prod", ReduceOp::Prod),
            ("min", ReduceOp::Min),
            ("max", ReduceOp::Max),
            ("avg", ReduceOp::Avg),
        ] {
            assert_eq!(parse(&["-o", name]).unwrap().ops, vec![op]);
        }
        assert!(
            parse(&["-d", "float128"])
                .unwrap_err()
                .contains("unknown data type 'float128'")
        );
        assert!(
            parse(&["-o", "xor"])
                .unwrap_err()
                .contains("unknown reduction op 'xor'")
        );
    }

    #[test]
    fn other_flags() {
        let o = parse(&[
            "-c", "0", "-a", "3", "-r", "1", "-n", "5", "-w", "0", "-J", "out.json",
        ])
        .unwrap();
        assert!(!o.check);
        assert_eq!(o.average, Average::Max);
        assert_eq!((o.root, o.iters, o.warmup), (1, 5, 0));
        assert_eq!(o.json.as_deref(), Some(std::path::Path::new("out.json")));
        assert!(parse(&["-c", "2"]).unwrap_err().contains("not 0 or 1"));
        assert!(
            parse(&["-a", "4"])
                .unwrap_err()
                .contains("0 (rank 0), 1 (average)")
        );
        assert!(
            parse(&["--device", "tpu"])
                .unwrap_err()
                .contains("not one of cpu")
        );
        assert_eq!(parse(&["--device", "CPU"]).unwrap().device, "cpu");
        assert_eq!(parse(&["--device", "wgpu"]).unwrap().device, "wgpu");
        let o = parse(&["--in-place-only"]).unwrap();
        assert!(o.in_place() && !o.out_of_place());
        let o = parse(&["--out-of-place-only"]).unwrap();
        assert!(!o.in_place() && o.out_of_place());
        assert!(parse(&["--in-place-only", "--out-of-place-only"]).is_err());
        assert!(parse(&["-x"]).is_err());
    }

    #[test]
    fn help_lists_every_flag() {
        let help = parse(&["--help"]).unwrap_err();
        for flag in [
            "-b",
            "-e",
            "-i",
            "-f",
            "-n",
            "-w",
            "-c",
            "-d",
            "-o",
            "-r",
            "-a",
            "-J",
            "--device",
            "--in-place-only",
            "--out-of-place-only",
        ] {
            assert!(help.contains(flag), "{flag} missing from:\n{help}");
        }
        assert!(!help.contains("debug-corrupt"));
    }
}
