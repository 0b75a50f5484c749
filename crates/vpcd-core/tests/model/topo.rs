//! Random topologies: a small spec drawn by proptest, rendered as topology TOML.

use std::fmt::Write as _;

use proptest::prelude::*;
use proptest::sample::Index;

pub const HOSTS: [&str; 3] = ["192.0.2.1", "192.0.2.2", "192.0.2.3"];
/// VPC CIDRs: 10.0.0.0/16 twice as likely, so that VPCs often overlap.
pub const VPC_CIDRS: [(u8, u8); 4] = [(10, 0), (10, 0), (10, 1), (172, 16)];
pub const KEYS: [u32; 6] = [1001, 2002, 0, 7, u32::MAX, 65536];
/// Host parts of instance addresses (never .0, .1 or .255 of a /24).
pub const IP_HOSTS: [u8; 6] = [10, 11, 20, 4, 100, 254];
/// Route destinations; `subnet:N` is the VPC's own subnet N (a subnet route, to an appliance).
pub const ROUTE_DESTS: [&str; 11] = [
    "subnet:1",
    "subnet:2",
    "subnet:3",
    "198.51.100.0/24",
    "0.0.0.0/0",
    "203.0.113.0/25",
    "203.0.113.0/24",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "198.51.100.128/25",
    "8.8.8.8/32",
];
pub const RULE_CIDRS: [&str; 10] = [
    "0.0.0.0/0",
    "10.0.0.0/16",
    "10.0.1.0/24",
    "10.0.2.0/24",
    "10.0.1.10",
    "10.0.2.20/32",
    "198.51.100.0/24",
    "10.1.0.0/16",
    "172.16.0.0/12",
    "10.0.0.0/8",
];
/// Port fields: absent, "all", or (TCP/UDP only) a port, a range or a list.
pub const PORTS: [Option<&str>; 10] = [
    None,
    Some("\"all\""),
    Some("80"),
    Some("\"22\""),
    Some("\"1000-2000\""),
    Some("\"22,80,443\""),
    Some("\"5432, 40000\""),
    Some("\"40000-40010\""),
    Some("4754"),
    Some("\"1-1024\""),
];
pub const PROTOS: [&str; 4] = ["all", "tcp", "udp", "icmp"];

/// `[conntrack]` limits: (max_entries, max_per_instance).
pub fn ct_limits() -> impl Strategy<Value = (u32, u32)> {
    prop_oneof![
        3 => Just((1_000_000u32, 1_000_000u32)),
        2 => (
            prop::sample::select(vec![16u32, 17, 24]),
            prop::sample::select(vec![1u32, 2, 3, 5]),
        ),
        1 => (
            prop::sample::select(vec![16u32, 17, 24]),
            prop::sample::select(vec![8u32, 16, 24]),
        ),
    ]
}

fn render_conntrack(
    out: &mut String,
    (max_entries, max_per_instance): (u32, u32),
    flow_cache: u32,
) {
    let _ = writeln!(
        out,
        "[conntrack]\nmax_entries = {max_entries}\nmax_per_instance = {max_per_instance}\nflow_cache = {flow_cache}\n"
    );
}

/// The instance a route's `instance:` next hop names: appliances (source check off) twice as
/// likely as the others.
fn hop_instance(i: &Index, members: &[usize], appliances: &[usize]) -> String {
    let both: Vec<usize> = appliances.iter().chain(members).copied().collect();
    format!("instance:i{}", both[i.index(both.len())])
}

#[derive(Debug, Clone)]
pub enum PeerSpec {
    Cidr(usize),
    Sg(Index),
}

#[derive(Debug, Clone)]
pub struct RuleSpec {
    pub accept: bool,
    pub proto: usize,
    pub ports: usize,
    pub peer: PeerSpec,
}

#[derive(Debug, Clone)]
pub struct RulesSpec {
    pub rules: Vec<RuleSpec>,
    /// Append "accept all to/from 0.0.0.0/0".
    pub tail: bool,
}

#[derive(Debug, Clone)]
pub enum Hop {
    Drop,
    Internet,
    Instance(Index),
    Peering,
}

#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub dest: usize,
    pub hop: Hop,
}

#[derive(Debug, Clone)]
pub struct SubnetSpec {
    pub table: Option<Index>,
    pub acl: Option<Index>,
}

#[derive(Debug, Clone)]
pub struct VpcSpec {
    pub cidr: usize,
    pub subnets: Vec<SubnetSpec>,
    pub tables: Vec<Vec<RouteSpec>>,
    pub acls: Vec<(RulesSpec, RulesSpec)>,
}

#[derive(Debug, Clone)]
pub struct InstSpec {
    pub host: Index,
    pub subnet: Index,
    pub ip: usize,
    pub sgs: Vec<Index>,
    /// `source_check = false`.
    pub appliance: bool,
}

#[derive(Debug, Clone)]
pub struct TopoSpec {
    pub hosts: usize,
    pub udp: bool,
    pub checksum: bool,
    pub small_mtu: bool,
    pub flow_cache: u32,
    pub key_rot: usize,
    pub limits: (u32, u32),
    pub vpcs: Vec<VpcSpec>,
    pub sgs: Vec<(RulesSpec, RulesSpec)>,
    pub instances: Vec<InstSpec>,
}

fn rule(sg: bool) -> impl Strategy<Value = RuleSpec> {
    let peer = if sg {
        prop_oneof![
            3 => (0..RULE_CIDRS.len()).prop_map(PeerSpec::Cidr),
            1 => any::<Index>().prop_map(PeerSpec::Sg),
        ]
        .boxed()
    } else {
        (0..RULE_CIDRS.len()).prop_map(PeerSpec::Cidr).boxed()
    };
    (
        prop::bool::weighted(0.7),
        0..PROTOS.len(),
        0..PORTS.len(),
        peer,
    )
        .prop_map(|(accept, proto, ports, peer)| RuleSpec {
            accept,
            proto,
            ports,
            peer,
        })
}

fn rules(sg: bool) -> impl Strategy<Value = RulesSpec> {
    (
        prop::collection::vec(rule(sg), 0..4),
        prop::bool::weighted(0.75),
    )
        .prop_map(|(rules, tail)| RulesSpec { rules, tail })
}

fn route() -> impl Strategy<Value = RouteSpec> {
    let hop = prop_oneof![
        2 => Just(Hop::Drop),
        1 => Just(Hop::Internet),
        3 => any::<Index>().prop_map(Hop::Instance),
        1 => Just(Hop::Peering),
    ];
    (0..ROUTE_DESTS.len(), hop).prop_map(|(dest, hop)| RouteSpec { dest, hop })
}

fn vpc() -> impl Strategy<Value = VpcSpec> {
    let subnet = (
        prop::option::weighted(0.5, any::<Index>()),
        prop::option::weighted(0.4, any::<Index>()),
    )
        .prop_map(|(table, acl)| SubnetSpec { table, acl });
    (
        0..VPC_CIDRS.len(),
        prop::collection::vec(subnet, 1..=3),
        prop::collection::vec(prop::collection::vec(route(), 0..=4), 0..=2),
        prop::collection::vec((rules(false), rules(false)), 0..=2),
    )
        .prop_map(|(cidr, subnets, tables, acls)| VpcSpec {
            cidr,
            subnets,
            tables,
            acls,
        })
}

pub fn topo() -> impl Strategy<Value = TopoSpec> {
    let inst = (
        any::<Index>(),
        any::<Index>(),
        prop_oneof![3 => 0..2usize, 1 => 0..IP_HOSTS.len()],
        prop::collection::vec(any::<Index>(), 1..=2),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(host, subnet, ip, sgs, appliance)| InstSpec {
            host,
            subnet,
            ip,
            sgs,
            appliance,
        });
    (
        (
            2..=3usize,
            any::<bool>(),
            prop::bool::weighted(0.3),
            prop::bool::weighted(0.3),
            prop_oneof![Just(16u32), Just(65536u32)],
            0..KEYS.len(),
            ct_limits(),
        ),
        prop::collection::vec(vpc(), 1..=3),
        prop::collection::vec((rules(true), rules(true)), 1..=3),
        prop::collection::vec(inst, 2..=6),
    )
        .prop_map(
            |(
                (hosts, udp, checksum, small_mtu, flow_cache, key_rot, limits),
                vpcs,
                sgs,
                instances,
            )| {
                TopoSpec {
                    hosts,
                    udp,
                    checksum,
                    small_mtu,
                    flow_cache,
                    key_rot,
                    limits,
                    vpcs,
                    sgs,
                    instances,
                }
            },
        )
}

/// An instance as rendered.
#[derive(Debug, Clone)]
pub struct Placed {
    pub host: usize,
    pub vpc: usize,
    pub subnet: usize,
    pub ip: [u8; 4],
}

fn render_rules(out: &mut String, field: &str, peer_key: &str, r: &RulesSpec, sgs: usize) {
    render_rules_in(out, field, peer_key, r, sgs, &RULE_CIDRS);
}

fn render_rules_in(
    out: &mut String,
    field: &str,
    peer_key: &str,
    r: &RulesSpec,
    sgs: usize,
    cidrs: &[&str],
) {
    let _ = writeln!(out, "{field} = [");
    let all = r.rules.iter().map(|x| {
        let proto = PROTOS[x.proto];
        let ports = match PORTS[x.ports] {
            Some(p) if matches!(proto, "tcp" | "udp") || x.ports == 1 => format!(", port = {p}"),
            _ => String::new(),
        };
        let peer = match &x.peer {
            PeerSpec::Cidr(c) => cidrs[*c].to_string(),
            PeerSpec::Sg(i) => format!("sg:sg{}", i.index(sgs)),
        };
        let action = if x.accept { "accept" } else { "drop" };
        format!(
            "  {{ action = \"{action}\", protocol = \"{proto}\"{ports}, {peer_key} = \"{peer}\" }},"
        )
    });
    for line in all {
        let _ = writeln!(out, "{line}");
    }
    if r.tail {
        let _ = writeln!(
            out,
            "  {{ action = \"accept\", protocol = \"all\", {peer_key} = \"0.0.0.0/0\" }},"
        );
    }
    let _ = writeln!(out, "]");
}

/// What a VPC's routes may name: its instances, its appliances, its peering.
struct Hops<'a> {
    members: &'a [usize],
    appliances: &'a [usize],
    peering: bool,
}

/// The routes of one table of the VPC `a.b.0.0/16` with `subnets` subnets (`subnet:N`
/// destinations only towards an appliance; duplicates and other destinations inside the VPC
/// left out).
fn render_routes(
    out: &mut String,
    (a, b): (u8, u8),
    subnets: usize,
    routes: &[RouteSpec],
    hops: &Hops<'_>,
) {
    let vnet: ipnet::Ipv4Net = format!("{a}.{b}.0.0/16").parse().unwrap();
    let mut seen = Vec::new();
    for r in routes {
        let subnet_route = ROUTE_DESTS[r.dest].starts_with("subnet:");
        let dest = match ROUTE_DESTS[r.dest].strip_prefix("subnet:") {
            Some(k) => {
                let k: usize = k.parse().unwrap();
                let to_appliance = matches!(r.hop, Hop::Instance(_)) && !hops.members.is_empty();
                if k > subnets || !to_appliance {
                    continue;
                }
                format!("{a}.{b}.{k}.0/24")
            }
            None => ROUTE_DESTS[r.dest].to_string(),
        };
        let net: ipnet::Ipv4Net = dest.parse().unwrap();
        if (vnet.contains(&net) && !subnet_route) || seen.contains(&dest) {
            continue;
        }
        seen.push(dest.clone());
        let hop = match &r.hop {
            Hop::Drop => "drop".to_string(),
            Hop::Internet => "internet".to_string(),
            Hop::Instance(i) if !hops.members.is_empty() => {
                hop_instance(i, hops.members, hops.appliances)
            }
            Hop::Instance(_) => "drop".to_string(),
            Hop::Peering if hops.peering => "peering:p0".to_string(),
            Hop::Peering => "internet".to_string(),
        };
        let _ = writeln!(
            out,
            "  {{ destination = \"{dest}\", next_hop = \"{hop}\" }},"
        );
    }
}

/// The topology text, and where each instance went. Instance 0's host is "this host".
pub fn render(t: &TopoSpec) -> (String, Vec<Placed>) {
    let mut out = String::new();
    let transport = if t.udp { "gre-udp" } else { "gre" };
    let overhead = if t.udp { 36 } else { 28 } + if t.checksum { 4 } else { 0 };
    let mtu = if t.small_mtu { overhead + 576 } else { 1500 };
    let _ = writeln!(
        out,
        "[underlay]\ntransport = \"{transport}\"\nmtu = {mtu}\nchecksum = {}\n",
        t.checksum
    );
    render_conntrack(&mut out, t.limits, t.flow_cache);
    for (h, address) in HOSTS.iter().enumerate().take(t.hosts) {
        let _ = writeln!(out, "[[host]]\nname = \"h{h}\"\naddress = \"{address}\"\n");
    }
    // Subnets, flattened: (vpc, index in vpc).
    let subnets: Vec<(usize, usize)> = t
        .vpcs
        .iter()
        .enumerate()
        .flat_map(|(v, s)| (0..s.subnets.len()).map(move |j| (v, j)))
        .collect();
    // Instances first (routes name them).
    let mut placed: Vec<Placed> = Vec::new();
    for i in &t.instances {
        let (vpc, j) = subnets[i.subnet.index(subnets.len())];
        let (a, b) = VPC_CIDRS[t.vpcs[vpc].cidr];
        let mut k = i.ip;
        let ip = loop {
            let ip = [a, b, j as u8 + 1, IP_HOSTS[k % IP_HOSTS.len()]];
            if !placed.iter().any(|p| p.vpc == vpc && p.ip == ip) {
                break ip;
            }
            k += 1;
        };
        placed.push(Placed {
            host: i.host.index(t.hosts),
            vpc,
            subnet: subnets.iter().position(|s| *s == (vpc, j)).unwrap(),
            ip,
        });
    }
    // Instance 0 decides this host; make sure it is host 0 by naming (we keep indexes).
    let peering = {
        let mut found = None;
        'outer: for x in 0..t.vpcs.len() {
            for y in x + 1..t.vpcs.len() {
                if VPC_CIDRS[t.vpcs[x].cidr] != VPC_CIDRS[t.vpcs[y].cidr] {
                    found = Some((x, y));
                    break 'outer;
                }
            }
        }
        found
    };
    for (v, spec) in t.vpcs.iter().enumerate() {
        let (a, b) = VPC_CIDRS[spec.cidr];
        let _ = writeln!(
            out,
            "[[vpc]]\nname = \"v{v}\"\ntenant = \"t{v}\"\ncidr = \"{a}.{b}.0.0/16\"\nkey = {}\n",
            KEYS[(t.key_rot + v) % KEYS.len()]
        );
        for (j, s) in spec.subnets.iter().enumerate() {
            let _ = writeln!(
                out,
                "[[subnet]]\nname = \"v{v}s{j}\"\nvpc = \"v{v}\"\ncidr = \"{a}.{b}.{}.0/24\"",
                j + 1
            );
            if let Some(ti) = &s.table
                && !spec.tables.is_empty()
            {
                let _ = writeln!(
                    out,
                    "route_table = \"v{v}rt{}\"",
                    ti.index(spec.tables.len())
                );
            }
            if let Some(ai) = &s.acl
                && !spec.acls.is_empty()
            {
                let _ = writeln!(out, "acl = \"v{v}acl{}\"", ai.index(spec.acls.len()));
            }
            let _ = writeln!(out);
        }
        let members: Vec<usize> = (0..placed.len()).filter(|&i| placed[i].vpc == v).collect();
        let appliances: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&i| t.instances[i].appliance)
            .collect();
        let in_peering = peering.is_some_and(|(x, y)| x == v || y == v);
        for (n, routes) in spec.tables.iter().enumerate() {
            let _ = writeln!(
                out,
                "[[route_table]]\nname = \"v{v}rt{n}\"\nvpc = \"v{v}\"\nroutes = ["
            );
            let hops = Hops {
                members: &members,
                appliances: &appliances,
                peering: in_peering,
            };
            render_routes(&mut out, (a, b), spec.subnets.len(), routes, &hops);
            let _ = writeln!(out, "]\n");
        }
        for (n, (ingress, egress)) in spec.acls.iter().enumerate() {
            let _ = writeln!(out, "[[acl]]\nname = \"v{v}acl{n}\"\nvpc = \"v{v}\"");
            render_rules(&mut out, "ingress", "cidr", ingress, t.sgs.len());
            render_rules(&mut out, "egress", "cidr", egress, t.sgs.len());
            let _ = writeln!(out);
        }
    }
    if let Some((x, y)) = peering {
        let _ = writeln!(
            out,
            "[[peering]]\nname = \"p0\"\nvpcs = [\"v{x}\", \"v{y}\"]\n"
        );
    }
    for (g, (ingress, egress)) in t.sgs.iter().enumerate() {
        let _ = writeln!(out, "[[security_group]]\nname = \"sg{g}\"");
        render_rules(&mut out, "ingress", "source", ingress, t.sgs.len());
        render_rules(&mut out, "egress", "destination", egress, t.sgs.len());
        let _ = writeln!(out);
    }
    for (n, (i, p)) in t.instances.iter().zip(&placed).enumerate() {
        let (vpc, j) = subnets[p.subnet];
        let mut groups: Vec<usize> = Vec::new();
        for g in &i.sgs {
            let g = g.index(t.sgs.len());
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        let groups: Vec<String> = groups.iter().map(|g| format!("\"sg{g}\"")).collect();
        let [a, b, c, d] = p.ip;
        let _ = writeln!(
            out,
            "[[instance]]\nname = \"i{n}\"\nhost = \"h{}\"\nsubnet = \"v{vpc}s{j}\"\nip = \"{a}.{b}.{c}.{d}\"\nsecurity_groups = [{}]{}\n",
            p.host,
            groups.join(", "),
            if i.appliance {
                "\nsource_check = false"
            } else {
                ""
            }
        );
    }
    (out, placed)
}

// ----- the cloud: the basic network, Elastic IPs, peering, interconnects ---------------------

pub const CLOUD_HOSTS: [&str; 4] = ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"];
/// The peer of VPC 0 (10.0.0.0/16): never overlapping it.
pub const PEER_CIDRS: [(u8, u8); 2] = [(10, 1), (172, 16)];
/// The third VPC: overlapping VPC 0, apart, or overlapping the basic pool.
pub const THIRD_CIDRS: [(u8, u8); 4] = [(10, 0), (10, 2), (10, 3), (10, 128)];
pub const POOLS: [&str; 3] = ["10.128.0.0/16", "10.128.0.0/28", "192.168.0.0/24"];
pub const CLOUD_RULE_CIDRS: [&str; 10] = [
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.0.0.0/16",
    "10.1.0.0/16",
    "10.128.0.0/16",
    "203.0.113.0/24",
    "198.51.100.0/24",
    "203.0.113.10/31",
    "172.16.0.0/12",
    "192.168.0.0/16",
];

/// A route destination of the cloud generator: a literal, or one named by its role.
#[derive(Debug, Clone, Copy)]
pub enum CDest {
    Lit(&'static str),
    /// The peer VPC's CIDR (the route a peering needs).
    PeerVpc,
    /// The peer VPC's first subnet.
    PeerSubnet,
    /// The third VPC's CIDR (through the peering: not transitive).
    Third,
    /// The basic pool.
    Pool,
    /// The VPC's own subnet N (a subnet route: only to an appliance).
    OwnSubnet(u8),
}

pub const CLOUD_DESTS: [CDest; 12] = [
    CDest::OwnSubnet(1),
    CDest::OwnSubnet(2),
    CDest::Lit("0.0.0.0/0"),
    CDest::Lit("198.51.100.0/24"),
    CDest::Lit("203.0.113.0/24"),
    CDest::Lit("8.8.8.8/32"),
    CDest::Lit("10.0.0.0/8"),
    CDest::PeerVpc,
    CDest::PeerSubnet,
    CDest::Third,
    CDest::Pool,
    CDest::Lit("203.0.113.0/25"),
];

#[derive(Debug, Clone)]
pub struct CloudVpcSpec {
    pub subnets: Vec<SubnetSpec>,
    pub tables: Vec<Vec<RouteSpec>>,
    pub acls: Vec<(RulesSpec, RulesSpec)>,
    /// Route the peer's CIDR to the peering in every table (VPCs 0 and 1).
    pub peer_route: bool,
}

#[derive(Debug, Clone)]
pub struct CloudInstSpec {
    pub host: Index,
    pub subnet: Index,
    pub ip: usize,
    pub sgs: Vec<Index>,
    pub eip: bool,
    /// `source_check = false`.
    pub appliance: bool,
}

#[derive(Debug, Clone)]
pub struct BasicInstSpec {
    pub host: Index,
    /// The second tenant (when there are two).
    pub tenant: bool,
    pub sgs: Vec<Index>,
    pub eip: bool,
    /// Linked to its tenant's VPC.
    pub link: bool,
}

#[derive(Debug, Clone)]
pub struct CloudSpec {
    pub hosts: usize,
    pub regions: bool,
    pub gateway: Index,
    pub this: Index,
    pub udp: bool,
    pub checksum: bool,
    pub flow_cache: u32,
    pub key_rot: usize,
    pub limits: (u32, u32),
    /// When the third VPC overlaps VPC 0: an instance of the third VPC with the address and
    /// host of one of VPC 0's (both peered with VPC 1).
    pub twin: Option<Index>,
    /// VPC 0's first table starts with `0.0.0.0/0 -> instance:` an appliance (a NAT).
    pub nat_route: bool,
    pub peer: usize,
    pub third: Option<usize>,
    /// The third VPC belongs to tenant t0 (else t2).
    pub third_t0: bool,
    pub pool: usize,
    pub two_tenants: bool,
    pub client: bool,
    /// A second peering, between VPC 1 and the third VPC (which may overlap VPC 0).
    pub peer2: bool,
    /// VPC 1 lists its peering to the third VPC first (where both route the same CIDR, the
    /// first wins).
    pub peer2_first: bool,
    pub vpcs: Vec<CloudVpcSpec>,
    pub sgs: Vec<(RulesSpec, RulesSpec)>,
    pub instances: Vec<CloudInstSpec>,
    pub basics: Vec<BasicInstSpec>,
}

fn cloud_rule(sg: bool) -> impl Strategy<Value = RuleSpec> {
    let peer = if sg {
        prop_oneof![
            3 => (0..CLOUD_RULE_CIDRS.len()).prop_map(PeerSpec::Cidr),
            1 => any::<Index>().prop_map(PeerSpec::Sg),
        ]
        .boxed()
    } else {
        (0..CLOUD_RULE_CIDRS.len()).prop_map(PeerSpec::Cidr).boxed()
    };
    (
        prop::bool::weighted(0.7),
        0..PROTOS.len(),
        0..PORTS.len(),
        peer,
    )
        .prop_map(|(accept, proto, ports, peer)| RuleSpec {
            accept,
            proto,
            ports,
            peer,
        })
}

/// Rules that accept more often than the VPC generator's, so that connections get through
/// the gateway and back.
fn cloud_rules(sg: bool) -> impl Strategy<Value = RulesSpec> {
    (
        prop::collection::vec(cloud_rule(sg), 0..3),
        prop::bool::weighted(0.85),
    )
        .prop_map(|(rules, tail)| RulesSpec { rules, tail })
}

fn cloud_route() -> impl Strategy<Value = RouteSpec> {
    let hop = prop_oneof![
        1 => Just(Hop::Drop),
        3 => Just(Hop::Internet),
        2 => any::<Index>().prop_map(Hop::Instance),
        3 => Just(Hop::Peering),
    ];
    (0..CLOUD_DESTS.len(), hop).prop_map(|(dest, hop)| RouteSpec { dest, hop })
}

fn cloud_vpc() -> impl Strategy<Value = CloudVpcSpec> {
    let subnet = (
        prop::option::weighted(0.85, any::<Index>()),
        prop::option::weighted(0.3, any::<Index>()),
    )
        .prop_map(|(table, acl)| SubnetSpec { table, acl });
    (
        prop::collection::vec(subnet, 1..=2),
        prop::collection::vec(prop::collection::vec(cloud_route(), 0..=3), 1..=2),
        prop::collection::vec((cloud_rules(false), cloud_rules(false)), 0..=1),
        prop::bool::weighted(0.8),
    )
        .prop_map(|(subnets, tables, acls, peer_route)| CloudVpcSpec {
            subnets,
            tables,
            acls,
            peer_route,
        })
}

pub fn cloud() -> impl Strategy<Value = CloudSpec> {
    let inst = (
        any::<Index>(),
        any::<Index>(),
        prop_oneof![3 => 0..2usize, 1 => 0..IP_HOSTS.len()],
        prop::collection::vec(any::<Index>(), 1..=2),
        prop::bool::weighted(0.5),
        prop::bool::weighted(0.25),
    )
        .prop_map(|(host, subnet, ip, sgs, eip, appliance)| CloudInstSpec {
            host,
            subnet,
            ip,
            sgs,
            eip,
            appliance,
        });
    let basic = (
        any::<Index>(),
        any::<bool>(),
        prop::collection::vec(any::<Index>(), 1..=2),
        prop::bool::weighted(0.5),
        prop::bool::weighted(0.5),
    )
        .prop_map(|(host, tenant, sgs, eip, link)| BasicInstSpec {
            host,
            tenant,
            sgs,
            eip,
            link,
        });
    (
        (
            3..=4usize,
            prop::bool::weighted(0.35),
            any::<Index>(),
            any::<Index>(),
            any::<bool>(),
            prop::bool::weighted(0.3),
            prop_oneof![Just(16u32), Just(65536u32)],
            0..KEYS.len(),
            ct_limits(),
            prop::option::weighted(0.5, any::<Index>()),
            prop::bool::weighted(0.25),
        ),
        (
            0..PEER_CIDRS.len(),
            prop::option::weighted(
                0.6,
                prop_oneof![2 => Just(0usize), 3 => 0..THIRD_CIDRS.len()],
            ),
            any::<bool>(),
            0..POOLS.len(),
            prop::bool::weighted(0.6),
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.4),
            any::<bool>(),
        ),
        prop::collection::vec(cloud_vpc(), 3),
        prop::collection::vec((cloud_rules(true), cloud_rules(true)), 1..=3),
        prop::collection::vec(inst, 2..=5),
        prop::collection::vec(basic, 2..=4),
    )
        .prop_map(
            |(
                (
                    hosts,
                    regions,
                    gateway,
                    this,
                    udp,
                    checksum,
                    flow_cache,
                    key_rot,
                    limits,
                    twin,
                    nat_route,
                ),
                (peer, third, third_t0, pool, two_tenants, client, peer2, peer2_first),
                vpcs,
                sgs,
                instances,
                basics,
            )| CloudSpec {
                hosts,
                regions,
                gateway,
                this,
                udp,
                checksum,
                flow_cache,
                key_rot,
                limits,
                twin,
                nat_route,
                peer,
                third,
                third_t0,
                pool,
                two_tenants,
                client,
                peer2,
                peer2_first,
                vpcs,
                sgs,
                instances,
                basics,
            },
        )
}

impl CloudSpec {
    /// The VPCs drawn: 0 and 1 (peered), and the third if any.
    fn nvpcs(&self) -> usize {
        2 + usize::from(self.third.is_some())
    }

    fn vpc_cidr(&self, v: usize) -> (u8, u8) {
        match v {
            0 => (10, 0),
            1 => PEER_CIDRS[self.peer],
            _ => THIRD_CIDRS[self.third.unwrap()],
        }
    }

    fn tenant(&self, v: usize) -> &'static str {
        match v {
            0 => "t0",
            1 => "t1",
            _ if self.third_t0 => "t0",
            _ => "t2",
        }
    }

    /// The peerings of VPC `v`, in the order its routes prefer them: (name, other VPC).
    fn peerings_of(&self, v: usize) -> Vec<(&'static str, usize)> {
        let p2 = self.peer2 && self.third.is_some();
        match v {
            0 => vec![("p0", 1)],
            1 if p2 && self.peer2_first => vec![("p1", 2), ("p0", 0)],
            1 if p2 => vec![("p0", 0), ("p1", 2)],
            1 => vec![("p0", 0)],
            _ if p2 => vec![("p1", 1)],
            _ => vec![],
        }
    }

    /// The host "this host" is: one with instances, or the gateway.
    pub fn this_host(&self) -> usize {
        let mut hosts: Vec<usize> = self
            .instances
            .iter()
            .map(|i| i.host.index(self.hosts))
            .chain(self.basics.iter().map(|b| b.host.index(self.hosts)))
            .chain([self.gateway.index(self.hosts)])
            .collect();
        hosts.sort_unstable();
        hosts.dedup();
        hosts[self.this.index(hosts.len())]
    }
}

/// The topology text of a cloud spec.
pub fn render_cloud(t: &CloudSpec) -> String {
    let mut out = String::new();
    render_cloud_head(&mut out, t);
    let nv = t.nvpcs();
    let subnets: Vec<(usize, usize)> = (0..nv)
        .flat_map(|v| (0..t.vpcs[v].subnets.len()).map(move |j| (v, j)))
        .collect();
    // VPC instances (routes name them), then basic ones.
    let (specs, placed) = place_cloud(t, &subnets);
    for v in 0..nv {
        render_cloud_vpc(&mut out, t, v, &specs, &placed);
    }
    let _ = writeln!(out, "[[peering]]\nname = \"p0\"\nvpcs = [\"v0\", \"v1\"]\n");
    if t.peer2 && t.third.is_some() {
        let _ = writeln!(out, "[[peering]]\nname = \"p1\"\nvpcs = [\"v1\", \"v2\"]\n");
    }
    for (g, (ingress, egress)) in t.sgs.iter().enumerate() {
        let _ = writeln!(out, "[[security_group]]\nname = \"sg{g}\"");
        let n = t.sgs.len();
        render_rules_in(&mut out, "ingress", "source", ingress, n, &CLOUD_RULE_CIDRS);
        render_rules_in(
            &mut out,
            "egress",
            "destination",
            egress,
            n,
            &CLOUD_RULE_CIDRS,
        );
        let _ = writeln!(out);
    }
    render_cloud_instances(&mut out, t, &specs, &placed, &subnets);
    out
}

fn render_cloud_head(out: &mut String, t: &CloudSpec) {
    let transport = if t.udp { "gre-udp" } else { "gre" };
    let _ = writeln!(
        out,
        "[underlay]\ntransport = \"{transport}\"\nmtu = 1500\nchecksum = {}\n",
        t.checksum
    );
    render_conntrack(out, t.limits, t.flow_cache);
    for (h, address) in CLOUD_HOSTS.iter().enumerate().take(t.hosts) {
        let region = if t.regions && h == 1 { "r2" } else { "r1" };
        let _ = writeln!(
            out,
            "[[host]]\nname = \"h{h}\"\naddress = \"{address}\"\nregion = \"{region}\"\n"
        );
    }
    let pool: ipnet::Ipv4Net = POOLS[t.pool].parse().unwrap();
    let _ = writeln!(out, "[basic]\ncidr = \"{pool}\"\n");
    let _ = writeln!(
        out,
        "[internet]\ncidr = \"203.0.113.0/24\"\ngateway = \"h{}\"",
        t.gateway.index(t.hosts)
    );
    if t.client {
        let _ = writeln!(out, "client = \"203.0.113.254\"");
    }
    let _ = writeln!(out);
}

/// Where the VPC instances go: the drawn ones, and the twin (an instance of the third VPC with
/// the address and host of one of VPC 0's, when the two overlap).
fn place_cloud(t: &CloudSpec, subnets: &[(usize, usize)]) -> (Vec<CloudInstSpec>, Vec<Placed>) {
    let mut specs = t.instances.clone();
    let mut placed: Vec<Placed> = Vec::new();
    for i in &t.instances {
        let (vpc, j) = subnets[i.subnet.index(subnets.len())];
        let (a, b) = t.vpc_cidr(vpc);
        let mut k = i.ip;
        let ip = loop {
            let ip = [a, b, j as u8 + 1, IP_HOSTS[k % IP_HOSTS.len()]];
            if !placed.iter().any(|p| p.vpc == vpc && p.ip == ip) {
                break ip;
            }
            k += 1;
        };
        placed.push(Placed {
            host: i.host.index(t.hosts),
            vpc,
            subnet: subnets.iter().position(|s| *s == (vpc, j)).unwrap(),
            ip,
        });
    }
    let overlapping = t.nvpcs() == 3 && t.vpc_cidr(2) == t.vpc_cidr(0);
    if let Some(which) = &t.twin
        && overlapping
    {
        let thirds = t.vpcs[2].subnets.len();
        let candidates: Vec<usize> = (0..placed.len())
            .filter(|&i| placed[i].vpc == 0 && subnets[placed[i].subnet].1 < thirds)
            .filter(|&i| !placed.iter().any(|p| p.vpc == 2 && p.ip == placed[i].ip))
            .collect();
        if !candidates.is_empty() {
            let x = candidates[which.index(candidates.len())];
            let j = subnets[placed[x].subnet].1;
            placed.push(Placed {
                vpc: 2,
                subnet: subnets.iter().position(|s| *s == (2, j)).unwrap(),
                ..placed[x].clone()
            });
            specs.push(CloudInstSpec {
                eip: false,
                appliance: false,
                ..specs[x].clone()
            });
        }
    }
    (specs, placed)
}

fn net16((a, b): (u8, u8)) -> ipnet::Ipv4Net {
    format!("{a}.{b}.0.0/16").parse().unwrap()
}

fn render_cloud_vpc(
    out: &mut String,
    t: &CloudSpec,
    v: usize,
    specs: &[CloudInstSpec],
    placed: &[Placed],
) {
    let spec = &t.vpcs[v];
    let (a, b) = t.vpc_cidr(v);
    let _ = writeln!(
        out,
        "[[vpc]]\nname = \"v{v}\"\ntenant = \"{}\"\ncidr = \"{a}.{b}.0.0/16\"\nkey = {}\n",
        t.tenant(v),
        KEYS[(t.key_rot + v) % KEYS.len()]
    );
    for (j, s) in spec.subnets.iter().enumerate() {
        let _ = writeln!(
            out,
            "[[subnet]]\nname = \"v{v}s{j}\"\nvpc = \"v{v}\"\ncidr = \"{a}.{b}.{}.0/24\"",
            j + 1
        );
        if let Some(ti) = &s.table {
            let _ = writeln!(
                out,
                "route_table = \"v{v}rt{}\"",
                ti.index(spec.tables.len())
            );
        }
        if let Some(ai) = &s.acl
            && !spec.acls.is_empty()
        {
            let _ = writeln!(out, "acl = \"v{v}acl{}\"", ai.index(spec.acls.len()));
        }
        let _ = writeln!(out);
    }
    for n in 0..spec.tables.len() {
        render_cloud_table(out, t, v, n, specs, placed);
    }
    for (n, (ingress, egress)) in spec.acls.iter().enumerate() {
        let _ = writeln!(out, "[[acl]]\nname = \"v{v}acl{n}\"\nvpc = \"v{v}\"");
        let g = t.sgs.len();
        render_rules_in(out, "ingress", "cidr", ingress, g, &CLOUD_RULE_CIDRS);
        render_rules_in(out, "egress", "cidr", egress, g, &CLOUD_RULE_CIDRS);
        let _ = writeln!(out);
    }
}

/// A cloud route's destination in VPC `v` (`peer`: the peer its routes prefer); a subnet
/// route only towards an appliance.
fn cloud_dest(
    t: &CloudSpec,
    v: usize,
    d: CDest,
    peer: Option<usize>,
    to_appliance: bool,
) -> Option<ipnet::Ipv4Net> {
    let (a, b) = t.vpc_cidr(v);
    Some(match d {
        CDest::Lit(s) => s.parse().unwrap(),
        CDest::PeerVpc => net16(t.vpc_cidr(peer.unwrap_or(0))),
        CDest::PeerSubnet => {
            let (c, d) = t.vpc_cidr(peer.unwrap_or(0));
            format!("{c}.{d}.1.0/24").parse().unwrap()
        }
        CDest::Third if t.nvpcs() == 3 => net16(t.vpc_cidr(2)),
        CDest::Third => "10.2.0.0/16".parse().unwrap(),
        CDest::Pool => POOLS[t.pool].parse().unwrap(),
        CDest::OwnSubnet(k) if usize::from(k) <= t.vpcs[v].subnets.len() && to_appliance => {
            format!("{a}.{b}.{k}.0/24").parse().unwrap()
        }
        CDest::OwnSubnet(_) => return None,
    })
}

/// The routes of VPC `v`'s table `n`, in the order they are written (the first of two equal
/// destinations wins).
fn cloud_routes(
    t: &CloudSpec,
    v: usize,
    n: usize,
    specs: &[CloudInstSpec],
    placed: &[Placed],
) -> Vec<(ipnet::Ipv4Net, String)> {
    let spec = &t.vpcs[v];
    let members: Vec<usize> = (0..placed.len()).filter(|&i| placed[i].vpc == v).collect();
    let appliances: Vec<usize> = members
        .iter()
        .copied()
        .filter(|&i| specs[i].appliance)
        .collect();
    let mut peerings = t.peerings_of(v);
    // Odd tables prefer the peerings the other way round: where two peered VPCs overlap, the
    // subnets of one table route their CIDR to one, those of another table to the other.
    if n % 2 == 1 {
        peerings.reverse();
    }
    let peer = peerings.first().map(|p| p.1);
    let mut lines: Vec<(ipnet::Ipv4Net, String)> = Vec::new();
    if t.nat_route && v == 0 && n == 0 && !members.is_empty() {
        let nat = appliances.first().or(members.first()).unwrap();
        lines.push(("0.0.0.0/0".parse().unwrap(), format!("instance:i{nat}")));
    }
    if spec.peer_route {
        for (name, w) in &peerings {
            lines.push((net16(t.vpc_cidr(*w)), format!("peering:{name}")));
        }
    }
    for r in &spec.tables[n] {
        let to_appliance = matches!(r.hop, Hop::Instance(_)) && !members.is_empty();
        let Some(dest) = cloud_dest(t, v, CLOUD_DESTS[r.dest], peer, to_appliance) else {
            continue;
        };
        let hop = match &r.hop {
            Hop::Drop => "drop".to_string(),
            Hop::Internet => "internet".to_string(),
            Hop::Instance(i) if !members.is_empty() => hop_instance(i, &members, &appliances),
            Hop::Instance(_) => "drop".to_string(),
            Hop::Peering if !peerings.is_empty() => {
                let name = peerings
                    .iter()
                    .find(|(_, w)| net16(t.vpc_cidr(*w)).contains(&dest))
                    .unwrap_or(&peerings[0])
                    .0;
                format!("peering:{name}")
            }
            Hop::Peering => "internet".to_string(),
        };
        lines.push((dest, hop));
    }
    lines
}

fn render_cloud_table(
    out: &mut String,
    t: &CloudSpec,
    v: usize,
    n: usize,
    specs: &[CloudInstSpec],
    placed: &[Placed],
) {
    let _ = writeln!(
        out,
        "[[route_table]]\nname = \"v{v}rt{n}\"\nvpc = \"v{v}\"\nroutes = ["
    );
    let vnet = net16(t.vpc_cidr(v));
    let subnet_cidrs: Vec<ipnet::Ipv4Net> = (1..=t.vpcs[v].subnets.len())
        .map(|k| {
            let (a, b) = t.vpc_cidr(v);
            format!("{a}.{b}.{k}.0/24").parse().unwrap()
        })
        .collect();
    let mut seen: Vec<ipnet::Ipv4Net> = Vec::new();
    for (dest, hop) in cloud_routes(t, v, n, specs, placed) {
        let subnet_route = subnet_cidrs.contains(&dest) && hop.starts_with("instance:");
        if (vnet.contains(&dest) && !subnet_route) || seen.contains(&dest) {
            continue;
        }
        seen.push(dest);
        let _ = writeln!(
            out,
            "  {{ destination = \"{dest}\", next_hop = \"{hop}\" }},"
        );
    }
    let _ = writeln!(out, "]\n");
}

fn render_cloud_instances(
    out: &mut String,
    t: &CloudSpec,
    specs: &[CloudInstSpec],
    placed: &[Placed],
    subnets: &[(usize, usize)],
) {
    let groups = |sgs: &[Index]| {
        let mut groups: Vec<usize> = Vec::new();
        for g in sgs {
            let g = g.index(t.sgs.len());
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        let groups: Vec<String> = groups.iter().map(|g| format!("\"sg{g}\"")).collect();
        groups.join(", ")
    };
    let mut eips = 0u8;
    let mut eip = |on: bool| {
        if on {
            eips += 1;
            format!("eip = \"203.0.113.{}\"\n", 9 + eips)
        } else {
            String::new()
        }
    };
    for (n, (i, p)) in specs.iter().zip(placed).enumerate() {
        let (vpc, j) = subnets[p.subnet];
        let [a, b, c, d] = p.ip;
        let check = if i.appliance {
            "source_check = false\n"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "[[instance]]\nname = \"i{n}\"\nhost = \"h{}\"\nsubnet = \"v{vpc}s{j}\"\nip = \"{a}.{b}.{c}.{d}\"\n{}{check}security_groups = [{}]\n",
            p.host,
            eip(i.eip),
            groups(&i.sgs)
        );
    }
    let mut links = Vec::new();
    for (n, b) in t.basics.iter().enumerate() {
        let tenant = if t.two_tenants && b.tenant { 1 } else { 0 };
        let _ = writeln!(
            out,
            "[[instance]]\nname = \"b{n}\"\nhost = \"h{}\"\nnetwork = \"basic\"\ntenant = \"t{tenant}\"\n{}security_groups = [{}]\n",
            b.host.index(t.hosts),
            eip(b.eip),
            groups(&b.sgs)
        );
        if b.link {
            links.push((n, tenant));
        }
    }
    for (n, v) in links {
        let _ = writeln!(
            out,
            "[[interconnect]]\ninstance = \"b{n}\"\nvpc = \"v{v}\"\n"
        );
    }
}
