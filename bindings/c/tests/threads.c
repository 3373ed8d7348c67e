/* One process: oxcclCommInitAll driven by one pthread per rank, the group
 * API driving every communicator from one thread (collectives and
 * oxcclCommInitRank), unique ids used from threads, per-thread last errors,
 * a timeout (oxcclTimeout, then oxcclRemoteError for the rank that comes
 * late), oxcclCommAbort of a call in progress on another thread, and
 * oxcclCommSplit from one thread per rank. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <time.h>

#include "common.h"

#define N 4
#define COUNT 1000

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_barrier_t g_barrier;

/* CHECK from several threads: serialize the counters. */
#define TCHECK(cond, ...)                                                      \
  do {                                                                         \
    pthread_mutex_lock(&g_lock);                                               \
    CHECK(cond, __VA_ARGS__);                                                  \
    pthread_mutex_unlock(&g_lock);                                             \
  } while (0)
#define TOK(call)                                                              \
  do {                                                                         \
    oxcclResult_t tok_r_ = (call);                                             \
    TCHECK(tok_r_ == oxcclSuccess, "%s returned %d: %s", #call, (int)tok_r_,   \
           oxcclGetLastError(NULL));                                           \
  } while (0)

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms) {
  struct timespec ts;
  ts.tv_sec = ms / 1000;
  ts.tv_nsec = (ms % 1000) * 1000000L;
  nanosleep(&ts, NULL);
}

struct rank_args {
  oxcclComm_t comm;
  int rank;
  oxcclUniqueId id; /* for init_rank_thread */
};

/* One rank of an oxcclCommInitAll group, on its own thread. */
static void *rank_thread(void *p) {
  struct rank_args *a = p;
  int r = -1, n = 0;
  size_t i;
  char expect[64];
  const char *msg;
  float *send = malloc(sizeof(float) * COUNT * N);
  float *recv = malloc(sizeof(float) * COUNT * N);
  if (!send || !recv) {
    TCHECK(0, "out of memory");
    free(send);
    free(recv);
    return NULL;
  }
  TOK(oxcclCommUserRank(a->comm, &r));
  TOK(oxcclCommCount(a->comm, &n));
  TCHECK(r == a->rank && n == N, "rank %d count %d", r, n);

  for (i = 0; i < COUNT; i++)
    send[i] = (float)(a->rank + 1);
  TOK(oxcclAllReduce(send, recv, COUNT, oxcclFloat32, oxcclSum, a->comm, NULL));
  TCHECK(recv[0] == 10.0f && recv[COUNT - 1] == 10.0f, "sum %g", recv[0]);

  TOK(oxcclBroadcast(send, recv, COUNT, oxcclFloat, 2, a->comm, NULL));
  TCHECK(recv[7] == 3.0f, "broadcast %g", recv[7]);

  TOK(oxcclAllGather(send, recv, COUNT, oxcclFloat, a->comm, NULL));
  for (i = 0; i < N; i++)
    TCHECK(recv[i * COUNT + 5] == (float)(i + 1), "allgather block %zu", i);

  for (i = 0; i < COUNT * N; i++)
    send[i] = (float)(i / COUNT) * (float)(a->rank + 1);
  TOK(oxcclReduceScatter(send, recv, COUNT, oxcclFloat, oxcclMax, a->comm, NULL));
  TCHECK(recv[3] == (float)(a->rank * N), "reduce_scatter %g", recv[3]);

  /* The last error is per thread: each thread fails with its own dtype. */
  oxcclAllReduce(send, recv, 1, (oxcclDataType_t)(100 + a->rank), oxcclSum,
                 a->comm, NULL);
  pthread_barrier_wait(&g_barrier);
  snprintf(expect, sizeof expect, "datatype %d", 100 + a->rank);
  msg = oxcclGetLastError(a->comm);
  TCHECK(strstr(msg, expect) != NULL, "thread %d's last error is '%s'", a->rank,
         msg);
  pthread_barrier_wait(&g_barrier);

  /* Reduce to every root in turn. */
  for (i = 0; i < N; i++) {
    send[0] = (float)a->rank;
    recv[0] = -1.0f;
    TOK(oxcclReduce(send, recv, 1, oxcclFloat, oxcclMin, (int)i, a->comm, NULL));
    TCHECK(recv[0] == ((int)i == a->rank ? 0.0f : -1.0f), "reduce root %zu: %g",
           i, recv[0]);
  }
  free(send);
  free(recv);
  return NULL;
}

static void *init_rank_thread(void *p) {
  struct rank_args *a = p;
  int32_t v[3];
  TOK(oxcclCommInitRank(&a->comm, 3, a->id, a->rank));
  if (!a->comm)
    return NULL;
  v[0] = a->rank;
  v[1] = 1;
  v[2] = -a->rank;
  TOK(oxcclAllReduce(v, v, 3, oxcclInt32, oxcclSum, a->comm, NULL));
  TCHECK(v[0] == 3 && v[1] == 3 && v[2] == -3, "init-rank sum %d %d %d", v[0],
         v[1], v[2]);
  return NULL;
}

struct abort_args {
  oxcclComm_t comm;
  volatile int started;
  oxcclResult_t result;
};

static void *abort_victim(void *p) {
  struct abort_args *a = p;
  float x = 1.0f;
  a->started = 1;
  a->result = oxcclAllReduce(&x, &x, 1, oxcclFloat, oxcclSum, a->comm, NULL);
  return NULL;
}

/* One rank of a split: ranks 0 and 2 form one communicator in reverse
 * order (key -rank), rank 1 one alone, rank 3 none (OXCCL_SPLIT_NOCOLOR). */
static void *split_thread(void *p) {
  struct rank_args *a = p;
  static const int colors[N] = {0, 1, 0, OXCCL_SPLIT_NOCOLOR};
  oxcclComm_t sub = (oxcclComm_t)1;
  int r = -1, n = -1;
  int32_t v;
  TOK(oxcclCommSplit(a->comm, colors[a->rank], -a->rank, &sub, NULL));
  if (a->rank == 3) {
    TCHECK(sub == NULL, "rank 3 without a color got a communicator");
    return NULL;
  }
  if (sub == NULL || sub == (oxcclComm_t)1) {
    TCHECK(0, "rank %d got no communicator", a->rank);
    return NULL;
  }
  TOK(oxcclCommUserRank(sub, &r));
  TOK(oxcclCommCount(sub, &n));
  TCHECK(n == (a->rank == 1 ? 1 : 2), "rank %d: split world %d", a->rank, n);
  TCHECK(r == (a->rank == 0 ? 1 : 0), "rank %d: split rank %d", a->rank, r);
  v = a->rank;
  TOK(oxcclAllReduce(&v, &v, 1, oxcclInt32, oxcclSum, sub, NULL));
  TCHECK(v == (a->rank == 1 ? 1 : 2), "rank %d: split sum %d", a->rank, v);
  TOK(oxcclCommDestroy(sub));
  return NULL;
}

int main(void) {
  oxcclComm_t comms[N];
  struct rank_args args[N];
  pthread_t th[N];
  int devs[N] = {0, 1, 2, 3};
  int i, j;
  const char *msg;

  /* 1. InitAll, one thread per rank. */
  memset(comms, 0, sizeof comms);
  OK(oxcclCommInitAll(comms, N, devs));
  pthread_barrier_init(&g_barrier, NULL, N);
  for (i = 0; i < N; i++) {
    args[i].comm = comms[i];
    args[i].rank = i;
    pthread_create(&th[i], NULL, rank_thread, &args[i]);
  }
  for (i = 0; i < N; i++)
    pthread_join(th[i], NULL);
  pthread_barrier_destroy(&g_barrier);
  msg = oxcclGetLastError(NULL);
  CHECK(strstr(msg, "datatype 10") == NULL, "main thread got a worker's error: %s", msg);

  /* 2. The group API: one thread drives all ranks; nested groups. */
  {
    int32_t bufs[N][COUNT];
    double gath[N][N * 8];
    double mine[N][8];
    int64_t rs[N][N * 5];
    for (i = 0; i < N; i++) {
      for (j = 0; j < COUNT; j++)
        bufs[i][j] = i * j;
      for (j = 0; j < 8; j++)
        mine[i][j] = 10.0 * i + j;
      for (j = 0; j < N * 5; j++)
        rs[i][j] = j + i;
    }
    OK(oxcclGroupStart());
    for (i = 0; i < N; i++) {
      OK(oxcclAllReduce(bufs[i], bufs[i], COUNT, oxcclInt32, oxcclSum, comms[i], NULL));
      OK(oxcclGroupStart());
      OK(oxcclAllGather(mine[i], gath[i], 8, oxcclFloat64, comms[i], NULL));
      OK(oxcclGroupEnd());
      /* in place reduce-scatter: recvbuff = sendbuff + rank * recvcount */
      OK(oxcclReduceScatter(rs[i], rs[i] + i * 5, 5, oxcclInt64, oxcclProd, comms[i], NULL));
    }
    /* Nothing has run yet. */
    CHECK(bufs[1][1] == 1, "a queued call ran before oxcclGroupEnd");
    FAILS(oxcclInvalidUsage, oxcclCommDestroy(comms[0]));
    OK(oxcclGroupEnd());
    for (i = 0; i < N; i++) {
      CHECK(bufs[i][COUNT - 1] == 6 * (COUNT - 1), "group sum %d", bufs[i][COUNT - 1]);
      for (j = 0; j < N * 8; j++)
        CHECK(gath[i][j] == 10.0 * (j / 8) + j % 8, "group allgather %g", gath[i][j]);
      for (j = 0; j < 5; j++) {
        int64_t k = i * 5 + j, want = k * (k + 1) * (k + 2) * (k + 3);
        CHECK(rs[i][i * 5 + j] == want, "group reduce-scatter %lld != %lld",
              (long long)rs[i][i * 5 + j], (long long)want);
      }
    }
    /* A failing call in a group: refused at once, the group still runs. */
    OK(oxcclGroupStart());
    FAILS(oxcclInvalidArgument,
          oxcclAllReduce(bufs[0], bufs[0], 1, oxcclInt32, (oxcclRedOp_t)12, comms[0], NULL));
    for (i = 0; i < N; i++)
      OK(oxcclBroadcast(bufs[i], bufs[i], COUNT, oxcclInt32, 3, comms[i], NULL));
    OK(oxcclGroupEnd());
    CHECK(bufs[0][2] == 12, "group broadcast %d", bufs[0][2]);
  }
  for (i = 0; i < N; i++)
    OK(oxcclCommDestroy(comms[i]));

  /* 3. Unique id, oxcclCommInitRank from threads. */
  {
    struct rank_args ia[3];
    oxcclUniqueId id;
    OK(oxcclGetUniqueId(&id));
    for (i = 0; i < 3; i++) {
      ia[i].comm = NULL;
      ia[i].rank = i;
      ia[i].id = id;
      pthread_create(&th[i], NULL, init_rank_thread, &ia[i]);
    }
    for (i = 0; i < 3; i++)
      pthread_join(th[i], NULL);
    for (i = 0; i < 3; i++)
      OK(oxcclCommDestroy(ia[i].comm));
  }

  /* 4. oxcclCommInitRank of every rank from one thread, in a group. */
  {
    oxcclComm_t gc[3] = {NULL, NULL, NULL};
    oxcclUniqueId id;
    uint8_t v[3][4];
    OK(oxcclGetUniqueId(&id));
    OK(oxcclGroupStart());
    for (i = 0; i < 3; i++)
      OK(oxcclCommInitRank(&gc[i], 3, id, i));
    CHECK(gc[0] == NULL, "handle written before oxcclGroupEnd");
    OK(oxcclGroupEnd());
    CHECK(gc[0] && gc[1] && gc[2], "handles not written");
    if (gc[0] && gc[1] && gc[2]) {
      OK(oxcclGroupStart());
      for (i = 0; i < 3; i++) {
        for (j = 0; j < 4; j++)
          v[i][j] = (uint8_t)(i + j);
        OK(oxcclAllReduce(v[i], v[i], 4, oxcclUint8, oxcclMax, gc[i], NULL));
      }
      OK(oxcclGroupEnd());
      for (i = 0; i < 3; i++)
        CHECK(v[i][0] == 2 && v[i][3] == 5, "group init max %d %d", v[i][0], v[i][3]);
    }
    for (i = 0; i < 3; i++)
      OK(oxcclCommDestroy(gc[i]));
  }

  /* 5. A deadline: rank 0 alone times out; rank 1, late, learns of it. */
  {
    oxcclComm_t tc[2];
    float x = 1.0f;
    oxcclResult_t ae = oxcclSuccess;
    double t0;
    setenv("OXCCL_TIMEOUT", "1", 1);
    OK(oxcclCommInitAll(tc, 2, NULL));
    unsetenv("OXCCL_TIMEOUT");
    t0 = now();
    FAILS(oxcclTimeout, oxcclAllReduce(&x, &x, 1, oxcclFloat, oxcclSum, tc[0], NULL));
    msg = oxcclGetLastError(NULL);
    CHECK(strstr(msg, "OXCCL_TIMEOUT") != NULL, "timeout message '%s'", msg);
    CHECK(now() - t0 < 30.0, "timeout took %.1f s", now() - t0);
    OK(oxcclCommGetAsyncError(tc[0], &ae));
    CHECK(ae == oxcclTimeout, "async error %d", (int)ae);
    FAILS(oxcclTimeout, oxcclAllReduce(&x, &x, 1, oxcclFloat, oxcclSum, tc[0], NULL));
    FAILS(oxcclRemoteError, oxcclAllReduce(&x, &x, 1, oxcclFloat, oxcclSum, tc[1], NULL));
    msg = oxcclGetLastError(NULL);
    CHECK(strstr(msg, "rank 0") != NULL, "remote message '%s' names rank 0", msg);
    OK(oxcclCommGetAsyncError(tc[1], &ae));
    CHECK(ae == oxcclRemoteError, "async error %d", (int)ae);
    OK(oxcclCommDestroy(tc[0]));
    OK(oxcclCommDestroy(tc[1]));
  }

  /* 6. oxcclCommAbort of a call in progress on another thread. */
  {
    oxcclComm_t ac[2];
    struct abort_args aa;
    pthread_t t;
    double t0;
    OK(oxcclCommInitAll(ac, 2, NULL));
    aa.comm = ac[0];
    aa.started = 0;
    aa.result = oxcclSuccess;
    t0 = now();
    pthread_create(&t, NULL, abort_victim, &aa);
    while (!aa.started)
      sleep_ms(1);
    sleep_ms(300);
    OK(oxcclCommAbort(ac[0]));
    pthread_join(t, NULL);
    CHECK(aa.result == oxcclInvalidUsage, "aborted call returned %d", (int)aa.result);
    CHECK(now() - t0 < 30.0, "abort took %.1f s", now() - t0);
    OK(oxcclCommDestroy(ac[1]));
  }
  /* 7. oxcclCommSplit, one thread per rank; bad arguments refused. */
  {
    oxcclComm_t sc[N];
    oxcclComm_t sub = NULL;
    int dummy = 0;
    OK(oxcclCommInitAll(sc, N, NULL));
    FAILS(oxcclInvalidArgument, oxcclCommSplit(sc[0], -2, 0, &sub, NULL));
    FAILS(oxcclInvalidArgument, oxcclCommSplit(sc[0], 0, 0, NULL, NULL));
    FAILS(oxcclInvalidArgument, oxcclCommSplit(sc[0], 0, 0, &sub, &dummy));
    OK(oxcclGroupStart());
    FAILS(oxcclInvalidUsage, oxcclCommSplit(sc[0], 0, 0, &sub, NULL));
    OK(oxcclGroupEnd());
    for (i = 0; i < N; i++) {
      args[i].comm = sc[i];
      args[i].rank = i;
      pthread_create(&th[i], NULL, split_thread, &args[i]);
    }
    for (i = 0; i < N; i++)
      pthread_join(th[i], NULL);
    for (i = 0; i < N; i++)
      OK(oxcclCommDestroy(sc[i]));
  }
  return finish("threads", 0);
}
