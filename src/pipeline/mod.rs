//! The decision: given a packet, where it came from and the time, what to do with it.
//!
//! ```text
//!  instance port ──► parse ─► anti-spoof ─► MTU ─┐
//!                                                ├─► flow cache ──hit──► conntrack update ─► decision
//!  underlay ──► outer IPv4 ─► GRE ─► key ─► parse ┘        │miss
//!              (sender known) (VPC here) (source on sender)   ▼
//!                                     route (local route, then LPM) ─► ACL egress/ingress
//!                                     ─► conntrack / security groups ─► deliver | encapsulate | drop
//! ```
//!
//! Each host runs the checks that belong to it: a packet leaving a local instance gets its
//! subnet's egress ACL and its security groups' egress rules; a packet entering a local
//! instance gets the destination subnet's ingress ACL and the destination's ingress rules.
//! Between two local instances both sides run on the same host; across hosts the sender's host
//! runs the egress half and the receiver's host the ingress half, so the union is the same.
//! Traffic inside one subnet skips the ACLs (CLOUD-SEMANTICS).
//!
//! The decision is pure: [`Pipeline::decide`] reads bytes and returns a [`Decision`];
//! [`Pipeline::process`] applies it to a [`PacketBuf`] in place (strip the outer headers,
//! prepend them, or turn the packet into an ICMP error) and says where the bytes go.

mod counters;
mod flow;
mod frag;

pub use counters::{Counters, PortCounters};
pub use flow::FlowKey;

use std::net::Ipv4Addr;
use std::sync::Arc;

use hashbrown::HashSet;

use crate::policy::conntrack::{ConnKey, Conntrack, Endpoint, Owner, Track, Zone};
use crate::policy::route::NextHop;
use crate::policy::rules::{Outcome, RuleList, Subject};
use crate::reason::DropReason;
use crate::time::Timestamp;
use crate::topology::{AclId, HostId, Instance, InstanceId, SgId, Topology, Transport};
use crate::wire::ipv4::{self, Fragment, Ipv4Packet, L4, icmp_type, proto};
use crate::wire::{PacketBuf, gre, icmp};
use flow::{FROM_UNDERLAY, FlowCache};
use frag::FragTable;

/// Where a packet came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ingress {
    /// A local instance's TUN device.
    Instance(InstanceId),
    /// The underlay, transport `gre`: a whole IPv4 packet, outer header first, as a raw socket
    /// delivers it.
    UnderlayIp,
    /// The underlay, transport `gre-udp`: a UDP payload (GRE header first) from `from`.
    UnderlayUdp {
        /// The UDP sender's address.
        from: Ipv4Addr,
    },
}

/// Which rule dropped a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleRef {
    /// A network ACL's rule; `None` is the ACL's final deny (no rule matched).
    Acl {
        /// The ACL.
        acl: AclId,
        /// The rule's index in the direction's list.
        rule: Option<u16>,
    },
    /// A security group's rule.
    SecurityGroup {
        /// The group.
        group: SgId,
        /// The rule's index in the direction's list.
        rule: u16,
    },
    /// No rule of the instance's security groups matched: the implicit drop at the end.
    SecurityGroupsEnd {
        /// The instance whose groups were evaluated.
        instance: InstanceId,
    },
}

/// A drop: why, and for policy drops, which rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dropped {
    /// The reason (also the counter).
    pub reason: DropReason,
    /// The ACL or security-group rule, for policy drops.
    pub rule: Option<RuleRef>,
}

impl From<DropReason> for Dropped {
    fn from(reason: DropReason) -> Self {
        Dropped { reason, rule: None }
    }
}

/// What to do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Write the inner packet to a local instance; it starts `strip` bytes into the packet.
    Deliver {
        /// The instance.
        to: InstanceId,
        /// Bytes of outer headers in front of the inner packet.
        strip: u16,
    },
    /// Encapsulate with the VPC's key and send to another host.
    Encapsulate {
        /// The host of the destination instance.
        host: HostId,
        /// The GRE key.
        key: u32,
    },
    /// Too big for the path with DF set: answer the sender with ICMP "fragmentation needed".
    FragNeeded {
        /// The sender.
        to: InstanceId,
        /// The MTU to report.
        mtu: u16,
    },
    /// Drop it.
    Drop(Dropped),
}

impl Decision {
    fn drop(reason: DropReason) -> Decision {
        Decision::Drop(reason.into())
    }

    fn forwards(&self) -> bool {
        matches!(
            self,
            Decision::Deliver { .. } | Decision::Encapsulate { .. }
        )
    }
}

/// Where the bytes go once a decision is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The buffer holds the inner packet: write it to this instance's TUN device.
    Deliver(InstanceId),
    /// The buffer holds the underlay datagram: for `gre`, an IPv4 packet (send it as is, with
    /// IP_HDRINCL); for `gre-udp`, the UDP payload (send it to `to`, port 4754).
    Transmit {
        /// The receiving host's underlay address.
        to: Ipv4Addr,
        /// The GRE key used.
        key: u32,
        /// The flow's symmetric hash (GRE-in-UDP source port, worker choice).
        flow_hash: u32,
    },
    /// The buffer holds an ICMP error from vpcd: write it to this instance's TUN device.
    Reply(InstanceId),
    /// Drop the packet.
    Drop(Dropped),
}

/// What this host is, derived from the topology.
#[derive(Debug)]
struct HostView {
    host: HostId,
    address: Ipv4Addr,
    instance_mtu: u16,
    generation: u64,
    local: Vec<bool>,
    vpc_here: Vec<bool>,
}

impl HostView {
    fn new(topo: &Topology, host: HostId, generation: u64) -> HostView {
        let mut local = vec![false; topo.instances.len()];
        let mut vpc_here = vec![false; topo.vpcs.len()];
        for id in topo.instances_on(host) {
            local[id.index()] = true;
            vpc_here[topo.instance(id).vpc().index()] = true;
        }
        HostView {
            host,
            address: topo.host(host).address,
            instance_mtu: topo.underlay.instance_mtu(),
            generation,
            local,
            vpc_here,
        }
    }

    #[inline]
    fn is_local(&self, id: InstanceId) -> bool {
        self.local.get(id.index()).copied().unwrap_or(false)
    }
}

/// What a pipeline changes as packets pass.
struct State {
    conntrack: Conntrack,
    flows: FlowCache,
    frags: FragTable,
    counters: Counters,
}

/// One host's data plane (or one worker's shard of it).
pub struct Pipeline {
    topo: Arc<Topology>,
    view: HostView,
    state: State,
    seed: u32,
}

impl Pipeline {
    /// The pipeline of `host`, with empty tables sized from the topology.
    pub fn new(topo: Arc<Topology>, host: HostId) -> Pipeline {
        let limits = topo.conntrack;
        Pipeline::with_limits(
            topo,
            host,
            limits.max_entries,
            limits.max_per_instance,
            limits.flow_cache,
        )
    }

    /// The pipeline of `host` with explicit table sizes (a worker's shard).
    pub fn with_limits(
        topo: Arc<Topology>,
        host: HostId,
        max_entries: u32,
        max_per_instance: u32,
        flow_cache: u32,
    ) -> Pipeline {
        let view = HostView::new(&topo, host, 1);
        let counters = Counters::new(topo.instances.len());
        Pipeline {
            view,
            state: State {
                conntrack: Conntrack::new(max_entries, max_per_instance),
                flows: FlowCache::new(flow_cache as usize),
                frags: FragTable::default(),
                counters,
            },
            seed: foldhash_seed(),
            topo,
        }
    }

    /// The topology in force.
    pub fn topology(&self) -> &Arc<Topology> {
        &self.topo
    }

    /// This host.
    pub fn host(&self) -> HostId {
        self.view.host
    }

    /// The topology generation: bumped by every [`Pipeline::set_topology`].
    pub fn generation(&self) -> u64 {
        self.view.generation
    }

    /// Counters.
    pub fn counters(&self) -> &Counters {
        &self.state.counters
    }

    /// The connection table.
    pub fn conntrack(&self) -> &Conntrack {
        &self.state.conntrack
    }

    /// The seed of [`ipv4::flow_hash`] in this pipeline.
    pub fn flow_seed(&self) -> u32 {
        self.seed
    }

    /// Sets the flow-hash seed (workers of one daemon share one, so that a flow's hash is the
    /// same wherever it is computed).
    pub fn set_flow_seed(&mut self, seed: u32) {
        self.seed = seed;
    }

    /// Installs a new topology: a new generation, so every cached decision is retaken.
    /// Tracked connections survive (CLOUD-SEMANTICS: rules take effect for new traffic;
    /// AWS keeps tracked connections), except those of an address that is no longer a local
    /// instance's: an instance that moved or left ends its connections.
    pub fn set_topology(&mut self, topo: Arc<Topology>) {
        let local_endpoints = |t: &Topology, host: HostId| -> HashSet<(Zone, Ipv4Addr)> {
            t.instances_on(host)
                .map(|id| {
                    let i = t.instance(id);
                    (Zone::vpc(t.vpc(i.vpc()).key), i.ip)
                })
                .collect()
        };
        let host_name = &self.topo.host(self.view.host).name;
        let host = topo.host_named(host_name).unwrap_or(self.view.host);
        let before = local_endpoints(&self.topo, self.view.host);
        let after = if host.index() < topo.hosts.len() {
            local_endpoints(&topo, host)
        } else {
            HashSet::new()
        };
        let gone: HashSet<(Zone, Ipv4Addr)> = before.difference(&after).copied().collect();
        if !gone.is_empty() {
            self.state.conntrack.remove_if(|c| {
                gone.contains(&(c.key.low.zone, c.key.low.addr))
                    || gone.contains(&(c.key.high.zone, c.key.high.addr))
            });
        }
        let generation = self.view.generation + 1;
        self.view = HostView::new(&topo, host, generation);
        if topo.instances.len() != self.topo.instances.len() {
            self.state.counters.resize(topo.instances.len());
        }
        self.state.counters.forget_rules();
        self.topo = topo;
    }

    /// Expires old connections; call about once a second.
    pub fn sweep(&mut self, now: Timestamp) -> usize {
        self.state.conntrack.sweep(now)
    }

    /// Decides what to do with `packet`, which arrived from `from` at `now`. Counts the
    /// outcome. Never panics, whatever the bytes.
    pub fn decide(&mut self, packet: &[u8], from: Ingress, now: Timestamp) -> Decision {
        self.decide_offloaded(packet, from, false, now)
    }

    /// [`Pipeline::decide`] for a packet that may be a TSO/USO super-packet from a TUN device
    /// (`segmented`): one decision for all its segments, and no MTU check, since the kernel
    /// cut its segment size to the device's MTU.
    pub fn decide_offloaded(
        &mut self,
        packet: &[u8],
        from: Ingress,
        segmented: bool,
        now: Timestamp,
    ) -> Decision {
        let t = &*self.topo;
        let v = &self.view;
        let st = &mut self.state;
        let d = match from {
            Ingress::Instance(id) => from_instance(t, v, st, id, packet, segmented, now),
            Ingress::UnderlayIp => match ipv4::parse_outer(packet) {
                Err(r) => Decision::drop(r),
                Ok(o) if o.dst != v.address => Decision::drop(DropReason::NotAddressedToHost),
                Ok(o) => from_underlay(t, v, st, o.src, packet, o.header_len, now),
            },
            Ingress::UnderlayUdp { from } => from_underlay(t, v, st, from, packet, 0, now),
        };
        let c = &mut st.counters;
        let sender = match from {
            Ingress::Instance(id) => Some(id.index()),
            _ => None,
        };
        match d {
            Decision::Drop(x) => {
                c.drop(x.reason);
                if let Some(rule) = x.rule {
                    c.rule_drop(x.reason, rule);
                }
                if let Some(p) = sender.and_then(|s| c.port_mut(s)) {
                    p.sent_dropped += 1;
                }
            }
            Decision::Deliver { to, .. } => {
                c.delivered += 1;
                if let Some(p) = c.port_mut(to.index()) {
                    p.received += 1;
                }
                if let Some(p) = sender.and_then(|s| c.port_mut(s)) {
                    p.sent += 1;
                }
            }
            Decision::Encapsulate { .. } => {
                c.encapsulated += 1;
                if let Some(p) = sender.and_then(|s| c.port_mut(s)) {
                    p.sent += 1;
                }
            }
            Decision::FragNeeded { .. } => c.replied += 1,
        }
        d
    }

    /// Decides, then applies the decision to `buf` in place. The payload never moves.
    pub fn process(&mut self, buf: &mut PacketBuf, from: Ingress, now: Timestamp) -> Action {
        match self.decide(buf.as_slice(), from, now) {
            Decision::Deliver { to, strip } => {
                buf.pull_front(usize::from(strip));
                Action::Deliver(to)
            }
            Decision::Encapsulate { host, key } => {
                let to = self.topo.host(host).address;
                let flow_hash = ipv4::flow_hash(buf.as_slice(), self.seed);
                let u = self.topo.underlay;
                let pushed = match u.transport {
                    Transport::Gre => {
                        gre::encapsulate_ip(buf, self.view.address, to, Some(key), u.checksum)
                    }
                    Transport::GreUdp => gre::push_header(buf, Some(key), u.checksum),
                };
                match pushed {
                    Ok(()) => Action::Transmit { to, key, flow_hash },
                    Err(_) => self.count_late_drop(DropReason::NoHeadroom),
                }
            }
            Decision::FragNeeded { to, mtu } => {
                let gateway = self.topo.subnet(self.topo.instance(to).subnet()).gateway;
                match icmp::frag_needed_in_place(buf, gateway, mtu) {
                    Ok(()) => Action::Reply(to),
                    Err(_) => self.count_late_drop(DropReason::NoHeadroom),
                }
            }
            Decision::Drop(d) => Action::Drop(d),
        }
    }

    fn count_late_drop(&mut self, reason: DropReason) -> Action {
        self.state.counters.drop(reason);
        Action::Drop(reason.into())
    }
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("host", &self.view.host)
            .field("generation", &self.view.generation)
            .field("conntrack", &self.state.conntrack)
            .finish()
    }
}

fn foldhash_seed() -> u32 {
    use std::hash::BuildHasher;
    foldhash::fast::RandomState::default().hash_one(0u32) as u32
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
    let zone = Zone::vpc(t.vpc(inst.vpc()).key);
    decide_flow(t, v, st, Origin::Local(id), zone, &ip, pkt, 0, now)
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
    let Some(key) = g.key else {
        return Decision::drop(DropReason::GreNoKey);
    };
    let Some(vpc) = t.vpc_by_key(key) else {
        return Decision::drop(DropReason::GreUnknownKey);
    };
    if !v.vpc_here[vpc.index()] {
        return Decision::drop(DropReason::GreKeyNotOnHost);
    }
    let ip = match ipv4::parse(inner) {
        Ok(ip) => ip,
        Err(r) => return Decision::drop(r),
    };
    if let Err(r) = check_destination(t, &ip) {
        return Decision::drop(r);
    }
    let source = t
        .instance_at(vpc, ip.src)
        .filter(|&s| t.instance(s).host == host);
    let Some(source) = source else {
        return Decision::drop(DropReason::InnerSourceNotOnSender);
    };
    let origin = Origin::Remote { host, source };
    decide_flow(
        t,
        v,
        st,
        origin,
        Zone::vpc(key),
        &ip,
        inner,
        inner_at as u16,
        now,
    )
}

/// Where the packet entered the decision.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// A local instance sent it.
    Local(InstanceId),
    /// `source`, an instance of `host`, sent it through the underlay.
    Remote { host: HostId, source: InstanceId },
}

impl Origin {
    fn ingress(self) -> u32 {
        match self {
            Origin::Local(id) => id.0,
            Origin::Remote { host, .. } => FROM_UNDERLAY | host.0,
        }
    }

    fn source(self) -> InstanceId {
        match self {
            Origin::Local(id) | Origin::Remote { source: id, .. } => id,
        }
    }
}

/// Broadcast, multicast and underlay destinations are refused on both sides.
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

/// The connection-tracking endpoints of a packet.
fn endpoints(zone: Zone, ip: &Ipv4Packet) -> (Endpoint, Endpoint) {
    let (sp, dp) = match ip.l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
        L4::Icmp { ident, .. } => (ident, ident),
        L4::Other | L4::None => (0, 0),
    };
    (
        Endpoint {
            zone,
            addr: ip.src,
            port: sp,
        },
        Endpoint {
            zone,
            addr: ip.dst,
            port: dp,
        },
    )
}

#[allow(clippy::too_many_arguments)]
fn decide_flow(
    t: &Topology,
    v: &HostView,
    st: &mut State,
    origin: Origin,
    zone: Zone,
    ip: &Ipv4Packet,
    pkt: &[u8],
    strip: u16,
    now: Timestamp,
) -> Decision {
    let ingress = origin.ingress();
    if let Fragment::Later { .. } = ip.fragment {
        return match st.frags.follow(ingress, zone, ip, now) {
            Some(d) => with_strip(d, strip),
            None => Decision::drop(DropReason::FragmentWithoutFirst),
        };
    }
    let icmp_error = matches!(ip.l4, L4::Icmp { kind, .. } if icmp_type::is_error(kind));
    let key = FlowKey::new(ingress, zone, ip);
    // ICMP errors are decided by the connection they quote, which the key does not hold.
    if !icmp_error && let Some(hit) = st.flows.get(&key, v.generation) {
        let d = match hit.conn {
            None => Some(hit.decision),
            Some(r) => {
                let (src, _) = endpoints(zone, ip);
                match st.conntrack.track(r, &src, &ip.l4, now) {
                    Track::Accepted(_) => Some(hit.decision),
                    Track::Invalid(reason) => return Decision::drop(reason),
                    Track::Reopen | Track::Gone => None,
                }
            }
        };
        if let Some(d) = d {
            st.counters.cache_hits += 1;
            if ip.fragment == Fragment::First && d.forwards() {
                st.frags.admit(ingress, zone, ip, d, now);
            }
            return with_strip(d, strip);
        }
    }
    st.counters.cache_misses += 1;
    let (d, conn, cacheable) = slow_path(t, v, st, origin, zone, ip, pkt, now);
    if cacheable {
        st.flows.insert(key, v.generation, d, conn);
    }
    if ip.fragment == Fragment::First && d.forwards() {
        st.frags.admit(ingress, zone, ip, d, now);
    }
    with_strip(d, strip)
}

/// Decisions are cached without the offset of the inner packet, which depends on the GRE
/// flags of each packet.
fn with_strip(d: Decision, strip: u16) -> Decision {
    match d {
        Decision::Deliver { to, .. } => Decision::Deliver { to, strip },
        d => d,
    }
}

/// The full path. Returns the decision, the connection it belongs to, and whether the
/// decision may be cached (it may when it depends only on the flow key and the topology).
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
) -> (Decision, Option<crate::policy::conntrack::ConnRef>, bool) {
    let remote = matches!(origin, Origin::Remote { .. });
    let src = t.instance(origin.source());
    let target = match route(t, origin.source(), src, ip.dst) {
        Ok(id) => id,
        Err(r) => return (Decision::drop(r), None, true),
    };
    let dst = t.instance(target);
    let target_local = v.is_local(target);
    if remote && !target_local {
        return (Decision::drop(DropReason::NotLocalDestination), None, true);
    }
    let dport = match ip.l4 {
        L4::Tcp { dport, .. } | L4::Udp { dport, .. } => Some(dport),
        _ => None,
    };
    let toward = |peer| Subject {
        peer,
        protocol: ip.protocol,
        dport,
    };

    // Network ACLs: stateless, only between subnets.
    if src.subnet() != dst.subnet() {
        if !remote && let Some(acl) = t.subnet(src.subnet()).acl {
            let list = &t.acls[acl.index()].egress_list;
            if let Err(rule) = acl_allows(list, &toward(ip.dst)) {
                let d = Dropped {
                    reason: DropReason::AclEgress,
                    rule: Some(RuleRef::Acl { acl, rule }),
                };
                return (Decision::Drop(d), None, true);
            }
        }
        if target_local && let Some(acl) = t.subnet(dst.subnet()).acl {
            let list = &t.acls[acl.index()].ingress_list;
            if let Err(rule) = acl_allows(list, &toward(ip.src)) {
                let d = Dropped {
                    reason: DropReason::AclIngress,
                    rule: Some(RuleRef::Acl { acl, rule }),
                };
                return (Decision::Drop(d), None, true);
            }
        }
    }

    let forward = if target_local {
        Decision::Deliver {
            to: target,
            strip: 0,
        }
    } else {
        Decision::Encapsulate {
            host: dst.host,
            key: t.vpc(dst.vpc()).key,
        }
    };

    // Security groups, made stateful by connection tracking.
    if matches!(ip.l4, L4::Icmp { kind, .. } if icmp_type::is_error(kind)) {
        return if related(st, zone, ip, pkt, now) {
            (forward, None, false)
        } else {
            (Decision::drop(DropReason::IcmpErrorUnrelated), None, false)
        };
    }
    let (src_ep, dst_ep) = endpoints(zone, ip);
    let ck = ConnKey::new(ip.protocol, src_ep, dst_ep);
    if let Some(r) = st.conntrack.lookup(&ck, now) {
        match st.conntrack.track(r, &src_ep, &ip.l4, now) {
            Track::Accepted(_) => return (forward, Some(r), true),
            Track::Invalid(reason) => return (Decision::drop(reason), None, false),
            Track::Reopen | Track::Gone => {}
        }
    }
    // Only an echo request opens an ICMP "connection"; other ICMP messages are judged by the
    // rules each time (as a cloud's security group does for untracked traffic).
    let tracked = !matches!(ip.l4, L4::Icmp { kind, .. } if kind != icmp_type::ECHO_REQUEST);
    if tracked && let Err(reason) = Conntrack::may_open(&ip.l4) {
        return (Decision::drop(reason), None, false);
    }
    if !remote && let Err(rule) = sg_allows(&src.egress_rules, &toward(ip.dst), origin.source()) {
        let d = Dropped {
            reason: DropReason::SgEgress,
            rule: Some(rule),
        };
        return (Decision::Drop(d), None, false);
    }
    if target_local && let Err(rule) = sg_allows(&dst.ingress_rules, &toward(ip.src), target) {
        let d = Dropped {
            reason: DropReason::SgIngress,
            rule: Some(rule),
        };
        return (Decision::Drop(d), None, false);
    }
    if !tracked {
        // Not cached: a connection opened later in the other direction (an echo request
        // after an early reply) must be found and refreshed by these packets.
        return (forward, None, false);
    }
    let owner = Owner {
        zone,
        addr: if remote { dst.ip } else { src.ip },
    };
    match st.conntrack.open(ip.protocol, src_ep, dst_ep, owner, now) {
        Ok(r) => (forward, Some(r), true),
        Err(reason) => (Decision::drop(reason), None, false),
    }
}

/// Route order (CLOUD-SEMANTICS): the local route first, then the longest custom route.
/// Returns the instance the packet goes to.
fn route(
    t: &Topology,
    sender: InstanceId,
    src: &Instance,
    dst: Ipv4Addr,
) -> Result<InstanceId, DropReason> {
    let vpc = src.vpc();
    if t.vpc(vpc).cidr.contains(&dst) {
        return t.instance_at(vpc, dst).ok_or(DropReason::NoSuchInstance);
    }
    let table = &t.route_tables[t.subnet(src.subnet()).route_table.index()];
    match table.routes.lookup(dst).map(|(_, r)| r.next_hop) {
        None => Err(DropReason::NoRoute),
        Some(NextHop::Drop) => Err(DropReason::RouteDrop),
        Some(NextHop::Internet) => Err(DropReason::InternetUnavailable),
        Some(NextHop::Peering(_)) => Err(DropReason::PeeringUnavailable),
        Some(NextHop::Instance(i)) if i == sender.0 => Err(DropReason::RouteLoop),
        Some(NextHop::Instance(i)) => Ok(InstanceId(i)),
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

/// An ICMP error is related when the packet it quotes belongs to a tracked connection of the
/// same zone, sent by the error's receiver.
fn related(st: &mut State, zone: Zone, ip: &Ipv4Packet, pkt: &[u8], now: Timestamp) -> bool {
    let Some(quote) = pkt.get(ip.l4_offset() + 8..) else {
        return false;
    };
    let Some(q) = ipv4::parse_quoted(quote) else {
        return false;
    };
    if q.src != ip.dst {
        return false;
    }
    let (a, b) = endpoints(zone, &q);
    st.conntrack
        .lookup(&ConnKey::new(q.protocol, a, b), now)
        .is_some()
}

#[cfg(test)]
mod tests;
