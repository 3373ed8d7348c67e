#!/usr/bin/env bash
# The checks CI runs on every submission (.ci/run calls this), cheapest first.
# Installs what it needs (apt, pip, cargo install) itself.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
# lavapipe warns on every process without it.
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
# Each step names the disk left, so a step that fills it is plain to see.
step() { printf '\n== %s (%ds, %s free)\n' "$1" "$SECONDS" "$(df -h --output=avail . | tail -1 | tr -d ' ')"; }

step "toolchain"
cargo --version
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p oxccl-kernels -p oxccl -p oxccl-tools -p oxccl-benches --all-targets --features wgpu,cuda -- -D warnings

step "docs: cargo doc with no warnings (every public item is documented: missing_docs)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

step "torch from PyPI (CPU use), for the torch store and torchrun tests"
python3 -c 'import torch.distributed.run' 2>/dev/null || python3 -m pip install -q torch==2.15.0
export OXCCL_REQUIRE_TORCH=1

step "tests: the README's test command"
cargo test --workspace

step "GPU through wgpu on lavapipe (Mesa's software Vulkan driver)"
bash ci/wgpu-setup.sh
OXCCL_REQUIRE_WGPU=1 cargo test -p oxccl-kernels --features wgpu
OXCCL_REQUIRE_WGPU=1 cargo test -p oxccl-tools --features wgpu --test wgpu
cargo build -p oxccl-tools --bin oxrun -p oxccl-benches --bin all_reduce_perf --features oxccl-benches/wgpu
for n in 2 4; do
  target/debug/oxrun -n "$n" --timeout 300 -- target/debug/all_reduce_perf --device wgpu -b 4K -e 1M -f 16 -n 2 -w 1
  target/debug/oxrun -n "$n" --timeout 300 -- target/debug/all_reduce_perf --device wgpu -b 4K -e 64K -f 16 -n 2 -w 1 -d bfloat16 -o all
done

step "CUDA: clean errors without a driver; every kernel compiled by NVRTC and assembled by ptxas"
cargo test -p oxccl-kernels --features cuda
bash ci/cuda-ptx.sh

step "C API"
bash ci/c-tests.sh

step "benchmark binaries: a smoke run of each with 2 and 4 ranks"
bash ci/bench-smoke.sh

step "quick start: the README's main job"
cargo build --release -p oxccl-tools
target/release/oxrun -n 4 --timeout 300 -- target/release/oxccl-check -c all_reduce -b 64M
target/release/oxrun -n 2 --timeout 300 -- target/release/oxccl-check -c all -b 4M

step "Python package: the wheel (maturin) in a fresh venv, its pytest suite, python -m oxccl.check under oxrun and torchrun (ci/python.sh)"
OXRUN="$PWD/target/release/oxrun" bash ci/python.sh

step "launchers: real torchrun, srun, sbatch, mpirun inside salloc, torchrun inside srun"
bash ci/launchers.sh

step "chaos, short: SIGKILL and SIGSTOP of a rank of a looping 4-rank job, shm and tcp"
# Per transport: 2 SIGKILLs of rank 0 (which serves the store), 2 of a
# random rank, 1 SIGSTOP of rank 0 and 1 of a random rank (about a minute;
# the long run and its counts are in the README, "Reliability"). Every
# survivor must fail naming the signalled rank: within 2 s of a SIGKILL,
# within 10 s of a SIGSTOP with OXCCL_TIMEOUT=5.
target/release/oxccl-chaos run --scenario kill -n 2 --victim 0
target/release/oxccl-chaos run --scenario kill -n 2
target/release/oxccl-chaos run --scenario stop -n 1 --victim 0
target/release/oxccl-chaos run --scenario stop -n 1

step "chaos, short: a link cut between network-namespace hosts (ci/chaos-netns.sh)"
# Two trials: one rank's link goes down mid-run; every survivor must fail
# naming it within 2 x OXCCL_TIMEOUT + 2 s (the long run: README, "Reliability").
TRIALS=2 bash ci/chaos-netns.sh

step "UCX link (ci/ucx.sh): installs libucx-dev; UCX_TLS=tcp and sm, a kill, a mismatch, 4 namespaces"
bash ci/ucx.sh

step "short jobs leave nothing behind (ci/short-jobs.sh)"
# Six 4-rank jobs, one with a rank killed: no shared-memory segment, rank
# or listening socket may be left (the long run: README, "Reliability").
JOBS=6 bash ci/short-jobs.sh

step "done"
