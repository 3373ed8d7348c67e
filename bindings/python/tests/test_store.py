"""Communicator.from_store over torch's TCPStore, a PrefixStore, and a plain Python store."""

import datetime
import os
import threading

import numpy as np
import pytest

import oxccl
from conftest import run_threads

try:
    import torch
    import torch.distributed as dist
except ImportError:  # pragma: no cover - CI installs torch
    torch = None


class DictStore:
    """A minimal in-process store: set/get/add/check under a lock."""

    def __init__(self):
        self.d = {}
        self.cv = threading.Condition()

    def set(self, key, value):
        with self.cv:
            self.d[key] = bytes(value)
            self.cv.notify_all()

    def get(self, key):
        with self.cv:
            if not self.cv.wait_for(lambda: key in self.d, timeout=30):
                raise TimeoutError(key)
            return self.d[key]

    def add(self, key, amount):
        with self.cv:
            v = int(self.d.get(key, b"0")) + amount
            self.d[key] = str(v).encode()
            self.cv.notify_all()
            return v

    def check(self, keys):
        with self.cv:
            return all(k in self.d for k in keys)


def allreduce_via(stores, prefix=""):
    w = len(stores)

    def body(r):
        c = oxccl.Communicator.from_store(stores[r], r, w, prefix=prefix)
        a = np.full(5, r + 1, dtype=np.float32)
        c.all_reduce(a)
        return c.rank, c.world, a

    for r, (rank, world, a) in enumerate(run_threads(w, body)):
        assert (rank, world) == (r, w)
        np.testing.assert_array_equal(a, np.full(5, w * (w + 1) / 2, dtype=np.float32))


@pytest.mark.parametrize("world", [1, 3])
def test_python_store(world):
    s = DictStore()
    allreduce_via([s] * world)
    allreduce_via([s] * world, prefix="second")  # a second job on the same store
    if world > 1:  # a world of 1 needs no store
        assert any(k.startswith("second/") for k in s.d)
        assert any(not k.startswith("second/") for k in s.d)


def torch_stores(world):
    if torch is None:
        if os.environ.get("OXCCL_REQUIRE_TORCH"):
            raise RuntimeError("OXCCL_REQUIRE_TORCH is set but torch is not installed")
        print("test_store: torch is not installed; the TCPStore tests do not run")
        pytest.skip("torch is not installed")
    t = datetime.timedelta(seconds=30)
    server = dist.TCPStore("127.0.0.1", 0, world, True, timeout=t, wait_for_workers=False)
    clients = [dist.TCPStore("127.0.0.1", server.port, world, False, timeout=t) for _ in range(world - 1)]
    return [server] + clients


@pytest.mark.parametrize("world", [2, 4])
def test_torch_tcp_store(world):
    allreduce_via(torch_stores(world))


def test_torch_prefix_store():
    stores = torch_stores(2)
    allreduce_via([dist.PrefixStore("group1", s) for s in stores])
    allreduce_via([dist.PrefixStore("group2", s) for s in stores], prefix="x")
    assert stores[0].num_keys() > 0


def test_bad_store():
    with pytest.raises(oxccl.InvalidArgument, match="no method"):
        oxccl.Communicator.from_store(object(), 0, 1)
    with pytest.raises(oxccl.InvalidArgument):
        oxccl.Communicator.from_store(DictStore(), 2, 2)


def test_secret_authenticates():
    """Ranks given the same secret (str or bytes) connect, with no warning that
    there is no job secret; a secret of another type is an InvalidArgument."""
    import subprocess
    import sys
    import textwrap

    for secret in ("a passphrase", b"\x01\x02" * 20):
        s = DictStore()
        w = 2

        def body(r, secret=secret, s=s):
            c = oxccl.Communicator.from_store(s, r, w, secret=secret)
            a = np.ones(3, dtype=np.float32)
            c.all_reduce(a)
            return a

        for a in run_threads(w, body):
            np.testing.assert_array_equal(a, np.full(3, 2.0, dtype=np.float32))
    with pytest.raises(oxccl.InvalidArgument):
        oxccl.Communicator.from_store(DictStore(), 0, 1, secret=3)
    # Without OXCCL_JOB_SECRET, from_store with a secret does not warn.
    code = textwrap.dedent(
        """
        import threading, oxccl
        class S:
            def __init__(s): s.d = {}; s.cv = threading.Condition()
            def set(s, k, v):
                with s.cv: s.d[k] = bytes(v); s.cv.notify_all()
            def get(s, k):
                with s.cv: s.cv.wait_for(lambda: k in s.d, 30); return s.d[k]
            def add(s, k, n):
                with s.cv:
                    v = int(s.d.get(k, b"0")) + n; s.d[k] = str(v).encode(); return v
            def check(s, ks):
                with s.cv: return all(k in s.d for k in ks)
        st = S()
        ts = [threading.Thread(target=oxccl.Communicator.from_store, args=(st, r, 2), kwargs={"secret": "x"}) for r in range(2)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print("done")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OXCCL_")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0 and "done" in p.stdout, p.stderr
    assert "no job secret" not in p.stderr, p.stderr


def test_has_cuda_flag():
    # ci/python.sh builds the default wheel, and one with the cuda feature
    # (OXCCL_EXPECT_CUDA=1 for its tests).
    assert oxccl.HAS_CUDA is (os.environ.get("OXCCL_EXPECT_CUDA") == "1")
