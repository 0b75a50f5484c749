//! The topology file as written: TOML deserialized with spans, before any validation.
//!
//! Every table denies unknown keys, and every value that validation may complain about keeps its
//! span so that the error can name the line and column. The meaning of each key is documented in
//! README ("The topology file").

use serde::Deserialize;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// `[underlay]`: transport and MTU shared by every host.
    #[serde(default)]
    pub underlay: Option<Spanned<Underlay>>,
    /// `[conntrack]`: table sizes.
    #[serde(default)]
    pub conntrack: Option<Spanned<Conntrack>>,
    /// `[limits]`: the cloud's quotas, which a lab may raise.
    #[serde(default)]
    pub limits: Option<Spanned<Limits>>,
    /// `[basic]`: the provider's flat pool for basic-network instances.
    #[serde(default)]
    pub basic: Option<Spanned<Basic>>,
    /// `[internet]`: the public side of Elastic IPs.
    #[serde(default)]
    pub internet: Option<Spanned<Internet>>,
    /// `[[host]]`.
    #[serde(default, rename = "host")]
    pub hosts: Vec<Spanned<Host>>,
    /// `[[vpc]]`.
    #[serde(default, rename = "vpc")]
    pub vpcs: Vec<Spanned<Vpc>>,
    /// `[[subnet]]`.
    #[serde(default, rename = "subnet")]
    pub subnets: Vec<Spanned<Subnet>>,
    /// `[[route_table]]`.
    #[serde(default, rename = "route_table")]
    pub route_tables: Vec<Spanned<RouteTable>>,
    /// `[[acl]]`.
    #[serde(default, rename = "acl")]
    pub acls: Vec<Spanned<Acl>>,
    /// `[[security_group]]`.
    #[serde(default, rename = "security_group")]
    pub security_groups: Vec<Spanned<SecurityGroup>>,
    /// `[[instance]]`.
    #[serde(default, rename = "instance")]
    pub instances: Vec<Spanned<Instance>>,
    /// `[[peering]]`.
    #[serde(default, rename = "peering")]
    pub peerings: Vec<Spanned<Peering>>,
    /// `[[interconnect]]`.
    #[serde(default, rename = "interconnect")]
    pub interconnects: Vec<Spanned<Interconnect>>,
    /// `[[expect]]`.
    #[serde(default, rename = "expect")]
    pub expects: Vec<Spanned<Expect>>,
    /// `[[load_balancer]]`.
    #[serde(default, rename = "load_balancer")]
    pub load_balancers: Vec<Spanned<LoadBalancer>>,
}

/// A string with its span.
pub type Text = Spanned<String>;

/// `[underlay]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Underlay {
    /// `"gre"` or `"gre-udp"`.
    pub transport: Option<Text>,
    /// Underlay MTU in bytes.
    pub mtu: Option<Spanned<i64>>,
    /// The instances' MTU; by default the smaller of 1500 and `mtu`, less the overhead.
    pub instance_mtu: Option<Spanned<i64>>,
    /// Emit GRE checksums (they are always verified when present).
    pub checksum: Option<bool>,
}

/// `[conntrack]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conntrack {
    /// Tracked connections per host.
    pub max_entries: Option<Spanned<i64>>,
    /// Tracked connections per instance.
    pub max_per_instance: Option<Spanned<i64>>,
    /// Slots in the flow cache.
    pub flow_cache: Option<Spanned<i64>>,
}

/// `[limits]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Security groups per instance.
    pub security_groups_per_instance: Option<Spanned<i64>>,
    /// Rules per security group and direction.
    pub rules_per_security_group: Option<Spanned<i64>>,
    /// Rules per network ACL and direction.
    pub rules_per_acl: Option<Spanned<i64>>,
    /// Routes per route table.
    pub routes_per_table: Option<Spanned<i64>>,
    /// Route tables per VPC.
    pub route_tables_per_vpc: Option<Spanned<i64>>,
}

/// `[basic]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Basic {
    /// The provider's pool.
    pub cidr: Text,
}

/// `[internet]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Internet {
    /// Public addresses: EIPs and the internet's own hosts.
    pub cidr: Text,
    /// The host that serves as the internet gateway.
    pub gateway: Text,
    /// The namespace of the internet's device.
    pub netns: Option<Text>,
    /// The internet side's address (default: the first usable address of `cidr`).
    pub client: Option<Text>,
}

/// `[[host]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// Unique name.
    pub name: Text,
    /// Underlay IPv4 address.
    pub address: Text,
    /// Region, default `"default"`.
    pub region: Option<Text>,
}

/// `[[vpc]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vpc {
    /// Unique name.
    pub name: Text,
    /// Owning tenant.
    pub tenant: Text,
    /// Private CIDR.
    pub cidr: Text,
    /// GRE key; assigned from the name when absent.
    pub key: Option<Spanned<i64>>,
    /// Region; default `"default"`.
    pub region: Option<Text>,
}

/// `[[subnet]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subnet {
    /// Unique name.
    pub name: Text,
    /// Its VPC.
    pub vpc: Text,
    /// CIDR inside the VPC's.
    pub cidr: Text,
    /// Route table; the VPC's default (local route only) when absent.
    pub route_table: Option<Text>,
    /// Network ACL; none means not filtered.
    pub acl: Option<Text>,
}

/// `[[route_table]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTable {
    /// Unique name.
    pub name: Text,
    /// Its VPC.
    pub vpc: Text,
    /// Custom routes.
    #[serde(default)]
    pub routes: Vec<Spanned<Route>>,
}

/// One custom route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Destination CIDR.
    pub destination: Text,
    /// `drop`, `internet`, `instance:NAME` or `peering:NAME`.
    pub next_hop: Text,
}

/// A port field: an integer or a string (`"22"`, `"80,443"`, `"1000-2000"`, `"all"`).
#[derive(Debug)]
pub enum PortSpec {
    /// A single port as an integer.
    Number(i64),
    /// The string form.
    Text(String),
}

// Written by hand rather than `#[serde(untagged)]`, whose error ("data did not match any
// variant of untagged enum PortSpec") tells the user nothing about what a port looks like.
impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a port: an integer, or a string like \"80,443\", \"1000-2000\" or \"all\"",
                )
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortSpec, E> {
                Ok(PortSpec::Number(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortSpec, E> {
                Ok(PortSpec::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortSpec, E> {
                Ok(PortSpec::Text(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// One network ACL rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// `accept` or `drop`.
    pub action: Text,
    /// `all`, `tcp`, `udp` or `icmp`.
    pub protocol: Text,
    /// Ports; `all` when absent.
    pub port: Option<Spanned<PortSpec>>,
    /// The remote CIDR: the source for ingress, the destination for egress.
    pub cidr: Text,
    /// Free text.
    pub description: Option<String>,
}

/// `[[acl]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acl {
    /// Unique name.
    pub name: Text,
    /// Its VPC.
    pub vpc: Text,
    /// Inbound rules, in order.
    #[serde(default)]
    pub ingress: Vec<Spanned<AclRule>>,
    /// Outbound rules, in order.
    #[serde(default)]
    pub egress: Vec<Spanned<AclRule>>,
}

/// An inbound security-group rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgIngressRule {
    /// `accept` or `drop`.
    pub action: Text,
    /// `all`, `tcp`, `udp` or `icmp`.
    pub protocol: Text,
    /// Ports; `all` when absent.
    pub port: Option<Spanned<PortSpec>>,
    /// A CIDR, an address, or `sg:NAME`.
    pub source: Text,
    /// Free text.
    pub description: Option<String>,
}

/// An outbound security-group rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgEgressRule {
    /// `accept` or `drop`.
    pub action: Text,
    /// `all`, `tcp`, `udp` or `icmp`.
    pub protocol: Text,
    /// Ports; `all` when absent.
    pub port: Option<Spanned<PortSpec>>,
    /// A CIDR, an address, or `sg:NAME`.
    pub destination: Text,
    /// Free text.
    pub description: Option<String>,
}

/// `[[security_group]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroup {
    /// Unique name.
    pub name: Text,
    /// Inbound rules, in order.
    #[serde(default)]
    pub ingress: Vec<Spanned<SgIngressRule>>,
    /// Outbound rules, in order.
    #[serde(default)]
    pub egress: Vec<Spanned<SgEgressRule>>,
}

/// `[[instance]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    /// Unique name; also the name of its TUN device.
    pub name: Text,
    /// The host it runs on.
    pub host: Text,
    /// `"vpc"` (default when `subnet` is given) or `"basic"`.
    pub network: Option<Text>,
    /// Its subnet (VPC instances).
    pub subnet: Option<Text>,
    /// Its tenant (basic-network instances).
    pub tenant: Option<Text>,
    /// Its private address (VPC instances).
    pub ip: Option<Text>,
    /// Security groups, in order.
    #[serde(default)]
    pub security_groups: Option<Spanned<Vec<Text>>>,
    /// Network namespace its TUN device is moved into.
    pub netns: Option<Text>,
    /// Elastic IP.
    pub eip: Option<Text>,
    /// `false` for an appliance that forwards (sends with other sources than its own).
    pub source_check: Option<Spanned<bool>>,
}

/// `[[peering]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peering {
    /// Unique name.
    pub name: Text,
    /// The two VPCs.
    pub vpcs: Spanned<Vec<Text>>,
}

/// `[[interconnect]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interconnect {
    /// The basic-network instance.
    pub instance: Text,
    /// The VPC it is linked to.
    pub vpc: Text,
}

/// `[[expect]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The instance that sends.
    pub from: Text,
    /// An instance name or an address.
    pub to: Text,
    /// `icmp`, `tcp` or `udp`.
    pub protocol: Text,
    /// Destination port (tcp, udp).
    pub port: Option<Spanned<i64>>,
    /// Whether the traffic must get through.
    pub reach: bool,
}

/// `[[load_balancer]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancer {
    /// Unique name.
    pub name: Text,
    /// `"vpc"` (default) or `"basic"`.
    pub network: Option<Text>,
    /// Its VPC (a VPC load balancer).
    pub vpc: Option<Text>,
    /// The subnet of its VIP (a VPC load balancer).
    pub subnet: Option<Text>,
    /// Its tenant (a basic-network load balancer).
    pub tenant: Option<Text>,
    /// The VIP; allocated when absent.
    pub vip: Option<Text>,
    /// An Elastic IP: a public load balancer.
    pub eip: Option<Text>,
    /// Listeners.
    #[serde(default)]
    pub listeners: Vec<Spanned<Listener>>,
}

/// One listener of a load balancer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// `tcp` or `udp`.
    pub protocol: Text,
    /// The VIP's port.
    pub port: Spanned<i64>,
    /// `wrr` (default), `wlc` or `hash`.
    pub scheduler: Option<Text>,
    /// Backends.
    #[serde(default)]
    pub backends: Vec<Spanned<BackendSpec>>,
    /// The health check; defaults when absent.
    pub health: Option<Spanned<Health>>,
}

/// One backend.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// The instance.
    pub instance: Text,
    /// Its port; the listener's when absent.
    pub port: Option<Spanned<i64>>,
    /// 0-100, default 10.
    pub weight: Option<Spanned<i64>>,
}

/// A listener's health check.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Seconds between probes.
    pub interval: Option<Spanned<i64>>,
    /// Seconds a probe may take.
    pub timeout: Option<Spanned<i64>>,
    /// Successes in a row that make a backend healthy.
    pub healthy: Option<Spanned<i64>>,
    /// Failures in a row that make a backend unhealthy.
    pub unhealthy: Option<Spanned<i64>>,
}
