/* Sums a buffer over all ranks. Build and run:
 *   ci/install-c /tmp/oxccl
 *   cc allreduce.c $(PKG_CONFIG_PATH=/tmp/oxccl/lib/pkgconfig pkg-config --cflags --libs oxccl) -Wl,-rpath,/tmp/oxccl/lib -o allreduce
 *   target/release/oxrun -n 4 -- ./allreduce
 */
#include <stdio.h>

#include <oxccl.h>

int main(void) {
  oxcclComm_t comm;
  int rank, nranks, i;
  float buf[1024];

  /* Rank, world size and rank 0's address from oxrun, torchrun, mpirun or srun. */
  if (oxcclCommInitFromEnv(&comm) != oxcclSuccess) {
    fprintf(stderr, "init: %s\n", oxcclGetLastError(NULL));
    return 1;
  }
  oxcclCommUserRank(comm, &rank);
  oxcclCommCount(comm, &nranks);
  for (i = 0; i < 1024; i++)
    buf[i] = (float)rank;
  /* In place (sendbuff == recvbuff), host memory, NULL stream. */
  if (oxcclAllReduce(buf, buf, 1024, oxcclFloat, oxcclSum, comm, NULL) != oxcclSuccess) {
    fprintf(stderr, "allreduce: %s\n", oxcclGetLastError(comm));
    oxcclCommAbort(comm);
    return 1;
  }
  printf("rank %d of %d: sum %g (expected %d)\n", rank, nranks, buf[0],
         nranks * (nranks - 1) / 2);
  oxcclCommDestroy(comm);
  return 0;
}
