#!/usr/bin/env bash
# The torch.distributed backend "oxccl" (bindings/python/python/oxccl/torch.py):
# conformance of every collective against gloo (1-4 ranks, subgroups), DDP training of a
# conv net and a transformer under real torchrun against gloo, a dead rank, Work
# semantics, and a one-off smoke run of the speed script (small sizes; no figures).
#
# Needs torch (ci/test.sh installs it). Builds the `oxccl` package into a virtual
# environment that sees the system's torch, unless OXCCL_PY_VENV names one that already
# has it (ci/python.sh may build it first).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c 'import torch.distributed.run' 2>/dev/null || python3 -m pip install -q torch==2.15.0
venv=${OXCCL_PY_VENV:-}
if [ -z "$venv" ] || ! "$venv/bin/python" -c 'import oxccl' 2>/dev/null; then
  venv=$(mktemp -d)/venv
  python3 -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install -q ./bindings/python
fi
"$venv/bin/python" -m pip install -q pytest
"$venv/bin/python" -c 'import oxccl.torch, torch; print("oxccl.torch with torch", torch.__version__)'

export OXCCL_REQUIRE_TORCH=1
export OMP_NUM_THREADS=1
# run from outside the source tree, so that the installed package is the one tested
(cd bindings/python/tests/torch_backend && "$venv/bin/python" -m pytest -q -p no:cacheprovider .)

# torchrun is `python -m torch.distributed.run`; called this way it is the venv's python
# (a venv over the system's torch has no torchrun script of its own)
torchrun=("$venv/bin/python" -m torch.distributed.run)

# the README's example
"${torchrun[@]}" --nproc-per-node 2 bindings/python/examples/torch_ddp.py --steps 5

# the speed script runs (tiny sizes: this checks it works, the figures come from a quiet machine)
"${torchrun[@]}" --nproc-per-node 2 bindings/python/bench/torch_vs_gloo.py \
  --size-mib 1 --reps 1 --iters 2 --small-iters 20 --ddp-steps 2
