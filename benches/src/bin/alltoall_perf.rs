//! nccl-tests' `alltoall_perf` for oxccl: run it under a launcher, e.g.
//! `oxrun -n 4 -- alltoall_perf -b 4K -e 64M -f 4`; `--help` lists the flags.

fn main() -> std::process::ExitCode {
    oxccl_benches::main(oxccl::Kind::AllToAll)
}
