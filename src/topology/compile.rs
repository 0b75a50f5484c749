//! Validation and compilation: the file as written becomes a [`Topology`], or every problem
//! found is reported with its line and column.
//!
//! Names are registered first, for every kind, so that references may point forward; items are
//! then checked in file order. Nothing is compiled unless the whole file is valid.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::Ipv4Addr;
use std::ops::Range;
use std::sync::Arc;

use hashbrown::HashMap;
use ipnet::Ipv4Net;
use toml::Spanned;

use super::error::TopologyError;
use super::file::{self, PortSpec, Text};
use super::lock::{Allocations, BasicAllocation};
use super::model::*;
use crate::policy::route::{NextHop, Route, Routes};
use crate::policy::rules::{Action, Peer, PortRange, Protocol, Rule, RuleList};

/// Default size of the connection table (the figure).
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
/// Default per-instance connection cap.
pub const DEFAULT_CONNTRACK_PER_INSTANCE: u32 = 65_536;
/// Default flow-cache slots.
pub const DEFAULT_FLOW_CACHE: u32 = 65_536;

pub(super) fn compile(
    text: &str,
    file: &str,
    lock: &Allocations,
) -> Result<Topology, Vec<TopologyError>> {
    let mut cx = Cx::new(text, file);
    let parsed: file::File = match toml::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            cx.err(span, "", e.message().trim_end().to_string());
            return Err(cx.errors);
        }
    };
    let topo = cx.build(&parsed, lock);
    if cx.errors.is_empty() {
        Ok(topo.expect("a topology is built whenever no error was found"))
    } else {
        cx.errors.sort_by_key(|e| (e.line, e.column));
        Err(cx.errors)
    }
}

/// Names of one kind of item, mapped to their index.
type Names = HashMap<String, u32>;

struct Cx<'a> {
    file: &'a str,
    text: &'a str,
    line_starts: Vec<usize>,
    errors: Vec<TopologyError>,
}

impl<'a> Cx<'a> {
    fn new(text: &'a str, file: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Cx {
            file,
            text,
            line_starts,
            errors: Vec::new(),
        }
    }

    fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = self.line_starts[line.saturating_sub(1)];
        // Columns count characters, as editors do, not bytes.
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count())
            + 1;
        (line.max(1), column)
    }

    fn line(&self, span: &Range<usize>) -> usize {
        self.position(span.start).0
    }

    fn err(&mut self, span: Range<usize>, item: impl Display, message: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.errors.push(TopologyError {
            file: self.file.to_string(),
            line,
            column,
            item: item.to_string(),
            message: message.into(),
        });
    }

    /// Registers the names of one kind; duplicates and bad names are errors.
    fn names<T>(&mut self, kind: &str, items: &[Spanned<T>], name: impl Fn(&T) -> &Text) -> Names {
        let mut names = Names::new();
        for (i, item) in items.iter().enumerate() {
            let n = name(item.get_ref());
            if n.get_ref().trim().is_empty() {
                self.err(n.span(), format!("{kind} #{}", i + 1), "name is empty");
                continue;
            }
            // The first definition keeps the name: references must not move to a duplicate.
            if names.contains_key(n.get_ref()) {
                self.err(
                    n.span(),
                    label(kind, n),
                    format!("duplicate {kind} name \"{}\"", n.get_ref()),
                );
            } else {
                names.insert(n.get_ref().clone(), i as u32);
            }
        }
        names
    }

    fn resolve(&mut self, names: &Names, kind: &str, r: &Text, item: &str) -> Option<u32> {
        let found = names.get(r.get_ref()).copied();
        if found.is_none() {
            self.err(
                r.span(),
                item,
                format!("unknown {kind} \"{}\"", r.get_ref()),
            );
        }
        found
    }

    fn address(&mut self, t: &Text, item: &str, what: &str) -> Option<Ipv4Addr> {
        match t.get_ref().trim().parse::<Ipv4Addr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    t.span(),
                    item,
                    format!("{what} \"{}\" is not an IPv4 address", t.get_ref()),
                );
                None
            }
        }
    }

    /// A CIDR with its host bits clear; with `bare_address`, a plain address means /32.
    fn cidr(&mut self, t: &Text, item: &str, what: &str, bare_address: bool) -> Option<Ipv4Net> {
        let s = t.get_ref().trim();
        let parsed = if bare_address && !s.contains('/') {
            s.parse::<Ipv4Addr>().ok().map(Ipv4Net::from)
        } else {
            s.parse::<Ipv4Net>().ok()
        };
        match parsed {
            None => {
                let form = if bare_address {
                    "a CIDR or an address"
                } else {
                    "a CIDR"
                };
                self.err(
                    t.span(),
                    item,
                    format!("{what} \"{s}\" is not {form}, like 10.0.0.0/16"),
                );
                None
            }
            Some(n) if n.trunc() != n => {
                self.err(
                    t.span(),
                    item,
                    format!(
                        "{what} \"{s}\" has host bits set: did you mean {}?",
                        n.trunc()
                    ),
                );
                None
            }
            Some(n) => Some(n),
        }
    }

    fn int_in(
        &mut self,
        v: &Spanned<i64>,
        item: &str,
        what: &str,
        range: Range<i64>,
    ) -> Option<i64> {
        let x = *v.get_ref();
        if range.contains(&x) {
            Some(x)
        } else {
            self.err(
                v.span(),
                item,
                format!(
                    "{what} {x} is out of range {}..={}",
                    range.start,
                    range.end - 1
                ),
            );
            None
        }
    }

    fn build(&mut self, f: &file::File, lock: &Allocations) -> Option<Topology> {
        let underlay = self.underlay(f);
        let conntrack = self.conntrack(f);
        let limits = self.limits(f);
        // Names first, so that references may point forward.
        let host_names = self.names("host", &f.hosts, |h| &h.name);
        let vpc_names = self.names("vpc", &f.vpcs, |v| &v.name);
        let subnet_names = self.names("subnet", &f.subnets, |s| &s.name);
        let table_names = self.names("route_table", &f.route_tables, |t| &t.name);
        let acl_names = self.names("acl", &f.acls, |a| &a.name);
        let sg_names = self.names("security_group", &f.security_groups, |g| &g.name);
        let instance_names = self.names("instance", &f.instances, |i| &i.name);
        let peering_names = self.names("peering", &f.peerings, |p| &p.name);

        let hosts = self.hosts(f);
        let basic = self.basic(f);
        let internet = self.internet(f, &host_names);
        let mut vpcs = self.vpcs(f);
        let peerings = self.peerings(f, &vpc_names, &vpcs);
        let acls = self.acls(f, &vpc_names, &limits);
        let groups = self.security_groups(f, &sg_names, &limits);
        let table_vpcs: Vec<Option<u32>> = f
            .route_tables
            .iter()
            .map(|t| {
                let t = t.get_ref();
                self.resolve(&vpc_names, "vpc", &t.vpc, &label("route_table", &t.name))
            })
            .collect();
        let subnets = self.subnets(
            f,
            &vpc_names,
            &vpcs,
            &table_names,
            &table_vpcs,
            &acl_names,
            &acls,
        );
        let mut instances = self.instances(
            f,
            &host_names,
            &subnet_names,
            &subnets,
            &sg_names,
            &limits,
            &hosts,
            &vpcs,
            (basic.as_ref(), internet.as_ref()),
        );
        let allocations = self.allocate_basic(f, &mut instances, basic.as_ref(), lock);
        let interconnects = self.interconnects(
            f,
            &instance_names,
            &vpc_names,
            &instances,
            &vpcs,
            &hosts,
            basic.as_ref(),
        );
        let tables = self.route_tables(
            f,
            &table_vpcs,
            &vpcs,
            (&subnets, &instance_names, &instances),
            &peering_names,
            &peerings,
            &limits,
        );
        let expects = self.expects(f, &instance_names, internet.is_some());
        let has_internet = matches!(internet, Some(Some(_)));
        let channels = self.channel_keys(
            f,
            &vpcs,
            &peerings,
            &interconnects,
            &instances,
            (has_internet, basic.is_some()),
        );

        if !self.errors.is_empty() {
            return None;
        }
        // Everything below is valid by construction.
        let hosts: Vec<Host> = hosts.into_iter().map(Option::unwrap).collect();
        let mut peerings: Vec<Peering> = peerings.into_iter().map(Option::unwrap).collect();
        for &(c, key) in &channels {
            if let Channel::Peering { peering, to } = c {
                let p = &mut peerings[peering.index()];
                let side = usize::from(p.vpcs[1] == to);
                p.keys[side] = key;
            }
        }
        let mut route_tables: Vec<RouteTable> = tables.into_iter().map(Option::unwrap).collect();
        for (i, v) in vpcs.iter_mut().enumerate() {
            let v = v.as_mut().unwrap();
            v.default_route_table = RouteTableId(route_tables.len() as u32);
            route_tables.push(RouteTable {
                name: format!("{}/default", v.name),
                vpc: VpcId(i as u32),
                implicit: true,
                routes: Routes::new(Vec::new()),
            });
        }
        let vpcs: Vec<Vpc> = vpcs.into_iter().map(Option::unwrap).collect();
        let subnets: Vec<Subnet> = subnets
            .into_iter()
            .map(|s| {
                let mut s = s.unwrap();
                if s.route_table.0 == u32::MAX {
                    s.route_table = vpcs[s.vpc.index()].default_route_table;
                }
                s
            })
            .collect();
        let acls: Vec<Acl> = acls.into_iter().map(Option::unwrap).collect();
        let security_groups: Vec<SecurityGroup> = groups.into_iter().map(Option::unwrap).collect();
        let mut instances: Vec<Instance> = instances.into_iter().map(Option::unwrap).collect();
        let expects: Vec<Expect> = expects.into_iter().map(Option::unwrap).collect();

        compile_instance_rules(&mut instances, &security_groups);
        let mut host_addresses: Vec<(u32, HostId)> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (u32::from(h.address), HostId(i as u32)))
            .collect();
        host_addresses.sort_unstable();
        let mut index = Index {
            host_addresses,
            ..Index::default()
        };
        for (i, v) in vpcs.iter().enumerate() {
            index.vpc_by_key.insert(v.key, VpcId(i as u32));
        }
        for &(c, key) in &channels {
            index.channel_by_key.insert(key, c);
            index.key_by_channel.insert(c, key);
        }
        for (i, inst) in instances.iter().enumerate() {
            let id = InstanceId(i as u32);
            index
                .instance_by_address
                .insert((inst.space(), inst.ip), id);
            if let Some(eip) = inst.eip {
                index.instance_by_eip.insert(eip, id);
            }
        }
        let interconnects: Vec<Interconnect> =
            interconnects.into_iter().map(Option::unwrap).collect();
        for ic in &interconnects {
            index.linked_vpc.insert(ic.instance, ic.vpc);
        }
        Some(Topology {
            file: self.file.to_string(),
            underlay: underlay?,
            conntrack: conntrack?,
            limits,
            hosts,
            vpcs,
            subnets,
            route_tables,
            acls,
            security_groups,
            instances,
            peerings,
            basic,
            internet: internet.flatten(),
            interconnects,
            expects,
            allocations,
            unlocked: Vec::new(),
            index,
        })
    }

    fn underlay(&mut self, f: &file::File) -> Option<Underlay> {
        let mut u = Underlay {
            transport: Transport::Gre,
            mtu: 1500,
            checksum: false,
        };
        let Some(raw) = &f.underlay else {
            return Some(u);
        };
        let raw = raw.get_ref();
        let item = "[underlay]";
        if let Some(t) = &raw.transport {
            u.transport = match t.get_ref().as_str() {
                "gre" => Transport::Gre,
                "gre-udp" => Transport::GreUdp,
                other => {
                    self.err(
                        t.span(),
                        item,
                        format!("transport \"{other}\" is neither \"gre\" nor \"gre-udp\""),
                    );
                    return None;
                }
            };
        }
        u.checksum = raw.checksum.unwrap_or(false);
        if let Some(m) = &raw.mtu {
            let min = i64::from(u.overhead()) + 576;
            u.mtu = self.int_in(m, item, "mtu", min..65_536)? as u16;
        }
        Some(u)
    }

    fn conntrack(&mut self, f: &file::File) -> Option<ConntrackLimits> {
        let mut c = ConntrackLimits {
            max_entries: DEFAULT_CONNTRACK_ENTRIES,
            max_per_instance: DEFAULT_CONNTRACK_PER_INSTANCE,
            flow_cache: DEFAULT_FLOW_CACHE,
        };
        if let Some(raw) = &f.conntrack {
            let raw = raw.get_ref();
            let item = "[conntrack]";
            // Every bad value is reported, not only the first.
            let mut ok = true;
            for (v, slot, what, range) in [
                (
                    &raw.max_entries,
                    &mut c.max_entries,
                    "max_entries",
                    16..(1 << 26),
                ),
                (
                    &raw.max_per_instance,
                    &mut c.max_per_instance,
                    "max_per_instance",
                    1..(1 << 26),
                ),
                (
                    &raw.flow_cache,
                    &mut c.flow_cache,
                    "flow_cache",
                    16..(1 << 24),
                ),
            ] {
                if let Some(v) = v {
                    match self.int_in(v, item, what, range) {
                        Some(x) => *slot = x as u32,
                        None => ok = false,
                    }
                }
            }
            if !ok {
                return None;
            }
        }
        c.max_per_instance = c.max_per_instance.min(c.max_entries);
        c.flow_cache = c.flow_cache.next_power_of_two();
        Some(c)
    }

    fn limits(&mut self, f: &file::File) -> Limits {
        let mut l = Limits::default();
        let Some(raw) = &f.limits else { return l };
        let raw = raw.get_ref();
        let item = "[limits]";
        let fields: [(&Option<Spanned<i64>>, &mut usize, &str); 5] = [
            (
                &raw.security_groups_per_instance,
                &mut l.security_groups_per_instance,
                "security_groups_per_instance",
            ),
            (
                &raw.rules_per_security_group,
                &mut l.rules_per_security_group,
                "rules_per_security_group",
            ),
            (&raw.rules_per_acl, &mut l.rules_per_acl, "rules_per_acl"),
            (
                &raw.routes_per_table,
                &mut l.routes_per_table,
                "routes_per_table",
            ),
            (
                &raw.route_tables_per_vpc,
                &mut l.route_tables_per_vpc,
                "route_tables_per_vpc",
            ),
        ];
        let mut errors = Vec::new();
        for (v, slot, what) in fields {
            if let Some(v) = v {
                if (1..=1_000_000).contains(v.get_ref()) {
                    *slot = *v.get_ref() as usize;
                } else {
                    errors.push((
                        v.span(),
                        format!("{what} {} is out of range 1..=1000000", v.get_ref()),
                    ));
                }
            }
        }
        for (span, m) in errors {
            self.err(span, item, m);
        }
        l
    }

    fn basic(&mut self, f: &file::File) -> Option<BasicNetwork> {
        let raw = f.basic.as_ref()?;
        let item = "[basic]";
        let cidr = self.cidr(&raw.get_ref().cidr, item, "cidr", false)?;
        let private = private_ranges().iter().any(|(r, _)| r.contains(&cidr));
        if !private || cidr.prefix_len() > 28 {
            self.err(
                raw.get_ref().cidr.span(),
                item,
                format!("cidr {cidr}: the basic pool is a private range (10/8, 172.16/12, 192.168/16) of at least /28"),
            );
            return None;
        }
        Some(BasicNetwork {
            cidr,
            gateway: nth(cidr, 1),
        })
    }

    /// `Some(None)` when `[internet]` is present but invalid (its errors are reported).
    fn internet(&mut self, f: &file::File, host_names: &Names) -> Option<Option<Internet>> {
        let raw = f.internet.as_ref()?;
        let r = raw.get_ref();
        let item = "[internet]";
        let cidr = self.cidr(&r.cidr, item, "cidr", false);
        if let Some(c) = cidr
            && private_ranges().iter().any(|(p, _)| overlaps(*p, c))
        {
            self.err(r.cidr.span(), item, format!("cidr {c} is private: the internet's addresses are public ones (e.g. 203.0.113.0/24)"));
            return Some(None);
        }
        let gateway = self.resolve(host_names, "host", &r.gateway, item);
        let client = match (&r.client, cidr) {
            (Some(t), Some(c)) => self.address(t, item, "client").filter(|a| {
                let ok = c.contains(a);
                if !ok {
                    self.err(t.span(), item, format!("client {a} lies outside cidr {c}"));
                }
                ok
            }),
            (None, Some(c)) => Some(nth(c, 1)),
            _ => None,
        };
        let netns = r.netns.as_ref().map(|n| n.get_ref().clone());
        Some((|| {
            Some(Internet {
                cidr: cidr?,
                gateway: HostId(gateway?),
                netns,
                client: client?,
            })
        })())
    }

    fn hosts(&mut self, f: &file::File) -> Vec<Option<Host>> {
        let mut seen: HashMap<Ipv4Addr, String> = HashMap::new();
        f.hosts
            .iter()
            .map(|h| {
                let h = h.get_ref();
                let item = label("host", &h.name);
                let address = self.address(&h.address, &item, "address")?;
                if address.is_unspecified() || address.is_broadcast() || address.is_multicast() {
                    self.err(
                        h.address.span(),
                        &item,
                        format!("address {address} cannot be a host's"),
                    );
                    return None;
                }
                if let Some(other) = seen.insert(address, h.name.get_ref().clone()) {
                    self.err(
                        h.address.span(),
                        &item,
                        format!("address {address} is already host \"{other}\"'s"),
                    );
                    return None;
                }
                Some(Host {
                    name: h.name.get_ref().clone(),
                    address,
                    region: h
                        .region
                        .as_ref()
                        .map_or_else(|| "default".to_string(), |r| r.get_ref().clone()),
                })
            })
            .collect()
    }

    fn vpcs(&mut self, f: &file::File) -> Vec<Option<Vpc>> {
        let mut keys: HashMap<u32, String> = HashMap::new();
        let mut out: Vec<Option<Vpc>> = f
            .vpcs
            .iter()
            .map(|v| {
                let v = v.get_ref();
                let item = label("vpc", &v.name);
                if v.tenant.get_ref().trim().is_empty() {
                    self.err(v.tenant.span(), &item, "tenant is empty");
                }
                let cidr = self.cidr(&v.cidr, &item, "cidr", false)?;
                if let Err(m) = private_vpc_cidr(cidr) {
                    self.err(v.cidr.span(), &item, m);
                    return None;
                }
                let key = match &v.key {
                    Some(k) => {
                        let key = self.int_in(k, &item, "key", 0..(1 << 32))? as u32;
                        if let Some(other) = keys.insert(key, v.name.get_ref().clone()) {
                            self.err(
                                k.span(),
                                &item,
                                format!("key {key} is already vpc \"{other}\"'s"),
                            );
                            return None;
                        }
                        Some(key)
                    }
                    None => None,
                };
                Some(Vpc {
                    name: v.name.get_ref().clone(),
                    tenant: v.tenant.get_ref().clone(),
                    cidr,
                    key: key.unwrap_or(0),
                    key_assigned: key.is_none(),
                    region: v.region.as_ref().map(|r| r.get_ref().clone()),
                    default_route_table: RouteTableId(u32::MAX),
                })
            })
            .collect();
        // Keys not written are derived from the name alone, so that nothing else (adding,
        // removing or renaming another VPC) ever changes them; a collision is an error
        // (`channel_keys`), never a silent move.
        for v in out.iter_mut().flatten().filter(|v| v.key_assigned) {
            v.key = derived_key(KeyClass::Vpc, &v.name);
        }
        out.shrink_to_fit();
        out
    }

    fn peerings(
        &mut self,
        f: &file::File,
        vpc_names: &Names,
        vpcs: &[Option<Vpc>],
    ) -> Vec<Option<Peering>> {
        let mut pairs: HashMap<(u32, u32), String> = HashMap::new();
        f.peerings
            .iter()
            .map(|p| {
                let p = p.get_ref();
                let item = label("peering", &p.name);
                let list = p.vpcs.get_ref();
                if list.len() != 2 {
                    self.err(
                        p.vpcs.span(),
                        &item,
                        format!(
                            "vpcs names {} VPCs; a peering joins exactly two",
                            list.len()
                        ),
                    );
                    return None;
                }
                let a = self.resolve(vpc_names, "vpc", &list[0], &item);
                let b = self.resolve(vpc_names, "vpc", &list[1], &item);
                let (a, b) = (a?, b?);
                if a == b {
                    self.err(p.vpcs.span(), &item, "a VPC cannot peer with itself");
                    return None;
                }
                let (va, vb) = (vpcs[a as usize].as_ref()?, vpcs[b as usize].as_ref()?);
                if overlaps(va.cidr, vb.cidr) {
                    self.err(
                        p.vpcs.span(),
                        &item,
                        format!(
                            "vpc \"{}\" ({}) and vpc \"{}\" ({}) overlap: peered CIDRs must not",
                            va.name, va.cidr, vb.name, vb.cidr
                        ),
                    );
                    return None;
                }
                if let Some(other) = pairs.insert((a.min(b), a.max(b)), p.name.get_ref().clone()) {
                    self.err(
                        p.vpcs.span(),
                        &item,
                        format!("these VPCs are already peered by \"{other}\""),
                    );
                    return None;
                }
                Some(Peering {
                    name: p.name.get_ref().clone(),
                    vpcs: [VpcId(a), VpcId(b)],
                    keys: [0, 0],
                })
            })
            .collect()
    }

    fn acls(&mut self, f: &file::File, vpc_names: &Names, limits: &Limits) -> Vec<Option<Acl>> {
        f.acls
            .iter()
            .enumerate()
            .map(|(id, a)| {
                let a = a.get_ref();
                let item = label("acl", &a.name);
                let vpc = self.resolve(vpc_names, "vpc", &a.vpc, &item);
                let mut lists = [Vec::new(), Vec::new()];
                for (dir, rules, list) in [("ingress", &a.ingress, 0), ("egress", &a.egress, 1)] {
                    if rules.len() > limits.rules_per_acl {
                        self.err(
                            a.name.span(),
                            &item,
                            format!("{} {dir} rules exceed the limit of {} (raise [limits] rules_per_acl)", rules.len(), limits.rules_per_acl),
                        );
                    }
                    for (i, r) in rules.iter().enumerate() {
                        let line = self.line(&r.span());
                        let r = r.get_ref();
                        let ritem = format!("{item} {dir} rule {}", i + 1);
                        if let Some(rule) = self.rule(&ritem, &r.action, &r.protocol, &r.port, &r.cidr, None, line) {
                            lists[list].push(rule);
                        }
                    }
                }
                let [ingress, egress] = lists;
                let owner = id as u32;
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

    fn security_groups(
        &mut self,
        f: &file::File,
        sg_names: &Names,
        limits: &Limits,
    ) -> Vec<Option<SecurityGroup>> {
        f.security_groups
            .iter()
            .map(|g| {
                let g = g.get_ref();
                let item = label("security_group", &g.name);
                let mut ok = true;
                for (dir, n) in [("ingress", g.ingress.len()), ("egress", g.egress.len())] {
                    if n > limits.rules_per_security_group {
                        self.err(
                            g.name.span(),
                            &item,
                            format!("{n} {dir} rules exceed the limit of {} (raise [limits] rules_per_security_group)", limits.rules_per_security_group),
                        );
                        ok = false;
                    }
                }
                let mut ingress = Vec::new();
                for (i, r) in g.ingress.iter().enumerate() {
                    let line = self.line(&r.span());
                    let r = r.get_ref();
                    let ritem = format!("{item} ingress rule {}", i + 1);
                    match self.rule(&ritem, &r.action, &r.protocol, &r.port, &r.source, Some(sg_names), line) {
                        Some(rule) => ingress.push(rule),
                        None => ok = false,
                    }
                }
                let mut egress = Vec::new();
                for (i, r) in g.egress.iter().enumerate() {
                    let line = self.line(&r.span());
                    let r = r.get_ref();
                    let ritem = format!("{item} egress rule {}", i + 1);
                    match self.rule(&ritem, &r.action, &r.protocol, &r.port, &r.destination, Some(sg_names), line) {
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

    /// One ACL or security-group rule. `groups` is given for security groups, whose peers may
    /// be `sg:NAME`.
    #[allow(clippy::too_many_arguments)]
    fn rule(
        &mut self,
        item: &str,
        action: &Text,
        protocol: &Text,
        port: &Option<Spanned<PortSpec>>,
        peer: &Text,
        groups: Option<&Names>,
        line: usize,
    ) -> Option<Rule> {
        let act = match action.get_ref().to_ascii_lowercase().as_str() {
            "accept" => Some(Action::Accept),
            "drop" => Some(Action::Drop),
            other => {
                self.err(
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
                self.err(
                    protocol.span(),
                    item,
                    "icmpv6 needs IPv6, which vpcd does not carry yet",
                );
                None
            }
            other => {
                self.err(
                    protocol.span(),
                    item,
                    format!("protocol \"{other}\" is not one of all, tcp, udp, icmp"),
                );
                None
            }
        };
        // A bad port does not hide a bad peer.
        let ports = match proto {
            Some(p) => self.ports(item, p, port),
            None => Some(Vec::new()),
        };
        let peer = match peer.get_ref().strip_prefix("sg:") {
            Some(name) => match groups {
                Some(groups) => match groups.get(name) {
                    Some(&g) => Some(Peer::Group(g)),
                    None => {
                        self.err(
                            peer.span(),
                            item,
                            format!("unknown security_group \"{name}\""),
                        );
                        None
                    }
                },
                None => {
                    self.err(
                        peer.span(),
                        item,
                        "network ACL rules take a CIDR; sg: peers belong to security groups",
                    );
                    None
                }
            },
            None => self.cidr(peer, item, "peer", true).map(Peer::Cidr),
        };
        Some(Rule {
            action: act?,
            protocol: proto?,
            ports: ports?,
            peer: peer?,
            line,
        })
    }

    fn ports(
        &mut self,
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
            self.err(
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
                    self.err(
                        port.span(),
                        item,
                        format!("port range {first}-{last} is out of order"),
                    );
                    return None;
                }
                _ => {
                    self.err(
                        port.span(),
                        item,
                        format!(
                            "port \"{part}\" is not a port (1-65535), a range a-b, or a list a,b"
                        ),
                    );
                    return None;
                }
            }
        }
        Some(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn subnets(
        &mut self,
        f: &file::File,
        vpc_names: &Names,
        vpcs: &[Option<Vpc>],
        table_names: &Names,
        table_vpcs: &[Option<u32>],
        acl_names: &Names,
        acls: &[Option<Acl>],
    ) -> Vec<Option<Subnet>> {
        let mut placed: Vec<(u32, Ipv4Net, String)> = Vec::new();
        f.subnets
            .iter()
            .map(|s| {
                let s = s.get_ref();
                let item = label("subnet", &s.name);
                let vpc = self.resolve(vpc_names, "vpc", &s.vpc, &item);
                let cidr = self.cidr(&s.cidr, &item, "cidr", false);
                // The route table and the ACL are both checked: one bad reference does not
                // hide the other.
                let route_table = match &s.route_table {
                    None => Some(RouteTableId(u32::MAX)),
                    Some(t) => match self.resolve(table_names, "route_table", t, &item) {
                        Some(id) if matches!((table_vpcs[id as usize], vpc), (Some(tv), Some(v)) if tv != v) => {
                            self.err(
                                t.span(),
                                &item,
                                format!("route_table \"{}\" belongs to another VPC", t.get_ref()),
                            );
                            None
                        }
                        id => id.map(RouteTableId),
                    },
                };
                let acl = match &s.acl {
                    None => Some(None),
                    Some(a) => match self.resolve(acl_names, "acl", a, &item) {
                        Some(id) if matches!((acls.get(id as usize), vpc), (Some(Some(acl)), Some(v)) if acl.vpc.0 != v) => {
                            self.err(
                                a.span(),
                                &item,
                                format!("acl \"{}\" belongs to another VPC", a.get_ref()),
                            );
                            None
                        }
                        id => id.map(|id| Some(AclId(id))),
                    },
                };
                let (vpc, cidr, route_table, acl) = (vpc?, cidr?, route_table?, acl?);
                let v = vpcs[vpc as usize].as_ref()?;
                if !v.cidr.contains(&cidr) {
                    self.err(
                        s.cidr.span(),
                        &item,
                        format!("cidr {cidr} lies outside vpc \"{}\" ({})", v.name, v.cidr),
                    );
                    return None;
                }
                if cidr.prefix_len() > 28 {
                    self.err(
                        s.cidr.span(),
                        &item,
                        format!("cidr {cidr} is smaller than /28, the smallest subnet"),
                    );
                    return None;
                }
                if let Some((_, other, name)) = placed
                    .iter()
                    .find(|(pv, c, _)| *pv == vpc && overlaps(*c, cidr))
                {
                    self.err(
                        s.cidr.span(),
                        &item,
                        format!("cidr {cidr} overlaps subnet \"{name}\" ({other})"),
                    );
                    return None;
                }
                placed.push((vpc, cidr, s.name.get_ref().clone()));
                Some(Subnet {
                    name: s.name.get_ref().clone(),
                    vpc: VpcId(vpc),
                    cidr,
                    route_table,
                    acl,
                    gateway: nth(cidr, 1),
                })
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn instances(
        &mut self,
        f: &file::File,
        host_names: &Names,
        subnet_names: &Names,
        subnets: &[Option<Subnet>],
        sg_names: &Names,
        limits: &Limits,
        hosts: &[Option<Host>],
        vpcs: &[Option<Vpc>],
        (basic, internet): (Option<&BasicNetwork>, Option<&Option<Internet>>),
    ) -> Vec<Option<Instance>> {
        let mut addresses: HashMap<(u32, Ipv4Addr), String> = HashMap::new();
        let mut namespaces: HashMap<String, String> = HashMap::new();
        if let Some(Some(Internet { netns: Some(n), .. })) = internet {
            namespaces.insert(n.clone(), "[internet]".to_string());
        }
        let mut eips: HashMap<Ipv4Addr, String> = HashMap::new();
        f.instances
            .iter()
            .map(|raw| {
                let i = raw.get_ref();
                let item = label("instance", &i.name);
                let name = i.name.get_ref();
                if !valid_ifname(name) {
                    self.err(
                        i.name.span(),
                        &item,
                        "name must be 1-15 characters of a-z A-Z 0-9 . _ - (it names the TUN device)",
                    );
                }
                let host = self.resolve(host_names, "host", &i.host, &item);
                let is_basic = match &i.network {
                    None => false,
                    Some(n) if n.get_ref() == "vpc" => false,
                    Some(n) if n.get_ref() == "basic" => true,
                    Some(n) => {
                        self.err(n.span(), &item, format!("network \"{}\" is neither \"vpc\" nor \"basic\"", n.get_ref()));
                        return None;
                    }
                };
                let eip = self.eip(i, &item, internet, &mut eips);
                if let Some(ns) = &i.netns {
                    let n = ns.get_ref();
                    if n.is_empty() || n.len() > 64 || n.contains('/') || n.contains(char::is_whitespace) {
                        self.err(ns.span(), &item, format!("netns \"{n}\" is not a valid namespace name"));
                    } else if let Some(other) = namespaces.insert(n.clone(), format!("instance \"{name}\"")) {
                        self.err(ns.span(), &item, format!("netns \"{n}\" is already {other}'s"));
                    }
                }
                if is_basic {
                    let declared = f.basic.is_some();
                    return self.basic_instance(raw, &item, basic, host, eip, sg_names, limits, declared);
                }
                if let Some(t) = &i.tenant {
                    self.err(t.span(), &item, "a VPC instance takes its tenant from its VPC: remove tenant");
                }
                // A missing subnet does not hide the other problems of the instance.
                let subnet = match &i.subnet {
                    Some(t) => self.resolve(subnet_names, "subnet", t, &item),
                    None => {
                        self.err(raw.span(), &item, "a VPC instance needs a subnet");
                        None
                    }
                };
                let ip = match &i.ip {
                    Some(t) => self.address(t, &item, "ip"),
                    None => {
                        self.err(raw.span(), &item, "a VPC instance needs an ip");
                        None
                    }
                };
                let groups = self.instance_groups(i, raw.span(), &item, sg_names, limits);
                let (host, subnet_id, ip, groups, eip) = (host?, subnet?, ip?, groups?, eip?);
                let s = subnets[subnet_id as usize].as_ref()?;
                let ip_span = i.ip.as_ref().map(|t| t.span()).unwrap_or(raw.span());
                if !s.cidr.contains(&ip) {
                    self.err(ip_span.clone(), &item, format!("ip {ip} lies outside subnet \"{}\" ({})", s.name, s.cidr));
                    return None;
                }
                if let Some(why) = reserved(s.cidr, ip) {
                    self.err(ip_span, &item, format!("ip {ip} is reserved in subnet \"{}\": {why}", s.name));
                    return None;
                }
                if let Some(other) = addresses.insert((s.vpc.0, ip), name.clone()) {
                    self.err(ip_span, &item, format!("ip {ip} is already instance \"{other}\"'s in this VPC"));
                    return None;
                }
                if let (Some(h), Some(v)) = (&hosts[host as usize], &vpcs[s.vpc.index()])
                    && let Some(region) = &v.region
                    && *region != h.region
                {
                    self.err(
                        i.host.span(),
                        &item,
                        format!("host \"{}\" is in region \"{}\", vpc \"{}\" in \"{region}\"", h.name, h.region, v.name),
                    );
                    return None;
                }
                Some(Instance {
                    name: name.clone(),
                    host: HostId(host),
                    network: Network::Vpc {
                        vpc: s.vpc,
                        subnet: SubnetId(subnet_id),
                    },
                    ip,
                    prefix: s.cidr.prefix_len(),
                    eip,
                    security_groups: groups,
                    netns: i.netns.as_ref().map(|n| n.get_ref().clone()),
                    source_check: i.source_check.as_ref().is_none_or(|c| *c.get_ref()),
                    ingress_rules: Arc::default(),
                    egress_rules: Arc::default(),
                })
            })
            .collect()
    }

    /// A basic-network instance: a tenant, no subnet, no address of its own choosing.
    #[allow(clippy::too_many_arguments)]
    fn basic_instance(
        &mut self,
        raw: &Spanned<file::Instance>,
        item: &str,
        basic: Option<&BasicNetwork>,
        host: Option<u32>,
        eip: Option<Option<Ipv4Addr>>,
        sg_names: &Names,
        limits: &Limits,
        basic_declared: bool,
    ) -> Option<Instance> {
        let i = raw.get_ref();
        if basic.is_none() && !basic_declared {
            let span = i.network.as_ref().map_or(raw.span(), |n| n.span());
            self.err(
                span,
                item,
                "network = \"basic\" needs a [basic] section with the provider's pool",
            );
        }
        let tenant = match &i.tenant {
            Some(t) if !t.get_ref().trim().is_empty() => Some(t.get_ref().clone()),
            Some(t) => {
                self.err(t.span(), item, "tenant is empty");
                None
            }
            None => {
                self.err(
                    raw.span(),
                    item,
                    "a basic-network instance names its tenant",
                );
                None
            }
        };
        if let Some(t) = &i.subnet {
            self.err(
                t.span(),
                item,
                "a basic-network instance takes no subnet (the basic network has none)",
            );
        }
        if let Some(t) = &i.ip {
            self.err(
                t.span(),
                item,
                "a basic-network instance's address is allocated by the provider from [basic] cidr: remove ip",
            );
        }
        let groups = self.instance_groups(i, raw.span(), item, sg_names, limits);
        if let Some(c) = i.source_check.as_ref().filter(|c| !*c.get_ref()) {
            self.err(
                c.span(),
                item,
                "source_check = false is for appliances in a VPC: the basic network has no routes to send anything through one",
            );
            return None;
        }
        if i.subnet.is_some() || i.ip.is_some() {
            return None;
        }
        Some(Instance {
            name: i.name.get_ref().clone(),
            host: HostId(host?),
            network: Network::Basic { tenant: tenant? },
            ip: Ipv4Addr::UNSPECIFIED,
            prefix: basic?.cidr.prefix_len(),
            eip: eip?,
            security_groups: groups?,
            netns: i.netns.as_ref().map(|n| n.get_ref().clone()),
            source_check: true,
            ingress_rules: Arc::default(),
            egress_rules: Arc::default(),
        })
    }

    /// An instance's Elastic IP: inside `[internet] cidr`, not the internet's own address,
    /// bound to one instance only.
    fn eip(
        &mut self,
        i: &file::Instance,
        item: &str,
        internet: Option<&Option<Internet>>,
        eips: &mut HashMap<Ipv4Addr, String>,
    ) -> Option<Option<Ipv4Addr>> {
        let Some(t) = &i.eip else { return Some(None) };
        let addr = self.address(t, item, "eip")?;
        let net = match internet {
            None => {
                self.err(t.span(), item, "an Elastic IP needs an [internet] section");
                return None;
            }
            Some(None) => return None,
            Some(Some(net)) => net,
        };
        let problem = if !net.cidr.contains(&addr) {
            Some(format!(
                "eip {addr} lies outside [internet] cidr {}",
                net.cidr
            ))
        } else if addr == net.client {
            Some(format!(
                "eip {addr} is the internet's own address ([internet] client)"
            ))
        } else if addr == net.cidr.network() || addr == net.cidr.broadcast() {
            Some(format!(
                "eip {addr} is the network or broadcast address of {}",
                net.cidr
            ))
        } else {
            eips.insert(addr, i.name.get_ref().clone())
                .map(|other| format!("eip {addr} is already bound to instance \"{other}\""))
        };
        match problem {
            Some(m) => {
                self.err(t.span(), item, m);
                None
            }
            None => Some(Some(addr)),
        }
    }

    /// Gives each basic-network instance its address (docs/semantics.md, 2.10): the one the
    /// lock records, or, the first time the instance appears, a new one: a hash of its name,
    /// probing upwards over the addresses no lock entry holds, in file order. The pool's
    /// network, gateway (first usable) and broadcast addresses are never given. Returns the
    /// allocations: the lock's, the new ones, and the VPC instances the lock knew as basic,
    /// now marked migrated.
    fn allocate_basic(
        &mut self,
        f: &file::File,
        instances: &mut [Option<Instance>],
        basic: Option<&BasicNetwork>,
        lock: &Allocations,
    ) -> Allocations {
        let mut out = lock.clone();
        for inst in instances.iter().flatten().filter(|i| !i.is_basic()) {
            if let Some(a) = out.basic.get_mut(&inst.name) {
                a.migrated = true;
            }
        }
        let Some(pool) = basic else { return out };
        let base = u32::from(pool.cidr.network());
        let size = 1u64 << (32 - pool.cidr.prefix_len());
        let usable = size.saturating_sub(3).max(1);
        // Slot n is the address base + n + 2.
        let slot_of = |a: Ipv4Addr| {
            let n = u64::from(u32::from(a).wrapping_sub(base));
            (pool.cidr.contains(&a) && (2..size - 1).contains(&n)).then(|| n - 2)
        };
        let mut taken: hashbrown::HashSet<u64> = lock
            .basic
            .values()
            .filter_map(|a| slot_of(a.address))
            .collect();
        let mut pending = Vec::new();
        for (raw, inst) in f.instances.iter().zip(instances.iter_mut()) {
            let Some(inst) = inst.as_mut().filter(|i| i.is_basic()) else {
                continue;
            };
            let item = label("instance", &raw.get_ref().name);
            match lock.basic.get(&inst.name) {
                Some(a) if a.migrated => {
                    let span = raw.get_ref().network.as_ref().map_or(raw.span(), |n| n.span());
                    self.err(span, item, "the instance moved from the basic network into a VPC (the lock file records it): migration is one-way");
                }
                Some(a) if slot_of(a.address).is_some() => inst.ip = a.address,
                Some(a) => self.err(
                    raw.span(),
                    item,
                    format!("the lock file gives the instance {}, which is not a usable address of the basic pool {}: the pool cannot change under allocated addresses", a.address, pool.cidr),
                ),
                None => pending.push((raw, inst)),
            }
        }
        for (raw, inst) in pending {
            if taken.len() as u64 >= usable {
                let gone = lock
                    .basic
                    .keys()
                    .filter(|n| !f.instances.iter().any(|i| i.get_ref().name.get_ref() == *n))
                    .count();
                self.err(
                    raw.span(),
                    label("instance", &raw.get_ref().name),
                    format!("the basic pool {} is full: {} addresses are allocated ({gone} of them to instances no longer in this file: remove their entries from the lock file to free them)", pool.cidr, taken.len()),
                );
                continue;
            }
            let mut n = u64::from(fnv1a(inst.name.as_bytes())) % usable;
            while taken.contains(&n) {
                n = (n + 1) % usable;
            }
            taken.insert(n);
            inst.ip = Ipv4Addr::from(base + (n + 2) as u32);
            let allocation = BasicAllocation {
                address: inst.ip,
                migrated: false,
            };
            out.basic.insert(inst.name.clone(), allocation);
        }
        out
    }

    /// Basic-network interconnects: one VPC per instance, of the same tenant and region,
    /// whose CIDR does not overlap the basic pool.
    #[allow(clippy::too_many_arguments)]
    fn interconnects(
        &mut self,
        f: &file::File,
        instance_names: &Names,
        vpc_names: &Names,
        instances: &[Option<Instance>],
        vpcs: &[Option<Vpc>],
        hosts: &[Option<Host>],
        basic: Option<&BasicNetwork>,
    ) -> Vec<Option<Interconnect>> {
        let mut linked: HashMap<u32, String> = HashMap::new();
        f.interconnects
            .iter()
            .map(|ic| {
                let r = ic.get_ref();
                let item = format!("interconnect ({} -> {})", r.instance.get_ref(), r.vpc.get_ref());
                let inst = self.resolve(instance_names, "instance", &r.instance, &item);
                let vpc = self.resolve(vpc_names, "vpc", &r.vpc, &item);
                let (inst, vpc) = (inst?, vpc?);
                let (i, v) = (instances[inst as usize].as_ref()?, vpcs[vpc as usize].as_ref()?);
                let Network::Basic { tenant } = &i.network else {
                    self.err(r.instance.span(), &item, format!("instance \"{}\" is not in the basic network", i.name));
                    return None;
                };
                if *tenant != v.tenant {
                    self.err(
                        r.vpc.span(),
                        &item,
                        format!("instance \"{}\" belongs to tenant \"{tenant}\", vpc \"{}\" to \"{}\": an interconnect stays within one tenant", i.name, v.name, v.tenant),
                    );
                    return None;
                }
                // A VPC that names no region is not tied to one (as for its instances).
                let host_region = hosts[i.host.index()].as_ref().map_or("default", |h| h.region.as_str());
                if let Some(vpc_region) = v.region.as_deref()
                    && host_region != vpc_region
                {
                    self.err(
                        r.vpc.span(),
                        &item,
                        format!("instance \"{}\" runs in region \"{host_region}\", vpc \"{}\" is in \"{vpc_region}\": an interconnect stays within one region", i.name, v.name),
                    );
                    return None;
                }
                if let Some(pool) = basic
                    && overlaps(pool.cidr, v.cidr)
                {
                    self.err(
                        r.vpc.span(),
                        &item,
                        format!("vpc \"{}\" ({}) overlaps the basic pool {}", v.name, v.cidr, pool.cidr),
                    );
                    return None;
                }
                if let Some(other) = linked.insert(inst, v.name.clone()) {
                    self.err(
                        ic.span(),
                        &item,
                        format!("instance \"{}\" is already linked to vpc \"{other}\": one VPC at a time", i.name),
                    );
                    return None;
                }
                Some(Interconnect {
                    instance: InstanceId(inst),
                    vpc: VpcId(vpc),
                })
            })
            .collect()
    }

    /// The GRE key of every channel (docs/semantics.md, 2.1): each derived from its own names
    /// only, a VPC's written when the file gives one. Two equal keys are an error that names
    /// both items: at the written key when there is one (the user's to change), else at the
    /// later item.
    fn channel_keys(
        &mut self,
        f: &file::File,
        vpcs: &[Option<Vpc>],
        peerings: &[Option<Peering>],
        interconnects: &[Option<Interconnect>],
        instances: &[Option<Instance>],
        (internet, basic): (bool, bool),
    ) -> Vec<(Channel, u32)> {
        let mut uses: Vec<KeyUse> = Vec::new();
        let vpc_name = |v: VpcId| vpcs[v.index()].as_ref().map_or("?", |v| v.name.as_str());
        for (i, v) in vpcs.iter().enumerate() {
            let Some(v) = v else { continue };
            let raw = f.vpcs[i].get_ref();
            let (span, what) = match (&raw.key, v.key_assigned) {
                (Some(k), false) => (k.span(), format!("the key of vpc \"{}\"", v.name)),
                _ => (
                    raw.name.span(),
                    format!("the key vpc \"{}\" derives from its name", v.name),
                ),
            };
            let written = !v.key_assigned;
            uses.push(KeyUse::new(
                Channel::Vpc(VpcId(i as u32)),
                v.key,
                span,
                what,
                written,
            ));
        }
        for (i, p) in peerings.iter().enumerate() {
            let Some(p) = p else { continue };
            for to in p.vpcs {
                let name = format!("peering:{}>{}", p.name, vpc_name(to));
                let what = format!(
                    "the key of peering \"{}\" into vpc \"{}\"",
                    p.name,
                    vpc_name(to)
                );
                let c = Channel::Peering {
                    peering: PeeringId(i as u32),
                    to,
                };
                let span = f.peerings[i].get_ref().name.span();
                uses.push(KeyUse::new(
                    c,
                    derived_key(KeyClass::Peering, &name),
                    span,
                    what,
                    false,
                ));
            }
        }
        let mut linked: Vec<VpcId> = Vec::new();
        for (j, ic) in interconnects.iter().enumerate() {
            let Some(ic) = ic else { continue };
            if linked.contains(&ic.vpc) {
                continue;
            }
            linked.push(ic.vpc);
            for to_basic in [false, true] {
                let dir = if to_basic { "basic" } else { "vpc" };
                let name = format!("interconnect:{}>{dir}", vpc_name(ic.vpc));
                let what = format!(
                    "the key of vpc \"{}\"'s interconnect (towards the {dir})",
                    vpc_name(ic.vpc)
                );
                let c = Channel::Interconnect {
                    vpc: ic.vpc,
                    to_basic,
                };
                let span = f.interconnects[j].span();
                uses.push(KeyUse::new(
                    c,
                    derived_key(KeyClass::Interconnect, &name),
                    span,
                    what,
                    false,
                ));
            }
        }
        if internet && let Some(raw) = &f.internet {
            let spaces = vpcs
                .iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    v.as_ref()
                        .map(|v| (Space::Vpc(VpcId(i as u32)), format!("vpc:{}", v.name)))
                })
                .chain(basic.then(|| (Space::Basic, "basic".to_string())));
            for (space, label) in spaces.collect::<Vec<_>>() {
                for inbound in [true, false] {
                    let dir = if inbound { "in" } else { "out" };
                    let name = format!("internet:{label}>{dir}");
                    let what = format!("the key of {label}'s internet channel ({dir})");
                    let c = Channel::Internet { space, inbound };
                    uses.push(KeyUse::new(
                        c,
                        derived_key(KeyClass::Internet, &name),
                        raw.span(),
                        what,
                        false,
                    ));
                }
            }
        }
        for (i, inst) in instances.iter().enumerate() {
            let Some(inst) = inst.as_ref().filter(|i| !i.source_check) else {
                continue;
            };
            let name = format!("appliance:{}", inst.name);
            let what = format!("the key of appliance \"{}\"", inst.name);
            let span = f.instances[i].get_ref().name.span();
            let c = Channel::Appliance(InstanceId(i as u32));
            uses.push(KeyUse::new(
                c,
                derived_key(KeyClass::Appliance, &name),
                span,
                what,
                false,
            ));
        }
        self.key_collisions(&uses);
        uses.into_iter().map(|u| (u.channel, u.key)).collect()
    }

    fn key_collisions(&mut self, uses: &[KeyUse]) {
        let mut seen: HashMap<u32, usize> = HashMap::new();
        for (n, u) in uses.iter().enumerate() {
            let Some(&first) = seen.get(&u.key) else {
                seen.insert(u.key, n);
                continue;
            };
            let other = &uses[first];
            if other.what == u.what {
                // One item written twice: its duplicate name is the error.
                continue;
            }
            let k = u.key;
            let (at, message) = if u.written {
                (
                    u,
                    format!("key {k} is also {}: choose another key", other.what),
                )
            } else if other.written {
                (
                    other,
                    format!("key {k} is also {}: choose another key", u.what),
                )
            } else {
                (
                    u,
                    format!(
                        "{} is {k}, as is {}: rename one of them, or give the VPC a key of its own",
                        u.what, other.what
                    ),
                )
            };
            let item = at.what.clone();
            self.err(at.span.clone(), item, message);
        }
    }

    fn instance_groups(
        &mut self,
        i: &file::Instance,
        span: Range<usize>,
        item: &str,
        sg_names: &Names,
        limits: &Limits,
    ) -> Option<Vec<SgId>> {
        let Some(list) = &i.security_groups else {
            self.err(
                span,
                item,
                "an instance needs at least one security group (the cloud always binds one)",
            );
            return None;
        };
        if list.get_ref().is_empty() {
            self.err(
                list.span(),
                item,
                "an instance needs at least one security group (the cloud always binds one)",
            );
            return None;
        }
        if list.get_ref().len() > limits.security_groups_per_instance {
            self.err(
                list.span(),
                item,
                format!(
                    "{} security groups exceed the limit of {} per instance",
                    list.get_ref().len(),
                    limits.security_groups_per_instance
                ),
            );
            return None;
        }
        let mut out = Vec::new();
        let mut ok = true;
        for g in list.get_ref() {
            match self.resolve(sg_names, "security_group", g, item) {
                Some(id) if out.contains(&SgId(id)) => {
                    self.err(
                        g.span(),
                        item,
                        format!("security_group \"{}\" is listed twice", g.get_ref()),
                    );
                    ok = false;
                }
                Some(id) => out.push(SgId(id)),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn route_tables(
        &mut self,
        f: &file::File,
        table_vpcs: &[Option<u32>],
        vpcs: &[Option<Vpc>],
        (subnets, instance_names, instances): (&[Option<Subnet>], &Names, &[Option<Instance>]),
        peering_names: &Names,
        peerings: &[Option<Peering>],
        limits: &Limits,
    ) -> Vec<Option<RouteTable>> {
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
                if *count > limits.route_tables_per_vpc {
                    self.err(
                        t.name.span(),
                        &item,
                        format!("vpc \"{}\" has more than {} route tables", v.name, limits.route_tables_per_vpc),
                    );
                }
                if t.routes.len() > limits.routes_per_table {
                    self.err(
                        t.name.span(),
                        &item,
                        format!("{} routes exceed the limit of {} (raise [limits] routes_per_table)", t.routes.len(), limits.routes_per_table),
                    );
                }
                let mut routes = Vec::new();
                let mut seen: HashMap<Ipv4Net, usize> = HashMap::new();
                let mut ok = true;
                for (n, r) in t.routes.iter().enumerate() {
                    let r = r.get_ref();
                    let ritem = format!("{item} route {}", n + 1);
                    let dest = self.cidr(&r.destination, &ritem, "destination", false);
                    let hop = self.next_hop(&r.next_hop, &ritem, vpc, vpcs, instance_names, instances, peering_names, peerings);
                    let (Some(dest), Some(hop)) = (dest, hop) else {
                        ok = false;
                        continue;
                    };
                    // Inside the VPC the local route wins, except for a subnet's exact CIDR
                    // sent to an appliance (AWS's middlebox routing: a firewall between two
                    // subnets).
                    let subnet = subnets
                        .iter()
                        .flatten()
                        .find(|s| s.vpc.0 == vpc && s.cidr == dest);
                    match (v.cidr.contains(&dest), subnet, hop) {
                        (false, _, _) | (true, Some(_), NextHop::Instance(_)) => {}
                        (true, Some(s), _) => {
                            self.err(
                                r.next_hop.span(),
                                &ritem,
                                format!("a route for subnet \"{}\" ({dest}) leads to an appliance (instance:NAME) only", s.name),
                            );
                            ok = false;
                            continue;
                        }
                        (true, None, _) => {
                            self.err(
                                r.destination.span(),
                                &ritem,
                                format!("destination {dest} lies inside the VPC's CIDR {}: the local route always wins (only a subnet's exact CIDR may be routed, to an appliance)", v.cidr),
                            );
                            ok = false;
                            continue;
                        }
                    }
                    if let Some(prev) = seen.insert(dest, n + 1) {
                        self.err(r.destination.span(), &ritem, format!("destination {dest} is already route {prev}'s"));
                        ok = false;
                        continue;
                    }
                    routes.push(Route {
                        destination: dest,
                        next_hop: hop,
                    });
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

    #[allow(clippy::too_many_arguments)]
    fn next_hop(
        &mut self,
        t: &Text,
        item: &str,
        vpc: u32,
        vpcs: &[Option<Vpc>],
        instance_names: &Names,
        instances: &[Option<Instance>],
        peering_names: &Names,
        peerings: &[Option<Peering>],
    ) -> Option<NextHop> {
        let s = t.get_ref().as_str();
        if s == "drop" {
            return Some(NextHop::Drop);
        }
        if s == "internet" {
            return Some(NextHop::Internet);
        }
        if let Some(name) = s.strip_prefix("instance:") {
            let Some(&id) = instance_names.get(name) else {
                self.err(t.span(), item, format!("unknown instance \"{name}\""));
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
                self.err(
                    t.span(),
                    item,
                    format!("next hop instance \"{name}\" is {other}"),
                );
                return None;
            }
            return Some(NextHop::Instance(id));
        }
        if let Some(name) = s.strip_prefix("peering:") {
            let Some(&id) = peering_names.get(name) else {
                self.err(t.span(), item, format!("unknown peering \"{name}\""));
                return None;
            };
            let p = peerings[id as usize].as_ref()?;
            if !p.vpcs.contains(&VpcId(vpc)) {
                self.err(
                    t.span(),
                    item,
                    format!("peering \"{name}\" does not join this route table's VPC"),
                );
                return None;
            }
            return Some(NextHop::Peering(id));
        }
        self.err(
            t.span(),
            item,
            format!("next_hop \"{s}\" is not one of drop, internet, instance:NAME, peering:NAME"),
        );
        None
    }

    fn expects(
        &mut self,
        f: &file::File,
        instance_names: &Names,
        internet: bool,
    ) -> Vec<Option<Expect>> {
        f.expects
            .iter()
            .enumerate()
            .map(|(n, e)| {
                let line = self.line(&e.span());
                let e = e.get_ref();
                let item = format!(
                    "expect #{} ({} -> {})",
                    n + 1,
                    e.from.get_ref(),
                    e.to.get_ref()
                );
                let from = if e.from.get_ref() == "internet"
                    && internet
                    && !instance_names.contains_key("internet")
                {
                    Some(ExpectSource::Internet)
                } else {
                    self.resolve(instance_names, "instance", &e.from, &item)
                        .map(|id| ExpectSource::Instance(InstanceId(id)))
                };
                let to = match instance_names.get(e.to.get_ref()) {
                    Some(&id) => Some(ExpectTarget::Instance(InstanceId(id))),
                    None => match e.to.get_ref().parse::<Ipv4Addr>() {
                        Ok(a) => Some(ExpectTarget::Address(a)),
                        Err(_) => {
                            self.err(
                                e.to.span(),
                                &item,
                                format!(
                                    "to \"{}\" is neither an instance nor an address",
                                    e.to.get_ref()
                                ),
                            );
                            None
                        }
                    },
                };
                let protocol = match e.protocol.get_ref().to_ascii_lowercase().as_str() {
                    "icmp" => Some(Protocol::Icmp),
                    "tcp" => Some(Protocol::Tcp),
                    "udp" => Some(Protocol::Udp),
                    other => {
                        self.err(
                            e.protocol.span(),
                            &item,
                            format!("protocol \"{other}\" is not one of icmp, tcp, udp"),
                        );
                        None
                    }
                };
                let port = match (protocol, &e.port) {
                    (Some(p), Some(port)) if p.has_ports() => self
                        .int_in(port, &item, "port", 1..65_536)
                        .map(|p| Some(p as u16)),
                    (Some(p), None) if p.has_ports() => {
                        self.err(
                            e.protocol.span(),
                            &item,
                            format!("{} needs a port", p.word()),
                        );
                        None
                    }
                    (Some(_), Some(port)) => {
                        self.err(port.span(), &item, "icmp takes no port");
                        None
                    }
                    (_, _) => Some(None),
                };
                Some(Expect {
                    from: from?,
                    to: to?,
                    protocol: protocol?,
                    port: port?,
                    reach: e.reach,
                    line,
                })
            })
            .collect()
    }
}

/// Flattens each instance's groups into its rule lists. Instances with the same groups in the
/// same VPC share one list.
/// `sg:` peers resolve to the members of the group in the same address space: the same VPC,
/// or, for a basic-network instance, the basic network.
fn compile_instance_rules(instances: &mut [Instance], groups: &[SecurityGroup]) {
    type Lists = (Arc<RuleList>, Arc<RuleList>);
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
                let in_vpc = |g: u32| {
                    members
                        .iter()
                        .filter(|(v, _, gs)| *v == vpc && gs.contains(&SgId(g)))
                        .map(|(_, ip, _)| *ip)
                        .collect()
                };
                let ingress = RuleList::build(
                    inst.security_groups
                        .iter()
                        .map(|g| (g.0, &groups[g.index()].ingress[..])),
                    in_vpc,
                );
                let egress = RuleList::build(
                    inst.security_groups
                        .iter()
                        .map(|g| (g.0, &groups[g.index()].egress[..])),
                    in_vpc,
                );
                (Arc::new(ingress), Arc::new(egress))
            })
            .clone();
        inst.ingress_rules = lists.0;
        inst.egress_rules = lists.1;
    }
}

fn label(kind: &str, name: &Text) -> String {
    format!("{kind} \"{}\"", name.get_ref())
}

/// The cloud's VPC ranges: 10/8 and 172.16/12 from /12, 192.168/16 from /16, down to /28.
/// The private ranges (RFC 1918), with the largest VPC each allows.
fn private_ranges() -> [(Ipv4Net, u8); 3] {
    [
        (Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 8), 12),
        (Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 0, 0), 12), 12),
        (Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 0, 0), 16), 16),
    ]
}

fn private_vpc_cidr(c: Ipv4Net) -> Result<(), String> {
    let ranges = private_ranges();
    match ranges.iter().find(|(r, _)| r.contains(&c.network())) {
        None => Err(format!(
            "cidr {c} is not private: a VPC takes 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16"
        )),
        Some((r, min)) if c.prefix_len() < *min || !r.contains(&c) => Err(format!(
            "cidr {c} is too large: within {r} a VPC is at most /{min}"
        )),
        Some(_) if c.prefix_len() > 28 => {
            Err(format!("cidr {c} is too small: a VPC is at least /28"))
        }
        Some(_) => Ok(()),
    }
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn nth(net: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

/// Why `ip` is reserved in `subnet`: the network address, the gateway (first usable) and the
/// broadcast address (CLOUD-SEMANTICS: the first two addresses and the last one).
fn reserved(subnet: Ipv4Net, ip: Ipv4Addr) -> Option<&'static str> {
    if ip == subnet.network() {
        Some("the network address")
    } else if ip == nth(subnet, 1) {
        Some("the gateway address")
    } else if ip == subnet.broadcast() {
        Some("the broadcast address")
    } else {
        None
    }
}

fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// One key in use, for the collision check.
struct KeyUse {
    channel: Channel,
    key: u32,
    span: Range<usize>,
    what: String,
    written: bool,
}

impl KeyUse {
    fn new(channel: Channel, key: u32, span: Range<usize>, what: String, written: bool) -> KeyUse {
        KeyUse {
            channel,
            key,
            span,
            what,
            written,
        }
    }
}

/// The ranges derived keys live in, one per kind of channel (the top byte), away from small
/// hand-picked VPC keys.
#[derive(Clone, Copy)]
enum KeyClass {
    Vpc = 1,
    Peering = 2,
    Interconnect = 3,
    Internet = 4,
    Appliance = 5,
}

/// A derived GRE key: the class in the top byte, 24 bits of FNV-1a of `name` below.
fn derived_key(class: KeyClass, name: &str) -> u32 {
    (class as u32) << 24 | (fnv1a(name.as_bytes()) & 0x00ff_ffff)
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}
