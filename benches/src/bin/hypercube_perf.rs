//! nccl-tests' `hypercube_perf` for oxccl: an allgather made of log2(n)
//! batches of sends and receives (power-of-two worlds). Run it under a
//! launcher, e.g. `oxrun -n 4 -- hypercube_perf -b 4K -e 64M -f 4`.

fn main() -> std::process::ExitCode {
    oxccl_benches::main(oxccl_benches::Bench::HyperCube)
}
