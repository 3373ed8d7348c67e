//! nccl-tests' `reduce_perf` for oxccl: run it under a launcher, e.g.
//! `oxrun -n 4 -- reduce_perf -b 8 -e 128M -f 2`; `--help` lists the flags.

fn main() -> std::process::ExitCode {
    oxccl_benches::main(oxccl::Kind::Reduce)
}
