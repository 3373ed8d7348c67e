#!/usr/bin/env bash
# netns-scale.sh -- checks the scale model (oxccl::algo::model, the
# scale_model binary) against measurements on 8 "hosts": network namespaces
# joined by a bridge through veth pairs, each host's outbound link limited to
# RATE with tc tbf (as ci/netns-bench.sh builds them). Needs root.
#
#   RATE=500mbit REPS=3 bash ci/netns-scale.sh
#
# 1. Measures the link: per-message latency (alpha) from a 2-rank recursive
#    doubling of 8 B (one exchange of one frame), bandwidth (beta) from a
#    2-rank recursive doubling of BW_SIZE (one exchange of the whole buffer,
#    in slices); medians over REPS runs.
# 2. Runs all_reduce_perf with N ranks (one per namespace) for OXCCL_ALGO in
#    ALGOS at each of SIZES, REPS times, and takes the median time.
# 3. Simulates the same calls with scale_model over the measured link
#    (reduction at GAMMA_GBYTES GB/s) and prints measured, simulated and
#    their ratio. "auto" is simulated as the algorithm select picks with the
#    communicator's own cost model for TCP links (LinkModel::TCP), which is
#    what the measured run used.
#
# The rate is low enough that the network, not the 2 CPUs of the machine
# this was written on, bounds large calls: at 500 Mbit/s a host sends
# 62.5 MB/s and the bridge carries 8 x 62.5 = 500 MB/s, a small share of
# what two cores forward, and a 16 MiB ring allreduce takes ~0.5 s of wire
# time against a few ms of reductions. Small calls are bound by wake-ups
# (8 ranks on 2 cores), which is what alpha then measures. Ranks do not spin
# (OXCCL_SPIN_US=0): 8 spinning ranks on 2 cores would steal each other's
# CPU and make alpha depend on the world.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-500mbit}
N=${N:-8}
REPS=${REPS:-3}
SIZES=${SIZES:-8 64K 1M 16M}
ALGOS=${ALGOS:-ring halving_doubling recursive_doubling gather_reduce auto}
BW_SIZE=${BW_SIZE:-16M}
GAMMA_GBYTES=${GAMMA_GBYTES:-10}
SPIN=${SPIN:-0}
BURST=${BURST:-256kb}
BIN=${CARGO_TARGET_DIR:-target}/release
NET=10.201.78
PORT=${PORT:-29911}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

cargo build --release -p oxccl-benches --bin all_reduce_perf --bin scale_model >&2

# shellcheck source=ci/netns-hosts.sh
source ci/netns-hosts.sh
cleanup() { netns_down oxs oxsbr0 "$N"; }
trap cleanup EXIT
# A bucket of 256 KiB (4 ms at 500 Mbit/s): small enough that 1 MiB calls
# do not ride it, large enough for 64 KiB GSO packets. A bucket below
# the GSO size (64kb) makes tbf cut every packet to the MTU; the 8 ranks
# then got a quarter of the rate, bound by softirq on the 2 cores.
netns_up oxs oxsbr0 oxw "$N" "$NET" "$RATE" "$BURST"
echo "# $N hosts $NET.1-$N, each outbound link limited to $RATE (tc tbf, burst $BURST); OXCCL_SPIN_US=$SPIN; logs in $OUT"

iters_for() { # size -> "-n N -w W"
  case "$1" in
    8 | 8B) echo "-n 200 -w 20" ;;
    *K) echo "-n 40 -w 4" ;;
    1M | 2M | 4M) echo "-n 8 -w 2" ;;
    *) echo "-n 3 -w 1" ;;
  esac
}

# run NRANKS ALGO SIZE TAG -> sets RESULT to the out-of-place time in us
# (rank 0's JSON; times averaged over ranks, nccl-tests' -a 1). Not in a
# subshell, so that each run gets a fresh port.
run() {
  local n=$1 algo=$2 size=$3 tag=$4 pids=() status=0
  PORT=$((PORT + 1))
  for i in $(seq 0 $((n - 1))); do
    ip netns exec "oxs$i" env OXCCL_RANK="$i" OXCCL_WORLD_SIZE="$n" OXCCL_MASTER_ADDR="$NET.1" \
      OXCCL_MASTER_PORT="$PORT" OXCCL_TIMEOUT=120 OXCCL_TRANSPORT=tcp OXCCL_ALGO="$algo" \
      OXCCL_SPIN_US="$SPIN" "$BIN/all_reduce_perf" -b "$size" -e "$size" $(iters_for "$size") \
      -c 0 --out-of-place-only -J "$OUT/$tag.json" > "$OUT/$tag.$i.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || status=1; done
  [ "$status" = 0 ] || { echo "run $tag failed: see $OUT" >&2; cat "$OUT/$tag".*.log >&2; exit 1; }
  RESULT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["rows"][0]["out_of_place"]["time_us"])' "$OUT/$tag.json")
}

median() { python3 -c 'import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

echo "## link: 2 ranks, recursive doubling (one exchange)"
a=() b=() c=()
for rep in $(seq 1 "$REPS"); do
  run 2 recursive_doubling 8 "alpha.$rep"
  a+=("$RESULT")
  run 2 recursive_doubling "$BW_SIZE" "beta.$rep"
  b+=("$RESULT")
  run "$N" recursive_doubling 8 "alpha$N.$rep"
  c+=("$RESULT")
done
ALPHA_US=$(median "${a[@]}")
BIG_US=$(median "${b[@]}")
# One exchange of BW_SIZE bytes in 512 KiB slices: frames * alpha + bytes * beta.
read -r GBYTES BW_BYTES < <(python3 - "$BW_SIZE" "$ALPHA_US" "$BIG_US" <<'EOF'
import sys
s = sys.argv[1]
mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
n = int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)
alpha, t = float(sys.argv[2]) * 1e-6, float(sys.argv[3]) * 1e-6
frames = -(-n // (512 << 10))
beta = (t - frames * alpha) / n
print(1e-9 / beta, n)
EOF
)
# Alpha under load: the same 8 B recursive doubling on all N ranks takes
# log2 N exchanges, with N ranks sharing the machine's cores.
ALPHA_N_US=$(python3 -c 'import math,sys; print(float(sys.argv[1]) / math.log2(int(sys.argv[2])))' "$(median "${c[@]}")" "$N")
echo "alpha runs (us): ${a[*]} -> alpha = $ALPHA_US us"
echo "alpha under load ($N ranks, 8 B recursive doubling / log2 $N; us): ${c[*]} -> alpha_$N = $ALPHA_N_US us"
echo "bandwidth runs ($BW_SIZE, us): ${b[*]} -> $GBYTES GB/s (tbf rate $RATE)"

echo "## all_reduce_perf, $N ranks, median of $REPS"
declare -A MEAS
for size in $SIZES; do
  for algo in $ALGOS; do
    t=()
    for rep in $(seq 1 "$REPS"); do
      run "$N" "$algo" "$size" "ar.$algo.$size.$rep"
      t+=("$RESULT")
    done
    MEAS[$algo.$size]=$(median "${t[@]}")
    echo "$algo $size: ${t[*]} -> ${MEAS[$algo.$size]} us"
  done
done

# The links are token buckets (tbf): the model shapes each rank's outbound
# link with the same bucket and times a loop of calls, as all_reduce_perf
# runs them (tc's "kb" is KiB).
BURST_BYTES=$(python3 -c 'import re,sys; n,u=re.fullmatch(r"(\d+)(kb|k|mb|m|b)?",sys.argv[1]).groups(); print(int(n)*{None:1,"b":1,"k":1024,"kb":1024,"m":1<<20,"mb":1<<20}[u])' "$BURST")
echo "## measured vs simulated (alpha $ALPHA_US us, $GBYTES GB/s, reduce $GAMMA_GBYTES GB/s, bucket $BURST_BYTES B)"
: > "$OUT/sim.tsv"
: > "$OUT/sim_n.tsv"
for size in $SIZES; do
  # The same warm-up and timed calls as the measured run of this size.
  read -r _ calls _ warmup < <(iters_for "$size")
  loop=(--worlds "$N" --sizes "$size" --burst "$BURST_BYTES" --calls "$calls" --warmup "$warmup")
  "$BIN/scale_model" --tsv --links custom,tcp "${loop[@]}" \
    --alpha-us "$ALPHA_US" --gbytes "$GBYTES" --reduce-gbytes "$GAMMA_GBYTES" >> "$OUT/sim.tsv"
  "$BIN/scale_model" --tsv --links custom "${loop[@]}" \
    --alpha-us "$ALPHA_N_US" --gbytes "$GBYTES" --reduce-gbytes "$GAMMA_GBYTES" >> "$OUT/sim_n.tsv"
done
for k in "${!MEAS[@]}"; do echo "$k ${MEAS[$k]}"; done > "$OUT/measured.txt"
python3 - "$OUT/sim.tsv" "$OUT/measured.txt" "$SIZES" "$ALGOS" "$OUT/sim_n.tsv" <<'EOF'
import sys
mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
def size(s):
    return int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)
sim, pick = {}, {}
for line in open(sys.argv[1]):
    link, world, nbytes, algo, t, closed, sel = line.split("\t")
    if link == "custom":
        sim[(algo, int(nbytes))] = float(t) * 1e6
    elif int(sel):
        pick[int(nbytes)] = algo  # select's pick under LinkModel::TCP
sim_n = {}
for line in open(sys.argv[5]):
    link, world, nbytes, algo, t, closed, sel = line.split("\t")
    sim_n[(algo, int(nbytes))] = float(t) * 1e6
meas = {}
for line in open(sys.argv[2]):
    k, v = line.split()
    algo, s = k.rsplit(".", 1)
    meas[(algo, s)] = float(v)
print("| size | algorithm | measured | simulated (2-rank alpha) | ratio | simulated (alpha under load) | ratio |")
print("|---:|---|---:|---:|---:|---:|---:|")
for s in sys.argv[3].split():
    for algo in sys.argv[4].split():
        m = meas[(algo, s)]
        name = pick[size(s)] if algo == "auto" else algo
        p = sim[(name, size(s))]
        label = f"auto ({name})" if algo == "auto" else algo
        q = sim_n[(name, size(s))]
        flag = lambda x: "" if abs(m / x - 1) <= 0.25 else " (>25%)"
        print(f"| {s} | {label} | {m:.1f} us | {p:.1f} us | {m / p:.2f}{flag(p)} | {q:.1f} us | {m / q:.2f}{flag(q)} |")
print()
for s in sys.argv[3].split():
    r, a = meas[("ring", s)], meas[("auto", s)]
    print(f"{s}: auto {a:.1f} us vs ring {r:.1f} us -> {'auto faster' if a < r else 'ring faster'} ({r / a:.2f}x)")
EOF
