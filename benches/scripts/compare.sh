#!/usr/bin/env bash
# compare.sh -- oxccl's all_reduce_perf, broadcast_perf and all_gather_perf
# against the peers of ../shared/peers (Open MPI over shared memory and
# TCP, the Gloo C++ library, machine ceilings), alternating runs over the same
# sizes and rank counts, then writes benches/RESULTS.md (tables and the
# targets of issue 3 with their ratios) and the busbw plot. One command
# regenerates it all:
#
#   bash benches/scripts/compare.sh
#
# Knobs (environment variables):
#   COMPARE_REPS=3                 runs of each side (medians are taken; at least 3 advised)
#   COMPARE_RANKS="2 4"            rank counts
#   COMPARE_TRANSPORTS="tcp shm"   oxccl's transports (OXCCL_TRANSPORT), each run in turn
#   COMPARE_EXTRA=1                also broadcast and allgather (ours, and the peers'
#                                  "extra" runs: Open MPI bcast/allgather and out-of-place
#                                  allreduce, Gloo's other algorithms); 0 skips them
#   COMPARE_TINY=1                 also 8-byte allreduces (ours, Open MPI TCP and shm); 0 skips
#   COMPARE_PEERS="ceilings mpi-shm mpi-tcp gloo-native"   PEERS_ONLY for run_peers.sh
#                                  ("" skips the peers; ceilings run in the first rep only)
#   COMPARE_PEERS_SCRIPT=../shared/peers/run_peers.sh
#   COMPARE_ITERS_SMALL=10000 COMPARE_WARMUP_SMALL=500  iterations for 8 B, 4K and 64K
#   COMPARE_ITERS=200 COMPARE_WARMUP=20         iterations for 1M and 16M
#   COMPARE_ITERS_LARGE=5 COMPARE_WARMUP_LARGE=1 iterations for 64M..256M
# (A timed loop must last long enough that one scheduler hiccup does not set
# its mean: at 1 µs a call, 200 calls are 0.2 ms. The peers time each size
# for 0.25 s.)
#   COMPARE_OUT=benches/results/raw/<timestamp>  where raw data goes
#   COMPARE_NO_BUILD=1             use the binaries already built
#   CARGO_TARGET_DIR               honoured (default: target)
# Sizes are the peers' default (4K,64K,1M,16M,64M,256M), plus 8 B for allreduce.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
REPS=${COMPARE_REPS:-3}
RANKS=${COMPARE_RANKS:-"2 4"}
TRANSPORTS=${COMPARE_TRANSPORTS:-"tcp shm"}
PEERS=${COMPARE_PEERS-"ceilings mpi-shm mpi-tcp gloo-native"}
EXTRA=${COMPARE_EXTRA:-1}
TINY=${COMPARE_TINY:-1}
# The peers' folder is shared read-only and run_peers.sh builds next to
# itself: run a writable copy.
if [ -z "${COMPARE_PEERS_SCRIPT:-}" ]; then
  PEERS_COPY=${COMPARE_PEERS_COPY:-$HOME/.cache/oxccl-peers}
  mkdir -p "$PEERS_COPY"
  cp -rp "$ROOT/../shared/peers/." "$PEERS_COPY/"
  chmod -R u+w "$PEERS_COPY"
  PEERS_SCRIPT=$PEERS_COPY/run_peers.sh
else
  PEERS_SCRIPT=$COMPARE_PEERS_SCRIPT
fi
ITERS_S=${COMPARE_ITERS_SMALL:-10000}
WARMUP_S=${COMPARE_WARMUP_SMALL:-500}
ITERS=${COMPARE_ITERS:-200}
WARMUP=${COMPARE_WARMUP:-20}
ITERS_L=${COMPARE_ITERS_LARGE:-5}
WARMUP_L=${COMPARE_WARMUP_LARGE:-1}
OUT=${COMPARE_OUT:-$ROOT/benches/results/raw/$(date +%Y%m%d-%H%M%S)}
case "$OUT" in /*) ;; *) OUT="$ROOT/$OUT" ;; esac
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN="$TARGET_DIR/release"
T0=$SECONDS
log() { printf '[compare %4ds] %s\n' $((SECONDS - T0)) "$*"; }

if [[ -z "${COMPARE_NO_BUILD:-}" ]]; then
  log "building oxrun and the benchmarks (release)"
  cargo build --release -p oxccl-tools --bin oxrun -p oxccl-benches --bins
fi
mkdir -p "$OUT/oxccl" "$OUT/peers"
log "raw data goes to $OUT"

# one_bench COLLECTIVE TRANSPORT RANKS REP TAG -- perf binary flags...
one_bench() {
  local c=$1 t=$2 n=$3 rep=$4 tag=$5
  shift 6
  local f="$OUT/oxccl/${c}__${t}__n${n}__${tag}__rep${rep}"
  OXCCL_TRANSPORT=$t "$BIN/oxrun" -n "$n" --timeout 1200 -- "$BIN/${c}_perf" "$@" -J "$f.json" | tee "$f.log"
}

ours() {
  local rep=$1 n t c
  local colls=all_reduce
  [[ $EXTRA == 1 ]] && colls="all_reduce broadcast all_gather"
  for n in $RANKS; do
    for t in $TRANSPORTS; do
      for c in $colls; do
        log "oxccl rep $rep, $c, $n ranks, OXCCL_TRANSPORT=$t"
        # Three invocations so that the sizes are exactly the peers' (4K..16M by
        # 16, 64M..256M by 4), each with loops of a fair length.
        one_bench "$c" "$t" "$n" "$rep" small -- -b 4K -e 64K -f 16 -n "$ITERS_S" -w "$WARMUP_S"
        one_bench "$c" "$t" "$n" "$rep" mid -- -b 1M -e 16M -f 16 -n "$ITERS" -w "$WARMUP"
        one_bench "$c" "$t" "$n" "$rep" large -- -b 64M -e 256M -f 4 -n "$ITERS_L" -w "$WARMUP_L"
      done
      if [[ $TINY == 1 ]]; then
        one_bench all_reduce "$t" "$n" "$rep" tiny -- -b 8 -e 8 -n $((ITERS_S * 2)) -w "$WARMUP_S"
      fi
    done
  done
}

peers() {
  local rep=$1 only=$PEERS
  [[ -n "$only" ]] || return 0
  if ((rep > 1)); then only=$(tr ' ' '\n' <<<"$only" | grep -vx ceilings | tr '\n' ' ' || true); fi
  [[ -n "${only// /}" ]] || return 0
  log "peers rep $rep: $only"
  PEERS_ONLY="$only" PEERS_REPS=1 PEERS_EXTRA_REPS="$EXTRA" PEERS_RANKS="$RANKS" \
    PEERS_SIZES=4K,64K,1M,16M,64M,256M PEERS_OUT="$OUT/peers/rep$rep" \
    bash "$PEERS_SCRIPT" 2>&1 | tee "$OUT/peers/rep$rep.log"
  if [[ $TINY == 1 ]]; then
    # 8-byte allreduces only (the extra runs' allgather cannot split 8 bytes).
    only=$(tr ' ' '\n' <<<"$only" | grep -x -e mpi-shm -e mpi-tcp | tr '\n' ' ' || true)
    [[ -n "${only// /}" ]] || return 0
    log "peers rep $rep, 8 bytes: $only"
    PEERS_ONLY="$only" PEERS_REPS=1 PEERS_EXTRA_REPS=0 PEERS_RANKS="$RANKS" \
      PEERS_SIZES=8 PEERS_OUT="$OUT/peers/rep$rep-tiny" \
      bash "$PEERS_SCRIPT" 2>&1 | tee "$OUT/peers/rep$rep-tiny.log"
  fi
}

for rep in $(seq 1 "$REPS"); do
  ours "$rep"
  peers "$rep"
done

PLOT="$ROOT/benches/results/busbw.png"
mkdir -p "$(dirname "$PLOT")"
log "plotting"
python3 "$ROOT/benches/scripts/plot.py" "$OUT" -o "$PLOT"
log "writing benches/RESULTS.md"
python3 "$ROOT/benches/scripts/results.py" "$OUT" --out "$ROOT/benches/RESULTS.md" \
  --plot results/busbw.png
log "done"
