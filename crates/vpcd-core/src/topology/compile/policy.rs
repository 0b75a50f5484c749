//! Policy: network ACLs, security groups and their rules, route tables, and each instance's
//! flattened rule lists.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use hashbrown::HashMap;
use ipnet::Ipv4Net;
use toml::Spanned;

use super::super::file::{self, PortSpec, Text};
use super::super::model::*;
use super::Scope;
use super::diagnostics::{Diagnostics, Names, label};
use crate::policy::route::{NextHop, Route, Routes};
use crate::policy::rules::{Action, Peer, PortRange, Protocol, Rule, RuleList};

impl Scope<'_> {
    pub(super) fn check_acls(&self, d: &mut Diagnostics) -> Vec<Option<Acl>> {
        let (f, vpc_names, limits) = (self.f, &self.names.vpc, &self.limits);
        f.acls
            .iter()
            .enumerate()
            .map(|(id, a)| {
                let a = a.get_ref();
                let item = label("acl", &a.name);
                let vpc = d.resolve(vpc_names, "vpc", &a.vpc, &item);
                let mut lists = [Vec::new(), Vec::new()];
                for (dir, rules, list) in [("ingress", &a.ingress, 0), ("egress", &a.egress, 1)] {
                    if rules.len() > limits.rules_per_acl {
                        d.err(
                            a.name.span(),
                            &item,
                            format!("{} {dir} rules exceed the limit of {} (raise [limits] rules_per_acl)", rules.len(), limits.rules_per_acl),
                        );
                    }
                    for (i, r) in rules.iter().enumerate() {
                        let line = d.line(&r.span());
                        let r = r.get_ref();
                        let ritem = format!("{item} {dir} rule {}", i + 1);
                        if let Some(rule) = check_rule(d, &ritem, (&r.action, &r.protocol, &r.port), &r.cidr, None, line) {
                            lists[list].push(rule);
                        }
                    }
                }
                let [ingress, egress] = lists;
                let owner = AclId(id as u32);
                Some(Acl {
                    name: a.name.get_ref().clone(),
                    vpc: VpcId(vpc?),
                    ingress_list: RuleList::build([(owner, &ingress[..])], |_| Vec::new()),
                    egress_list: RuleList::build([(owner, &egress[..])], |_| Vec::new()),
                    ingress,
                    egress,
                })
            })
            .collect()
    }

    pub(super) fn check_security_groups(&self, d: &mut Diagnostics) -> Vec<Option<SecurityGroup>> {
        let (f, sg_names, limits) = (self.f, &self.names.sg, &self.limits);
        f.security_groups
            .iter()
            .map(|g| {
                let g = g.get_ref();
                let item = label("security_group", &g.name);
                let mut ok = true;
                for (dir, n) in [("ingress", g.ingress.len()), ("egress", g.egress.len())] {
                    if n > limits.rules_per_security_group {
                        d.err(
                            g.name.span(),
                            &item,
                            format!("{n} {dir} rules exceed the limit of {} (raise [limits] rules_per_security_group)", limits.rules_per_security_group),
                        );
                        ok = false;
                    }
                }
                let mut ingress = Vec::new();
                for (i, r) in g.ingress.iter().enumerate() {
                    let line = d.line(&r.span());
                    let r = r.get_ref();
                    let ritem = format!("{item} ingress rule {}", i + 1);
                    match check_rule(d, &ritem, (&r.action, &r.protocol, &r.port), &r.source, Some(sg_names), line) {
                        Some(rule) => ingress.push(rule),
                        None => ok = false,
                    }
                }
                let mut egress = Vec::new();
                for (i, r) in g.egress.iter().enumerate() {
                    let line = d.line(&r.span());
                    let r = r.get_ref();
                    let ritem = format!("{item} egress rule {}", i + 1);
                    match check_rule(d, &ritem, (&r.action, &r.protocol, &r.port), &r.destination, Some(sg_names), line) {
                        Some(rule) => egress.push(rule),
                        None => ok = false,
                    }
                }
                ok.then(|| SecurityGroup {
                    name: g.name.get_ref().clone(),
                    ingress,
                    egress,
                })
            })
            .collect()
    }

    pub(super) fn check_route_tables(&self, d: &mut Diagnostics) -> Vec<Option<RouteTable>> {
        let (f, table_vpcs, vpcs) = (self.f, &self.table_vpcs, &self.vpcs);
        let limits = &self.limits;
        let mut per_vpc: BTreeMap<u32, usize> = BTreeMap::new();
        f.route_tables
            .iter()
            .zip(table_vpcs)
            .map(|(t, &vpc)| {
                let t = t.get_ref();
                let item = label("route_table", &t.name);
                let vpc = vpc?;
                let v = vpcs[vpc as usize].as_ref()?;
                let count = per_vpc.entry(vpc).or_default();
                *count += 1;
                table_limits(d, (t, &item), *count, v, limits);
                let mut routes = Vec::new();
                let mut seen: HashMap<Ipv4Net, usize> = HashMap::new();
                let mut ok = true;
                for (n, r) in t.routes.iter().enumerate() {
                    let r = r.get_ref();
                    let ritem = format!("{item} route {}", n + 1);
                    let Some(route) = self.check_route(d, r, &ritem, (VpcId(vpc), v)) else {
                        ok = false;
                        continue;
                    };
                    let dest = route.destination;
                    if let Some(prev) = seen.insert(dest, n + 1) {
                        d.err(
                            r.destination.span(),
                            &ritem,
                            format!("destination {dest} is already route {prev}'s"),
                        );
                        ok = false;
                        continue;
                    }
                    routes.push(route);
                }
                ok.then(|| RouteTable {
                    name: t.name.get_ref().clone(),
                    vpc: VpcId(vpc),
                    implicit: false,
                    routes: Routes::new(routes),
                })
            })
            .collect()
    }

    /// One route of a table of VPC `v`: its destination and next hop, and, inside the VPC's
    /// CIDR, only a subnet's exact CIDR sent to an appliance.
    fn check_route(
        &self,
        d: &mut Diagnostics,
        r: &file::Route,
        ritem: &str,
        (vpc, v): (VpcId, &Vpc),
    ) -> Option<Route> {
        let dest = d.cidr(&r.destination, ritem, "destination", false);
        let hop = self.next_hop(d, &r.next_hop, ritem, vpc.0);
        let (dest, hop) = (dest?, hop?);
        // Inside the VPC the local route wins, except for a subnet's exact CIDR
        // sent to an appliance (AWS's middlebox routing: a firewall between two
        // subnets).
        let subnet = self
            .subnets
            .iter()
            .flatten()
            .find(|s| s.vpc == vpc && s.cidr == dest);
        match (v.cidr.contains(&dest), subnet, hop) {
            (false, _, _) | (true, Some(_), NextHop::Instance(_)) => {}
            (true, Some(s), _) => {
                d.err(
                    r.next_hop.span(),
                    ritem,
                    format!("a route for subnet \"{}\" ({dest}) leads to an appliance (instance:NAME) only", s.name),
                );
                return None;
            }
            (true, None, _) => {
                d.err(
                    r.destination.span(),
                    ritem,
                    format!("destination {dest} lies inside the VPC's CIDR {}: the local route always wins (only a subnet's exact CIDR may be routed, to an appliance)", v.cidr),
                );
                return None;
            }
        }
        Some(Route {
            destination: dest,
            next_hop: hop,
        })
    }

    fn next_hop(&self, d: &mut Diagnostics, t: &Text, item: &str, vpc: u32) -> Option<NextHop> {
        let (vpcs, instance_names, instances) = (&self.vpcs, &self.names.instance, &self.instances);
        let (peering_names, peerings) = (&self.names.peering, &self.peerings);
        let s = t.get_ref().as_str();
        if s == "drop" {
            return Some(NextHop::Drop);
        }
        if s == "internet" {
            return Some(NextHop::Internet);
        }
        if let Some(name) = s.strip_prefix("instance:") {
            let Some(&id) = instance_names.get(name) else {
                d.err(t.span(), item, format!("unknown instance \"{name}\""));
                return None;
            };
            let inst = instances[id as usize].as_ref()?;
            if inst.vpc() != Some(VpcId(vpc)) {
                let other = match inst.vpc() {
                    Some(v) => format!(
                        "in another VPC (\"{}\")",
                        vpcs[v.index()].as_ref().map_or("?", |v| v.name.as_str())
                    ),
                    None => "in the basic network".to_string(),
                };
                d.err(
                    t.span(),
                    item,
                    format!("next hop instance \"{name}\" is {other}"),
                );
                return None;
            }
            return Some(NextHop::Instance(InstanceId(id)));
        }
        if let Some(name) = s.strip_prefix("peering:") {
            let Some(&id) = peering_names.get(name) else {
                d.err(t.span(), item, format!("unknown peering \"{name}\""));
                return None;
            };
            let p = peerings[id as usize].as_ref()?;
            if !p.vpcs.contains(&VpcId(vpc)) {
                d.err(
                    t.span(),
                    item,
                    format!("peering \"{name}\" does not join this route table's VPC"),
                );
                return None;
            }
            return Some(NextHop::Peering(PeeringId(id)));
        }
        d.err(
            t.span(),
            item,
            format!("next_hop \"{s}\" is not one of drop, internet, instance:NAME, peering:NAME"),
        );
        None
    }
}

/// One ACL or security-group rule. `groups` is given for security groups, whose peers may be
/// `sg:NAME`.
pub(super) fn check_rule(
    d: &mut Diagnostics,
    item: &str,
    (action, protocol, port): (&Text, &Text, &Option<Spanned<PortSpec>>),
    peer: &Text,
    groups: Option<&Names>,
    line: usize,
) -> Option<Rule> {
    let act = match action.get_ref().to_ascii_lowercase().as_str() {
        "accept" => Some(Action::Accept),
        "drop" => Some(Action::Drop),
        other => {
            d.err(
                action.span(),
                item,
                format!("action \"{other}\" is neither \"accept\" nor \"drop\""),
            );
            None
        }
    };
    let proto = match protocol.get_ref().to_ascii_lowercase().as_str() {
        "all" => Some(Protocol::All),
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        "icmp" => Some(Protocol::Icmp),
        "icmpv6" => {
            d.err(
                protocol.span(),
                item,
                "icmpv6 needs IPv6, which vpcd does not carry yet",
            );
            None
        }
        other => {
            d.err(
                protocol.span(),
                item,
                format!("protocol \"{other}\" is not one of all, tcp, udp, icmp"),
            );
            None
        }
    };
    // A bad port does not hide a bad peer.
    let ports = match proto {
        Some(p) => ports(d, item, p, port),
        None => Some(Vec::new()),
    };
    let peer = rule_peer(d, item, peer, groups);
    Some(Rule {
        action: act?,
        protocol: proto?,
        ports: ports?,
        peer: peer?,
        line,
    })
}

/// A route table's limits: tables per VPC (`count`: this one's rank in VPC `v`) and routes
/// per table.
fn table_limits(
    d: &mut Diagnostics,
    (t, item): (&file::RouteTable, &str),
    count: usize,
    v: &Vpc,
    limits: &Limits,
) {
    if count > limits.route_tables_per_vpc {
        d.err(
            t.name.span(),
            item,
            format!(
                "vpc \"{}\" has more than {} route tables",
                v.name, limits.route_tables_per_vpc
            ),
        );
    }
    if t.routes.len() > limits.routes_per_table {
        d.err(
            t.name.span(),
            item,
            format!(
                "{} routes exceed the limit of {} (raise [limits] routes_per_table)",
                t.routes.len(),
                limits.routes_per_table
            ),
        );
    }
}

/// A rule's peer: a CIDR, or `sg:NAME` where `groups` (security groups' rules only) names it.
fn rule_peer(d: &mut Diagnostics, item: &str, peer: &Text, groups: Option<&Names>) -> Option<Peer> {
    match peer.get_ref().strip_prefix("sg:") {
        Some(name) => match groups {
            Some(groups) => match groups.get(name) {
                Some(&g) => Some(Peer::Group(SgId(g))),
                None => {
                    d.err(
                        peer.span(),
                        item,
                        format!("unknown security_group \"{name}\""),
                    );
                    None
                }
            },
            None => {
                d.err(
                    peer.span(),
                    item,
                    "network ACL rules take a CIDR; sg: peers belong to security groups",
                );
                None
            }
        },
        None => d.cidr(peer, item, "peer", true).map(Peer::Cidr),
    }
}

fn ports(
    d: &mut Diagnostics,
    item: &str,
    proto: Protocol,
    port: &Option<Spanned<PortSpec>>,
) -> Option<Vec<PortRange>> {
    let Some(port) = port else {
        return Some(Vec::new());
    };
    let text = match port.get_ref() {
        PortSpec::Number(n) => n.to_string(),
        PortSpec::Text(s) => s.trim().to_ascii_lowercase(),
    };
    if text == "all" {
        return Some(Vec::new());
    }
    if !proto.has_ports() {
        d.err(
            port.span(),
            item,
            format!(
                "port must be \"all\" (or absent) when the protocol is {}",
                proto.word()
            ),
        );
        return None;
    }
    let mut out = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| {
            s.trim()
                .parse::<u32>()
                .ok()
                .filter(|p| (1..=65535).contains(p))
        };
        match (parse(a), parse(b)) {
            (Some(first), Some(last)) if first <= last => out.push(PortRange {
                first: first as u16,
                last: last as u16,
            }),
            (Some(first), Some(last)) => {
                d.err(
                    port.span(),
                    item,
                    format!("port range {first}-{last} is out of order"),
                );
                return None;
            }
            _ => {
                d.err(
                    port.span(),
                    item,
                    format!("port \"{part}\" is not a port (1-65535), a range a-b, or a list a,b"),
                );
                return None;
            }
        }
    }
    Some(out)
}

/// Flattens each instance's groups into its rule lists. Instances with the same groups in the
/// same VPC share one list.
/// `sg:` peers resolve to the members of the group in the same address space: the same VPC,
/// or, for a basic-network instance, the basic network.
pub(super) fn compile_instance_rules(instances: &mut [Instance], groups: &[SecurityGroup]) {
    type Lists = (Arc<RuleList<SgId>>, Arc<RuleList<SgId>>);
    let mut cache: HashMap<(Space, Vec<SgId>), Lists> = HashMap::new();
    let members: Vec<(Space, Ipv4Addr, Vec<SgId>)> = instances
        .iter()
        .map(|i| (i.space(), i.ip, i.security_groups.clone()))
        .collect();
    for inst in instances.iter_mut() {
        let vpc = inst.space();
        let lists = cache
            .entry((vpc, inst.security_groups.clone()))
            .or_insert_with(|| {
                let in_vpc = |g: SgId| {
                    members
                        .iter()
                        .filter(|(v, _, gs)| *v == vpc && gs.contains(&g))
                        .map(|(_, ip, _)| *ip)
                        .collect()
                };
                let ingress = RuleList::build(
                    inst.security_groups
                        .iter()
                        .map(|g| (*g, &groups[g.index()].ingress[..])),
                    in_vpc,
                );
                let egress = RuleList::build(
                    inst.security_groups
                        .iter()
                        .map(|g| (*g, &groups[g.index()].egress[..])),
                    in_vpc,
                );
                (Arc::new(ingress), Arc::new(egress))
            })
            .clone();
        inst.ingress_rules = lists.0;
        inst.egress_rules = lists.1;
    }
}
