//! Packet builders for the generators: IPv4 with TCP, UDP or ICMP, GRE, the outer header.

use std::net::Ipv4Addr;

use super::wire::checksum;

/// An IPv4 header's fields.
#[derive(Debug, Clone, Copy)]
pub struct Ip4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub id: u16,
    pub df: bool,
    pub mf: bool,
    /// Fragment offset in 8-byte units.
    pub offset: u16,
}

/// An IPv4 packet with a 20-byte header and a correct header checksum.
pub fn ipv4(h: &Ip4, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut b = vec![0u8; 20];
    b[0] = 0x45;
    b[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    b[4..6].copy_from_slice(&h.id.to_be_bytes());
    let ff = (u16::from(h.df) << 14) | (u16::from(h.mf) << 13) | (h.offset & 0x1fff);
    b[6..8].copy_from_slice(&ff.to_be_bytes());
    b[8] = 64;
    b[9] = h.proto;
    b[12..16].copy_from_slice(&h.src.octets());
    b[16..20].copy_from_slice(&h.dst.octets());
    b.extend_from_slice(payload);
    fix_ip_checksum(&mut b);
    b
}

/// Recomputes the header checksum when the header is there to checksum.
pub fn fix_ip_checksum(b: &mut [u8]) {
    if b.len() < 20 {
        return;
    }
    let hlen = usize::from(b[0] & 0x0f) * 4;
    if hlen < 20 || hlen > b.len() {
        return;
    }
    b[10] = 0;
    b[11] = 0;
    let c = checksum(&b[..hlen]);
    b[10..12].copy_from_slice(&c.to_be_bytes());
}

/// A TCP segment (20-byte header); its checksum is filled by [`fix_l4_checksum`].
pub fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&0x1000_0000u32.wrapping_add(u32::from(sport)).to_be_bytes());
    t[8..12].copy_from_slice(&0x2000_0000u32.wrapping_add(u32::from(dport)).to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(payload);
    t
}

/// A UDP datagram (checksum 0: none).
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    u
}

/// An ICMP message: type, code, the 4 bytes after the checksum, payload; checksummed.
pub fn icmp(ty: u8, code: u8, rest: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(payload);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// Fills the TCP checksum of a whole IPv4 packet with a 20-byte header (no-op otherwise).
pub fn fix_l4_checksum(b: &mut [u8]) {
    if b.len() < 40 || b[0] != 0x45 || b[9] != 6 {
        return;
    }
    let seg_len = b.len() - 20;
    let mut pseudo = Vec::with_capacity(12 + seg_len);
    pseudo.extend_from_slice(&b[12..20]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(seg_len as u16).to_be_bytes());
    b[36] = 0;
    b[37] = 0;
    pseudo.extend_from_slice(&b[20..]);
    let c = checksum(&pseudo);
    b[36..38].copy_from_slice(&c.to_be_bytes());
}

/// GRE header options.
#[derive(Debug, Clone, Copy, Default)]
pub struct GreOpts {
    pub checksum: bool,
    pub key: Option<u32>,
    pub seq: Option<u32>,
    /// Bits or'ed into the first 16 bits (reserved bits, version).
    pub extra_bits: u16,
    pub proto: u16,
    /// Corrupt the checksum after computing it.
    pub bad_checksum: bool,
}

pub fn gre(o: &GreOpts, payload: &[u8]) -> Vec<u8> {
    let mut flags = o.extra_bits;
    if o.checksum {
        flags |= 0x8000;
    }
    if o.key.is_some() {
        flags |= 0x2000;
    }
    if o.seq.is_some() {
        flags |= 0x1000;
    }
    let mut g = Vec::with_capacity(16 + payload.len());
    g.extend_from_slice(&flags.to_be_bytes());
    g.extend_from_slice(&o.proto.to_be_bytes());
    if o.checksum {
        g.extend_from_slice(&[0, 0, 0, 0]);
    }
    if let Some(k) = o.key {
        g.extend_from_slice(&k.to_be_bytes());
    }
    if let Some(s) = o.seq {
        g.extend_from_slice(&s.to_be_bytes());
    }
    g.extend_from_slice(payload);
    if o.checksum {
        let mut c = checksum(&g);
        if o.bad_checksum {
            c ^= 0x0101;
        }
        g[4..6].copy_from_slice(&c.to_be_bytes());
    }
    g
}

/// The outer IPv4 header around a GRE packet, with `options` bytes of IP options (NOPs).
pub fn outer(src: Ipv4Addr, dst: Ipv4Addr, options: usize, gre: &[u8]) -> Vec<u8> {
    let hlen = 20 + options;
    let total = hlen + gre.len();
    let mut b = vec![0u8; hlen];
    b[0] = 0x40 | (hlen / 4) as u8;
    b[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    b[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
    b[6] = 0x40;
    b[8] = 64;
    b[9] = 47;
    b[12..16].copy_from_slice(&src.octets());
    b[16..20].copy_from_slice(&dst.octets());
    for o in &mut b[20..] {
        *o = 1;
    }
    b.extend_from_slice(gre);
    fix_ip_checksum(&mut b);
    b
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Rewrites an IPv4 packet's source and/or destination as a 1:1 NAT does, the quote of an ICMP
/// error included (a destination rewrite is the quote's source, and the other way round), and
/// recomputes the checksums it can.
pub fn nat(b: &mut [u8], src: Option<Ipv4Addr>, dst: Option<Ipv4Addr>) {
    if b.len() < 20 || (src.is_none() && dst.is_none()) {
        return;
    }
    if let Some(a) = src {
        b[12..16].copy_from_slice(&a.octets());
    }
    if let Some(a) = dst {
        b[16..20].copy_from_slice(&a.octets());
    }
    let ihl = usize::from(b[0] & 0x0f) * 4;
    let error = b[9] == 1 && b.len() >= ihl + 8 && [3, 4, 5, 11, 12].contains(&b[ihl]);
    if ihl >= 20 && error && b.len() >= ihl + 8 + 20 {
        let q = ihl + 8;
        if let Some(a) = dst {
            b[q + 12..q + 16].copy_from_slice(&a.octets());
        }
        if let Some(a) = src {
            b[q + 16..q + 20].copy_from_slice(&a.octets());
        }
        let qhl = usize::from(b[q] & 0x0f) * 4;
        if qhl >= 20 && q + qhl <= b.len() {
            fix_ip_checksum(&mut b[q..]);
        }
        b[ihl + 2] = 0;
        b[ihl + 3] = 0;
        let c = checksum(&b[ihl..]);
        b[ihl + 2..ihl + 4].copy_from_slice(&c.to_be_bytes());
    }
    fix_ip_checksum(b);
    fix_l4_checksum(b);
}
