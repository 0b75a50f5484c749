//! The reference evaluator: the specification's decision, step by step, with linear scans.

use std::net::Ipv4Addr;
use std::sync::Arc;

use vpcd::pipeline::Nat;
use vpcd::policy::route::NextHop;
use vpcd::policy::rules::{Action, Peer, Protocol, Rule};
use vpcd::topology::{AclId, HostId, InstanceId, Network, SgId};
use vpcd::{Decision, DropReason, Dropped, Ingress, RuleRef, Topology};

use super::conntrack::{Applied, Endpoint, Table, opens_tcp, tcp_flags};
use super::wire::{self, Frag, ICMP, Inner, L4, TCP, UDP};

/// The conntrack zone every basic-network instance shares (above every GRE key).
pub const BASIC: u64 = 1 << 32;
/// The conntrack zone of public addresses.
pub const INTERNET: u64 = 2 << 32;

/// Where a datagram's fragments come from: a local instance, a sending host (with the GRE
/// key, `BASIC` for none), or the internet's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    Local(usize),
    Host(usize, u64),
    Internet,
}

/// An address space, as the model names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sp {
    Vpc(usize),
    Basic,
}

/// Who a packet comes from, for the flow decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A local instance.
    Local(usize),
    /// An instance on the sending host.
    Remote(usize),
    /// The internet's device (on the gateway host).
    Internet,
    /// The internet, relayed by the gateway into a space.
    Relayed(Sp),
}

impl Origin {
    fn instance(self) -> Option<usize> {
        match self {
            Origin::Local(s) | Origin::Remote(s) => Some(s),
            _ => None,
        }
    }
}

/// Step 1's target.
#[derive(Debug, Clone, Copy)]
enum Target {
    Internet,
    /// An instance, reached through this peering (if any).
    Inst(usize, Option<usize>),
}

#[derive(Debug, Clone)]
struct FragRecord {
    from: From,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    decision: Decision,
    at: u64,
    /// A first fragment of the same datagram was dropped since (coverage only).
    dropped_since: bool,
}

/// One side's connection: the key as the side sees it (packet's source end first), who owns
/// it, and the peer its security groups see.
#[derive(Debug, Clone, Copy)]
struct Side {
    owner: usize,
    ingress: bool,
    src: Endpoint,
    dst: Endpoint,
    peer: Ipv4Addr,
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
    matches!(
        d,
        Decision::Deliver { .. } | Decision::Encapsulate { .. } | Decision::ToInternet { .. }
    )
}

/// RFC 1918.
pub fn private(a: Ipv4Addr) -> bool {
    let [x, y, _, _] = a.octets();
    x == 10 || (x == 172 && (16..32).contains(&y)) || (x == 192 && y == 168)
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

    /// A new topology: remembered first-fragment decisions are forgotten (connections stay:
    /// this is only called with an unchanged topology).
    pub fn set_topology(&mut self, topo: Arc<Topology>) {
        self.topo = topo;
        if !self.frags.is_empty() {
            self.note("frag: records forgotten by a topology change");
        }
        self.frags.clear();
    }

    fn note(&self, event: impl Into<String>) {
        *self.events.borrow_mut().entry(event.into()).or_default() += 1;
    }

    // ----- the topology, read by linear scans ----------------------------------------------

    fn space(&self, i: usize) -> Sp {
        match self.topo.instances[i].network {
            Network::Vpc { vpc, .. } => Sp::Vpc(vpc.0 as usize),
            Network::Basic { .. } => Sp::Basic,
        }
    }

    fn zone(&self, i: usize) -> u64 {
        match self.space(i) {
            Sp::Vpc(v) => u64::from(self.topo.vpcs[v].key),
            Sp::Basic => BASIC,
        }
    }

    fn key(&self, i: usize) -> Option<u32> {
        match self.space(i) {
            Sp::Vpc(v) => Some(self.topo.vpcs[v].key),
            Sp::Basic => None,
        }
    }

    fn host_of(&self, i: usize) -> usize {
        self.topo.instances[i].host.0 as usize
    }

    fn gateway(&self) -> Option<usize> {
        self.topo.internet.as_ref().map(|n| n.gateway.0 as usize)
    }

    fn is_gateway(&self) -> bool {
        self.gateway() == Some(self.host)
    }

    /// The instance of a space with this address.
    fn find(&self, sp: Sp, ip: Ipv4Addr) -> Option<usize> {
        (0..self.topo.instances.len())
            .find(|&i| self.space(i) == sp && self.topo.instances[i].ip == ip)
    }

    /// The VPC a basic instance is linked to.
    fn linked(&self, i: usize) -> Option<usize> {
        self.topo
            .interconnects
            .iter()
            .find(|c| c.instance.0 as usize == i)
            .map(|c| c.vpc.0 as usize)
    }

    /// The longest-prefix route of a route table for `dst`.
    fn lpm(&self, table: usize, dst: Ipv4Addr) -> Option<NextHop> {
        let mut best: Option<&vpcd::policy::route::Route> = None;
        for r in self.topo.route_tables[table].routes.as_slice() {
            if r.destination.contains(&dst)
                && best.is_none_or(|b| r.destination.prefix_len() > b.destination.prefix_len())
            {
                best = Some(r);
            }
        }
        best.map(|r| r.next_hop)
    }

    fn subnet_table(&self, i: usize) -> Option<usize> {
        match self.topo.instances[i].network {
            Network::Vpc { subnet, .. } => {
                Some(self.topo.subnets[subnet.index()].route_table.index())
            }
            Network::Basic { .. } => None,
        }
    }

    fn subnet_acl(&self, i: usize) -> Option<AclId> {
        match self.topo.instances[i].network {
            Network::Vpc { subnet, .. } => self.topo.subnets[subnet.index()].acl,
            Network::Basic { .. } => None,
        }
    }

    fn region(&self, i: usize) -> &str {
        &self.topo.hosts[self.host_of(i)].region
    }

    // ----- the decision ----------------------------------------------------------------------

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
                if inst.is_basic() {
                    self.note("origin: local basic instance");
                }
                Ok(self.flow(&p, Origin::Local(i), 0, From::Local(i), now))
            }
            Ingress::Internet => {
                if !self.is_gateway() {
                    return Err(drop(DropReason::UnknownPort));
                }
                let p = wire::parse_inner(bytes).map_err(drop)?;
                self.destination_check(&p)?;
                Ok(self.flow(&p, Origin::Internet, 0, From::Internet, now))
            }
            Ingress::UnderlayIp | Ingress::UnderlayUdp { .. } => {
                let (sender, gre_at) = match ingress {
                    Ingress::UnderlayIp => {
                        let me = topo.hosts[self.host].address;
                        wire::parse_outer(bytes, me).map_err(drop)?
                    }
                    Ingress::UnderlayUdp { from } => (from, 0),
                    Ingress::Instance(_) | Ingress::Internet => unreachable!(),
                };
                let Some(sender_host) = topo.hosts.iter().position(|h| h.address == sender) else {
                    return Err(drop(DropReason::UnknownUnderlaySource));
                };
                if sender_host == self.host {
                    return Err(drop(DropReason::UnderlayFromSelf));
                }
                let g = &bytes[gre_at..];
                let gre = wire::parse_gre(g).map_err(drop)?;
                let here = |sp: Sp| {
                    (0..topo.instances.len())
                        .any(|i| self.space(i) == sp && self.host_of(i) == self.host)
                };
                let space = match gre.key {
                    Some(key) => {
                        let Some(vpc) = topo.vpcs.iter().position(|v| v.key == key) else {
                            return Err(drop(DropReason::GreUnknownKey));
                        };
                        if !here(Sp::Vpc(vpc)) && !self.is_gateway() {
                            return Err(drop(DropReason::GreKeyNotOnHost));
                        }
                        Sp::Vpc(vpc)
                    }
                    None => {
                        if topo.basic.is_none() {
                            return Err(drop(DropReason::GreNoKey));
                        }
                        if !here(Sp::Basic) && !self.is_gateway() {
                            return Err(drop(DropReason::GreKeyNotOnHost));
                        }
                        Sp::Basic
                    }
                };
                let inner_bytes = &g[gre.hlen..];
                let p = wire::parse_inner(inner_bytes).map_err(drop)?;
                self.destination_check(&p)?;
                let strip = (gre_at + gre.hlen) as u16;
                let origin = match self.source_on(sender_host, space, p.src, p.dst) {
                    Some(s) => Origin::Remote(s),
                    None if Some(sender_host) == self.gateway() && !private(p.src) => {
                        self.note(if space == Sp::Basic {
                            "origin: the internet relayed into the basic network"
                        } else {
                            "origin: the internet relayed into a VPC"
                        });
                        Origin::Relayed(space)
                    }
                    None => return Err(drop(DropReason::InnerSourceNotOnSender)),
                };
                let tag = gre.key.map_or(BASIC, u64::from);
                Ok(self.flow(&p, origin, strip, From::Host(sender_host, tag), now))
            }
        }
    }

    /// The source instance of an underlay packet: on the sending host, with the inner source
    /// address, in the key's space, else in the spaces that may send into it. Among several
    /// candidates (overlapping peered or linked VPCs), the first, in the order own space,
    /// peerings, interconnects (file order), whose own route leads to `dst` inside `space`;
    /// when none does, the first candidate.
    fn source_on(&self, host: usize, space: Sp, src: Ipv4Addr, dst: Ipv4Addr) -> Option<usize> {
        let topo = &self.topo;
        let n = topo.instances.len();
        let on = |i: usize| self.host_of(i) == host && topo.instances[i].ip == src;
        let mut found: Vec<(usize, &'static str)> = Vec::new();
        if let Some(s) = (0..n).find(|&i| on(i) && self.space(i) == space) {
            found.push((s, "underlay source: its own space"));
        }
        let in_vpc = |v: usize| (0..n).find(|&i| on(i) && self.space(i) == Sp::Vpc(v));
        match space {
            Sp::Vpc(w) => {
                for p in &topo.peerings {
                    let [a, b] = [p.vpcs[0].index(), p.vpcs[1].index()];
                    let other = if a == w {
                        b
                    } else if b == w {
                        a
                    } else {
                        continue;
                    };
                    if let Some(s) = in_vpc(other) {
                        found.push((s, "underlay source: an instance of a peered VPC"));
                    }
                }
                for c in topo.interconnects.iter().filter(|c| c.vpc.index() == w) {
                    let i = c.instance.index();
                    if on(i) {
                        found.push((i, "underlay source: a basic instance linked to the VPC"));
                    }
                }
            }
            Sp::Basic => {
                for c in &topo.interconnects {
                    if let Some(s) = in_vpc(c.vpc.index()) {
                        found.push((s, "underlay source: an instance of a linked VPC"));
                    }
                }
            }
        }
        if found.len() > 1 {
            self.note("underlay source: several candidates");
        }
        let leads_here = |s: usize| matches!(self.route(s, dst), Ok(Target::Inst(t, _)) if self.space(t) == space);
        let (s, why) = found
            .iter()
            .copied()
            .find(|&(s, _)| leads_here(s))
            .or(found.first().copied())?;
        if why != "underlay source: its own space" {
            self.note(why);
        }
        Some(s)
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

    fn flow(
        &mut self,
        p: &Inner<'_>,
        origin: Origin,
        strip: u16,
        from: From,
        now: u64,
    ) -> Decision {
        let same = |r: &FragRecord| {
            r.from == from && r.src == p.src && r.dst == p.dst && r.proto == p.proto && r.id == p.id
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
                        Decision::Deliver { to, nat, .. } => Decision::Deliver { to, strip, nat },
                        Decision::Encapsulate { host, key, nat, .. } => Decision::Encapsulate {
                            strip,
                            host,
                            key,
                            nat,
                        },
                        Decision::ToInternet { nat, .. } => Decision::ToInternet { strip, nat },
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
        let d = match self.flow_whole(p, origin, strip, now) {
            Ok(d) | Err(d) => d,
        };
        if p.frag == Frag::First && forwards(&d) {
            self.frags.retain(|r| !same(r));
            self.frags.push(FragRecord {
                from,
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

    /// Step 1 for an instance origin: the route from `s`'s point of view.
    fn route(&self, s: usize, dst: Ipv4Addr) -> Result<Target, Decision> {
        let topo = &self.topo;
        let sender = &topo.instances[s];
        let eip = sender.eip.is_some();
        match self.space(s) {
            Sp::Vpc(v) => {
                if topo.vpcs[v].cidr.contains(&dst) {
                    return self
                        .find(Sp::Vpc(v), dst)
                        .map(|t| Target::Inst(t, None))
                        .ok_or(drop(DropReason::NoSuchInstance));
                }
                if let Some(b) = self.find(Sp::Basic, dst)
                    && self.linked(b) == Some(v)
                {
                    self.note("route: VPC to its linked basic instance");
                    return Ok(Target::Inst(b, None));
                }
                let table = self.subnet_table(s).unwrap();
                match self.lpm(table, dst) {
                    None if eip && !private(dst) => {
                        self.note("route: no route, Elastic IP, public destination");
                        Ok(Target::Internet)
                    }
                    None => Err(drop(DropReason::NoRoute)),
                    Some(NextHop::Drop) => Err(drop(DropReason::RouteDrop)),
                    Some(NextHop::Internet) if eip => Ok(Target::Internet),
                    Some(NextHop::Internet) => Err(drop(DropReason::NoEip)),
                    Some(NextHop::Instance(x)) if x as usize == s => {
                        Err(drop(DropReason::RouteLoop))
                    }
                    Some(NextHop::Instance(x)) => Ok(Target::Inst(x as usize, None)),
                    Some(NextHop::Peering(pp)) => {
                        let vpcs = topo.peerings[pp as usize].vpcs;
                        let w = if vpcs[0].index() == v {
                            vpcs[1].index()
                        } else {
                            vpcs[0].index()
                        };
                        if !topo.vpcs[w].cidr.contains(&dst) {
                            return Err(drop(DropReason::PeeringNotTransitive));
                        }
                        self.note(format!("route: through peering #{pp}"));
                        self.find(Sp::Vpc(w), dst)
                            .map(|t| Target::Inst(t, Some(pp as usize)))
                            .ok_or(drop(DropReason::NoSuchInstance))
                    }
                }
            }
            Sp::Basic => {
                if let Some(pool) = &topo.basic
                    && pool.cidr.contains(&dst)
                {
                    let b = self
                        .find(Sp::Basic, dst)
                        .ok_or(drop(DropReason::NoSuchInstance))?;
                    let tenant = |i: usize| match &topo.instances[i].network {
                        Network::Basic { tenant } => tenant.clone(),
                        Network::Vpc { .. } => unreachable!(),
                    };
                    if tenant(b) != tenant(s) {
                        return Err(drop(DropReason::BasicOtherTenant));
                    }
                    if self.region(b) != self.region(s) {
                        return Err(drop(DropReason::BasicOtherRegion));
                    }
                    return Ok(Target::Inst(b, None));
                }
                if let Some(v) = self.linked(s)
                    && topo.vpcs[v].cidr.contains(&dst)
                {
                    self.note("route: basic instance to its linked VPC");
                    return self
                        .find(Sp::Vpc(v), dst)
                        .map(|t| Target::Inst(t, None))
                        .ok_or(drop(DropReason::NoSuchInstance));
                }
                if eip && !private(dst) {
                    return Ok(Target::Internet);
                }
                Err(drop(DropReason::NoRoute))
            }
        }
    }

    fn flow_whole(
        &mut self,
        p: &Inner<'_>,
        origin: Origin,
        strip: u16,
        now: u64,
    ) -> Result<Decision, Decision> {
        let topo = self.topo.clone();
        let mut nat = Nat::NONE;
        // 1. the target
        let target = match origin {
            Origin::Local(s) | Origin::Remote(s) => self.route(s, p.dst)?,
            Origin::Internet => {
                let t = topo
                    .instances
                    .iter()
                    .position(|i| i.eip == Some(p.dst))
                    .ok_or(drop(DropReason::NoSuchEip))?;
                nat.dst = Some(topo.instances[t].ip);
                Target::Inst(t, None)
            }
            Origin::Relayed(sp) => {
                let t = (0..topo.instances.len())
                    .find(|&i| {
                        self.space(i) == sp
                            && topo.instances[i].ip == p.dst
                            && self.host_of(i) == self.host
                    })
                    .ok_or(drop(DropReason::NotLocalDestination))?;
                Target::Inst(t, None)
            }
        };
        let local = matches!(origin, Origin::Local(_));
        // 2. the internet
        let (t, via) = match target {
            Target::Inst(t, via) => (t, via),
            Target::Internet => {
                let s = origin.instance().unwrap();
                let Some(gw) = self.gateway() else {
                    unreachable!("an Elastic IP without [internet]")
                };
                if gw != self.host {
                    if !local {
                        return Err(drop(DropReason::NotLocalDestination));
                    }
                    self.note("internet: to the gateway");
                    let forward = Decision::Encapsulate {
                        strip: 0,
                        host: HostId(gw as u32),
                        key: self.key(s),
                        nat: Nat::NONE,
                    };
                    return self.local_egress(p, s, forward, now);
                }
                nat.src = topo.instances[s].eip;
                if let Some(t) = topo.instances.iter().position(|i| i.eip == Some(p.dst)) {
                    self.note(if local {
                        "internet: hairpin from a local instance"
                    } else {
                        "internet: hairpin relayed"
                    });
                    nat.dst = Some(topo.instances[t].ip);
                    (t, None)
                } else if !local {
                    self.note("internet: relayed out");
                    return Ok(Decision::ToInternet { strip, nat });
                } else {
                    self.note("internet: out from a local instance");
                    let forward = Decision::ToInternet { strip: 0, nat };
                    return self.local_egress(p, s, forward, now);
                }
            }
        };
        // 3. an instance
        let target = &topo.instances[t];
        let t_here = target.host.0 as usize == self.host;
        let gateway_translates = self.is_gateway() && !nat.is_none();
        if !local && !t_here && !gateway_translates {
            return Err(drop(DropReason::NotLocalDestination));
        }
        let s = origin.instance();
        if let Some(pp) = via
            && t_here
        {
            let s = s.unwrap();
            let back = self.lpm(self.subnet_table(t).unwrap(), topo.instances[s].ip);
            if back != Some(NextHop::Peering(pp as u32)) {
                if let Some(NextHop::Peering(other)) = back {
                    self.note(format!(
                        "peering: return route through another peering (#{other} for #{pp})"
                    ));
                }
                return Err(drop(DropReason::PeeringNoReturnRoute));
            }
            self.note("peering: return route checked");
        }
        let forward = if t_here {
            Decision::Deliver {
                to: InstanceId(t as u32),
                strip,
                nat,
            }
        } else {
            Decision::Encapsulate {
                strip,
                host: target.host,
                key: self.key(t),
                nat,
            }
        };
        if !local && !t_here {
            self.note("gateway: relayed with NAT, no policy");
            return Ok(forward);
        }
        let translated = !nat.is_none();
        let subnet_of_s = s.and_then(|s| topo.instances[s].subnet());
        let same_subnet = !translated && subnet_of_s.is_some() && subnet_of_s == target.subnet();
        if translated && subnet_of_s.is_some() && subnet_of_s == target.subnet() {
            self.note("acl: same subnet through the gateway's NAT: ACLs apply");
        }
        let seen = nat.src.unwrap_or(p.src);
        // ACLs
        if !same_subnet {
            if local && let Some(acl) = self.subnet_acl(s.unwrap()) {
                self.acl(acl, false, p, p.dst, s.unwrap())?;
            }
            if t_here && let Some(acl) = self.subnet_acl(t) {
                self.acl(acl, true, p, seen, t)?;
            }
        }
        // The connection sides.
        let (sp, dp) = p.ct_ports();
        let egress = local.then(|| {
            let s = s.unwrap();
            Side {
                owner: s,
                ingress: false,
                src: Endpoint {
                    zone: self.zone(s),
                    addr: p.src,
                    port: sp,
                },
                dst: Endpoint {
                    zone: if translated { INTERNET } else { self.zone(t) },
                    addr: p.dst,
                    port: dp,
                },
                peer: p.dst,
            }
        });
        let ingress = t_here.then(|| {
            let near = match origin {
                _ if translated => INTERNET,
                Origin::Internet | Origin::Relayed(_) => INTERNET,
                Origin::Local(s) | Origin::Remote(s) => self.zone(s),
            };
            Side {
                owner: t,
                ingress: true,
                src: Endpoint {
                    zone: near,
                    addr: seen,
                    port: sp,
                },
                dst: Endpoint {
                    zone: self.zone(t),
                    // The destination as delivered: T's address after NAT, else the packet's
                    // (another address than T's when a route sends it to an appliance). The
                    // spec says "T's ip", and also that the keys are equal when no NAT
                    // applies; see `ambiguity_the_ingress_key_of_an_appliance_...`.
                    addr: nat.dst.unwrap_or(p.dst),
                    port: dp,
                },
                peer: seen,
            }
        });
        if translated {
            self.note(format!(
                "nat: {} side(s) here",
                usize::from(egress.is_some()) + usize::from(ingress.is_some())
            ));
        }
        self.policy(p, egress, ingress, forward, now)
    }

    /// The local egress policy of a packet leaving local instance `s` for the internet.
    fn local_egress(
        &mut self,
        p: &Inner<'_>,
        s: usize,
        forward: Decision,
        now: u64,
    ) -> Result<Decision, Decision> {
        if let Some(acl) = self.subnet_acl(s) {
            self.acl(acl, false, p, p.dst, s)?;
        }
        let (sp, dp) = p.ct_ports();
        let side = Side {
            owner: s,
            ingress: false,
            src: Endpoint {
                zone: self.zone(s),
                addr: p.src,
                port: sp,
            },
            dst: Endpoint {
                zone: INTERNET,
                addr: p.dst,
                port: dp,
            },
            peer: p.dst,
        };
        self.policy(p, Some(side), None, forward, now)
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
        match self.first_match(rules, p, peer, owner) {
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

    /// ICMP errors, connection tracking and security groups, for the local sides.
    fn policy(
        &mut self,
        p: &Inner<'_>,
        egress: Option<Side>,
        ingress: Option<Side>,
        forward: Decision,
        now: u64,
    ) -> Result<Decision, Decision> {
        let sides: Vec<Side> = egress.into_iter().chain(ingress).collect();
        // e. ICMP errors
        if let L4::Icmp { ty, .. } = p.l4
            && [3, 4, 5, 11, 12].contains(&ty)
        {
            let related = wire::quoted(p).is_some_and(|(qp, _qs, qd, qsp, qdp)| {
                sides.iter().all(|side| {
                    self.conntrack
                        .find_live(
                            qp,
                            Endpoint {
                                zone: side.dst.zone,
                                addr: side.dst.addr,
                                port: qsp,
                            },
                            Endpoint {
                                zone: side.src.zone,
                                addr: qd,
                                port: qdp,
                            },
                            now,
                        )
                        .is_some()
                })
            });
            if let Some((_, qs, ..)) = wire::quoted(p)
                && related
                && qs != p.dst
            {
                self.note("icmp error: related, the quote's source is not the destination");
            }
            self.note(match (related, sides.len()) {
                (true, 1) => "icmp error: related",
                (false, 1) => "icmp error: unrelated",
                (true, _) => "icmp error: related (both sides here)",
                (false, _) => "icmp error: unrelated (both sides here)",
            });
            if related
                && sides
                    .iter()
                    .any(|x| x.src.zone == INTERNET || x.dst.zone == INTERNET)
            {
                self.note("icmp error: related, through NAT or from the internet");
            }
            return if related {
                Ok(forward)
            } else {
                Err(drop(DropReason::IcmpErrorUnrelated))
            };
        }
        // f. connection tracking, side by side (one connection when the keys are equal)
        // Equal keys (no NAT), or mirrored ones (an instance to its own Elastic IP with equal
        // ports: the same unordered key): one connection, applied once, the egress's way.
        let merged = sides.len() == 2
            && ((sides[0].src, sides[0].dst) == (sides[1].src, sides[1].dst)
                || (sides[0].src, sides[0].dst) == (sides[1].dst, sides[1].src));
        if merged && sides[0].src != sides[1].src {
            self.note("ct: the two sides' keys are mirrored (self hairpin): one connection");
        }
        let flags = match p.l4 {
            L4::Tcp { flags, .. } => Some(flags),
            _ => None,
        };
        let mut need = vec![false; sides.len()];
        for (n, side) in sides.iter().enumerate() {
            if merged && n == 1 {
                need[1] = need[0];
                break;
            }
            let (a, b) = (side.src, side.dst);
            if let Some(c) = self.conntrack.find_any(p.proto, a, b) {
                match c.slack(now) {
                    0 => self.note("ct: entry used at exactly its timeout"),
                    -1 => self.note("ct: entry expired 1 ms ago"),
                    x if x < 0 => self.note("ct: entry expired"),
                    _ => {}
                }
            }
            match self.conntrack.find_live(p.proto, a, b, now) {
                Some((i, dir)) => {
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
                            Applied::Accepted => {
                                format!("ct tcp: {before:?} -> {after:?} ({dir:?})")
                            }
                            Applied::Invalid => format!("ct tcp: invalid in {before:?} ({dir:?})"),
                            Applied::Reopen => format!("ct tcp: reopen from {before:?}"),
                        });
                    } else {
                        self.note(format!("ct {name}: {dir:?} packet"));
                    }
                    if a.zone >= BASIC || b.zone >= BASIC {
                        self.note(format!(
                            "ct: live connection in zones {}/{}",
                            zone_name(a.zone),
                            zone_name(b.zone)
                        ));
                    }
                    match applied {
                        Applied::Accepted => {}
                        Applied::Invalid => return Err(drop(DropReason::TcpInvalid)),
                        Applied::Reopen => {
                            self.conntrack.remove(i);
                            need[n] = true;
                        }
                    }
                }
                None => need[n] = true,
            }
        }
        if !need.contains(&true) {
            return Ok(forward);
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
        // h., i. security groups
        for (n, side) in sides.iter().enumerate() {
            if need[n] {
                let reason = if side.ingress {
                    DropReason::SgIngress
                } else {
                    DropReason::SgEgress
                };
                self.groups(side.owner, side.ingress, p, side.peer, reason)?;
            }
        }
        // j.
        if tracked {
            for (n, side) in sides.iter().enumerate() {
                if need[n] && !(merged && n == 1) {
                    self.note(format!(
                        "ct: open (protocol {}, zones {}/{})",
                        p.proto,
                        zone_name(side.src.zone),
                        zone_name(side.dst.zone)
                    ));
                    self.conntrack.open(p.proto, side.src, side.dst, now);
                }
            }
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
    }
}

fn zone_name(z: u64) -> &'static str {
    match z {
        BASIC => "basic",
        INTERNET => "internet",
        _ => "vpc",
    }
}
