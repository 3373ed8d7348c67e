#!/usr/bin/env bash
# ucx-bench.sh -- oxccl over its UCX link side by side with Open MPI over
# UCX (`--mca pml ucx`), on the same UCX transports, and UCX's own
# single-stream tag bandwidth (`ucx_perftest -t tag_bw`) as the ceiling:
# allreduce bus bandwidth at 2 and 4 ranks, 4 KiB to 256 MiB. One command,
# on one machine or a cluster:
#
#   bash ci/ucx-bench.sh                                   # this machine, UCX_TLS=tcp and sm
#   BENCH_UCX_HOSTFILE=hosts BENCH_UCX_TLS=rc,sm bash ci/ucx-bench.sh   # a cluster (InfiniBand/RoCE)
#
# Knobs (environment):
#   BENCH_UCX_TLS="tcp sm"    UCX_TLS values to compare on, one run each ("all": UCX's choice)
#   BENCH_UCX_RANKS="2 4"     rank counts
#   BENCH_UCX_SIZES=4K,...,256M
#   BENCH_UCX_REPS=3          runs of each table (the summary takes medians)
#   BENCH_UCX_HOSTFILE        Open MPI hostfile: every run goes through mpirun
#                             --hostfile (oxccl reads Open MPI's rank variables);
#                             its first host serves oxccl's store, and the
#                             ucx_perftest client runs on its second host
#   BENCH_UCX_NET_DEVICES     UCX_NET_DEVICES for every run (e.g. mlx5_0:1)
#   BENCH_UCX_OUT=dir         where logs and summary.md go (default: a new temp dir)
#   BENCH_UCX_PROFILE=release cargo profile of oxccl (CI's smoke run: debug)
# Needs: Open MPI built with UCX (Debian: openmpi-bin), ucx-utils, mpicc, and
# a build of oxccl with feature ucx (done here).
set -euo pipefail
cd "$(dirname "$0")/.."
TLS_LIST=${BENCH_UCX_TLS:-tcp sm}
RANKS=${BENCH_UCX_RANKS:-2 4}
SIZES=${BENCH_UCX_SIZES:-4K,16K,64K,256K,1M,4M,16M,64M,256M}
REPS=${BENCH_UCX_REPS:-3}
OUT=${BENCH_UCX_OUT:-$(mktemp -d)}
PROFILE=${BENCH_UCX_PROFILE:-release}
BIN=${CARGO_TARGET_DIR:-target}/$PROFILE
mkdir -p "$OUT/raw"

for t in mpirun mpicc ucx_perftest; do
  command -v "$t" >/dev/null || { echo "ucx-bench: $t is missing (apt-get install openmpi-bin libopenmpi-dev ucx-utils)" >&2; exit 1; }
done
cargo build --profile "$([ "$PROFILE" = debug ] && echo dev || echo "$PROFILE")" \
  -p oxccl-benches --features ucx --bin all_reduce_perf >&2
mkdir -p "$OUT/build"
mpicc -O2 -o "$OUT/build/mpi_allreduce_bench" benches/peers/mpi_allreduce_bench.c

MPIRUN=(mpirun --allow-run-as-root --oversubscribe)
if [ -n "${BENCH_UCX_HOSTFILE:-}" ]; then
  MPIRUN+=(--hostfile "$BENCH_UCX_HOSTFILE" --map-by node)
  MASTER=$(awk 'NF && $1 !~ /^#/ { print $1; exit }' "$BENCH_UCX_HOSTFILE")
  PEER_HOST=$(awk 'NF && $1 !~ /^#/ { n++; if (n == 2) { print $1; exit } }' "$BENCH_UCX_HOSTFILE")
else
  MPIRUN+=(--mca oob_tcp_if_include lo)
  MASTER=127.0.0.1
  PEER_HOST=
fi
[ -n "${BENCH_UCX_NET_DEVICES:-}" ] && export UCX_NET_DEVICES=$BENCH_UCX_NET_DEVICES
# Sizes as all_reduce_perf takes them (the smallest, the largest, factor
# 4). oxccl's side runs three times, each from the smallest size up, as
# Open MPI's side does: to the largest 20 times a size, to the largest
# under 16 MiB 200 times, to the largest under 1 MiB 1000 times; each size
# is reported from the last run that reached it.
first=${SIZES%%,*} last=${SIZES##*,} last_middle= last_small=
for s in ${SIZES//,/ }; do
  b=$(numfmt --from=iec "$s")
  if [ "$b" -lt 1048576 ]; then last_small=$s; fi
  if [ "$b" -lt 16777216 ]; then last_middle=$s; fi
done

tls_of() { # the UCX_TLS of a run: Open MPI's pml ucx also needs `self`
  if [ "$1" = all ]; then echo all; else echo "$1,self"; fi
}

for rep in $(seq "$REPS"); do
  for tls in $TLS_LIST; do
    t=$(tls_of "$tls")
    for n in $RANKS; do
      echo "# rep $rep, UCX_TLS=$t, $n ranks" >&2
      log="$OUT/raw/oxccl__${tls}__n${n}__rep${rep}.log"
      : > "$log"
      # 20 calls of a few microseconds measure the first calls' costs, not
      # the steady state that Open MPI's side times for half a second.
      # Every run starts small: over UCX's TCP under BBR congestion control
      # a process whose first calls were of 1 MiB ran them at 0.6 of the
      # rate of one that began with smaller ones, 1000 calls later (under
      # cubic, or with UCX_TCP_SNDBUF and UCX_TCP_RCVBUF fixed, both at one
      # rate; see benches/RESULTS.md).
      for part in "$last:20:10" "$last_middle:200:50" "$last_small:1000:100"; do
        IFS=: read -r upto iters warm <<< "$part"
        [ -n "$upto" ] || continue
        # Below the kernel's ephemeral ports (32768 and up by default),
        # which a client socket of an earlier run may still hold.
        port=$((20000 + RANDOM % 9000))
        "${MPIRUN[@]}" -np "$n" -x UCX_TLS="$t" -x OXCCL_TRANSPORT=ucx -x OXCCL_MASTER_ADDR="$MASTER" \
          -x OXCCL_MASTER_PORT="$port" -x OXCCL_TIMEOUT=300 ${UCX_NET_DEVICES:+-x UCX_NET_DEVICES} \
          "$BIN/all_reduce_perf" -b "$first" -e "$upto" -f 4 -n "$iters" -w "$warm" -c 0 \
          --out-of-place-only >> "$log" 2>&1 || echo "ucx-bench: oxccl $tls n=$n failed (see $OUT/raw)" >&2
      done
      "${MPIRUN[@]}" -np "$n" --mca pml ucx --mca pml_ucx_tls any --mca pml_ucx_devices any \
        --mca osc ^ucx --mca btl ^uct -x UCX_TLS="$t" ${UCX_NET_DEVICES:+-x UCX_NET_DEVICES} \
        "$OUT/build/mpi_allreduce_bench" -c allreduce -s "$SIZES" -w 3 -T 0.5 \
        > "$OUT/raw/ompi__${tls}__n${n}__rep${rep}.log" 2>&1 || echo "ucx-bench: Open MPI $tls n=$n failed (see $OUT/raw)" >&2
    done
    # The ceiling: one stream of UCX tag messages between two processes.
    for s in ${SIZES//,/ }; do
      bytes=$(numfmt --from=iec "$s")
      iters=$(( bytes >= 16777216 ? 50 : (bytes >= 1048576 ? 500 : 5000) ))
      pport=$((13000 + RANDOM % 5000))
      # The server waits for one client: bounded, so that a client that
      # never connects cannot hang the script.
      UCX_TLS=$t timeout 120 ucx_perftest -t tag_bw -s "$bytes" -n "$iters" -w 10 -p "$pport" > /dev/null 2>&1 &
      server=$!
      # The client retries while the server is not listening yet (a loaded
      # machine takes a while to start it).
      ok=
      for _ in $(seq 40); do
        if [ -n "$PEER_HOST" ]; then
          mpirun --allow-run-as-root -np 1 --host "$PEER_HOST" -x UCX_TLS="$t" ${UCX_NET_DEVICES:+-x UCX_NET_DEVICES} \
            timeout 100 ucx_perftest "$MASTER" -t tag_bw -s "$bytes" -n "$iters" -w 10 -p "$pport" -f
        else
          UCX_TLS=$t timeout 100 ucx_perftest 127.0.0.1 -t tag_bw -s "$bytes" -n "$iters" -w 10 -p "$pport" -f
        fi > "$OUT/raw/perftest__${tls}__s${bytes}__rep${rep}.log" 2>&1 && { ok=1; break; }
        grep -q "Connection refused" "$OUT/raw/perftest__${tls}__s${bytes}__rep${rep}.log" || break
        sleep 0.25
      done
      [ -n "$ok" ] || echo "ucx-bench: ucx_perftest $tls $s failed (see $OUT/raw)" >&2
      kill "$server" 2>/dev/null || true
      wait "$server" 2>/dev/null || true
    done
  done
done

python3 - "$OUT" "$TLS_LIST" "$RANKS" > "$OUT/summary.md" <<'PY'
import glob, os, re, statistics, sys
out, tls_list, ranks = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
def rows(path, size_col, busbw_col):
    got = {}
    for line in open(path, errors="replace"):
        f = line.split()
        if f and f[0] == "[0]":
            f = f[1:]
        if len(f) > max(size_col, busbw_col) and f[0].isdigit():
            try:
                got[int(f[size_col])] = float(f[busbw_col])
            except ValueError:
                pass
    return got
def median_of(files, size_col, busbw_col):
    per = {}
    for p in files:
        for s, b in rows(p, size_col, busbw_col).items():
            per.setdefault(s, []).append(b)
    return {s: statistics.median(v) for s, v in per.items()}
def perftest(tls):
    bw = {}
    for p in glob.glob(f"{out}/raw/perftest__{tls}__s*__rep*.log"):
        s = int(re.search(r"__s(\d+)__", p).group(1))
        for line in open(p, errors="replace"):
            f = [x for x in re.split(r"[\s|]+", line.strip()) if x]
            # -f (full) rows: ... bandwidth MB/s (typical, average, overall) ...
            if f and f[0].isdigit() and len(f) >= 8:
                try:
                    bw.setdefault(s, []).append(float(f[-3]) * 1.048576e6 / 1e9)
                except ValueError:
                    pass
    return {s: statistics.median(v) for s, v in bw.items()}
print("# oxccl over UCX vs Open MPI pml ucx: allreduce busbw (GB/s), medians\n")
for tls in tls_list:
    ceil = perftest(tls)
    for n in ranks:
        # all_reduce_perf (out of place): size col 0, busbw col 7
        ox = median_of(glob.glob(f"{out}/raw/oxccl__{tls}__n{n}__rep*.log"), 0, 7)
        # mpi_allreduce_bench: size count type redop iters time algbw busbw
        om = median_of(glob.glob(f"{out}/raw/ompi__{tls}__n{n}__rep*.log"), 0, 7)
        print(f"## UCX_TLS={tls}, {n} ranks\n")
        print("| size | oxccl busbw | Open MPI busbw | oxccl / Open MPI | ucx_perftest tag_bw | oxccl / perftest |")
        print("|---:|---:|---:|---:|---:|---:|")
        # Open MPI's rows are the sizes asked for (oxccl's runs step by 4
        # and may pass through others).
        for s in sorted(om or ox):
            a, b, c = ox.get(s), om.get(s), ceil.get(s)
            r1 = f"{a / b:.2f}" if a and b else "-"
            r2 = f"{a / c:.2f}" if a and c else "-"
            fmt = lambda v: f"{v:.3f}" if v is not None else "-"
            print(f"| {s} | {fmt(a)} | {fmt(b)} | {r1} | {fmt(c)} | {r2} |")
        print()
PY
cat "$OUT/summary.md"
echo "# ucx-bench: logs and summary in $OUT" >&2
