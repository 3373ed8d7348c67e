"""torch CPU tensors through DLPack, bfloat16 included, and the device check."""

import os

import numpy as np
import pytest

from conftest import each, make_group

try:
    import torch
except ImportError:  # pragma: no cover - CI installs torch
    torch = None

if torch is None:
    if os.environ.get("OXCCL_REQUIRE_TORCH"):
        raise RuntimeError("OXCCL_REQUIRE_TORCH is set but torch is not installed")
    print("test_torch: torch is not installed; its tests do not run here")
    pytest.skip("torch is not installed", allow_module_level=True)

import oxccl

DTYPES = [
    torch.int8, torch.uint8, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_torch_collectives(world):
    comms = make_group(world)
    n = 1001

    def call(c):
        r = c.rank
        out = {}
        for dt in DTYPES:
            t = (torch.arange(n) % 7 + r).to(dt)
            c.all_reduce(t)
            m = (torch.arange(n) % 5 - (2 if dt != torch.uint8 else 0) + r).to(dt).reshape(7, 11, 13)
            c.all_reduce(m, "max")
            b = torch.full((n,), r, dtype=dt)
            c.broadcast(b, world - 1)
            g = torch.zeros(world * 3, dtype=dt)
            c.all_gather(torch.full((3,), r, dtype=dt), g)
            rs = torch.zeros(2, dtype=dt)
            c.reduce_scatter(torch.ones(2 * world, dtype=dt), rs)
            w = c.all_reduce_async(torch.ones(3, dtype=dt))
            assert w.wait(30.0)
            out[dt] = (t, m, b, g, rs)
        return out

    for r, out in enumerate(each(comms, call)):
        for dt, (t, m, b, g, rs) in out.items():
            want = sum((torch.arange(n) % 7 + p).to(torch.float64) for p in range(world)).to(dt)
            assert torch.equal(t, want), (r, dt)
            wm = (torch.arange(n) % 5 - (2 if dt != torch.uint8 else 0) + world - 1).to(dt).reshape(7, 11, 13)
            assert torch.equal(m, wm), (r, dt)
            assert torch.equal(b, torch.full((n,), world - 1, dtype=dt))
            assert torch.equal(g, torch.arange(world).repeat_interleave(3).to(dt))
            assert torch.equal(rs, torch.full((2,), world, dtype=dt))


def test_bfloat16_values_exact():
    comms = make_group(2)

    def call(c):
        t = torch.tensor([1.5, -2.0, 3.25, 256.0], dtype=torch.bfloat16) * (c.rank + 1)
        c.all_reduce(t, oxccl.ReduceOp.SUM)
        return t

    for t in each(comms, call):
        assert t.dtype == torch.bfloat16
        assert t.tolist() == [4.5, -6.0, 9.75, 768.0]


def test_torch_errors():
    (c,) = make_group(1)
    with pytest.raises(oxccl.InvalidArgument, match="not contiguous"):
        c.all_reduce(torch.zeros(4, 4).t())
    with pytest.raises(oxccl.InvalidArgument):
        c.all_reduce(torch.zeros(4, dtype=torch.int16))
    with pytest.raises(oxccl.InvalidArgument):
        c.all_reduce(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(oxccl.InvalidArgument):
        c.all_reduce(torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(oxccl.InvalidArgument, match="DLPack"):
        c.all_reduce(torch.zeros(4, requires_grad=True))
    with pytest.raises(oxccl.InvalidArgument, match="dtype"):
        c.all_reduce(torch.zeros(4), out=torch.zeros(4, dtype=torch.float64))
    # A slice that is contiguous works in place, on the slice only.
    t = torch.arange(10, dtype=torch.float32)
    c.all_reduce(t[2:5])
    assert t.tolist() == list(map(float, range(10)))


class FakeCuda:
    """Stands for a CUDA tensor: DLPack device type 2 (kDLCUDA)."""

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None):
        raise AssertionError("__dlpack__ must not be called on device memory")


def _libcuda_loadable() -> bool:
    import ctypes

    for name in ("libcuda.so", "libcuda.so.1"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            pass
    return False


def test_cuda_memory_is_unavailable_backend():
    """Without the cuda feature a CUDA tensor is refused as device memory;
    with it but without a driver, the collective says the driver is missing
    (the libraries are probed before any CUDA call, and before __dlpack__)."""
    (c,) = make_group(1)
    if not oxccl.HAS_CUDA:
        with pytest.raises(oxccl.UnavailableBackend, match="device memory"):
            c.all_reduce(FakeCuda())
        if torch.cuda.is_available():  # a real CUDA tensor too, where there is one
            with pytest.raises(oxccl.UnavailableBackend):
                c.all_reduce(torch.zeros(4, device="cuda"))
        return
    # Calls without a device path refuse CUDA tensors before touching CUDA.
    with pytest.raises(oxccl.InvalidArgument, match="host memory only"):
        c.all_to_all(FakeCuda(), np.zeros(1, dtype=np.float32))
    if not _libcuda_loadable():
        print("no libcuda here: checking the missing-driver error")
        for call in (
            lambda: c.all_reduce(FakeCuda()),
            lambda: c.broadcast(FakeCuda(), 0),
            lambda: c.all_gather(FakeCuda(), FakeCuda()),
            lambda: c.all_reduce_async(FakeCuda()),
        ):
            with pytest.raises(oxccl.UnavailableBackend, match=r"CUDA driver not found \(libcuda.so\)"):
                call()
        return
    if not torch.cuda.is_available():
        pytest.fail("libcuda loads but torch sees no CUDA device")
    t = torch.arange(8, dtype=torch.float32, device="cuda")
    c.all_reduce(t, op="avg")  # one rank: unchanged, through the device path
    assert t.cpu().tolist() == list(map(float, range(8)))
    out = torch.zeros(8, device="cuda")
    c.all_gather(t, out)
    assert torch.equal(out, t)

def test_backend_devices_follow_the_build():
    """import oxccl.torch registers "oxccl" for CPU tensors, and for CUDA
    tensors too when the bindings were built with the cuda feature."""
    import torch.distributed as dist

    import oxccl.torch  # noqa: F401  (registers the backend)

    want = ["cpu", "cuda"] if oxccl.HAS_CUDA else ["cpu"]
    assert dist.Backend.backend_capability.get("oxccl") == want
