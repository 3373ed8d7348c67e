"""split and shrink."""

import numpy as np

from conftest import each, make_group


def test_split_by_parity():
    comms = make_group(4)

    def call(c):
        sub = c.split(c.rank % 2, key=-c.rank)  # reverse order inside each half
        none = c.split(None if c.rank == 3 else 0)
        a = np.full(3, c.rank, dtype=np.int32)
        sub.all_reduce(a)
        return sub.rank, sub.world, a, none is None

    res = each(comms, call)
    for r, (srank, sworld, a, none) in enumerate(res):
        assert sworld == 2
        assert srank == (1 if r < 2 else 0)
        np.testing.assert_array_equal(a, np.full(3, 2 if r % 2 == 0 else 4))
        assert none == (r == 3)


def test_shrink_healthy():
    comms = make_group(3)

    def call(c):
        s = c.shrink([])
        a = np.ones(2, dtype=np.float64)
        s.all_reduce(a)
        return s.world, a

    for world, a in each(comms, call):
        assert world == 3
        np.testing.assert_array_equal(a, np.full(2, 3.0))
