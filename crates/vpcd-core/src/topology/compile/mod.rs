//! Validation and compilation: the file as written becomes a [`Topology`], or every problem
//! found is reported with its line and column.
//!
//! Names are registered first, for every kind, so that references may point forward. Then a
//! [`Scope`] is built in order, one kind at a time, each stage reading what the stages before
//! it built (`&self`) and reporting into the [`Diagnostics`]: settings, the network (hosts,
//! VPCs, peerings, subnets, interconnects, keys), instances, policy (ACLs, groups, route
//! tables), expectations. Nothing is compiled unless the whole file is valid.

mod balancers;
mod diagnostics;
mod expects;
mod instances;
mod network;
mod policy;
mod settings;

use hashbrown::HashMap;

use super::error::TopologyError;
use super::file;
use super::lock::Allocations;
use super::model::*;
use crate::policy::route::Routes;
use diagnostics::{Diagnostics, Names};

pub(super) fn compile(
    text: &str,
    file: &str,
    lock: &Allocations,
) -> Result<Topology, Vec<TopologyError>> {
    let mut d = Diagnostics::new(text, file);
    let parsed: file::File = match toml::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            d.err(span, "", e.message().trim_end().to_string());
            return Err(d.errors);
        }
    };
    let scope = Scope::build(&parsed, lock, &mut d);
    if d.errors.is_empty() {
        Ok(scope.assemble(d.file()))
    } else {
        d.errors.sort_by_key(|e| (e.line, e.column));
        Err(d.errors)
    }
}

/// Every kind's names, registered before anything is checked.
struct AllNames {
    host: Names,
    vpc: Names,
    subnet: Names,
    table: Names,
    acl: Names,
    sg: Names,
    instance: Names,
    peering: Names,
}

impl AllNames {
    fn register(f: &file::File, d: &mut Diagnostics) -> AllNames {
        // Nothing refers to a load balancer: its names are only checked.
        d.names("load_balancer", &f.load_balancers, |l| &l.name);
        AllNames {
            host: d.names("host", &f.hosts, |h| &h.name),
            vpc: d.names("vpc", &f.vpcs, |v| &v.name),
            subnet: d.names("subnet", &f.subnets, |s| &s.name),
            table: d.names("route_table", &f.route_tables, |t| &t.name),
            acl: d.names("acl", &f.acls, |a| &a.name),
            sg: d.names("security_group", &f.security_groups, |g| &g.name),
            instance: d.names("instance", &f.instances, |i| &i.name),
            peering: d.names("peering", &f.peerings, |p| &p.name),
        }
    }
}

/// What is known so far. Each `Vec<Option<T>>` holds one slot per item of the file, `None`
/// where the item was invalid (its errors are reported), so that ids stay the file's order.
struct Scope<'f> {
    f: &'f file::File,
    lock: &'f Allocations,
    names: AllNames,
    underlay: Option<Underlay>,
    conntrack: Option<ConntrackLimits>,
    limits: Limits,
    basic: Option<BasicNetwork>,
    /// `Some(None)`: `[internet]` is present but invalid.
    internet: Option<Option<Internet>>,
    hosts: Vec<Option<Host>>,
    vpcs: Vec<Option<Vpc>>,
    peerings: Vec<Option<Peering>>,
    acls: Vec<Option<Acl>>,
    groups: Vec<Option<SecurityGroup>>,
    /// The VPC of each route table, as named.
    table_vpcs: Vec<Option<u32>>,
    subnets: Vec<Option<Subnet>>,
    instances: Vec<Option<Instance>>,
    allocations: Allocations,
    interconnects: Vec<Option<Interconnect>>,
    tables: Vec<Option<RouteTable>>,
    expects: Vec<Option<Expect>>,
    channels: Vec<(Channel, u32)>,
    load_balancers: Vec<Option<LoadBalancer>>,
}

impl<'f> Scope<'f> {
    /// Builds the scope stage by stage, in dependency order.
    fn build(f: &'f file::File, lock: &'f Allocations, d: &mut Diagnostics) -> Scope<'f> {
        let mut s = Scope {
            f,
            lock,
            names: AllNames::register(f, d),
            underlay: None,
            conntrack: None,
            limits: Limits::default(),
            basic: None,
            internet: None,
            hosts: Vec::new(),
            vpcs: Vec::new(),
            peerings: Vec::new(),
            acls: Vec::new(),
            groups: Vec::new(),
            table_vpcs: Vec::new(),
            subnets: Vec::new(),
            instances: Vec::new(),
            allocations: Allocations::none(),
            interconnects: Vec::new(),
            tables: Vec::new(),
            expects: Vec::new(),
            channels: Vec::new(),
            load_balancers: Vec::new(),
        };
        s.underlay = s.check_underlay(d);
        s.conntrack = s.check_conntrack(d);
        s.limits = s.check_limits(d);
        s.hosts = s.check_hosts(d);
        s.basic = s.check_basic(d);
        s.internet = s.check_internet(d);
        s.vpcs = s.check_vpcs(d);
        s.peerings = s.check_peerings(d);
        s.acls = s.check_acls(d);
        s.groups = s.check_security_groups(d);
        s.table_vpcs = s.route_table_vpcs(d);
        s.subnets = s.check_subnets(d);
        let mut instances = s.check_instances(d);
        s.allocations = s.allocate_basic(d, &mut instances);
        s.instances = instances;
        s.load_balancers = s.check_load_balancers(d);
        s.interconnects = s.check_interconnects(d);
        s.tables = s.check_route_tables(d);
        s.expects = s.check_expects(d);
        s.channels = s.channel_keys(d);
        s
    }

    /// The topology of a scope without errors: every slot holds its item.
    fn assemble(self, file: &str) -> Topology {
        fn all<T>(v: Vec<Option<T>>) -> Vec<T> {
            v.into_iter()
                .map(|x| x.expect("a topology is assembled only when no error was found"))
                .collect()
        }
        let hosts = all(self.hosts);
        let vpcs = all(self.vpcs);
        let mut peerings = all(self.peerings);
        for &(c, key) in &self.channels {
            if let Channel::Peering { peering, to } = c {
                let p = &mut peerings[peering.index()];
                p.keys[usize::from(p.vpcs[1] == to)] = key;
            }
        }
        let mut route_tables = all(self.tables);
        // Each VPC's default table (local route only) follows the written ones.
        for (i, v) in vpcs.iter().enumerate() {
            debug_assert_eq!(v.default_route_table.index(), route_tables.len());
            route_tables.push(RouteTable {
                name: format!("{}/default", v.name),
                vpc: VpcId(i as u32),
                implicit: true,
                routes: Routes::new(Vec::new()),
            });
        }
        let security_groups = all(self.groups);
        let mut instances = all(self.instances);
        policy::compile_instance_rules(&mut instances, &security_groups);
        let interconnects = all(self.interconnects);
        let load_balancers = all(self.load_balancers);
        let mut index = index(&hosts, &vpcs, &instances, &interconnects, &self.channels);
        index_balancers(&mut index, &load_balancers, &instances);
        Topology {
            file: file.to_string(),
            underlay: self.underlay.expect("valid"),
            conntrack: self.conntrack.expect("valid"),
            limits: self.limits,
            hosts,
            vpcs,
            subnets: all(self.subnets),
            route_tables,
            acls: all(self.acls),
            security_groups,
            instances,
            peerings,
            basic: self.basic,
            internet: self.internet.flatten(),
            interconnects,
            expects: all(self.expects),
            load_balancers,
            allocations: self.allocations,
            unlocked: Vec::new(),
            index,
        }
    }
}

/// The lookups the pipeline makes.
fn index(
    hosts: &[Host],
    vpcs: &[Vpc],
    instances: &[Instance],
    interconnects: &[Interconnect],
    channels: &[(Channel, u32)],
) -> Index {
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
    for &(c, key) in channels {
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
    index.linked_vpc = interconnects
        .iter()
        .map(|ic| (ic.instance, ic.vpc))
        .collect::<HashMap<_, _>>();
    index
}

/// The load balancers' lookups: VIPs, Elastic IPs, backend endpoints, and every address
/// their flows carry.
fn index_balancers(index: &mut Index, lbs: &[LoadBalancer], instances: &[Instance]) {
    for (i, lb) in lbs.iter().enumerate() {
        let id = LbId(i as u32);
        index.lb_by_vip.insert((lb.space(), lb.vip), id);
        index.lb_addresses.insert(u32::from(lb.vip));
        if let Some(eip) = lb.eip {
            index.lb_by_eip.insert(eip, id);
            index.lb_addresses.insert(u32::from(eip));
        }
        for l in &lb.listeners {
            for b in &l.backends {
                let inst = &instances[b.instance.index()];
                let endpoint = (inst.space(), l.protocol.number(), inst.ip, b.port);
                index.backends.insert(endpoint);
                index.lb_addresses.insert(u32::from(inst.ip));
            }
        }
    }
}
