#!/usr/bin/python3
"""Sends TCP segments at layer 2 for tests/kernel_conntrack.rs, which compares vpcd's TCP
connection tracking with the kernel's nf_conntrack. Run inside the test's namespace: the
segments leave on IFACE (one end of a veth pair) and arrive on its peer, where the kernel
tracks them and forwards them into a dead end.

usage: ct_referee.py IFACE DST_MAC < SEGMENTS

SEGMENTS has one segment a line, sent in that order:
    SRC_IP DST_IP SPORT DPORT FLAGS SEQ ACK PAYLOAD_LEN
FLAGS is the TCP flags byte (decimal); the payload is PAYLOAD_LEN bytes of "x". Every
segment is built first (scapy computes the checksums), then all are written on one
AF_PACKET socket, so the kernel sees them in order. Prints how many were sent.
"""

import socket
import sys

from scapy.all import IP, TCP, Ether, Raw


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    iface, dst_mac = sys.argv[1], sys.argv[2]
    frames = []
    for n, line in enumerate(sys.stdin, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 8:
            sys.exit(f"line {n}: expected 8 fields, got {line!r}")
        src, dst = fields[0], fields[1]
        sport, dport, flags, seq, ack, length = (int(f) for f in fields[2:])
        p = Ether(dst=dst_mac) / IP(src=src, dst=dst, ttl=64) / TCP(
            sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=64240
        )
        if length:
            p = p / Raw(b"x" * length)
        frames.append(bytes(p))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    for f in frames:
        s.send(f)
    s.close()
    print(len(frames))


if __name__ == "__main__":
    main()
