//! The validated topology: plain data with dense ids, plus the indexes the pipeline looks up.

use std::net::Ipv4Addr;
use std::sync::Arc;

use hashbrown::HashMap;
use ipnet::Ipv4Net;

pub use crate::ids::*;
use crate::policy::route::Routes;
use crate::policy::rules::{Protocol, Rule, RuleList};

/// How packets cross the underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// GRE directly over IPv4 (IP protocol 47).
    Gre,
    /// GRE-in-UDP (RFC 8086), UDP port 4754.
    GreUdp,
}

impl Transport {
    /// The word used in the topology file.
    pub const fn word(self) -> &'static str {
        match self {
            Transport::Gre => "gre",
            Transport::GreUdp => "gre-udp",
        }
    }
}

/// `[underlay]`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Underlay {
    /// Transport.
    pub transport: Transport,
    /// Underlay MTU.
    pub mtu: u16,
    /// Emit GRE checksums.
    pub checksum: bool,
    /// The instances' MTU (at most `mtu` less the overhead).
    pub instance_mtu: u16,
}

impl Underlay {
    /// Bytes the encapsulation adds: outer IPv4, UDP for gre-udp, GRE with key (and checksum).
    pub const fn overhead(&self) -> u16 {
        let udp = match self.transport {
            Transport::Gre => 0,
            Transport::GreUdp => 8,
        };
        20 + udp + 8 + if self.checksum { 4 } else { 0 }
    }

    /// The MTU every instance gets. By default an Ethernet instance's, 1500 less the
    /// overhead (less if the underlay's is smaller), whatever the underlay's: a jumbo underlay
    /// carries several of an instance's segments in each packet instead (the sender cuts
    /// super-packets at the underlay MTU, the receiver hands them to the instance whole with
    /// a GSO header), as a cloud's 1500-byte instances ride its 9000-byte fabric.
    pub const fn instance_mtu(&self) -> u16 {
        self.instance_mtu
    }

    /// The most one underlay packet carries inside its encapsulation: the underlay MTU less
    /// the overhead (the largest [`Underlay::instance_mtu`], and how much of a super-packet
    /// a jumbo underlay packet takes).
    pub const fn room(&self) -> u16 {
        self.mtu - self.overhead()
    }

    /// The default [`Underlay::instance_mtu`] for an underlay MTU.
    pub const fn default_instance_mtu(&self) -> u16 {
        let mtu = if self.mtu < 1500 { self.mtu } else { 1500 };
        mtu - self.overhead()
    }
}

/// `[conntrack]`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConntrackLimits {
    /// Tracked connections per host.
    pub max_entries: u32,
    /// Tracked connections per instance.
    pub max_per_instance: u32,
    /// Flow-cache slots (a power of two).
    pub flow_cache: u32,
}

/// `[limits]`, validated: the cloud's quotas unless raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Security groups per instance (cloud: 5).
    pub security_groups_per_instance: usize,
    /// Rules per security group and direction (cloud: 100).
    pub rules_per_security_group: usize,
    /// Rules per ACL and direction (cloud: 20).
    pub rules_per_acl: usize,
    /// Routes per table (cloud: 50).
    pub routes_per_table: usize,
    /// Route tables per VPC (cloud: 10).
    pub route_tables_per_vpc: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            security_groups_per_instance: 5,
            rules_per_security_group: 100,
            rules_per_acl: 20,
            routes_per_table: 50,
            route_tables_per_vpc: 10,
        }
    }
}

/// A host: one vpcd process.
#[derive(Debug, Clone)]
pub struct Host {
    /// Name.
    pub name: String,
    /// Underlay address.
    pub address: Ipv4Addr,
    /// Region.
    pub region: String,
}

/// A VPC.
#[derive(Debug, Clone)]
pub struct Vpc {
    /// Name.
    pub name: String,
    /// Owning tenant.
    pub tenant: String,
    /// CIDR.
    pub cidr: Ipv4Net,
    /// GRE key.
    pub key: u32,
    /// True when the key was assigned, not written.
    pub key_assigned: bool,
    /// Region, when given.
    pub region: Option<String>,
    /// The table of subnets that name none (local route only).
    pub default_route_table: RouteTableId,
}

/// A subnet.
#[derive(Debug, Clone)]
pub struct Subnet {
    /// Name.
    pub name: String,
    /// Its VPC.
    pub vpc: VpcId,
    /// CIDR.
    pub cidr: Ipv4Net,
    /// Route table.
    pub route_table: RouteTableId,
    /// Network ACL.
    pub acl: Option<AclId>,
    /// The gateway address (first usable): source of the ICMP errors vpcd sends.
    pub gateway: Ipv4Addr,
}

/// A route table.
#[derive(Debug, Clone)]
pub struct RouteTable {
    /// Name (`default` tables are named after their VPC).
    pub name: String,
    /// Its VPC.
    pub vpc: VpcId,
    /// True for a VPC's implicit default table.
    pub implicit: bool,
    /// Custom routes, indexed.
    pub routes: Routes,
}

/// A network ACL.
#[derive(Debug, Clone)]
pub struct Acl {
    /// Name.
    pub name: String,
    /// Its VPC.
    pub vpc: VpcId,
    /// Inbound rules as written.
    pub ingress: Vec<Rule>,
    /// Outbound rules as written.
    pub egress: Vec<Rule>,
    /// Inbound rules flattened.
    pub ingress_list: RuleList<AclId>,
    /// Outbound rules flattened.
    pub egress_list: RuleList<AclId>,
}

/// A security group.
#[derive(Debug, Clone)]
pub struct SecurityGroup {
    /// Name.
    pub name: String,
    /// Inbound rules as written.
    pub ingress: Vec<Rule>,
    /// Outbound rules as written.
    pub egress: Vec<Rule>,
}

/// Which network an instance lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// A VPC subnet.
    Vpc {
        /// The VPC.
        vpc: VpcId,
        /// The subnet.
        subnet: SubnetId,
    },
    /// The basic (classic) network: the provider's flat pool, tied to a tenant.
    Basic {
        /// The tenant.
        tenant: String,
    },
}

/// An address space: a VPC's, or the basic network's (one for every tenant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Space {
    /// A VPC.
    Vpc(VpcId),
    /// The basic network.
    Basic,
}

/// An instance: one TUN device.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Name, also its TUN device's.
    pub name: String,
    /// Host.
    pub host: HostId,
    /// Network.
    pub network: Network,
    /// Private address (chosen in a VPC, allocated by the provider in the basic network).
    pub ip: Ipv4Addr,
    /// Prefix length of its device's address: its subnet's, or the basic pool's.
    pub prefix: u8,
    /// Elastic IP.
    pub eip: Option<Ipv4Addr>,
    /// Security groups, in order.
    pub security_groups: Vec<SgId>,
    /// Namespace of its TUN device.
    pub netns: Option<String>,
    /// False for an appliance that may send with other sources than its own address (AWS's
    /// source/destination check); such packets stay in its VPC.
    pub source_check: bool,
    /// Its groups' inbound rules, flattened, `sg:` peers resolved in its address space.
    pub ingress_rules: Arc<RuleList<SgId>>,
    /// Its groups' outbound rules, flattened.
    pub egress_rules: Arc<RuleList<SgId>>,
}

impl Instance {
    /// The VPC of a VPC instance.
    pub fn vpc(&self) -> Option<VpcId> {
        match self.network {
            Network::Vpc { vpc, .. } => Some(vpc),
            Network::Basic { .. } => None,
        }
    }

    /// The subnet of a VPC instance.
    pub fn subnet(&self) -> Option<SubnetId> {
        match self.network {
            Network::Vpc { subnet, .. } => Some(subnet),
            Network::Basic { .. } => None,
        }
    }

    /// The address space it lives in.
    pub fn space(&self) -> Space {
        match self.network {
            Network::Vpc { vpc, .. } => Space::Vpc(vpc),
            Network::Basic { .. } => Space::Basic,
        }
    }

    /// True for a basic-network instance.
    pub fn is_basic(&self) -> bool {
        matches!(self.network, Network::Basic { .. })
    }
}

/// `[basic]`: the provider's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BasicNetwork {
    /// The pool every basic-network address comes from.
    pub cidr: Ipv4Net,
    /// The pool's gateway address (first usable): source of vpcd's own ICMP errors.
    pub gateway: Ipv4Addr,
}

/// `[internet]`: where Elastic IPs lead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Internet {
    /// The public addresses of the lab's internet: Elastic IPs and its client.
    pub cidr: Ipv4Net,
    /// The host whose vpcd connects the internet (1:1 NAT happens there).
    pub gateway: HostId,
    /// The namespace of the internet's device (the lab's public client lives there).
    pub netns: Option<String>,
    /// The internet side's own address on that device.
    pub client: Ipv4Addr,
}

/// A basic-network instance linked to a VPC (basic-network interconnect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interconnect {
    /// The basic-network instance.
    pub instance: InstanceId,
    /// The VPC.
    pub vpc: VpcId,
}

/// A peering connection.
#[derive(Debug, Clone)]
pub struct Peering {
    /// Name.
    pub name: String,
    /// The two VPCs.
    pub vpcs: [VpcId; 2],
    /// The GRE keys of its two channels: `keys[i]` carries traffic into `vpcs[i]`.
    pub keys: [u32; 2],
}

/// A path between two address spaces across the underlay. Each has a GRE key of its own, so
/// that a receiver learns from the key alone which space sent a packet and which receives it
/// (docs/semantics.md, 2.1, "the key plan").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// Within one VPC: the VPC's own key.
    Vpc(VpcId),
    /// Across a peering, into `to` (from the peering's other VPC).
    Peering {
        /// The peering.
        peering: PeeringId,
        /// The receiving VPC.
        to: VpcId,
    },
    /// Between a VPC and the basic instances linked to it: into the basic network when
    /// `to_basic`, into the VPC otherwise.
    Interconnect {
        /// The VPC.
        vpc: VpcId,
        /// The direction.
        to_basic: bool,
    },
    /// Between a space and the internet, through the internet gateway host: from the internet
    /// (relayed by the gateway) when `inbound`, towards it otherwise.
    Internet {
        /// The space.
        space: Space,
        /// The direction.
        inbound: bool,
    },
    /// Packets an appliance (`source_check = false`) sends with a source other than its own,
    /// within its VPC.
    Appliance(InstanceId),
    /// Within the basic network: GRE without a key.
    Basic,
}

/// The layer-4 protocol of a load balancer's listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LbProtocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl LbProtocol {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            LbProtocol::Tcp => 6,
            LbProtocol::Udp => 17,
        }
    }

    /// The word used in the topology file.
    pub const fn word(self) -> &'static str {
        match self {
            LbProtocol::Tcp => "tcp",
            LbProtocol::Udp => "udp",
        }
    }
}

/// How a listener picks a backend for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheduler {
    /// Weighted round robin (smooth, as nginx's).
    Wrr,
    /// Weighted least connections: the fewest of this host's open connections per weight.
    Wlc,
    /// Source hash: the client's address picks, by weight.
    Hash,
}

impl Scheduler {
    /// The word used in the topology file.
    pub const fn word(self) -> &'static str {
        match self {
            Scheduler::Wrr => "wrr",
            Scheduler::Wlc => "wlc",
            Scheduler::Hash => "hash",
        }
    }
}

/// A listener's health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    /// Seconds between probes.
    pub interval: u32,
    /// Seconds a probe may take.
    pub timeout: u32,
    /// Successes in a row that make an unhealthy backend healthy.
    pub healthy: u32,
    /// Failures in a row that make a healthy backend unhealthy.
    pub unhealthy: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: 5,
            timeout: 2,
            healthy: 3,
            unhealthy: 3,
        }
    }
}

/// One backend of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Backend {
    /// The instance.
    pub instance: InstanceId,
    /// Its port.
    pub port: u16,
    /// 0-100; 0 takes no new connections.
    pub weight: u8,
}

/// A listener: a protocol and port of the VIP, and the backends it spreads over.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Listener {
    /// TCP or UDP.
    pub protocol: LbProtocol,
    /// The VIP's port.
    pub port: u16,
    /// How a backend is picked.
    pub scheduler: Scheduler,
    /// The backends, in the file's order.
    pub backends: Vec<Backend>,
    /// The health check.
    pub health: HealthCheck,
}

/// A Cloud Load Balancer (layer 4): a VIP in one network, its listeners, and an optional
/// Elastic IP that makes it public. It serves one network only: its backends are instances
/// of its VPC, or basic instances of its tenant (docs/semantics.md 2.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadBalancer {
    /// Name.
    pub name: String,
    /// Its network: a VPC subnet, or the basic network with a tenant.
    pub network: Network,
    /// The virtual IP, in its subnet or the basic pool.
    pub vip: Ipv4Addr,
    /// An Elastic IP: a public load balancer.
    pub eip: Option<Ipv4Addr>,
    /// Listeners.
    pub listeners: Vec<Listener>,
}

impl LoadBalancer {
    /// The address space its VIP lives in.
    pub fn space(&self) -> Space {
        match self.network {
            Network::Vpc { vpc, .. } => Space::Vpc(vpc),
            Network::Basic { .. } => Space::Basic,
        }
    }

    /// The listener for `protocol` and `port`.
    pub fn listener(&self, protocol: u8, port: u16) -> Option<(usize, &Listener)> {
        self.listeners
            .iter()
            .enumerate()
            .find(|(_, l)| l.protocol.number() == protocol && l.port == port)
    }
}

/// What an `[[expect]]` sends to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectTarget {
    /// An instance, by id.
    Instance(InstanceId),
    /// An address.
    Address(Ipv4Addr),
}

/// Where an `[[expect]]` sends from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectSource {
    /// An instance.
    Instance(InstanceId),
    /// The internet's client.
    Internet,
}

/// One expectation the lab checks with real traffic.
#[derive(Debug, Clone)]
pub struct Expect {
    /// Sender.
    pub from: ExpectSource,
    /// Target.
    pub to: ExpectTarget,
    /// ICMP, TCP or UDP.
    pub protocol: Protocol,
    /// Port for TCP and UDP.
    pub port: Option<u16>,
    /// Whether the traffic must get through.
    pub reach: bool,
    /// Line in the file.
    pub line: usize,
}

/// A validated topology.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The file it came from (for messages).
    pub file: String,
    /// `[underlay]`.
    pub underlay: Underlay,
    /// `[conntrack]`.
    pub conntrack: ConntrackLimits,
    /// `[limits]`.
    pub limits: Limits,
    /// Hosts.
    pub hosts: Vec<Host>,
    /// VPCs.
    pub vpcs: Vec<Vpc>,
    /// Subnets.
    pub subnets: Vec<Subnet>,
    /// Route tables, the implicit default ones included.
    pub route_tables: Vec<RouteTable>,
    /// Network ACLs.
    pub acls: Vec<Acl>,
    /// Security groups.
    pub security_groups: Vec<SecurityGroup>,
    /// Instances.
    pub instances: Vec<Instance>,
    /// Peerings.
    pub peerings: Vec<Peering>,
    /// `[basic]`.
    pub basic: Option<BasicNetwork>,
    /// `[internet]`.
    pub internet: Option<Internet>,
    /// Basic-network interconnects.
    pub interconnects: Vec<Interconnect>,
    /// Expectations.
    pub expects: Vec<Expect>,
    /// Load balancers.
    pub load_balancers: Vec<LoadBalancer>,
    /// The provider's allocations this topology uses: those of its lock file, and any it made
    /// (compare with the lock it was compiled with to know whether the lock must be written).
    pub allocations: super::lock::Allocations,
    /// The allocations the lock it was compiled with does not record, for people: empty when
    /// the lock covers it. A daemon refuses a topology with unlocked allocations; `vpcd check`
    /// writes them.
    pub unlocked: Vec<String>,
    pub(crate) index: Index,
}

/// Lookups the pipeline makes per packet (slow path) or per flow.
#[derive(Debug, Clone, Default)]
pub(crate) struct Index {
    /// Underlay addresses and their hosts, sorted by address.
    pub host_addresses: Vec<(u32, HostId)>,
    pub vpc_by_key: HashMap<u32, VpcId>,
    pub channel_by_key: HashMap<u32, Channel>,
    pub key_by_channel: HashMap<Channel, u32>,
    pub instance_by_address: HashMap<(Space, Ipv4Addr), InstanceId>,
    pub instance_by_eip: HashMap<Ipv4Addr, InstanceId>,
    pub linked_vpc: HashMap<InstanceId, VpcId>,
    pub lb_by_vip: HashMap<(Space, Ipv4Addr), LbId>,
    pub lb_by_eip: HashMap<Ipv4Addr, LbId>,
    /// Backend endpoints: (space, protocol, address, port).
    pub backends: hashbrown::HashSet<(Space, u8, Ipv4Addr, u16)>,
    /// Every address a load balancer's flows can carry: VIPs, their EIPs, backends'.
    pub lb_addresses: hashbrown::HashSet<u32>,
}

impl Topology {
    /// The host with this underlay address.
    #[inline]
    pub fn host_by_address(&self, a: Ipv4Addr) -> Option<HostId> {
        // Every packet asks (no inner packet may be addressed to the underlay): a sorted
        // list answers a handful of hosts faster than a hash map.
        let key = u32::from(a);
        let h = &self.index.host_addresses;
        if h.len() <= 16 {
            h.iter().find(|(addr, _)| *addr == key).map(|(_, id)| *id)
        } else {
            h.binary_search_by_key(&key, |(addr, _)| *addr)
                .ok()
                .map(|i| h[i].1)
        }
    }

    /// The VPC with this GRE key.
    #[inline]
    pub fn vpc_by_key(&self, key: u32) -> Option<VpcId> {
        self.index.vpc_by_key.get(&key).copied()
    }

    /// The channel a GRE key names.
    #[inline]
    pub fn channel(&self, key: u32) -> Option<Channel> {
        self.index.channel_by_key.get(&key).copied()
    }

    /// The GRE key of a channel: `None` for the basic network's (no key), and for a channel
    /// this topology does not have.
    #[inline]
    pub fn key_of(&self, channel: Channel) -> Option<u32> {
        self.index.key_by_channel.get(&channel).copied()
    }

    /// Every channel with a key, by key.
    pub fn channels(&self) -> impl Iterator<Item = (u32, Channel)> + '_ {
        self.index.channel_by_key.iter().map(|(k, c)| (*k, *c))
    }

    /// A channel as people name it (`vpc:NAME`, `peering:NAME>VPC`, `interconnect:VPC>basic`,
    /// `internet:VPC>in`, `appliance:NAME`, `basic`): its identity across topologies.
    pub fn channel_name(&self, c: Channel) -> String {
        let space = |s: Space| match s {
            Space::Vpc(v) => self.vpc(v).name.clone(),
            Space::Basic => "basic".to_string(),
        };
        match c {
            Channel::Vpc(v) => format!("vpc:{}", self.vpc(v).name),
            Channel::Peering { peering, to } => format!(
                "peering:{}>{}",
                self.peerings[peering.index()].name,
                self.vpc(to).name
            ),
            Channel::Interconnect { vpc, to_basic } => format!(
                "interconnect:{}>{}",
                self.vpc(vpc).name,
                if to_basic { "basic" } else { "vpc" }
            ),
            Channel::Internet { space: s, inbound } => {
                format!(
                    "internet:{}>{}",
                    space(s),
                    if inbound { "in" } else { "out" }
                )
            }
            Channel::Appliance(i) => format!("appliance:{}", self.instance(i).name),
            Channel::Basic => "basic".to_string(),
        }
    }

    /// The instance of `vpc` with address `ip`.
    #[inline]
    pub fn instance_at(&self, vpc: VpcId, ip: Ipv4Addr) -> Option<InstanceId> {
        self.index
            .instance_by_address
            .get(&(Space::Vpc(vpc), ip))
            .copied()
    }

    /// The instance with address `ip` in address space `space`.
    #[inline]
    pub fn instance_in(&self, space: Space, ip: Ipv4Addr) -> Option<InstanceId> {
        self.index.instance_by_address.get(&(space, ip)).copied()
    }

    /// The instance an Elastic IP is bound to.
    #[inline]
    pub fn eip_owner(&self, eip: Ipv4Addr) -> Option<InstanceId> {
        self.index.instance_by_eip.get(&eip).copied()
    }

    /// The load balancer whose VIP `vip` is in `space`.
    #[inline]
    pub fn lb_at(&self, space: Space, vip: Ipv4Addr) -> Option<LbId> {
        self.index.lb_by_vip.get(&(space, vip)).copied()
    }

    /// The public load balancer with Elastic IP `eip`.
    #[inline]
    pub fn lb_by_eip(&self, eip: Ipv4Addr) -> Option<LbId> {
        self.index.lb_by_eip.get(&eip).copied()
    }

    /// A load balancer.
    #[inline]
    pub fn lb(&self, id: LbId) -> &LoadBalancer {
        &self.load_balancers[id.index()]
    }

    /// True when `addr:port` of `space` is a backend of some listener for `protocol`.
    #[inline]
    pub fn is_backend(&self, space: Space, protocol: u8, addr: Ipv4Addr, port: u16) -> bool {
        !self.index.backends.is_empty()
            && self.index.backends.contains(&(space, protocol, addr, port))
    }

    /// True for an address a load-balanced flow can carry (a VIP, a load balancer's EIP, a
    /// backend's address, in any space): the daemon's workers send such pairs to one worker,
    /// where the balancer's sessions are.
    #[inline]
    pub fn lb_address(&self, addr: u32) -> bool {
        !self.index.lb_addresses.is_empty() && self.index.lb_addresses.contains(&addr)
    }

    /// The VPC a basic-network instance is linked to.
    #[inline]
    pub fn linked_vpc(&self, instance: InstanceId) -> Option<VpcId> {
        self.index.linked_vpc.get(&instance).copied()
    }

    /// The host with this name.
    pub fn host_named(&self, name: &str) -> Option<HostId> {
        self.hosts
            .iter()
            .position(|h| h.name == name)
            .map(|i| HostId(i as u32))
    }

    /// The instance with this name.
    pub fn instance_named(&self, name: &str) -> Option<InstanceId> {
        self.instances
            .iter()
            .position(|i| i.name == name)
            .map(|i| InstanceId(i as u32))
    }

    /// An instance.
    #[inline]
    pub fn instance(&self, id: InstanceId) -> &Instance {
        &self.instances[id.index()]
    }

    /// A host.
    #[inline]
    pub fn host(&self, id: HostId) -> &Host {
        &self.hosts[id.index()]
    }

    /// A VPC.
    #[inline]
    pub fn vpc(&self, id: VpcId) -> &Vpc {
        &self.vpcs[id.index()]
    }

    /// A subnet.
    #[inline]
    pub fn subnet(&self, id: SubnetId) -> &Subnet {
        &self.subnets[id.index()]
    }

    /// Instances placed on `host`.
    pub fn instances_on(&self, host: HostId) -> impl Iterator<Item = InstanceId> + '_ {
        self.instances
            .iter()
            .enumerate()
            .filter(move |(_, i)| i.host == host)
            .map(|(n, _)| InstanceId(n as u32))
    }
}
