//! The model's own packet parsers, written from the specification: no code of `vpcd_core::wire`.

use std::net::Ipv4Addr;

use vpcd_core::DropReason;

pub const ICMP: u8 = 1;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const GRE: u8 = 47;

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub fn addr(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// The internet checksum (RFC 1071) of `data`: zero when `data` holds a correct checksum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = if pair.len() == 2 {
            u16::from_be_bytes([pair[0], pair[1]])
        } else {
            u16::from_be_bytes([pair[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    Whole,
    First,
    Later,
}

/// The transport fields the model reads (absent for later fragments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Icmp {
        ty: u8,
        ident: u16,
    },
    Other,
    /// A later fragment: no transport header.
    Absent,
}

#[derive(Debug, Clone)]
pub struct Inner<'a> {
    pub bytes: &'a [u8],
    pub ihl: usize,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub id: u16,
    pub df: bool,
    pub frag: Frag,
    pub l4: L4,
}

impl Inner<'_> {
    pub fn dport(&self) -> Option<u16> {
        match self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => Some(dport),
            _ => None,
        }
    }

    /// The connection-tracking ports (source side, destination side).
    pub fn ct_ports(&self) -> (u16, u16) {
        match self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
            L4::Icmp { ident, .. } => (ident, ident),
            L4::Other | L4::Absent => (0, 0),
        }
    }
}

/// docs/semantics.md 2.3 step 5: a TCP super-segment, which may be longer than `mtu`: IPv4
/// without options, whole, not a fragment, TCP with ACK and at most PSH and FIN besides, some
/// payload, its headers shorter than `mtu`.
pub fn super_segment(b: &[u8], mtu: usize) -> bool {
    if b.len() < 40 || b[0] != 0x45 || b[9] != TCP || be16(b, 6) & 0x3fff != 0 {
        return false;
    }
    let headers = 20 + usize::from(b[32] >> 4) * 4;
    let only_ack = matches!(b[33], 0x10 | 0x11 | 0x18 | 0x19);
    usize::from(be16(b, 2)) == b.len()
        && headers >= 40
        && headers < b.len()
        && headers < mtu
        && only_ack
}

/// Minimum transport header of a protocol, for the fragment overlap check.
pub fn min_transport(proto: u8) -> usize {
    match proto {
        TCP => 20,
        UDP | ICMP => 8,
        _ => 0,
    }
}

/// Step 2 of the specification: the inner IPv4 packet.
pub fn parse_inner(b: &[u8]) -> Result<Inner<'_>, DropReason> {
    if b.is_empty() {
        return Err(DropReason::InnerTruncated);
    }
    match b[0] >> 4 {
        6 => return Err(DropReason::Ipv6Unsupported),
        4 => {}
        _ => return Err(DropReason::InnerNotIpv4),
    }
    if b.len() < 20 {
        return Err(DropReason::InnerTruncated);
    }
    let ihl = usize::from(b[0] & 0x0f);
    if ihl < 5 || ihl * 4 > b.len() {
        return Err(DropReason::InnerBadIhl);
    }
    let hlen = ihl * 4;
    let total = usize::from(be16(b, 2));
    if total < hlen || total != b.len() {
        return Err(DropReason::InnerLengthMismatch);
    }
    let id = be16(b, 4);
    let ff = be16(b, 6);
    let df = ff & 0x4000 != 0;
    let mf = ff & 0x2000 != 0;
    let offset = usize::from(ff & 0x1fff) * 8;
    let frag = match (offset, mf) {
        (0, false) => Frag::Whole,
        (0, true) => Frag::First,
        _ => Frag::Later,
    };
    let proto = b[9];
    let mut p = Inner {
        bytes: b,
        ihl: hlen,
        proto,
        src: addr(b, 12),
        dst: addr(b, 16),
        id,
        df,
        frag,
        l4: L4::Absent,
    };
    if frag == Frag::Later {
        if offset < min_transport(proto) {
            return Err(DropReason::FragmentOverlap);
        }
        return Ok(p);
    }
    let l4 = &b[hlen..];
    let short = match proto {
        TCP => l4.len() < 20 || (l4[12] >> 4) < 5 || usize::from(l4[12] >> 4) * 4 > l4.len(),
        UDP | ICMP => l4.len() < 8,
        _ => false,
    };
    if short {
        return Err(if frag == Frag::First {
            DropReason::FragmentTooShort
        } else {
            DropReason::L4Malformed
        });
    }
    p.l4 = match proto {
        TCP => L4::Tcp {
            sport: be16(l4, 0),
            dport: be16(l4, 2),
            flags: l4[13],
        },
        UDP => L4::Udp {
            sport: be16(l4, 0),
            dport: be16(l4, 2),
        },
        ICMP => L4::Icmp {
            ty: l4[0],
            ident: icmp_ident(l4),
        },
        _ => L4::Other,
    };
    Ok(p)
}

/// The outer IPv4 header of an `UnderlayIp` packet: (source, header length).
pub fn parse_outer(b: &[u8], this_host: Ipv4Addr) -> Result<(Ipv4Addr, usize), DropReason> {
    if b.len() < 20 || b[0] >> 4 != 4 {
        return Err(DropReason::OuterMalformed);
    }
    let hlen = usize::from(b[0] & 0x0f) * 4;
    let total = usize::from(be16(b, 2));
    if hlen < 20 || total < hlen || total != b.len() {
        return Err(DropReason::OuterMalformed);
    }
    let ff = be16(b, 6);
    if ff & 0x2000 != 0 || ff & 0x1fff != 0 {
        return Err(DropReason::OuterFragment);
    }
    if b[9] != GRE {
        return Err(DropReason::OuterNotGre);
    }
    if addr(b, 16) != this_host {
        return Err(DropReason::NotAddressedToHost);
    }
    Ok((addr(b, 12), hlen))
}

/// A GRE header, checked up to (not including) the key lookups.
#[derive(Debug, Clone, Copy)]
pub struct Gre {
    pub hlen: usize,
    pub key: Option<u32>,
}

pub fn parse_gre(g: &[u8]) -> Result<Gre, DropReason> {
    if g.len() < 4 {
        return Err(DropReason::GreTruncated);
    }
    let flags = be16(g, 0);
    if flags & 0x0007 != 0 {
        return Err(DropReason::GreBadVersion);
    }
    if flags & (0x4000 | 0x0800 | 0x0400) != 0 {
        return Err(DropReason::GreReservedBits);
    }
    let c = flags & 0x8000 != 0;
    let k = flags & 0x2000 != 0;
    let s = flags & 0x1000 != 0;
    let hlen = 4 + 4 * usize::from(c) + 4 * usize::from(k) + 4 * usize::from(s);
    if hlen > g.len() {
        return Err(DropReason::GreTruncated);
    }
    if c && checksum(g) != 0 {
        return Err(DropReason::GreBadChecksum);
    }
    let nibble = g.get(hlen).map(|b| b >> 4);
    match be16(g, 2) {
        0x0800 if nibble == Some(6) => return Err(DropReason::GreProtocolMismatch),
        0x0800 => {}
        0x86dd if nibble == Some(6) => return Err(DropReason::Ipv6Unsupported),
        0x86dd => return Err(DropReason::GreProtocolMismatch),
        _ => return Err(DropReason::GreProtocolUnsupported),
    }
    let key = k.then(|| be32(g, 4 + 4 * usize::from(c)));
    Ok(Gre { hlen, key })
}

/// The identifier of an ICMP message: read for the query and reply types (0, 8, 13 to 18),
/// 0 for the others.
pub fn icmp_ident(m: &[u8]) -> u16 {
    if matches!(m[0], 0 | 8 | 13..=18) {
        be16(m, 4)
    } else {
        0
    }
}

/// The packet quoted by an ICMP error, as far as connection tracking reads it.
#[derive(Debug, Clone, Copy)]
pub struct Quote {
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    /// The quoted ICMP message's type.
    pub icmp_type: Option<u8>,
}

/// A quoted packet inside an ICMP error: an IPv4 header (not a later fragment) and enough of
/// its transport header for the ports (8 bytes of ICMP).
pub fn quoted(p: &Inner<'_>) -> Option<Quote> {
    let q = p.bytes.get(p.ihl + 8..)?;
    if q.is_empty() || q[0] >> 4 != 4 {
        return None;
    }
    let qihl = usize::from(q[0] & 0x0f) * 4;
    if qihl < 20 || qihl > q.len() {
        return None;
    }
    if usize::from(be16(q, 2)) < qihl || be16(q, 6) & 0x1fff != 0 {
        return None;
    }
    let proto = q[9];
    let l4 = &q[qihl..];
    let (sport, dport, icmp_type) = match proto {
        TCP | UDP => {
            if l4.len() < 4 {
                return None;
            }
            (be16(l4, 0), be16(l4, 2), None)
        }
        ICMP => {
            if l4.len() < 8 {
                return None;
            }
            let ident = icmp_ident(l4);
            (ident, ident, Some(l4[0]))
        }
        _ => (0, 0, None),
    };
    Some(Quote {
        proto,
        src: addr(q, 12),
        dst: addr(q, 16),
        sport,
        dport,
        icmp_type,
    })
}

/// An ICMP error (types 3, 4, 5, 11, 12): judged by the packet it quotes.
pub fn is_icmp_error(p: &Inner<'_>) -> bool {
    matches!(
        p.l4,
        L4::Icmp {
            ty: 3 | 4 | 5 | 11 | 12,
            ..
        }
    )
}
