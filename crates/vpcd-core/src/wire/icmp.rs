//! ICMP messages vpcd itself sends: "fragmentation needed" (RFC 792 type 3 code 4, with the
//! next-hop MTU of RFC 1191), built in place over the packet that caused it.

use std::net::Ipv4Addr;

use super::buf::{NoHeadroom, PacketBuf};
use super::ipv4::{self, icmp_type, proto};

/// ICMP header length for error messages.
const HEADER_LEN: usize = 8;
/// Code 4 of destination unreachable: fragmentation needed and DF set.
const CODE_FRAG_NEEDED: u8 = 4;

/// Rewrites the IPv4 packet in `buf` into the ICMP error that reports it too big for `mtu`,
/// sent from `from` (the subnet's gateway address) back to the packet's source.
///
/// The quote is the original IPv4 header plus the first 8 bytes of its payload (RFC 792). The
/// quote stays where it is: the new headers go into the headroom and the rest is cut off.
/// The caller has validated the packet (its header length is within the buffer).
pub fn frag_needed_in_place(
    buf: &mut PacketBuf,
    from: Ipv4Addr,
    mtu: u16,
) -> Result<(), NoHeadroom> {
    let orig = buf.as_slice();
    let header_len = usize::from(orig[0] & 0x0f) * 4;
    let to = Ipv4Addr::new(orig[12], orig[13], orig[14], orig[15]);
    buf.truncate(header_len + 8);
    let h = buf.push_front(HEADER_LEN)?;
    h.copy_from_slice(&[
        icmp_type::DEST_UNREACHABLE,
        CODE_FRAG_NEEDED,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    h[6..8].copy_from_slice(&mtu.to_be_bytes());
    let c = ipv4::checksum(buf.as_slice());
    buf.as_mut_slice()[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (buf.len() + ipv4::HEADER_LEN) as u16;
    let ip = buf.push_front(ipv4::HEADER_LEN)?;
    ipv4::emit_header(ip, from, to, proto::ICMP, 0, total);
    Ok(())
}

/// Turns a validated ICMP echo request in place into its reply: addresses swapped, type 0,
/// a fresh TTL, both checksums recomputed.
pub fn echo_reply_in_place(p: &mut [u8]) {
    let header_len = usize::from(p[0] & 0x0f) * 4;
    if p.len() < header_len + 8 {
        return;
    }
    let (src, dst) = (p[12..16].to_vec(), p[16..20].to_vec());
    p[12..16].copy_from_slice(&dst);
    p[16..20].copy_from_slice(&src);
    p[8] = 64;
    p[10..12].fill(0);
    let c = ipv4::checksum(&p[..header_len]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    let icmp = &mut p[header_len..];
    icmp[0] = icmp_type::ECHO_REPLY;
    icmp[2..4].fill(0);
    let c = ipv4::checksum(icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ipv4::{L4, parse, parse_quoted};

    #[test]
    fn frag_needed_quotes_the_offender_and_carries_the_mtu() {
        let big = ipv4::tests::packet([10, 0, 1, 10], [10, 0, 2, 20], proto::UDP, &[7u8; 1600]);
        let mut b = PacketBuf::from_packet(&big);
        frag_needed_in_place(&mut b, Ipv4Addr::new(10, 0, 1, 1), 1472).unwrap();
        let p = b.as_slice();
        assert_eq!(p.len(), 20 + 8 + 28);
        let ip = parse(p).unwrap();
        assert_eq!(ip.src, Ipv4Addr::new(10, 0, 1, 1));
        assert_eq!(ip.dst, Ipv4Addr::new(10, 0, 1, 10));
        assert_eq!(
            ip.l4,
            L4::Icmp {
                kind: 3,
                code: 4,
                ident: 0
            }
        );
        assert_eq!(u16::from_be_bytes([p[26], p[27]]), 1472);
        assert_eq!(ipv4::checksum(&p[20..]), 0);
        assert_eq!(&p[28..], &big[..28]);
        assert_eq!(
            parse_quoted(&p[28..]).unwrap().dst,
            Ipv4Addr::new(10, 0, 2, 20)
        );
    }
}
