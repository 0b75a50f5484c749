//! Related ICMP errors (docs/semantics.md 2.7, "ICMP errors"): an error passes when the packet
//! it quotes belongs to a tracked connection of each local side.

use super::decide::{Decider, ports};
use super::filter::Side;
use crate::policy::conntrack::{ConnKey, Endpoint};
use crate::wire::ipv4::{self, Ipv4Packet};

impl Decider<'_> {
    /// True when, for every side, the quoted packet belongs to an entry of the side's port.
    /// The quote travelled from the error's destination (as this side knows it, whatever NAT
    /// did to the quote) towards the quote's destination, on the error sender's side.
    pub fn related(&self, sides: &[Option<Side>; 2], ip: &Ipv4Packet, pkt: &[u8]) -> bool {
        let Some(q) = pkt.get(ip.l4_offset() + 8..).and_then(ipv4::parse_quoted) else {
            return false;
        };
        let (qs, qd) = ports(&q);
        sides.iter().flatten().all(|side| {
            let from = Endpoint {
                port: qs,
                ..side.dst
            };
            let to = Endpoint {
                zone: side.src.zone,
                addr: q.dst,
                port: qd,
            };
            ConnKey::of(side.port, q.protocol, &q.l4, from, to)
                .is_some_and(|k| self.state.conntrack.find_live(&k, self.now).is_some())
        })
    }
}
