//! The reference evaluator: the specification's decision, step by step, with linear scans.

use std::net::Ipv4Addr;
use std::sync::Arc;

use vpcd::policy::route::NextHop;
use vpcd::policy::rules::{Action, Peer, Protocol, Rule};
use vpcd::topology::{AclId, HostId, InstanceId, SgId};
use vpcd::{Decision, DropReason, Dropped, Ingress, RuleRef, Topology};

use super::conntrack::{Applied, Endpoint, Table, opens_tcp, tcp_flags};
use super::wire::{self, Frag, ICMP, Inner, L4, TCP, UDP};

/// Where a datagram's fragments come from: a local instance or a sending host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    Local(usize),
    Host(usize),
}

#[derive(Debug, Clone)]
struct FragRecord {
    from: From,
    zone: u32,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    decision: Decision,
    at: u64,
    /// A first fragment of the same datagram was dropped since (coverage only).
    dropped_since: bool,
}

/// One host's reference model.
pub struct Model {
    topo: Arc<Topology>,
    host: usize,
    pub conntrack: Table,
    frags: Vec<FragRecord>,
    /// What the model went through (for the coverage report).
    pub events: std::cell::RefCell<std::collections::BTreeMap<String, usize>>,
}

fn drop(reason: DropReason) -> Decision {
    Decision::Drop(Dropped { reason, rule: None })
}

fn drop_rule(reason: DropReason, rule: RuleRef) -> Decision {
    Decision::Drop(Dropped {
        reason,
        rule: Some(rule),
    })
}

fn forwards(d: &Decision) -> bool {
    matches!(d, Decision::Deliver { .. } | Decision::Encapsulate { .. })
}

/// The instance MTU: the underlay MTU minus the encapsulation overhead.
pub fn instance_mtu(topo: &Topology) -> u16 {
    let u = &topo.underlay;
    let mut overhead = match u.transport {
        vpcd::topology::Transport::Gre => 28,
        vpcd::topology::Transport::GreUdp => 36,
    };
    if u.checksum {
        overhead += 4;
    }
    u.mtu - overhead
}

impl Model {
    pub fn new(topo: Arc<Topology>, host: HostId) -> Model {
        Model {
            topo,
            host: host.0 as usize,
            conntrack: Table::default(),
            frags: Vec::new(),
            events: Default::default(),
        }
    }

    fn note(&self, event: impl Into<String>) {
        *self.events.borrow_mut().entry(event.into()).or_default() += 1;
    }

    pub fn decide(&mut self, bytes: &[u8], ingress: Ingress, now: u64) -> Decision {
        match self.decide_inner(bytes, ingress, now) {
            Ok(d) | Err(d) => d,
        }
    }

    fn decide_inner(
        &mut self,
        bytes: &[u8],
        ingress: Ingress,
        now: u64,
    ) -> Result<Decision, Decision> {
        let topo = self.topo.clone();
        match ingress {
            Ingress::Instance(id) => {
                // 1.
                let i = id.0 as usize;
                if i >= topo.instances.len() || topo.instances[i].host.0 as usize != self.host {
                    return Err(drop(DropReason::UnknownPort));
                }
                let inst = &topo.instances[i];
                // 2.
                let p = wire::parse_inner(bytes).map_err(drop)?;
                // 3.
                if p.src != inst.ip {
                    return Err(drop(DropReason::SourceSpoofed));
                }
                // 4.
                self.destination_check(&p)?;
                // 5.
                let mtu = instance_mtu(&topo);
                if bytes.len() > usize::from(mtu) {
                    return Err(if p.df {
                        Decision::FragNeeded { to: id, mtu }
                    } else {
                        drop(DropReason::OversizeNoDf)
                    });
                }
                // 6.
                let zone = topo.vpcs[inst.vpc().index()].key;
                Ok(self.flow(&p, zone, 0, i, true, From::Local(i), now))
            }
            Ingress::UnderlayIp | Ingress::UnderlayUdp { .. } => {
                let (sender, gre_at) = match ingress {
                    Ingress::UnderlayIp => {
                        let me = topo.hosts[self.host].address;
                        wire::parse_outer(bytes, me).map_err(drop)?
                    }
                    Ingress::UnderlayUdp { from } => (from, 0),
                    Ingress::Instance(_) => unreachable!(),
                };
                let Some(sender_host) = topo.hosts.iter().position(|h| h.address == sender) else {
                    return Err(drop(DropReason::UnknownUnderlaySource));
                };
                if sender_host == self.host {
                    return Err(drop(DropReason::UnderlayFromSelf));
                }
                let g = &bytes[gre_at..];
                let gre = wire::parse_gre(g).map_err(drop)?;
                let Some(key) = gre.key else {
                    return Err(drop(DropReason::GreNoKey));
                };
                let Some(vpc) = topo.vpcs.iter().position(|v| v.key == key) else {
                    return Err(drop(DropReason::GreUnknownKey));
                };
                if !topo
                    .instances
                    .iter()
                    .any(|i| i.vpc().index() == vpc && i.host.0 as usize == self.host)
                {
                    return Err(drop(DropReason::GreKeyNotOnHost));
                }
                let inner_bytes = &g[gre.hlen..];
                let p = wire::parse_inner(inner_bytes).map_err(drop)?;
                self.destination_check(&p)?;
                let Some(s) = topo.instances.iter().position(|i| {
                    i.vpc().index() == vpc && i.host.0 as usize == sender_host && i.ip == p.src
                }) else {
                    return Err(drop(DropReason::InnerSourceNotOnSender));
                };
                let strip = (gre_at + gre.hlen) as u16;
                Ok(self.flow(&p, key, strip, s, false, From::Host(sender_host), now))
            }
        }
    }

    /// Step 4: unicast, and not into the underlay.
    fn destination_check(&self, p: &Inner<'_>) -> Result<(), Decision> {
        if p.dst == Ipv4Addr::BROADCAST || p.dst.octets()[0] & 0xf0 == 224 {
            return Err(drop(DropReason::NotUnicast));
        }
        if self.topo.hosts.iter().any(|h| h.address == p.dst) {
            let tunnel = p.proto == wire::GRE || (p.proto == UDP && p.dport() == Some(4754));
            return Err(drop(if tunnel {
                DropReason::TunnelLoop
            } else {
                DropReason::InnerDstUnderlay
            }));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn flow(
        &mut self,
        p: &Inner<'_>,
        zone: u32,
        strip: u16,
        s: usize,
        local: bool,
        from: From,
        now: u64,
    ) -> Decision {
        let same = |r: &FragRecord| {
            r.from == from
                && r.zone == zone
                && r.src == p.src
                && r.dst == p.dst
                && r.proto == p.proto
                && r.id == p.id
        };
        // a.
        if p.frag == Frag::Later {
            let found = self
                .frags
                .iter()
                .find(|r| same(r))
                .map(|r| (r.decision, now.saturating_sub(r.at), r.dropped_since));
            if let Some((_, age, true)) = found
                && age <= 30_000
            {
                self.note("frag: later fragment after a forwarded first and a dropped first");
            }
            let found = found.map(|(d, age, _)| (d, age));
            return match found {
                Some((d, age)) if age <= 30_000 => {
                    self.note(if age == 30_000 {
                        "frag: later fragment at exactly 30 s"
                    } else {
                        "frag: later fragment follows its first"
                    });
                    match d {
                        Decision::Deliver { to, .. } => Decision::Deliver { to, strip },
                        d => d,
                    }
                }
                Some((_, age)) => {
                    self.note(if age == 30_001 {
                        "frag: later fragment 30.001 s after its first"
                    } else {
                        "frag: later fragment after the window"
                    });
                    drop(DropReason::FragmentWithoutFirst)
                }
                None => drop(DropReason::FragmentWithoutFirst),
            };
        }
        let d = match self.flow_whole(p, zone, strip, s, local, now) {
            Ok(d) | Err(d) => d,
        };
        if p.frag == Frag::First && forwards(&d) {
            self.frags.retain(|r| !same(r));
            self.frags.push(FragRecord {
                from,
                zone,
                src: p.src,
                dst: p.dst,
                proto: p.proto,
                id: p.id,
                decision: d,
                at: now,
                dropped_since: false,
            });
        } else if p.frag == Frag::First {
            for r in self.frags.iter_mut().filter(|r| same(r)) {
                r.dropped_since = true;
            }
        }
        d
    }

    fn flow_whole(
        &mut self,
        p: &Inner<'_>,
        zone: u32,
        strip: u16,
        s: usize,
        local: bool,
        now: u64,
    ) -> Result<Decision, Decision> {
        let topo = self.topo.clone();
        let sender = &topo.instances[s];
        // b. route
        let svpc = &topo.vpcs[sender.vpc().index()];
        let t = if svpc.cidr.contains(&p.dst) {
            topo.instances
                .iter()
                .position(|i| i.vpc() == sender.vpc() && i.ip == p.dst)
                .ok_or(drop(DropReason::NoSuchInstance))?
        } else {
            let table =
                &topo.route_tables[topo.subnets[sender.subnet().index()].route_table.index()];
            let mut best: Option<&vpcd::policy::route::Route> = None;
            for r in table.routes.as_slice() {
                if r.destination.contains(&p.dst)
                    && best.is_none_or(|b| r.destination.prefix_len() > b.destination.prefix_len())
                {
                    best = Some(r);
                }
            }
            match best.map(|r| r.next_hop) {
                None => return Err(drop(DropReason::NoRoute)),
                Some(NextHop::Drop) => return Err(drop(DropReason::RouteDrop)),
                Some(NextHop::Internet) => return Err(drop(DropReason::InternetUnavailable)),
                Some(NextHop::Peering(_)) => return Err(drop(DropReason::PeeringUnavailable)),
                Some(NextHop::Instance(x)) if x as usize == s => {
                    return Err(drop(DropReason::RouteLoop));
                }
                Some(NextHop::Instance(x)) => x as usize,
            }
        };
        let target = &topo.instances[t];
        let t_here = target.host.0 as usize == self.host;
        // c.
        if !local && !t_here {
            return Err(drop(DropReason::NotLocalDestination));
        }
        let forward = if t_here {
            Decision::Deliver {
                to: InstanceId(t as u32),
                strip,
            }
        } else {
            Decision::Encapsulate {
                host: target.host,
                key: topo.vpcs[target.vpc().index()].key,
            }
        };
        // d. network ACLs
        if sender.subnet() != target.subnet() {
            if local && let Some(acl) = topo.subnets[sender.subnet().index()].acl {
                let rules = &topo.acls[acl.index()].egress;
                match self.first_match(rules, p, p.dst, s) {
                    Some((i, Action::Accept)) => {
                        let _ = i;
                    }
                    found => {
                        return Err(drop_rule(
                            DropReason::AclEgress,
                            RuleRef::Acl {
                                acl: AclId(acl.0),
                                rule: found.map(|(i, _)| i as u16),
                            },
                        ));
                    }
                }
            }
            if t_here && let Some(acl) = topo.subnets[target.subnet().index()].acl {
                let rules = &topo.acls[acl.index()].ingress;
                match self.first_match(rules, p, p.src, t) {
                    Some((_, Action::Accept)) => {}
                    found => {
                        return Err(drop_rule(
                            DropReason::AclIngress,
                            RuleRef::Acl {
                                acl: AclId(acl.0),
                                rule: found.map(|(i, _)| i as u16),
                            },
                        ));
                    }
                }
            }
        }
        // e. ICMP errors
        if let L4::Icmp { ty, .. } = p.l4
            && [3, 4, 5, 11, 12].contains(&ty)
        {
            let related = wire::quoted(p).is_some_and(|(qp, qs, qd, qsp, qdp)| {
                qs == p.dst
                    && self
                        .conntrack
                        .find_live(
                            qp,
                            Endpoint {
                                zone,
                                addr: qs,
                                port: qsp,
                            },
                            Endpoint {
                                zone,
                                addr: qd,
                                port: qdp,
                            },
                            now,
                        )
                        .is_some()
            });
            self.note(if related {
                "icmp error: related"
            } else {
                "icmp error: unrelated"
            });
            return if related {
                Ok(forward)
            } else {
                Err(drop(DropReason::IcmpErrorUnrelated))
            };
        }
        // f. connection tracking
        let (sp, dp) = p.ct_ports();
        let a = Endpoint {
            zone,
            addr: p.src,
            port: sp,
        };
        let b = Endpoint {
            zone,
            addr: p.dst,
            port: dp,
        };
        let flags = match p.l4 {
            L4::Tcp { flags, .. } => Some(flags),
            _ => None,
        };
        if self.conntrack.conns.iter().any(|c| {
            c.proto == p.proto
                && c.orig.zone != zone
                && ((c.orig.addr, c.orig.port, c.reply.addr, c.reply.port)
                    == (a.addr, a.port, b.addr, b.port)
                    || (c.orig.addr, c.orig.port, c.reply.addr, c.reply.port)
                        == (b.addr, b.port, a.addr, a.port))
                && c.live(now)
        }) {
            self.note("ct: same addresses and ports tracked in another VPC");
        }
        if let Some(c) = self.conntrack.find_any(p.proto, a, b) {
            match c.slack(now) {
                0 => self.note("ct: entry used at exactly its timeout"),
                -1 => self.note("ct: entry expired 1 ms ago"),
                x if x < 0 => self.note("ct: entry expired"),
                _ => {}
            }
        }
        if let Some((i, dir)) = self.conntrack.find_live(p.proto, a, b, now) {
            let before = self.conntrack.conns[i].tcp;
            let applied = self.conntrack.apply(i, dir, flags, now);
            let name = match p.proto {
                TCP => "tcp",
                UDP => "udp",
                ICMP => "icmp",
                _ => "other",
            };
            if p.proto == TCP {
                let after = self.conntrack.conns[i].tcp;
                self.note(match applied {
                    Applied::Accepted => format!("ct tcp: {before:?} -> {after:?} ({dir:?})"),
                    Applied::Invalid => format!("ct tcp: invalid in {before:?} ({dir:?})"),
                    Applied::Reopen => format!("ct tcp: reopen from {before:?}"),
                });
            } else {
                self.note(format!("ct {name}: {dir:?} packet"));
            }
            match applied {
                Applied::Accepted => return Ok(forward),
                Applied::Invalid => return Err(drop(DropReason::TcpInvalid)),
                Applied::Reopen => self.conntrack.remove(i),
            }
        }
        // g. new traffic
        let tracked = !matches!(p.l4, L4::Icmp { ty, .. } if ty != 8);
        if tracked && p.proto == TCP {
            let f = flags.unwrap_or(0);
            if tcp_flags(f).is_none() {
                return Err(drop(DropReason::TcpInvalid));
            }
            if !opens_tcp(f) {
                return Err(drop(DropReason::TcpNoConnection));
            }
        }
        // h. egress security groups
        if local {
            self.groups(s, false, p, p.dst, DropReason::SgEgress)?;
        }
        // i. ingress security groups
        if t_here {
            self.groups(t, true, p, p.src, DropReason::SgIngress)?;
        }
        // j.
        if tracked {
            self.note(format!("ct: open (protocol {})", p.proto));
            self.conntrack.open(p.proto, a, b, now);
        }
        Ok(forward)
    }

    /// The security groups of instance `owner` in one direction.
    fn groups(
        &self,
        owner: usize,
        ingress: bool,
        p: &Inner<'_>,
        peer: Ipv4Addr,
        reason: DropReason,
    ) -> Result<(), Decision> {
        for &g in &self.topo.instances[owner].security_groups {
            let sg = &self.topo.security_groups[g.index()];
            let rules = if ingress { &sg.ingress } else { &sg.egress };
            if let Some((i, action)) = self.first_match(rules, p, peer, owner) {
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

    /// The first rule of `rules` matching the packet, with `peer` the remote address and
    /// `owner` the instance whose rules these are (for `sg:` peers).
    fn first_match(
        &self,
        rules: &[Rule],
        p: &Inner<'_>,
        peer: Ipv4Addr,
        owner: usize,
    ) -> Option<(usize, Action)> {
        rules
            .iter()
            .position(|r| self.matches(r, p, peer, owner))
            .map(|i| (i, rules[i].action))
    }

    fn matches(&self, r: &Rule, p: &Inner<'_>, peer: Ipv4Addr, owner: usize) -> bool {
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
            let port = match p.l4 {
                L4::Tcp { dport, .. } | L4::Udp { dport, .. } => dport,
                _ => return false,
            };
            if !r.ports.iter().any(|pr| pr.first <= port && port <= pr.last) {
                return false;
            }
        }
        match r.peer {
            Peer::Cidr(net) => net.contains(&peer),
            Peer::Group(g) => {
                let vpc = self.topo.instances[owner].vpc();
                let member = |i: &vpcd::topology::Instance| {
                    i.ip == peer && i.security_groups.contains(&SgId(g))
                };
                let here = self
                    .topo
                    .instances
                    .iter()
                    .any(|i| i.vpc() == vpc && member(i));
                if here {
                    self.note("rule: sg: peer matched");
                } else if self.topo.instances.iter().any(member) {
                    self.note("rule: sg: peer is a member in another VPC only");
                }
                here
            }
        }
    }
}
