//! The decision: given a packet, where it came from and the time, what to do with it.
//!
//! ```text
//!  instance port ──► parse ─► anti-spoof ─► MTU ─┐
//!  internet port (gateway host) ──► parse ───────┤
//!                                                ├─► flow cache ──hit──► conntrack update ─► decision
//!  underlay ──► outer IPv4 ─► GRE ─► key ─► parse ┘        │miss
//!              (sender known) (network here) (source on sender) ▼
//!              load balancer: a VIP's session or new pick (destination NAT), replies to the VIP
//!              ─► route: local route, interconnect, longest custom route, Elastic IP
//!              ─► 1:1 NAT (at the internet gateway) ─► ACL egress/ingress
//!              ─► conntrack / security groups ─► deliver | encapsulate | to the internet | drop
//! ```
//!
//! Each host runs the checks that belong to it: a packet leaving a local instance gets its
//! subnet's egress ACL and its security groups' egress rules; a packet entering a local
//! instance gets the destination subnet's ingress ACL and the destination's ingress rules.
//! Between two local instances both sides run on the same host; across hosts the sender's host
//! runs the egress half and the receiver's host the ingress half, so the union is the same.
//! Traffic inside one subnet skips the ACLs (docs/semantics.md 2.5 step 5); the basic network
//! has none.
//!
//! The internet gateway host only relays and translates (1:1 NAT is stateless): the policy of
//! an instance runs on that instance's host.
//!
//! The decision is pure: [`Pipeline::decide`] reads bytes and returns a [`Decision`];
//! [`Pipeline::process`] applies it to a [`PacketBuf`] in place (strip the outer headers,
//! rewrite addresses, prepend the outer headers, or turn the packet into an ICMP error) and
//! says where the bytes go. docs/semantics.md, Part 2, is the specification.
//!
//! The stages are methods of one context, [`decide::Decider`] (the topology, this host, the
//! mutable state and the time), in files of their own: the entry points ([`entry`]), the
//! fast lane ([`fast`]), load balancing ([`balance`]), route order ([`route`]), the plan of
//! where a packet goes and on which channel ([`plan`]), the filter (network ACLs, connection
//! tracking, security groups: [`filter`]) and related ICMP errors ([`related`]).

mod balance;
mod counters;
mod decide;
mod entry;
mod fast;
mod filter;
mod flow;
mod flows;
mod frag;
mod plan;
mod related;
mod route;
mod scope;
pub mod trace;

pub use crate::wire::nat::Nat;
pub use counters::{Counted, Counters, PortCounters, Way};
pub use decide::{BASIC as BASIC_ZONE, INTERNET as INTERNET_ZONE};
pub use flow::FlowKey;
pub use flows::FlowEntry;

use std::net::Ipv4Addr;
use std::sync::Arc;

use hashbrown::{HashMap, HashSet};

use crate::policy::conntrack::{Conntrack, Owner};
use crate::reason::DropReason;
use crate::time::Timestamp;
use crate::topology::{AclId, Channel, HostId, InstanceId, SgId, Space, Topology, Transport};
use crate::wire::{PacketBuf, gre, icmp, ipv4, nat};
use flow::FlowCache;
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
    /// The internet's device, on the internet gateway host.
    Internet,
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
    /// Write the inner packet to a local instance; it starts `strip` bytes into the packet,
    /// and its addresses are rewritten by `nat` first.
    Deliver {
        /// The instance.
        to: InstanceId,
        /// Bytes of outer headers in front of the inner packet.
        strip: u16,
        /// 1:1 NAT to apply (inbound from the internet on the gateway host).
        nat: Nat,
    },
    /// Encapsulate and send to another host: with the key of the destination's VPC, or with
    /// no key for the basic network.
    Encapsulate {
        /// Bytes of outer headers in front of the inner packet (the gateway relays what came
        /// in through the underlay).
        strip: u16,
        /// The host of the destination instance (or the internet gateway).
        host: HostId,
        /// The GRE key; `None` for the basic network.
        key: Option<u32>,
        /// 1:1 NAT to apply first (the gateway relaying into the cloud).
        nat: Nat,
    },
    /// Write the inner packet, addresses rewritten, to the internet's device (this host is
    /// the internet gateway).
    ToInternet {
        /// Bytes of outer headers in front of the inner packet.
        strip: u16,
        /// The source NAT (private address to Elastic IP).
        nat: Nat,
    },
    /// An ICMP echo request to a load balancer's VIP: answer it (the VIP's echo reply).
    EchoReply {
        /// The local instance that asked.
        to: InstanceId,
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
            Decision::Deliver { .. } | Decision::Encapsulate { .. } | Decision::ToInternet { .. }
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
        /// The GRE key used (`None`: the basic network).
        key: Option<u32>,
        /// The flow's symmetric hash ([`ipv4::flow_hash`]: the GRE-in-UDP sender and port).
        flow_hash: u32,
    },
    /// The buffer holds a packet for the internet: write it to the internet's device.
    ToInternet,
    /// The buffer holds an ICMP error from vpcd: write it to this instance's TUN device.
    Reply(InstanceId),
    /// Drop the packet.
    Drop(Dropped),
}

/// Where the bytes of a forwarded packet go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// A local instance's TUN device.
    Instance(InstanceId),
    /// The internet's device (this host is the internet gateway).
    Internet,
    /// The underlay, to another host, with the outer headers to put in front.
    Underlay {
        /// The receiving host's underlay address.
        to: Ipv4Addr,
        /// The outer headers.
        encap: gre::Encap,
        /// The flow's symmetric hash (GRE-in-UDP source port).
        flow_hash: u32,
    },
}

/// The transmit plan of a forwarding decision, its NAT applied: the packet to write starts
/// `start` bytes into the bytes the decision was taken for (the outer headers it came with
/// are left behind), and goes to `to` (with new outer headers, for the underlay). The one
/// description of what to write, for a whole packet ([`Pipeline::apply`]), a datagram of a
/// GRO train or a super-packet cut into segments (the daemon's segmented paths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxPlan {
    /// Where.
    pub to: Egress,
    /// Bytes of incoming outer headers in front of the packet to write.
    pub start: usize,
}

/// Where a forwarding decision sends a packet, before its plan is made.
#[derive(Clone, Copy)]
enum Dest {
    Instance(InstanceId),
    Internet,
    Host(HostId, Option<u32>),
}

/// What this host is, derived from the topology.
#[derive(Debug)]
struct HostView {
    host: HostId,
    address: Ipv4Addr,
    instance_mtu: u16,
    generation: u64,
    local: Vec<bool>,
    /// VPCs with an instance here.
    vpc_here: Vec<bool>,
    /// The basic network has an instance here.
    basic_here: bool,
    /// This host is the internet gateway.
    gateway: bool,
}

impl HostView {
    fn new(topo: &Topology, host: HostId, generation: u64) -> HostView {
        let gateway = topo.internet.as_ref().is_some_and(|i| i.gateway == host);
        let mut local = vec![false; topo.instances.len()];
        let mut vpc_here = vec![false; topo.vpcs.len()];
        let mut basic_here = false;
        for id in topo.instances_on(host) {
            local[id.index()] = true;
            match topo.instance(id).vpc() {
                Some(v) => vpc_here[v.index()] = true,
                None => basic_here = true,
            }
        }
        HostView {
            host,
            address: topo.host(host).address,
            instance_mtu: topo.underlay.instance_mtu(),
            generation,
            local,
            vpc_here,
            basic_here,
            gateway,
        }
    }

    #[inline]
    fn is_local(&self, id: InstanceId) -> bool {
        self.local.get(id.index()).copied().unwrap_or(false)
    }

    fn space_here(&self, s: Space) -> bool {
        match s {
            Space::Vpc(v) => self.vpc_here.get(v.index()).copied().unwrap_or(false),
            Space::Basic => self.basic_here,
        }
    }

    /// The receiving side of `c` is on this host (docs/semantics.md, 2.3 step 4).
    fn receives(&self, topo: &Topology, c: Channel) -> bool {
        match c {
            Channel::Vpc(v) | Channel::Peering { to: v, .. } => self.space_here(Space::Vpc(v)),
            Channel::Interconnect { vpc, to_basic } => self.space_here(if to_basic {
                Space::Basic
            } else {
                Space::Vpc(vpc)
            }),
            Channel::Internet { inbound: false, .. } => self.gateway,
            Channel::Internet { space, .. } => self.space_here(space),
            Channel::Appliance(x) => topo
                .instance(x)
                .vpc()
                .is_some_and(|v| self.space_here(Space::Vpc(v))),
            Channel::Basic => self.basic_here,
        }
    }
}

/// What a pipeline changes as packets pass.
struct State {
    conntrack: Conntrack,
    balancer: crate::policy::balance::Balancer,
    flows: FlowCache,
    frags: FragTable,
    counters: Counters,
}

/// One host's data plane (or one worker's shard of it).
pub struct Pipeline {
    topo: Arc<Topology>,
    view: HostView,
    state: State,
    /// The seed every table's hash and the flow hash derive from.
    seed: u64,
    /// The shards (workers) the host's tables are divided among.
    shards: u32,
}

impl Pipeline {
    /// The pipeline of `host`, with empty tables sized from the topology and a fixed seed
    /// (tests and benches; the daemon uses [`Pipeline::shard`] with a random one).
    pub fn new(topo: Arc<Topology>, host: HostId) -> Pipeline {
        Pipeline::with_seed(topo, host, 0)
    }

    /// [`Pipeline::new`] with every hash seeded from `seed`, so that a run replays exactly
    /// (as smoltcp's `random_seed` and quinn's `rng_seed`).
    pub fn with_seed(topo: Arc<Topology>, host: HostId, seed: u64) -> Pipeline {
        Pipeline::shard(topo, host, 1, seed)
    }

    /// One of `shards` workers' pipelines of `host`: the connection table's bounds are
    /// divided among the shards.
    pub fn shard(topo: Arc<Topology>, host: HostId, shards: u32, seed: u64) -> Pipeline {
        let shards = shards.max(1);
        let (entries, per_owner) = shard_limits(&topo, shards);
        let view = HostView::new(&topo, host, 1);
        let counters = Counters::new(topo.instances.len());
        Pipeline {
            view,
            state: State {
                conntrack: Conntrack::new(entries, per_owner, seed),
                balancer: balancer_of(&topo, entries, seed),
                flows: FlowCache::new(topo.conntrack.flow_cache as usize, seed),
                frags: FragTable::new(seed),
                counters,
            },
            seed,
            shards,
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

    /// Counts a drop decided outside the pipeline (by the daemon, for a packet it cannot
    /// hand to the decision).
    pub fn count_drop(&mut self, reason: DropReason) {
        self.state.counters.drop(reason);
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.state.counters
    }

    /// Zeroes every counter, the connection table's included (`vpcd ctl clear-counters`);
    /// connections and cached decisions stay.
    pub fn clear_counters(&mut self) {
        self.state.counters = Counters::new(self.topo.instances.len());
        self.state.conntrack.clear_stats();
    }

    /// The connection table.
    pub fn conntrack(&self) -> &Conntrack {
        &self.state.conntrack
    }

    /// The seed of [`ipv4::flow_hash`] in this pipeline (workers of one daemon share it, so
    /// that a flow's hash is the same wherever it is computed).
    pub fn flow_seed(&self) -> u32 {
        (self.seed ^ (self.seed >> 32)) as u32
    }

    /// Installs a new topology, in a new generation. A change invalidates only what it can
    /// affect: the cached decisions of the address spaces it leaves untouched are carried into
    /// the new generation, their ids renumbered by name, and the others are retaken (every one
    /// when something global changed: [`scope`], docs/control-plane.md "What a change
    /// invalidates"). The later fragments of datagrams in flight are dropped (the table of
    /// first fragments' decisions is not carried). Tracked connections survive
    /// (docs/semantics.md 2.9: rules take effect for new traffic), except those of a port (a
    /// local instance) that left this host or its address space. New connection-table bounds
    /// and flow-cache size apply at once.
    pub fn set_topology(&mut self, topo: Arc<Topology>) {
        let host_name = &self.topo.host(self.view.host).name;
        let host = topo.host_named(host_name).unwrap_or(self.view.host);
        self.forget_connections(&topo, host);
        let (entries, per_owner) = shard_limits(&topo, self.shards);
        self.state.conntrack.set_limits(entries, per_owner);
        self.state.balancer.set_topology(&topo, entries as usize);
        let generation = self.view.generation + 1;
        self.carry_decisions(&topo, generation);
        self.view = HostView::new(&topo, host, generation);
        self.renumber_counters(&topo);
        self.state.counters.forget_rules();
        self.topo = topo;
    }

    /// Removes the connections of ports that left `host` (`host` in `topo`) and of addresses
    /// that stop being the same instance's.
    fn forget_connections(&mut self, topo: &Topology, host: HostId) {
        let before = local_ports(&self.topo, self.view.host);
        let after = if host.index() < topo.hosts.len() {
            local_ports(topo, host)
        } else {
            HashSet::new()
        };
        let ports_gone: HashSet<Owner> = before.difference(&after).copied().collect();
        let renamed = changed_addresses(&self.topo, topo);
        if !ports_gone.is_empty() || !renamed.is_empty() {
            self.state.conntrack.remove_if(|c| {
                ports_gone.contains(&c.key.port)
                    || renamed.contains(&c.key.low.owner())
                    || renamed.contains(&c.key.high.owner())
            });
        }
    }

    /// Carries the cached decisions `topo` cannot affect into `generation`; returns how many.
    /// A new flow-cache size starts an empty cache.
    fn carry_decisions(&mut self, topo: &Topology, generation: u64) -> usize {
        if topo.conntrack.flow_cache != self.topo.conntrack.flow_cache {
            self.state.flows = FlowCache::new(topo.conntrack.flow_cache as usize, self.seed);
            return 0;
        }
        let Some(carry) = scope::Carry::between(&self.topo, topo) else {
            return 0;
        };
        let from = self.view.generation;
        self.state.flows.carry(from, generation, |key, deps, hit| {
            Some((carry.key(key)?, carry.deps(deps)?, carry.hit(hit)?))
        })
    }

    /// Counters follow instances by name: ids move when the file's order changes.
    fn renumber_counters(&mut self, topo: &Topology) {
        let by_name: HashMap<&str, usize> = topo
            .instances
            .iter()
            .enumerate()
            .map(|(i, inst)| (inst.name.as_str(), i))
            .collect();
        let old = &self.topo;
        self.state.counters.renumber(topo.instances.len(), |i| {
            by_name.get(old.instances[i].name.as_str()).copied()
        });
    }

    /// The cached decisions valid in this generation (the flow cache's live entries).
    pub fn cached_decisions(&self) -> usize {
        self.state.flows.hits(self.view.generation).count()
    }

    /// Forgets every cached decision, so that every flow's next packet takes the full path
    /// (what a topology change did before it kept what it cannot affect; a measure's
    /// baseline).
    pub fn forget_cached_decisions(&mut self) -> usize {
        self.state.flows.forget(|_| true)
    }

    /// Expires old connections; call about once a second.
    pub fn sweep(&mut self, now: Timestamp) -> usize {
        self.state.balancer.sweep(now);
        self.state.conntrack.sweep(now)
    }

    /// New health-check results for the load balancers' backends (the edge's checker and
    /// the other hosts' reports): new connections go only to healthy backends.
    pub fn set_health(&mut self, health: crate::policy::balance::Health) {
        self.state.balancer.set_health(&self.topo, health);
    }

    /// The load balancers' sessions and health.
    pub fn balancer(&self) -> &crate::policy::balance::Balancer {
        &self.state.balancer
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
        let mut decider = decide::Decider {
            topo: &self.topo,
            host: &self.view,
            state: &mut self.state,
            now,
            cacheable: true,
            trace: None,
            via: Default::default(),
            receiver: None,
            lb_nat: Nat::NONE,
        };
        let d = decider.decide(packet, from, segmented);
        let counted = Counted {
            from,
            len: packet.len(),
            receiver: decider.receiver,
        };
        self.state.counters.count(&d, counted);
        d
    }

    /// Decides, then applies the decision to `buf` in place. The payload never moves.
    pub fn process(&mut self, buf: &mut PacketBuf, from: Ingress, now: Timestamp) -> Action {
        let d = self.decide(buf.as_slice(), from, now);
        self.apply(d, buf, false)
    }

    /// The transmit plan of decision `d` for the bytes `pkt` it was taken for (a whole
    /// packet, a datagram in a GRO train or a super-packet), the decision's NAT applied to
    /// them in place. `partial`: the packet's transport checksum is a partial one (a TUN
    /// super-packet with CHECKSUM_PARTIAL), which NAT must update as such. `None` when `d`
    /// forwards nothing (a drop, or an ICMP error to build: [`Pipeline::apply`]).
    pub fn transmit_plan(&self, d: &Decision, pkt: &mut [u8], partial: bool) -> Option<TxPlan> {
        let (strip, nat, dest) = match *d {
            Decision::Deliver { to, strip, nat } => (strip, nat, Dest::Instance(to)),
            Decision::ToInternet { strip, nat } => (strip, nat, Dest::Internet),
            Decision::Encapsulate {
                strip,
                host,
                key,
                nat,
            } => (strip, nat, Dest::Host(host, key)),
            Decision::FragNeeded { .. } | Decision::EchoReply { .. } | Decision::Drop(_) => {
                return None;
            }
        };
        let start = usize::from(strip).min(pkt.len());
        let inner = &mut pkt[start..];
        nat::apply(inner, &nat, partial);
        let to = match dest {
            Dest::Instance(id) => Egress::Instance(id),
            Dest::Internet => Egress::Internet,
            Dest::Host(host, key) => {
                let to = self.topo.host(host).address;
                let u = self.topo.underlay;
                let outer = (u.transport == Transport::Gre).then_some((self.view.address, to));
                Egress::Underlay {
                    to,
                    encap: gre::Encap {
                        outer,
                        key,
                        checksum: u.checksum,
                    },
                    flow_hash: ipv4::flow_hash(inner, self.flow_seed()),
                }
            }
        };
        Some(TxPlan { to, start })
    }

    /// Applies a decision to the packet it was taken for, in place: its
    /// [`Pipeline::transmit_plan`] (the outer headers it came with removed, the new ones
    /// prepended), or the ICMP error it asks for. `partial` as for the plan.
    pub fn apply(&mut self, d: Decision, buf: &mut PacketBuf, partial: bool) -> Action {
        let Some(plan) = self.transmit_plan(&d, buf.as_mut_slice(), partial) else {
            return match d {
                Decision::FragNeeded { to, mtu } => self.frag_needed(buf, to, mtu),
                Decision::EchoReply { to } => {
                    icmp::echo_reply_in_place(buf.as_mut_slice());
                    Action::Reply(to)
                }
                Decision::Drop(x) => Action::Drop(x),
                // Every other decision forwards, and has a plan.
                _ => self.count_late_drop(DropReason::NoHeadroom),
            };
        };
        buf.pull_front(plan.start);
        match plan.to {
            Egress::Instance(id) => Action::Deliver(id),
            Egress::Internet => Action::ToInternet,
            Egress::Underlay {
                to,
                encap,
                flow_hash,
            } => match encap.prepend(buf) {
                Ok(()) => Action::Transmit {
                    to,
                    key: encap.key,
                    flow_hash,
                },
                Err(_) => self.count_late_drop(DropReason::NoHeadroom),
            },
        }
    }

    /// Turns the packet in `buf` into an ICMP "fragmentation needed" for instance `to`.
    fn frag_needed(&mut self, buf: &mut PacketBuf, to: InstanceId, mtu: u16) -> Action {
        let topo = &self.topo;
        let inst = topo.instance(to);
        let gateway = match (inst.subnet(), topo.basic) {
            (Some(s), _) => topo.subnet(s).gateway,
            (None, Some(b)) => b.gateway,
            (None, None) => Ipv4Addr::UNSPECIFIED,
        };
        match icmp::frag_needed_in_place(buf, gateway, mtu) {
            Ok(()) => Action::Reply(to),
            Err(_) => self.count_late_drop(DropReason::NoHeadroom),
        }
    }

    fn count_late_drop(&mut self, reason: DropReason) -> Action {
        self.state.counters.drop(reason);
        Action::Drop(reason.into())
    }
}

/// An empty balancer, its session table as large as the connection table.
fn balancer_of(topo: &Topology, entries: u32, seed: u64) -> crate::policy::balance::Balancer {
    let mut b = crate::policy::balance::Balancer::new(entries as usize, seed);
    b.set_topology(topo, entries as usize);
    b
}

/// The connection-table bounds of one of `shards` shards.
fn shard_limits(topo: &Topology, shards: u32) -> (u32, u32) {
    let c = topo.conntrack;
    (
        c.max_entries.div_ceil(shards),
        c.max_per_instance.div_ceil(shards),
    )
}

/// The instance addresses (by zone) that stop being the same instance's: its instance left,
/// or another took the address. Connections with such an end are over.
fn changed_addresses(old: &Topology, new: &Topology) -> HashSet<Owner> {
    let names = |topo: &Topology| -> HashMap<Owner, String> {
        topo.instances
            .iter()
            .map(|i| {
                let o = Owner {
                    zone: decide::zone_of(topo, i),
                    addr: i.ip,
                };
                (o, i.name.clone())
            })
            .collect()
    };
    let after = names(new);
    names(old)
        .into_iter()
        .filter(|(o, name)| after.get(o) != Some(name))
        .map(|(o, _)| o)
        .collect()
}

/// The ports (local instances, by zone and address) of `host`.
fn local_ports(topo: &Topology, host: HostId) -> HashSet<Owner> {
    topo.instances_on(host)
        .map(|id| {
            let i = topo.instance(id);
            Owner {
                zone: decide::zone_of(topo, i),
                addr: i.ip,
            }
        })
        .collect()
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

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_balance;
#[cfg(test)]
mod tests_cloud;
#[cfg(test)]
mod tests_flows;
