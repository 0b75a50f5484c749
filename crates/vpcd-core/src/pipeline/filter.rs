//! The filter (docs/semantics.md 2.5 step 5 and 2.7): network ACLs, then, one local side at a
//! time, connection tracking and security groups.
//!
//! A side is one end of the packet on this host: the egress side of a local sender, the
//! ingress side of a local target. Each side's connection lives in an entry of its own port
//! (the instance), so two instances of one host, or an appliance and the instances it
//! forwards between, never share their state.

use std::net::Ipv4Addr;

use super::decide::{Decider, FullDecision, INTERNET, Origin, policy_drop, ports, zone_of};
use super::plan::Plan;
use super::trace::{self, Stage};
use super::{Decision, RuleRef};
use crate::policy::conntrack::{
    ConnKey, ConnRef, Direction, Endpoint, Open, Owner, Track, Zone, icmp_query, tcp,
};
use crate::policy::rules::{Outcome, RuleList, Subject};
use crate::reason::DropReason;
use crate::topology::{AclId, InstanceId, SgId};
use crate::wire::ipv4::{Ipv4Packet, L4, icmp_type};

/// One local side of a packet.
#[derive(Debug, Clone, Copy)]
pub(super) struct Side {
    /// The local instance whose side it is.
    pub instance: InstanceId,
    /// Its port: the instance's zone and address.
    pub port: Owner,
    /// The target's side (else the sender's).
    pub ingress: bool,
    /// The packet's source end as this side sees it.
    pub src: Endpoint,
    /// The packet's destination end as this side sees it.
    pub dst: Endpoint,
}

impl Side {
    /// The sending side of `instance` (address `addr`): the packet as sent, its source in
    /// `zones[0]` (the sender's), its destination in `zones[1]`.
    fn egress(instance: InstanceId, addr: Ipv4Addr, zones: [Zone; 2], ip: &Ipv4Packet) -> Side {
        let (sp, dp) = ports(ip);
        Side {
            instance,
            port: Owner {
                zone: zones[0],
                addr,
            },
            ingress: false,
            src: Endpoint {
                zone: zones[0],
                addr: ip.src,
                port: sp,
            },
            dst: Endpoint {
                zone: zones[1],
                addr: ip.dst,
                port: dp,
            },
        }
    }

    fn key(&self, ip: &Ipv4Packet) -> Option<ConnKey> {
        ConnKey::of(self.port, ip.protocol, &ip.l4, self.src, self.dst)
    }
}

/// An ICMP reply (echo, timestamp, information, address mask): it only ever belongs to its
/// query's entry.
fn is_icmp_reply(ip: &Ipv4Packet) -> bool {
    matches!(ip.l4, L4::Icmp { kind, .. } if matches!(icmp_query(kind), Some((_, false))))
}

/// The destination port rules match, for TCP and UDP.
fn rule_port(ip: &Ipv4Packet, reverse: bool) -> Option<u16> {
    match ip.l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => {
            Some(if reverse { sport } else { dport })
        }
        _ => None,
    }
}

/// An ACL's verdict: the rule that allowed, or the one that denied (`None`: no rule matched).
fn acl_allows(list: &RuleList<AclId>, s: &Subject) -> Result<u16, Option<u16>> {
    match list.evaluate(s) {
        Outcome::Accepted(o) => Ok(o.rule),
        Outcome::Dropped(o) => Err(Some(o.rule)),
        Outcome::NoMatch => Err(None),
    }
}

/// A security-group list's verdict: the rule that accepted, or the one that dropped.
fn sg_allows(list: &RuleList<SgId>, s: &Subject, instance: InstanceId) -> Result<RuleRef, RuleRef> {
    match list.evaluate(s) {
        Outcome::Accepted(o) => Ok(RuleRef::SecurityGroup {
            group: o.owner,
            rule: o.rule,
        }),
        Outcome::Dropped(o) => Err(RuleRef::SecurityGroup {
            group: o.owner,
            rule: o.rule,
        }),
        Outcome::NoMatch => Err(RuleRef::SecurityGroupsEnd { instance }),
    }
}

/// What tracking found for the two sides: which found their connection, the handles of those
/// that go on (an ended one has none), and whether one ended.
#[derive(Default)]
struct Tracked {
    found: [bool; 2],
    conns: [Option<ConnRef>; 2],
    ended: bool,
}

/// An instance to its own Elastic IP: both sides are one, with the egress side's key (for an
/// ICMP query the requester differs between the two views).
fn one_side(sides: &[Option<Side>; 2]) -> bool {
    match sides {
        [Some(e), Some(i)] => {
            e.port == i.port
                && ((e.src, e.dst) == (i.src, i.dst) || (e.src, e.dst) == (i.dst, i.src))
        }
        _ => false,
    }
}

impl Decider<'_> {
    /// Network ACLs: stateless, VPC subnets only, not inside one subnet (unless translated).
    pub fn acls(&mut self, origin: Origin, plan: &Plan, ip: &Ipv4Packet) -> Result<(), Decision> {
        let topo = self.topo;
        let src = origin
            .source()
            .map(|s| topo.instance(s))
            .and_then(|s| s.subnet());
        let dst = plan
            .target
            .map(|d| topo.instance(d))
            .and_then(|d| d.subnet());
        if plan.nat.is_none() && src.is_some() && src == dst {
            self.note(Stage::Acl, |_| {
                vec![("result", "none: inside one subnet".into())]
            });
            return Ok(());
        }
        let subject = |peer, dport: Option<u16>| Subject {
            peer,
            protocol: ip.protocol,
            dport,
        };
        // The target's ACL sees the port the balancer translated to.
        let in_port = rule_port(ip, false).map(|p| plan.lb.dport.unwrap_or(p));
        let acl_of = |s: Option<crate::topology::SubnetId>| s.and_then(|s| topo.subnet(s).acl);
        if matches!(origin, Origin::Local { .. })
            && let Some(acl) = acl_of(src)
        {
            let verdict = acl_allows(
                &topo.acls[acl.index()].egress_list,
                &subject(ip.dst, rule_port(ip, false)),
            );
            self.note(Stage::Acl, |t| trace::acl_fields(t, acl, false, verdict));
            if let Err(rule) = verdict {
                return Err(policy_drop(
                    DropReason::AclEgress,
                    RuleRef::Acl { acl, rule },
                ));
            }
        }
        let seen_src = plan.lb.src.or(plan.nat.src).unwrap_or(ip.src);
        if plan.target_local
            && let Some(acl) = acl_of(dst)
        {
            let verdict = acl_allows(
                &topo.acls[acl.index()].ingress_list,
                &subject(seen_src, in_port),
            );
            self.note(Stage::Acl, |t| trace::acl_fields(t, acl, true, verdict));
            if let Err(rule) = verdict {
                return Err(policy_drop(
                    DropReason::AclIngress,
                    RuleRef::Acl { acl, rule },
                ));
            }
        }
        Ok(())
    }

    /// The local sides of a packet (2.7, "Sides"). `zone` is the sender's.
    pub fn sides(
        &self,
        origin: Origin,
        zone: Zone,
        plan: &Plan,
        ip: &Ipv4Packet,
    ) -> [Option<Side>; 2] {
        let topo = self.topo;
        let (sp, dp) = ports(ip);
        let translated = !plan.nat.is_none();
        let target = plan
            .target
            .map(|id| (id, topo.instance(id), zone_of(topo, topo.instance(id))));
        let egress = match origin {
            Origin::Local { id, .. } => {
                let far = match target {
                    Some((_, _, z)) if !translated && !plan.to_internet => z,
                    _ => INTERNET,
                };
                Some(Side::egress(id, topo.instance(id).ip, [zone, far], ip))
            }
            _ => None,
        };
        let ingress = target.filter(|_| plan.target_local).map(|(id, inst, tz)| {
            let near = if translated || matches!(origin, Origin::Internet { .. }) {
                INTERNET
            } else {
                zone
            };
            Side {
                instance: id,
                port: Owner {
                    zone: tz,
                    addr: inst.ip,
                },
                ingress: true,
                src: Endpoint {
                    zone: near,
                    addr: plan.lb.src.or(plan.nat.src).unwrap_or(ip.src),
                    port: plan.lb.sport.unwrap_or(sp),
                },
                // The destination as delivered: the target's address after NAT (and a load
                // balancer's port), else the packet's (an appliance receives packets for
                // other addresses).
                dst: Endpoint {
                    zone: tz,
                    addr: plan.lb.dst.or(plan.nat.dst).unwrap_or(ip.dst),
                    port: plan.lb.dport.unwrap_or(dp),
                },
            }
        });
        [egress, ingress]
    }

    /// The tracked connections of the sides that have one, updated and counted by this
    /// packet of `len` bytes; the error is the reason of an invalid packet.
    fn track_found(
        &mut self,
        sides: &[Option<Side>; 2],
        keys: [Option<ConnKey>; 2],
        merged: bool,
        ip: &Ipv4Packet,
        len: usize,
    ) -> Result<Tracked, DropReason> {
        let Tracked {
            mut found,
            mut conns,
            mut ended,
        } = Tracked::default();
        for n in 0..2 {
            let (Some(side), Some(key)) = (sides[n], keys[n]) else {
                continue;
            };
            if n == 1 && merged {
                // One entry, tracked once (the fast lane too: it has no second handle).
                found[1] = found[0];
                continue;
            }
            let Some(r) = self.state.conntrack.lookup(&key, self.now) else {
                self.note(Stage::Conntrack, |t| {
                    trace::tracked_fields(t, &side, None, None)
                });
                continue;
            };
            let before = self.state.conntrack.get(r).map(|c| c.state);
            let tracked = self.state.conntrack.track(r, &side.src, &ip.l4, self.now);
            self.note(Stage::Conntrack, |t| {
                trace::tracked_fields(t, &side, before, Some(&tracked))
            });
            match tracked {
                Track::Accepted(dir) => {
                    self.state.conntrack.account(r, dir, len);
                    (found[n], conns[n]) = (true, Some(r));
                }
                Track::Ended => (found[n], ended) = (true, true),
                Track::Invalid(reason) => return Err(reason),
                Track::Reopen | Track::Gone => {}
            }
        }
        Ok(Tracked {
            found,
            conns,
            ended,
        })
    }

    /// Connection tracking and security groups for the local sides.
    pub fn filter(
        &mut self,
        origin: Origin,
        zone: Zone,
        plan: &Plan,
        ip: &Ipv4Packet,
        pkt: &[u8],
    ) -> FullDecision {
        let sides = self.sides(origin, zone, plan, ip);
        if matches!(ip.l4, L4::Icmp { kind, .. } if icmp_type::is_error(kind)) {
            let related = self.related(&sides, ip, pkt);
            self.note(Stage::Conntrack, |_| {
                let quote = if related {
                    "a tracked connection"
                } else {
                    "no tracked connection"
                };
                vec![("icmp error", format!("quotes {quote}"))]
            });
            return FullDecision::uncached(if related {
                plan.forward
            } else {
                Decision::drop(DropReason::IcmpErrorUnrelated)
            });
        }
        let keys = sides.map(|s| s.and_then(|s| s.key(ip)));
        if sides.iter().flatten().count() > keys.iter().flatten().count() {
            // ICMP other than a query or its reply: the rules judge it each time.
            let all = [sides[0].is_some(), sides[1].is_some()];
            return FullDecision::uncached(match self.groups(&sides, all, ip, false) {
                Ok(()) => plan.forward,
                Err(d) => d,
            });
        }
        let merged = one_side(&sides);
        let Tracked {
            found,
            mut conns,
            ended,
        } = match self.track_found(&sides, keys, merged, ip, pkt.len()) {
            Ok(topo) => topo,
            Err(reason) => return FullDecision::uncached(Decision::drop(reason)),
        };
        let need = [
            sides[0].is_some() && !found[0],
            sides[1].is_some() && !found[1],
        ];
        if need.contains(&true) && is_icmp_reply(ip) {
            // A reply that answers no query of ours opens nothing: the rules judge it.
            return FullDecision::uncached(match self.groups(&sides, need, ip, false) {
                Ok(()) => plan.forward,
                Err(d) => d,
            });
        }
        if need.contains(&true)
            && let Err(d) = self.open(&sides, keys, need, merged, &mut conns, ip, pkt.len())
        {
            return FullDecision::uncached(d);
        }
        FullDecision {
            decision: plan.forward,
            conns,
            sources: sides.map(|s| s.map_or(Endpoint::NONE, |s| s.src)),
            cacheable: !ended,
        }
    }

    /// New traffic (2.7, "New traffic"): what may open, the groups (the other way round for a
    /// TCP pickup they refuse), then the entries, which count the packet (`len` bytes).
    #[allow(clippy::too_many_arguments)]
    fn open(
        &mut self,
        sides: &[Option<Side>; 2],
        keys: [Option<ConnKey>; 2],
        need: [bool; 2],
        merged: bool,
        conns: &mut [Option<ConnRef>; 2],
        ip: &Ipv4Packet,
        len: usize,
    ) -> Result<(), Decision> {
        let pickup = match ip.l4 {
            L4::Tcp { flags, .. } if !tcp::valid_flags(flags) => {
                return Err(Decision::drop(DropReason::TcpInvalid));
            }
            L4::Tcp { flags, .. } => match tcp::opens(flags) {
                Some(tcp::TcpState::SynSent) => false,
                Some(_) => true,
                None => return Err(Decision::drop(DropReason::TcpNoConnection)),
            },
            _ => false,
        };
        let reverse = match self.groups(sides, need, ip, false) {
            Ok(()) => false,
            Err(_) if pickup && self.groups(sides, need, ip, true).is_ok() => true,
            Err(d) => return Err(d),
        };
        for n in 0..2 {
            let (Some(side), Some(key), true) = (sides[n], keys[n], need[n]) else {
                continue;
            };
            if n == 1 && merged {
                continue;
            }
            let opener = if reverse { side.dst } else { side.src };
            let how = if pickup {
                Open::Pickup { reply: reverse }
            } else {
                Open::New
            };
            let opened = self
                .state
                .conntrack
                .open(key, opener, opener.owner(), how, self.now);
            self.note(Stage::Conntrack, |t| {
                let what = match &opened {
                    Ok(_) if pickup => "picked up (loose TCP pickup)".to_string(),
                    Ok(_) => "opened".to_string(),
                    Err(r) => format!("refused: {r}"),
                };
                vec![("side", trace::side_name(t, &side)), ("entry", what)]
            });
            let r = opened.map_err(Decision::drop)?;
            let dir = if reverse {
                Direction::Reply
            } else {
                Direction::Original
            };
            self.state.conntrack.account(r, dir, len);
            conns[n] = Some(r);
        }
        Ok(())
    }

    /// The security groups of the sides in `need`, egress before ingress; `reverse` judges the
    /// packet as a reply of a connection its destination opened (a TCP pickup).
    fn groups(
        &mut self,
        sides: &[Option<Side>; 2],
        need: [bool; 2],
        ip: &Ipv4Packet,
        reverse: bool,
    ) -> Result<(), Decision> {
        let topo = self.topo;
        for (side, _) in sides.iter().zip(need).filter(|(_, n)| *n) {
            let Some(s) = side else { continue };
            let inst = topo.instance(s.instance);
            // The far end: the destination for the sender, the source for the target.
            let peer = if s.ingress { s.src.addr } else { s.dst.addr };
            let outbound = s.ingress == reverse;
            let (rules, reason) = if outbound {
                (&inst.egress_rules, DropReason::SgEgress)
            } else {
                (&inst.ingress_rules, DropReason::SgIngress)
            };
            // The port as this side sees it (a load balancer translates it between sides).
            let side_port = if reverse { s.src.port } else { s.dst.port };
            let subject = Subject {
                peer,
                protocol: ip.protocol,
                dport: rule_port(ip, reverse).map(|_| side_port),
            };
            let verdict = sg_allows(rules, &subject, s.instance);
            self.note(Stage::SecurityGroup, |t| {
                trace::group_fields(t, s, outbound, reverse, &verdict)
            });
            verdict.map_err(|rule| policy_drop(reason, rule))?;
        }
        Ok(())
    }
}
