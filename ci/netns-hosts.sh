# netns-hosts.sh -- sourced by the ci/netns-*.sh scripts: N "hosts" on one
# machine, network namespaces joined by a bridge through veth pairs, each
# host's outbound link limited with tc tbf. Needs root.

# netns_down PREFIX BRIDGE N: removes the namespaces PREFIX0.. and the bridge.
netns_down() {
  local i
  for i in $(seq 0 $(($3 - 1))); do ip netns del "$1$i" 2>/dev/null || true; done
  ip link del "$2" 2>/dev/null || true
}

# netns_up PREFIX BRIDGE VETH N NET RATE BURST: namespace PREFIXi holds
# VETHi with address NET.(i+1)/24, its peer VETHib on BRIDGE, and a tbf of
# RATE and BURST on its way out.
netns_up() {
  local prefix=$1 bridge=$2 veth=$3 n=$4 net=$5 rate=$6 burst=$7 i
  netns_down "$prefix" "$bridge" "$n"
  ip link add "$bridge" type bridge
  ip link set "$bridge" up
  for i in $(seq 0 $((n - 1))); do
    ip netns add "$prefix$i"
    ip link add "$veth$i" type veth peer name "$veth${i}b"
    ip link set "$veth$i" netns "$prefix$i"
    ip link set "$veth${i}b" master "$bridge" up
    ip netns exec "$prefix$i" ip addr add "$net.$((i + 1))/24" dev "$veth$i"
    ip netns exec "$prefix$i" ip link set "$veth$i" up
    ip netns exec "$prefix$i" ip link set lo up
    ip netns exec "$prefix$i" tc qdisc add dev "$veth$i" root tbf rate "$rate" burst "$burst" latency 100ms
  done
}
