#!/usr/bin/env bash
# ucx-netns.sh -- 4 "hosts" (network namespaces joined by a bridge, as
# ci/netns-hosts.sh builds them), one rank in each, every collective and an
# exchange over the UCX link on UCX's TCP transport (UCX_TLS=tcp, each rank
# on its host's interface: UCX_NET_DEVICES). Fails unless every rank
# succeeds, every result checks out and every rank's ring runs over UCX.
# Needs root (network namespaces) and a build with feature ucx:
#
#   cargo build -p oxccl-tools --features ucx && bash ci/ucx-netns.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v ip >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null; }
N=${N:-4}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/debug}
NET=10.201.79
OUT=${OUT:-$(mktemp -d)}

[ -x "$BIN/oxccl-check" ] || cargo build -p oxccl-tools --features ucx --bin oxccl-check >&2

# shellcheck source=ci/netns-hosts.sh
source ci/netns-hosts.sh
cleanup() {
  netns_down oxu oxubr0 "$N"
  for i in $(seq 0 $((N - 1))); do ip link del "oxuv${i}b" 2>/dev/null || true; done
}
trap cleanup EXIT
cleanup
if ! ip netns add oxu-probe 2>/dev/null; then
  if [ -n "${OXCCL_REQUIRE_NETNS:-}" ]; then
    echo "ucx-netns: network namespaces are not available here (needs root), and OXCCL_REQUIRE_NETNS is set" >&2
    exit 1
  fi
  echo "ucx-netns: not run: network namespaces are not available here (needs root)"
  exit 0
fi
ip netns del oxu-probe
netns_up oxu oxubr0 oxuv "$N" "$NET" 2gbit 1mb

fail=0
run() { # name, oxccl-check args...
  local name=$1 port=$((30300 + RANDOM % 1000)) pids=() i
  shift
  for i in $(seq 0 $((N - 1))); do
    ip netns exec "oxu$i" env OXCCL_RANK="$i" OXCCL_WORLD_SIZE="$N" OXCCL_MASTER_ADDR="$NET.1" \
      OXCCL_MASTER_PORT="$port" OXCCL_TIMEOUT=60 OXCCL_TRANSPORT=ucx OXCCL_DEBUG=info \
      UCX_TLS=tcp UCX_NET_DEVICES="oxuv$i" \
      "$BIN/oxccl-check" "$@" > "$OUT/$name.$i.log" 2>&1 &
    pids+=($!)
  done
  for i in $(seq 0 $((N - 1))); do
    if ! timeout 300 tail --pid="${pids[$i]}" -f /dev/null || ! wait "${pids[$i]}"; then
      echo "ucx-netns: $name: rank $i failed:"; tail -5 "$OUT/$name.$i.log"; fail=1
    fi
    if ! grep -q "rank $i: to rank .* over ucx (control tcp .* over ucx (control tcp" "$OUT/$name.$i.log"; then
      echo "ucx-netns: $name: rank $i did not link its ring over UCX:"; grep "rank $i: to rank" "$OUT/$name.$i.log" || true; fail=1
    fi
  done
  grep "result OK$" "$OUT/$name.0.log" || true
  local ok
  ok=$(grep -c "result OK$" "$OUT/$name.0.log" || true)
  if [ "$ok" -lt "$EXPECT" ]; then
    echo "ucx-netns: $name: $ok results OK on rank 0, expected $EXPECT"; fail=1
  fi
}
EXPECT=6 run collectives -c all -b 1M -i 2
EXPECT=1 run alltoall -c all_to_all -b 300K -i 2
echo "# ucx-netns: logs in $OUT"
exit "$fail"
