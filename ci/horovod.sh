#!/usr/bin/env bash
# Horovod's API on oxccl (bindings/python/python/oxccl/_horovod.py): its tests
# (bindings/python/tests/horovod: training against DDP on gloo and one process
# on 2 and 4 ranks under torchrun, the timeline, broadcasts, ops, mismatch
# errors; about 2 minutes) and one quick run of its speed script, to show it
# runs (the figures come from a quiet machine, not from CI).
#
# PYTHON: an interpreter with torch and the oxccl package installed (the
# Python CI step's venv). When it lacks oxccl, this script builds and
# installs the package into a venv of its own (target/hvd-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import torch.distributed.run' 2>/dev/null; then
  "$PYTHON" -m pip install -q torch==2.15.0
fi
if ! "$PYTHON" -c 'import oxccl._horovod' 2>/dev/null; then
  "$PYTHON" -m venv --system-site-packages target/hvd-venv
  PYTHON=$PWD/target/hvd-venv/bin/python
  "$PYTHON" -m pip install -q pytest numpy ./bindings/python
fi
"$PYTHON" -m pip show pytest >/dev/null 2>&1 || "$PYTHON" -m pip install -q pytest
# The oxrun launch test needs oxrun (built by the quick-start step already).
oxrun=$(realpath -m "${CARGO_TARGET_DIR:-target}/release/oxrun")
[ -x "$oxrun" ] || cargo build --release -p oxccl-tools
export OXRUN=$oxrun OXCCL_REQUIRE_OXRUN=1 OXCCL_REQUIRE_TORCH=1
# From outside the source tree, so that the installed package is the one tested.
(cd bindings/python/tests && "$PYTHON" -m pytest -q -p no:cacheprovider horovod)
"$PYTHON" bindings/python/bench/hvd_step.py --quick --nproc 2
