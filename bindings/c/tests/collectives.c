/* Every collective, every dtype and op, in place and out of place, checked
 * against values computed here. Run under oxrun: `oxrun -n 4 -- ./collectives`.
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
  /* Zero count with NULL buffers is valid. */
  OK(oxcclAllReduce(NULL, NULL, 0, oxcclFloat, oxcclSum, comm, NULL));
  OK(oxcclAllGather(NULL, NULL, 0, oxcclDouble, comm, NULL));
  OK(oxcclReduceScatter(NULL, NULL, 0, oxcclHalf, oxcclMax, comm, NULL));
  OK(oxcclBroadcast(NULL, NULL, 0, oxcclInt, 0, comm, NULL));
  OK(oxcclReduce(NULL, NULL, 0, oxcclChar, oxcclMin, 0, comm, NULL));

  OK(oxcclCommGetAsyncError(comm, &async_err));
  CHECK(async_err == oxcclSuccess, "async error %d", (int)async_err);
  OK(oxcclCommDestroy(comm));

  test_unique_id(argc > 1 ? argv[1] : "collectives.id");
  return finish("collectives", rank);
}
