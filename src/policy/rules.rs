//! Ordered accept/drop rules, shared by network ACLs and security groups.
//!
//! The topology keeps rules as written ([`Rule`]); evaluation uses a [`RuleList`]: the rules
//! flattened into compact entries (a port list becomes one entry per range, an `sg:` peer a
//! sorted address set) scanned first to last. The first entry that matches decides
//! (CLOUD-SEMANTICS: "rules are ordered, the first match wins"); no match denies.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::wire::ipv4::proto;

/// What a rule does with the packets it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Let the packet through.
    Accept,
    /// Drop the packet.
    Drop,
}

/// The protocols a rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Every IP protocol.
    All,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP.
    Icmp,
}

impl Protocol {
    /// The IP protocol number, 0 for [`Protocol::All`].
    pub const fn number(self) -> u8 {
        match self {
            Protocol::All => 0,
            Protocol::Tcp => proto::TCP,
            Protocol::Udp => proto::UDP,
            Protocol::Icmp => proto::ICMP,
        }
    }

    /// True for the protocols whose rules may name ports.
    pub const fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }

    /// The word used in the topology file.
    pub const fn word(self) -> &'static str {
        match self {
            Protocol::All => "all",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }
}

/// An inclusive port range; a single port has `first == last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port, at least `first`.
    pub last: u16,
}

impl PortRange {
    /// True when `port` lies in the range.
    pub const fn contains(self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// The other end a rule matches: a CIDR, or the private addresses of a security group's
/// members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// An address block.
    Cidr(Ipv4Net),
    /// `sg:NAME`: the members of this security group (by index).
    Group(u32),
}

/// A rule as written in the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Accept or drop.
    pub action: Action,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination ports; empty means all.
    pub ports: Vec<PortRange>,
    /// The remote end: the source for ingress rules, the destination for egress rules.
    pub peer: Peer,
    /// Line of the rule in the topology file.
    pub line: usize,
}

/// The packet fields a rule reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject {
    /// The remote address: the packet's source for ingress, its destination for egress.
    pub peer: Ipv4Addr,
    /// IP protocol number.
    pub protocol: u8,
    /// Destination port for TCP and UDP; `None` for other protocols.
    pub dport: Option<u16>,
}

/// Which rule decided: the index of the rule's owner (ACL or security group) and the rule's
/// index within the owner's list for that direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleOrigin {
    /// Index of the ACL or security group in the topology.
    pub owner: u32,
    /// Index of the rule in the owner's ingress or egress list.
    pub rule: u16,
}

/// The outcome of a rule list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A rule accepted.
    Accepted(RuleOrigin),
    /// A rule dropped.
    Dropped(RuleOrigin),
    /// No rule matched: the implicit deny at the end.
    NoMatch,
}

const NO_SET: u32 = u32::MAX;

/// One flattened rule: 20 bytes, compared with plain integer operations.
#[derive(Debug, Clone, Copy)]
struct Entry {
    net: u32,
    mask: u32,
    set: u32,
    first: u16,
    last: u16,
    protocol: u8,
    accept: bool,
    origin: RuleOrigin,
}

/// Rules flattened for evaluation, with the address sets of their `sg:` peers resolved.
#[derive(Debug, Clone, Default)]
pub struct RuleList {
    entries: Box<[Entry]>,
    sets: Box<[Box<[u32]>]>,
}

impl RuleList {
    /// Flattens `lists` (owner index, rules) in order into one list. `members` gives the
    /// sorted addresses a `Peer::Group` stands for in this list's context (the same VPC).
    pub fn build<'a>(
        lists: impl IntoIterator<Item = (u32, &'a [Rule])>,
        mut members: impl FnMut(u32) -> Vec<Ipv4Addr>,
    ) -> RuleList {
        let mut entries = Vec::new();
        let mut sets: Vec<Box<[u32]>> = Vec::new();
        let mut set_of_group: Vec<(u32, u32)> = Vec::new();
        for (owner, rules) in lists {
            for (i, r) in rules.iter().enumerate() {
                let (net, mask, set) = match r.peer {
                    Peer::Cidr(c) => (u32::from(c.network()), u32::from(c.netmask()), NO_SET),
                    Peer::Group(g) => {
                        let idx = match set_of_group.iter().find(|(gg, _)| *gg == g) {
                            Some((_, idx)) => *idx,
                            None => {
                                let mut m: Vec<u32> =
                                    members(g).into_iter().map(u32::from).collect();
                                m.sort_unstable();
                                m.dedup();
                                sets.push(m.into_boxed_slice());
                                let idx = (sets.len() - 1) as u32;
                                set_of_group.push((g, idx));
                                idx
                            }
                        };
                        (0, 0, idx)
                    }
                };
                let ranges: &[PortRange] = if r.ports.is_empty() {
                    &[PortRange {
                        first: 0,
                        last: u16::MAX,
                    }]
                } else {
                    &r.ports
                };
                for p in ranges {
                    entries.push(Entry {
                        net,
                        mask,
                        set,
                        first: p.first,
                        last: p.last,
                        protocol: r.protocol.number(),
                        accept: r.action == Action::Accept,
                        origin: RuleOrigin {
                            owner,
                            rule: i as u16,
                        },
                    });
                }
            }
        }
        RuleList {
            entries: entries.into_boxed_slice(),
            sets: sets.into_boxed_slice(),
        }
    }

    /// Number of flattened entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the list has no entries (and so denies everything).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// First match wins; no match is [`Outcome::NoMatch`].
    pub fn evaluate(&self, s: &Subject) -> Outcome {
        let peer = u32::from(s.peer);
        let port = s.dport;
        for e in self.entries.iter() {
            if e.protocol != 0 && e.protocol != s.protocol {
                continue;
            }
            if e.first != 0 || e.last != u16::MAX {
                // A port rule matches only packets that carry that port.
                match port {
                    Some(p) if e.first <= p && p <= e.last => {}
                    _ => continue,
                }
            }
            let peer_ok = if e.set == NO_SET {
                peer & e.mask == e.net
            } else {
                self.sets[e.set as usize].binary_search(&peer).is_ok()
            };
            if !peer_ok {
                continue;
            }
            return if e.accept {
                Outcome::Accepted(e.origin)
            } else {
                Outcome::Dropped(e.origin)
            };
        }
        Outcome::NoMatch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: Action, protocol: Protocol, ports: &[(u16, u16)], peer: Peer) -> Rule {
        Rule {
            action,
            protocol,
            ports: ports
                .iter()
                .map(|&(first, last)| PortRange { first, last })
                .collect(),
            peer,
            line: 0,
        }
    }

    fn cidr(s: &str) -> Peer {
        Peer::Cidr(s.parse().unwrap())
    }

    fn tcp(peer: [u8; 4], dport: u16) -> Subject {
        Subject {
            peer: peer.into(),
            protocol: proto::TCP,
            dport: Some(dport),
        }
    }

    #[test]
    fn first_match_wins_and_no_match_denies() {
        let rules = [
            rule(
                Action::Drop,
                Protocol::Tcp,
                &[(22, 22)],
                cidr("10.0.9.0/24"),
            ),
            rule(
                Action::Accept,
                Protocol::Tcp,
                &[(22, 22)],
                cidr("10.0.0.0/16"),
            ),
        ];
        let l = RuleList::build([(7, &rules[..])], |_| vec![]);
        assert_eq!(
            l.evaluate(&tcp([10, 0, 9, 1], 22)),
            Outcome::Dropped(RuleOrigin { owner: 7, rule: 0 })
        );
        assert_eq!(
            l.evaluate(&tcp([10, 0, 1, 1], 22)),
            Outcome::Accepted(RuleOrigin { owner: 7, rule: 1 })
        );
        assert_eq!(l.evaluate(&tcp([10, 0, 1, 1], 23)), Outcome::NoMatch);
        assert_eq!(l.evaluate(&tcp([10, 1, 1, 1], 22)), Outcome::NoMatch);
    }

    #[test]
    fn port_forms_single_range_and_list() {
        let rules = [rule(
            Action::Accept,
            Protocol::Tcp,
            &[(80, 80), (443, 443), (8000, 8080)],
            cidr("0.0.0.0/0"),
        )];
        let l = RuleList::build([(0, &rules[..])], |_| vec![]);
        for (port, ok) in [
            (80, true),
            (443, true),
            (8000, true),
            (8080, true),
            (8081, false),
            (81, false),
        ] {
            assert_eq!(
                matches!(l.evaluate(&tcp([1, 2, 3, 4], port)), Outcome::Accepted(_)),
                ok,
                "{port}"
            );
        }
    }

    #[test]
    fn protocol_must_match_and_port_rules_need_a_port() {
        let rules = [
            rule(
                Action::Accept,
                Protocol::Udp,
                &[(53, 53)],
                cidr("0.0.0.0/0"),
            ),
            rule(Action::Accept, Protocol::Icmp, &[], cidr("0.0.0.0/0")),
        ];
        let l = RuleList::build([(0, &rules[..])], |_| vec![]);
        assert_eq!(l.evaluate(&tcp([1, 1, 1, 1], 53)), Outcome::NoMatch);
        let icmp = Subject {
            peer: [1, 1, 1, 1].into(),
            protocol: proto::ICMP,
            dport: None,
        };
        assert!(matches!(
            l.evaluate(&icmp),
            Outcome::Accepted(RuleOrigin { rule: 1, .. })
        ));
        let udp_without_port = Subject {
            peer: [1, 1, 1, 1].into(),
            protocol: proto::UDP,
            dport: None,
        };
        assert_eq!(l.evaluate(&udp_without_port), Outcome::NoMatch);
    }

    #[test]
    fn all_protocol_matches_anything() {
        let rules = [rule(Action::Drop, Protocol::All, &[], cidr("10.0.0.5/32"))];
        let l = RuleList::build([(0, &rules[..])], |_| vec![]);
        let gre = Subject {
            peer: [10, 0, 0, 5].into(),
            protocol: 47,
            dport: None,
        };
        assert!(matches!(l.evaluate(&gre), Outcome::Dropped(_)));
    }

    #[test]
    fn group_peers_match_members_only_and_lists_concatenate_in_order() {
        let a = [rule(Action::Accept, Protocol::Icmp, &[], Peer::Group(3))];
        let b = [rule(Action::Drop, Protocol::All, &[], cidr("0.0.0.0/0"))];
        let l = RuleList::build([(1, &a[..]), (2, &b[..])], |g| {
            assert_eq!(g, 3);
            vec![Ipv4Addr::new(10, 0, 0, 9), Ipv4Addr::new(10, 0, 0, 3)]
        });
        let icmp = |p: [u8; 4]| Subject {
            peer: p.into(),
            protocol: proto::ICMP,
            dport: None,
        };
        assert_eq!(
            l.evaluate(&icmp([10, 0, 0, 3])),
            Outcome::Accepted(RuleOrigin { owner: 1, rule: 0 })
        );
        assert_eq!(
            l.evaluate(&icmp([10, 0, 0, 4])),
            Outcome::Dropped(RuleOrigin { owner: 2, rule: 0 })
        );
        assert!(RuleList::build([(0, &[][..])], |_| vec![]).is_empty());
    }
}
