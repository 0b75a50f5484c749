//! The reference evaluator: the specification's decision (docs/semantics.md Part 2), step by
//! step, with linear scans. Connection tracking and security groups are in [`super::policy`].

use std::net::Ipv4Addr;
use std::sync::Arc;

use vpcd_core::pipeline::Nat;
use vpcd_core::policy::route::NextHop;
use vpcd_core::topology::{Channel, HostId, InstanceId, Network, PeeringId, Space, VpcId};
use vpcd_core::{Decision, DropReason, Dropped, Ingress, Topology};

use super::conntrack::Table;
use super::wire::{self, Frag, Inner, L4, UDP};

/// The conntrack zone every basic-network instance shares (above every GRE key).
/// SPEC: zones are ordered (for the eviction's ties) as the VPCs' keys, then the basic
/// network, then the internet.
pub const BASIC: u64 = 1 << 32;
/// The conntrack zone of public addresses.
pub const INTERNET: u64 = 2 << 32;

/// Where a datagram's fragments come from: a local instance, a sending host (with the GRE
/// key, `BASIC` for none), or the internet's device.
/// SPEC: "the same ingress" of 2.5 step 1 is, for the underlay, the same sending host and the
/// same GRE key (channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum From {
    Local(usize),
    Host(usize, u64),
    Internet,
}

/// An address space, as the model names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sp {
    Vpc(usize),
    Basic,
}

impl Sp {
    fn of(s: Space) -> Sp {
        match s {
            Space::Vpc(v) => Sp::Vpc(v.index()),
            Space::Basic => Sp::Basic,
        }
    }

    fn space(self) -> Space {
        match self {
            Sp::Vpc(v) => Space::Vpc(VpcId(v as u32)),
            Sp::Basic => Space::Basic,
        }
    }
}

/// Who a packet comes from, for the flow decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// A local instance; `foreign` when its source is not its own address (source check off).
    Local { i: usize, foreign: bool },
    /// An instance on the sending host, and the channel its packet came on.
    Remote { s: usize, channel: Channel },
    /// The internet's device (on the gateway host).
    Internet,
    /// The internet, relayed by the gateway into a space.
    Relayed(Sp),
}

impl Origin {
    pub(super) fn instance(self) -> Option<usize> {
        match self {
            Origin::Local { i, .. } => Some(i),
            Origin::Remote { s, .. } => Some(s),
            _ => None,
        }
    }

    pub(super) fn local(self) -> bool {
        matches!(self, Origin::Local { .. })
    }

    pub(super) fn foreign(self) -> bool {
        match self {
            Origin::Local { foreign, .. } => foreign,
            Origin::Remote { channel, .. } => matches!(channel, Channel::Appliance(_)),
            _ => false,
        }
    }
}

/// The target of 2.5 step 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
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

/// One host's reference model.
pub struct Model {
    pub(super) topo: Arc<Topology>,
    pub(super) host: usize,
    pub conntrack: Table,
    frags: Vec<FragRecord>,
    /// What the model went through (for the coverage report).
    pub events: std::cell::RefCell<std::collections::BTreeMap<String, usize>>,
}

pub(super) fn drop(reason: DropReason) -> Decision {
    Decision::Drop(Dropped { reason, rule: None })
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
        vpcd_core::topology::Transport::Gre => 28,
        vpcd_core::topology::Transport::GreUdp => 36,
    };
    if u.checksum {
        overhead += 4;
    }
    u.mtu - overhead
}

impl Model {
    pub fn new(topo: Arc<Topology>, host: HostId) -> Model {
        let c = topo.conntrack;
        Model {
            topo,
            host: host.0 as usize,
            conntrack: Table::new(c.max_entries, c.max_per_instance),
            frags: Vec::new(),
            events: Default::default(),
        }
    }

    /// A new topology: remembered first-fragment decisions are forgotten (connections stay:
    /// this is only called with an unchanged topology).
    pub fn set_topology(&mut self, topo: Arc<Topology>) {
        self.conntrack.max_entries = topo.conntrack.max_entries as usize;
        self.conntrack.max_per_owner = topo.conntrack.max_per_instance as usize;
        self.topo = topo;
        if !self.frags.is_empty() {
            self.note("frag: records forgotten by a topology change");
        }
        self.frags.clear();
    }

    pub(super) fn note(&self, event: impl Into<String>) {
        *self.events.borrow_mut().entry(event.into()).or_default() += 1;
    }

    // ----- the topology, read by linear scans ----------------------------------------------

    pub(super) fn space(&self, i: usize) -> Sp {
        Sp::of(self.topo.instances[i].space())
    }

    pub(super) fn zone(&self, i: usize) -> u64 {
        match self.space(i) {
            Sp::Vpc(v) => u64::from(self.topo.vpcs[v].key),
            Sp::Basic => BASIC,
        }
    }

    pub(super) fn host_of(&self, i: usize) -> usize {
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

    /// Whether a space has an instance on this host.
    fn here(&self, sp: Sp) -> bool {
        (0..self.topo.instances.len()).any(|i| self.space(i) == sp && self.host_of(i) == self.host)
    }

    fn eip_owner(&self, a: Ipv4Addr) -> Option<usize> {
        self.topo.instances.iter().position(|i| i.eip == Some(a))
    }

    /// The VPC a basic instance is linked to.
    fn linked(&self, i: usize) -> Option<usize> {
        self.topo
            .interconnects
            .iter()
            .find(|c| c.instance.0 as usize == i)
            .map(|c| c.vpc.0 as usize)
    }

    /// The other VPC of peering `pp`, seen from `v`.
    fn peer_of(&self, pp: usize, v: usize) -> usize {
        let [a, b] = self.topo.peerings[pp].vpcs;
        if a.index() == v { b.index() } else { a.index() }
    }

    /// The longest-prefix route of a route table for `dst` among those `keep` accepts.
    fn longest(
        &self,
        table: usize,
        dst: Ipv4Addr,
        keep: impl Fn(&ipnet::Ipv4Net) -> bool,
    ) -> Option<NextHop> {
        let mut best: Option<&vpcd_core::policy::route::Route> = None;
        for r in self.topo.route_tables[table].routes.as_slice() {
            if r.destination.contains(&dst)
                && keep(&r.destination)
                && best.is_none_or(|b| r.destination.prefix_len() > b.destination.prefix_len())
            {
                best = Some(r);
            }
        }
        best.map(|r| r.next_hop)
    }

    /// The longest route of a table for `dst` (any route).
    pub(super) fn lpm(&self, table: usize, dst: Ipv4Addr) -> Option<NextHop> {
        self.longest(table, dst, |_| true)
    }

    pub(super) fn subnet_table(&self, i: usize) -> Option<usize> {
        match self.topo.instances[i].network {
            Network::Vpc { subnet, .. } => {
                Some(self.topo.subnets[subnet.index()].route_table.index())
            }
            Network::Basic { .. } => None,
        }
    }

    fn region(&self, i: usize) -> &str {
        &self.topo.hosts[self.host_of(i)].region
    }

    // ----- the decision ----------------------------------------------------------------------

    pub fn decide(&mut self, bytes: &[u8], ingress: Ingress, now: u64) -> Decision {
        let r = match ingress {
            Ingress::Instance(id) => self.decide_instance(bytes, id.0 as usize, now),
            Ingress::Internet => self.decide_internet(bytes, now),
            Ingress::UnderlayIp | Ingress::UnderlayUdp { .. } => {
                self.decide_underlay(bytes, ingress, now)
            }
        };
        match r {
            Ok(d) | Err(d) => d,
        }
    }

    /// 2.2: from a local instance's device.
    fn decide_instance(&mut self, bytes: &[u8], i: usize, now: u64) -> Result<Decision, Decision> {
        let topo = self.topo.clone();
        // 1.
        if i >= topo.instances.len() || self.host_of(i) != self.host {
            return Err(drop(DropReason::UnknownPort));
        }
        let inst = &topo.instances[i];
        // 2.
        let p = wire::parse_inner(bytes).map_err(drop)?;
        // 3.
        let foreign = p.src != inst.ip;
        if foreign && inst.source_check {
            return Err(drop(DropReason::SourceSpoofed));
        }
        if foreign {
            self.note("appliance: a foreign source from a local appliance");
        }
        // 4.
        self.destination_check(&p)?;
        // 5.
        let mtu = instance_mtu(&topo);
        if bytes.len() > usize::from(mtu) {
            return Err(if p.df {
                Decision::FragNeeded {
                    to: InstanceId(i as u32),
                    mtu,
                }
            } else {
                drop(DropReason::OversizeNoDf)
            });
        }
        // 6.
        if inst.is_basic() {
            self.note("origin: local basic instance");
        }
        let origin = Origin::Local { i, foreign };
        Ok(self.flow(&p, origin, 0, From::Local(i), now))
    }

    /// 2.4: from the internet's device.
    fn decide_internet(&mut self, bytes: &[u8], now: u64) -> Result<Decision, Decision> {
        if !self.is_gateway() {
            return Err(drop(DropReason::UnknownPort));
        }
        let p = wire::parse_inner(bytes).map_err(drop)?;
        self.destination_check(&p)?;
        Ok(self.flow(&p, Origin::Internet, 0, From::Internet, now))
    }

    /// 2.3: from the underlay.
    fn decide_underlay(
        &mut self,
        bytes: &[u8],
        ingress: Ingress,
        now: u64,
    ) -> Result<Decision, Decision> {
        let topo = self.topo.clone();
        // 1.
        let (sender, gre_at) = match ingress {
            Ingress::UnderlayIp => {
                let me = topo.hosts[self.host].address;
                wire::parse_outer(bytes, me).map_err(drop)?
            }
            Ingress::UnderlayUdp { from } => (from, 0),
            Ingress::Instance(_) | Ingress::Internet => unreachable!(),
        };
        // 2.
        let Some(sender_host) = topo.hosts.iter().position(|h| h.address == sender) else {
            return Err(drop(DropReason::UnknownUnderlaySource));
        };
        if sender_host == self.host {
            return Err(drop(DropReason::UnderlayFromSelf));
        }
        // 3.
        let g = &bytes[gre_at..];
        let gre = wire::parse_gre(g).map_err(drop)?;
        // 4.
        let channel = self.underlay_channel(gre.key)?;
        // 5. SPEC: the inner packet's length is the bytes after the GRE header; a longer one
        // passes only as a TCP super-segment.
        let inner_bytes = &g[gre.hlen..];
        let mtu = usize::from(instance_mtu(&topo));
        if inner_bytes.len() > mtu && !wire::super_segment(inner_bytes, mtu) {
            return Err(drop(DropReason::UnderlayTooBig));
        }
        // 6.
        let p = wire::parse_inner(inner_bytes).map_err(drop)?;
        self.destination_check(&p)?;
        // 7.
        let origin = self.underlay_origin(channel, sender_host, p.src)?;
        self.note(format!(
            "underlay: arrived on a {} channel",
            channel_kind(channel)
        ));
        // 8.
        let strip = (gre_at + gre.hlen) as u16;
        let tag = gre.key.map_or(BASIC, u64::from);
        Ok(self.flow(&p, origin, strip, From::Host(sender_host, tag), now))
    }

    /// 2.3 step 4: the channel of a GRE key, whose receiving side must be on this host.
    fn underlay_channel(&self, key: Option<u32>) -> Result<Channel, Decision> {
        let c = match key {
            None if self.topo.basic.is_none() => return Err(drop(DropReason::GreNoKey)),
            None => Channel::Basic,
            Some(k) => self
                .topo
                .channel(k)
                .ok_or(drop(DropReason::GreUnknownKey))?,
        };
        // SPEC: the receiving side of `interconnect:V>basic` is on this host when the basic
        // network has an instance here (any, linked to V or not); the target check follows.
        let receives = match c {
            Channel::Vpc(v)
            | Channel::Peering { to: v, .. }
            | Channel::Interconnect {
                vpc: v,
                to_basic: false,
            } => self.here(Sp::Vpc(v.index())),
            Channel::Interconnect { to_basic: true, .. } | Channel::Basic => self.here(Sp::Basic),
            Channel::Internet {
                space,
                inbound: true,
            } => self.here(Sp::of(space)),
            Channel::Internet { inbound: false, .. } => self.is_gateway(),
            // SPEC: the receiving side of `appliance:X` is X's VPC.
            Channel::Appliance(x) => self.here(self.space(x.index())),
        };
        if !receives {
            return Err(drop(DropReason::GreKeyNotOnHost));
        }
        Ok(c)
    }

    /// 2.3 step 7: the sender, by channel, on the sending host `h`.
    fn underlay_origin(&self, c: Channel, h: usize, src: Ipv4Addr) -> Result<Origin, Decision> {
        let topo = &self.topo;
        let on = |i: usize| self.host_of(i) == h && topo.instances[i].ip == src;
        let find = |f: &dyn Fn(usize) -> bool| (0..topo.instances.len()).find(|&i| on(i) && f(i));
        let in_vpc = |v: usize| find(&|i| self.space(i) == Sp::Vpc(v));
        let s = match c {
            Channel::Vpc(v)
            | Channel::Interconnect {
                vpc: v,
                to_basic: true,
            }
            | Channel::Internet {
                space: Space::Vpc(v),
                inbound: false,
            } => in_vpc(v.index()),
            Channel::Peering { peering, to } => in_vpc(self.peer_of(peering.index(), to.index())),
            Channel::Interconnect {
                vpc,
                to_basic: false,
            } => find(&|i| self.space(i) == Sp::Basic && self.linked(i) == Some(vpc.index())),
            Channel::Basic
            | Channel::Internet {
                space: Space::Basic,
                inbound: false,
            } => find(&|i| self.space(i) == Sp::Basic),
            Channel::Appliance(x) => (self.host_of(x.index()) == h).then_some(x.index()),
            Channel::Internet {
                space,
                inbound: true,
            } => {
                // SPEC: a public source is one outside RFC 1918.
                return if Some(h) == self.gateway() && !private(src) {
                    self.note("origin: the internet relayed by the gateway");
                    Ok(Origin::Relayed(Sp::of(space)))
                } else {
                    Err(drop(DropReason::InnerSourceNotOnSender))
                };
            }
        };
        let Some(s) = s else {
            return Err(drop(DropReason::InnerSourceNotOnSender));
        };
        if (0..topo.instances.len()).any(|i| i != s && on(i)) {
            self.note(format!(
                "underlay: the sender's address is another's too on its host ({} key)",
                channel_kind(c)
            ));
        }
        Ok(Origin::Remote { s, channel: c })
    }

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

    // ----- 2.5 the flow decision ---------------------------------------------------------

    /// Step 1 (fragments), then the rest for whole packets and first fragments.
    fn flow(
        &mut self,
        p: &Inner<'_>,
        origin: Origin,
        strip: u16,
        from: From,
        now: u64,
    ) -> Decision {
        if p.frag == Frag::Later {
            return self.later_fragment(p, strip, from, now);
        }
        let d = match self.flow_whole(p, origin, strip, now) {
            Ok(d) | Err(d) => d,
        };
        let same = |r: &FragRecord| {
            r.from == from && r.src == p.src && r.dst == p.dst && r.proto == p.proto && r.id == p.id
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

    fn later_fragment(&mut self, p: &Inner<'_>, strip: u16, from: From, now: u64) -> Decision {
        let found = self
            .frags
            .iter()
            .find(|r| {
                r.from == from
                    && r.src == p.src
                    && r.dst == p.dst
                    && r.proto == p.proto
                    && r.id == p.id
            })
            .map(|r| (r.decision, now.saturating_sub(r.at), r.dropped_since));
        match found {
            Some((d, age, dropped_since)) if age <= 30_000 => {
                if dropped_since {
                    self.note("frag: later fragment after a forwarded first and a dropped first");
                }
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
            Some((_, age, _)) => {
                self.note(if age == 30_001 {
                    "frag: later fragment 30.001 s after its first"
                } else {
                    "frag: later fragment after the window"
                });
                drop(DropReason::FragmentWithoutFirst)
            }
            None => drop(DropReason::FragmentWithoutFirst),
        }
    }

    fn flow_whole(
        &mut self,
        p: &Inner<'_>,
        origin: Origin,
        strip: u16,
        now: u64,
    ) -> Result<Decision, Decision> {
        let mut nat = Nat::NONE;
        match self.target(p, origin, &mut nat, now)? {
            Target::Internet => self.towards_internet(p, origin, strip, nat, now),
            Target::Inst(t, via) => self.towards_instance(p, origin, (t, via), strip, nat, now),
        }
    }

    /// Step 2: the target.
    fn target(
        &mut self,
        p: &Inner<'_>,
        origin: Origin,
        nat: &mut Nat,
        now: u64,
    ) -> Result<Target, Decision> {
        match origin {
            Origin::Local { i, foreign } => {
                let t = if self.eip_reply(i, p, now) {
                    self.note("route: an Elastic IP reply, first");
                    Target::Internet
                } else {
                    self.route(i, p.dst)?
                };
                if foreign {
                    self.stays_in_vpc(i, t)?;
                }
                Ok(t)
            }
            Origin::Remote { s, channel } => self.remote_target(p, s, channel),
            Origin::Internet => {
                let t = self.eip_owner(p.dst).ok_or(drop(DropReason::NoSuchEip))?;
                nat.dst = Some(self.topo.instances[t].ip);
                Ok(Target::Inst(t, None))
            }
            Origin::Relayed(sp) => {
                let t = self
                    .find(sp, p.dst)
                    .filter(|&t| self.host_of(t) == self.host)
                    .ok_or(drop(DropReason::NotLocalDestination))?;
                Ok(Target::Inst(t, None))
            }
        }
    }

    /// Step 2 for a remote sender: its route, which must lead to the channel the packet came
    /// on and end at an instance of this host.
    fn remote_target(
        &mut self,
        p: &Inner<'_>,
        s: usize,
        channel: Channel,
    ) -> Result<Target, Decision> {
        // SPEC: no route and no check of the destination on `internet:*>out`: the gateway
        // writes even a private destination to the internet device (unless an Elastic IP).
        if let Channel::Internet { inbound: false, .. } = channel {
            self.note("gateway: a remote sender's packet for the internet");
            return Ok(Target::Internet);
        }
        let foreign = matches!(channel, Channel::Appliance(_));
        let t = self.route(s, p.dst)?;
        // SPEC: the checks in the order of 2.5 step 2: the channel, a foreign packet's VPC,
        // then a local end.
        let leads = self.channel_to(s, t, foreign);
        if leads != channel {
            self.note(format!(
                "underlay: key mismatch ({} key, route to a {} channel)",
                channel_kind(channel),
                channel_kind(leads)
            ));
            return Err(drop(DropReason::GreKeyMismatch));
        }
        if foreign {
            self.stays_in_vpc(s, t)?;
        }
        match t {
            Target::Inst(x, _) if self.host_of(x) == self.host => Ok(t),
            _ => Err(drop(DropReason::NotLocalDestination)),
        }
    }

    /// A foreign packet must lead to an instance of the sender's own VPC.
    fn stays_in_vpc(&self, s: usize, t: Target) -> Result<(), Decision> {
        match t {
            Target::Inst(x, None) if self.space(x) == self.space(s) => {
                self.note("appliance: a foreign packet stays in its VPC");
                Ok(())
            }
            _ => {
                self.note("appliance: a foreign packet tries to leave its VPC");
                Err(drop(DropReason::ForeignSourceLeavesVpc))
            }
        }
    }

    /// The channel from sender `s` to a target (2.5 step 4's forward).
    pub(super) fn channel_to(&self, s: usize, t: Target, foreign: bool) -> Channel {
        let vpc = |v: usize| VpcId(v as u32);
        match t {
            Target::Internet => Channel::Internet {
                space: self.space(s).space(),
                inbound: false,
            },
            // SPEC: a foreign packet's route leads to its appliance channel, whatever it
            // reaches (one leaving the VPC is then refused as leaving).
            Target::Inst(_, _) if foreign => Channel::Appliance(InstanceId(s as u32)),
            Target::Inst(x, Some(pp)) => Channel::Peering {
                peering: vpcd_core::topology::PeeringId(pp as u32),
                to: self.topo.instances[x].vpc().unwrap(),
            },
            Target::Inst(x, None) => match (self.space(s), self.space(x)) {
                (Sp::Vpc(v), Sp::Basic) => Channel::Interconnect {
                    vpc: vpc(v),
                    to_basic: true,
                },
                (Sp::Basic, Sp::Vpc(w)) => Channel::Interconnect {
                    vpc: vpc(w),
                    to_basic: false,
                },
                (Sp::Basic, Sp::Basic) => Channel::Basic,
                (_, Sp::Vpc(w)) => Channel::Vpc(vpc(w)),
            },
        }
    }

    /// 2.6's first rule: I has an Elastic IP, the destination is public, and I's connection
    /// for this packet exists and was opened by the public end.
    fn eip_reply(&self, i: usize, p: &Inner<'_>, now: u64) -> bool {
        if self.topo.instances[i].eip.is_none() || private(p.dst) {
            return false;
        }
        let side = self.egress_side(p, i, INTERNET);
        let key = if wire::is_icmp_error(p) {
            self.quote_key(p, &side)
        } else {
            self.packet_key(p, &side)
        };
        // SPEC: "exists" is a live entry; the check removes and refreshes nothing. A packet
        // that reopens the entry belongs to a new connection, opened by I.
        let flags = match p.l4 {
            L4::Tcp { flags, .. } => flags,
            _ => 0,
        };
        key.and_then(|k| self.conntrack.find_live(&k, now))
            .is_some_and(|e| e.opener().zone == INTERNET && !e.reopened_by(side.src, flags))
    }

    // ----- 2.6 route order ---------------------------------------------------------------

    /// The route from `s`'s point of view.
    fn route(&self, s: usize, dst: Ipv4Addr) -> Result<Target, Decision> {
        match self.space(s) {
            Sp::Vpc(v) => self.route_vpc(s, v, dst),
            Sp::Basic => self.route_basic(s, dst),
        }
    }

    fn route_vpc(&self, s: usize, v: usize, dst: Ipv4Addr) -> Result<Target, Decision> {
        let topo = &self.topo;
        let vnet = topo.vpcs[v].cidr;
        let table = self.subnet_table(s).unwrap();
        let eip = topo.instances[s].eip.is_some();
        // 1.
        if vnet.contains(&dst) {
            return match self.longest(table, dst, |d| vnet.contains(d)) {
                Some(NextHop::Instance(InstanceId(x))) if x as usize == s => {
                    Err(drop(DropReason::RouteLoop))
                }
                Some(NextHop::Instance(InstanceId(x))) => {
                    self.note("route: a subnet route to an appliance");
                    Ok(Target::Inst(x as usize, None))
                }
                _ => self
                    .find(Sp::Vpc(v), dst)
                    .map(|t| Target::Inst(t, None))
                    .ok_or(drop(DropReason::NoSuchInstance)),
            };
        }
        // 2.
        if let Some(b) = self.find(Sp::Basic, dst)
            && self.linked(b) == Some(v)
        {
            self.note("route: VPC to its linked basic instance");
            return Ok(Target::Inst(b, None));
        }
        // 3., 4.
        match self.lpm(table, dst) {
            None if eip && !private(dst) => {
                self.note("route: no route, Elastic IP, public destination");
                Ok(Target::Internet)
            }
            None => Err(drop(DropReason::NoRoute)),
            Some(NextHop::Drop) => Err(drop(DropReason::RouteDrop)),
            Some(NextHop::Internet) if eip => Ok(Target::Internet),
            Some(NextHop::Internet) => Err(drop(DropReason::NoEip)),
            Some(NextHop::Instance(InstanceId(x))) if x as usize == s => {
                Err(drop(DropReason::RouteLoop))
            }
            Some(NextHop::Instance(InstanceId(x))) => Ok(Target::Inst(x as usize, None)),
            Some(NextHop::Peering(PeeringId(pp))) => {
                let w = self.peer_of(pp as usize, v);
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

    fn route_basic(&self, s: usize, dst: Ipv4Addr) -> Result<Target, Decision> {
        let topo = &self.topo;
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
        if topo.instances[s].eip.is_some() && !private(dst) {
            return Ok(Target::Internet);
        }
        Err(drop(DropReason::NoRoute))
    }

    // ----- 2.5 steps 3 and 4 -------------------------------------------------------------

    /// Step 3: the internet as target.
    fn towards_internet(
        &mut self,
        p: &Inner<'_>,
        origin: Origin,
        strip: u16,
        mut nat: Nat,
        now: u64,
    ) -> Result<Decision, Decision> {
        let s = origin
            .instance()
            .expect("only instances route to the internet");
        let local = origin.local();
        let Some(gw) = self.gateway() else {
            return Err(drop(DropReason::NoEip));
        };
        if gw != self.host {
            if !local {
                return Err(drop(DropReason::NotLocalDestination));
            }
            self.note("internet: to the gateway");
            let channel = Channel::Internet {
                space: self.space(s).space(),
                inbound: false,
            };
            let forward = Decision::Encapsulate {
                strip: 0,
                host: HostId(gw as u32),
                key: self.topo.key_of(channel),
                nat: Nat::NONE,
            };
            return self.local_egress(p, s, forward, now);
        }
        let Some(eip) = self.topo.instances[s].eip else {
            return Err(drop(DropReason::NoEip));
        };
        nat.src = Some(eip);
        if let Some(t) = self.eip_owner(p.dst) {
            self.note(if local {
                "internet: hairpin from a local instance"
            } else {
                "internet: hairpin relayed"
            });
            nat.dst = Some(self.topo.instances[t].ip);
            return self.towards_instance(p, origin, (t, None), strip, nat, now);
        }
        if !local {
            self.note("internet: relayed out");
            return Ok(Decision::ToInternet { strip, nat });
        }
        self.note("internet: out from a local instance");
        self.local_egress(p, s, Decision::ToInternet { strip: 0, nat }, now)
    }

    /// Step 4 (then 5 and 6): an instance T as target.
    fn towards_instance(
        &mut self,
        p: &Inner<'_>,
        origin: Origin,
        (t, via): (usize, Option<usize>),
        strip: u16,
        nat: Nat,
        now: u64,
    ) -> Result<Decision, Decision> {
        let topo = self.topo.clone();
        let target = &topo.instances[t];
        let t_here = self.host_of(t) == self.host;
        let translated = !nat.is_none();
        if !origin.local() && !t_here {
            if !(self.is_gateway() && translated) {
                return Err(drop(DropReason::NotLocalDestination));
            }
            self.note("gateway: relayed with NAT, no policy");
            let channel = Channel::Internet {
                space: target.space(),
                inbound: true,
            };
            let key = topo.key_of(channel);
            return Ok(Decision::Encapsulate {
                strip,
                host: target.host,
                key,
                nat,
            });
        }
        if let Some(pp) = via
            && t_here
        {
            self.return_route(origin.instance().unwrap(), t, pp)?;
        }
        let forward = if t_here {
            Decision::Deliver {
                to: InstanceId(t as u32),
                strip,
                nat,
            }
        } else {
            // A local sender: on the channel from it to T, or relayed from the internet after
            // the gateway's translation. SPEC: a hairpin from a local sender to a T on another
            // host goes on `internet:T's space>in` (the only channel whose receiver takes a
            // public source).
            let s = origin.instance().unwrap();
            let channel = if translated {
                Channel::Internet {
                    space: target.space(),
                    inbound: true,
                }
            } else {
                self.channel_to(s, Target::Inst(t, via), origin.foreign())
            };
            Decision::Encapsulate {
                strip,
                host: target.host,
                key: topo.key_of(channel),
                nat,
            }
        };
        self.instance_policy(p, origin, t, nat, forward, now)
    }

    /// Across a peering: T's subnet's route table must send the sender's address back.
    fn return_route(&self, s: usize, t: usize, pp: usize) -> Result<(), Decision> {
        let back = self.lpm(self.subnet_table(t).unwrap(), self.topo.instances[s].ip);
        if back != Some(NextHop::Peering(PeeringId(pp as u32))) {
            if let Some(NextHop::Peering(PeeringId(other))) = back {
                self.note(format!(
                    "peering: return route through another peering (#{other} for #{pp})"
                ));
            }
            return Err(drop(DropReason::PeeringNoReturnRoute));
        }
        self.note("peering: return route checked");
        Ok(())
    }
}

/// A channel's kind, for the coverage report.
pub(super) fn channel_kind(c: Channel) -> &'static str {
    match c {
        Channel::Vpc(_) => "vpc",
        Channel::Peering { .. } => "peering",
        Channel::Interconnect { to_basic: true, .. } => "interconnect>basic",
        Channel::Interconnect { .. } => "interconnect>vpc",
        Channel::Internet { inbound: true, .. } => "internet>in",
        Channel::Internet { .. } => "internet>out",
        Channel::Appliance(_) => "appliance",
        Channel::Basic => "basic",
    }
}
