/* Every collective, every dtype and op, in place and out of place, checked
 * against values computed here; sends and receives (a ring shift, and a
 * group posted in an order that would deadlock if run as posted),
 * alltoall, alltoallv, gather and scatter against naive references. Run under oxrun: `oxrun -n 4 -- ./collectives`.
 * Also builds a second communicator from a unique id that rank 0 writes to a
 * file (argv[1], default collectives.id in the working directory). */
#define _POSIX_C_SOURCE 200809L
#include <time.h>
#include <unistd.h>

#include "common.h"

static int rank, world;

static void *alloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p) {
    fprintf(stderr, "out of memory\n");
    exit(2);
  }
  memset(p, 0xAB, n ? n : 1);
  return p;
}

static void fill(void *buf, oxcclDataType_t t, int r, size_t n, size_t offset) {
  size_t i;
  for (i = 0; i < n; i++)
    put(buf, t, i, value(r, offset + i));
}

static void test_allreduce(oxcclComm_t comm, oxcclDataType_t t, oxcclRedOp_t op,
                           size_t count) {
  size_t sz = dtype_size(t);
  void *send = alloc(count * sz), *recv = alloc(count * sz);
  char what[64];
  snprintf(what, sizeof what, "allreduce %s", OP_NAMES[op]);
  fill(send, t, rank, count, 0);
  OK(oxcclAllReduce(send, recv, count, t, op, comm, NULL));
  CHECK_ELEMS(what, recv, t, count, expected(op, t, world, i));
  CHECK_ELEMS("allreduce input untouched", send, t, count, value(rank, i));
  /* in place */
  OK(oxcclAllReduce(send, send, count, t, op, comm, NULL));
  CHECK_ELEMS(what, send, t, count, expected(op, t, world, i));
  free(send);
  free(recv);
}

static void test_reduce(oxcclComm_t comm, oxcclDataType_t t, oxcclRedOp_t op,
                        size_t count, int root) {
  size_t sz = dtype_size(t);
  void *send = alloc(count * sz), *recv = alloc(count * sz);
  char what[64];
  snprintf(what, sizeof what, "reduce %s root %d", OP_NAMES[op], root);
  fill(send, t, rank, count, 0);
  fill(recv, t, 99, count, 0);
  /* non-root ranks pass recvbuff NULL */
  OK(oxcclReduce(send, rank == root ? recv : NULL, count, t, op, root, comm, NULL));
  if (rank == root)
    CHECK_ELEMS(what, recv, t, count, expected(op, t, world, i));
  /* in place; non-root buffers are left as they were */
  OK(oxcclReduce(send, send, count, t, op, root, comm, NULL));
  if (rank == root)
    CHECK_ELEMS(what, send, t, count, expected(op, t, world, i));
  else
    CHECK_ELEMS("reduce non-root in place untouched", send, t, count,
                value(rank, i));
  free(send);
  free(recv);
}

static void test_reduce_scatter(oxcclComm_t comm, oxcclDataType_t t,
                                oxcclRedOp_t op, size_t count) {
  size_t sz = dtype_size(t), full = count * (size_t)world;
  char *send = alloc(full * sz);
  void *recv = alloc(count * sz);
  char what[64];
  size_t off = (size_t)rank * count;
  snprintf(what, sizeof what, "reduce_scatter %s", OP_NAMES[op]);
  fill(send, t, rank, full, 0);
  OK(oxcclReduceScatter(send, recv, count, t, op, comm, NULL));
  CHECK_ELEMS(what, recv, t, count, expected(op, t, world, off + i));
  /* in place: recvbuff == sendbuff + rank * recvcount */
  OK(oxcclReduceScatter(send, send + off * sz, count, t, op, comm, NULL));
  CHECK_ELEMS(what, send + off * sz, t, count, expected(op, t, world, off + i));
  free(send);
  free(recv);
}

static void test_broadcast(oxcclComm_t comm, oxcclDataType_t t, size_t count,
                           int root) {
  size_t sz = dtype_size(t);
  void *send = alloc(count * sz), *recv = alloc(count * sz);
  fill(send, t, rank, count, 0);
  fill(recv, t, 50, count, 0);
  /* non-root ranks pass sendbuff NULL */
  OK(oxcclBroadcast(rank == root ? send : NULL, recv, count, t, root, comm, NULL));
  CHECK_ELEMS("broadcast", recv, t, count, value(root, i));
  /* in place */
  OK(oxcclBroadcast(send, send, count, t, root, comm, NULL));
  CHECK_ELEMS("broadcast in place", send, t, count, value(root, i));
  free(send);
  free(recv);
}

static void test_allgather(oxcclComm_t comm, oxcclDataType_t t, size_t count) {
  size_t sz = dtype_size(t), full = count * (size_t)world;
  void *send = alloc(count * sz);
  char *recv = alloc(full * sz);
  fill(send, t, rank, count, 0);
  OK(oxcclAllGather(send, recv, count, t, comm, NULL));
  CHECK_ELEMS("allgather", recv, t, full, value((int)(i / count), i % count));
  /* in place: sendbuff == recvbuff + rank * sendcount */
  memset(recv, 0, full * sz);
  fill(recv + (size_t)rank * count * sz, t, rank, count, 0);
  OK(oxcclAllGather(recv + (size_t)rank * count * sz, recv, count, t, comm, NULL));
  CHECK_ELEMS("allgather in place", recv, t, full,
              value((int)(i / count), i % count));
  free(send);
  free(recv);
}

/* The value that rank `src` sends to rank `dst` at index `i` of their block. */
static double xval(int src, int dst, size_t i) {
  return (double)((src * 7 + dst * 3 + (int)(i % 11)) % 100);
}

/* Every rank passes a message to the next and gets one from the previous,
 * in a group (the receive posted first on odd ranks). */
static void test_ring_shift(oxcclComm_t comm, oxcclDataType_t t, size_t count) {
  size_t sz = dtype_size(t);
  int next = (rank + 1) % world, prev = (rank + world - 1) % world;
  void *send = alloc(count * sz), *recv = alloc(count * sz);
  size_t i;
  for (i = 0; i < count; i++)
    put(send, t, i, xval(rank, next, i));
  OK(oxcclGroupStart());
  if (rank % 2) {
    OK(oxcclRecv(recv, count, t, prev, comm, NULL));
    OK(oxcclSend(send, count, t, next, comm, NULL));
  } else {
    OK(oxcclSend(send, count, t, next, comm, NULL));
    OK(oxcclRecv(recv, count, t, prev, comm, NULL));
  }
  OK(oxcclGroupEnd());
  CHECK_ELEMS("ring shift", recv, t, count, xval(prev, rank, i));
  free(send);
  free(recv);
}

/* Sends and receives posted in an order that deadlocks when run as posted:
 * with 4 ranks or more, rank 0 sends to 1 then 3, rank 2 sends to 3 then 1,
 * rank 1 receives from 2 then 0, rank 3 from 0 then 2 (1M floats each);
 * with any world, every rank receives from r-2, sends to r+1, receives
 * from r-1 and sends to r+2 (with 2 ranks: a message to itself; not
 * with 1 rank, where the messages to itself match in posting order). */
static void test_p2p_orders(oxcclComm_t comm) {
  const size_t big = (size_t)1 << 20, n = 3001;
  float *s1 = alloc(big * 4), *s2 = alloc(big * 4);
  float *r1 = alloc(big * 4), *r2 = alloc(big * 4);
  size_t i;
  int p1 = (rank + 1) % world, p2 = (rank + 2) % world;
  int m1 = (rank + world - 1) % world, m2 = (rank + 2 * world - 2) % world;
  if (world >= 4 && rank < 4) {
    static const int to[4][2] = {{1, 3}, {-1, -1}, {3, 1}, {-1, -1}};
    static const int from[4][2] = {{-1, -1}, {2, 0}, {-1, -1}, {0, 2}};
    for (i = 0; i < big; i++) {
      s1[i] = (float)(rank * 1000 + to[rank][0]) + (float)(i % 100);
      s2[i] = (float)(rank * 1000 + to[rank][1]) + (float)(i % 100);
    }
    OK(oxcclGroupStart());
    if (to[rank][0] >= 0) {
      OK(oxcclSend(s1, big, oxcclFloat, to[rank][0], comm, NULL));
      OK(oxcclSend(s2, big, oxcclFloat, to[rank][1], comm, NULL));
    } else {
      OK(oxcclRecv(r1, big, oxcclFloat, from[rank][0], comm, NULL));
      OK(oxcclRecv(r2, big, oxcclFloat, from[rank][1], comm, NULL));
    }
    OK(oxcclGroupEnd());
    if (to[rank][0] < 0) {
      CHECK_ELEMS("deadlock order, first", r1, oxcclFloat, big,
                  (double)(from[rank][0] * 1000 + rank) + (double)(i % 100));
      CHECK_ELEMS("deadlock order, second", r2, oxcclFloat, big,
                  (double)(from[rank][1] * 1000 + rank) + (double)(i % 100));
    }
  }
  /* With 1 rank, both messages go to itself and match in posting order. */
  if (world < 2) {
    free(s1);
    free(s2);
    free(r1);
    free(r2);
    return;
  }
  for (i = 0; i < n; i++) {
    s1[i] = (float)xval(rank, p1, i);
    s2[i] = (float)xval(rank, p2, i) + 0.5f;
  }
  OK(oxcclGroupStart());
  OK(oxcclRecv(r2, n, oxcclFloat, m2, comm, NULL));
  OK(oxcclSend(s1, n, oxcclFloat, p1, comm, NULL));
  OK(oxcclRecv(r1, n, oxcclFloat, m1, comm, NULL));
  OK(oxcclSend(s2, n, oxcclFloat, p2, comm, NULL));
  OK(oxcclGroupEnd());
  CHECK_ELEMS("p2p from r-1", r1, oxcclFloat, n, xval(m1, rank, i));
  CHECK_ELEMS("p2p from r-2", r2, oxcclFloat, n, xval(m2, rank, i) + 0.5);
  free(s1);
  free(s2);
  free(r1);
  free(r2);
}

static void test_alltoall(oxcclComm_t comm, oxcclDataType_t t, size_t count) {
  size_t sz = dtype_size(t), full = count * (size_t)world, i;
  void *send = alloc(full * sz), *recv = alloc(full * sz);
  for (i = 0; i < full; i++)
    put(send, t, i, xval(rank, (int)(i / count), i % count));
  OK(oxcclAllToAll(send, recv, count, t, comm, NULL));
  CHECK_ELEMS("alltoall", recv, t, full, xval((int)(i / count), rank, i % count));
  free(send);
  free(recv);
}

/* The elements rank `src` sends to rank `dst` in the alltoallv test:
 * uneven, zero for a third of the pairs. */
static size_t vcount(int src, int dst) {
  return (size_t)((src + dst) % 3) * (size_t)(1 + dst % 2) * 5;
}

/* Uneven counts, blocks sent from a buffer with gaps, received packed in
 * reverse rank order, the buffer's tail left alone. */
static void test_alltoallv(oxcclComm_t comm, oxcclDataType_t t) {
  size_t sz = dtype_size(t), i, at;
  size_t *sc = alloc(sizeof(size_t) * (size_t)world), *sd = alloc(sizeof(size_t) * (size_t)world);
  size_t *rc = alloc(sizeof(size_t) * (size_t)world), *rd = alloc(sizeof(size_t) * (size_t)world);
  size_t in_len = 0, out_len = 0;
  void *send, *recv;
  int p;
  /* sends: in rank order, one element of gap before each block */
  for (at = 0, p = 0; p < world; p++) {
    sc[p] = vcount(rank, p);
    sd[p] = at + 1;
    at += sc[p] + 1;
  }
  in_len = at;
  /* receives: in reverse rank order, packed */
  for (at = 0, p = world - 1; p >= 0; p--) {
    rc[p] = vcount(p, rank);
    rd[p] = at;
    at += rc[p];
  }
  out_len = at + 2;
  send = alloc(in_len * sz);
  recv = alloc(out_len * sz);
  for (p = 0; p < world; p++)
    for (i = 0; i < sc[p]; i++)
      put(send, t, sd[p] + i, xval(rank, p, i));
  for (i = 0; i < out_len; i++)
    put(recv, t, i, 99);
  OK(oxcclAllToAllv(send, sc, sd, recv, rc, rd, t, comm, NULL));
  for (p = 0; p < world; p++) {
    char what[64];
    char *base = (char *)recv + rd[p] * sz;
    snprintf(what, sizeof what, "alltoallv from rank %d", p);
    CHECK_ELEMS(what, base, t, rc[p], xval(p, rank, i));
  }
  CHECK_ELEMS("alltoallv leaves the tail", (char *)recv + (out_len - 2) * sz, t, 2, 99.0);
  free(send);
  free(recv);
  free(sc);
  free(sd);
  free(rc);
  free(rd);
}

static void test_gather_scatter(oxcclComm_t comm, oxcclDataType_t t, size_t count,
                                int root) {
  size_t sz = dtype_size(t), full = count * (size_t)world, i;
  void *mine = alloc(count * sz), *all = alloc(full * sz);
  for (i = 0; i < count; i++)
    put(mine, t, i, xval(rank, root, i));
  /* non-root ranks pass recvbuff NULL */
  OK(oxcclGather(mine, rank == root ? all : NULL, count, t, root, comm, NULL));
  if (rank == root)
    CHECK_ELEMS("gather", all, t, full, xval((int)(i / count), root, i % count));
  for (i = 0; i < full; i++)
    put(all, t, i, xval(root, (int)(i / count), i % count));
  for (i = 0; i < count; i++)
    put(mine, t, i, 99);
  /* non-root ranks pass sendbuff NULL */
  OK(oxcclScatter(rank == root ? all : NULL, mine, count, t, root, comm, NULL));
  CHECK_ELEMS("scatter", mine, t, count, xval(root, rank, i));
  free(mine);
  free(all);
}

/* A group that mixes a collective, sends and receives and an exchange on
 * one communicator, in the same order on every rank. */
static void test_mixed_group(oxcclComm_t comm) {
  int32_t sum = rank + 1, ring = -1, token = rank * 10;
  int32_t *a2a_in = alloc(sizeof(int32_t) * (size_t)world);
  int32_t *a2a_out = alloc(sizeof(int32_t) * (size_t)world);
  int p;
  for (p = 0; p < world; p++)
    a2a_in[p] = rank * 100 + p;
  OK(oxcclGroupStart());
  OK(oxcclAllReduce(&sum, &sum, 1, oxcclInt32, oxcclSum, comm, NULL));
  OK(oxcclRecv(&ring, 1, oxcclInt32, (rank + world - 1) % world, comm, NULL));
  OK(oxcclSend(&token, 1, oxcclInt32, (rank + 1) % world, comm, NULL));
  OK(oxcclAllToAll(a2a_in, a2a_out, 1, oxcclInt32, comm, NULL));
  OK(oxcclGroupEnd());
  CHECK(sum == world * (world + 1) / 2, "mixed group sum %d", sum);
  CHECK(ring == ((rank + world - 1) % world) * 10, "mixed group ring %d", ring);
  for (p = 0; p < world; p++)
    CHECK(a2a_out[p] == p * 100 + rank, "mixed group alltoall[%d] = %d", p, a2a_out[p]);
  free(a2a_in);
  free(a2a_out);
}

static void sleep_ms(long ms) {
  struct timespec ts;
  ts.tv_sec = ms / 1000;
  ts.tv_nsec = (ms % 1000) * 1000000L;
  nanosleep(&ts, NULL);
}

/* A communicator from a unique id, exchanged through a file. */
static void test_unique_id(const char *path) {
  oxcclUniqueId id;
  oxcclComm_t comm = NULL;
  int n = 0, r = -1;
  int32_t buf[8];
  size_t i;
  char tmp[4096];
  if (rank == 0) {
    FILE *f;
    OK(oxcclGetUniqueId(&id));
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    f = fopen(tmp, "wb");
    CHECK(f != NULL, "cannot write %s", tmp);
    if (!f)
      return;
    CHECK(fwrite(&id, sizeof id, 1, f) == 1, "short write");
    fclose(f);
    CHECK(rename(tmp, path) == 0, "rename %s", path);
  } else {
    FILE *f = NULL;
    int tries;
    for (tries = 0; tries < 3000 && !f; tries++) {
      f = fopen(path, "rb");
      if (!f)
        sleep_ms(10);
    }
    CHECK(f != NULL, "no unique id in %s", path);
    if (!f)
      return;
    CHECK(fread(&id, sizeof id, 1, f) == 1, "short read");
    fclose(f);
  }
  OK(oxcclCommInitRank(&comm, world, id, rank));
  if (!comm)
    return;
  OK(oxcclCommCount(comm, &n));
  OK(oxcclCommUserRank(comm, &r));
  CHECK(n == world && r == rank, "count %d rank %d", n, r);
  for (i = 0; i < 8; i++)
    buf[i] = rank + (int32_t)i;
  OK(oxcclAllReduce(buf, buf, 8, oxcclInt32, oxcclMax, comm, NULL));
  for (i = 0; i < 8; i++)
    CHECK(buf[i] == world - 1 + (int32_t)i, "max %d", buf[i]);
  OK(oxcclCommDestroy(comm));
  if (rank == 0)
    unlink(path);
}

int main(int argc, char **argv) {
  oxcclComm_t comm = NULL;
  size_t c, d, o;
  const size_t counts[] = {0, 1, 1031};
  oxcclResult_t async_err = oxcclInternalError;
  int version = 0;

  OK(oxcclGetVersion(&version));
  CHECK(version == OXCCL_VERSION_CODE && version == 100, "version %d", version);
  OK(oxcclCommInitFromEnv(&comm));
  if (!comm)
    return finish("collectives", -1);
  OK(oxcclCommUserRank(comm, &rank));
  OK(oxcclCommCount(comm, &world));
  CHECK(world >= 1 && rank >= 0 && rank < world, "rank %d world %d", rank, world);

  for (c = 0; c < sizeof counts / sizeof counts[0]; c++) {
    for (d = 0; d < 10; d++) {
      oxcclDataType_t t = ALL_DTYPES[d];
      for (o = 0; o < 5; o++) {
        test_allreduce(comm, t, ALL_OPS[o], counts[c]);
        test_reduce(comm, t, ALL_OPS[o], counts[c], (int)(o % (size_t)world));
        test_reduce_scatter(comm, t, ALL_OPS[o], counts[c]);
      }
      test_broadcast(comm, t, counts[c], world - 1);
      test_broadcast(comm, t, counts[c], 0);
      test_allgather(comm, t, counts[c]);
    }
  }
  for (c = 0; c < sizeof counts / sizeof counts[0]; c++) {
    static const oxcclDataType_t p2p_types[] = {oxcclInt8, oxcclFloat16, oxcclInt32,
                                                oxcclFloat64};
    for (d = 0; d < 4; d++) {
      oxcclDataType_t t = p2p_types[d];
      test_ring_shift(comm, t, counts[c]);
      test_alltoall(comm, t, counts[c]);
      test_gather_scatter(comm, t, counts[c], (int)(d % (size_t)world));
      if (c == 0)
        test_alltoallv(comm, t);
    }
  }
  test_p2p_orders(comm);
  test_mixed_group(comm);

  /* Zero count with NULL buffers is valid. */
  OK(oxcclAllReduce(NULL, NULL, 0, oxcclFloat, oxcclSum, comm, NULL));
  OK(oxcclAllGather(NULL, NULL, 0, oxcclDouble, comm, NULL));
  OK(oxcclReduceScatter(NULL, NULL, 0, oxcclHalf, oxcclMax, comm, NULL));
  OK(oxcclBroadcast(NULL, NULL, 0, oxcclInt, 0, comm, NULL));
  OK(oxcclReduce(NULL, NULL, 0, oxcclChar, oxcclMin, 0, comm, NULL));
  OK(oxcclAllToAll(NULL, NULL, 0, oxcclFloat, comm, NULL));
  OK(oxcclGather(NULL, NULL, 0, oxcclFloat, 0, comm, NULL));
  OK(oxcclScatter(NULL, NULL, 0, oxcclFloat, world - 1, comm, NULL));
  OK(oxcclGroupStart());
  OK(oxcclSend(NULL, 0, oxcclFloat, (rank + 1) % world, comm, NULL));
  OK(oxcclRecv(NULL, 0, oxcclFloat, (rank + world - 1) % world, comm, NULL));
  OK(oxcclGroupEnd());

  OK(oxcclCommGetAsyncError(comm, &async_err));
  CHECK(async_err == oxcclSuccess, "async error %d", (int)async_err);
  OK(oxcclCommDestroy(comm));

  test_unique_id(argc > 1 ? argv[1] : "collectives.id");
  return finish("collectives", rank);
}
