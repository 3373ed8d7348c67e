"""FusionEngine: named tensors, fused, in place; the communicator comes back at shutdown."""

import numpy as np
import pytest

import oxccl
from conftest import each, make_group


@pytest.mark.parametrize("world", [1, 3])
def test_fusion_engine(world):
    comms = make_group(world)

    def call(c):
        r = c.rank
        eng = oxccl.FusionEngine(c)
        with pytest.raises(oxccl.InvalidUsage):
            c.all_reduce(np.zeros(1, dtype=np.float32))  # held by the engine
        grads = [np.full(10 + k, r + k, dtype=np.float32) for k in range(20)]
        order = range(20) if r % 2 == 0 else reversed(range(20))  # any order
        works = {k: eng.allreduce_async(grads[k], f"grad.{k}") for k in order}
        b = np.full(6, r, dtype=np.int64)
        wb = eng.broadcast_async(b, "bcast", world - 1)
        g = np.zeros(3 * world, dtype=np.float64)
        wg = eng.allgather_async(np.full(3, r, dtype=np.float64), g, "gather")
        m = np.full(4, r, dtype=np.float32)
        wm = eng.allreduce_async(m, "max", "max")
        eng.synchronize()
        assert all(w.is_completed() for w in works.values())
        assert wb.wait(30) and wg.wait(30) and wm.wait(30)
        eng.shutdown()
        c.all_reduce(np.zeros(1, dtype=np.float32))  # usable again
        return grads, b, g, m

    for grads, b, g, m in each(comms, call):
        for k, x in enumerate(grads):
            np.testing.assert_array_equal(x, np.full(10 + k, sum(p + k for p in range(world)), dtype=np.float32))
        np.testing.assert_array_equal(b, np.full(6, world - 1))
        np.testing.assert_array_equal(g, np.repeat(np.arange(world, dtype=np.float64), 3))
        np.testing.assert_array_equal(m, np.full(4, world - 1, dtype=np.float32))


def test_submit_from_another_thread_during_synchronize():
    """Horovod's pattern: gradient hooks submit on one thread while another
    synchronizes; neither blocks the other (the GIL is released while waiting)."""
    import threading
    import time

    comms = make_group(2)

    def call(c):
        eng = oxccl.FusionEngine(c)
        bufs = [np.full(100, c.rank + k, dtype=np.float64) for k in range(40)]
        works = []

        def submitter():
            for k, b in enumerate(bufs):
                works.append(eng.allreduce_async(b, f"t.{k}"))
                time.sleep(0.002)

        t = threading.Thread(target=submitter)
        t.start()
        for _ in range(5):
            eng.synchronize()
        t.join(60)
        assert not t.is_alive()
        eng.synchronize()
        assert all(w.wait(30) for w in works)
        eng.shutdown()
        return bufs

    for bufs in each(comms, call):
        for k, b in enumerate(bufs):
            np.testing.assert_array_equal(b, np.full(100, 1 + 2 * k, dtype=np.float64))


@pytest.mark.parametrize("world", [1, 3])
def test_allreduce_group_async(world):
    """Many tensors in one call and one Work: each under its own name, as
    one allreduce_async each (ranks may group them differently), every
    buffer holding its result once the Work completes."""
    comms = make_group(world)

    def call(c):
        r = c.rank
        eng = oxccl.FusionEngine(c)
        grads = [np.full(5 + k, r + k, dtype=np.float32) for k in range(12)]
        ints = [np.full(3, r + 1, dtype=np.int64) for _ in range(2)]
        # Rank 0 sends everything in one group; the others in two groups in
        # the opposite order, and one tensor alone.
        if r == 0:
            works = [eng.allreduce_group_async(grads, [f"g.{k}" for k in range(12)], "avg")]
        else:
            ks = list(reversed(range(12)))
            works = [
                eng.allreduce_group_async([grads[k] for k in ks[:5]], [f"g.{k}" for k in ks[:5]], "avg"),
                eng.allreduce_async(grads[ks[5]], f"g.{ks[5]}", "avg"),
                eng.allreduce_group_async([grads[k] for k in ks[6:]], tuple(f"g.{k}" for k in ks[6:]), "avg"),
            ]
        works.append(eng.allreduce_group_async(ints, ["i.0", "i.1"], "prod"))
        assert all(w.wait(30) for w in works)
        assert all(w.is_completed() and w.exception() is None for w in works)
        empty = eng.allreduce_group_async([], [])  # nothing to do: completes
        assert empty.wait(30)
        with pytest.raises(oxccl.InvalidArgument, match="names"):
            eng.allreduce_group_async([grads[0], grads[1]], ["x"])
        with pytest.raises(oxccl.InvalidArgument, match="names"):
            eng.allreduce_group_async([grads[0]], ["x", "y"])
        with pytest.raises(oxccl.InvalidArgument, match="overlap"):
            eng.allreduce_group_async([grads[0], grads[0][2:]], ["x", "y"])
        eng.synchronize()
        eng.shutdown()
        return grads, ints

    for grads, ints in each(comms, call):
        for k, x in enumerate(grads):
            mean = sum(p + k for p in range(world)) / world
            np.testing.assert_allclose(x, np.full(5 + k, mean, dtype=np.float32), rtol=1e-6)
        prod = int(np.prod([p + 1 for p in range(world)]))
        for x in ints:
            np.testing.assert_array_equal(x, np.full(3, prod, dtype=np.int64))


def test_allreduce_group_async_fails_with_a_mismatched_tensor():
    """A name submitted with different lengths on two ranks fails the group's
    Work on both, naming the tensor; the group's other tensors complete."""
    comms = make_group(2)

    def call(c):
        eng = oxccl.FusionEngine(c)
        good = np.full(4, c.rank + 1, dtype=np.float32)
        bad = np.zeros(3 + c.rank, dtype=np.float32)
        w = eng.allreduce_group_async([good, bad], ["ok", "bad"])
        with pytest.raises(oxccl.InvalidUsage, match="'bad'"):
            w.wait(30)
        assert isinstance(w.exception(), oxccl.InvalidUsage)
        eng.synchronize()
        eng.shutdown()
        return good

    for good in each(comms, call):
        np.testing.assert_array_equal(good, np.full(4, 3, dtype=np.float32))


def test_allreduce_group_async_takes_dlpack_capsules():
    """DLPack capsules ("dltensor", as torch.utils.dlpack.to_dlpack gives)
    stand for their arrays: the results land in the arrays, and a capsule
    is consumed, so a second use is refused."""
    comms = make_group(2)

    def call(c):
        eng = oxccl.FusionEngine(c)
        xs = [np.full(3 + k, c.rank + k, dtype=np.float32) for k in range(4)]
        caps = [x.__dlpack__() for x in xs]
        assert eng.allreduce_group_async(caps, [f"c.{k}" for k in range(4)], "sum").wait(30)
        with pytest.raises(oxccl.InvalidArgument):
            eng.allreduce_group_async(caps[:1], ["c.0"])
        eng.synchronize()
        eng.shutdown()
        return xs

    for xs in each(comms, call):
        for k, x in enumerate(xs):
            np.testing.assert_array_equal(x, np.full(3 + k, 2 * k + 1, dtype=np.float32))
