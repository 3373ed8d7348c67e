#!/usr/bin/env bash
# The Python package (bindings/python): format and lints of its crate (not
# a member of the workspace: PyO3 needs maturin's build setup), the abi3
# wheel built by maturin, installed into a fresh venv, and its pytest suite.
#
# The venv is made with --system-site-packages so that the torch ci/test.sh
# installed into python3 is seen there (torch tensors, TCPStore, torchrun);
# numpy, pytest and the wheel are installed into the venv itself.
# Set OXRUN to an oxrun binary for the oxrun test (ci/test.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
manifest=bindings/python/Cargo.toml

cargo fmt --manifest-path "$manifest" -- --check
cargo clippy --manifest-path "$manifest" --all-targets -- -D warnings
cargo clippy --manifest-path "$manifest" --all-targets --features cuda -- -D warnings

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv --system-site-packages "$work/venv"
py="$work/venv/bin/python"
# maturin into the venv itself even when python3's site has one (its
# `python -m maturin` looks for the binary beside the venv's python).
"$py" -m pip install -q --ignore-installed "maturin>=1.5,<2"
"$py" -m pip install -q pytest numpy

# The workspace's target directory: the release build of oxccl is shared
# with the quick start's.
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}" "$work/venv/bin/maturin" build --release \
  -m "$manifest" -o "$work/wheels"
"$py" -m pip install -q "$work"/wheels/oxccl-*.whl

# The tests import the installed package, not the source tree.
cd "$work"
OXCCL_REQUIRE_TORCH=1 OXCCL_REQUIRE_OXRUN=${OXRUN:+1} \
  "$py" -m pytest -q -p no:cacheprovider "$root/bindings/python/tests"
"$py" -c 'import oxccl, oxccl.check; print("oxccl", oxccl.__version__, "from", oxccl.__file__)'
# The stubs match the native module (names, signatures, defaults).
"$py" -m pip install -q mypy
"$py" -m mypy.stubtest oxccl._oxccl

# The wheel with the cuda feature (a debug build: it is checked, not timed), in a venv of
# its own: it imports, says HAS_CUDA, and without a driver (CI has no GPU) a CUDA-shaped
# tensor raises UnavailableBackend naming the missing libcuda (test_torch.py); on a machine
# with a GPU the same test runs a CUDA all_reduce.
python3 -m venv --system-site-packages "$work/venv-cuda"
pyc="$work/venv-cuda/bin/python"
"$pyc" -m pip install -q pytest numpy
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}" "$work/venv/bin/maturin" build \
  --features cuda -m "$root/$manifest" -o "$work/wheels-cuda"
"$pyc" -m pip install -q "$work"/wheels-cuda/oxccl-*.whl
OXCCL_REQUIRE_TORCH=1 OXCCL_EXPECT_CUDA=1 "$pyc" -m pytest -q -p no:cacheprovider -s \
  "$root/bindings/python/tests/test_torch.py" "$root/bindings/python/tests/test_store.py::test_has_cuda_flag"

# The torch.distributed backend "oxccl": its tests (bindings/python/tests/torch_backend:
# conformance against gloo, DDP and FSDP2 under torchrun, a dead rank) ran with the suite
# above. Here the README's example under torchrun, and a smoke run of the speed script
# (tiny sizes: it must work; the figures come from a quiet machine). torchrun is
# `python -m torch.distributed.run`, called as the venv's python: a venv over the
# system's torch has no torchrun script of its own.
OMP_NUM_THREADS=1 "$py" -m torch.distributed.run --nproc-per-node 2 \
  "$root/bindings/python/examples/torch_ddp.py" --steps 5
OMP_NUM_THREADS=1 "$py" -m torch.distributed.run --nproc-per-node 2 \
  "$root/bindings/python/bench/torch_vs_gloo.py" --size-mib 1 --reps 1 --iters 2 --small-iters 20 --ddp-steps 2
# Horovod's API: its speed script runs (tiny sizes; the figures come from a quiet machine).
"$py" "$root/bindings/python/bench/hvd_step.py" --quick --nproc 2
