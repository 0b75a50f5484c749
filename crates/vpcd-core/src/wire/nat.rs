//! 1:1 NAT, and a load balancer's port translation: rewriting an IPv4 packet's source or
//! destination address (and TCP or UDP port) in place, with the
//! checksums it touches updated incrementally (RFC 1624): the IPv4 header's, TCP's and UDP's
//! (whose pseudo-header holds the addresses), and for an ICMP error, the quoted packet's
//! matching address, so that the instance recognises its own packet.

use std::net::Ipv4Addr;

use super::ipv4::{self, icmp_type, proto};

/// Addresses to rewrite: the source, the destination, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Nat {
    /// New source address.
    pub src: Option<Ipv4Addr>,
    /// New destination address.
    pub dst: Option<Ipv4Addr>,
    /// New TCP or UDP source port (a load balancer's reply: the listener's port).
    pub sport: Option<u16>,
    /// New TCP or UDP destination port (to a load balancer's backend).
    pub dport: Option<u16>,
}

impl Nat {
    /// No rewriting.
    pub const NONE: Nat = Nat {
        src: None,
        dst: None,
        sport: None,
        dport: None,
    };

    /// True when nothing is rewritten.
    pub fn is_none(&self) -> bool {
        self.src.is_none() && self.dst.is_none() && self.sport.is_none() && self.dport.is_none()
    }

    /// `self`, with what `over` rewrites taking precedence.
    pub fn then(self, over: Nat) -> Nat {
        Nat {
            src: over.src.or(self.src),
            dst: over.dst.or(self.dst),
            sport: over.sport.or(self.sport),
            dport: over.dport.or(self.dport),
        }
    }
}

/// One's complement addition of 16-bit words (RFC 1071).
fn add(a: u16, b: u16) -> u16 {
    let s = u32::from(a) + u32::from(b);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// The sum of an address's two 16-bit words.
fn words(a: Ipv4Addr) -> u16 {
    let o = a.octets();
    add(
        u16::from_be_bytes([o[0], o[1]]),
        u16::from_be_bytes([o[2], o[3]]),
    )
}

/// Updates a complemented checksum for `old` replaced by `new` (RFC 1624, eqn. 3).
fn update(check: u16, old: Ipv4Addr, new: Ipv4Addr) -> u16 {
    !add(add(!check, !words(old)), words(new))
}

fn field(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn set(p: &mut [u8], at: usize, v: u16) {
    p[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Rewrites the addresses of the IPv4 packet `p` (validated by the caller) in place.
/// `partial`: the transport checksum field holds only a pseudo-header sum (CHECKSUM_PARTIAL,
/// a TUN super-packet), which is updated as the plain sum it is.
pub fn apply(p: &mut [u8], nat: &Nat, partial: bool) {
    if p.len() < ipv4::HEADER_LEN {
        return;
    }
    rewrite_ports(p, nat, partial);
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let later_fragment = field(p, 6) & 0x1fff != 0;
    for (at, new) in [(12usize, nat.src), (16, nat.dst)] {
        let Some(new) = new else { continue };
        let old = Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3]);
        if old == new {
            continue;
        }
        p[at..at + 4].copy_from_slice(&new.octets());
        set(p, 10, update(field(p, 10), old, new));
        if later_fragment {
            continue;
        }
        let check_at = match p[9] {
            proto::TCP => Some(ihl + 16),
            // A zero UDP checksum means "none" and stays so.
            proto::UDP if p.len() >= ihl + 8 && field(p, ihl + 6) != 0 => Some(ihl + 6),
            _ => None,
        };
        if let Some(c) = check_at.filter(|c| c + 2 <= p.len()) {
            let v = if partial {
                add(add(field(p, c), !words(old)), words(new))
            } else {
                update(field(p, c), old, new)
            };
            set(p, c, v);
        }
        // An ICMP error quotes the packet it is about, which travelled the other way: the
        // destination we rewrite is the quote's source, and the other way round.
        if p[9] == proto::ICMP
            && p.len() >= ihl + 8 + ipv4::HEADER_LEN
            && icmp_type::is_error(p[ihl])
        {
            let q = ihl + 8;
            let q_at = if at == 16 { q + 12 } else { q + 16 };
            if p[q_at..q_at + 4] == old.octets() {
                let quote_check_old = field(p, q + 10);
                let quote_check_new = update(quote_check_old, old, new);
                p[q_at..q_at + 4].copy_from_slice(&new.octets());
                set(p, q + 10, quote_check_new);
                // The ICMP checksum covers the quote: both changed words are followed.
                let c = !field(p, ihl + 2);
                let c = add(add(c, !words(old)), words(new));
                let c = add(add(c, !quote_check_old), quote_check_new);
                set(p, ihl + 2, !c);
            }
        }
    }
}

/// Rewrites the TCP or UDP ports of `p` (not a later fragment: it has no ports). A partial
/// checksum covers only the pseudo-header, which holds no port: it stays.
fn rewrite_ports(p: &mut [u8], nat: &Nat, partial: bool) {
    if nat.sport.is_none() && nat.dport.is_none() || field(p, 6) & 0x1fff != 0 {
        return;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let check_at = match p[9] {
        proto::TCP => ihl + 16,
        proto::UDP => ihl + 6,
        _ => return,
    };
    if p.len() < check_at + 2 {
        return;
    }
    for (at, new) in [(ihl, nat.sport), (ihl + 2, nat.dport)] {
        let Some(new) = new else { continue };
        let old = field(p, at);
        set(p, at, new);
        let check = field(p, check_at);
        let zero_udp = p[9] == proto::UDP && check == 0;
        if !partial && !zero_udp && old != new {
            set(p, check_at, !add(add(!check, !old), new));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Ipv4HeaderSlice, TcpHeaderSlice, UdpHeaderSlice};

    fn tcp_ok(p: &[u8]) -> bool {
        let ip = Ipv4HeaderSlice::from_slice(p).unwrap();
        let t = TcpHeaderSlice::from_slice(&p[20..]).unwrap();
        ipv4::checksum(&p[..20]) == 0
            && t.checksum() == t.calc_checksum_ipv4(&ip, &p[40..]).unwrap()
    }

    fn with_tcp_checksum(mut p: Vec<u8>) -> Vec<u8> {
        let ip = Ipv4HeaderSlice::from_slice(&p).unwrap().to_header();
        let t = TcpHeaderSlice::from_slice(&p[20..]).unwrap().to_header();
        let c = t.calc_checksum_ipv4(&ip, &p[40..]).unwrap();
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn source_and_destination_rewrites_keep_every_checksum_right() {
        let mut t = ipv4::tests::tcp(40000, 80, 0x18);
        t.extend_from_slice(b"hello, internet");
        let mut p = with_tcp_checksum(ipv4::tests::packet(
            [10, 0, 1, 10],
            [198, 51, 100, 7],
            proto::TCP,
            &t,
        ));
        assert!(tcp_ok(&p));
        apply(
            &mut p,
            &Nat {
                src: Some(Ipv4Addr::new(203, 0, 113, 10)),
                dst: None,
                ..Nat::NONE
            },
            false,
        );
        assert_eq!(&p[12..16], &[203, 0, 113, 10]);
        assert!(tcp_ok(&p));
        apply(
            &mut p,
            &Nat {
                src: None,
                dst: Some(Ipv4Addr::new(10, 0, 2, 20)),
                ..Nat::NONE
            },
            false,
        );
        assert_eq!(&p[16..20], &[10, 0, 2, 20]);
        assert!(tcp_ok(&p));
    }

    #[test]
    fn udp_checksums_follow_and_zero_stays_zero() {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&5000u16.to_be_bytes());
        u[2..4].copy_from_slice(&53u16.to_be_bytes());
        u[4..6].copy_from_slice(&12u16.to_be_bytes());
        u.extend_from_slice(b"abcd");
        let mut p = ipv4::tests::packet([10, 0, 1, 10], [198, 51, 100, 7], proto::UDP, &u);
        let ip = Ipv4HeaderSlice::from_slice(&p).unwrap().to_header();
        let h = UdpHeaderSlice::from_slice(&p[20..]).unwrap().to_header();
        let c = h.calc_checksum_ipv4(&ip, &p[28..]).unwrap();
        p[26..28].copy_from_slice(&c.to_be_bytes());
        let nat = Nat {
            src: Some(Ipv4Addr::new(203, 0, 113, 10)),
            dst: None,
            ..Nat::NONE
        };
        apply(&mut p, &nat, false);
        let ip = Ipv4HeaderSlice::from_slice(&p).unwrap().to_header();
        let h = UdpHeaderSlice::from_slice(&p[20..]).unwrap();
        assert_eq!(
            h.checksum(),
            h.to_header().calc_checksum_ipv4(&ip, &p[28..]).unwrap()
        );
        let mut z = ipv4::tests::packet([10, 0, 1, 10], [198, 51, 100, 7], proto::UDP, &u);
        apply(&mut z, &nat, false);
        assert_eq!(field(&z, 26), 0);
        assert_eq!(ipv4::checksum(&z[..20]), 0);
    }

    #[test]
    fn a_partial_checksum_stays_a_valid_partial_checksum() {
        let mut t = ipv4::tests::tcp(40000, 80, 0x10);
        t.extend_from_slice(&[9u8; 100]);
        let mut p = ipv4::tests::packet([10, 0, 1, 10], [198, 51, 100, 7], proto::TCP, &t);
        let pseudo = |p: &[u8]| {
            !etherparse::checksum::Sum16BitWords::new()
                .add_slice(&p[12..20])
                .add_2bytes([0, proto::TCP])
                .add_2bytes(120u16.to_be_bytes())
                .ones_complement()
                .to_be()
        };
        let v = pseudo(&p);
        p[36..38].copy_from_slice(&v.to_be_bytes());
        apply(
            &mut p,
            &Nat {
                src: Some(Ipv4Addr::new(203, 0, 113, 10)),
                dst: None,
                ..Nat::NONE
            },
            true,
        );
        assert_eq!(field(&p, 36), pseudo(&p));
        crate::wire::gso::finish_checksum(&mut p, 20, 16).unwrap();
        assert!(tcp_ok(&p));
    }

    #[test]
    fn an_icmp_error_has_its_quote_translated_too() {
        // The instance 10.0.1.10 (EIP 203.0.113.10) sent UDP to 198.51.100.7, which answers
        // "port unreachable" to the EIP; inbound, the gateway rewrites the destination.
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&5000u16.to_be_bytes());
        u[2..4].copy_from_slice(&53u16.to_be_bytes());
        u[4..6].copy_from_slice(&8u16.to_be_bytes());
        let quoted = ipv4::tests::packet([203, 0, 113, 10], [198, 51, 100, 7], proto::UDP, &u);
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&quoted);
        let c = ipv4::checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut p = ipv4::tests::packet([198, 51, 100, 7], [203, 0, 113, 10], proto::ICMP, &icmp);
        apply(
            &mut p,
            &Nat {
                src: None,
                dst: Some(Ipv4Addr::new(10, 0, 1, 10)),
                ..Nat::NONE
            },
            false,
        );
        assert_eq!(&p[16..20], &[10, 0, 1, 10]);
        assert_eq!(&p[28 + 12..28 + 16], &[10, 0, 1, 10], "the quote's source");
        assert_eq!(ipv4::checksum(&p[..20]), 0);
        assert_eq!(ipv4::checksum(&p[28..48]), 0, "the quote's header checksum");
        assert_eq!(ipv4::checksum(&p[20..]), 0, "the ICMP checksum");
    }
}
