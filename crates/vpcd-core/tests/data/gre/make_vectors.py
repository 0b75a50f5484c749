#!/usr/bin/python3
"""Regenerate the GRE test vectors for vpcd with scapy (an independent encoder).

Run from the repository root with Debian's python (the one scapy is installed for):

    /usr/bin/python3 tests/data/gre/make_vectors.py [--pcap /tmp/gre-vectors.pcap]

Writes, next to this script:
  * <name>.hex     packet bytes, lowercase hex, 32 bytes (64 hex chars) per line
  * vectors.toml   the manifest ([[vector]] tables, same order as below)

Everything is built from explicit field values, so the output is deterministic
(no timestamps, no random IP ids / ports).  Each vector is decoded back with
scapy and checked (inner_offset/inner_len, checksums, header bits) before any
file is written.  With --pcap PATH (PATH should be outside the repo, e.g. in /tmp)
the vectors are also written to a LINKTYPE_RAW pcap for tshark; "udp" vectors
are wrapped in IPv4/UDP(dport 4754) in that pcap.
"""

import json
import os
import struct
import sys

from scapy import VERSION as SCAPY_VERSION
from scapy.all import (GRE, ICMP, IP, TCP, UDP, Ether, Raw, checksum,
                       fragment, raw)

HERE = os.path.dirname(os.path.abspath(__file__))

LOCAL = "192.0.2.1"      # vpcd's underlay address (receiver of every vector)
PEER = "192.0.2.2"       # remote tunnel endpoint (sender of every vector)
VM_SRC = "10.0.1.10"
VM_DST = "10.0.2.20"
KEY = 1001
GRE_IN_UDP_PORT = 4754   # RFC 8086
UDP_SPORT = 49152        # only used to wrap "udp" vectors for the pcap; not in the vectors
IPPROTO_GRE = 47
IPPROTO_UDP = 17
UDP_PAYLOAD = b"vpcd-test-payload-01"
assert len(UDP_PAYLOAD) == 20

# --------------------------------------------------------------------------
# inner packets (10.0.1.10 -> 10.0.2.20, TTL 64, id 0x1234, DF)


def inner_ip(dst=VM_DST, **kw):
    f = dict(version=4, ihl=5, tos=0, id=0x1234, flags="DF", frag=0, ttl=64,
             src=VM_SRC, dst=dst)
    f.update(kw)
    return IP(**f)


def inner_icmp(dst=VM_DST, **ipkw):
    return (inner_ip(dst, **ipkw)
            / ICMP(type=8, code=0, id=0x77, seq=1)
            / Raw(bytes(range(56))))          # 00 01 02 ... 37


def inner_tcp():
    return (inner_ip()
            / TCP(sport=40000, dport=80, seq=1000, ack=0, dataofs=5, reserved=0,
                  flags="S", window=64240, urgptr=0, options=[]))


def inner_udp():
    return inner_ip() / UDP(sport=5000, dport=53) / Raw(UDP_PAYLOAD)


# --------------------------------------------------------------------------
# GRE header (RFC 2784/2890).  scapy field names vs RFC 2784 bit numbers:
#   bit 0 chksum_present (C)      bit 1 routing_present (R, RFC 1701)
#   bit 2 key_present (K)         bit 3 seqnum_present (S)
#   bit 4 strict_route_source     bits 5-7 recursion_control (3 bits)
#   bits 8-12 flags (5 bits)      bits 13-15 version
#   "offset" = RFC 2784 Reserved1 (RFC 1701 name), present iff C or R.


def gre(key=KEY, csum=False, seq=None, proto=0x0800, **kw):
    f = dict(chksum_present=int(csum), routing_present=0,
             key_present=int(key is not None), seqnum_present=int(seq is not None),
             strict_route_source=0, recursion_control=0, flags=0, version=0,
             proto=proto)
    if csum:
        f["offset"] = 0              # Reserved1 = 0; chksum left None -> scapy computes it
    if key is not None:
        f["key"] = key
    if seq is not None:
        f["sequence_number"] = seq
    f.update(kw)
    return GRE(**f)


def outer_ip(payload, tos=0, proto=IPPROTO_GRE, flags="DF", frag=0):
    """Outer IPv4 as vpcd emits it (apart from src/dst, which are the peer's view)."""
    return IP(version=4, ihl=5, tos=tos, id=0, flags=flags, frag=frag, ttl=64,
              proto=proto, src=PEER, dst=LOCAL) / Raw(payload)


def tos_of(inner):
    return raw(inner)[1]


# --------------------------------------------------------------------------
# vector table

VECTORS = []


def add(name, framing, expect, gre_bytes=None, data=None, inner=None, key=None,
        drop=None, note="", tos=0):
    """gre_bytes: GRE header + payload.  For framing "ip" it is wrapped in the
    standard outer IPv4 unless `data` (the full vector) is given."""
    if data is None:
        data = raw(outer_ip(gre_bytes, tos=tos)) if framing == "ip" else gre_bytes
    if framing == "udp":
        wire = raw(IP(version=4, ihl=5, tos=tos, id=0, flags="DF", frag=0, ttl=64,
                      proto=IPPROTO_UDP, src=PEER, dst=LOCAL)
                   / UDP(sport=UDP_SPORT, dport=GRE_IN_UDP_PORT) / Raw(data))
    else:
        wire = data
    v = dict(name=name, framing=framing, outer_src=PEER, outer_dst=LOCAL,
             expect=expect, note=note, data=data, wire=wire)
    if expect == "decap":
        ib = raw(inner)
        v.update(key=key, inner_offset=len(data) - len(ib), inner_len=len(ib),
                 inner_bytes=ib)
    else:
        v.update(drop=drop)
    VECTORS.append(v)


def decap(name, inner, key=KEY, csum=False, seq=None, framing="ip", note="", **grekw):
    g = gre(key=key, csum=csum, seq=seq, **grekw) / inner
    add(name, framing, "decap", gre_bytes=raw(g), inner=inner, key=key,
        note=note, tos=tos_of(inner))


def build():
    # ---------------- decap (also the byte-exact encap references) ----------------
    decap("key-icmp", inner_icmp(), note="K, key 1001, inner ICMP echo request")
    decap("key-tcp", inner_tcp(), note="K, key 1001, inner TCP SYN")
    decap("key-udp", inner_udp(), note="K, key 1001, inner UDP 5000->53")
    decap("csum-key-icmp", inner_icmp(), csum=True,
          note="C+K, correct GRE checksum, Reserved1 0, key 1001, inner ICMP")
    decap("seq-key-icmp", inner_icmp(), seq=7,
          note="K+S, key 1001, sequence 7 (never emitted by vpcd, tolerated on input)")
    decap("key-max", inner_icmp(), key=0xFFFFFFFF, note="K, key 0xffffffff, inner ICMP")
    decap("key-zero", inner_icmp(), key=0,
          note="K, key 0 (key 0 is not no key: decap with key 0), inner ICMP")
    decap("udp-key-icmp", inner_icmp(), framing="udp",
          note="GRE-in-UDP payload (dport 4754), K, key 1001, inner ICMP")
    decap("udp-csum-key-tcp", inner_tcp(), csum=True, framing="udp",
          note="GRE-in-UDP payload (dport 4754), C+K, key 1001, inner TCP SYN")
    # bits 6, 9, 12 set: recursion_control=0b010 (bit 6), flags=0b01001 (bits 9, 12)
    decap("reserved0-bits-ignored", inner_icmp(), recursion_control=2, flags=0x09,
          note="K, key 1001, reserved0 bits 6, 9 and 12 set (RFC 2784 2.3: ignored on receipt)")

    # ---------------- hostile (drop) ----------------
    key_icmp_gre = raw(gre() / inner_icmp())
    csum_key_icmp_gre = raw(gre(csum=True) / inner_icmp())

    def drop(name, reason, gre_bytes=None, data=None, note=""):
        add(name, "ip", "drop", gre_bytes=gre_bytes, data=data, drop=reason, note=note)

    drop("truncated-base", "GreTruncated", key_icmp_gre[:2],
         note="only 2 bytes of GRE (first 2 bytes of key-icmp's GRE header)")
    drop("truncated-key", "GreTruncated", key_icmp_gre[:6],
         note="K set but only 6 GRE bytes (key cut after 2 bytes)")
    drop("truncated-csum-key", "GreTruncated", csum_key_icmp_gre[:8],
         note="C+K set but only 8 GRE bytes (checksum+reserved1 present, key missing)")
    drop("version-1", "GreBadVersion", raw(gre(version=1) / inner_icmp()),
         note="K, key 1001, version field 1, inner ICMP")
    # scapy's GRE adds the RFC 1701 checksum/offset words whenever routing_present=1,
    # so build key-icmp's header and flip bit 1 in the bytes: R is then the only difference.
    rb = bytearray(key_icmp_gre)
    rb[0] |= 0x40
    drop("routing-bit", "GreReservedBits", bytes(rb),
         note="key-icmp with bit 1 (R, RFC 1701 routing present) set, no other change")
    drop("reserved-bit-4", "GreReservedBits",
         raw(gre(strict_route_source=1) / inner_icmp()),
         note="K, key 1001, reserved0 bit 4 (RFC 1701 strict source route) set, inner ICMP")
    drop("reserved-bit-5", "GreReservedBits",
         raw(gre(recursion_control=4) / inner_icmp()),
         note="K, key 1001, reserved0 bit 5 (MSB of RFC 1701 recursion control) set, inner ICMP")
    drop("no-key", "GreNoKey", raw(gre(key=None) / inner_icmp()),
         note="K clear (4-byte GRE header), inner ICMP")
    drop("proto-mismatch", "GreProtocolMismatch",
         raw(gre(proto=0x86DD) / inner_icmp()),
         note="K, key 1001, protocol type 0x86DD but the payload is an IPv4 ICMP packet")
    drop("proto-ethernet", "GreProtocolUnsupported",
         raw(gre(proto=0x6558)
             / Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01", type=0x0800)
             / inner_icmp()),
         note="K, key 1001, protocol type 0x6558 (transparent ethernet bridging) with an Ethernet/IPv4/ICMP frame")
    good = GRE(csum_key_icmp_gre).chksum
    wrong = good ^ 0x5A5A
    bad = raw(gre(csum=True, chksum=wrong) / inner_icmp())
    assert checksum(bad) != 0 and bad[4:6] != csum_key_icmp_gre[4:6]
    assert bad[:4] + bad[6:] == csum_key_icmp_gre[:4] + csum_key_icmp_gre[6:]
    drop("bad-checksum", "GreBadChecksum", bad,
         note="csum-key-icmp with the GRE checksum replaced by 0x%04x (correct is 0x%04x)" % (wrong, good))
    drop("outer-fragment-nonfirst", "OuterFragment",
         data=raw(outer_ip(key_icmp_gre, flags=0, frag=8)),
         note="outer IPv4 fragment offset 8 (64 bytes), MF=0, DF=0, payload is key-icmp's valid GRE+inner bytes")
    # A real first fragment: scapy's fragment() of the key-icmp packet (DF clear), 64-byte fragments.
    frags = fragment(IP(version=4, ihl=5, tos=0, id=0, flags=0, frag=0, ttl=64,
                        proto=IPPROTO_GRE, src=PEER, dst=LOCAL) / Raw(key_icmp_gre),
                     fragsize=64)
    assert len(frags) == 2
    first = raw(frags[0])
    drop("outer-fragment-first", "OuterFragment", data=first,
         note="first fragment (offset 0, MF=1, DF=0) of key-icmp cut by scapy fragment() at 64 bytes: GRE header + 56 inner bytes")
    drop("outer-not-gre", "OuterNotGre",
         data=raw(outer_ip(key_icmp_gre, proto=IPPROTO_UDP)),
         note="outer IPv4 protocol 17 (not 47) carrying key-icmp's GRE bytes")
    drop("inner-bad-version", "InnerNotIpv4", raw(gre() / inner_icmp(version=5)),
         note="K, key 1001, inner ICMP packet with version nibble 5 (header checksum correct)")
    drop("inner-ihl-4", "InnerBadIhl", raw(gre() / inner_icmp(ihl=4)),
         note="K, key 1001, inner ICMP packet with IHL 4 (20 header bytes present, checksum over 20 bytes)")
    drop("inner-length-mismatch", "InnerLengthMismatch", raw(gre() / inner_icmp(len=84 + 10)),
         note="K, key 1001, inner total length 94 but only 84 bytes present (header checksum correct)")
    loop_inner = (inner_ip(dst=LOCAL, proto=IPPROTO_GRE) / gre() / inner_icmp())
    drop("inner-gre-loop", "TunnelLoop", raw(gre() / loop_inner),
         note="K, key 1001, inner 10.0.1.10->192.0.2.1 proto 47 carrying GRE(K, 1001)/IPv4/ICMP")
    drop("inner-to-underlay", "InnerDstUnderlay", raw(gre() / inner_icmp(dst=LOCAL)),
         note="K, key 1001, inner ICMP echo 10.0.1.10->192.0.2.1 (the underlay address)")


# --------------------------------------------------------------------------
# verification (decode back with scapy)


def l4_checksums_ok(ip):
    """Recompute IP and L4 checksums with scapy and compare with the received bytes."""
    rebuilt = ip.copy()
    del rebuilt.chksum
    for layer in (ICMP, TCP, UDP):
        if layer in rebuilt:
            del rebuilt[layer].chksum
    return raw(rebuilt) == raw(ip)


def check_outer(v):
    d = v["data"]
    o = IP(d)
    assert o.version == 4 and o.ihl == 5 and o.len == len(d), v["name"]
    assert checksum(d[:20]) == 0, v["name"]                 # header checksum correct
    assert (o.src, o.dst, o.ttl, o.id) == (PEER, LOCAL, 64, 0), v["name"]
    return o


def verify(v):
    name, d = v["name"], v["data"]
    if v["framing"] == "ip":
        o = check_outer(v)
        if v["expect"] == "drop":
            return
        assert o.proto == IPPROTO_GRE and o.flags == "DF" and o.frag == 0, name
        assert GRE in o, name
        g = o[GRE]
        gre_off = 20
        assert o.tos == v["inner_bytes"][1], name          # TOS copied from inner
    else:
        if v["expect"] == "drop":
            return
        g = GRE(d)
        gre_off = 0
        w = IP(v["wire"])
        assert w[UDP].dport == GRE_IN_UDP_PORT and raw(w[UDP].payload) == d, name
        assert l4_checksums_ok(w), name
    gb = d[gre_off:]
    assert g.version == 0 and g.routing_present == 0 and g.strict_route_source == 0, name
    assert g.key_present == 1 and g.key == v["key"], name
    assert g.proto == 0x0800, name
    hlen = 4 + 4 * (g.chksum_present | g.routing_present) + 4 * g.key_present + 4 * g.seqnum_present
    if g.chksum_present:
        assert g.offset == 0, name                          # Reserved1
        assert checksum(gb) == 0, name                      # checksum over GRE header + payload
    if g.seqnum_present:
        assert g.sequence_number == 7, name
    assert v["inner_offset"] == gre_off + hlen, name
    assert v["inner_len"] == len(d) - v["inner_offset"], name
    inner = g.payload
    assert isinstance(inner, IP), name
    assert raw(inner) == d[v["inner_offset"]:] == v["inner_bytes"], name
    assert inner.len == v["inner_len"] and inner.ihl == 5, name
    assert (inner.src, inner.dst, inner.ttl, inner.id, inner.flags) == (VM_SRC, VM_DST, 64, 0x1234, "DF"), name
    assert l4_checksums_ok(inner), name


def check_header_bits():
    """Pin the RFC 2784 bit positions against scapy's field names."""
    by = {v["name"]: v["data"] for v in VECTORS}
    g = lambda n, off=20: by[n][off:off + 2]
    assert g("key-icmp") == b"\x20\x00"
    assert g("csum-key-icmp") == b"\xa0\x00"
    assert g("seq-key-icmp") == b"\x30\x00"
    assert g("udp-key-icmp", 0) == b"\x20\x00"
    assert g("udp-csum-key-tcp", 0) == b"\xa0\x00"
    assert g("reserved0-bits-ignored") == b"\x22\x48"      # bits 2 (K), 6, 9, 12
    assert g("version-1") == b"\x20\x01"
    assert g("routing-bit") == b"\x60\x00"
    assert g("reserved-bit-4") == b"\x28\x00"
    assert g("reserved-bit-5") == b"\x24\x00"
    assert g("no-key") == b"\x00\x00"
    assert g("truncated-csum-key") == b"\xa0\x00"
    assert len(by["truncated-base"]) == 22 and len(by["truncated-key"]) == 26
    assert len(by["truncated-csum-key"]) == 28
    assert by["key-icmp"][20:28] == bytes.fromhex("20000800000003e9")
    f = IP(by["outer-fragment-nonfirst"])
    assert f.frag == 8 and f.flags == 0 and by["outer-fragment-nonfirst"][20:] == by["key-icmp"][20:]
    f = IP(by["outer-fragment-first"])
    assert f.frag == 0 and f.flags == "MF" and len(f.payload) == 64
    assert IP(by["outer-not-gre"]).proto == IPPROTO_UDP
    assert by["inner-bad-version"][28] == 0x55 and by["inner-ihl-4"][28] == 0x44


# --------------------------------------------------------------------------
# output


def to_hex(b):
    h = b.hex()
    return "".join(h[i:i + 64] + "\n" for i in range(0, len(h), 64))


def toml_str(s):
    return json.dumps(s, ensure_ascii=True)   # JSON escapes are valid TOML basic-string escapes


def manifest():
    out = ["# GRE test vectors for vpcd, generated by make_vectors.py with scapy %s." % SCAPY_VERSION,
           "# Do not edit by hand: run `/usr/bin/python3 tests/data/gre/make_vectors.py` from the repo root.",
           ""]
    for v in VECTORS:
        out.append("[[vector]]")
        out.append("name = %s" % toml_str(v["name"]))
        out.append("framing = %s" % toml_str(v["framing"]))
        out.append("outer_src = %s" % toml_str(v["outer_src"]))
        out.append("outer_dst = %s" % toml_str(v["outer_dst"]))
        out.append("expect = %s" % toml_str(v["expect"]))
        if v["expect"] == "decap":
            out.append("key = %d" % v["key"])
            out.append("inner_offset = %d" % v["inner_offset"])
            out.append("inner_len = %d" % v["inner_len"])
        else:
            out.append("drop = %s" % toml_str(v["drop"]))
        out.append("note = %s" % toml_str(v["note"]))
        out.append("")
    return "\n".join(out)


def write_pcap(path):
    """Classic pcap, LINKTYPE_RAW (101: packet starts at the IPv4 header), frame i at t=i s.
    Written by hand (scapy's PcapWriter warns about Raw packets having no link type)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
        for i, v in enumerate(VECTORS):
            w = v["wire"]
            f.write(struct.pack("<IIII", i, 0, len(w), len(w)) + w)


def main(argv):
    print("scapy %s" % SCAPY_VERSION)
    build()
    names = [v["name"] for v in VECTORS]
    assert len(names) == len(set(names))
    for v in VECTORS:
        verify(v)
    check_header_bits()
    for v in VECTORS:
        with open(os.path.join(HERE, v["name"] + ".hex"), "w") as f:
            f.write(to_hex(v["data"]))
    for fn in sorted(os.listdir(HERE)):             # drop stale vectors
        if fn.endswith(".hex") and fn[:-4] not in names:
            os.remove(os.path.join(HERE, fn))
    with open(os.path.join(HERE, "vectors.toml"), "w") as f:
        f.write(manifest())
    if "--pcap" in argv:
        write_pcap(argv[argv.index("--pcap") + 1])
    for v in VECTORS:
        extra = ("key=%d inner=%d+%d" % (v["key"], v["inner_offset"], v["inner_len"])
                 if v["expect"] == "decap" else v["drop"])
        print("%-26s %-3s %4d bytes  %-5s %s" % (v["name"], v["framing"], len(v["data"]),
                                                  v["expect"], extra))
    print("wrote %d vectors + vectors.toml to %s" % (len(VECTORS), HERE))


if __name__ == "__main__":
    main(sys.argv[1:])
