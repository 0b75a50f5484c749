//! IPv4: the inner packet view the policy reads, and the outer header vpcd emits.
//!
//! Parsing uses etherparse's slicing API (no allocation, no copy); what the pipeline needs is
//! gathered into one small [`Ipv4Packet`] so that every later stage reads plain fields.

use std::net::Ipv4Addr;

use etherparse::{Ipv4HeaderSlice, TcpHeaderSlice, UdpHeaderSlice};

use crate::reason::DropReason;

/// IP protocol numbers vpcd looks at.
pub mod proto {
    /// ICMP (RFC 792).
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// GRE (RFC 2784).
    pub const GRE: u8 = 47;
}

/// Length of an IPv4 header without options.
pub const HEADER_LEN: usize = 20;

/// ICMP message types vpcd distinguishes (RFC 792).
pub mod icmp_type {
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// Destination unreachable (code 4: fragmentation needed).
    pub const DEST_UNREACHABLE: u8 = 3;
    /// Source quench (deprecated, still an error message).
    pub const SOURCE_QUENCH: u8 = 4;
    /// Redirect.
    pub const REDIRECT: u8 = 5;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 8;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 11;
    /// Parameter problem.
    pub const PARAMETER_PROBLEM: u8 = 12;

    /// True for the error messages that quote the packet that caused them.
    pub const fn is_error(t: u8) -> bool {
        matches!(
            t,
            DEST_UNREACHABLE | SOURCE_QUENCH | REDIRECT | TIME_EXCEEDED | PARAMETER_PROBLEM
        )
    }

    /// True for the queries and replies that carry an identifier (RFC 792, RFC 950): echo,
    /// timestamp, information and address mask.
    pub const fn has_ident(t: u8) -> bool {
        matches!(t, ECHO_REPLY | ECHO_REQUEST | 13..=18)
    }

    /// The identifier of an ICMP message whose 8-byte header is `h`; 0 for the types that
    /// carry none.
    pub fn ident(t: u8, h: &[u8]) -> u16 {
        if has_ident(t) {
            u16::from_be_bytes([h[4], h[5]])
        } else {
            0
        }
    }
}

/// TCP flag bits as they sit in byte 13 of the TCP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;

    /// True when every bit of `mask` is set.
    #[inline]
    pub const fn has(self, mask: u8) -> bool {
        self.0 & mask == mask
    }
}

/// Where a packet sits in a fragmented datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fragment {
    /// Not a fragment.
    Whole,
    /// The first fragment: offset 0, more fragments follow. It carries the transport header.
    First,
    /// A later fragment, at this byte offset. It carries no transport header.
    Later {
        /// Offset of this fragment's data in the datagram, in bytes.
        offset: u16,
    },
}

/// The transport header fields the policy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L4 {
    /// TCP ports and flags.
    Tcp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Flags byte.
        flags: TcpFlags,
    },
    /// UDP ports.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
    /// ICMP type, code and (for queries and replies) identifier.
    Icmp {
        /// ICMP type.
        kind: u8,
        /// ICMP code.
        code: u8,
        /// The query's identifier (echo, timestamp, information, address mask); 0 for other
        /// types.
        ident: u16,
    },
    /// Another IP protocol: only the protocol number is known.
    Other,
    /// A non-first fragment: no transport header.
    None,
}

/// A parsed, validated IPv4 packet: the fields every stage reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Packet {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// IP protocol number.
    pub protocol: u8,
    /// The TOS byte (DSCP and ECN).
    pub tos: u8,
    /// Header length in bytes.
    pub header_len: u16,
    /// Total length in bytes.
    pub total_len: u16,
    /// Identification field.
    pub ident: u16,
    /// The DF bit.
    pub dont_fragment: bool,
    /// Fragment position.
    pub fragment: Fragment,
    /// Transport fields.
    pub l4: L4,
}

impl Ipv4Packet {
    /// Offset of the transport header in the packet.
    pub fn l4_offset(&self) -> usize {
        self.header_len as usize
    }
}

/// The smallest transport header of each protocol: what a first fragment must hold, and what a
/// later fragment must not overlap (RFC 1858).
pub const fn min_l4_len(protocol: u8) -> usize {
    match protocol {
        proto::TCP => 20,
        proto::UDP | proto::ICMP => 8,
        _ => 0,
    }
}

/// Parses and validates an inner IPv4 packet that must occupy exactly `bytes`.
///
/// Checks, each with its own reason: version (IPv6 is recognised and refused), header length,
/// total length equal to the bytes read, transport header present and whole, and the fragment
/// rules of RFC 1858.
#[inline]
pub fn parse(bytes: &[u8]) -> Result<Ipv4Packet, DropReason> {
    let ip = parse_header(bytes)?;
    if ip.total_len as usize != bytes.len() {
        return Err(DropReason::InnerLengthMismatch);
    }
    with_l4(ip, &bytes[ip.header_len as usize..])
}

/// Parses the IPv4 header only (no total-length check, no transport header).
#[inline]
fn parse_header(bytes: &[u8]) -> Result<Ipv4Packet, DropReason> {
    let Some(&first) = bytes.first() else {
        return Err(DropReason::InnerTruncated);
    };
    match first >> 4 {
        4 => {}
        6 => return Err(DropReason::Ipv6Unsupported),
        _ => return Err(DropReason::InnerNotIpv4),
    }
    if bytes.len() < HEADER_LEN {
        return Err(DropReason::InnerTruncated);
    }
    let h = Ipv4HeaderSlice::from_slice(bytes).map_err(|_| DropReason::InnerBadIhl)?;
    let header_len = u16::from(h.ihl()) * 4;
    let total_len = h.total_len();
    if total_len < header_len {
        return Err(DropReason::InnerLengthMismatch);
    }
    let offset = h.fragments_offset().value() * 8;
    let fragment = match (offset, h.more_fragments()) {
        (0, false) => Fragment::Whole,
        (0, true) => Fragment::First,
        (offset, _) => Fragment::Later { offset },
    };
    Ok(Ipv4Packet {
        src: h.source_addr(),
        dst: h.destination_addr(),
        protocol: h.protocol().0,
        tos: bytes[1],
        header_len,
        total_len,
        ident: h.identification(),
        dont_fragment: h.dont_fragment(),
        fragment,
        l4: L4::None,
    })
}

#[inline]
fn with_l4(mut ip: Ipv4Packet, payload: &[u8]) -> Result<Ipv4Packet, DropReason> {
    let too_short = if ip.fragment == Fragment::First {
        DropReason::FragmentTooShort
    } else {
        DropReason::L4Malformed
    };
    ip.l4 = match ip.fragment {
        Fragment::Later { offset } => {
            if (offset as usize) < min_l4_len(ip.protocol) {
                return Err(DropReason::FragmentOverlap);
            }
            L4::None
        }
        Fragment::Whole | Fragment::First => match ip.protocol {
            proto::TCP => {
                let t = TcpHeaderSlice::from_slice(payload).map_err(|_| too_short)?;
                L4::Tcp {
                    sport: t.source_port(),
                    dport: t.destination_port(),
                    flags: TcpFlags(t.slice()[13]),
                }
            }
            proto::UDP => {
                let u = UdpHeaderSlice::from_slice(payload).map_err(|_| too_short)?;
                L4::Udp {
                    sport: u.source_port(),
                    dport: u.destination_port(),
                }
            }
            proto::ICMP => {
                // Every ICMP message starts with the same 8 bytes; what follows depends on
                // the type and is no business of the policy (etherparse's slice would
                // insist, for instance, that a timestamp message be exactly 20 bytes).
                let h = payload.get(..8).ok_or(too_short)?;
                let kind = h[0];
                let ident = icmp_type::ident(kind, h);
                L4::Icmp {
                    kind,
                    code: h[1],
                    ident,
                }
            }
            _ => L4::Other,
        },
    };
    Ok(ip)
}

/// The packet an ICMP error quotes (RFC 792: its IPv4 header and at least 8 bytes of data),
/// parsed as far as the quote allows: addresses, protocol and, for TCP/UDP, ports, for ICMP
/// echo, the identifier.
pub fn parse_quoted(icmp_payload: &[u8]) -> Option<Ipv4Packet> {
    let ip = parse_header(icmp_payload).ok()?;
    if ip.fragment != Fragment::Whole && ip.fragment != Fragment::First {
        return None;
    }
    let data = icmp_payload.get(ip.header_len as usize..)?;
    let l4 = match ip.protocol {
        proto::TCP | proto::UDP => {
            let p = data.get(..4)?;
            let sport = u16::from_be_bytes([p[0], p[1]]);
            let dport = u16::from_be_bytes([p[2], p[3]]);
            if ip.protocol == proto::TCP {
                L4::Tcp {
                    sport,
                    dport,
                    flags: TcpFlags(0),
                }
            } else {
                L4::Udp { sport, dport }
            }
        }
        proto::ICMP => {
            let p = data.get(..8)?;
            let kind = p[0];
            let ident = icmp_type::ident(kind, p);
            L4::Icmp {
                kind,
                code: p[1],
                ident,
            }
        }
        _ => L4::Other,
    };
    Some(Ipv4Packet { l4, ..ip })
}

/// The flow fields of a packet read straight from its bytes, for the flow cache's fast lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuickFields {
    /// Source address, as read.
    pub src: u32,
    /// Destination address, as read.
    pub dst: u32,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol (TCP or UDP).
    pub protocol: u8,
}

/// Reads the flow fields of a TCP or UDP packet without parsing it, after the checks the full
/// [`parse`] would make for such a packet: an option-less IPv4 header, the exact total length,
/// not a fragment, a whole TCP or UDP header. `None` for anything else: take the full parse.
#[inline]
pub fn quick_key(p: &[u8]) -> Option<(QuickFields, L4)> {
    let h = p.get(..HEADER_LEN)?;
    if h[0] != 0x45
        || usize::from(u16::from_be_bytes([h[2], h[3]])) != p.len()
        || h[6] & 0x3f != 0
        || h[7] != 0
    {
        return None;
    }
    let word = |at: usize| u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
    let l4 = match h[9] {
        proto::TCP => {
            let t = p.get(20..40)?;
            let doff = usize::from(t[12] >> 4) * 4;
            if doff < 20 || 20 + doff > p.len() {
                return None;
            }
            L4::Tcp {
                sport: u16::from_be_bytes([t[0], t[1]]),
                dport: u16::from_be_bytes([t[2], t[3]]),
                flags: TcpFlags(t[13]),
            }
        }
        proto::UDP => {
            let u = p.get(20..28)?;
            L4::Udp {
                sport: u16::from_be_bytes([u[0], u[1]]),
                dport: u16::from_be_bytes([u[2], u[3]]),
            }
        }
        _ => return None,
    };
    let (sport, dport) = match l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
        _ => (0, 0),
    };
    let fields = QuickFields {
        src: word(12),
        dst: word(16),
        sport,
        dport,
        protocol: h[9],
    };
    Some((fields, l4))
}

/// The outer IPv4 header of a packet from the underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outer {
    /// Sender.
    pub src: Ipv4Addr,
    /// Receiver.
    pub dst: Ipv4Addr,
    /// Header length: where the payload starts.
    pub header_len: usize,
}

/// Parses the outer IPv4 header of an underlay packet as a raw socket delivers it, and checks
/// that it carries a whole GRE datagram: a fragment is never parsed as GRE.
pub fn parse_outer(bytes: &[u8]) -> Result<Outer, DropReason> {
    if bytes.len() < HEADER_LEN || bytes[0] >> 4 != 4 {
        return Err(DropReason::OuterMalformed);
    }
    let header_len = usize::from(bytes[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
    if header_len < HEADER_LEN || total_len < header_len || total_len != bytes.len() {
        return Err(DropReason::OuterMalformed);
    }
    // MF set, or a non-zero offset.
    if u16::from_be_bytes([bytes[6], bytes[7]]) & 0x3fff != 0 {
        return Err(DropReason::OuterFragment);
    }
    if bytes[9] != proto::GRE {
        return Err(DropReason::OuterNotGre);
    }
    Ok(Outer {
        src: Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15]),
        dst: Ipv4Addr::new(bytes[16], bytes[17], bytes[18], bytes[19]),
        header_len,
    })
}

/// A hash of a packet's flow that is the same in both directions (addresses and ports are
/// combined symmetrically), mixed with `seed`: the ports of TCP and UDP, found after the
/// header's own length (IHL), and none for later fragments or other protocols. It picks a
/// flow's GRE-in-UDP sender, hence its UDP source port; the worker that owns a flow is
/// [`pair_hash`]'s. Never fails: bytes a short packet lacks count as zeros.
pub fn flow_hash(bytes: &[u8], seed: u32) -> u32 {
    let word = |at: usize| -> u32 {
        bytes
            .get(at..at + 4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let (src, dst) = (word(12), word(16));
    let protocol = bytes.get(9).copied().unwrap_or(0);
    let header_len = bytes
        .first()
        .map_or(HEADER_LEN, |b| usize::from(b & 0x0f) * 4);
    let not_later_fragment = bytes
        .get(6..8)
        .is_some_and(|f| u16::from_be_bytes([f[0], f[1]]) & 0x1fff == 0);
    let ports = if matches!(protocol, proto::TCP | proto::UDP) && not_later_fragment {
        let p = word(header_len);
        (p >> 16) ^ (p & 0xffff)
    } else {
        0
    };
    let mut h = seed ^ (src ^ dst).wrapping_mul(0x9e37_79b9) ^ src.wrapping_add(dst);
    h ^= ports.wrapping_mul(0x85eb_ca6b) ^ u32::from(protocol);
    // murmur3's finaliser
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// A hash of the two addresses of a packet, the same in both directions, mixed with `seed`:
/// the worker that owns the pair. Every packet a connection's state depends on carries the
/// same pair: both directions, every fragment (later fragments have no ports), and ICMP
/// errors, which are hashed by the packet they quote (a router's error has another source
/// address). `map` translates an address first (an Elastic IP to its private address, so that
/// both sides of a translated flow land together).
pub fn pair_hash(bytes: &[u8], seed: u32, map: impl Fn(u32) -> u32) -> u32 {
    let word = |b: &[u8], at: usize| -> u32 {
        b.get(at..at + 4)
            .map_or(0, |w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
    };
    let header_len = bytes
        .first()
        .map_or(HEADER_LEN, |b| usize::from(b & 0x0f) * 4);
    let first_fragment = bytes
        .get(6..8)
        .is_some_and(|f| u16::from_be_bytes([f[0], f[1]]) & 0x1fff == 0);
    let quoted = (bytes.get(9) == Some(&proto::ICMP) && first_fragment)
        .then(|| bytes.get(header_len).copied())
        .flatten()
        .filter(|&t| icmp_type::is_error(t))
        .and_then(|_| bytes.get(header_len + 8..));
    let b = quoted.unwrap_or(bytes);
    let (x, y) = (map(word(b, 12)), map(word(b, 16)));
    let mut h = seed ^ (x ^ y).wrapping_mul(0x9e37_79b9) ^ x.wrapping_add(y);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The Internet checksum (RFC 1071) of `bytes`.
#[inline]
pub fn checksum(bytes: &[u8]) -> u16 {
    super::csum::Sum::new().add_bytes(bytes).checksum()
}

/// Writes an option-less IPv4 header into `out` (20 bytes), with its checksum.
///
/// vpcd's outer header: identification 0 and DF set (RFC 6864 allows a zero ID on atomic
/// datagrams; instance MTUs are derived so that encapsulated packets always fit), TTL 64.
pub fn emit_header(
    out: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    tos: u8,
    total_len: u16,
) {
    let out = &mut out[..HEADER_LEN];
    out[0] = 0x45;
    out[1] = tos;
    out[2..4].copy_from_slice(&total_len.to_be_bytes());
    out[4..6].copy_from_slice(&[0, 0]);
    out[6..8].copy_from_slice(&[0x40, 0]);
    out[8] = 64;
    out[9] = protocol;
    out[10..12].copy_from_slice(&[0, 0]);
    out[12..16].copy_from_slice(&src.octets());
    out[16..20].copy_from_slice(&dst.octets());
    let c = checksum(out);
    out[10..12].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An IPv4 packet built by hand (etherparse's builder would hide what is being tested).
    pub(crate) fn packet(src: [u8; 4], dst: [u8; 4], protocol: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; HEADER_LEN];
        emit_header(
            &mut p,
            src.into(),
            dst.into(),
            protocol,
            0,
            (HEADER_LEN + l4.len()) as u16,
        );
        p.extend_from_slice(l4);
        p
    }

    pub(crate) fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    #[test]
    fn parses_tcp_fields() {
        let p = packet(
            [10, 0, 1, 10],
            [10, 0, 2, 20],
            proto::TCP,
            &tcp(40000, 80, TcpFlags::SYN),
        );
        let ip = parse(&p).unwrap();
        assert_eq!(ip.src, Ipv4Addr::new(10, 0, 1, 10));
        assert_eq!(ip.dst, Ipv4Addr::new(10, 0, 2, 20));
        assert_eq!(ip.fragment, Fragment::Whole);
        assert_eq!(
            ip.l4,
            L4::Tcp {
                sport: 40000,
                dport: 80,
                flags: TcpFlags(TcpFlags::SYN)
            }
        );
    }

    #[test]
    fn each_malformation_has_its_reason() {
        let good = packet([10, 0, 0, 1], [10, 0, 0, 2], proto::UDP, &[0; 8]);
        assert!(parse(&good).is_ok());
        assert_eq!(parse(&[]), Err(DropReason::InnerTruncated));
        assert_eq!(parse(&good[..19]), Err(DropReason::InnerTruncated));
        let mut v6 = good.clone();
        v6[0] = 0x60;
        assert_eq!(parse(&v6), Err(DropReason::Ipv6Unsupported));
        let mut v5 = good.clone();
        v5[0] = 0x55;
        assert_eq!(parse(&v5), Err(DropReason::InnerNotIpv4));
        let mut ihl4 = good.clone();
        ihl4[0] = 0x44;
        assert_eq!(parse(&ihl4), Err(DropReason::InnerBadIhl));
        let mut ihl15 = good.clone();
        ihl15[0] = 0x4f;
        assert_eq!(parse(&ihl15), Err(DropReason::InnerBadIhl));
        assert_eq!(parse(&good[..27]), Err(DropReason::InnerLengthMismatch));
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(parse(&longer), Err(DropReason::InnerLengthMismatch));
        let short_udp = packet([10, 0, 0, 1], [10, 0, 0, 2], proto::UDP, &[0; 7]);
        assert_eq!(parse(&short_udp), Err(DropReason::L4Malformed));
    }

    #[test]
    fn fragments_follow_rfc_1858() {
        let mut first = packet([10, 0, 0, 1], [10, 0, 0, 2], proto::TCP, &tcp(1, 2, 0x10));
        first[6] = 0x20; // MF
        assert_eq!(parse(&first).unwrap().fragment, Fragment::First);
        let mut tiny_first = packet([10, 0, 0, 1], [10, 0, 0, 2], proto::TCP, &[0; 8]);
        tiny_first[6] = 0x20;
        assert_eq!(parse(&tiny_first), Err(DropReason::FragmentTooShort));
        let mut overlap = packet([10, 0, 0, 1], [10, 0, 0, 2], proto::TCP, &[0; 8]);
        overlap[7] = 1; // offset 8 bytes: inside the 20-byte TCP header
        assert_eq!(parse(&overlap), Err(DropReason::FragmentOverlap));
        let mut later = packet([10, 0, 0, 1], [10, 0, 0, 2], proto::TCP, &[0; 8]);
        later[7] = 3; // offset 24 bytes
        let ip = parse(&later).unwrap();
        assert_eq!(ip.fragment, Fragment::Later { offset: 24 });
        assert_eq!(ip.l4, L4::None);
    }

    #[test]
    fn emitted_header_checksums_to_zero() {
        let mut h = [0u8; 20];
        emit_header(
            &mut h,
            Ipv4Addr::new(192, 0, 2, 1),
            Ipv4Addr::new(192, 0, 2, 2),
            proto::GRE,
            0,
            100,
        );
        assert_eq!(checksum(&h), 0);
        assert!(Ipv4HeaderSlice::from_slice(&h).is_ok());
    }

    #[test]
    fn flow_hash_is_symmetric_and_seeded() {
        let a = packet(
            [10, 0, 1, 10],
            [10, 0, 2, 20],
            proto::TCP,
            &tcp(40000, 80, 0x10),
        );
        let b = packet(
            [10, 0, 2, 20],
            [10, 0, 1, 10],
            proto::TCP,
            &tcp(80, 40000, 0x10),
        );
        let c = packet(
            [10, 0, 1, 10],
            [10, 0, 2, 20],
            proto::TCP,
            &tcp(40001, 80, 0x10),
        );
        assert_eq!(flow_hash(&a, 7), flow_hash(&b, 7));
        assert_ne!(flow_hash(&a, 7), flow_hash(&c, 7));
        assert_ne!(flow_hash(&a, 7), flow_hash(&a, 8));
        assert_eq!(flow_hash(&[], 1), flow_hash(&[], 1));
    }

    #[test]
    fn pair_hash_holds_a_connection_together() {
        let id = |a| a;
        let a = packet(
            [10, 0, 1, 10],
            [10, 0, 2, 20],
            proto::UDP,
            &[0x13, 0x88, 0, 53, 0, 8, 0, 0],
        );
        let back = packet(
            [10, 0, 2, 20],
            [10, 0, 1, 10],
            proto::UDP,
            &[0, 53, 0x13, 0x88, 0, 8, 0, 0],
        );
        let mut later = packet([10, 0, 1, 10], [10, 0, 2, 20], proto::UDP, &[7; 8]);
        later[7] = 100;
        // A router's "port unreachable" about `a`, to its sender.
        let mut err = vec![3, 3, 0, 0, 0, 0, 0, 0];
        err.extend_from_slice(&a);
        let err = packet([192, 0, 2, 77], [10, 0, 1, 10], proto::ICMP, &err);
        let h = pair_hash(&a, 9, id);
        assert_eq!(pair_hash(&back, 9, id), h);
        assert_eq!(pair_hash(&later, 9, id), h);
        assert_eq!(pair_hash(&err, 9, id), h);
        let other = packet([10, 0, 1, 11], [10, 0, 2, 20], proto::UDP, &[0; 8]);
        assert_ne!(pair_hash(&other, 9, id), h);
        // A translated address is hashed as the address it stands for.
        let eip = packet([203, 0, 113, 10], [10, 0, 2, 20], proto::UDP, &[0; 8]);
        let map = |x: u32| {
            if x == u32::from(Ipv4Addr::new(203, 0, 113, 10)) {
                u32::from(Ipv4Addr::new(10, 0, 1, 10))
            } else {
                x
            }
        };
        assert_eq!(pair_hash(&eip, 9, map), h);
        assert_eq!(pair_hash(&[], 9, id), pair_hash(&[], 9, id));
    }

    #[test]
    fn outer_header_checks() {
        let gre = packet([192, 0, 2, 2], [192, 0, 2, 1], proto::GRE, &[0; 8]);
        let o = parse_outer(&gre).unwrap();
        assert_eq!((o.src, o.header_len), (Ipv4Addr::new(192, 0, 2, 2), 20));
        let udp = packet([192, 0, 2, 2], [192, 0, 2, 1], proto::UDP, &[0; 8]);
        assert_eq!(parse_outer(&udp), Err(DropReason::OuterNotGre));
        let mut frag = gre.clone();
        frag[6] = 0x20;
        assert_eq!(parse_outer(&frag), Err(DropReason::OuterFragment));
        assert_eq!(parse_outer(&gre[..27]), Err(DropReason::OuterMalformed));
        assert_eq!(parse_outer(&[0x45; 10]), Err(DropReason::OuterMalformed));
    }

    #[test]
    fn quoted_packets_give_the_flow() {
        let p = packet(
            [10, 0, 1, 10],
            [10, 0, 2, 20],
            proto::UDP,
            &[0x13, 0x88, 0, 53, 0, 8, 0, 0],
        );
        let q = parse_quoted(&p[..28]).unwrap();
        assert_eq!(
            q.l4,
            L4::Udp {
                sport: 5000,
                dport: 53
            }
        );
        assert!(parse_quoted(&p[..23]).is_none());
    }
}
