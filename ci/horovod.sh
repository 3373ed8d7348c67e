#!/usr/bin/env bash
# Horovod's API on oxccl (bindings/python/python/oxccl/_horovod.py): its tests
# (bindings/python/tests/horovod: training against DDP on gloo and one process
# on 2 and 4 ranks under torchrun, the timeline, broadcasts, ops, mismatch
# errors; about 2 minutes) and one quick run of its speed script, to show it
# runs (the figures come from a quiet machine, not from CI).
#
# Python: OXCCL_PY_VENV's interpreter when it has oxccl (as ci/torch.sh), else
# $PYTHON's when it has it, else this script builds and installs the package
# into a virtual environment of its own that sees the system's torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import torch.distributed.run' 2>/dev/null || python3 -m pip install -q torch==2.15.0
PYTHON=${PYTHON:-python3}
if [ -n "${OXCCL_PY_VENV:-}" ] && "$OXCCL_PY_VENV/bin/python" -c 'import oxccl._horovod' 2>/dev/null; then
  PYTHON=$OXCCL_PY_VENV/bin/python
elif ! "$PYTHON" -c 'import oxccl._horovod, torch' 2>/dev/null; then
  venv=$(mktemp -d)/venv
  python3 -m venv --system-site-packages "$venv"
  PYTHON=$venv/bin/python
  "$PYTHON" -m pip install -q ./bindings/python
fi
"$PYTHON" -c "import pytest, numpy" 2>/dev/null || "$PYTHON" -m pip install -q pytest numpy
# The oxrun launch test needs oxrun (built by the quick-start step already).
oxrun=$(realpath -m "${CARGO_TARGET_DIR:-target}/release/oxrun")
[ -x "$oxrun" ] || cargo build --release -p oxccl-tools
export OXRUN=$oxrun OXCCL_REQUIRE_OXRUN=1 OXCCL_REQUIRE_TORCH=1
# From outside the source tree, so that the installed package is the one tested.
(cd bindings/python/tests && "$PYTHON" -m pytest -q -p no:cacheprovider horovod)
"$PYTHON" bindings/python/bench/hvd_step.py --quick --nproc 2
