#!/usr/bin/env python3
"""Write the seed inputs of the `decide` fuzz target into fuzz/seeds/ (plain python3, no deps).

    python3 fuzz/make_seeds.py          # from the repository root

Every seed is: selector byte, 2-byte time step (big endian), packet (see
fuzz_targets/decide.rs for the selector's bits). Two families:

* gre-*: every tests/data/gre/*.hex vector, hex-decoded, behind selector 10 (UnderlayIp)
  for the "ip" framing and 11 (UnderlayUdp from host-b, 192.0.2.2) for the "udp" framing
  (read from tests/data/gre/vectors.toml); the same with bit 5 set (also `process`) and
  through the gre-udp pipeline (bit 4).
Time steps: v >= 0xf000 is (v & 0xfff) seconds, else (v & 0x3ff) milliseconds.

* inst-*: valid packets from the local instances of the fuzz topology (web-local 10.0.1.11 =
  port 1, db-local 10.0.2.20 = port 2, fw 10.0.9.9 = port 4, red-a 10.0.1.10 = port 6): a TCP
  handshake, UDP and ICMP to local, remote and routed destinations, fragments, an ICMP error,
  oversize packets, a spoofed source (also through the gre-udp pipeline, bit 4); and packets
  that host-b/host-c send through the underlay.

The output is deterministic; the script deletes seeds it no longer writes.
"""

import os
import re
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VECTORS = os.path.join(ROOT, "tests", "data", "gre")
OUT = os.path.join(HERE, "seeds")

UNDERLAY_IP = 10
UNDERLAY_UDP_B = 11
UNDERLAY_UDP_C = 12
PROCESS = 0x20
GRE_UDP_PIPELINE = 0x10

HOST_A, HOST_B, HOST_C = "192.0.2.1", "192.0.2.2", "192.0.2.3"
PORT = {"web-local": 1, "db-local": 2, "fw": 4, "red-a": 6}
IP = {
    "web-remote": "10.0.1.10",
    "web-local": "10.0.1.11",
    "db-local": "10.0.2.20",
    "db-remote": "10.0.2.30",
    "fw": "10.0.9.9",
    "fw-remote": "10.0.9.10",
    "red-a": "10.0.1.10",
    "red-b": "10.0.1.20",
}
BLUE, RED = 1001, 2002


def addr(a):
    return bytes(int(x) for x in a.split("."))


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def ipv4(src, dst, proto, payload, ident=0x1234, df=True, mf=False, offset=0, tos=0, total=None):
    flags = (0x4000 if df else 0) | (0x2000 if mf else 0) | (offset // 8)
    total = 20 + len(payload) if total is None else total
    h = struct.pack("!BBHHHBBH4s4s", 0x45, tos, total, ident, flags, 64, proto, 0,
                    addr(src), addr(dst))
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def pseudo(src, dst, proto, seg):
    return addr(src) + addr(dst) + struct.pack("!BBH", 0, proto, len(seg))


def tcp(src, dst, sport, dport, flags, seq=1000, ack=0, data=b"", **ipkw):
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 64240, 0, 0) + data
    c = csum(pseudo(src, dst, 6, seg) + seg)
    seg = seg[:16] + struct.pack("!H", c) + seg[18:]
    return ipv4(src, dst, 6, seg, **ipkw)


def udp_segment(src, dst, sport, dport, data):
    seg = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    c = csum(pseudo(src, dst, 17, seg) + seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", c) + seg[8:]


def udp(src, dst, sport, dport, data=b"vpcd-fuzz-seed", **ipkw):
    return ipv4(src, dst, 17, udp_segment(src, dst, sport, dport, data), **ipkw)


def icmp(src, dst, kind, code=0, rest=b"\0\0\0\0", data=b"", **ipkw):
    m = struct.pack("!BBH", kind, code, 0) + rest + data
    m = m[:2] + struct.pack("!H", csum(m)) + m[4:]
    return ipv4(src, dst, 1, m, **ipkw)


def echo(src, dst, ident=0x77, seq=1, **ipkw):
    return icmp(src, dst, 8, rest=struct.pack("!HH", ident, seq), data=bytes(range(56)), **ipkw)


def gre(inner, key, checksum=False):
    flags = 0x2000 | (0x8000 if checksum else 0)
    h = struct.pack("!HH", flags, 0x0800)
    if checksum:
        h += b"\0\0\0\0"
    h += struct.pack("!I", key)
    if checksum:
        c = csum(h + inner)
        h = h[:4] + struct.pack("!H", c) + h[6:]
    return h + inner


def outer(src, dst, g):
    return ipv4(src, dst, 47, g, ident=0, df=True)


def seed(sel, pkt, step=0):
    return bytes([sel]) + struct.pack("!H", step) + pkt


def vector_framings():
    """name -> framing, from vectors.toml (a tiny reader: name and framing lines only)."""
    out, name = {}, None
    with open(os.path.join(VECTORS, "vectors.toml")) as f:
        for line in f:
            m = re.match(r'\s*(name|framing)\s*=\s*"([^"]*)"', line)
            if m and m.group(1) == "name":
                name = m.group(2)
            elif m and name is not None:
                out[name] = m.group(2)
    return out


def main():
    seeds = {}
    framings = vector_framings()
    for fn in sorted(os.listdir(VECTORS)):
        if not fn.endswith(".hex"):
            continue
        name = fn[:-4]
        with open(os.path.join(VECTORS, fn)) as f:
            pkt = bytes.fromhex("".join(f.read().split()))
        sel = UNDERLAY_UDP_B if framings.get(name) == "udp" else UNDERLAY_IP
        seeds["gre-" + name] = seed(sel, pkt)
        seeds["gre-" + name + "-process"] = seed(sel | PROCESS, pkt)
        seeds["gre-" + name + "-greudp"] = seed(sel | PROCESS | GRE_UDP_PIPELINE, pkt)

    w, d, r = IP["web-local"], IP["db-local"], IP["db-remote"]
    web, db = PORT["web-local"], PORT["db-local"]
    # A local TCP connection, one packet per seed: the pipeline lives across inputs, so
    # libFuzzer's runs (and mutations) chain them into sequences.
    seeds["inst-tcp-syn"] = seed(web, tcp(w, d, 40000, 5432, 0x02))
    seeds["inst-tcp-synack"] = seed(db, tcp(d, w, 5432, 40000, 0x12, seq=5000, ack=1001), 5)
    seeds["inst-tcp-ack"] = seed(web | PROCESS, tcp(w, d, 40000, 5432, 0x10, seq=1001, ack=5001), 5)
    seeds["inst-tcp-data"] = seed(web | PROCESS, tcp(w, d, 40000, 5432, 0x18, 1001, 5001, b"x" * 200))
    seeds["inst-tcp-fin"] = seed(web, tcp(w, d, 40000, 5432, 0x11, 1201, 5001))
    seeds["inst-tcp-rst"] = seed(db, tcp(d, w, 5432, 40000, 0x04, 5001, 0))
    seeds["inst-tcp-ack-noconn"] = seed(web, tcp(w, d, 40123, 5432, 0x10))
    seeds["inst-tcp-synfin"] = seed(web, tcp(w, d, 40124, 5432, 0x03))
    seeds["inst-tcp-remote-syn"] = seed(web | PROCESS, tcp(w, r, 40001, 80, 0x02))
    seeds["inst-tcp-remote-syn-greudp"] = seed(web | PROCESS | GRE_UDP_PIPELINE, tcp(w, r, 40002, 80, 0x02))
    seeds["inst-tcp-smtp-acl-drop"] = seed(web, tcp(w, "8.8.8.8", 40003, 25, 0x02))
    seeds["inst-udp-local"] = seed(web | PROCESS, udp(w, d, 5000, 53))
    seeds["inst-udp-reply"] = seed(db, udp(d, w, 53, 5000), 10)
    seeds["inst-udp-sg-drop"] = seed(web, udp(w, d, 5000, 1500))
    seeds["inst-udp-egress-drop"] = seed(web, udp(w, d, 5000, 9999))
    seeds["inst-udp-remote"] = seed(web | PROCESS, udp(w, r, 5001, 53))
    seeds["inst-udp-fw"] = seed(web | PROCESS, udp(w, "203.0.113.5", 5002, 4000))
    seeds["inst-udp-fw-remote"] = seed(web | PROCESS, udp(w, "203.0.113.200", 5003, 4000))
    seeds["inst-udp-cgnat-remote"] = seed(web | PROCESS, udp(w, "100.64.1.1", 5004, 4000))
    seeds["inst-udp-route-drop"] = seed(web, udp(w, "198.51.100.1", 5005, 4000))
    seeds["inst-udp-internet"] = seed(web, udp(w, "8.8.8.8", 5006, 53))
    seeds["inst-udp-route-loop"] = seed(web, udp(w, "172.16.0.1", 5007, 53))
    seeds["inst-udp-no-instance"] = seed(web, udp(w, "10.0.3.3", 5008, 53))
    seeds["inst-udp-broadcast"] = seed(web, udp(w, "255.255.255.255", 68, 67))
    seeds["inst-udp-to-underlay"] = seed(web, udp(w, HOST_B, 5009, 4754))
    seeds["inst-udp-spoofed"] = seed(web, udp("10.0.1.99", d, 5010, 53))
    seeds["inst-icmp-echo"] = seed(web | PROCESS, echo(w, d))
    seeds["inst-icmp-echo-reply"] = seed(db, icmp(d, w, 0, rest=struct.pack("!HH", 0x77, 1), data=bytes(range(56))))
    seeds["inst-icmp-echo-remote"] = seed(web | PROCESS, echo(w, r, ident=0x78))
    quoted = udp(w, d, 5000, 53)[:28]
    seeds["inst-icmp-error"] = seed(db, icmp(d, w, 3, 3, data=quoted))
    seeds["inst-icmp-error-unrelated"] = seed(db, icmp(d, w, 3, 3, data=udp(w, d, 1, 2)[:28]))
    big = b"z" * 1480
    seeds["inst-oversize-df"] = seed(web | PROCESS, udp(w, d, 5011, 53, big))
    seeds["inst-oversize-nodf"] = seed(web, udp(w, d, 5012, 53, big, df=False))
    seg = udp_segment(w, d, 5013, 53, b"f" * 64)
    seeds["inst-frag-first"] = seed(web | PROCESS, ipv4(w, d, 17, seg[:32], ident=7, df=False, mf=True, total=52))
    seeds["inst-frag-later"] = seed(web | PROCESS, ipv4(w, d, 17, seg[32:], ident=7, df=False, offset=32), 1)
    # A later fragment at offset 8 would overlap a TCP header (RFC 1858).
    seeds["inst-frag-overlap"] = seed(web, ipv4(w, d, 6, b"\0" * 16, ident=8, df=False, offset=8))
    seeds["inst-fw-reply"] = seed(PORT["fw"], udp(IP["fw"], w, 4000, 5002), 3)
    seeds["inst-red-remote"] = seed(PORT["red-a"] | PROCESS, udp(IP["red-a"], IP["red-b"], 7000, 7001))
    seeds["inst-red-crosses-to-blue"] = seed(PORT["red-a"], udp(IP["red-a"], d, 7000, 53))
    seeds["inst-gre-proto"] = seed(web, ipv4(w, d, 47, gre(echo(w, d), BLUE)))
    seeds["inst-other-proto"] = seed(web, ipv4(w, d, 132, b"\0" * 12))
    seeds["inst-ipv6"] = seed(web, bytes([0x60]) + b"\0" * 39)
    seeds["inst-unknown-port"] = seed(9, udp(w, d, 5000, 53))
    seeds["inst-remote-port"] = seed(0, udp(IP["web-remote"], d, 5000, 53))
    seeds["inst-variant-swap"] = seed(0xC0 | web, udp(w, d, 5014, 53))
    seeds["inst-sweep"] = seed(0x80 | web, udp(w, d, 5015, 53), 0xF000 | 120)

    # The same instance packets through the gre-udp pipeline (3 connections, 2 per instance):
    # a few in a row reach eviction and refusals.
    for name in [n for n in seeds if n.startswith("inst-") and not n.endswith("-greudp")]:
        data = seeds[name]
        if not data[0] & GRE_UDP_PIPELINE:
            seeds[name + "-greudp"] = bytes([data[0] | GRE_UDP_PIPELINE]) + data[1:]

    # The underlay: host-b (web-remote, fw-remote, red-b) and host-c (db-remote) sending.
    rb = IP["web-remote"]
    seeds["ul-tcp-syn"] = seed(UNDERLAY_IP, outer(HOST_B, HOST_A, gre(tcp(rb, d, 41000, 5432, 0x02), BLUE)))
    seeds["ul-tcp-ack"] = seed(UNDERLAY_IP | PROCESS, outer(HOST_B, HOST_A, gre(tcp(rb, d, 41000, 5432, 0x10, 1001, 1), BLUE)))
    seeds["ul-udp-csum"] = seed(UNDERLAY_IP | PROCESS, outer(HOST_B, HOST_A, gre(udp(rb, d, 5000, 53), BLUE, True)))
    seeds["ul-udp-greudp"] = seed(UNDERLAY_UDP_B | PROCESS, gre(udp(rb, w, 5000, 5500), BLUE))
    seeds["ul-udp-from-c"] = seed(UNDERLAY_UDP_C | PROCESS, gre(udp(r, w, 5000, 5500), BLUE))
    seeds["ul-udp-wrong-sender"] = seed(UNDERLAY_UDP_C, gre(udp(rb, w, 5000, 5500), BLUE))
    seeds["ul-red"] = seed(UNDERLAY_UDP_B | PROCESS, gre(udp(IP["red-b"], IP["red-a"], 7001, 7000), RED))
    seeds["ul-fw-remote-reply"] = seed(UNDERLAY_IP, outer(HOST_B, HOST_A, gre(udp(IP["fw-remote"], w, 4000, 5003), BLUE)))
    seeds["ul-not-local"] = seed(UNDERLAY_IP, outer(HOST_B, HOST_A, gre(udp(rb, r, 5000, 53), BLUE)))
    seeds["ul-icmp-error"] = seed(UNDERLAY_IP, outer(HOST_C, HOST_A, gre(icmp(r, w, 3, 1, data=udp(w, r, 5001, 53)[:28]), BLUE)))
    seeds["ul-unknown-key"] = seed(UNDERLAY_IP, outer(HOST_B, HOST_A, gre(udp(rb, d, 5000, 53), 4242)))
    seeds["ul-not-for-us"] = seed(UNDERLAY_IP, outer(HOST_B, HOST_C, gre(udp(rb, d, 5000, 53), BLUE)))

    os.makedirs(OUT, exist_ok=True)
    for fn in os.listdir(OUT):
        if fn.endswith(".bin") and fn[:-4] not in seeds:
            os.remove(os.path.join(OUT, fn))
    for name, data in sorted(seeds.items()):
        with open(os.path.join(OUT, name + ".bin"), "wb") as f:
            f.write(data)
    print(f"{len(seeds)} seeds in {os.path.relpath(OUT, ROOT)}/")


if __name__ == "__main__":
    main()
