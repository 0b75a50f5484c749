//! The context every stage of the decision runs in, and the flow decision that strings the
//! stages together (docs/semantics.md 2.5): later fragments, the flow cache, then the full
//! path: target and plan, network ACLs, connection tracking and security groups.

use std::net::Ipv4Addr;

use super::flow::{FROM_INTERNET, FROM_UNDERLAY, FlowKey, Hit};
use super::scope::Deps;
use super::trace::{self, Stage};
use super::{Decision, Dropped, HostView, RuleRef, State};
use crate::policy::conntrack::{ConnRef, Endpoint, Zone};
use crate::reason::DropReason;
use crate::time::Timestamp;
use crate::topology::{Channel, HostId, Instance, InstanceId, Network, Space, Topology};
use crate::wire::ipv4::{Fragment, Ipv4Packet, L4, icmp_type};

/// The conntrack zone of the basic network (one address space for every tenant), above every
/// GRE key.
pub const BASIC: Zone = Zone(1 << 32);
/// The conntrack zone of the internet (public addresses).
pub const INTERNET: Zone = Zone(2 << 32);
/// [`FlowKey::gre_key`] of an underlay packet without a GRE key (the basic network): above
/// every 32-bit key.
pub(crate) const NO_GRE_KEY: u64 = 1 << 32;

/// The conntrack zone an instance's addresses live in: its VPC's key, or the basic network.
pub(crate) fn zone_of(topo: &Topology, i: &Instance) -> Zone {
    match i.network {
        Network::Vpc { vpc, .. } => Zone::vpc(topo.vpc(vpc).key),
        Network::Basic { .. } => BASIC,
    }
}

/// A public (non-RFC 1918) address.
pub(crate) fn is_public(a: Ipv4Addr) -> bool {
    !a.is_private()
}

/// Where the packet entered the decision.
#[derive(Debug, Clone, Copy)]
pub(super) enum Origin {
    /// A local instance sent it; `foreign` when its source is not the instance's own address
    /// (an appliance, `source_check = false`).
    Local { id: InstanceId, foreign: bool },
    /// `source`, an instance of `host`, sent it through the underlay on `channel`.
    Remote {
        host: HostId,
        source: InstanceId,
        channel: Channel,
    },
    /// The internet sent it: through this host's internet device (`relayed: None`, this is
    /// the gateway), or relayed by the gateway host into `space` (addresses translated).
    Internet { relayed: Option<(HostId, Space)> },
}

impl Origin {
    /// The flow-cache ingress of the packet.
    pub fn ingress(self) -> u32 {
        match self {
            Origin::Local { id, .. } => id.0,
            Origin::Remote { host, .. }
            | Origin::Internet {
                relayed: Some((host, _)),
            } => FROM_UNDERLAY | host.0,
            Origin::Internet { relayed: None } => FROM_INTERNET,
        }
    }

    /// The sending instance, if an instance sent it.
    pub fn source(self) -> Option<InstanceId> {
        match self {
            Origin::Local { id, .. } | Origin::Remote { source: id, .. } => Some(id),
            Origin::Internet { .. } => None,
        }
    }

    /// A packet whose source is not its sender's own address: an appliance forwarding.
    pub fn foreign(self) -> bool {
        match self {
            Origin::Local { foreign, .. } => foreign,
            Origin::Remote { channel, .. } => matches!(channel, Channel::Appliance(_)),
            Origin::Internet { .. } => false,
        }
    }
}

/// The decision's context: the topology, this host, the state packets change, and the time.
pub(super) struct Decider<'a> {
    pub topo: &'a Topology,
    pub host: &'a HostView,
    pub state: &'a mut State,
    pub now: Timestamp,
    /// False once the decision read something the flow key does not hold (the absence of a
    /// connection), so that it must be taken again for the next packet.
    pub cacheable: bool,
    /// The trace being taken, if one is ([`super::trace`]).
    pub trace: Option<super::trace::Sink<'a>>,
    /// The route the decision took, for the trace.
    pub via: super::route::Via,
    /// The local instance the packet is for, once the decision knows it (its counters).
    pub receiver: Option<InstanceId>,
    /// The load balancer's translation of this packet (to a backend, or a reply back to
    /// the VIP), on top of any Elastic IP's ([`super::balance`]).
    pub lb_nat: crate::wire::nat::Nat,
}

/// What the full path found: the decision, the connections behind it (the sending side's and
/// the receiving side's, where they are local) with the packet's source as each sees it, and
/// whether the decision may be cached.
pub(super) struct FullDecision {
    pub decision: Decision,
    pub conns: [Option<ConnRef>; 2],
    pub sources: [Endpoint; 2],
    pub cacheable: bool,
}

impl FullDecision {
    /// A decision that depends only on the flow key and the topology.
    pub fn stateless(decision: Decision) -> FullDecision {
        FullDecision {
            decision,
            conns: [None, None],
            sources: [Endpoint::NONE; 2],
            cacheable: true,
        }
    }

    /// A decision never cached.
    pub fn uncached(decision: Decision) -> FullDecision {
        FullDecision {
            cacheable: false,
            ..FullDecision::stateless(decision)
        }
    }
}

impl From<Decision> for FullDecision {
    fn from(d: Decision) -> FullDecision {
        FullDecision::stateless(d)
    }
}

pub(super) fn policy_drop(reason: DropReason, rule: RuleRef) -> Decision {
    Decision::Drop(Dropped {
        reason,
        rule: Some(rule),
    })
}

impl Decider<'_> {
    /// The flow decision: later fragments follow their first, cached decisions are reused,
    /// the rest take the full path.
    pub fn flow(
        &mut self,
        origin: Origin,
        zone: Zone,
        gre_key: u64,
        ip: &Ipv4Packet,
        pkt: &[u8],
        strip: u16,
    ) -> Decision {
        let (generation, now) = (self.host.generation, self.now);
        let key = FlowKey::new(origin.ingress(), gre_key, ip);
        self.note(Stage::Entry, |t| trace::entry_fields(t, origin, ip));
        if let Fragment::Later { .. } = ip.fragment {
            return match self.state.frags.follow(&key, ip.ident, generation, now) {
                Some(d) => with_strip(d, strip),
                None => Decision::drop(DropReason::FragmentWithoutFirst),
            };
        }
        let icmp_error = matches!(ip.l4, L4::Icmp { kind, .. } if icmp_type::is_error(kind));
        // ICMP errors are decided by the connection they quote, which the key does not hold.
        if !icmp_error && let Some(d) = self.cached(&key, &ip.l4, pkt.len()) {
            if ip.fragment == Fragment::First && d.forwards() {
                self.state.frags.admit(&key, ip.ident, generation, d, now);
            }
            return with_strip(d, strip);
        }
        self.state.counters.cache_misses += 1;
        let out = self.full_path(origin, zone, ip, pkt);
        if out.cacheable && self.cacheable {
            let state = &mut *self.state;
            let receiver = self.receiver;
            let hit = Hit {
                decision: out.decision,
                conns: out.conns,
                egress_src: out.sources[0],
                ingress_src: out.sources[1],
                receiver,
            };
            let deps = Deps::of(self.topo, origin, ip.dst);
            state.flows.insert(key, generation, deps, hit);
        }
        if ip.fragment == Fragment::First && out.decision.forwards() {
            self.state
                .frags
                .admit(&key, ip.ident, generation, out.decision, now);
        }
        with_strip(out.decision, strip)
    }

    /// The full path: the target and the plan, network ACLs, connection tracking and
    /// security groups.
    fn full_path(
        &mut self,
        origin: Origin,
        zone: Zone,
        ip: &Ipv4Packet,
        pkt: &[u8],
    ) -> FullDecision {
        let target = self.target(origin, ip, pkt);
        let via = self.via;
        self.note(Stage::Route, |t| {
            trace::route_fields(t, via, &target.as_ref().map(|x| x.0).map_err(|d| *d))
        });
        let plan = match target.and_then(|t| self.plan(origin, t, ip)) {
            Ok(p) => p,
            Err(d) => return d.into(),
        };
        if plan.target_local {
            self.receiver = plan.target;
        }
        if !plan.policy {
            return plan.forward.into();
        }
        if let Err(d) = self.acls(origin, &plan, ip) {
            return d.into();
        }
        self.filter(origin, zone, &plan, ip, pkt)
    }
}

/// Decisions are cached without the offset of the inner packet, which depends on the GRE
/// flags of each packet.
pub(super) fn with_strip(d: Decision, strip: u16) -> Decision {
    match d {
        Decision::Deliver { to, nat, .. } => Decision::Deliver { to, strip, nat },
        Decision::ToInternet { nat, .. } => Decision::ToInternet { strip, nat },
        Decision::Encapsulate { host, key, nat, .. } => Decision::Encapsulate {
            strip,
            host,
            key,
            nat,
        },
        d => d,
    }
}

/// The ports (or ICMP query identifier) connection tracking keys a packet by.
pub(super) fn ports(ip: &Ipv4Packet) -> (u16, u16) {
    match ip.l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
        L4::Icmp { ident, .. } => (ident, ident),
        L4::Other | L4::None => (0, 0),
    }
}
