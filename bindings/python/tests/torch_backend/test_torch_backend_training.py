"""Training under real torchrun: "oxccl" ends with the same parameters as "gloo".

A conv net and a small transformer (train.py) train for 50 steps with SGD + momentum
on 2 and 4 ranks, once with each backend, launched by torchrun (`python -m
torch.distributed.run`, the module behind the `torchrun` command); with DDP, and with
FSDP2 (`fully_shard` of every layer: all_gather_into_tensor and reduce_scatter_tensor
on padded uneven shards), which this torch supports on CPU.

Tolerance: on 2 ranks the parameters must be bitwise equal: each gradient element is the
sum of two addends, and a + b == b + a exactly in IEEE arithmetic, so no ordering
difference between the two libraries can show. On 4 ranks the libraries may associate the
four addends differently ((a+b)+(c+d) against ((a+b)+c)+d), which changes a float32 sum by
a few ulp (relative 1e-7); 50 steps of SGD with momentum carry such differences forward
without amplifying them much in these small, well-conditioned models, so we require
|oxccl - gloo| <= 1e-5 + 1e-4 * |gloo| elementwise.
"""

from __future__ import annotations

from torch_ranks import require_torch_backend

require_torch_backend()

import os
import subprocess
import sys

import pytest
import torch

from torch_ranks import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "train.py")


def torchrun(nproc: int, out: str, *args: str, timeout: float = 600) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        TRAIN,
        "--out",
        out,
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (
        f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
    )
    return torch.load(out, weights_only=False)


def compare(a: dict, b: dict, exact: bool) -> list:
    bad = []
    for kind in ("conv", "transformer"):
        pa, pb = a[kind]["params"], b[kind]["params"]
        assert pa.keys() == pb.keys()
        for name in pa:
            x, y = pa[name], pb[name]
            if exact:
                ok = torch.equal(x, y)
            else:
                ok = torch.allclose(x, y, rtol=1e-4, atol=1e-5)
            if not ok:
                bad.append(f"{kind}.{name}: max |diff| {(x - y).abs().max().item():.3e}")
    return bad


def max_diff(a: dict, b: dict) -> float:
    return max(
        (a[k]["params"][n] - b[k]["params"][n]).abs().max().item()
        for k in ("conv", "transformer")
        for n in a[k]["params"]
    )


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("nproc", [2, 4])
def test_training_oxccl_matches_gloo(nproc, mode, tmp_path):
    ox = torchrun(nproc, str(tmp_path / "oxccl.pt"), "--backend", "oxccl", "--mode", mode)
    gl = torchrun(nproc, str(tmp_path / "gloo.pt"), "--backend", "gloo", "--mode", mode)
    assert ox["world"] == gl["world"] == nproc
    # the models did train: their parameters moved away from the initial ones
    for kind in ("conv", "transformer"):
        assert ox[kind]["moved"] > 1e-2, (kind, ox[kind]["moved"])
    bad = compare(ox, gl, exact=(nproc == 2))
    print(f"{mode}, {nproc} ranks: max |oxccl - gloo| over all parameters = {max_diff(ox, gl):.3e}")
    assert not bad, "\n".join(bad)
