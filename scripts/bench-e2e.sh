#!/usr/bin/env bash
# End-to-end throughput and latency, in one run on this machine, between two instances on
# two different hosts (network namespaces), for:
#   veth      plain routing between the hosts, no overlay (the ceiling)
#   vxlan     the kernel's own overlay: a VXLAN device per host namespace (kernel GRE is not
#             built on these machines)
#   ovs-gre   Open vSwitch's userspace datapath (datapath_type=netdev, no kernel module):
#             GRE with key 1001 (Ethernet in GRE), conntrack commit on every packet
#   vpcd-gre  vpcd, GRE over IP protocol 47
#   vpcd-udp  vpcd, GRE-in-UDP (RFC 8086)
#   null      the bench-only null forwarder (vpcd's I/O path, no decision) in place of each
#             host's vpcd, on a vpcd lab (see crates/vpcd/examples/null-forwarder.rs)
# Every row crosses the same underlay, the one `vpcd lab up` builds: a namespace holding a
# Linux bridge br0; per host namespace a veth ul0 (192.0.2.N/32, a /32 route to the other
# host via ul0) whose peer pN is a port of br0. The kernel and OVS rows build that shape
# themselves (namespaces vbench-*), the vpcd rows get it from the lab (vpcd-bench-*).
# ovs-gre differs where OVS's userspace tunneling needs it to: the host's address moves from
# ul0 to OVS's bridge br-phy, as a /24, and the instances send without checksum offload
# (docs/bench-ovs.md says why).
#
# Measures iperf3 TCP with 1 and 4 streams (Gbit/s), iperf3 UDP with 64-byte payloads
# (received packets/s), ping round-trip (median, ms), and for the userspace rows the
# forwarding processes' CPU time per gigabit moved (both hosts' vpcd, null-forwarder or
# ovs-vswitchd, during a separate 1-stream TCP run). Prints one table with the ratios
# row / vxlan for every row that is not the kernel's. No figure here is a pass/fail criterion.
#
#   sudo scripts/bench-e2e.sh            # DURATION=5 by default
#   DURATION=10 WORKERS=2 scripts/bench-e2e.sh
#   UNDERLAY_MTU=9000 GRO=0 ROWS="vxlan ovs-gre" scripts/bench-e2e.sh
#
# Options (environment):
#   DURATION=5         seconds per iperf3 run
#   WORKERS=           `vpcd lab up --workers N` for the vpcd rows (empty: the lab's default)
#   UNDERLAY_MTU=1500  MTU of every underlay link (br0, each pN, each ul0), for all rows; the
#                      vpcd topologies get `[underlay] mtu` = it (vpcd derives the instance
#                      MTU); vxlan: VXLAN device and instance veths at UNDERLAY_MTU-50; veth:
#                      instance veths at UNDERLAY_MTU; ovs-gre: instance veths at
#                      UNDERLAY_MTU-42 (outer IPv4 20 + GRE with key 8 + inner Ethernet 14)
#   GRO=1              1: `ethtool -K ul0 gro on` on each host's ul0, every row alike; 0: gro
#                      off (the veth default). Without ethtool, ul0 is left as it is (warned)
#   ROWS="veth vxlan ovs-gre vpcd-gre vpcd-udp null"   the rows to run, in this order
#   NULL_TRANSPORT=gre-udp   the lab topology's transport for the null row (gre | gre-udp)
#   NULL_FORWARDER=target/release/examples/null-forwarder   (cargo build --release --example
#                      null-forwarder); missing: the null row says n/a
#   VPCD=target/release/vpcd   built with `cargo build --release` if missing
#   LOGDIR=/tmp/bench-e2e-logs  each row's errors, the null forwarders' and OVS's logs (kept)
# Needs root, ip, iperf3, ping, python3; ethtool for GRO; for ovs-gre Debian's
# openvswitch-switch (`apt-get install -y --no-install-recommends openvswitch-switch`; the
# script never starts the system's OVS service: it runs its own ovsdb-server and ovs-vswitchd
# per host namespace, run directory /run/vbench-ovs/hA and hB). Everything it makes
# (namespaces, the lab, processes, by their pids only) goes on exit, failed or not.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5}
WORKERS=${WORKERS:-}
UNDERLAY_MTU=${UNDERLAY_MTU:-1500}
GRO=${GRO:-1}
ROWS=${ROWS:-veth vxlan ovs-gre vpcd-gre vpcd-udp null}
NULL_TRANSPORT=${NULL_TRANSPORT:-gre-udp}
NULL_FORWARDER=${NULL_FORWARDER:-target/release/examples/null-forwarder}
VPCD=${VPCD:-target/release/vpcd}
LOGDIR=${LOGDIR:-/tmp/bench-e2e-logs}
P=vbench                 # namespace prefix for the kernel and OVS rows
LAB=bench                # lab name for the vpcd and null rows
STATE=/run/vbench        # pids this script started (PID COMM a line), topologies
OVSRUN=/run/vbench-ovs   # one run directory per host: OVS database, sockets, pidfiles
HOSTS=(host-a host-b)    # the lab's hosts; host-a is 192.0.2.1 on p0, host-b 192.0.2.2 on p1
[ "$(id -u)" = 0 ] || { echo "bench-e2e: needs root" >&2; exit 1; }
for tool in ip iperf3 ping python3; do
  command -v $tool >/dev/null || { echo "bench-e2e: $tool is missing" >&2; exit 1; }
done
case $UNDERLAY_MTU in ''|*[!0-9]*) echo "bench-e2e: UNDERLAY_MTU must be a number" >&2; exit 1;; esac
[ "$UNDERLAY_MTU" -ge 1280 ] || { echo "bench-e2e: UNDERLAY_MTU below 1280" >&2; exit 1; }
[ -x "$VPCD" ] || cargo build --release --quiet
if command -v ethtool >/dev/null; then
  if [ "$GRO" = 1 ]; then GRO_STATE=on; else GRO_STATE=off; fi
else
  GRO_STATE="unchanged (ethtool missing: apt-get install -y --no-install-recommends ethtool)"
  echo "bench-e2e: WARNING: ethtool is missing, GRO on ul0 left as the kernel made it" >&2
fi

# Stops a process this script started, by its pid, if it is still the program it started
# (COMM; pids are reused); waits until it is gone or a zombie (up to 5 s, then SIGKILL).
stop_pid() {
  local pid=$1 comm=$2 i
  [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$comm" ] || return 0
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 100); do
    gone "$pid" && return 0
    [ "$i" = 50 ] && kill -KILL "$pid" 2>/dev/null
    sleep 0.1
  done
  echo "bench-e2e: process $pid ($comm) does not stop" >&2
}
gone() { # PID: true when there is no such process or it is a zombie
  local st
  st=$(awk '{sub(/.*\) /, ""); print $1}' /proc/"$1"/stat 2>/dev/null) || return 0
  [ -z "$st" ] || [ "$st" = Z ]
}
note_pid() { echo "$1 $2" >>"$STATE/pids"; } # PID COMM, for cleanup

ovs_stop() { # the OVS daemons of every run directory, by their pidfiles
  local f
  for f in "$OVSRUN"/*/ovs-vswitchd.pid "$OVSRUN"/*/ovsdb-server.pid; do
    [ -f "$f" ] || continue
    stop_pid "$(cat "$f")" "$(basename "$f" .pid)"
  done
}

cleanup() {
  local pid comm f
  if [ -f "$STATE/pids" ]; then
    while read -r pid comm; do stop_pid "$pid" "$comm"; done <"$STATE/pids"
  fi
  ovs_stop
  for f in "$STATE"/iperf3-*.pid; do
    if [ -f "$f" ]; then stop_pid "$(cat "$f")" iperf3; fi
  done
  for f in "$OVSRUN"/*/*.log; do # kept: hA-ovs-vswitchd.log and so on
    if [ -f "$f" ]; then cp "$f" "$LOGDIR/$(basename "$(dirname "$f")")-$(basename "$f")"; fi
  done
  rm -rf "$OVSRUN" "$STATE"
  for n in ul hA hB iA iB; do ip netns del $P-$n 2>/dev/null || true; done
  "$VPCD" lab down --name $LAB >/dev/null 2>&1 || true
  mkdir -p "$STATE"
}
trap 'cleanup; rm -rf "$STATE"' EXIT
trap 'exit 130' INT TERM # through the EXIT trap
mkdir -p "$LOGDIR"; rm -f "$LOGDIR"/*.log
cleanup

# iperf_server NS PORT: a one-connection iperf3 server in NS, detached; its pidfile lets
# cleanup stop it if no client ever came
iperf_server() {
  ip netns exec "$1" iperf3 -s -D -1 -p "$2" -I "$STATE/iperf3-$2.pid" >/dev/null; sleep 0.3
}

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

# measure SRC_NS DST_NS DST_ADDR -> prints "tcp1 tcp4 udp_pps rtt"
measure() {
  local src=$1 dst=$2 addr=$3
  iperf_server "$dst" 5201
  local t1; t1=$(ip netns exec "$src" iperf3 -c "$addr" -p 5201 -t "$DURATION" -J | json 'd["end"]["sum_received"]["bits_per_second"]/1e9')
  iperf_server "$dst" 5202
  local t4; t4=$(ip netns exec "$src" iperf3 -c "$addr" -p 5202 -t "$DURATION" -P 4 -J | json 'd["end"]["sum_received"]["bits_per_second"]/1e9')
  iperf_server "$dst" 5203
  local pps; pps=$(ip netns exec "$src" iperf3 -c "$addr" -p 5203 -u -l 64 -b 0 -t "$DURATION" -J |
    json '(d["end"]["sum"]["packets"]-d["end"]["sum"]["lost_packets"])/d["end"]["sum"]["seconds"]')
  local rtt; rtt=$(ip netns exec "$src" ping -c 40 -i 0.05 -q -n "$addr" >/dev/null; \
    ip netns exec "$src" ping -c 40 -i 0.05 -n "$addr" | python3 -c '
import re,sys,statistics
v=[float(m.group(1)) for m in re.finditer(r"time=([0-9.]+)", sys.stdin.read())]
print(statistics.median(v) if v else float("nan"))')
  echo "$t1 $t4 $pps $rtt"
}

cpu_ticks() { # PID... -> their total utime+stime, in clock ticks
  local sum=0 pid f
  for pid in "$@"; do
    read -r -a f < <(sed 's/.*) //' /proc/"$pid"/stat)
    sum=$((sum + f[11] + f[12])) # utime, stime: fields 14 and 15 of stat
  done
  echo $sum
}

# cpu_per_gbit SRC_NS DST_NS DST_ADDR PID... -> CPU-s of the PIDs per Gbit received, over a
# 1-stream TCP run of its own
cpu_per_gbit() {
  local src=$1 dst=$2 addr=$3; shift 3
  local hz c0 c1 bits
  hz=$(getconf CLK_TCK)
  iperf_server "$dst" 5300
  c0=$(cpu_ticks "$@")
  bits=$(ip netns exec "$src" iperf3 -c "$addr" -p 5300 -t "$DURATION" -J | json 'd["end"]["sum_received"]["bytes"]*8')
  c1=$(cpu_ticks "$@")
  python3 -c "print(($c1-$c0)/$hz/($bits/1e9))"
}

# underlay_mtu_gro UL_NS HOST_NS...: UNDERLAY_MTU on every underlay link (each host's ul0,
# each pN and br0 in UL_NS) and GRO on each ul0. The same for every row.
underlay_mtu_gro() {
  local ul=$1 n=0 h; shift
  for h in "$@"; do
    ip -n "$ul" link set "p$n" mtu "$UNDERLAY_MTU"
    ip -n "$h" link set ul0 mtu "$UNDERLAY_MTU"
    n=$((n + 1))
  done
  ip -n "$ul" link set br0 mtu "$UNDERLAY_MTU"
  # A switch, not a firewall: no host netfilter on bridged frames (as `vpcd lab up` does).
  for k in iptables ip6tables arptables; do
    ip netns exec "$ul" sh -c "echo 0 > /proc/sys/net/bridge/bridge-nf-call-$k" 2>/dev/null || true
  done
  if command -v ethtool >/dev/null; then
    for h in "$@"; do ip netns exec "$h" ethtool -K ul0 gro "$GRO_STATE"; done
  fi
}

# The lab's underlay shape (crates/vpcd/src/lab/build.rs, build_underlay) for the kernel and
# OVS rows: namespace $P-ul with bridge br0; hosts $P-hA (192.0.2.1, port p0) and $P-hB
# (192.0.2.2, port p1), each with ul0 at its /32 and a /32 route to the other via ul0.
underlay_setup() {
  ip netns add $P-ul; ip -n $P-ul link set lo up
  ip -n $P-ul link add br0 type bridge; ip -n $P-ul link set br0 up
  local side s me peer
  for side in A:1:2 B:2:1; do
    IFS=: read -r s me peer <<<"$side"
    ip netns add $P-h$s; ip -n $P-h$s link set lo up
    ip -n $P-ul link add p$((me - 1)) type veth peer name ul0 netns $P-h$s
    ip -n $P-ul link set p$((me - 1)) master br0
    ip -n $P-ul link set p$((me - 1)) up
    ip -n $P-h$s addr add 192.0.2.$me/32 dev ul0; ip -n $P-h$s link set ul0 up
    ip -n $P-h$s route add 192.0.2.$peer/32 dev ul0
  done
  underlay_mtu_gro $P-ul $P-hA $P-hB
}

# Two hosts on the underlay, an instance behind each; $1 = veth | vxlan.
kernel_row() {
  underlay_setup
  local mtu=$UNDERLAY_MTU side s me peer
  for side in A:1:2 B:2:1; do
    IFS=: read -r s me peer <<<"$side"
    ip netns add $P-i$s; ip -n $P-i$s link set lo up
    ip link add inst netns $P-h$s type veth peer name eth0 netns $P-i$s
    if [ "$1" = vxlan ]; then
      mtu=$((UNDERLAY_MTU - 50))
      ip -n $P-h$s link add vx0 type vxlan id 42 local 192.0.2.$me remote 192.0.2.$peer dstport 4789 dev ul0
      ip -n $P-h$s link set vx0 mtu $mtu
      ip -n $P-h$s addr add 10.99.0.$me/24 dev vx0; ip -n $P-h$s link set vx0 up
      ip -n $P-h$s route add 10.0.$peer.0/24 via 10.99.0.$peer dev vx0
    else
      ip -n $P-h$s route add 10.0.$peer.0/24 via 192.0.2.$peer dev ul0
    fi
    ip -n $P-h$s addr add 10.0.$me.1/24 dev inst; ip -n $P-h$s link set inst up mtu $mtu
    ip -n $P-i$s addr add 10.0.$me.10/24 dev eth0; ip -n $P-i$s link set eth0 up mtu $mtu
    ip -n $P-i$s route add 10.0.0.0/16 via 10.0.$me.1
    ip netns exec $P-h$s sysctl -qw net.ipv4.ip_forward=1
  done
  measure $P-iA $P-iB 10.0.2.10
}

# --- ovs-gre: Open vSwitch userspace datapath, userspace ("native") tunneling -------------
# Per host namespace hX, run directory $OVSRUN/hX: ovsdb-server and ovs-vswitchd (run inside
# the namespace; OVS_RUNDIR etc. point at the run directory, so the bridges' management
# sockets do not meet). Two netdev bridges, the recipe of OVS's userspace-tunneling howto:
#   br-phy  port ul0; the host's underlay address moves from ul0 to br-phy's own device (a
#           tap), the /32 route to the other host with it; OVS's tunnel route and neighbor
#           (ovs/route/add, tnl/arp/set) point at br-phy
#   br-int  port inst (1: the instance's veth, AF_PACKET), port gre0 (2: type gre, key
#           1001, remote the other host); flows: IP from inst: ct(commit), dec_ttl, to gre0;
#           IP from gre0: ct(commit), dec_ttl, gateway's MAC to the instance's, to inst;
#           anything else dropped. The instance has a static neighbor for its gateway.
# The instances' eth0 send with checksum offload off (`ethtool -K eth0 tx off`, and so no TSO):
# OVS 3.1's userspace datapath takes packets from AF_PACKET as they are and does not
# segment or checksum them for a tunnel.
GW_MAC=02:00:0a:00:00:01
inst_mac() { echo "02:00:0a:00:0$1:0a"; } # the instance 10.0.N.10's MAC

ovs_host() { # S ME PEER: one host's OVS
  local s=$1 me=$2 peer=$3 d=$OVSRUN/h$1
  local ns=$P-h$s
  mkdir -p "$d"
  local env=(env OVS_RUNDIR="$d" OVS_DBDIR="$d" OVS_LOGDIR="$d" OVS_SYSCONFDIR="$d")
  ovsdb-tool create "$d/conf.db" /usr/share/openvswitch/vswitch.ovsschema
  ip netns exec "$ns" "${env[@]}" ovsdb-server "$d/conf.db" --remote="punix:$d/db.sock" \
    --pidfile="$d/ovsdb-server.pid" --unixctl="$d/ovsdb-server.ctl" \
    --log-file="$d/ovsdb-server.log" --detach </dev/null >/dev/null 2>&1
  vsctl() { "${env[@]}" ovs-vsctl --db="unix:$d/db.sock" --timeout=10 "$@"; }
  vsctl --no-wait init
  ip netns exec "$ns" "${env[@]}" ovs-vswitchd "unix:$d/db.sock" --disable-system \
    --pidfile="$d/ovs-vswitchd.pid" --unixctl="$d/ovs-vswitchd.ctl" \
    --log-file="$d/ovs-vswitchd.log" --detach </dev/null >/dev/null 2>&1
  local m=$((UNDERLAY_MTU - 42))
  ip netns add $P-i$s; ip -n $P-i$s link set lo up
  ip link add inst netns "$ns" type veth peer name eth0 netns $P-i$s
  ip -n "$ns" link set inst mtu $m up
  ip -n $P-i$s link set eth0 address "$(inst_mac "$me")" mtu $m up
  ip netns exec $P-i$s ethtool -K eth0 tx off >/dev/null
  ip -n $P-i$s addr add 10.0.$me.10/24 dev eth0
  ip -n $P-i$s neigh replace 10.0.$me.1 lladdr $GW_MAC dev eth0 nud permanent
  ip -n $P-i$s route add 10.0.0.0/16 via 10.0.$me.1
  vsctl add-br br-phy -- set bridge br-phy datapath_type=netdev fail-mode=standalone \
    -- add-port br-phy ul0 \
    -- set interface br-phy mtu_request="$UNDERLAY_MTU"
  vsctl add-br br-int -- set bridge br-int datapath_type=netdev fail-mode=secure \
    -- add-port br-int inst -- set interface inst ofport_request=1 \
    -- add-port br-int gre0 -- set interface gre0 type=gre ofport_request=2 \
       options:remote_ip=192.0.2.$peer options:local_ip=192.0.2.$me options:key=1001
  ip -n "$ns" addr del 192.0.2.$me/32 dev ul0
  ip -n "$ns" link set br-phy up mtu "$UNDERLAY_MTU"
  # A /24, not the /32 ul0 had: OVS's tunnel router takes a route's source address only from
  # an address whose prefix holds the destination ("Error while inserting route" otherwise).
  ip -n "$ns" addr add 192.0.2.$me/24 dev br-phy
  ip -n "$ns" route replace 192.0.2.$peer/32 dev br-phy
  local of=("${env[@]}" ovs-ofctl)
  "${of[@]}" del-flows "unix:$d/br-int.mgmt"
  "${of[@]}" add-flow "unix:$d/br-int.mgmt" "priority=10,ip,in_port=1,actions=ct(commit),dec_ttl,output:2"
  "${of[@]}" add-flow "unix:$d/br-int.mgmt" \
    "priority=10,ip,in_port=2,actions=ct(commit),dec_ttl,mod_dl_src:$GW_MAC,mod_dl_dst:$(inst_mac "$me"),output:1"
  "${of[@]}" add-flow "unix:$d/br-int.mgmt" "priority=0,actions=drop"
}

ovs_appctl() { local d=$OVSRUN/h$1; shift; ovs-appctl -t "$d/ovs-vswitchd.ctl" "$@"; }

ovs_row() {
  if ! command -v ovs-vswitchd >/dev/null || ! command -v ovsdb-tool >/dev/null; then
    echo "openvswitch-switch not installed" >&2; return 1
  fi
  command -v ethtool >/dev/null || { echo "ethtool missing (needed to turn the instances' tx offload off)" >&2; return 1; }
  underlay_setup
  ovs_host A 1 2
  ovs_host B 2 1
  local side s me peer other mac
  for side in A:1:2:B B:2:1:A; do
    IFS=: read -r s me peer other <<<"$side"
    mac=$(ip -n $P-h$other -o link show br-phy | sed 's/.*link\/ether \([^ ]*\).*/\1/')
    ovs_appctl "$s" ovs/route/add 192.0.2.$peer/32 br-phy >/dev/null 2>&1 || true # learned from the kernel, or now
    ovs_appctl "$s" tnl/arp/set br-phy 192.0.2.$peer "$mac" >/dev/null
  done
  local end=$((SECONDS + 10))
  until ip netns exec $P-iA ping -c 1 -W 1 -q 10.0.2.10 >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || { echo "no ping through OVS in 10 s" >&2; return 1; }
    sleep 0.2
  done
  local pids=() r cpu
  pids+=("$(cat $OVSRUN/hA/ovs-vswitchd.pid)" "$(cat $OVSRUN/hB/ovs-vswitchd.pid)")
  cpu=$(cpu_per_gbit $P-iA $P-iB 10.0.2.10 "${pids[@]}")
  r=$(measure $P-iA $P-iB 10.0.2.10)
  echo "$r $cpu"
}

# --- vpcd and null rows: a vpcd lab -----------------------------------------------------
topology() {
  cat <<EOF
[underlay]
transport = "$1"
mtu = $UNDERLAY_MTU
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

# The lab prefixes its namespaces: netns "$P-iA" is vpcd-$LAB-$P-iA.
iA=vpcd-$LAB-$P-iA iB=vpcd-$LAB-$P-iB

lab_up() { # TRANSPORT: the lab, its underlay at UNDERLAY_MTU and GRO
  topology "$1" >"$STATE/topology-$1.toml"
  "$VPCD" lab up "$STATE/topology-$1.toml" --name $LAB ${WORKERS:+--workers $WORKERS} >/dev/null
  underlay_mtu_gro vpcd-$LAB-ul "${HOSTS[@]/#/vpcd-$LAB-}"
}

lab_pid() { # HOST: the last pid the lab's journal records for the host's daemon
  awk -v h="$1" '$1 == "pid" && $2 == h { p = $3 } END { print p }' /run/vpcd-lab/$LAB/journal
}

vpcd_row() { # TRANSPORT
  lab_up "$1"
  local pids=() h r cpu
  for h in "${HOSTS[@]}"; do pids+=("$(lab_pid "$h")"); done
  cpu=$(cpu_per_gbit "$iA" "$iB" 10.0.2.10 "${pids[@]}")
  r=$(measure "$iA" "$iB" 10.0.2.10)
  "$VPCD" lab down --name $LAB >/dev/null
  echo "$r $cpu"
}

null_row() {
  [ -x "$NULL_FORWARDER" ] || { echo "null-forwarder not built" >&2; return 1; }
  lab_up "$NULL_TRANSPORT"
  local h pid i pids=()
  for h in "${HOSTS[@]}"; do
    pid=$(lab_pid "$h")
    [ -n "$pid" ] || { echo "no pid for $h in the lab's journal" >&2; return 1; }
    [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = vpcd ] || { echo "pid $pid of $h is not vpcd" >&2; return 1; }
    kill "$pid"
    for i in $(seq 100); do gone "$pid" && break; sleep 0.1; done
    gone "$pid" || { echo "vpcd $pid of $h does not stop" >&2; return 1; }
    "$NULL_FORWARDER" --netns "vpcd-$LAB-$h" --topology /run/vpcd-lab/$LAB/topology.toml \
      --host "$h" </dev/null >"$LOGDIR/null-forwarder-$h.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    note_pid "$pid" "$(basename "$NULL_FORWARDER" | cut -c1-15)" # its comm, once it runs
  done
  local end=$((SECONDS + 10)) # up to 10 s: both devices back, a ping passes
  until ip -n "$iA" link show bench-a >/dev/null 2>&1 && ip -n "$iB" link show bench-b >/dev/null 2>&1 &&
      ip netns exec "$iA" ping -c 1 -W 1 -q 10.0.2.10 >/dev/null 2>&1; do
    for pid in "${pids[@]}"; do
      if gone "$pid"; then
        echo "null-forwarder $pid exited: $(tail -n 3 "$LOGDIR"/null-forwarder-*.log | tr '\n' ' ')" >&2
        return 1
      fi
    done
    [ $SECONDS -lt $end ] || { echo "no device or no ping 10 s after the null forwarders started" >&2; return 1; }
    sleep 0.2
  done
  local r cpu
  cpu=$(cpu_per_gbit "$iA" "$iB" 10.0.2.10 "${pids[@]}")
  r=$(measure "$iA" "$iB" 10.0.2.10)
  for pid in "${pids[@]}"; do kill "$pid"; wait "$pid" || true; done
  "$VPCD" lab down --name $LAB >/dev/null
  echo "$r $cpu"
}

# run_row NAME FUNCTION ARGS...: R[NAME] = what FUNCTION prints ("tcp1 tcp4 pps rtt [cpu]"),
# or "n/a REASON" when it fails (its last line on stderr). FUNCTION runs in a subshell under
# set -e; whatever it leaves behind, cleanup removes before the next row.
declare -A R
run_row() {
  local name=$1 out rc; shift
  echo "== $name" >&2
  set +e
  out=$(set -e; "$@" 2>"$LOGDIR/$name.err")
  rc=$?
  set -e
  cat "$LOGDIR/$name.err" >&2
  if [ $rc = 0 ] && [ -n "$out" ]; then
    R[$name]=$out
  else
    R[$name]="n/a $(grep -v '^$' "$LOGDIR/$name.err" | tail -n 1 | tr -d '|')"
    if [ "${R[$name]}" = "n/a " ]; then R[$name]="n/a failed, exit $rc"; fi
    echo "bench-e2e: $name: ${R[$name]}" >&2
  fi
  cleanup
}

HEADER="underlay MTU $UNDERLAY_MTU, GRO $GRO_STATE on ul0, ${DURATION} s per iperf3 run, $(nproc) cores, kernel $(uname -r)"
echo "bench-e2e: $HEADER" >&2
for row in $ROWS; do
  case $row in
    veth|vxlan) run_row "$row" kernel_row "$row" ;;
    ovs-gre) run_row ovs-gre ovs_row ;;
    vpcd-gre) run_row vpcd-gre vpcd_row gre ;;
    vpcd-udp) run_row vpcd-udp vpcd_row gre-udp ;;
    null) run_row null null_row ;;
    *) echo "bench-e2e: unknown row $row" >&2; exit 1 ;;
  esac
done

args=()
for row in $ROWS; do args+=("$row=${R[$row]}"); done
python3 - "$HEADER" "$NULL_TRANSPORT" "${args[@]}" <<'EOF'
import sys
header, null_transport, rows = sys.argv[1], sys.argv[2], [a.split("=", 1) for a in sys.argv[3:]]
vals = {}
for n, a in rows:
    vals[n] = a[4:].strip() or "failed" if a.startswith("n/a") else [float(x) for x in a.split()]
print(f"bench-e2e: {header}" + (f", null on {null_transport}" if "null" in vals else ""))
print()
print("| path | TCP 1 stream (Gbit/s) | TCP 4 streams (Gbit/s) | UDP 64 B (kpps) | ping RTT median (ms) | daemon CPU-s per Gbit |")
print("|---|---|---|---|---|---|")
for n, _ in rows:
    v = vals[n]
    if isinstance(v, str):
        print(f"| {n} | n/a ({v}) | | | | |")
        continue
    cpu = f"{v[4]:.3f}" if len(v) > 4 else "-"
    print(f"| {n} | {v[0]:.2f} | {v[1]:.2f} | {v[2]/1e3:.0f} | {v[3]:.3f} | {cpu} |")
k = vals.get("vxlan")
if isinstance(k, list):
    for n, _ in rows:
        v = vals[n]
        if n in ("veth", "vxlan") or isinstance(v, str):
            continue
        print(f"| {n} / vxlan | {v[0]/k[0]:.2f}x | {v[1]/k[1]:.2f}x | {v[2]/k[2]:.2f}x | {v[3]/k[3]:.2f}x | |")
EOF
