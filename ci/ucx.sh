#!/usr/bin/env bash
# ucx.sh -- the UCX link (feature ucx): installs UCX's headers and tools and
# libclang (bindgen), lints the feature (with cuda too: device pointers go to
# UCX as they are), and runs its tests over UCX's TCP and shared-memory
# transports: the link's own tests, mismatched calls, every collective,
# exchange and algorithm across processes, a killed rank, and a 4-rank job
# across network namespaces over UCX's TCP (ci/ucx-netns.sh). No RDMA device
# is needed: the same code runs over verbs where UCX finds one. Device buffers
# by address (a host-memory stand-in here) go to UCX as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== ucx: %s (%ds)\n' "$1" "$SECONDS"; }

step "install libucx-dev, ucx-utils, libclang-dev"
missing=()
for p in libucx-dev ucx-utils libclang-dev pkg-config iproute2; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "UCX $(pkg-config --modversion ucx)"

step "clippy with feature ucx, and with ucx and cuda together"
cargo clippy -p oxccl-transport -p oxccl -p oxccl-tools -p oxccl-benches --all-targets --features ucx -- -D warnings
cargo clippy -p oxccl -p oxccl-tools -p oxccl-benches --all-targets --features ucx,cuda -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc -p oxccl-transport -p oxccl --features ucx --no-deps

for tls in tcp sm; do
  step "the link and mismatched calls, UCX_TLS=$tls"
  UCX_TLS=$tls cargo test -p oxccl-transport --features ucx --lib ucx::
  UCX_TLS=$tls cargo test -p oxccl --features ucx --test ucx
done

step "across processes: every collective, exchange and algorithm, a killed rank (UCX_TLS=tcp and sm)"
cargo test -p oxccl-tools --features ucx --test ucx

step "device buffers by address from the command line (oxccl-check --device hostdev, UCX_TLS=sm, 3 ranks)"
cargo build -p oxccl-tools --features ucx --bins
bin="${CARGO_TARGET_DIR:-target}/debug"
OXCCL_TRANSPORT=ucx UCX_TLS=sm "$bin/oxrun" -n 3 -- "$bin/oxccl-check" -c all --device hostdev -b 256K

step "auto in a build with UCX (no RDMA here: shared memory on one host, as without)"
cargo test -p oxccl-tools --features ucx --test multiprocess auto_picks_shared_memory

step "4 ranks across network namespaces over UCX's TCP (ci/ucx-netns.sh)"
bash ci/ucx-netns.sh

step "benchmark script, once at small sizes (ci/ucx-bench.sh; the figures mean nothing here)"
missing=()
for p in openmpi-bin libopenmpi-dev; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
BENCH_UCX_PROFILE=debug \
BENCH_UCX_SIZES=4K,64K BENCH_UCX_RANKS=2 BENCH_UCX_TLS=tcp BENCH_UCX_REPS=1 bash ci/ucx-bench.sh
