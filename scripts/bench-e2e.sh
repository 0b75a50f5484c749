#!/usr/bin/env bash
# End-to-end throughput and latency, in one run on this machine, between two instances on
# two different hosts (network namespaces), for:
#   veth      plain routing between the namespaces, no overlay (the ceiling)
#   vxlan     the kernel's own overlay: a VXLAN device per host namespace (kernel GRE is not
#             built on these machines)
#   vpcd-gre  vpcd, GRE over IP protocol 47
#   vpcd-udp  vpcd, GRE-in-UDP (RFC 8086)
# Measures iperf3 TCP with 1 and 4 streams (Gbit/s), iperf3 UDP with 64-byte payloads
# (received packets/s), ping round-trip (median, ms), and for vpcd the daemons' CPU time per
# gigabit moved (both hosts, during the 1-stream TCP run). Prints one table with the ratios
# vpcd / kernel overlay. No figure here is a pass/fail criterion.
#
#   sudo scripts/bench-e2e.sh            # DURATION=5 by default
#   DURATION=10 WORKERS=2 scripts/bench-e2e.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5}
WORKERS=${WORKERS:-}
VPCD=${VPCD:-target/release/vpcd}
P=vbench          # namespace prefix for the kernel baselines
LAB=bench         # lab name for vpcd
[ "$(id -u)" = 0 ] || { echo "bench-e2e: needs root" >&2; exit 1; }
for tool in ip iperf3 ping python3; do
  command -v $tool >/dev/null || { echo "bench-e2e: $tool is missing" >&2; exit 1; }
done
[ -x "$VPCD" ] || cargo build --release --quiet

cleanup() {
  for n in hA hB iA iB; do ip netns del $P-$n 2>/dev/null || true; done
  "$VPCD" lab down --name $LAB >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

# measure SRC_NS DST_NS DST_ADDR -> prints "tcp1 tcp4 udp_pps rtt"
measure() {
  local src=$1 dst=$2 addr=$3
  ip netns exec "$dst" iperf3 -s -D -1 -p 5201 >/dev/null; sleep 0.3
  local t1; t1=$(ip netns exec "$src" iperf3 -c "$addr" -p 5201 -t "$DURATION" -J | json 'd["end"]["sum_received"]["bits_per_second"]/1e9')
  ip netns exec "$dst" iperf3 -s -D -1 -p 5202 >/dev/null; sleep 0.3
  local t4; t4=$(ip netns exec "$src" iperf3 -c "$addr" -p 5202 -t "$DURATION" -P 4 -J | json 'd["end"]["sum_received"]["bits_per_second"]/1e9')
  ip netns exec "$dst" iperf3 -s -D -1 -p 5203 >/dev/null; sleep 0.3
  local pps; pps=$(ip netns exec "$src" iperf3 -c "$addr" -p 5203 -u -l 64 -b 0 -t "$DURATION" -J |
    json '(d["end"]["sum"]["packets"]-d["end"]["sum"]["lost_packets"])/d["end"]["sum"]["seconds"]')
  local rtt; rtt=$(ip netns exec "$src" ping -c 40 -i 0.05 -q -n "$addr" >/dev/null; \
    ip netns exec "$src" ping -c 40 -i 0.05 -n "$addr" | python3 -c '
import re,sys,statistics
v=[float(m.group(1)) for m in re.finditer(r"time=([0-9.]+)", sys.stdin.read())]
print(statistics.median(v) if v else float("nan"))')
  echo "$t1 $t4 $pps $rtt"
}

# Two hosts on a veth, an instance behind each; $1 = veth | vxlan.
kernel_setup() {
  for n in hA hB iA iB; do ip netns add $P-$n; ip -n $P-$n link set lo up; done
  ip link add ul0 netns $P-hA type veth peer name ul0 netns $P-hB
  ip -n $P-hA addr add 192.0.2.1/24 dev ul0; ip -n $P-hA link set ul0 up
  ip -n $P-hB addr add 192.0.2.2/24 dev ul0; ip -n $P-hB link set ul0 up
  local mtu=1500
  for side in A:1:2 B:2:1; do
    IFS=: read -r s me peer <<<"$side"
    ip link add inst netns $P-h$s type veth peer name eth0 netns $P-i$s
    if [ "$1" = vxlan ]; then
      mtu=1450
      ip -n $P-h$s link add vx0 type vxlan id 42 local 192.0.2.$me remote 192.0.2.$peer dstport 4789 dev ul0
      ip -n $P-h$s addr add 10.99.0.$me/24 dev vx0; ip -n $P-h$s link set vx0 up
      ip -n $P-h$s route add 10.0.$peer.0/24 via 10.99.0.$peer dev vx0
    else
      ip -n $P-h$s route add 10.0.$peer.0/24 via 192.0.2.$peer dev ul0
    fi
    ip -n $P-h$s addr add 10.0.$me.1/24 dev inst; ip -n $P-h$s link set inst up mtu $mtu
    ip -n $P-i$s addr add 10.0.$me.10/24 dev eth0; ip -n $P-i$s link set eth0 up mtu $mtu
    ip -n $P-i$s route add default via 10.0.$me.1
    ip netns exec $P-h$s sysctl -qw net.ipv4.ip_forward=1
  done
}

kernel_teardown() { for n in hA hB iA iB; do ip netns del $P-$n 2>/dev/null || true; done; }

topology() {
  cat <<EOF
[underlay]
transport = "$1"
mtu = 1500
[[host]]
name = "host-a"
address = "192.0.2.1"
[[host]]
name = "host-b"
address = "192.0.2.2"
[[vpc]]
name = "vpc"
tenant = "bench"
cidr = "10.0.0.0/16"
[[subnet]]
name = "a"
vpc = "vpc"
cidr = "10.0.1.0/24"
[[subnet]]
name = "b"
vpc = "vpc"
cidr = "10.0.2.0/24"
[[security_group]]
name = "open"
ingress = [ { action = "accept", protocol = "all", source = "10.0.0.0/16" } ]
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]
[[instance]]
name = "bench-a"
host = "host-a"
subnet = "a"
ip = "10.0.1.10"
security_groups = ["open"]
netns = "$P-iA"
[[instance]]
name = "bench-b"
host = "host-b"
subnet = "b"
ip = "10.0.2.10"
security_groups = ["open"]
netns = "$P-iB"
EOF
}

cpu_ticks() { # total utime+stime of the lab's daemons, in clock ticks
  local sum=0
  for pid in $(grep -h '^pid ' /run/vpcd-lab/$LAB/journal | awk '{print $3}'); do
    read -r -a f < /proc/"$pid"/stat
    sum=$((sum + f[13] + f[14]))
  done
  echo $sum
}

declare -A R
echo "bench-e2e: $(nproc) cores, ${DURATION}s per iperf3 run, kernel $(uname -r)" >&2
kernel_setup veth;  echo "== veth" >&2;  R[veth]=$(measure $P-iA $P-iB 10.0.2.10);  kernel_teardown
kernel_setup vxlan; echo "== vxlan" >&2; R[vxlan]=$(measure $P-iA $P-iB 10.0.2.10); kernel_teardown
for tr in gre gre-udp; do
  name=vpcd-${tr/gre-udp/udp}
  echo "== $name" >&2
  topology $tr > /tmp/vpcd-bench-$tr.toml
  "$VPCD" lab up /tmp/vpcd-bench-$tr.toml --name $LAB ${WORKERS:+--workers $WORKERS} >/dev/null
  hz=$(getconf CLK_TCK)
  c0=$(cpu_ticks)
  # The lab prefixes its namespaces: netns "$P-iA" is vpcd-$LAB-$P-iA.
  iA=vpcd-$LAB-$P-iA iB=vpcd-$LAB-$P-iB
  ip netns exec $iB iperf3 -s -D -1 -p 5300 >/dev/null; sleep 0.3
  bits=$(ip netns exec $iA iperf3 -c 10.0.2.10 -p 5300 -t "$DURATION" -J | json 'd["end"]["sum_received"]["bytes"]*8')
  c1=$(cpu_ticks)
  cpu=$(python3 -c "print(($c1-$c0)/$hz/($bits/1e9))")
  R[$name]="$(measure $iA $iB 10.0.2.10) $cpu"
  "$VPCD" lab down --name $LAB >/dev/null
done

python3 - "${R[veth]}" "${R[vxlan]}" "${R[vpcd-gre]}" "${R[vpcd-udp]}" <<'EOF'
import sys
rows = ["veth", "vxlan", "vpcd-gre", "vpcd-udp"]
vals = {n: [float(x) for x in a.split()] for n, a in zip(rows, sys.argv[1:])}
k = vals["vxlan"]
print("| path | TCP 1 stream (Gbit/s) | TCP 4 streams (Gbit/s) | UDP 64 B (kpps) | ping RTT median (ms) | daemon CPU-s per Gbit |")
print("|---|---|---|---|---|---|")
for n in rows:
    v = vals[n]
    cpu = f"{v[4]:.3f}" if len(v) > 4 else "-"
    print(f"| {n} | {v[0]:.2f} | {v[1]:.2f} | {v[2]/1e3:.0f} | {v[3]:.3f} | {cpu} |")
for n in ["vpcd-gre", "vpcd-udp"]:
    v = vals[n]
    print(f"| {n} / vxlan | {v[0]/k[0]:.2f}x | {v[1]/k[1]:.2f}x | {v[2]/k[2]:.2f}x | {v[3]/k[3]:.2f}x | |")
EOF
