"""``python -m oxccl.check`` under oxrun and under torchrun, as real processes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def find_oxrun():
    for p in (os.environ.get("OXRUN"), shutil.which("oxrun"),
              REPO / "target" / "release" / "oxrun", REPO / "target" / "debug" / "oxrun"):
        if p and Path(p).is_file():
            return str(p)
    return None


def run(cmd):
    env = dict(os.environ, OXCCL_AUTH="off", OXCCL_TIMEOUT="60")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    return out


def check_output(out, world):
    lines = [line for line in out.splitlines() if "result OK" in line]
    assert len(lines) >= 13, out  # every collective, once each
    assert f"{world} ranks" in lines[0]
    assert "WRONG" not in out
    assert f"calls on each of {world} ranks, 0 wrong elements" in out


def test_check_under_oxrun():
    oxrun = find_oxrun()
    if oxrun is None:
        if os.environ.get("OXCCL_REQUIRE_OXRUN"):
            raise RuntimeError("OXCCL_REQUIRE_OXRUN is set but no oxrun binary was found")
        print("test_check: no oxrun (set OXRUN, or cargo build -p oxccl-tools); not run")
        pytest.skip("no oxrun binary")
    out = run([oxrun, "-n", "3", "--timeout", "240", "--", sys.executable, "-m", "oxccl.check",
               "-c", "all", "-b", "96K", "-d", "bf16", "-o", "max", "-n", "2"])
    check_output(out, 3)


def test_check_under_torchrun():
    try:
        import torch.distributed.run  # noqa: F401
    except ImportError:
        if os.environ.get("OXCCL_REQUIRE_TORCH"):
            raise
        print("test_check: torch is not installed; torchrun not run")
        pytest.skip("torch is not installed")
    out = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "-m", "oxccl.check", "-c", "all", "-b", "64K", "-d", "i32", "-n", "2"])
    check_output(out, 2)
