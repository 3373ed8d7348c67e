"""The GIL is released during calls: another Python thread makes progress."""

import threading
import time

import numpy as np

from conftest import make_group


def test_blocking_call_releases_the_gil():
    a, b = make_group(2)
    ticks = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks[0] += 1

    def sender():
        time.sleep(0.5)
        a.send(np.arange(8, dtype=np.int32), 1)

    counter = threading.Thread(target=count)
    s = threading.Thread(target=sender)
    buf = np.zeros(8, dtype=np.int32)
    counter.start()
    s.start()
    before = ticks[0]
    t = time.monotonic()
    b.recv(buf, 0)  # blocks about 0.5 s waiting for the sender
    took = time.monotonic() - t
    during = ticks[0] - before
    stop.set()
    counter.join(10)
    s.join(10)
    np.testing.assert_array_equal(buf, np.arange(8, dtype=np.int32))
    assert took > 0.3
    # A pure-Python loop runs millions of times a second; with the GIL held
    # by recv it would not run at all.
    assert during > 10000, during
