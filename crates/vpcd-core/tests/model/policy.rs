//! The policy half of the model's decision: network ACLs (2.5 step 5), the connection sides,
//! connection tracking and security groups (2.7).

use std::net::Ipv4Addr;

use vpcd_core::policy::rules::{Action, Peer, Protocol, Rule};
use vpcd_core::topology::{AclId, InstanceId, Network, SgId};
use vpcd_core::{Decision, DropReason, Dropped, RuleRef};

use super::conntrack::{self, Applied, Endpoint, Evicted, Key, Opening, TcpState};
use super::eval::{BASIC, INTERNET, Model, Origin, Sp, drop, private};
use super::wire::{self, ICMP, Inner, L4, TCP, UDP};

/// One side of a packet (2.7): its port (the instance whose entries and rules these are), the
/// packet's source and destination ends as this side sees them, and the peer its rules see.
#[derive(Debug, Clone, Copy)]
pub(super) struct Side {
    pub port: usize,
    pub ingress: bool,
    pub src: Endpoint,
    pub dst: Endpoint,
    pub peer: Ipv4Addr,
    /// The ingress half of a side that is one with the egress side (same port, same ends: an
    /// instance to its own Elastic IP): its rules are evaluated, its entry is the egress's.
    pub shadow: bool,
}

/// How new traffic is taken (2.7 "New traffic").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    Open,
    Pickup,
    /// ICMP other than a query: judged by the groups, no entry.
    Untracked,
}

fn drop_rule(reason: DropReason, rule: RuleRef) -> Decision {
    Decision::Drop(Dropped {
        reason,
        rule: Some(rule),
    })
}

fn zone_name(z: u64) -> &'static str {
    match z {
        BASIC => "basic",
        INTERNET => "internet",
        _ => "vpc",
    }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        TCP => "tcp",
        UDP => "udp",
        ICMP => "icmp",
        _ => "other",
    }
}

impl Model {
    fn subnet_acl(&self, i: usize) -> Option<AclId> {
        match self.topo.instances[i].network {
            Network::Vpc { subnet, .. } => self.topo.subnets[subnet.index()].acl,
            Network::Basic { .. } => None,
        }
    }

    /// The egress side of local sender `i`, the destination end in zone `dst_zone`.
    pub(super) fn egress_side(&self, p: &Inner<'_>, i: usize, dst_zone: u64) -> Side {
        let (sp, dp) = p.ct_ports();
        Side {
            port: i,
            ingress: false,
            src: Endpoint {
                zone: self.zone(i),
                addr: p.src,
                port: sp,
            },
            dst: Endpoint {
                zone: dst_zone,
                addr: p.dst,
                port: dp,
            },
            peer: p.dst,
            shadow: false,
        }
    }

    /// The ingress side of local target `t`.
    fn ingress_side(
        &self,
        p: &Inner<'_>,
        origin: Origin,
        t: usize,
        nat: vpcd_core::pipeline::Nat,
    ) -> Side {
        let (sp, dp) = p.ct_ports();
        let near = match origin {
            _ if !nat.is_none() => INTERNET,
            Origin::Internet | Origin::Relayed(_) => INTERNET,
            Origin::Local { i: s, .. } | Origin::Remote { s, .. } => self.zone(s),
        };
        let seen = nat.src.unwrap_or(p.src);
        Side {
            port: t,
            ingress: true,
            src: Endpoint {
                zone: near,
                addr: seen,
                port: sp,
            },
            // The destination after translation, or as written (an appliance receives
            // packets for other addresses).
            dst: Endpoint {
                zone: self.zone(t),
                addr: nat.dst.unwrap_or(p.dst),
                port: dp,
            },
            peer: seen,
            shadow: false,
        }
    }

    /// 2.5 steps 5 and 6 for an instance T as target.
    pub(super) fn instance_policy(
        &mut self,
        p: &Inner<'_>,
        origin: Origin,
        t: usize,
        nat: vpcd_core::pipeline::Nat,
        forward: Decision,
        now: u64,
    ) -> Result<Decision, Decision> {
        let topo = self.topo.clone();
        let t_here = self.host_of(t) == self.host;
        let translated = !nat.is_none();
        let s = origin.instance();
        let s_subnet = s.and_then(|s| topo.instances[s].subnet());
        // SPEC: "both ends in one subnet" compares the sending instance's subnet (an
        // appliance's for its foreign packets) with T's.
        let same_subnet = s_subnet.is_some() && s_subnet == topo.instances[t].subnet();
        if translated && same_subnet {
            self.note("acl: same subnet through the gateway's NAT: ACLs apply");
        }
        let seen = nat.src.unwrap_or(p.src);
        if translated || !same_subnet {
            if origin.local()
                && let Some(acl) = self.subnet_acl(s.unwrap())
            {
                self.acl(acl, false, p, p.dst, s.unwrap())?;
            }
            if t_here && let Some(acl) = self.subnet_acl(t) {
                self.acl(acl, true, p, seen, t)?;
            }
        }
        let mut sides = Vec::new();
        if origin.local() {
            let zone = if translated { INTERNET } else { self.zone(t) };
            sides.push(self.egress_side(p, s.unwrap(), zone));
        }
        if t_here {
            sides.push(self.ingress_side(p, origin, t, nat));
        }
        if translated {
            self.note(format!("nat: {} side(s) here", sides.len()));
        }
        self.policy(p, sides, forward, now)
    }

    /// The egress policy of a packet leaving local instance `s` for the internet.
    pub(super) fn local_egress(
        &mut self,
        p: &Inner<'_>,
        s: usize,
        forward: Decision,
        now: u64,
    ) -> Result<Decision, Decision> {
        if let Some(acl) = self.subnet_acl(s) {
            self.acl(acl, false, p, p.dst, s)?;
        }
        let side = self.egress_side(p, s, INTERNET);
        self.policy(p, vec![side], forward, now)
    }

    fn acl(
        &self,
        acl: AclId,
        ingress: bool,
        p: &Inner<'_>,
        peer: Ipv4Addr,
        owner: usize,
    ) -> Result<(), Decision> {
        let a = &self.topo.acls[acl.index()];
        let rules = if ingress { &a.ingress } else { &a.egress };
        if !private(peer) {
            self.note(if ingress {
                "acl: ingress evaluated on a public peer"
            } else {
                "acl: egress evaluated on a public peer"
            });
        }
        match self.first_match(rules, p, peer, owner, p.dport()) {
            Some((_, Action::Accept)) => Ok(()),
            found => Err(drop_rule(
                if ingress {
                    DropReason::AclIngress
                } else {
                    DropReason::AclEgress
                },
                RuleRef::Acl {
                    acl: AclId(acl.0),
                    rule: found.map(|(i, _)| i as u16),
                },
            )),
        }
    }

    // ----- keys ---------------------------------------------------------------------------

    /// The key of a side's entry for this packet; `None` for ICMP that has no entry.
    pub(super) fn packet_key(&self, p: &Inner<'_>, side: &Side) -> Option<Key> {
        let query = match p.l4 {
            L4::Icmp { ty, .. } => Some(conntrack::query_part(ty, side.src, side.dst)?),
            _ => None,
        };
        Some(Key {
            proto: p.proto,
            port: side.port,
            a: side.src,
            b: side.dst,
            query,
        })
    }

    /// The key an ICMP error's quote belongs to on a side: the quoted packet read as sent by
    /// the side's destination end (the error's addressee sent it), towards the quoted
    /// destination in the zone of the side's source end.
    pub(super) fn quote_key(&self, p: &Inner<'_>, side: &Side) -> Option<Key> {
        let q = wire::quoted(p)?;
        let far = Endpoint {
            zone: side.dst.zone,
            addr: side.dst.addr,
            port: q.sport,
        };
        let near = Endpoint {
            zone: side.src.zone,
            addr: q.dst,
            port: q.dport,
        };
        // SPEC: a quoted ICMP message of a type without entries (an error, a router
        // advertisement...) belongs to no connection: the error is unrelated.
        let query = match q.icmp_type {
            Some(ty) => Some(conntrack::query_part(ty, far, near)?),
            None => None,
        };
        if q.src != far.addr {
            self.note("icmp error: the quote's source is not the addressee");
        }
        Some(Key {
            proto: q.proto,
            port: side.port,
            a: far,
            b: near,
            query,
        })
    }

    // ----- 2.7 ----------------------------------------------------------------------------

    /// ICMP errors, connection tracking and security groups, for the sides here.
    fn policy(
        &mut self,
        p: &Inner<'_>,
        mut sides: Vec<Side>,
        forward: Decision,
        now: u64,
    ) -> Result<Decision, Decision> {
        if wire::is_icmp_error(p) {
            return self.icmp_error(p, &sides, forward, now);
        }
        if let [e, i] = sides.as_slice()
            && e.port == i.port
            && ((e.src, e.dst) == (i.src, i.dst) || (e.src, e.dst) == (i.dst, i.src))
        {
            // SPEC: one side, one entry (the egress side's key and direction), but both rule
            // sets judge its new traffic (egress first): the packet leaves I and enters it.
            self.note("ct: both sides are one (same port, same ends)");
            sides[1].shadow = true;
        }
        let need = self.existing(p, &sides, now)?;
        if need.contains(&true) {
            self.new_traffic(p, &sides, &need, now)?;
        }
        Ok(forward)
    }

    fn icmp_error(
        &self,
        p: &Inner<'_>,
        sides: &[Side],
        forward: Decision,
        now: u64,
    ) -> Result<Decision, Decision> {
        // SPEC: a live entry; the lookup of a quote removes and refreshes nothing.
        let related = sides.iter().all(|side| {
            self.quote_key(p, side)
                .and_then(|k| self.conntrack.find_live(&k, now))
                .is_some()
        });
        let quoted = wire::quoted(p)
            .map(|q| proto_name(q.proto))
            .unwrap_or("nothing");
        self.note(format!(
            "icmp error: {} ({} side(s), quoting {quoted})",
            if related { "related" } else { "unrelated" },
            sides.len()
        ));
        if related
            && sides
                .iter()
                .any(|x| x.src.zone == INTERNET || x.dst.zone == INTERNET)
        {
            self.note("icmp error: related, through NAT or from the internet");
        }
        if related {
            Ok(forward)
        } else {
            Err(drop(DropReason::IcmpErrorUnrelated))
        }
    }

    /// "Existing entries": each side's entry, updated by the packet; which sides need one.
    /// SPEC: the sides are taken in order (egress, then ingress); a side's update stays when
    /// a later side drops the packet (each side is its own host's conntrack in the real
    /// world), and the first invalid result drops it.
    fn existing(&mut self, p: &Inner<'_>, sides: &[Side], now: u64) -> Result<Vec<bool>, Decision> {
        let flags = match p.l4 {
            L4::Tcp { flags, .. } => Some(flags),
            _ => None,
        };
        let mut need = vec![false; sides.len()];
        for (n, side) in sides.iter().enumerate() {
            if side.shadow {
                need[n] = need[0];
                continue;
            }
            let Some(key) = self.packet_key(p, side) else {
                need[n] = true;
                continue;
            };
            self.note_expiry(&key, now);
            let Some((i, dir)) = self.conntrack.lookup(&key, side.src, now) else {
                need[n] = true;
                continue;
            };
            let before = self.conntrack.entries[i].clone();
            let applied = self.conntrack.apply(i, dir, flags, now);
            self.note_applied(p, &before, &self.conntrack.entries[i].clone(), dir, applied);
            match applied {
                Applied::Accepted | Applied::Ignored | Applied::NotRefreshed => {}
                Applied::Invalid => return Err(drop(DropReason::TcpInvalid)),
                Applied::Reopen => {
                    self.conntrack.remove(i);
                    need[n] = true;
                }
                Applied::Removed => self.conntrack.remove(i),
            }
        }
        Ok(need)
    }

    fn note_expiry(&self, key: &Key, now: u64) {
        if let Some(e) = self.conntrack.peek(key) {
            match e.slack(now) {
                0 => self.note("ct: entry used at exactly its timeout"),
                -1 => self.note("ct: entry expired 1 ms ago"),
                x if x < 0 => self.note("ct: an expired entry found (removed)"),
                _ => {}
            }
        }
    }

    fn note_applied(
        &self,
        p: &Inner<'_>,
        before: &conntrack::Entry,
        after: &conntrack::Entry,
        dir: conntrack::Dir,
        applied: Applied,
    ) {
        if p.proto == TCP {
            let (b, a) = (before.tcp, after.tcp);
            self.note(match applied {
                Applied::Accepted => format!("ct tcp: {b:?} -> {a:?} ({dir:?})"),
                other => format!("ct tcp: {other:?} in {b:?} ({dir:?})"),
            });
            if !before.assured && after.assured {
                self.note(format!("ct tcp: assured ({b:?} -> {a:?})"));
            }
        } else {
            let kind = match p.l4 {
                L4::Icmp { ty, .. } => format!("icmp type {ty}"),
                _ => proto_name(p.proto).to_string(),
            };
            self.note(format!("ct {kind}: {dir:?} packet"));
        }
        let k = before.key;
        if k.a.zone >= BASIC || k.b.zone >= BASIC {
            self.note(format!(
                "ct: live entry in zones {}/{}",
                zone_name(k.a.zone),
                zone_name(k.b.zone)
            ));
        }
    }

    /// "New traffic", for the sides that need an entry.
    fn new_traffic(
        &mut self,
        p: &Inner<'_>,
        sides: &[Side],
        need: &[bool],
        now: u64,
    ) -> Result<(), Decision> {
        let how = match p.l4 {
            L4::Tcp { flags, .. } if !conntrack::valid_flags(flags) => {
                return Err(drop(DropReason::TcpInvalid));
            }
            L4::Tcp { flags, .. } if conntrack::opens_tcp(flags) => How::Open,
            L4::Tcp { flags, .. } if conntrack::pickup_tcp(flags) => How::Pickup,
            L4::Tcp { .. } => return Err(drop(DropReason::TcpNoConnection)),
            L4::Icmp { ty, .. } if conntrack::icmp_query(ty) != Some((ty, true)) => How::Untracked,
            _ => How::Open,
        };
        // SPEC: when the groups refuse a pickup candidate, every side that needs an entry is
        // tried the other way round, and all must admit it; the reversed entry counts the
        // packet as its reply direction's first (replied, not yet assured).
        let reverse = match self.judge(p, sides, need, false) {
            Ok(()) => false,
            Err(refusal) if how == How::Pickup => {
                if self.judge(p, sides, need, true).is_err() {
                    self.note("ct: pickup refused both ways");
                    return Err(refusal);
                }
                self.note("ct: reverse pickup (as opened by the destination)");
                true
            }
            Err(refusal) => return Err(refusal),
        };
        if how == How::Untracked {
            self.note("ct: icmp judged by the groups, untracked");
            return Ok(());
        }
        if how == How::Pickup && !reverse {
            self.note("ct: pickup (as opened by the source)");
        }
        for (n, side) in sides.iter().enumerate() {
            if need[n] && !side.shadow {
                self.open_side(p, side, how, reverse, now)?;
            }
        }
        Ok(())
    }

    /// "Each side gets an entry", within the limits.
    /// SPEC: the sides open in order (egress, then ingress), each by the limits' rules; an entry
    /// opened for the first side stays when the second is refused, and the second may evict
    /// it: between two local instances both entries belong to the opener, so with
    /// `max_per_instance = 1` only the ingress side's entry remains.
    fn open_side(
        &mut self,
        p: &Inner<'_>,
        side: &Side,
        how: How,
        reverse: bool,
        now: u64,
    ) -> Result<(), Decision> {
        let (a, b) = if reverse {
            (side.dst, side.src)
        } else {
            (side.src, side.dst)
        };
        let query = match p.l4 {
            L4::Icmp { ty, .. } => conntrack::query_part(ty, side.src, side.dst),
            _ => None,
        };
        let tcp = match how {
            How::Pickup => TcpState::Established,
            _ if p.proto == TCP => TcpState::SynSent,
            _ => TcpState::None,
        };
        let key = Key {
            proto: p.proto,
            port: side.port,
            a,
            b,
            query,
        };
        let opening = Opening {
            key,
            tcp,
            replied: reverse,
        };
        match self.conntrack.open(opening, now) {
            Ok(evicted) => {
                self.note(format!(
                    "ct: open (protocol {}, zones {}/{})",
                    p.proto,
                    zone_name(a.zone),
                    zone_name(b.zone)
                ));
                if evicted != Evicted::Nothing {
                    self.note(format!("ct: limit: evicted ({evicted:?})"));
                }
                Ok(())
            }
            Err(reason) => {
                self.note(format!("ct: limit: refused ({reason:?})"));
                Err(drop(reason))
            }
        }
    }

    /// The groups of the sides that need an entry, egress before ingress; `reversed`: the
    /// other way round (a pickup's second try), with the source port as destination port.
    fn judge(
        &self,
        p: &Inner<'_>,
        sides: &[Side],
        need: &[bool],
        reversed: bool,
    ) -> Result<(), Decision> {
        for (n, side) in sides.iter().enumerate() {
            if !need[n] {
                continue;
            }
            let reason = if side.ingress {
                DropReason::SgIngress
            } else {
                DropReason::SgEgress
            };
            let port = match p.l4 {
                L4::Tcp { sport, .. } | L4::Udp { sport, .. } if reversed => Some(sport),
                _ => p.dport(),
            };
            self.groups(
                side.port,
                side.ingress != reversed,
                p,
                side.peer,
                reason,
                port,
            )?;
        }
        Ok(())
    }

    /// The security groups of instance `owner` in one direction, ports matched on `port`.
    fn groups(
        &self,
        owner: usize,
        ingress: bool,
        p: &Inner<'_>,
        peer: Ipv4Addr,
        reason: DropReason,
        port: Option<u16>,
    ) -> Result<(), Decision> {
        if !private(peer) {
            self.note(if ingress {
                "sg: ingress evaluated on a public peer"
            } else {
                "sg: egress evaluated on a public peer"
            });
        }
        for &g in &self.topo.instances[owner].security_groups {
            let sg = &self.topo.security_groups[g.index()];
            let rules = if ingress { &sg.ingress } else { &sg.egress };
            if let Some((i, action)) = self.first_match(rules, p, peer, owner, port) {
                return match action {
                    Action::Accept => Ok(()),
                    Action::Drop => Err(drop_rule(
                        reason,
                        RuleRef::SecurityGroup {
                            group: SgId(g.0),
                            rule: i as u16,
                        },
                    )),
                };
            }
        }
        Err(drop_rule(
            reason,
            RuleRef::SecurityGroupsEnd {
                instance: InstanceId(owner as u32),
            },
        ))
    }

    /// The first rule of `rules` matching the packet, with `peer` the remote address, `owner`
    /// the instance whose rules these are (for `sg:` peers) and `port` the port matched.
    fn first_match(
        &self,
        rules: &[Rule],
        p: &Inner<'_>,
        peer: Ipv4Addr,
        owner: usize,
        port: Option<u16>,
    ) -> Option<(usize, Action)> {
        rules
            .iter()
            .position(|r| self.matches(r, p, peer, owner, port))
            .map(|i| (i, rules[i].action))
    }

    fn matches(
        &self,
        r: &Rule,
        p: &Inner<'_>,
        peer: Ipv4Addr,
        owner: usize,
        port: Option<u16>,
    ) -> bool {
        let proto_ok = match r.protocol {
            Protocol::All => true,
            Protocol::Tcp => p.proto == TCP,
            Protocol::Udp => p.proto == UDP,
            Protocol::Icmp => p.proto == ICMP,
        };
        if !proto_ok {
            return false;
        }
        if !r.ports.is_empty() {
            let Some(port) = port else {
                return false;
            };
            if !r.ports.iter().any(|pr| pr.first <= port && port <= pr.last) {
                return false;
            }
        }
        match r.peer {
            Peer::Cidr(net) => net.contains(&peer),
            Peer::Group(SgId(g)) => self.group_member(g, peer, owner),
        }
    }

    /// `sg:NAME`: the addresses of the group's members in the owner's space.
    fn group_member(&self, g: u32, peer: Ipv4Addr, owner: usize) -> bool {
        let space = self.space(owner);
        let member = |i: usize| {
            let x = &self.topo.instances[i];
            x.ip == peer && x.security_groups.contains(&SgId(g))
        };
        let n = self.topo.instances.len();
        let here = (0..n).any(|i| self.space(i) == space && member(i));
        if here {
            self.note(if space == Sp::Basic {
                "rule: sg: peer matched (basic)"
            } else {
                "rule: sg: peer matched"
            });
        } else if (0..n).any(member) {
            self.note("rule: sg: peer is a member in another space only");
        }
        here
    }
}
