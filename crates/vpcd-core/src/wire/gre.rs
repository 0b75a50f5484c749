//! GRE (RFC 2784, with the key and sequence extensions of RFC 2890) and GRE-in-UDP (RFC 8086).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |C|R|K|S|s|Recur| Reserved0       | Ver |         Protocol Type |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |      Checksum (optional)      |       Reserved1 (optional)    |
//! |                         Key (optional)                        |
//! |                 Sequence Number (optional)                    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//! Bit 1 (R, routing present in RFC 1701) and bits 4 and 5 (strict source route, recursion in
//! RFC 1701) must be zero for an RFC 2784 receiver; bits 6–12 are ignored (RFC 2784 §2.3).

use std::net::Ipv4Addr;

use super::buf::{NoHeadroom, PacketBuf};
use super::gso::Cut;
use super::ipv4;
use crate::reason::DropReason;

/// UDP destination port of GRE-in-UDP (RFC 8086 §3.1).
pub const UDP_PORT: u16 = 4754;
/// EtherType of IPv4, the only payload vpcd carries.
pub const PROTO_IPV4: u16 = 0x0800;
/// EtherType of IPv6 (recognised to give a precise drop reason).
pub const PROTO_IPV6: u16 = 0x86dd;

mod flag {
    pub const CHECKSUM: u16 = 0x8000;
    pub const ROUTING: u16 = 0x4000;
    pub const KEY: u16 = 0x2000;
    pub const SEQUENCE: u16 = 0x1000;
    /// Bits 4 and 5: strict source route and the first recursion bit of RFC 1701.
    pub const RESERVED_4_5: u16 = 0x0c00;
    pub const VERSION: u16 = 0x0007;
}

/// A parsed GRE header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GreHeader {
    /// The C bit was set and the checksum verified.
    pub checksum_present: bool,
    /// The key, when the K bit is set.
    pub key: Option<u32>,
    /// The sequence number, when the S bit is set (tolerated, not enforced).
    pub sequence: Option<u32>,
    /// The protocol type (an EtherType).
    pub protocol: u16,
    /// Header length in bytes: 4 + 4·C + 4·K + 4·S.
    pub len: usize,
}

/// Parses and checks the GRE header at the start of `bytes` (which runs to the end of the GRE
/// payload, as the checksum covers it).
pub fn parse(bytes: &[u8]) -> Result<GreHeader, DropReason> {
    let Some(base) = bytes.get(..4) else {
        return Err(DropReason::GreTruncated);
    };
    let flags = u16::from_be_bytes([base[0], base[1]]);
    if flags & flag::VERSION != 0 {
        return Err(DropReason::GreBadVersion);
    }
    if flags & (flag::ROUTING | flag::RESERVED_4_5) != 0 {
        return Err(DropReason::GreReservedBits);
    }
    let c = flags & flag::CHECKSUM != 0;
    let k = flags & flag::KEY != 0;
    let s = flags & flag::SEQUENCE != 0;
    let len = 4 + 4 * (c as usize + k as usize + s as usize);
    if bytes.len() < len {
        return Err(DropReason::GreTruncated);
    }
    if c && ipv4::checksum(bytes) != 0 {
        return Err(DropReason::GreBadChecksum);
    }
    let word =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let mut at = 4 + 4 * c as usize;
    let key = k.then(|| word(at));
    at += 4 * k as usize;
    let sequence = s.then(|| word(at));
    Ok(GreHeader {
        checksum_present: c,
        key,
        sequence,
        protocol: u16::from_be_bytes([base[2], base[3]]),
        len,
    })
}

/// GRE header length vpcd emits: base + key, plus 4 with a checksum.
pub const fn header_len(key: bool, checksum: bool) -> usize {
    4 + 4 * key as usize + 4 * checksum as usize
}

/// Bytes of encapsulation in front of an inner packet: outer IPv4 (for the `gre` transport;
/// GRE-in-UDP's IPv4 and UDP headers are the socket's) plus GRE.
pub const fn encap_len(outer_ip: bool, key: bool, checksum: bool) -> usize {
    header_len(key, checksum) + if outer_ip { ipv4::HEADER_LEN } else { 0 }
}

/// Writes the encapsulation into the front of `frame`, which holds
/// [`encap_len`]`(outer.is_some(), key.is_some(), checksum)` free bytes followed by the inner
/// packet: the outer IPv4 header when `outer` gives (source, destination), then GRE (protocol
/// IPv4, the key when given, the checksum when asked).
pub fn write_encap(
    frame: &mut [u8],
    outer: Option<(Ipv4Addr, Ipv4Addr)>,
    key: Option<u32>,
    checksum: bool,
) {
    write_encap_gathered(frame, &[], outer, key, checksum);
}

/// [`write_encap`] for a packet sent in two parts: `head` (the free bytes, then the start of
/// the inner packet) followed by `tail` (the rest of it, elsewhere in memory).
pub fn write_encap_gathered(
    head: &mut [u8],
    tail: &[u8],
    outer: Option<(Ipv4Addr, Ipv4Addr)>,
    key: Option<u32>,
    checksum: bool,
) {
    let ip_len = if outer.is_some() { ipv4::HEADER_LEN } else { 0 };
    let len = header_len(key.is_some(), checksum);
    let tos_at = ip_len + len + 1;
    let tos = match head.get(tos_at) {
        Some(&b) => b,
        None => tail.get(tos_at - head.len()).copied().unwrap_or(0),
    };
    let g = &mut head[ip_len..];
    let mut flags = 0u16;
    if checksum {
        flags |= flag::CHECKSUM;
    }
    if key.is_some() {
        flags |= flag::KEY;
    }
    g[0..2].copy_from_slice(&flags.to_be_bytes());
    g[2..4].copy_from_slice(&PROTO_IPV4.to_be_bytes());
    let mut at = 4;
    if checksum {
        g[4..8].fill(0);
        at = 8;
    }
    if let Some(k) = key {
        g[at..at + 4].copy_from_slice(&k.to_be_bytes());
    }
    if checksum {
        // RFC 2784 §2.5: the checksum covers the GRE header and the payload. Both parts are
        // summed as one stream, so an odd-length first part would misalign the second.
        debug_assert!(g.len().is_multiple_of(2) || tail.is_empty());
        let c = super::csum::Sum::new()
            .add_bytes(g)
            .add_bytes(tail)
            .checksum();
        g[4..6].copy_from_slice(&c.to_be_bytes());
    }
    if let Some((src, dst)) = outer {
        let total = (head.len() + tail.len()) as u16;
        ipv4::emit_header(head, src, dst, ipv4::proto::GRE, tos, total);
    }
}

/// Writes the headers of every segment of the super-packet `pkt`, cut as `cut`, into
/// `heads`: `encap` followed by the segment's own IPv4 and transport headers (checksums over
/// the payload where it lies). Returns (the distance between two segments' headers, their
/// length); `heads` grows as needed.
pub fn segment_heads(pkt: &[u8], cut: &Cut, encap: &Encap, heads: &mut Vec<u8>) -> (usize, usize) {
    let prefix = encap.overhead();
    let head_len = prefix + cut.headers;
    let stride = head_len.next_multiple_of(8);
    if heads.len() < cut.count * stride {
        heads.resize(cut.count * stride, 0);
    }
    for i in 0..cut.count {
        let chunk = &pkt[cut.payload(i)];
        let h = &mut heads[i * stride..i * stride + head_len];
        cut.write_header(pkt, i, chunk, &mut h[prefix..]);
        encap.write(h, chunk);
    }
    (stride, head_len)
}

/// Where the inner packet of an underlay frame starts, if its headers are plausible: after
/// the outer IPv4 header (`outer_ip`, the `gre` transport as a raw socket delivers it) and the
/// GRE header, however long its flags make it. A peek, not a check (the pipeline parses the
/// frame properly; this only picks the worker that decides it): a frame too short for its
/// headers has an empty inner packet.
pub fn peek_inner(frame: &[u8], outer_ip: bool) -> &[u8] {
    let gre_at = if outer_ip {
        frame.first().map_or(0, |b| usize::from(b & 0x0f) * 4)
    } else {
        0
    };
    let Some(flags) = frame.get(gre_at..gre_at + 2) else {
        return &[];
    };
    let f = u16::from_be_bytes([flags[0], flags[1]]);
    let len = 4
        + 4 * ((f >> 15) & 1) as usize
        + 4 * ((f >> 13) & 1) as usize
        + 4 * ((f >> 12) & 1) as usize;
    frame.get(gre_at + len..).unwrap_or(&[])
}

/// The encapsulation of a packet for the underlay, as a value: the outer IPv4 header's
/// (source, destination) for the `gre` transport (`None` for GRE-in-UDP, whose IPv4 and UDP
/// headers are the socket's), the GRE key, and whether GRE carries a checksum. Written in front
/// of a whole packet ([`Encap::prepend`]) or of each segment of a cut super-packet
/// ([`Encap::write`]), the same bytes either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Encap {
    /// The outer IPv4 header's (source, destination); `None` for GRE-in-UDP.
    pub outer: Option<(Ipv4Addr, Ipv4Addr)>,
    /// The GRE key; `None` for the basic network.
    pub key: Option<u32>,
    /// Emit a GRE checksum.
    pub checksum: bool,
}

impl Encap {
    /// Bytes of headers in front of the inner packet ([`encap_len`]).
    pub const fn overhead(&self) -> usize {
        encap_len(self.outer.is_some(), self.key.is_some(), self.checksum)
    }

    /// Writes the headers into the first [`Encap::overhead`] bytes of `head`, the inner packet
    /// following in the rest of `head` and then `tail` ([`write_encap_gathered`]).
    pub fn write(&self, head: &mut [u8], tail: &[u8]) {
        write_encap_gathered(head, tail, self.outer, self.key, self.checksum);
    }

    /// Prepends the headers to the inner packet in `buf`, in place.
    pub fn prepend(&self, buf: &mut PacketBuf) -> Result<(), NoHeadroom> {
        buf.push_front(self.overhead())?;
        self.write(buf.as_mut_slice(), &[]);
        Ok(())
    }
}

/// Prepends a GRE header (protocol IPv4, key when given, checksum when asked) in place.
pub fn push_header(
    buf: &mut PacketBuf,
    key: Option<u32>,
    checksum: bool,
) -> Result<(), NoHeadroom> {
    buf.push_front(header_len(key.is_some(), checksum))?;
    write_encap(buf.as_mut_slice(), None, key, checksum);
    Ok(())
}

/// Encapsulates the inner IPv4 packet in `buf` for the `gre` transport: prepends GRE and an
/// outer IPv4 header (protocol 47, TOS copied from the inner packet) in place.
pub fn encapsulate_ip(
    buf: &mut PacketBuf,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    key: Option<u32>,
    checksum: bool,
) -> Result<(), NoHeadroom> {
    buf.push_front(encap_len(true, key.is_some(), checksum))?;
    write_encap(buf.as_mut_slice(), Some((src, dst)), key, checksum);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gre(flags: u16, proto: u16, rest: &[u8]) -> Vec<u8> {
        let mut v = flags.to_be_bytes().to_vec();
        v.extend_from_slice(&proto.to_be_bytes());
        v.extend_from_slice(rest);
        v
    }

    #[test]
    fn key_and_sequence_are_read() {
        let h = parse(&gre(0x3000, PROTO_IPV4, &[0, 0, 3, 0xe9, 0, 0, 0, 7])).unwrap();
        assert_eq!(h.key, Some(1001));
        assert_eq!(h.sequence, Some(7));
        assert_eq!(h.len, 12);
        assert!(!h.checksum_present);
    }

    #[test]
    fn length_must_cover_the_announced_fields() {
        assert_eq!(parse(&[0x20, 0]), Err(DropReason::GreTruncated));
        assert_eq!(
            parse(&gre(0x2000, PROTO_IPV4, &[0, 0])),
            Err(DropReason::GreTruncated)
        );
        assert_eq!(
            parse(&gre(0xa000, PROTO_IPV4, &[0; 4])),
            Err(DropReason::GreTruncated)
        );
        assert_eq!(
            parse(&gre(0x3000, PROTO_IPV4, &[0; 4])),
            Err(DropReason::GreTruncated)
        );
    }

    #[test]
    fn version_routing_and_reserved_bits() {
        assert_eq!(
            parse(&gre(0x2001, PROTO_IPV4, &[0; 4])),
            Err(DropReason::GreBadVersion)
        );
        assert_eq!(
            parse(&gre(0x6000, PROTO_IPV4, &[0; 4])),
            Err(DropReason::GreReservedBits)
        );
        assert_eq!(
            parse(&gre(0x2800, PROTO_IPV4, &[0; 4])),
            Err(DropReason::GreReservedBits)
        );
        assert_eq!(
            parse(&gre(0x2400, PROTO_IPV4, &[0; 4])),
            Err(DropReason::GreReservedBits)
        );
        // Bits 6-12 are ignored (RFC 2784 §2.3).
        assert!(parse(&gre(0x23f8, PROTO_IPV4, &[0; 4])).is_ok());
    }

    #[test]
    fn emitted_checksum_verifies_and_corruption_is_caught() {
        let mut b = PacketBuf::from_packet(&[0x45, 1, 2, 3, 4, 5, 6]);
        push_header(&mut b, Some(42), true).unwrap();
        let h = parse(b.as_slice()).unwrap();
        assert!(h.checksum_present);
        assert_eq!(h.key, Some(42));
        b.as_mut_slice()[13] ^= 0xff;
        assert_eq!(parse(b.as_slice()), Err(DropReason::GreBadChecksum));
    }

    #[test]
    fn encapsulation_prepends_in_place() {
        let inner = ipv4::tests::packet([10, 0, 1, 10], [10, 0, 2, 20], ipv4::proto::UDP, &[0; 8]);
        let mut b = PacketBuf::from_packet(&inner);
        let at = b.as_slice().as_ptr();
        encapsulate_ip(
            &mut b,
            Ipv4Addr::new(192, 0, 2, 1),
            Ipv4Addr::new(192, 0, 2, 2),
            Some(1001),
            false,
        )
        .unwrap();
        assert_eq!(b.len(), inner.len() + 28);
        assert_eq!(
            b.as_slice()[28..].as_ptr(),
            at,
            "the inner packet did not move"
        );
        assert_eq!(&b.as_slice()[28..], &inner[..]);
        assert_eq!(ipv4::checksum(&b.as_slice()[..20]), 0);
        assert_eq!(b.as_slice()[9], ipv4::proto::GRE);
        assert_eq!(parse(&b.as_slice()[20..]).unwrap().key, Some(1001));
    }

    /// The peek finds the inner packet behind every header length the flags announce, with
    /// and without the outer IPv4 header, and nothing in a frame shorter than its headers.
    #[test]
    fn the_peek_finds_the_inner_packet() {
        let inner = ipv4::tests::packet([10, 0, 1, 10], [10, 0, 2, 20], ipv4::proto::UDP, &[0; 8]);
        let (src, dst) = (Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2));
        for (key, checksum) in [
            (None, false),
            (Some(7), false),
            (None, true),
            (Some(7), true),
        ] {
            for outer in [None, Some((src, dst))] {
                let mut b = PacketBuf::from_packet(&inner);
                Encap {
                    outer,
                    key,
                    checksum,
                }
                .prepend(&mut b)
                .unwrap();
                assert_eq!(peek_inner(b.as_slice(), outer.is_some()), &inner[..]);
                let headers = b.len() - inner.len();
                assert_eq!(
                    peek_inner(&b.as_slice()[..headers - 1], outer.is_some()),
                    b""
                );
            }
        }
        // A sequence number (never emitted by vpcd) is skipped too.
        let seq = gre(0x1000, PROTO_IPV4, &[0, 0, 0, 9, 0x45]);
        assert_eq!(peek_inner(&seq, false), &[0x45]);
        assert_eq!(peek_inner(&[], true), b"");
    }

    /// The encapsulation as a value writes what `encapsulate_ip` and `push_header` write, in
    /// front of a whole packet or of a packet in two parts.
    #[test]
    fn encap_writes_the_same_bytes_whole_or_gathered() {
        let inner = ipv4::tests::packet([10, 0, 1, 10], [10, 0, 2, 20], ipv4::proto::TCP, &[7; 30]);
        let (src, dst) = (Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2));
        for (key, checksum) in [(None, false), (Some(7), true), (Some(1001), false)] {
            for outer in [None, Some((src, dst))] {
                let e = Encap {
                    outer,
                    key,
                    checksum,
                };
                let mut expected = PacketBuf::from_packet(&inner);
                match outer {
                    Some((s, d)) => encapsulate_ip(&mut expected, s, d, key, checksum).unwrap(),
                    None => push_header(&mut expected, key, checksum).unwrap(),
                }
                let mut whole = PacketBuf::from_packet(&inner);
                e.prepend(&mut whole).unwrap();
                assert_eq!(whole.as_slice(), expected.as_slice());
                assert_eq!(e.overhead(), expected.len() - inner.len());
                // Split after the inner IPv4 header: headers and the first part in `head`.
                let mut head = vec![0; e.overhead() + 20];
                head[e.overhead()..].copy_from_slice(&inner[..20]);
                e.write(&mut head, &inner[20..]);
                assert_eq!([&head[..], &inner[20..]].concat(), expected.as_slice());
            }
        }
    }
}
