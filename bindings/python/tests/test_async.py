"""Async calls: several in flight on one communicator, in order, with sync calls among them."""

import numpy as np

import oxccl
from conftest import each, make_group


def test_many_in_flight_in_order():
    comms = make_group(3)
    w = 3

    def call(c):
        r = c.rank
        bufs = [np.full(50000, r + k, dtype=np.float64) for k in range(8)]
        works = [c.all_reduce_async(b) for b in bufs]
        # Order-sensitive chain on one buffer: broadcast from 0, then sum, then max.
        x = np.full(10, r + 1, dtype=np.int64)
        w1 = c.broadcast_async(x, 0)
        w2 = c.all_reduce_async(x)
        w3 = c.all_reduce_async(x, "max")
        # A sync call issued while async ones are pending runs after them.
        c.all_reduce(x, "min")
        done_after_sync = [wk.is_completed() for wk in works + [w1, w2, w3]]
        for wk in works + [w1, w2, w3]:
            assert wk.wait(30.0) is True
            assert wk.exception() is None
        return bufs, x, done_after_sync

    for r, (bufs, x, done) in enumerate(each(comms, call)):
        for k, b in enumerate(bufs):
            np.testing.assert_array_equal(b, np.full(50000, sum(p + k for p in range(w)), dtype=np.float64))
        np.testing.assert_array_equal(x, np.full(10, w, dtype=np.int64))  # bcast: 1; sum: 3; max: 3; min: 3
        assert all(done), "a sync call returned before earlier async calls completed"


def test_wait_timeout_and_repr():
    comms = make_group(2)
    a, b = comms
    buf = np.zeros(4, dtype=np.float32)
    work = b.recv_async(buf, 0)  # nothing sent yet
    assert work.wait(0.2) is False
    assert not work.is_completed()
    assert "pending" in repr(work)
    a.send(np.arange(4, dtype=np.float32), 1)
    assert work.wait(30.0) is True
    assert work.is_completed()
    np.testing.assert_array_equal(buf, np.arange(4, dtype=np.float32))
    assert "completed" in repr(work)


def test_async_keeps_buffers_alive():
    comms = make_group(2)

    def call(c):
        works = []
        for k in range(5):
            works.append(c.all_reduce_async(np.full(100000, k + c.rank, dtype=np.float32)))
        # the arrays have no other reference: the Works keep them alive
        return [w.wait(30.0) for w in works]

    for res in each(comms, call):
        assert res == [True] * 5


def test_async_error_is_raised_by_wait():
    (c,) = make_group(1)
    w = c.all_gather_async(np.zeros(3, dtype=np.float32), np.zeros(5, dtype=np.float32))
    try:
        w.wait(10.0)
    except oxccl.InvalidArgument as e:
        assert isinstance(w.exception(), oxccl.InvalidArgument)
        assert str(e) == str(w.exception())
    else:
        raise AssertionError("wait() did not raise")
