//! Instances: VPC and basic-network instances, their groups and Elastic IPs, and the
//! provider's allocations of basic-network addresses (recorded in the lock file).

use std::net::Ipv4Addr;
use std::ops::Range;
use std::sync::Arc;

use hashbrown::HashMap;
use toml::Spanned;

use super::super::file;
use super::super::lock::{Allocations, BasicAllocation};
use super::super::model::*;
use super::Scope;
use super::diagnostics::{Diagnostics, label};
use super::network::{fnv1a, reserved};

impl Scope<'_> {
    pub(super) fn check_instances(&self, d: &mut Diagnostics) -> Vec<Option<Instance>> {
        let (f, host_names) = (self.f, &self.names.host);
        let internet = self.internet.as_ref();
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
                    d.err(
                        i.name.span(),
                        &item,
                        "name must be 1-15 characters of a-z A-Z 0-9 . _ - (it names the TUN device)",
                    );
                }
                let host = d.resolve(host_names, "host", &i.host, &item);
                let is_basic = match &i.network {
                    None => false,
                    Some(n) if n.get_ref() == "vpc" => false,
                    Some(n) if n.get_ref() == "basic" => true,
                    Some(n) => {
                        d.err(n.span(), &item, format!("network \"{}\" is neither \"vpc\" nor \"basic\"", n.get_ref()));
                        return None;
                    }
                };
                let eip = self.eip(d, i, &item, &mut eips);
                check_netns(d, i, &item, &mut namespaces);
                if is_basic {
                    let declared = f.basic.is_some();
                    return self.basic_instance(d, raw, &item, host, eip, declared);
                }
                self.vpc_instance(d, raw, &item, (host, eip), &mut addresses)
            })
            .collect()
    }

    /// A VPC instance: a subnet, an address of it that no other instance of the VPC has, a
    /// host in the VPC's region. `addresses` holds the addresses given so far.
    fn vpc_instance(
        &self,
        d: &mut Diagnostics,
        raw: &Spanned<file::Instance>,
        item: &str,
        (host, eip): (Option<u32>, Option<Option<Ipv4Addr>>),
        addresses: &mut HashMap<(u32, Ipv4Addr), String>,
    ) -> Option<Instance> {
        let i = raw.get_ref();
        if let Some(t) = &i.tenant {
            d.err(
                t.span(),
                item,
                "a VPC instance takes its tenant from its VPC: remove tenant",
            );
        }
        // A missing subnet does not hide the other problems of the instance.
        let subnet = match &i.subnet {
            Some(t) => d.resolve(&self.names.subnet, "subnet", t, item),
            None => {
                d.err(raw.span(), item, "a VPC instance needs a subnet");
                None
            }
        };
        let ip = match &i.ip {
            Some(t) => d.address(t, item, "ip"),
            None => {
                d.err(raw.span(), item, "a VPC instance needs an ip");
                None
            }
        };
        let groups = self.instance_groups(d, i, raw.span(), item);
        let (host, subnet_id, ip, groups, eip) = (host?, subnet?, ip?, groups?, eip?);
        let s = self.subnets[subnet_id as usize].as_ref()?;
        self.check_vpc_address(d, raw, item, (s, ip), addresses)?;
        if let (Some(h), Some(v)) = (&self.hosts[host as usize], &self.vpcs[s.vpc.index()])
            && let Some(region) = &v.region
            && *region != h.region
        {
            d.err(
                i.host.span(),
                item,
                format!(
                    "host \"{}\" is in region \"{}\", vpc \"{}\" in \"{region}\"",
                    h.name, h.region, v.name
                ),
            );
            return None;
        }
        Some(Instance {
            name: i.name.get_ref().clone(),
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
    }

    /// A VPC instance's `ip`: inside its subnet `s`, not reserved there, and no other
    /// instance's in the VPC (recorded in `addresses`).
    fn check_vpc_address(
        &self,
        d: &mut Diagnostics,
        raw: &Spanned<file::Instance>,
        item: &str,
        (s, ip): (&Subnet, Ipv4Addr),
        addresses: &mut HashMap<(u32, Ipv4Addr), String>,
    ) -> Option<()> {
        let i = raw.get_ref();
        let ip_span = i.ip.as_ref().map(|t| t.span()).unwrap_or(raw.span());
        if !s.cidr.contains(&ip) {
            d.err(
                ip_span.clone(),
                item,
                format!("ip {ip} lies outside subnet \"{}\" ({})", s.name, s.cidr),
            );
            return None;
        }
        if let Some(why) = reserved(s.cidr, ip) {
            d.err(
                ip_span,
                item,
                format!("ip {ip} is reserved in subnet \"{}\": {why}", s.name),
            );
            return None;
        }
        if let Some(other) = addresses.insert((s.vpc.0, ip), i.name.get_ref().clone()) {
            d.err(
                ip_span,
                item,
                format!("ip {ip} is already instance \"{other}\"'s in this VPC"),
            );
            return None;
        }
        Some(())
    }

    /// A basic-network instance: a tenant, no subnet, no address of its own choosing.
    fn basic_instance(
        &self,
        d: &mut Diagnostics,
        raw: &Spanned<file::Instance>,
        item: &str,
        host: Option<u32>,
        eip: Option<Option<Ipv4Addr>>,
        basic_declared: bool,
    ) -> Option<Instance> {
        let basic = self.basic.as_ref();
        let i = raw.get_ref();
        if basic.is_none() && !basic_declared {
            let span = i.network.as_ref().map_or(raw.span(), |n| n.span());
            d.err(
                span,
                item,
                "network = \"basic\" needs a [basic] section with the provider's pool",
            );
        }
        let tenant = match &i.tenant {
            Some(t) if !t.get_ref().trim().is_empty() => Some(t.get_ref().clone()),
            Some(t) => {
                d.err(t.span(), item, "tenant is empty");
                None
            }
            None => {
                d.err(
                    raw.span(),
                    item,
                    "a basic-network instance names its tenant",
                );
                None
            }
        };
        if let Some(t) = &i.subnet {
            d.err(
                t.span(),
                item,
                "a basic-network instance takes no subnet (the basic network has none)",
            );
        }
        if let Some(t) = &i.ip {
            d.err(
                t.span(),
                item,
                "a basic-network instance's address is allocated by the provider from [basic] cidr: remove ip",
            );
        }
        let groups = self.instance_groups(d, i, raw.span(), item);
        if let Some(c) = i.source_check.as_ref().filter(|c| !*c.get_ref()) {
            d.err(
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
        &self,
        d: &mut Diagnostics,
        i: &file::Instance,
        item: &str,
        eips: &mut HashMap<Ipv4Addr, String>,
    ) -> Option<Option<Ipv4Addr>> {
        let internet = self.internet.as_ref();
        let Some(t) = &i.eip else { return Some(None) };
        let addr = d.address(t, item, "eip")?;
        let net = match internet {
            None => {
                d.err(t.span(), item, "an Elastic IP needs an [internet] section");
                return None;
            }
            Some(None) => return None,
            Some(Some(net)) => net,
        };
        let owner = format!("instance \"{}\"", i.name.get_ref());
        match eip_problem(net, addr, owner, eips) {
            Some(m) => {
                d.err(t.span(), item, m);
                None
            }
            None => Some(Some(addr)),
        }
    }

    fn instance_groups(
        &self,
        d: &mut Diagnostics,
        i: &file::Instance,
        span: Range<usize>,
        item: &str,
    ) -> Option<Vec<SgId>> {
        let (sg_names, limits) = (&self.names.sg, &self.limits);
        let Some(list) = &i.security_groups else {
            d.err(
                span,
                item,
                "an instance needs at least one security group (the cloud always binds one)",
            );
            return None;
        };
        if list.get_ref().is_empty() {
            d.err(
                list.span(),
                item,
                "an instance needs at least one security group (the cloud always binds one)",
            );
            return None;
        }
        if list.get_ref().len() > limits.security_groups_per_instance {
            d.err(
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
            match d.resolve(sg_names, "security_group", g, item) {
                Some(id) if out.contains(&SgId(id)) => {
                    d.err(
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

    /// Gives each basic-network instance its address (docs/semantics.md, 2.10): the one the
    /// lock records, or, the first time the instance appears, a new one: a hash of its name,
    /// probing upwards over the addresses no lock entry holds, in file order. The pool's
    /// network, gateway (first usable) and broadcast addresses are never given. Returns the
    /// allocations: the lock's, the new ones, and the VPC instances the lock knew as basic,
    /// now marked migrated.
    pub(super) fn allocate_basic(
        &self,
        d: &mut Diagnostics,
        instances: &mut [Option<Instance>],
    ) -> Allocations {
        let (f, basic, lock) = (self.f, self.basic.as_ref(), self.lock);
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
            .chain(lock.vip.values().filter_map(|&a| slot_of(a)))
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
                    d.err(span, item, "the instance moved from the basic network into a VPC (the lock file records it): migration is one-way");
                }
                Some(a) if slot_of(a.address).is_some() => inst.ip = a.address,
                Some(a) => d.err(
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
                d.err(
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
}

/// What is wrong with `addr` as the Elastic IP of `owner` (an instance or a load balancer,
/// as errors name it): outside `[internet] cidr`, the internet's own address, its network or
/// broadcast address, or already bound (`eips`: each bound address's owner, `owner` added).
pub(super) fn eip_problem(
    net: &Internet,
    addr: Ipv4Addr,
    owner: String,
    eips: &mut HashMap<Ipv4Addr, String>,
) -> Option<String> {
    if !net.cidr.contains(&addr) {
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
        (eips.insert(addr, owner)).map(|other| format!("eip {addr} is already bound to {other}"))
    }
}

/// An instance's `netns`: a valid namespace name that no other instance (nor the internet)
/// uses; `namespaces` holds the names given so far.
fn check_netns(
    d: &mut Diagnostics,
    i: &file::Instance,
    item: &str,
    namespaces: &mut HashMap<String, String>,
) {
    let Some(ns) = &i.netns else { return };
    let n = ns.get_ref();
    if n.is_empty() || n.len() > 64 || n.contains('/') || n.contains(char::is_whitespace) {
        d.err(
            ns.span(),
            item,
            format!("netns \"{n}\" is not a valid namespace name"),
        );
    } else if let Some(other) =
        namespaces.insert(n.clone(), format!("instance \"{}\"", i.name.get_ref()))
    {
        d.err(
            ns.span(),
            item,
            format!("netns \"{n}\" is already {other}'s"),
        );
    }
}

fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
