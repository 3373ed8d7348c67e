/* One process: oxcclCommInitAll driven by one pthread per rank, the group
 * API driving every communicator from one thread (collectives and
 * oxcclCommInitRank), unique ids used from threads, per-thread last errors,
 * a timeout (oxcclTimeout, then oxcclRemoteError for the rank that comes
 * late), oxcclCommAbort of a call in progress on another thread,
 * oxcclCommSplit from one thread per rank, oxcclCommShrink after a rank
 * gives up, and sends and receives: a group
 * from one thread in an order that would deadlock if run as posted, a send
 * that no receive meets (oxcclTimeout naming the peer and the call), and
 * counts that disagree (an error on both ranks, naming both). */
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

/* Rank 2 of 4 gives up (aborts); the others' allreduce fails, they
 * shrink to 3 ranks in the old order and go on. */
static void *shrink_thread(void *p) {
  struct rank_args *a = p;
  oxcclComm_t sub = NULL;
  int r = -1, n = -1;
  int32_t v = 1;
  oxcclResult_t res;
  if (a->rank == 2) {
    TOK(oxcclCommAbort(a->comm));
    return NULL;
  }
  /* Not inside TCHECK, which holds the test's lock. */
  res = oxcclAllReduce(&v, &v, 1, oxcclInt32, oxcclSum, a->comm, NULL);
  TCHECK(res != oxcclSuccess, "rank %d: an allreduce without rank 2 succeeded",
         a->rank);
  TOK(oxcclCommShrink(a->comm, NULL, 0, &sub, NULL, 0));
  if (sub == NULL) {
    TCHECK(0, "rank %d got no communicator", a->rank);
    return NULL;
  }
  TOK(oxcclCommUserRank(sub, &r));
  TOK(oxcclCommCount(sub, &n));
  TCHECK(n == 3 && r == (a->rank == 3 ? 2 : a->rank), "rank %d: rank %d of %d",
         a->rank, r, n);
  v = a->rank;
  TOK(oxcclAllReduce(&v, &v, 1, oxcclInt32, oxcclSum, sub, NULL));
  TCHECK(v == 0 + 1 + 3, "rank %d: sum over the survivors %d", a->rank, v);
  TOK(oxcclCommDestroy(sub));
  return NULL;
}

struct p2p_args {
  oxcclComm_t comm;
  int rank;
  oxcclResult_t result;
  char message[512];
};

/* Rank 0 sends 10 floats to rank 1, which receives 12 from rank 0. */
static void *disagree_thread(void *p) {
  struct p2p_args *a = p;
  float buf[12] = {0};
  a->result = a->rank == 0 ? oxcclSend(buf, 10, oxcclFloat, 1, a->comm, NULL)
                           : oxcclRecv(buf, 12, oxcclFloat, 0, a->comm, NULL);
  snprintf(a->message, sizeof a->message, "%s", oxcclGetLastError(NULL));
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
  /* 7b. oxcclCommShrink after rank 2 gives up; bad arguments refused. */
  {
    oxcclComm_t sc[N];
    oxcclComm_t sub = NULL;
    int bad[1] = {-1};
    OK(oxcclCommInitAll(sc, N, NULL));
    FAILS(oxcclInvalidArgument, oxcclCommShrink(sc[0], NULL, 1, &sub, NULL, 0));
    FAILS(oxcclInvalidArgument, oxcclCommShrink(sc[0], bad, 1, &sub, NULL, 0));
    FAILS(oxcclInvalidArgument, oxcclCommShrink(sc[0], NULL, -1, &sub, NULL, 0));
    FAILS(oxcclInvalidArgument, oxcclCommShrink(sc[0], NULL, 0, NULL, NULL, 0));
    FAILS(oxcclInvalidArgument, oxcclCommShrink(sc[0], NULL, 0, &sub, NULL, 1));
    for (i = 0; i < N; i++) {
      args[i].comm = sc[i];
      args[i].rank = i;
      pthread_create(&th[i], NULL, shrink_thread, &args[i]);
    }
    for (i = 0; i < N; i++)
      pthread_join(th[i], NULL);
    for (i = 0; i < N; i++)
      if (i != 2) /* rank 2's handle went with oxcclCommAbort */
        OK(oxcclCommDestroy(sc[i]));
  }

  /* 8. Sends and receives of 4 ranks from one thread, in a group, posted
     in an order that deadlocks if run as posted: rank 0 sends to 1 then 3,
     rank 2 to 3 then 1, rank 1 receives from 2 then 0, rank 3 from 0 then 2. */
  {
    oxcclComm_t pc[N];
    static float s[4][COUNT], r[4][2][COUNT];
    float x = 0.0f;
    OK(oxcclCommInitAll(pc, N, NULL));
    for (i = 0; i < 4; i++)
      for (j = 0; j < COUNT; j++) {
        s[i][j] = (float)(i * 10000 + j);
        r[i][0][j] = r[i][1][j] = -1.0f;
      }
    OK(oxcclGroupStart());
    OK(oxcclSend(s[0], COUNT, oxcclFloat, 1, pc[0], NULL));
    OK(oxcclRecv(r[1][0], COUNT, oxcclFloat, 2, pc[1], NULL));
    OK(oxcclSend(s[0], COUNT, oxcclFloat, 3, pc[0], NULL));
    OK(oxcclRecv(r[3][0], COUNT, oxcclFloat, 0, pc[3], NULL));
    OK(oxcclSend(s[2], COUNT, oxcclFloat, 3, pc[2], NULL));
    OK(oxcclRecv(r[1][1], COUNT, oxcclFloat, 0, pc[1], NULL));
    OK(oxcclSend(s[2], COUNT, oxcclFloat, 1, pc[2], NULL));
    OK(oxcclRecv(r[3][1], COUNT, oxcclFloat, 2, pc[3], NULL));
    /* A receive into memory queued already is refused at once. */
    FAILS(oxcclInvalidArgument, oxcclRecv(r[1][1] + 5, 3, oxcclFloat, 3, pc[1], NULL));
    CHECK(r[1][0][0] == -1.0f, "a queued receive ran before oxcclGroupEnd");
    FAILS(oxcclInvalidUsage, oxcclCommDestroy(pc[2]));
    OK(oxcclGroupEnd());
    for (j = 0; j < COUNT; j++) {
      CHECK(r[1][0][j] == s[2][j] && r[1][1][j] == s[0][j], "rank 1 got %g %g at %d",
            r[1][0][j], r[1][1][j], j);
      CHECK(r[3][0][j] == s[0][j] && r[3][1][j] == s[2][j], "rank 3 got %g %g at %d",
            r[3][0][j], r[3][1][j], j);
      if (g_failed)
        break;
    }
    /* A send to itself with its receive, outside any group of other ranks. */
    OK(oxcclGroupStart());
    OK(oxcclSend(s[0], 1, oxcclFloat, 0, pc[0], NULL));
    OK(oxcclRecv(&x, 1, oxcclFloat, 0, pc[0], NULL));
    OK(oxcclGroupEnd());
    CHECK(x == s[0][0], "message to itself %g", x);
    for (i = 0; i < N; i++)
      OK(oxcclCommDestroy(pc[i]));
  }

  /* 9. A send that no receive meets times out naming the peer and the
     call; counts that disagree fail on both ranks, naming both. */
  {
    oxcclComm_t tc[2];
    struct p2p_args pa[2];
    float buf[10] = {0};
    oxcclResult_t ae = oxcclSuccess;
    double t0;
    setenv("OXCCL_TIMEOUT", "1", 1);
    OK(oxcclCommInitAll(tc, 2, NULL));
    unsetenv("OXCCL_TIMEOUT");
    t0 = now();
    FAILS(oxcclTimeout, oxcclSend(buf, 10, oxcclFloat, 1, tc[0], NULL));
    msg = oxcclGetLastError(NULL);
    printf("unmatched send: %s\n", msg);
    CHECK(strstr(msg, "oxcclSend") != NULL && strstr(msg, "send to rank 1") != NULL,
          "timeout message '%s' names the call and the peer", msg);
    CHECK(now() - t0 < 30.0, "send timeout took %.1f s", now() - t0);
    OK(oxcclCommGetAsyncError(tc[0], &ae));
    CHECK(ae == oxcclTimeout, "async error %d", (int)ae);
    OK(oxcclCommDestroy(tc[0]));
    OK(oxcclCommDestroy(tc[1]));

    OK(oxcclCommInitAll(tc, 2, NULL));
    for (i = 0; i < 2; i++) {
      pa[i].comm = tc[i];
      pa[i].rank = i;
      pa[i].result = oxcclSuccess;
      pa[i].message[0] = '\0';
      pthread_create(&th[i], NULL, disagree_thread, &pa[i]);
    }
    for (i = 0; i < 2; i++)
      pthread_join(th[i], NULL);
    for (i = 0; i < 2; i++) {
      printf("rank %d on counts that disagree: %s\n", i, pa[i].message);
      CHECK(pa[i].result == oxcclInvalidUsage || pa[i].result == oxcclRemoteError,
            "rank %d: counts that disagree returned %d", i, (int)pa[i].result);
      CHECK(strstr(pa[i].message, "10 elements") != NULL &&
                strstr(pa[i].message, "12 elements") != NULL,
            "rank %d: '%s' names both counts", i, pa[i].message);
    }
    OK(oxcclCommDestroy(tc[0]));
    OK(oxcclCommDestroy(tc[1]));
  }
  return finish("threads", 0);
}
