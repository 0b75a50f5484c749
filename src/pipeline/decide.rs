//! The decision itself: parsing, routing, NAT, network ACLs, connection tracking and security
//! groups, in that order, for each place a packet can come from.

use std::net::Ipv4Addr;

use super::flow::{FROM_INTERNET, FROM_UNDERLAY, FlowKey};
use super::{Decision, Dropped, HostView, Ingress, Nat, RuleRef, State};
use crate::policy::conntrack::{ConnKey, ConnRef, Conntrack, Endpoint, Owner, Track, Zone};
use crate::policy::route::NextHop;
use crate::policy::rules::{Outcome, RuleList, Subject};
use crate::reason::DropReason;
use crate::time::Timestamp;
use crate::topology::{HostId, Instance, InstanceId, Network, SgId, Space, Topology};
use crate::wire::gre;
use crate::wire::ipv4::{self, Fragment, Ipv4Packet, L4, icmp_type, proto};

/// The conntrack zone of the basic network (one address space for every tenant).
pub(crate) const BASIC: Zone = Zone(1 << 32);
/// The conntrack zone of the internet (public addresses).
pub(crate) const INTERNET: Zone = Zone(2 << 32);

/// The conntrack zone an instance's addresses live in: its VPC's key, or the basic network.
pub(crate) fn zone_of(t: &Topology, i: &Instance) -> Zone {
    match i.network {
        Network::Vpc { vpc, .. } => Zone::vpc(t.vpc(vpc).key),
        Network::Basic { .. } => BASIC,
    }
}

/// The GRE key a packet for `i` carries: its VPC's, none for the basic network.
fn key_of(t: &Topology, i: &Instance) -> Option<u32> {
    i.vpc().map(|v| t.vpc(v).key)
}

fn is_private(a: Ipv4Addr) -> bool {
    a.is_private()
}

/// Where the packet entered the decision.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// A local instance sent it.
    Local(InstanceId),
    /// `source`, an instance of `host`, sent it through the underlay.
    Remote { host: HostId, source: InstanceId },
    /// The internet sent it: through this host's internet device (`via: None`, this is the
    /// gateway), or relayed by the gateway host into `space` (addresses already translated).
    Internet { via: Option<(HostId, Space)> },
}

impl Origin {
    fn ingress(self) -> u32 {
        match self {
            Origin::Local(id) => id.0,
            Origin::Remote { host, .. }
            | Origin::Internet {
                via: Some((host, _)),
            } => FROM_UNDERLAY | host.0,
            Origin::Internet { via: None } => FROM_INTERNET,
        }
    }

    fn source(self) -> Option<InstanceId> {
        match self {
            Origin::Local(id) | Origin::Remote { source: id, .. } => Some(id),
            Origin::Internet { .. } => None,
        }
    }
}

/// Where a route leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// An instance; `peering` when reached across a peering connection.
    Instance {
        id: InstanceId,
        peering: Option<u32>,
    },
    /// The internet, through the sender's Elastic IP.
    Internet,
}

pub(super) fn decide(
    t: &Topology,
    v: &HostView,
    st: &mut State,
    packet: &[u8],
    from: Ingress,
    segmented: bool,
    now: Timestamp,
) -> Decision {
    match from {
        Ingress::Instance(id) => from_instance(t, v, st, id, packet, segmented, now),
        Ingress::UnderlayIp => match ipv4::parse_outer(packet) {
            Err(r) => Decision::drop(r),
            Ok(o) if o.dst != v.address => Decision::drop(DropReason::NotAddressedToHost),
            Ok(o) => from_underlay(t, v, st, o.src, packet, o.header_len, now),
        },
        Ingress::UnderlayUdp { from } => from_underlay(t, v, st, from, packet, 0, now),
        Ingress::Internet => from_internet(t, v, st, packet, now),
    }
}

fn from_instance(
    t: &Topology,
    v: &HostView,
    st: &mut State,
    id: InstanceId,
    pkt: &[u8],
    segmented: bool,
    now: Timestamp,
) -> Decision {
    if !v.is_local(id) {
        return Decision::drop(DropReason::UnknownPort);
    }
    if (segmented || pkt.len() <= usize::from(v.instance_mtu))
        && let Some(d) = quick(st, id.0, 0, pkt, v.generation, now)
    {
        return d;
    }
    let inst = t.instance(id);
    let ip = match ipv4::parse(pkt) {
        Ok(ip) => ip,
        Err(r) => return Decision::drop(r),
    };
    if ip.src != inst.ip {
        return Decision::drop(DropReason::SourceSpoofed);
    }
    if let Err(r) = check_destination(t, &ip) {
        return Decision::drop(r);
    }
    if !segmented && pkt.len() > usize::from(v.instance_mtu) {
        return if ip.dont_fragment {
            Decision::FragNeeded {
                to: id,
                mtu: v.instance_mtu,
            }
        } else {
            Decision::drop(DropReason::OversizeNoDf)
        };
    }
    let zone = zone_of(t, inst);
    decide_flow(t, v, st, Origin::Local(id), zone, 0, &ip, pkt, 0, now)
}

fn from_internet(
    t: &Topology,
    v: &HostView,
    st: &mut State,
    pkt: &[u8],
    now: Timestamp,
) -> Decision {
    if !v.gateway {
        return Decision::drop(DropReason::UnknownPort);
    }
    if let Some(d) = quick(st, FROM_INTERNET, 0, pkt, v.generation, now) {
        return d;
    }
    let ip = match ipv4::parse(pkt) {
        Ok(ip) => ip,
        Err(r) => return Decision::drop(r),
    };
    if let Err(r) = check_destination(t, &ip) {
        return Decision::drop(r);
    }
    decide_flow(
        t,
        v,
        st,
        Origin::Internet { via: None },
        INTERNET,
        0,
        &ip,
        pkt,
        0,
        now,
    )
}

fn from_underlay(
    t: &Topology,
    v: &HostView,
    st: &mut State,
    sender: Ipv4Addr,
    pkt: &[u8],
    gre_at: usize,
    now: Timestamp,
) -> Decision {
    let Some(host) = t.host_by_address(sender) else {
        return Decision::drop(DropReason::UnknownUnderlaySource);
    };
    // This host's own instances reach it through their devices, never the underlay: a
    // packet that says otherwise would skip their egress policy.
    if host == v.host {
        return Decision::drop(DropReason::UnderlayFromSelf);
    }
    let gre_bytes = &pkt[gre_at.min(pkt.len())..];
    let g = match gre::parse(gre_bytes) {
        Ok(g) => g,
        Err(r) => return Decision::drop(r),
    };
    let inner_at = gre_at + g.len;
    let inner = &pkt[inner_at..];
    let version = inner.first().map(|b| b >> 4);
    match (g.protocol, version) {
        (gre::PROTO_IPV4, Some(6)) => return Decision::drop(DropReason::GreProtocolMismatch),
        (gre::PROTO_IPV4, _) => {}
        (gre::PROTO_IPV6, Some(6)) => return Decision::drop(DropReason::Ipv6Unsupported),
        (gre::PROTO_IPV6, _) => return Decision::drop(DropReason::GreProtocolMismatch),
        _ => return Decision::drop(DropReason::GreProtocolUnsupported),
    }
    // The key names the destination's network: a VPC, or (no key) the basic network.
    let space = match g.key {
        Some(key) => match t.vpc_by_key(key) {
            None => return Decision::drop(DropReason::GreUnknownKey),
            Some(vpc) if !v.vpc_here[vpc.index()] => {
                return Decision::drop(DropReason::GreKeyNotOnHost);
            }
            Some(vpc) => Space::Vpc(vpc),
        },
        None if t.basic.is_none() => return Decision::drop(DropReason::GreNoKey),
        None if !v.basic_here => return Decision::drop(DropReason::GreKeyNotOnHost),
        None => Space::Basic,
    };
    let tag = match g.key {
        Some(k) => u64::from(k),
        None => 1 << 32,
    };
    if let Some(d) = quick(st, FROM_UNDERLAY | host.0, tag, inner, v.generation, now) {
        return with_strip(d, inner_at as u16);
    }
    let ip = match ipv4::parse(inner) {
        Ok(ip) => ip,
        Err(r) => return Decision::drop(r),
    };
    if let Err(r) = check_destination(t, &ip) {
        return Decision::drop(r);
    }
    let origin = match source_of(t, host, space, ip.src, ip.dst) {
        Some(source) => Origin::Remote { host, source },
        // Only the internet gateway relays public sources into the cloud.
        None if t.internet.as_ref().is_some_and(|i| i.gateway == host) && !is_private(ip.src) => {
            Origin::Internet {
                via: Some((host, space)),
            }
        }
        None => return Decision::drop(DropReason::InnerSourceNotOnSender),
    };
    let zone = match origin {
        Origin::Remote { source, .. } => zone_of(t, t.instance(source)),
        _ => INTERNET,
    };
    decide_flow(
        t,
        v,
        st,
        origin,
        zone,
        tag,
        &ip,
        inner,
        inner_at as u16,
        now,
    )
}

/// The instance of the sending host that may have sent a packet from `src` to `dst` into
/// `space`: an instance of that space, of a VPC peered with it, or linked to it by an
/// interconnect. Two peered or linked VPCs may overlap: among several candidates, the one
/// whose own route leads to `dst` in `space` is the sender (the file's order only breaks a tie
/// that routing cannot).
fn source_of(
    t: &Topology,
    host: HostId,
    space: Space,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> Option<InstanceId> {
    let routes_here = |&id: &InstanceId| {
        matches!(route(t, id, t.instance(id), dst),
            Ok(Target::Instance { id: to, .. }) if t.instance(to).space() == space)
    };
    let mut first = None;
    for id in candidates(t, host, space, src) {
        if routes_here(&id) {
            return Some(id);
        }
        first = first.or(Some(id));
    }
    first
}

/// Every instance of `host` that holds `src` in `space` or in a space that reaches it.
fn candidates(
    t: &Topology,
    host: HostId,
    space: Space,
    src: Ipv4Addr,
) -> impl Iterator<Item = InstanceId> + '_ {
    let on_host = move |id: &InstanceId| t.instance(*id).host == host;
    let own = t.instance_in(space, src).filter(on_host);
    let (peered, linked_basic, linked_vpc) = match space {
        Space::Vpc(w) => {
            let peers = t.peerings.iter().filter_map(move |p| match p.vpcs {
                [a, b] if a == w => Some(b),
                [a, b] if b == w => Some(a),
                _ => None,
            });
            let basic = t
                .instance_in(Space::Basic, src)
                .filter(on_host)
                .filter(move |&id| t.linked_vpc(id) == Some(w));
            (Some(peers), basic, None)
        }
        Space::Basic => (None, None, Some(t.interconnects.iter())),
    };
    own.into_iter()
        .chain(
            peered
                .into_iter()
                .flatten()
                .filter_map(move |peer| t.instance_at(peer, src).filter(on_host)),
        )
        .chain(linked_basic)
        .chain(
            linked_vpc
                .into_iter()
                .flatten()
                .filter_map(move |ic| t.instance_at(ic.vpc, src).filter(on_host)),
        )
}

/// Broadcast, multicast and underlay destinations are refused on every side.
fn check_destination(t: &Topology, ip: &Ipv4Packet) -> Result<(), DropReason> {
    if ip.dst.is_broadcast() || ip.dst.is_multicast() {
        return Err(DropReason::NotUnicast);
    }
    if t.host_by_address(ip.dst).is_some() {
        let tunnel = ip.protocol == proto::GRE
            || matches!(
                ip.l4,
                L4::Udp {
                    dport: gre::UDP_PORT,
                    ..
                }
            );
        return Err(if tunnel {
            DropReason::TunnelLoop
        } else {
            DropReason::InnerDstUnderlay
        });
    }
    Ok(())
}

/// The ports (or ICMP echo identifier) connection tracking keys a packet by.
fn ports(ip: &Ipv4Packet) -> (u16, u16) {
    match ip.l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
        L4::Icmp { ident, .. } => (ident, ident),
        L4::Other | L4::None => (0, 0),
    }
}

#[allow(clippy::too_many_arguments)]
fn decide_flow(
    t: &Topology,
    v: &HostView,
    st: &mut State,
    origin: Origin,
    zone: Zone,
    tag: u64,
    ip: &Ipv4Packet,
    pkt: &[u8],
    strip: u16,
    now: Timestamp,
) -> Decision {
    let key = FlowKey::new(origin.ingress(), tag, ip);
    if let Fragment::Later { .. } = ip.fragment {
        return match st.frags.follow(&key, ip.ident, v.generation, now) {
            Some(d) => with_strip(d, strip),
            None => Decision::drop(DropReason::FragmentWithoutFirst),
        };
    }
    let icmp_error = matches!(ip.l4, L4::Icmp { kind, .. } if icmp_type::is_error(kind));
    // ICMP errors are decided by the connection they quote, which the key does not hold.
    if !icmp_error && let Some(d) = cached(st, &key, &ip.l4, v.generation, now) {
        if ip.fragment == Fragment::First && d.forwards() {
            st.frags.admit(&key, ip.ident, v.generation, d, now);
        }
        return with_strip(d, strip);
    }
    st.counters.cache_misses += 1;
    let out = slow_path(t, v, st, origin, zone, ip, pkt, now);
    if out.cacheable {
        st.flows
            .insert(key, v.generation, out.decision, out.conns, out.sources);
    }
    if ip.fragment == Fragment::First && out.decision.forwards() {
        st.frags
            .admit(&key, ip.ident, v.generation, out.decision, now);
    }
    with_strip(out.decision, strip)
}

/// The cached decision for `key`, with the connections behind it updated by this packet's
/// flags; `None` to take the full path (nothing cached, or the connection is gone).
#[inline]
fn cached(
    st: &mut State,
    key: &FlowKey,
    l4: &L4,
    generation: u64,
    now: Timestamp,
) -> Option<Decision> {
    let hit = st.flows.get(key, generation)?;
    for (r, src) in hit.conns.iter().zip([hit.egress_src, hit.ingress_src]) {
        let Some(r) = r else { continue };
        match st.conntrack.track(*r, &src, l4, now) {
            Track::Accepted(_) => {}
            Track::Invalid(reason) => return Some(Decision::drop(reason)),
            Track::Reopen | Track::Gone => return None,
        }
    }
    st.counters.cache_hits += 1;
    Some(hit.decision)
}

/// The fast lane of a packet whose flow is cached: the key is read straight from the bytes,
/// after the checks the full parse would make for such a packet (an option-less IPv4 header,
/// the exact total length, not a fragment, a whole TCP or UDP header). Everything else the
/// decision depended on (the sender, the source address, the destination) is in the key.
/// `None`: take the full path.
#[inline]
fn quick(
    st: &mut State,
    ingress: u32,
    tag: u64,
    pkt: &[u8],
    generation: u64,
    now: Timestamp,
) -> Option<Decision> {
    let (key, l4) = quick_key(ingress, tag, pkt)?;
    cached(st, &key, &l4, generation, now)
}

#[inline]
fn quick_key(ingress: u32, tag: u64, p: &[u8]) -> Option<(FlowKey, L4)> {
    let h = p.get(..ipv4::HEADER_LEN)?;
    if h[0] != 0x45
        || usize::from(u16::from_be_bytes([h[2], h[3]])) != p.len()
        || h[6] & 0x3f != 0
        || h[7] != 0
    {
        return None;
    }
    let word = |at: usize| u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
    let l4 = match h[9] {
        proto::TCP => {
            let t = p.get(20..40)?;
            let doff = usize::from(t[12] >> 4) * 4;
            if doff < 20 || 20 + doff > p.len() {
                return None;
            }
            L4::Tcp {
                sport: u16::from_be_bytes([t[0], t[1]]),
                dport: u16::from_be_bytes([t[2], t[3]]),
                flags: ipv4::TcpFlags(t[13]),
            }
        }
        proto::UDP => {
            let u = p.get(20..28)?;
            L4::Udp {
                sport: u16::from_be_bytes([u[0], u[1]]),
                dport: u16::from_be_bytes([u[2], u[3]]),
            }
        }
        _ => return None,
    };
    let (sport, dport) = match l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
        _ => (0, 0),
    };
    let key = FlowKey {
        ingress,
        tag,
        src: word(12),
        dst: word(16),
        sport,
        dport,
        protocol: h[9],
        icmp_type: 0,
        icmp_code: 0,
    };
    Some((key, l4))
}

/// Decisions are cached without the offset of the inner packet, which depends on the GRE
/// flags of each packet.
fn with_strip(d: Decision, strip: u16) -> Decision {
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

/// What the full path found: the decision, the connections behind it (the sending side's and
/// the receiving side's, where they are local), and whether the decision may be cached (it
/// may when it depends only on the flow key and the topology).
struct Slow {
    decision: Decision,
    conns: [Option<ConnRef>; 2],
    sources: [Endpoint; 2],
    cacheable: bool,
}

impl Slow {
    fn stateless(decision: Decision) -> Slow {
        Slow {
            decision,
            conns: [None, None],
            sources: [Endpoint::NONE; 2],
            cacheable: true,
        }
    }

    fn uncached(decision: Decision) -> Slow {
        Slow {
            cacheable: false,
            ..Slow::stateless(decision)
        }
    }
}

fn policy_drop(reason: DropReason, rule: RuleRef) -> Decision {
    Decision::Drop(Dropped {
        reason,
        rule: Some(rule),
    })
}

/// The full path: route, NAT, ACLs, connection tracking and security groups.
#[allow(clippy::too_many_arguments)]
fn slow_path(
    t: &Topology,
    v: &HostView,
    st: &mut State,
    origin: Origin,
    zone: Zone,
    ip: &Ipv4Packet,
    pkt: &[u8],
    now: Timestamp,
) -> Slow {
    // 1. Where does it go, and is an address translated on the way?
    let mut nat = Nat::NONE;
    let target = match origin {
        Origin::Local(id) | Origin::Remote { source: id, .. } => {
            match route(t, id, t.instance(id), ip.dst) {
                Ok(target) => target,
                Err(r) => return Slow::stateless(Decision::drop(r)),
            }
        }
        Origin::Internet { via: None } => match t.eip_owner(ip.dst) {
            Some(owner) => {
                nat.dst = Some(t.instance(owner).ip);
                Target::Instance {
                    id: owner,
                    peering: None,
                }
            }
            None => return Slow::stateless(Decision::drop(DropReason::NoSuchEip)),
        },
        Origin::Internet {
            via: Some((_, space)),
        } => {
            // Relayed by the gateway: the destination is already the private address.
            match t.instance_in(space, ip.dst).filter(|&id| v.is_local(id)) {
                Some(id) => Target::Instance { id, peering: None },
                None => return Slow::stateless(Decision::drop(DropReason::NotLocalDestination)),
            }
        }
    };
    // The internet: through the sender's Elastic IP, translated at the gateway. A public
    // destination that is itself an Elastic IP comes straight back in (hairpin).
    let target = match target {
        Target::Internet => {
            let sender = t.instance(
                origin
                    .source()
                    .expect("only instances route to the internet"),
            );
            let gateway = t.internet.as_ref().map(|i| i.gateway);
            if !v.gateway {
                if matches!(origin, Origin::Remote { .. }) {
                    return Slow::stateless(Decision::drop(DropReason::NotLocalDestination));
                }
                // Policy of the local sender, then off to the gateway host.
                return local_egress(
                    t,
                    st,
                    origin,
                    zone,
                    ip,
                    pkt,
                    now,
                    Egress::Gateway(gateway, key_of(t, sender)),
                );
            }
            nat.src = sender.eip;
            match t.eip_owner(ip.dst) {
                Some(owner) => {
                    nat.dst = Some(t.instance(owner).ip);
                    Target::Instance {
                        id: owner,
                        peering: None,
                    }
                }
                None => {
                    if matches!(origin, Origin::Remote { .. }) {
                        // The gateway relays: the sender's host ran the sender's policy.
                        return Slow::stateless(Decision::ToInternet { strip: 0, nat });
                    }
                    return local_egress(t, st, origin, zone, ip, pkt, now, Egress::Internet(nat));
                }
            }
        }
        other => other,
    };
    let Target::Instance {
        id: target_id,
        peering,
    } = target
    else {
        unreachable!("the internet was handled above")
    };
    let dst = t.instance(target_id);
    let target_local = v.is_local(target_id);
    let translated = !nat.is_none();
    match origin {
        Origin::Remote { .. } | Origin::Internet { via: Some(_) }
            if !(target_local || v.gateway && translated) =>
        {
            return Slow::stateless(Decision::drop(DropReason::NotLocalDestination));
        }
        _ => {}
    }
    // Across a peering, the receiving side's route table must lead back the same way.
    if let (Some(p), true) = (peering, target_local) {
        let src = t.instance(
            origin
                .source()
                .expect("peering traffic comes from an instance"),
        );
        let back = dst
            .subnet()
            .map(|s| &t.route_tables[t.subnet(s).route_table.index()])
            .and_then(|rt| rt.routes.lookup(src.ip))
            .map(|(_, r)| r.next_hop);
        if back != Some(NextHop::Peering(p)) {
            return Slow::stateless(Decision::drop(DropReason::PeeringNoReturnRoute));
        }
    }
    let forward = if target_local {
        Decision::Deliver {
            to: target_id,
            strip: 0,
            nat,
        }
    } else {
        Decision::Encapsulate {
            strip: 0,
            host: dst.host,
            key: key_of(t, dst),
            nat,
        }
    };
    // The gateway relaying between the internet (or an Elastic IP) and a remote instance
    // runs no policy: the instance's host does.
    let source_local = matches!(origin, Origin::Local(_));
    if !source_local && !target_local {
        return Slow::stateless(forward);
    }

    // 2. Network ACLs: stateless, between subnets, VPC instances only.
    let src_inst = origin.source().map(|s| t.instance(s));
    let same_subnet =
        !translated && src_inst.is_some_and(|s| s.subnet().is_some() && s.subnet() == dst.subnet());
    let (dport, sport) = {
        let (s, d) = ports(ip);
        (d, s)
    };
    let l4_dport = match ip.l4 {
        L4::Tcp { dport, .. } | L4::Udp { dport, .. } => Some(dport),
        _ => None,
    };
    let toward = |peer| Subject {
        peer,
        protocol: ip.protocol,
        dport: l4_dport,
    };
    if source_local
        && !same_subnet
        && let Some(s) = src_inst.and_then(|s| s.subnet())
        && let Some(acl) = t.subnet(s).acl
        && let Err(rule) = acl_allows(&t.acls[acl.index()].egress_list, &toward(ip.dst))
    {
        let d = policy_drop(DropReason::AclEgress, RuleRef::Acl { acl, rule });
        return Slow::stateless(d);
    }
    let seen_src = nat.src.unwrap_or(ip.src);
    if target_local
        && !same_subnet
        && let Some(s) = dst.subnet()
        && let Some(acl) = t.subnet(s).acl
        && let Err(rule) = acl_allows(&t.acls[acl.index()].ingress_list, &toward(seen_src))
    {
        let d = policy_drop(DropReason::AclIngress, RuleRef::Acl { acl, rule });
        return Slow::stateless(d);
    }

    // 3. Connection tracking and security groups, for each local side.
    let dst_zone = zone_of(t, dst);
    let (egress_key, egress_src) = {
        // As the sender sees it: its address, and the destination it wrote.
        let far = if translated { INTERNET } else { dst_zone };
        let a = Endpoint {
            zone,
            addr: ip.src,
            port: sport,
        };
        let b = Endpoint {
            zone: far,
            addr: ip.dst,
            port: dport,
        };
        (ConnKey::new(ip.protocol, a, b), a)
    };
    let (ingress_key, ingress_src) = {
        // As the receiver sees it: the (translated) source, and the (translated) destination:
        // its own address, or for an appliance, the address the packet is for.
        let near = if translated || matches!(origin, Origin::Internet { .. }) {
            INTERNET
        } else {
            zone
        };
        let a = Endpoint {
            zone: near,
            addr: seen_src,
            port: sport,
        };
        let b = Endpoint {
            zone: dst_zone,
            addr: nat.dst.unwrap_or(ip.dst),
            port: dport,
        };
        (ConnKey::new(ip.protocol, a, b), a)
    };
    let sides = [
        source_local.then_some((egress_key, egress_src)),
        target_local.then_some((ingress_key, ingress_src)),
    ];
    if matches!(ip.l4, L4::Icmp { kind, .. } if icmp_type::is_error(kind)) {
        let related = sides.iter().flatten().all(|(k, src)| {
            let dst = if k.low == *src { k.high } else { k.low };
            related(st, *src, dst, ip, pkt, now)
        });
        return Slow::uncached(if related {
            forward
        } else {
            Decision::drop(DropReason::IcmpErrorUnrelated)
        });
    }
    let mut conns = [None, None];
    for (n, side) in sides.iter().enumerate() {
        let Some((key, src)) = side else { continue };
        if n == 1 && sides[0].is_some_and(|(k, _)| k == *key) {
            conns[1] = conns[0];
            continue;
        }
        if let Some(r) = st.conntrack.lookup(key, now) {
            match st.conntrack.track(r, src, &ip.l4, now) {
                Track::Accepted(_) => conns[n] = Some(r),
                Track::Invalid(reason) => return Slow::uncached(Decision::drop(reason)),
                Track::Reopen | Track::Gone => {}
            }
        }
    }
    // Only an echo request opens an ICMP "connection"; other ICMP messages are judged by the
    // rules each time (as a cloud's security group does for untracked traffic).
    let tracked = !matches!(ip.l4, L4::Icmp { kind, .. } if kind != icmp_type::ECHO_REQUEST);
    let need_egress = source_local && conns[0].is_none();
    let need_ingress = target_local && conns[1].is_none();
    if (need_egress || need_ingress)
        && tracked
        && let Err(reason) = Conntrack::may_open(&ip.l4)
    {
        return Slow::uncached(Decision::drop(reason));
    }
    if need_egress
        && let Some((s_id, s)) = origin.source().map(|id| (id, t.instance(id)))
        && let Err(rule) = sg_allows(&s.egress_rules, &toward(ip.dst), s_id)
    {
        return Slow::uncached(policy_drop(DropReason::SgEgress, rule));
    }
    if need_ingress && let Err(rule) = sg_allows(&dst.ingress_rules, &toward(seen_src), target_id) {
        return Slow::uncached(policy_drop(DropReason::SgIngress, rule));
    }
    if !tracked {
        // Not cached: a connection opened later in the other direction (an echo request
        // after an early reply) must be found and refreshed by these packets.
        return Slow::uncached(forward);
    }
    for (n, side) in sides.iter().enumerate() {
        let Some((key, src)) = side else { continue };
        if conns[n].is_some() {
            continue;
        }
        if n == 1 && sides[0].is_some_and(|(k, _)| k == *key) {
            conns[1] = conns[0];
            continue;
        }
        let owner = if n == 0 {
            Owner { zone, addr: ip.src }
        } else {
            Owner {
                zone: dst_zone,
                addr: dst.ip,
            }
        };
        let other = if key.low == *src { key.high } else { key.low };
        match st.conntrack.open(ip.protocol, *src, other, owner, now) {
            Ok(r) => conns[n] = Some(r),
            Err(reason) => return Slow::uncached(Decision::drop(reason)),
        }
    }
    Slow {
        decision: forward,
        conns,
        sources: [egress_src, ingress_src],
        cacheable: true,
    }
}

/// Where a local sender's packet leaves for, when it leaves the cloud.
enum Egress {
    /// Through the internet gateway host (with the sender's key).
    Gateway(Option<HostId>, Option<u32>),
    /// Through this host's internet device, translated.
    Internet(Nat),
}

/// The sending side's half of the policy, for a packet to the internet: the subnet's egress
/// ACL, the sender's egress rules and its connection.
#[allow(clippy::too_many_arguments)]
fn local_egress(
    t: &Topology,
    st: &mut State,
    origin: Origin,
    zone: Zone,
    ip: &Ipv4Packet,
    pkt: &[u8],
    now: Timestamp,
    egress: Egress,
) -> Slow {
    let Origin::Local(s_id) = origin else {
        unreachable!("only a local sender has an egress policy here")
    };
    let s = t.instance(s_id);
    let forward = match egress {
        Egress::Gateway(Some(host), key) => Decision::Encapsulate {
            strip: 0,
            host,
            key,
            nat: Nat::NONE,
        },
        Egress::Gateway(None, _) => return Slow::stateless(Decision::drop(DropReason::NoEip)),
        Egress::Internet(nat) => Decision::ToInternet { strip: 0, nat },
    };
    let subject = Subject {
        peer: ip.dst,
        protocol: ip.protocol,
        dport: match ip.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => Some(dport),
            _ => None,
        },
    };
    if let Some(sub) = s.subnet()
        && let Some(acl) = t.subnet(sub).acl
        && let Err(rule) = acl_allows(&t.acls[acl.index()].egress_list, &subject)
    {
        return Slow::stateless(policy_drop(
            DropReason::AclEgress,
            RuleRef::Acl { acl, rule },
        ));
    }
    let (sport, dport) = ports(ip);
    let a = Endpoint {
        zone,
        addr: ip.src,
        port: sport,
    };
    let b = Endpoint {
        zone: INTERNET,
        addr: ip.dst,
        port: dport,
    };
    let key = ConnKey::new(ip.protocol, a, b);
    if matches!(ip.l4, L4::Icmp { kind, .. } if icmp_type::is_error(kind)) {
        let ok = related(st, a, b, ip, pkt, now);
        return Slow::uncached(if ok {
            forward
        } else {
            Decision::drop(DropReason::IcmpErrorUnrelated)
        });
    }
    if let Some(r) = st.conntrack.lookup(&key, now) {
        match st.conntrack.track(r, &a, &ip.l4, now) {
            Track::Accepted(_) => {
                return Slow {
                    decision: forward,
                    conns: [Some(r), None],
                    sources: [a, Endpoint::NONE],
                    cacheable: true,
                };
            }
            Track::Invalid(reason) => return Slow::uncached(Decision::drop(reason)),
            Track::Reopen | Track::Gone => {}
        }
    }
    let tracked = !matches!(ip.l4, L4::Icmp { kind, .. } if kind != icmp_type::ECHO_REQUEST);
    if tracked && let Err(reason) = Conntrack::may_open(&ip.l4) {
        return Slow::uncached(Decision::drop(reason));
    }
    if let Err(rule) = sg_allows(&s.egress_rules, &subject, s_id) {
        return Slow::uncached(policy_drop(DropReason::SgEgress, rule));
    }
    if !tracked {
        return Slow::uncached(forward);
    }
    match st
        .conntrack
        .open(ip.protocol, a, b, Owner { zone, addr: ip.src }, now)
    {
        Ok(r) => Slow {
            decision: forward,
            conns: [Some(r), None],
            sources: [a, Endpoint::NONE],
            cacheable: true,
        },
        Err(reason) => Slow::uncached(Decision::drop(reason)),
    }
}

/// Route order (CLOUD-SEMANTICS): the local route first (for a basic-network instance, the
/// pool), then a basic-network interconnect, then the longest custom route, and only when no
/// route matches, the instance's Elastic IP (for a public destination).
fn route(
    t: &Topology,
    sender: InstanceId,
    src: &Instance,
    dst: Ipv4Addr,
) -> Result<Target, DropReason> {
    let local = |id: InstanceId| Target::Instance { id, peering: None };
    let eip_or = |fallback: DropReason| {
        if src.eip.is_some() && !is_private(dst) {
            Ok(Target::Internet)
        } else {
            Err(fallback)
        }
    };
    match &src.network {
        Network::Basic { tenant } => {
            if let Some(pool) = t.basic
                && pool.cidr.contains(&dst)
            {
                let id = t
                    .instance_in(Space::Basic, dst)
                    .ok_or(DropReason::NoSuchInstance)?;
                let other = t.instance(id);
                if !matches!(&other.network, Network::Basic { tenant: o } if o == tenant) {
                    return Err(DropReason::BasicOtherTenant);
                }
                if t.host(other.host).region != t.host(src.host).region {
                    return Err(DropReason::BasicOtherRegion);
                }
                return Ok(local(id));
            }
            if let Some(vpc) = t.linked_vpc(sender)
                && t.vpc(vpc).cidr.contains(&dst)
            {
                return t
                    .instance_at(vpc, dst)
                    .map(local)
                    .ok_or(DropReason::NoSuchInstance);
            }
            eip_or(DropReason::NoRoute)
        }
        Network::Vpc { vpc, subnet } => {
            let vpc = *vpc;
            if t.vpc(vpc).cidr.contains(&dst) {
                return t
                    .instance_at(vpc, dst)
                    .map(local)
                    .ok_or(DropReason::NoSuchInstance);
            }
            if let Some(classic) = t.instance_in(Space::Basic, dst)
                && t.linked_vpc(classic) == Some(vpc)
            {
                return Ok(local(classic));
            }
            let table = &t.route_tables[t.subnet(*subnet).route_table.index()];
            match table.routes.lookup(dst).map(|(_, r)| r.next_hop) {
                None => eip_or(DropReason::NoRoute),
                Some(NextHop::Drop) => Err(DropReason::RouteDrop),
                Some(NextHop::Internet) if src.eip.is_some() => Ok(Target::Internet),
                Some(NextHop::Internet) => Err(DropReason::NoEip),
                Some(NextHop::Instance(i)) if i == sender.0 => Err(DropReason::RouteLoop),
                Some(NextHop::Instance(i)) => Ok(local(InstanceId(i))),
                Some(NextHop::Peering(p)) => {
                    let [a, b] = t.peerings[p as usize].vpcs;
                    let peer = if a == vpc { b } else { a };
                    if !t.vpc(peer).cidr.contains(&dst) {
                        return Err(DropReason::PeeringNotTransitive);
                    }
                    let id = t.instance_at(peer, dst).ok_or(DropReason::NoSuchInstance)?;
                    Ok(Target::Instance {
                        id,
                        peering: Some(p),
                    })
                }
            }
        }
    }
}

/// An ACL's verdict; the error names the deciding rule (`None`: no rule matched).
fn acl_allows(list: &RuleList, s: &Subject) -> Result<(), Option<u16>> {
    match list.evaluate(s) {
        Outcome::Accepted(_) => Ok(()),
        Outcome::Dropped(o) => Err(Some(o.rule)),
        Outcome::NoMatch => Err(None),
    }
}

/// A security-group list's verdict; the error names the deciding rule.
fn sg_allows(list: &RuleList, s: &Subject, instance: InstanceId) -> Result<(), RuleRef> {
    match list.evaluate(s) {
        Outcome::Accepted(_) => Ok(()),
        Outcome::Dropped(o) => Err(RuleRef::SecurityGroup {
            group: SgId(o.owner),
            rule: o.rule,
        }),
        Outcome::NoMatch => Err(RuleRef::SecurityGroupsEnd { instance }),
    }
}

/// An ICMP error is related when the packet it quotes belongs to a tracked connection. `src`
/// and `dst` are the error's own ends as this side sees them: the quote travelled from `dst`
/// (as this side knows it, whatever NAT did to the quote) towards the quote's destination,
/// which is on the error sender's side.
fn related(
    st: &mut State,
    src: Endpoint,
    dst: Endpoint,
    ip: &Ipv4Packet,
    pkt: &[u8],
    now: Timestamp,
) -> bool {
    let Some(quote) = pkt.get(ip.l4_offset() + 8..) else {
        return false;
    };
    let Some(q) = ipv4::parse_quoted(quote) else {
        return false;
    };
    let (qs, qd) = ports(&q);
    let a = Endpoint {
        zone: dst.zone,
        addr: dst.addr,
        port: qs,
    };
    let b = Endpoint {
        zone: src.zone,
        addr: q.dst,
        port: qd,
    };
    st.conntrack
        .lookup(&ConnKey::new(q.protocol, a, b), now)
        .is_some()
}
