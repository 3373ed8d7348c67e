#!/usr/bin/env bash
# netns-bench.sh -- N "hosts" on one machine: network namespaces joined by a
# bridge through veth pairs, each host's link limited to RATE with tc tbf.
# Runs all_reduce_perf across them (one rank per namespace), then Open MPI's
# TCP transport across the same namespaces when mpirun is installed (skipped
# with a message otherwise), then removes everything. Needs root.
#
#   RATE=2gbit N=4 SIZES="-b 16M -e 64M -f 2" bash ci/netns-bench.sh
#
# The ring's bound is the link rate: every rank sends (and receives) 2(n-1)/n
# of the buffer, so busbw cannot exceed RATE in bytes per second.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-2gbit}
N=${N:-4}
SIZES=${SIZES:--b 16M -e 64M -f 2 -n 5 -w 2}
BIN=${CARGO_TARGET_DIR:-target}/release
NET=10.201.77
PORT=${PORT:-29877}
OUT=${OUT:-$(mktemp -d)}

cargo build --release -p oxccl-tools --bin oxrun -p oxccl-benches --bin all_reduce_perf >&2

# shellcheck source=ci/netns-hosts.sh
source ci/netns-hosts.sh
cleanup() { netns_down oxh oxbr0 "$N"; }
trap cleanup EXIT
netns_up oxh oxbr0 oxv "$N" "$NET" "$RATE" 1mb
echo "# $N hosts $NET.1-$N, each link limited to $RATE (tc tbf); logs in $OUT"

echo "## oxccl all_reduce_perf"
pids=()
for i in $(seq 0 $((N - 1))); do
  ip netns exec "oxh$i" env OXCCL_RANK="$i" OXCCL_WORLD_SIZE="$N" OXCCL_MASTER_ADDR="$NET.1" \
    OXCCL_MASTER_PORT="$PORT" OXCCL_TIMEOUT=120 OXCCL_TRANSPORT=tcp "$BIN/all_reduce_perf" $SIZES > "$OUT/oxccl.$i.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
cat "$OUT/oxccl.0.log"
[ "$status" = 0 ] || { echo "oxccl run failed: see $OUT" >&2; cat "$OUT"/oxccl.*.log >&2; exit 1; }

if [ -n "${MPI_BENCH:-}" ] && command -v mpirun >/dev/null; then
  echo "## Open MPI, tcp BTL, same namespaces"
  args=()
  for i in $(seq 0 $((N - 1))); do
    args+=(-np 1 ip netns exec "oxh$i" "$MPI_BENCH" -i -s "${MPI_SIZES:-16M,32M,64M}" -w 2 -T 1)
    [ "$i" -lt $((N - 1)) ] && args+=(:)
  done
  # PMIx clients in the namespaces reach mpirun's server through the bridge.
  ip addr add "$NET.254/24" dev oxbr0 2>/dev/null || true
  PMIX_MCA_ptl_tcp_remote_connections=1 PMIX_MCA_ptl_tcp_if_include="$NET.0/24" \
  mpirun --allow-run-as-root --oversubscribe --mca pml ob1 --mca btl tcp,self \
    --mca oob_tcp_if_include "$NET.0/24" \
    --mca btl_tcp_if_include "$NET.0/24" "${args[@]}" || echo "Open MPI across namespaces failed (see above)"
else
  echo "## Open MPI: not run (set MPI_BENCH to the peers' mpi_allreduce_bench built by ../shared/peers/run_peers.sh)"
fi
