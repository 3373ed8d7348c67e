/* Leaks: communicators created and destroyed many times in one process
 * (oxcclCommInitAll, one allreduce through the group API, oxcclCommDestroy;
 * and 4 ranks whose grouped alltoall and sends and receives make links
 * beyond the ring) leave no file descriptors and no threads behind.
 * OXCCL_LEAK_CYCLES cycles (100 by default; the long run in the README
 * uses 1000). */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <time.h>

#include "common.h"

#define N 3
#define COUNT 4096

/* Entries of a /proc directory, not counting . and .. (nor, for
 * /proc/self/fd, the descriptor of the listing itself). */
static int entries(const char *path, int own_fd) {
  DIR *d = opendir(path);
  struct dirent *e;
  int n = 0;
  if (!d)
    return -1;
  while ((e = readdir(d)) != NULL)
    if (e->d_name[0] != '.')
      n++;
  closedir(d);
  return own_fd ? n - 1 : n;
}

static void cycle(void) {
  oxcclComm_t comms[N];
  int devs[N] = {0, 1, 2};
  static float bufs[N][COUNT];
  int i, j;
  memset(comms, 0, sizeof comms);
  OK(oxcclCommInitAll(comms, N, devs));
  for (i = 0; i < N; i++)
    for (j = 0; j < COUNT; j++)
      bufs[i][j] = (float)(i + 1);
  OK(oxcclGroupStart());
  for (i = 0; i < N; i++)
    OK(oxcclAllReduce(bufs[i], bufs[i], COUNT, oxcclFloat, oxcclSum, comms[i], NULL));
  OK(oxcclGroupEnd());
  for (i = 0; i < N; i++) {
    CHECK(bufs[i][0] == 6.0f && bufs[i][COUNT - 1] == 6.0f, "sum %g", bufs[i][0]);
    OK(oxcclCommDestroy(comms[i]));
  }
}

/* 4 ranks: rank r sends to r + 2 (not a neighbour on the ring), then an
 * alltoall, all from one thread in groups. */
static void cycle_p2p(void) {
  oxcclComm_t comms[4];
  static int32_t in[4][4 * 8], out[4][4 * 8], msg[4][8];
  int i, j;
  memset(comms, 0, sizeof comms);
  OK(oxcclCommInitAll(comms, 4, NULL));
  for (i = 0; i < 4; i++)
    for (j = 0; j < 4 * 8; j++)
      in[i][j] = i * 100 + j;
  OK(oxcclGroupStart());
  for (i = 0; i < 4; i++) {
    OK(oxcclRecv(msg[i], 8, oxcclInt32, (i + 2) % 4, comms[i], NULL));
    OK(oxcclSend(in[i], 8, oxcclInt32, (i + 2) % 4, comms[i], NULL));
  }
  OK(oxcclGroupEnd());
  OK(oxcclGroupStart());
  for (i = 0; i < 4; i++)
    OK(oxcclAllToAll(in[i], out[i], 8, oxcclInt32, comms[i], NULL));
  OK(oxcclGroupEnd());
  for (i = 0; i < 4; i++) {
    CHECK(msg[i][3] == ((i + 2) % 4) * 100 + 3, "message %d", msg[i][3]);
    CHECK(out[i][3 * 8 + 1] == 3 * 100 + i * 8 + 1, "alltoall %d", out[i][3 * 8 + 1]);
    OK(oxcclCommDestroy(comms[i]));
  }
}

/* Waits up to 10 s for the counts to come back to the base (threads end
 * shortly after their communicator). */
static void settle(int base_fds, int base_threads, int *fds, int *threads) {
  struct timespec ts = {0, 20 * 1000000L};
  int i;
  for (i = 0; i < 500; i++) {
    *fds = entries("/proc/self/fd", 1);
    *threads = entries("/proc/self/task", 0);
    if (*fds <= base_fds && *threads <= base_threads)
      return;
    nanosleep(&ts, NULL);
  }
}

int main(void) {
  const char *env = getenv("OXCCL_LEAK_CYCLES");
  int cycles = env ? atoi(env) : 100;
  int base_fds, base_threads, fds, threads, i;
  /* Whatever the library sets up once is not a leak. */
  cycle();
  cycle();
  cycle_p2p();
  cycle_p2p();
  base_fds = entries("/proc/self/fd", 1);
  base_threads = entries("/proc/self/task", 0);
  settle(base_fds, base_threads, &base_fds, &base_threads);
  for (i = 0; i < cycles; i++) {
    cycle();
    cycle_p2p();
  }
  settle(base_fds, base_threads, &fds, &threads);
  printf("leaks: %d create/destroy cycles of %d ranks (and of 4 with sends, "
         "receives and an alltoall): descriptors %d -> %d, "
         "threads %d -> %d\n",
         cycles, N, base_fds, fds, base_threads, threads);
  CHECK(fds <= base_fds, "%d descriptors after %d cycles, %d before", fds, cycles,
        base_fds);
  CHECK(threads <= base_threads, "%d threads after %d cycles, %d before", threads,
        cycles, base_threads);
  return finish("leaks", 0);
}
