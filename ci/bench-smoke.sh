#!/usr/bin/env bash
# bench-smoke.sh -- builds the nccl-tests-style *_perf binaries and oxrun in
# release mode, then runs a short smoke of each binary with 2 and 4 ranks
# through oxrun (every result checked; the perf binaries exit non-zero on any
# wrong element), split into groups as nccl-tests' NCCL_TESTS_SPLIT does,
# and one round of fusion_perf. Fails on any non-zero exit.
#
# Honours CARGO_TARGET_DIR (default: target). Run from anywhere:
#   bash ci/bench-smoke.sh
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN="$TARGET_DIR/release"

cargo build --release -p oxccl-tools --bin oxrun -p oxccl-benches --bins

export OXCCL_TIMEOUT=${OXCCL_TIMEOUT:-60}
run() {
  echo "+ oxrun $*"
  "$BIN/oxrun" --timeout 300 "$@"
}

for n in 2 4; do
  for b in all_reduce_perf all_gather_perf broadcast_perf reduce_scatter_perf reduce_perf; do
    # Shared memory (what auto picks on one host) and TCP.
    for t in shm tcp; do
      OXCCL_TRANSPORT=$t run -n "$n" -- "$BIN/$b" -b 8 -e 1M -f 8 -n 3 -w 1
    done
  done
  # The exchanges, sendrecv and hypercube (out of place only but hypercube;
  # every result checked, -c 1), once per transport, roots at the last rank.
  for b in alltoall_perf gather_perf scatter_perf sendrecv_perf hypercube_perf; do
    for t in shm tcp; do
      OXCCL_TRANSPORT=$t run -n "$n" -- "$BIN/$b" -b 4K -e 64K -f 16 -n 2 -w 1 -c 1 -r $((n - 1))
    done
  done
  run -n "$n" -- "$BIN/reduce_perf" -b 8 -e 64K -f 8 -n 2 -w 1 -r $((n - 1)) -d bfloat16 -o avg
  run -n "$n" -- "$BIN/all_reduce_perf" -b 8 -e 1K -f 4 -n 2 -w 1 -d all -o all
done
# nccl-tests' split: two groups of two run every call at once.
for b in all_reduce_perf alltoall_perf sendrecv_perf; do
  out=$(NCCL_TESTS_SPLIT="MOD 2" run -n 4 -- "$BIN/$b" -b 4K -e 1M -f 16 -n 2 -w 1)
  echo "$out"
  grep -q "Rank  3 Group  1 " <<<"$out" || { echo "bench-smoke: $b split: no group 1 in the header" >&2; exit 1; }
  grep -q "Out of bounds values : 0 OK" <<<"$out" || { echo "bench-smoke: $b split: not OK" >&2; exit 1; }
done
run -n 2 -- "$BIN/fusion_perf" --model resnet50 --steps 1
echo "bench-smoke: all runs passed"
