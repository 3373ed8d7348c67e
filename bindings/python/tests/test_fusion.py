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
