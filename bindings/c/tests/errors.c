/* Every error path of the C API returns its documented code with a message
 * (sends, receives and exchanges included; counts that disagree between a
 * sender and its receiver fail on both);
 * bad arguments leave the communicator usable; and a rank that exits early
 * makes the survivors' next call fail with oxcclRemoteError.
 * Run under oxrun: `oxrun -n 2 -- ./errors`. */
#include <stdint.h>

#include "common.h"

/* Global with external linkage (so that the store is kept), so that the rank
 * that exits without destroying its communicator still holds it (valgrind:
 * reachable, not leaked). */
oxcclComm_t g_comm;
oxcclComm_t g_comm = NULL;

int main(void) {
  oxcclComm_t comm = NULL;
  oxcclUniqueId id;
  int rank = -1, world = 0, n = 0, i;
  int devs[2] = {0, -1};
  float a[16], b[16];
  oxcclResult_t async_err = oxcclSuccess;
  const char *msg;
  void *stream = (void *)(uintptr_t)0x1234;

  for (i = 0; i <= 8; i++) {
    const char *s = oxcclGetErrorString((oxcclResult_t)i);
    CHECK(s != NULL && s[0] != '\0', "error string %d", i);
    if (i > 0)
      CHECK(strcmp(s, oxcclGetErrorString((oxcclResult_t)(i - 1))) != 0,
            "error strings %d and %d are equal", i, i - 1);
  }
  CHECK(strlen(oxcclGetErrorString((oxcclResult_t)42)) > 0, "unknown code");
  CHECK(oxcclSuccess == 0 && oxcclUnhandledCudaError == 1 &&
            oxcclSystemError == 2 && oxcclInternalError == 3 &&
            oxcclInvalidArgument == 4 && oxcclInvalidUsage == 5 &&
            oxcclRemoteError == 6 && oxcclInProgress == 7 && oxcclTimeout == 8,
        "result codes are NCCL's");
  CHECK(oxcclChar == oxcclInt8 && oxcclInt == oxcclInt32 &&
            oxcclHalf == oxcclFloat16 && oxcclFloat == oxcclFloat32 &&
            oxcclDouble == oxcclFloat64 && oxcclBfloat16 == 9 &&
            oxcclUint64 == 5,
        "dtype values are NCCL's");
  CHECK(oxcclSum == 0 && oxcclProd == 1 && oxcclMax == 2 && oxcclMin == 3 &&
            oxcclAvg == 4,
        "op values are NCCL's");
  CHECK(sizeof(oxcclUniqueId) == 128, "unique id is %zu bytes",
        sizeof(oxcclUniqueId));

  /* Init and queries. */
  FAILS(oxcclInvalidArgument, oxcclGetVersion(NULL));
  FAILS(oxcclInvalidArgument, oxcclGetUniqueId(NULL));
  memset(&id, 0, sizeof id);
  FAILS(oxcclInvalidArgument, oxcclCommInitRank(NULL, 2, id, 0));
  FAILS(oxcclInvalidArgument, oxcclCommInitRank(&comm, 2, id, 0)); /* bad id */
  FAILS(oxcclInvalidArgument, oxcclCommInitRank(&comm, -1, id, 0));
  FAILS(oxcclInvalidArgument, oxcclCommInitRank(&comm, 0, id, 0));
  FAILS(oxcclInvalidArgument, oxcclCommInitRank(&comm, 2, id, -1));
  FAILS(oxcclInvalidArgument, oxcclCommInitRank(&comm, 2, id, 2));
  FAILS(oxcclInvalidArgument, oxcclCommInitAll(NULL, 2, NULL));
  FAILS(oxcclInvalidArgument, oxcclCommInitAll(&comm, 0, NULL));
  FAILS(oxcclInvalidArgument, oxcclCommInitAll(&comm, -4, NULL));
  FAILS(oxcclInvalidArgument, oxcclCommInitAll(&comm, 2, devs));
  CHECK(comm == NULL, "a failed init wrote a handle");
  FAILS(oxcclInvalidArgument, oxcclCommInitFromEnv(NULL));
  FAILS(oxcclInvalidUsage, oxcclGroupEnd());

  /* A destroyed or aborted handle, or a pointer oxccl never made, is refused
     without reading freed memory (NCCL leaves this undefined). */
  {
    oxcclComm_t one = NULL;
    float x = 1.0f;
    int n1 = 0;
    OK(oxcclCommInitAll(&one, 1, NULL));
    OK(oxcclAllReduce(&x, &x, 1, oxcclFloat, oxcclSum, one, NULL));
    OK(oxcclCommDestroy(one));
    FAILS(oxcclInvalidArgument, oxcclCommDestroy(one));
    msg = oxcclGetLastError(NULL);
    CHECK(strstr(msg, "not a live communicator") != NULL, "double destroy: '%s'", msg);
    FAILS(oxcclInvalidArgument, oxcclCommCount(one, &n1));
    FAILS(oxcclInvalidArgument, oxcclAllReduce(&x, &x, 1, oxcclFloat, oxcclSum, one, NULL));
    OK(oxcclCommInitAll(&one, 1, NULL));
    OK(oxcclCommAbort(one));
    FAILS(oxcclInvalidArgument, oxcclCommAbort(one));
    FAILS(oxcclInvalidArgument, oxcclCommUserRank(one, &n1));
    FAILS(oxcclInvalidArgument, oxcclCommDestroy((oxcclComm_t)(void *)&x));
  }
  OK(oxcclCommDestroy(NULL));
  OK(oxcclCommAbort(NULL));

  OK(oxcclCommInitFromEnv(&comm));
  if (!comm)
    return finish("errors", -1);
  g_comm = comm;
  OK(oxcclCommUserRank(comm, &rank));
  OK(oxcclCommCount(comm, &world));
  FAILS(oxcclInvalidArgument, oxcclCommCount(NULL, &n));
  FAILS(oxcclInvalidArgument, oxcclCommCount(comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclCommUserRank(NULL, &n));
  FAILS(oxcclInvalidArgument, oxcclCommUserRank(comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclCommGetAsyncError(NULL, &async_err));
  FAILS(oxcclInvalidArgument, oxcclCommGetAsyncError(comm, NULL));

  /* Collectives: bad arguments are refused before anything is sent. */
  FAILS(oxcclInvalidArgument, oxcclAllReduce(a, b, 4, oxcclFloat, oxcclSum, NULL, NULL));
  FAILS(oxcclInvalidArgument,
        oxcclAllReduce(a, b, 4, (oxcclDataType_t)10, oxcclSum, comm, NULL));
  FAILS(oxcclInvalidArgument,
        oxcclAllReduce(a, b, 4, (oxcclDataType_t)-1, oxcclSum, comm, NULL));
  FAILS(oxcclInvalidArgument,
        oxcclAllReduce(a, b, 4, oxcclFloat, (oxcclRedOp_t)5, comm, NULL));
  FAILS(oxcclInvalidArgument,
        oxcclAllReduce(a, b, 4, oxcclFloat, (oxcclRedOp_t)-7, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclAllReduce(a, b, 4, oxcclFloat, oxcclSum, comm, stream));
  msg = oxcclGetLastError(NULL);
  CHECK(strstr(msg, "cuda") != NULL, "stream message '%s' names the cuda backend", msg);
  FAILS(oxcclInvalidArgument, oxcclAllReduce(NULL, b, 4, oxcclFloat, oxcclSum, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclAllReduce(a, NULL, 4, oxcclFloat, oxcclSum, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclAllReduce(a, a + 1, 4, oxcclFloat, oxcclSum, comm, NULL));
  FAILS(oxcclInvalidArgument,
        oxcclAllReduce(a, b, SIZE_MAX, oxcclFloat, oxcclSum, comm, NULL));
  msg = oxcclGetLastError(comm);
  CHECK(strstr(msg, "overflow") != NULL, "overflow message '%s'", msg);
  FAILS(oxcclInvalidArgument,
        oxcclAllReduce(a, b, SIZE_MAX / 2, oxcclUint8, oxcclSum, comm, NULL));
  FAILS(oxcclInvalidArgument,
        oxcclAllReduce(a, b, SIZE_MAX / 8 + 1, oxcclFloat64, oxcclSum, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclBroadcast(a, b, 4, oxcclFloat, -1, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclBroadcast(a, b, 4, oxcclFloat, world, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclBroadcast(a, b, 4, (oxcclDataType_t)77, 0, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclBroadcast(a, NULL, 4, oxcclFloat, 0, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclBroadcast(NULL, b, 4, oxcclFloat, rank, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclBroadcast(a, b, 4, oxcclFloat, 0, comm, stream));
  FAILS(oxcclInvalidArgument, oxcclReduce(a, b, 4, oxcclFloat, oxcclSum, -1, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclReduce(a, b, 4, oxcclFloat, oxcclSum, world, comm, NULL));
  FAILS(oxcclInvalidArgument,
        oxcclReduce(a, b, 4, oxcclFloat, (oxcclRedOp_t)9, 0, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclReduce(NULL, b, 4, oxcclFloat, oxcclSum, 0, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclReduce(a, NULL, 4, oxcclFloat, oxcclSum, rank, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclReduce(a, b, 4, oxcclFloat, oxcclSum, 0, NULL, NULL));
  FAILS(oxcclInvalidArgument, oxcclAllGather(a, NULL, 4, oxcclFloat, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclAllGather(NULL, b, 2, oxcclFloat, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclAllGather(a, b, 2, (oxcclDataType_t)10, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclAllGather(a, b, SIZE_MAX / 4, oxcclFloat, comm, NULL));
  FAILS(oxcclInvalidArgument, oxcclAllGather(a, b, 2, oxcclFloat, NULL, NULL));
  FAILS(oxcclInvalidArgument, oxcclAllGather(a, b, 2, oxcclFloat, comm, stream));
  FAILS(oxcclInvalidArgument,
        oxcclReduceScatter(a, b, SIZE_MAX / 4, oxcclFloat, oxcclSum, comm, NULL));
  FAILS(oxcclInvalidArgument,
        oxcclReduceScatter(a, b, 2, oxcclFloat, (oxcclRedOp_t)5, comm, NULL));
  FAILS(oxcclInvalidArgument,
        oxcclReduceScatter(NULL, b, 2, oxcclFloat, oxcclSum, comm, NULL));
  FAILS(oxcclInvalidArgument,
        oxcclReduceScatter(a, NULL, 2, oxcclFloat, oxcclSum, comm, NULL));
  FAILS(oxcclInvalidArgument,
        oxcclReduceScatter(a, b, 2, oxcclFloat, oxcclSum, NULL, NULL));
  FAILS(oxcclInvalidArgument,
        oxcclReduceScatter(a, b, 2, oxcclFloat, oxcclSum, comm, stream));

  /* Sends, receives and exchanges: bad arguments are refused before
     anything is sent, with a message naming the culprit. */
  {
    size_t cnt[64], dsp[64], rcnt[64], rdsp[64];
    float big[64 * 4];
    int p;
    for (p = 0; p < 64; p++) {
      cnt[p] = 1;
      dsp[p] = (size_t)p;
      rcnt[p] = 1;
      rdsp[p] = (size_t)p;
    }
    FAILS(oxcclInvalidArgument, oxcclSend(a, 4, oxcclFloat, 0, NULL, NULL));
    FAILS(oxcclInvalidArgument, oxcclRecv(b, 4, oxcclFloat, 0, NULL, NULL));
    FAILS(oxcclInvalidArgument, oxcclSend(NULL, 4, oxcclFloat, 0, comm, NULL));
    msg = oxcclGetLastError(NULL);
    CHECK(strstr(msg, "oxcclSend") != NULL && strstr(msg, "sendbuff is NULL") != NULL,
          "NULL send message '%s'", msg);
    FAILS(oxcclInvalidArgument, oxcclRecv(NULL, 4, oxcclFloat, 0, comm, NULL));
    msg = oxcclGetLastError(NULL);
    CHECK(strstr(msg, "recvbuff is NULL") != NULL, "NULL recv message '%s'", msg);
    FAILS(oxcclInvalidArgument, oxcclSend(a, 4, oxcclFloat, world, comm, NULL));
    msg = oxcclGetLastError(NULL);
    CHECK(strstr(msg, "peer") != NULL, "peer message '%s'", msg);
    FAILS(oxcclInvalidArgument, oxcclSend(a, 4, oxcclFloat, -1, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclRecv(b, 4, oxcclFloat, world, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclRecv(b, 4, oxcclFloat, -3, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclSend(a, (size_t)-1, oxcclFloat, 0, comm, NULL));
    msg = oxcclGetLastError(NULL);
    CHECK(strstr(msg, "overflow") != NULL, "negative count message '%s'", msg);
    FAILS(oxcclInvalidArgument, oxcclRecv(b, 4, (oxcclDataType_t)10, 0, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclSend(a, 4, oxcclFloat, 0, comm, stream));
    /* A send to itself without the receive in the same group. */
    FAILS(oxcclInvalidArgument, oxcclSend(a, 4, oxcclFloat, rank, comm, NULL));
    /* In a group: refused at once, and the group still closes. */
    OK(oxcclGroupStart());
    FAILS(oxcclInvalidArgument, oxcclSend(a, 4, oxcclFloat, world + 5, comm, NULL));
    OK(oxcclRecv(b, 4, oxcclFloat, rank, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclRecv(b + 2, 4, oxcclFloat, rank, comm, NULL));
    msg = oxcclGetLastError(NULL);
    CHECK(strstr(msg, "overlaps") != NULL, "overlapping receives '%s'", msg);
    OK(oxcclSend(a, 4, oxcclFloat, rank, comm, NULL));
    OK(oxcclGroupEnd());

    FAILS(oxcclInvalidArgument, oxcclAllToAll(big, big + 128, 4, oxcclFloat, NULL, NULL));
    FAILS(oxcclInvalidArgument, oxcclAllToAll(NULL, big + 128, 4, oxcclFloat, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclAllToAll(big, NULL, 4, oxcclFloat, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclAllToAll(big, big, 4, oxcclFloat, comm, NULL));
    msg = oxcclGetLastError(NULL);
    CHECK(strstr(msg, "in place") != NULL, "in-place alltoall '%s'", msg);
    FAILS(oxcclInvalidArgument, oxcclAllToAll(big, big + 128, SIZE_MAX / 2, oxcclFloat, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclAllToAll(big, big + 128, 4, (oxcclDataType_t)-1, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclAllToAll(big, big + 128, 4, oxcclFloat, comm, stream));

    FAILS(oxcclInvalidArgument,
          oxcclAllToAllv(big, cnt, dsp, big + 128, rcnt, rdsp, oxcclFloat, NULL, NULL));
    FAILS(oxcclInvalidArgument,
          oxcclAllToAllv(big, NULL, dsp, big + 128, rcnt, rdsp, oxcclFloat, comm, NULL));
    msg = oxcclGetLastError(NULL);
    CHECK(strstr(msg, "sendcounts is NULL") != NULL, "NULL sendcounts '%s'", msg);
    FAILS(oxcclInvalidArgument,
          oxcclAllToAllv(big, cnt, NULL, big + 128, rcnt, rdsp, oxcclFloat, comm, NULL));
    FAILS(oxcclInvalidArgument,
          oxcclAllToAllv(big, cnt, dsp, big + 128, NULL, rdsp, oxcclFloat, comm, NULL));
    FAILS(oxcclInvalidArgument,
          oxcclAllToAllv(big, cnt, dsp, big + 128, rcnt, NULL, oxcclFloat, comm, NULL));
    msg = oxcclGetLastError(NULL);
    CHECK(strstr(msg, "rdispls is NULL") != NULL, "NULL rdispls '%s'", msg);
    FAILS(oxcclInvalidArgument,
          oxcclAllToAllv(NULL, cnt, dsp, big + 128, rcnt, rdsp, oxcclFloat, comm, NULL));
    FAILS(oxcclInvalidArgument,
          oxcclAllToAllv(big, cnt, dsp, NULL, rcnt, rdsp, oxcclFloat, comm, NULL));
    /* Overlapping receive displacements (rank 0's and rank 1's blocks). */
    rcnt[0] = 2;
    cnt[0] = 2;
    FAILS(oxcclInvalidArgument,
          oxcclAllToAllv(big, cnt, dsp, big + 128, rcnt, rdsp, oxcclFloat, comm, NULL));
    msg = oxcclGetLastError(NULL);
    CHECK(strstr(msg, "overlap") != NULL, "overlapping rdispls '%s'", msg);
    rcnt[0] = 1;
    cnt[0] = 1;
    /* A negative displacement or count (as size_t) overruns the address space. */
    dsp[1] = (size_t)-1;
    FAILS(oxcclInvalidArgument,
          oxcclAllToAllv(big, cnt, dsp, big + 128, rcnt, rdsp, oxcclFloat, comm, NULL));
    msg = oxcclGetLastError(NULL);
    CHECK(strstr(msg, "sdispls") != NULL, "negative sdispls '%s'", msg);
    dsp[1] = 1;
    rcnt[1] = (size_t)-2;
    FAILS(oxcclInvalidArgument,
          oxcclAllToAllv(big, cnt, dsp, big + 128, rcnt, rdsp, oxcclFloat, comm, NULL));
    rcnt[1] = 1;
    /* Its block to itself has two counts. */
    rcnt[rank] = 0;
    FAILS(oxcclInvalidArgument,
          oxcclAllToAllv(big, cnt, dsp, big + 128, rcnt, rdsp, oxcclFloat, comm, NULL));
    rcnt[rank] = 1;
    /* The buffers overlap. */
    FAILS(oxcclInvalidArgument,
          oxcclAllToAllv(big, cnt, dsp, big + 1, rcnt, rdsp, oxcclFloat, comm, NULL));

    FAILS(oxcclInvalidArgument, oxcclGather(a, b, 1, oxcclFloat, world, comm, NULL));
    msg = oxcclGetLastError(NULL);
    CHECK(strstr(msg, "root") != NULL, "gather root message '%s'", msg);
    FAILS(oxcclInvalidArgument, oxcclGather(a, b, 1, oxcclFloat, -1, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclGather(NULL, b, 1, oxcclFloat, 0, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclGather(a, NULL, 1, oxcclFloat, rank, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclGather(a, b, 1, oxcclFloat, 0, NULL, NULL));
    FAILS(oxcclInvalidArgument, oxcclGather(big, big, 4, oxcclFloat, rank, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclScatter(a, b, 1, oxcclFloat, world, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclScatter(a, b, 1, oxcclFloat, -7, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclScatter(a, NULL, 1, oxcclFloat, 0, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclScatter(NULL, b, 1, oxcclFloat, rank, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclScatter(a, b, SIZE_MAX / 4, oxcclFloat, 0, comm, NULL));
    FAILS(oxcclInvalidArgument, oxcclScatter(a, b, 1, oxcclFloat, 0, comm, stream));
  }

  /* Counts that disagree between sender and receiver fail on both ranks,
     naming both; on a communicator split off for it (a failure poisons). */
  if (world > 1) {
    oxcclComm_t sub = NULL;
    OK(oxcclCommSplit(comm, 0, 0, &sub, NULL));
    /* The rank that finds the mismatch fails with oxcclInvalidUsage, the
       other learns it from that rank (oxcclRemoteError). */
    if (sub && rank < 2) {
      oxcclResult_t r = rank == 0 ? oxcclSend(a, 4, oxcclFloat, 1, sub, NULL)
                                  : oxcclRecv(b, 6, oxcclFloat, 0, sub, NULL);
      CHECK(r == oxcclInvalidUsage || r == oxcclRemoteError,
            "disagreeing counts returned %d", (int)r);
    }
    if (rank < 2) {
      msg = oxcclGetLastError(NULL);
      printf("rank %d's message on counts that disagree: %s\n", rank, msg);
      CHECK(strstr(msg, "4 elements") != NULL && strstr(msg, "6 elements") != NULL,
            "disagreeing counts '%s' name both", msg);
    }
    OK(oxcclCommDestroy(sub));
  }

  /* The same for an alltoallv, between ranks 0 and 1 split off: rank 0
     sends rank 1 three elements, rank 1 expects four. */
  if (world > 1) {
    oxcclComm_t pair = NULL;
    OK(oxcclCommSplit(comm, rank < 2 ? 0 : OXCCL_SPLIT_NOCOLOR, 0, &pair, NULL));
    if (rank < 2 && pair) {
      static const size_t sc[2][2] = {{1, 3}, {4, 1}}, rc[2][2] = {{1, 4}, {4, 1}};
      static const size_t sd[2] = {0, 4}, rd[2] = {0, 8};
      float in[16] = {0}, out[16];
      oxcclResult_t r = oxcclAllToAllv(in, sc[rank], sd, out, rc[rank], rd, oxcclFloat, pair, NULL);
      msg = oxcclGetLastError(NULL);
      printf("rank %d's message on alltoallv counts that disagree: %s\n", rank, msg);
      CHECK(r == oxcclInvalidUsage || r == oxcclRemoteError,
            "alltoallv counts that disagree returned %d", (int)r);
      CHECK(strstr(msg, "oxcclAllToAllv") != NULL && strstr(msg, "mismatch") != NULL &&
                strstr(msg, "rank 0") != NULL && strstr(msg, "rank 1") != NULL,
            "alltoallv mismatch '%s' names both ranks", msg);
    } else {
      CHECK(pair == NULL, "rank %d without a color got a communicator", rank);
    }
    OK(oxcclCommDestroy(pair));
  }

  /* ...and leave the communicator usable. */
  OK(oxcclCommGetAsyncError(comm, &async_err));
  CHECK(async_err == oxcclSuccess, "async error %d after bad arguments", (int)async_err);
  for (i = 0; i < 16; i++)
    a[i] = (float)(rank + 1);
  OK(oxcclAllReduce(a, a, 16, oxcclFloat, oxcclSum, comm, NULL));
  CHECK(a[15] == (float)(world * (world + 1) / 2), "sum %g", a[15]);

  /* The last rank exits without a word; the others learn of it. */
  if (world > 1 && rank == world - 1)
    return finish("errors (exiting early)", rank);
  if (world > 1) {
    FAILS(oxcclRemoteError, oxcclAllReduce(a, b, 16, oxcclFloat, oxcclSum, comm, NULL));
    msg = oxcclGetLastError(NULL);
    printf("survivor's message: %s\n", msg);
    CHECK(strstr(msg, "failed") != NULL && strstr(msg, "rank") != NULL,
          "remote message '%s' names the failed rank", msg);
    OK(oxcclCommGetAsyncError(comm, &async_err));
    CHECK(async_err == oxcclRemoteError, "async error %d", (int)async_err);
    /* Poisoned: later calls fail at once, with the original cause's code. */
    FAILS(oxcclRemoteError, oxcclBroadcast(a, a, 16, oxcclFloat, 0, comm, NULL));
  }
  OK(oxcclCommDestroy(comm));
  g_comm = NULL;
  return finish("errors", rank);
}
