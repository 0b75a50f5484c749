#!/usr/bin/python3
"""Crafts GRE (IP protocol 47) or GRE-in-UDP (UDP port 4754) packets, hostile ones and, as a
control, well-formed ones, and sends them at layer 2 onto a vpcd lab's underlay bridge. Run by
tests/e2e.rs inside an "attacker" namespace plugged into that bridge.

usage: gre_attack.py IFACE DST_MAC DST_IP TRANSPORT COUNT CASE:OUTER_SRC:KEY:INNER_SRC:INNER_DST...

TRANSPORT is gre or gre-udp. Each CASE is sent COUNT times:
  valid       K bit, the key, protocol IPv4, an inner IPv4/UDP packet to port 7000
  badversion  the same with GRE version 1
  truncated   the K bit announces a 4-byte key; only 2 bytes follow
  nokey       no K bit
  oversize    like valid, but the inner packet is 8000 bytes long (far beyond any instance's
              MTU) and the outer IPv4 packet is sent in fragments of 1400 bytes of payload,
              each time with an IPv4 identification of its own: the receiving kernel
              reassembles them, so vpcd gets it whole
The inner packet is IPv4/UDP 40000 -> 7000 carrying "e2e CASE" (padded with "." to 8000
bytes for oversize).
"""

import struct
import sys

from scapy.all import IP, UDP, Ether, Raw, fragment, sendp

GRE_IN_UDP_PORT = 4754
PROTO_IPV4 = 0x0800
K_BIT = 0x2000
OVERSIZE = 8000
FRAGMENT_PAYLOAD = 1400
# The IPv4 identification of the oversize case's outer packets (the first; then one more per
# packet), so that the fragments of two packets never mix.
OVERSIZE_ID = 0x7E00


def gre(case, key, inner):
    if case in ("valid", "oversize"):
        return struct.pack("!HHI", K_BIT, PROTO_IPV4, key) + inner
    if case == "badversion":
        return struct.pack("!HHI", K_BIT | 1, PROTO_IPV4, key) + inner
    if case == "truncated":
        return struct.pack("!HHH", K_BIT, PROTO_IPV4, key & 0xFFFF)
    if case == "nokey":
        return struct.pack("!HH", 0, PROTO_IPV4) + inner
    raise SystemExit(f"unknown case {case}")


def main():
    if len(sys.argv) < 7:
        raise SystemExit(__doc__)
    iface, mac, dst, transport, count = sys.argv[1:6]
    count = int(count)
    for spec in sys.argv[6:]:
        case, src, key, inner_src, inner_dst = spec.split(":")
        data = f"e2e {case}".encode()
        if case == "oversize":
            data = data.ljust(OVERSIZE - 28, b".")
        inner = bytes(
            IP(src=inner_src, dst=inner_dst, ttl=64)
            / UDP(sport=40000, dport=7000)
            / Raw(data)
        )
        payload = gre(case, int(key), inner)
        if transport == "gre":
            outer = IP(src=src, dst=dst, ttl=64, proto=47) / Raw(payload)
        elif transport == "gre-udp":
            outer = IP(src=src, dst=dst, ttl=64) / UDP(sport=50000, dport=GRE_IN_UDP_PORT) / Raw(payload)
        else:
            raise SystemExit(f"unknown transport {transport}")
        if case != "oversize":
            sendp(Ether(dst=mac) / outer, iface=iface, count=count, verbose=False)
            continue
        for n in range(count):
            outer.id = OVERSIZE_ID + n
            # Built whole first, so that the outer UDP checksum covers the whole datagram.
            whole = IP(bytes(outer))
            frames = [Ether(dst=mac) / f for f in fragment(whole, fragsize=FRAGMENT_PAYLOAD)]
            sendp(frames, iface=iface, verbose=False)


if __name__ == "__main__":
    main()
