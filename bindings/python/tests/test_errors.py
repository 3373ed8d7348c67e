"""Exceptions by error kind: bad arguments, and a killed peer (real processes)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import oxccl
from conftest import each, make_group


def test_hierarchy():
    assert issubclass(oxccl.InvalidArgument, oxccl.Error)
    assert issubclass(oxccl.InvalidArgument, ValueError)
    assert issubclass(oxccl.Timeout, TimeoutError)
    assert issubclass(oxccl.SystemFailure, OSError)
    assert issubclass(oxccl.Error, RuntimeError)
    for cls in (oxccl.InvalidUsage, oxccl.RemoteError, oxccl.Aborted, oxccl.UnavailableBackend, oxccl.InternalError):
        assert issubclass(cls, oxccl.Error)
    assert oxccl.RemoteError.__module__ == "oxccl"


def test_invalid_arguments():
    comms = make_group(2)
    c = comms[0]
    cases = [
        lambda: c.all_reduce(np.zeros(4, dtype=np.float32), out=np.zeros(5, dtype=np.float32)),
        lambda: c.all_gather(np.zeros(4, dtype=np.float32), np.zeros(7, dtype=np.float32)),
        lambda: c.reduce_scatter(np.zeros(7, dtype=np.float32), np.zeros(4, dtype=np.float32)),
        lambda: c.all_reduce(np.zeros(4, dtype=np.int16)),
        lambda: c.all_reduce(np.zeros(4, dtype=bool)),
        lambda: c.all_reduce(np.zeros(8, dtype=np.float32)[::2]),
        lambda: c.all_reduce(np.zeros(4, dtype=np.float32), "median"),
        lambda: c.broadcast(np.zeros(4, dtype=np.float32), 2),
        lambda: c.send(np.zeros(4, dtype=np.float32), -1),
        lambda: c.all_reduce(np.zeros(4, dtype=np.float32), out=np.zeros(4, dtype=np.float64)),
        lambda: c.all_reduce("not a buffer"),
        lambda: c.all_to_all(np.zeros(3, dtype=np.float32), np.zeros(3, dtype=np.float32)),
        lambda: c.batch([("sendrecv", np.zeros(1), 1)]),
        lambda: c.split(-3),
        lambda: oxccl.UniqueId.from_bytes(b"short"),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(oxccl.InvalidArgument) as e:
            case()
        assert str(e.value), i
    # Overlapping in/out that is not the in-place layout
    a = np.zeros(8, dtype=np.float32)
    with pytest.raises(oxccl.InvalidArgument, match="overlap"):
        c.all_reduce(a[:4], out=a[2:6])
    # A read-only array cannot be written in place, but can be read.
    ro = np.zeros(4, dtype=np.float32)
    ro.setflags(write=False)
    out = np.ones(4, dtype=np.float32)

    def ok(comm):
        comm.all_reduce(ro, out=out if comm.rank == 0 else np.ones(4, dtype=np.float32))

    each(comms, ok)
    np.testing.assert_array_equal(out, np.zeros(4, dtype=np.float32))


def test_mismatch_names_both_calls():
    comms = make_group(2)

    def call(c):
        try:
            if c.rank == 0:
                c.all_reduce(np.zeros(4, dtype=np.float32))
            else:
                c.all_reduce(np.zeros(5, dtype=np.float32))
        except oxccl.Error as e:
            return type(e), str(e)
        return None

    res = each(comms, call)
    assert all(r is not None for r in res), res
    assert all(issubclass(t, (oxccl.InvalidUsage, oxccl.RemoteError)) for t, _ in res), res


def test_abort_and_poisoned():
    comms = make_group(2)
    a, b = comms
    buf = np.zeros(4, dtype=np.float32)
    w = b.recv_async(buf, 0)
    time.sleep(0.1)
    b.abort()
    with pytest.raises(oxccl.Error):
        w.wait(10.0)
    with pytest.raises(oxccl.Aborted):
        b.all_reduce(np.zeros(4, dtype=np.float32))


VICTIM = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import oxccl
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    uid = oxccl.UniqueId.from_bytes(bytes.fromhex(sys.argv[3]))
    c = oxccl.Communicator(uid, rank, world)
    a = np.ones(1 << 16, dtype=np.float32)
    n = 0
    print("ready", flush=True)
    mode = sys.argv[4]
    try:
        while True:
            if mode == "async":  # pending Works fail too
                works = [c.all_reduce_async(a) for _ in range(3)]
                for w in works:
                    w.wait()
            else:
                c.all_reduce(a)
            a[:] = 1
            n += 1
    except oxccl.Error as e:
        print(f"ERROR {type(e).__name__} after {n} calls: {e}", flush=True)
        sys.exit(3)
    """
)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_peer_raises_remote_error_naming_it(tmp_path, mode):
    world, victim = 3, 1
    script = tmp_path / "victim.py"
    script.write_text(VICTIM)
    uid = oxccl.UniqueId()  # served by this process: it outlives the victim
    env = dict(os.environ, OXCCL_TIMEOUT="20", OXCCL_AUTH="off")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(world), uid.to_bytes().hex(), mode],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for r in range(world)
    ]
    try:
        for p in procs:
            line = p.stdout.readline()
            assert line.strip() == "ready", line
        time.sleep(0.5)
        procs[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        outs = {}
        for r, p in enumerate(procs):
            if r == victim:
                continue
            out, _ = p.communicate(timeout=30)
            outs[r] = (out, time.monotonic() - killed, p.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (out, took, rc) in outs.items():
        print(f"survivor rank {r}, {took:.2f} s after the kill: {out.strip()}")
        assert rc == 3, (r, out)
        assert "ERROR RemoteError" in out, (r, out)
        assert f"rank {victim}" in out, (r, out)
        assert took < 10, (r, took, out)


EXIT_PENDING = textwrap.dedent(
    """
    import threading
    import numpy as np
    import oxccl
    uid = oxccl.UniqueId()
    comms = [None, None]
    def make(r):
        comms[r] = oxccl.Communicator(uid, r, 2)
    ts = [threading.Thread(target=make, args=(r,)) for r in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    w = comms[0].all_reduce_async(np.ones(1 << 16, dtype=np.float32))  # rank 1 never joins
    eng = oxccl.FusionEngine(comms[1])
    x = eng.allreduce_async(np.ones(8, dtype=np.float32), "x")
    print("exiting with pending work", flush=True)
    """
)


def test_exit_with_pending_work(tmp_path):
    """A script that exits with calls still pending exits at once and cleanly."""
    script = tmp_path / "exit_pending.py"
    script.write_text(EXIT_PENDING)
    t = time.monotonic()
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, OXCCL_TIMEOUT="30", OXCCL_AUTH="off"))
    took = time.monotonic() - t
    assert p.returncode == 0, p.stdout + p.stderr
    assert "exiting with pending work" in p.stdout
    assert "panicked" not in p.stderr, p.stderr
    assert took < 20, took
