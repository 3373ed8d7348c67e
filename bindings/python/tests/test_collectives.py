"""Every collective and point-to-point call against a numpy reference, on
worlds of 1 to 4 ranks (threads), every numpy dtype, counts 0, 1, uneven and large."""

import numpy as np
import pytest

from conftest import NP_DTYPES, data, each, reference

OPS = ["sum", "prod", "min", "max", "avg"]
COUNTS = [0, 1, 7, 100003]


@pytest.mark.parametrize("dtype", NP_DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_all_reduce(group, dtype, op):
    w = len(group)
    for n in COUNTS:
        ins = [data(r, n, dtype, op) for r in range(w)]
        want = reference(ins, op)

        def call(c):
            buf = ins[c.rank].copy()
            out = np.full(n, 99, dtype=dtype)
            c.all_reduce(ins[c.rank], op, out=out)  # out of place
            c.all_reduce(buf, op)  # in place
            return buf, out

        for r, (buf, out) in enumerate(each(group, call)):
            np.testing.assert_array_equal(buf, want, err_msg=f"rank {r} in place n={n}")
            np.testing.assert_array_equal(out, want, err_msg=f"rank {r} out n={n}")
        for r in range(w):  # inputs untouched
            np.testing.assert_array_equal(ins[r], data(r, n, dtype, op))


@pytest.mark.parametrize("dtype", NP_DTYPES)
def test_broadcast_and_reduce(group, dtype):
    w = len(group)
    for n in COUNTS:
        for root in range(w):
            ins = [data(r, n, dtype) for r in range(w)]

            def call(c):
                buf = ins[c.rank].copy()
                c.broadcast(buf, root)
                out = np.zeros(n, dtype=dtype)
                c.broadcast(ins[c.rank], root, out=out)
                red = ins[c.rank].copy()
                c.reduce(red, root, "max")
                red_out = np.zeros(n, dtype=dtype)
                c.reduce(ins[c.rank], root, "sum", out=red_out)
                return buf, out, red, red_out

            for r, (buf, out, red, red_out) in enumerate(each(group, call)):
                np.testing.assert_array_equal(buf, ins[root])
                np.testing.assert_array_equal(out, ins[root])
                if r == root:
                    np.testing.assert_array_equal(red, reference(ins, "max"))
                    np.testing.assert_array_equal(red_out, reference(ins, "sum"))
                else:
                    np.testing.assert_array_equal(red, ins[r])  # non-roots untouched
                    np.testing.assert_array_equal(red_out, np.zeros(n, dtype=dtype))


@pytest.mark.parametrize("dtype", NP_DTYPES)
def test_all_gather_and_reduce_scatter(group, dtype):
    w = len(group)
    for n in COUNTS:
        ins = [data(r, n, dtype) for r in range(w)]
        full = [data(r, n * w, dtype) for r in range(w)]

        def call(c):
            out = np.zeros(n * w, dtype=dtype)
            c.all_gather(ins[c.rank], out)
            inplace = np.zeros(n * w, dtype=dtype)
            inplace[c.rank * n:(c.rank + 1) * n] = ins[c.rank]
            c.all_gather(inplace[c.rank * n:(c.rank + 1) * n], inplace)
            rs = np.zeros(n, dtype=dtype)
            c.reduce_scatter(full[c.rank], rs, "sum")
            buf = full[c.rank].copy()
            c.reduce_scatter(buf, buf[c.rank * n:(c.rank + 1) * n], "min")
            return out, inplace, rs, buf[c.rank * n:(c.rank + 1) * n]

        want_ag = np.concatenate(ins)
        want_sum = reference(full, "sum")
        want_min = reference(full, "min")
        for r, (out, inplace, rs, rs_in) in enumerate(each(group, call)):
            np.testing.assert_array_equal(out, want_ag)
            np.testing.assert_array_equal(inplace, want_ag)
            np.testing.assert_array_equal(rs, want_sum[r * n:(r + 1) * n])
            np.testing.assert_array_equal(rs_in, want_min[r * n:(r + 1) * n])


@pytest.mark.parametrize("dtype", ["uint8", "float16", "float64", "int64"])
def test_exchanges(group, dtype):
    """all_to_all, gather, scatter, and the calls of per-rank counts."""
    w = len(group)
    for n in COUNTS:
        ins = [data(r, n * w, dtype, salt=1) for r in range(w)]
        for root in {0, w - 1}:

            def call(c):
                r = c.rank
                a2a = np.zeros(n * w, dtype=dtype)
                c.all_to_all(ins[r], a2a)
                g = np.zeros(n * w, dtype=dtype) if r == root else None
                c.gather(ins[r][:n], g, root)
                s = np.zeros(n, dtype=dtype)
                c.scatter(ins[r] if r == root else None, s, root)
                return a2a, g, s

            for r, (a2a, g, s) in enumerate(each(group, call)):
                want = np.concatenate([ins[p][r * n:(r + 1) * n] for p in range(w)])
                np.testing.assert_array_equal(a2a, want)
                if r == root:
                    np.testing.assert_array_equal(g, np.concatenate([ins[p][:n] for p in range(w)]))
                np.testing.assert_array_equal(s, ins[root][r * n:(r + 1) * n])

        # Per-rank counts: rank p's block is (p * n) % 5 + p elements (some 0).
        counts = [(p * (n + 1)) % 5 + (p if n else 0) for p in range(w)]
        total = sum(counts)
        displs = list(np.cumsum([0] + counts[:-1]))

        def call_v(c):
            r = c.rank
            mine = data(r, counts[r], dtype)
            agv = np.zeros(total, dtype=dtype)
            c.all_gather_v(mine, agv, counts)
            full = data(r, total, dtype, salt=2)
            rsv = np.zeros(counts[r], dtype=dtype)
            c.reduce_scatter_v(full, rsv, counts, "max")
            # all_to_all_v: rank r sends (r + p) % 3 elements to rank p.
            sc = [(r + p) % 3 for p in range(w)]
            rc = [(p + r) % 3 for p in range(w)]
            sd = list(np.cumsum([0] + sc[:-1]))
            rd = list(np.cumsum([0] + rc[:-1]))
            send = data(r, sum(sc), dtype, salt=3)
            recv = np.zeros(sum(rc), dtype=dtype)
            c.all_to_all_v(send, sc, sd, recv, rc, rd)
            return agv, rsv, recv

        want_agv = np.concatenate([data(p, counts[p], dtype) for p in range(w)])
        want_rsv = reference([data(p, total, dtype, salt=2) for p in range(w)], "max")
        for r, (agv, rsv, recv) in enumerate(each(group, call_v)):
            np.testing.assert_array_equal(agv, want_agv)
            np.testing.assert_array_equal(rsv, want_rsv[displs[r]:displs[r] + counts[r]])
            parts = []
            for p in range(w):
                sc_p = [(p + q) % 3 for q in range(w)]
                off = sum(sc_p[:r])
                parts.append(data(p, sum(sc_p), dtype, salt=3)[off:off + sc_p[r]])
            np.testing.assert_array_equal(recv, np.concatenate(parts))


@pytest.mark.parametrize("dtype", ["int32", "float32"])
def test_send_recv_batch_barrier(group, dtype):
    w = len(group)
    for n in COUNTS:

        def call(c):
            r = c.rank
            nxt, prev = (r + 1) % w, (r - 1) % w
            got = np.zeros(n, dtype=dtype)
            c.batch([("send", data(r, n, dtype), nxt), ("recv", got, prev)])
            c.barrier()
            single = np.zeros(n, dtype=dtype)
            if w > 1:
                if r % 2 == 0:
                    c.send(data(r, n, dtype, salt=4), nxt)
                    c.recv(single, prev)
                else:
                    c.recv(single, prev)
                    c.send(data(r, n, dtype, salt=4), nxt)
            return got, single

        for r, (got, single) in enumerate(each(group, call)):
            np.testing.assert_array_equal(got, data((r - 1) % w, n, dtype))
            if w > 1 and not (w % 2 == 1 and r == 0):
                np.testing.assert_array_equal(single, data((r - 1) % w, n, dtype, salt=4))


def test_buffer_protocol_objects(group):
    """bytearray, memoryview and array.array work through the buffer protocol."""
    import array

    w = len(group)

    def call(c):
        ba = bytearray([c.rank + 1] * 5)
        c.all_reduce(ba)
        arr = array.array("d", [float(c.rank)] * 3)
        c.all_reduce(memoryview(arr), "max")
        ints = array.array("q", [c.rank] * 4)
        c.all_reduce(ints)
        return bytes(ba), list(arr), list(ints)

    s = sum(range(1, w + 1))
    for ba, arr, ints in each(group, call):
        assert ba == bytes([s] * 5)
        assert arr == [float(w - 1)] * 3
        assert ints == [sum(range(w))] * 4
