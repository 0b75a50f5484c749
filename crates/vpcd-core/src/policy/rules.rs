//! Ordered accept/drop rules, shared by network ACLs and security groups.
//!
//! The topology keeps rules as written ([`Rule`]); evaluation uses a [`RuleList`]: the rules
//! flattened into entries (a port list becomes one entry per range, an `sg:` peer a sorted
//! address set) and indexed by bit vectors, so that finding the first matching entry costs
//! the same for 5 rules or 1,000. The first entry that matches decides (docs/semantics.md,
//! "Security groups" and "Network ACLs": ordered rules, first match wins); no match denies.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::ids::SgId;
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
    /// `sg:NAME`: the members of this security group.
    Group(SgId),
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

/// Which rule decided: the rule's owner `O` (an [`AclId`](crate::ids::AclId) or an
/// [`SgId`]) and the rule's index within the owner's list for that direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleOrigin<O> {
    /// The ACL or security group.
    pub owner: O,
    /// Index of the rule in the owner's ingress or egress list.
    pub rule: u16,
}

/// The outcome of a rule list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome<O> {
    /// A rule accepted.
    Accepted(RuleOrigin<O>),
    /// A rule dropped.
    Dropped(RuleOrigin<O>),
    /// No rule matched: the implicit deny at the end.
    NoMatch,
}

const NO_SET: u32 = u32::MAX;

/// What the matching rule means: its action, its origin, and for an `sg:` peer the address
/// set to check.
#[derive(Debug, Clone, Copy)]
struct Meaning<O> {
    accept: bool,
    set: u32,
    origin: RuleOrigin<O>,
}

/// One flattened rule as compared: address and mask, first and last port, protocol (0 for
/// all), and whether it names ports.
type Entry = (u32, u32, u16, u16, u8, bool);

/// Rules flattened for evaluation (a port list becomes one entry per range), with the address
/// sets of their `sg:` peers resolved and a [`Classifier`] over them. `O` is the kind of the
/// rules' owners: [`AclId`](crate::ids::AclId) for an ACL's list, [`SgId`] for an instance's.
#[derive(Debug, Clone)]
pub struct RuleList<O> {
    entries: Box<[Entry]>,
    meanings: Box<[Meaning<O>]>,
    sets: Box<[Box<[u32]>]>,
    classifier: Classifier,
}

impl<O> Default for RuleList<O> {
    /// The empty list (which denies everything).
    fn default() -> Self {
        RuleList {
            entries: Box::default(),
            meanings: Box::default(),
            sets: Box::default(),
            classifier: Classifier::default(),
        }
    }
}

/// Bit-vector classification (Lakshman and Stiliadis, SIGCOMM 1998): each field's value
/// space is cut into elementary intervals, and each interval holds the bit vector of the rules
/// that match it. A packet's candidates are the AND of one vector per field (address, port,
/// protocol); the lowest set bit that also passes its `sg:` set is the first matching rule.
/// The cost is two binary searches and a few dozen word operations, whatever the rules.
#[derive(Debug, Clone, Default)]
struct Classifier {
    words: usize,
    addr_starts: Box<[u32]>,
    addr_rows: Box<[u64]>,
    port_starts: Box<[u32]>,
    port_rows: Box<[u64]>,
    /// Rules a packet without ports can match (those naming no port).
    portless: Box<[u64]>,
    /// Per protocol present in the rules: the rules of that protocol or of every protocol.
    protocols: Box<[(u8, Box<[u64]>)]>,
    /// The rules of every protocol (for protocols no rule names).
    any_protocol: Box<[u64]>,
}

impl Classifier {
    /// Rows for the elementary intervals of `[first, last]` ranges over `0..=max`.
    fn rows(ranges: &[(u32, u32)], words: usize, max: u32) -> (Box<[u32]>, Box<[u64]>) {
        let mut events: Vec<(u32, bool, usize)> = Vec::with_capacity(2 * ranges.len());
        for (k, &(first, last)) in ranges.iter().enumerate() {
            events.push((first, true, k));
            if last < max {
                events.push((last + 1, false, k));
            }
        }
        events.sort_unstable();
        let mut starts = vec![0u32];
        starts.extend(events.iter().map(|e| e.0));
        starts.dedup();
        let mut rows = vec![0u64; starts.len() * words];
        let mut current = vec![0u64; words];
        let mut e = 0;
        for (i, &start) in starts.iter().enumerate() {
            while e < events.len() && events[e].0 == start {
                let (_, add, k) = events[e];
                if add {
                    current[k / 64] |= 1 << (k % 64);
                } else {
                    current[k / 64] &= !(1 << (k % 64));
                }
                e += 1;
            }
            rows[i * words..(i + 1) * words].copy_from_slice(&current);
        }
        (starts.into_boxed_slice(), rows.into_boxed_slice())
    }

    fn build(entries: &[Entry]) -> Classifier {
        let words = entries.len().div_ceil(64);
        let addr: Vec<(u32, u32)> = entries.iter().map(|e| (e.0, e.0 | !e.1)).collect();
        let (addr_starts, addr_rows) = Classifier::rows(&addr, words, u32::MAX);
        // Rules naming no port match every port.
        let ports: Vec<(u32, u32)> = entries
            .iter()
            .map(|e| {
                if e.5 {
                    (u32::from(e.2), u32::from(e.3))
                } else {
                    (0, 65_535)
                }
            })
            .collect();
        let (port_starts, port_rows) = Classifier::rows(&ports, words, 65_535);
        let bits = |keep: &dyn Fn(&Entry) -> bool| -> Box<[u64]> {
            let mut v = vec![0u64; words];
            for (k, e) in entries.iter().enumerate() {
                if keep(e) {
                    v[k / 64] |= 1 << (k % 64);
                }
            }
            v.into_boxed_slice()
        };
        let mut present: Vec<u8> = entries.iter().map(|e| e.4).filter(|&p| p != 0).collect();
        present.sort_unstable();
        present.dedup();
        Classifier {
            words,
            addr_starts,
            addr_rows,
            port_starts,
            port_rows,
            portless: bits(&|e| !e.5),
            protocols: present
                .iter()
                .map(|&p| (p, bits(&|e| e.4 == 0 || e.4 == p)))
                .collect(),
            any_protocol: bits(&|e| e.4 == 0),
        }
    }

    fn row<'a>(starts: &[u32], rows: &'a [u64], words: usize, v: u32) -> &'a [u64] {
        let i = starts.partition_point(|&s| s <= v).saturating_sub(1);
        &rows[i * words..(i + 1) * words]
    }

    /// Calls `f` with each candidate rule index, in order, until it returns true.
    #[inline]
    fn candidates(
        &self,
        peer: u32,
        protocol: u8,
        port: Option<u16>,
        mut f: impl FnMut(usize) -> bool,
    ) {
        let w = self.words;
        let a = Classifier::row(&self.addr_starts, &self.addr_rows, w, peer);
        let p = match port {
            Some(port) => Classifier::row(&self.port_starts, &self.port_rows, w, u32::from(port)),
            None => &self.portless,
        };
        let q = self
            .protocols
            .iter()
            .find(|(pr, _)| *pr == protocol)
            .map_or(&self.any_protocol, |(_, v)| v);
        for i in 0..w {
            let mut x = a[i] & p[i] & q[i];
            while x != 0 {
                if f(i * 64 + x.trailing_zeros() as usize) {
                    return;
                }
                x &= x - 1;
            }
        }
    }
}

impl<O: Copy> RuleList<O> {
    /// Flattens `lists` (owner, rules) in order into one list. `members` gives the sorted
    /// addresses a `Peer::Group` stands for in this list's context (the same VPC).
    pub fn build<'a>(
        lists: impl IntoIterator<Item = (O, &'a [Rule])>,
        mut members: impl FnMut(SgId) -> Vec<Ipv4Addr>,
    ) -> RuleList<O> {
        let mut entries: Vec<Entry> = Vec::new();
        let mut meanings = Vec::new();
        let mut sets: Vec<Box<[u32]>> = Vec::new();
        let mut set_of_group: Vec<(SgId, u32)> = Vec::new();
        for (owner, rules) in lists {
            for (i, r) in rules.iter().enumerate() {
                let (net, mask, set) = match r.peer {
                    Peer::Cidr(c) => (u32::from(c.network()), u32::from(c.netmask()), NO_SET),
                    // Any address passes the block test; the set decides.
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
                    entries.push((
                        net,
                        mask,
                        p.first,
                        p.last,
                        r.protocol.number(),
                        !r.ports.is_empty(),
                    ));
                    meanings.push(Meaning {
                        accept: r.action == Action::Accept,
                        set,
                        origin: RuleOrigin {
                            owner,
                            rule: i as u16,
                        },
                    });
                }
            }
        }
        RuleList {
            classifier: Classifier::build(&entries),
            entries: entries.into_boxed_slice(),
            meanings: meanings.into_boxed_slice(),
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
    pub fn evaluate(&self, s: &Subject) -> Outcome<O> {
        let peer = u32::from(s.peer);
        let mut found = Outcome::NoMatch;
        self.classifier.candidates(peer, s.protocol, s.dport, |k| {
            let m = self.meanings[k];
            // A candidate is the match if its `sg:` set (when it has one) holds the peer.
            let hit = m.set == NO_SET || self.sets[m.set as usize].binary_search(&peer).is_ok();
            if hit {
                found = if m.accept {
                    Outcome::Accepted(m.origin)
                } else {
                    Outcome::Dropped(m.origin)
                };
            }
            hit
        });
        found
    }

    /// The same decision by scanning every entry in order (what the classifier replaces;
    /// the tests compare the two).
    #[cfg(test)]
    fn scan(&self, s: &Subject) -> Outcome<O> {
        let peer = u32::from(s.peer);
        for (k, e) in self.entries.iter().enumerate() {
            let port_ok = !e.5 || s.dport.is_some_and(|p| e.2 <= p && p <= e.3);
            let m = self.meanings[k];
            let set_ok = m.set == NO_SET || self.sets[m.set as usize].binary_search(&peer).is_ok();
            if peer & e.1 == e.0 && (e.4 == 0 || e.4 == s.protocol) && port_ok && set_ok {
                return if m.accept {
                    Outcome::Accepted(m.origin)
                } else {
                    Outcome::Dropped(m.origin)
                };
            }
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

    /// The classifier and a plain scan agree on every packet, on a long list with every kind
    /// of rule.
    #[test]
    fn the_classifier_agrees_with_the_scan() {
        let mut rules = Vec::new();
        for i in 0..150u32 {
            let protocol =
                [Protocol::Tcp, Protocol::Udp, Protocol::Icmp, Protocol::All][i as usize % 4];
            let ports: Vec<(u16, u16)> = if protocol.has_ports() && i % 3 != 0 {
                vec![
                    ((i * 37 % 1000) as u16, (i * 37 % 1000 + i % 50) as u16),
                    (8000, 8000 + i as u16),
                ]
            } else {
                vec![]
            };
            let peer = if i % 17 == 0 {
                Peer::Group(SgId(i % 2))
            } else {
                let prefix = [8u8, 16, 24, 32][i as usize % 4];
                Peer::Cidr(
                    Ipv4Net::new(
                        Ipv4Addr::new(10, (i % 7) as u8, (i % 5) as u8, i as u8),
                        prefix,
                    )
                    .unwrap()
                    .trunc(),
                )
            };
            let action = if i % 5 == 0 {
                Action::Drop
            } else {
                Action::Accept
            };
            rules.push(rule(action, protocol, &ports, peer));
        }
        let members = |g: SgId| {
            vec![
                Ipv4Addr::new(10, 0, 0, g.0 as u8 + 1),
                Ipv4Addr::new(10, 3, 3, 3),
            ]
        };
        let list = RuleList::build([(0, &rules[..])], members);
        let mut seed = 7u32;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let peer = Ipv4Addr::new(
                10,
                (seed % 7) as u8,
                (seed >> 8) as u8 % 6,
                (seed >> 16) as u8,
            );
            let protocol = [proto::TCP, proto::UDP, proto::ICMP, 47][(seed >> 24) as usize % 4];
            let dport =
                matches!(protocol, proto::TCP | proto::UDP).then_some((seed >> 3) as u16 % 9000);
            let s = Subject {
                peer,
                protocol,
                dport,
            };
            assert_eq!(list.evaluate(&s), list.scan(&s), "{s:?}");
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
        let a = [rule(
            Action::Accept,
            Protocol::Icmp,
            &[],
            Peer::Group(SgId(3)),
        )];
        let b = [rule(Action::Drop, Protocol::All, &[], cidr("0.0.0.0/0"))];
        let l = RuleList::build([(1, &a[..]), (2, &b[..])], |g| {
            assert_eq!(g, SgId(3));
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
