//! nccl-tests' `broadcast_perf` for oxccl: run it under a launcher, e.g.
//! `oxrun -n 4 -- broadcast_perf -b 8 -e 128M -f 2`; `--help` lists the flags.

fn main() -> std::process::ExitCode {
    oxccl_benches::main(oxccl::Kind::Broadcast)
}
