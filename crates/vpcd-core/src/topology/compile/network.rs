//! The network: hosts, VPCs, peerings, subnets, basic-network interconnects, and the GRE key
//! of every channel between them.

use std::net::Ipv4Addr;
use std::ops::Range;

use hashbrown::HashMap;
use ipnet::Ipv4Net;

use super::super::file::Text;
use super::super::model::*;
use super::Scope;
use super::diagnostics::{Diagnostics, label};

impl Scope<'_> {
    pub(super) fn check_hosts(&self, d: &mut Diagnostics) -> Vec<Option<Host>> {
        let f = self.f;
        let mut seen: HashMap<Ipv4Addr, String> = HashMap::new();
        f.hosts
            .iter()
            .map(|h| {
                let h = h.get_ref();
                let item = label("host", &h.name);
                let address = d.address(&h.address, &item, "address")?;
                if address.is_unspecified() || address.is_broadcast() || address.is_multicast() {
                    d.err(
                        h.address.span(),
                        &item,
                        format!("address {address} cannot be a host's"),
                    );
                    return None;
                }
                if let Some(other) = seen.insert(address, h.name.get_ref().clone()) {
                    d.err(
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

    pub(super) fn check_vpcs(&self, d: &mut Diagnostics) -> Vec<Option<Vpc>> {
        let f = self.f;
        let mut keys: HashMap<u32, String> = HashMap::new();
        let mut out: Vec<Option<Vpc>> = f
            .vpcs
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let v = v.get_ref();
                let item = label("vpc", &v.name);
                if v.tenant.get_ref().trim().is_empty() {
                    d.err(v.tenant.span(), &item, "tenant is empty");
                }
                let cidr = d.cidr(&v.cidr, &item, "cidr", false)?;
                if let Err(m) = private_vpc_cidr(cidr) {
                    d.err(v.cidr.span(), &item, m);
                    return None;
                }
                let key = match &v.key {
                    Some(k) => {
                        let key = d.int_in(k, &item, "key", 0..(1 << 32))? as u32;
                        if let Some(other) = keys.insert(key, v.name.get_ref().clone()) {
                            d.err(
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
                    // The implicit default tables follow the file's route tables.
                    default_route_table: RouteTableId((f.route_tables.len() + i) as u32),
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

    pub(super) fn check_peerings(&self, d: &mut Diagnostics) -> Vec<Option<Peering>> {
        let (f, vpc_names, vpcs) = (self.f, &self.names.vpc, &self.vpcs);
        let mut pairs: HashMap<(u32, u32), String> = HashMap::new();
        f.peerings
            .iter()
            .map(|p| {
                let p = p.get_ref();
                let item = label("peering", &p.name);
                let list = p.vpcs.get_ref();
                if list.len() != 2 {
                    d.err(
                        p.vpcs.span(),
                        &item,
                        format!(
                            "vpcs names {} VPCs; a peering joins exactly two",
                            list.len()
                        ),
                    );
                    return None;
                }
                let a = d.resolve(vpc_names, "vpc", &list[0], &item);
                let b = d.resolve(vpc_names, "vpc", &list[1], &item);
                let (a, b) = (a?, b?);
                if a == b {
                    d.err(p.vpcs.span(), &item, "a VPC cannot peer with itself");
                    return None;
                }
                let (va, vb) = (vpcs[a as usize].as_ref()?, vpcs[b as usize].as_ref()?);
                if overlaps(va.cidr, vb.cidr) {
                    d.err(
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
                    d.err(
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

    /// The VPC each route table names.
    pub(super) fn route_table_vpcs(&self, d: &mut Diagnostics) -> Vec<Option<u32>> {
        self.f
            .route_tables
            .iter()
            .map(|t| {
                let t = t.get_ref();
                d.resolve(
                    &self.names.vpc,
                    "vpc",
                    &t.vpc,
                    &label("route_table", &t.name),
                )
            })
            .collect()
    }

    pub(super) fn check_subnets(&self, d: &mut Diagnostics) -> Vec<Option<Subnet>> {
        let (f, vpc_names, vpcs) = (self.f, &self.names.vpc, &self.vpcs);
        let mut placed: Vec<(u32, Ipv4Net, String)> = Vec::new();
        f.subnets
            .iter()
            .map(|s| {
                let s = s.get_ref();
                let item = label("subnet", &s.name);
                let vpc = d.resolve(vpc_names, "vpc", &s.vpc, &item);
                let cidr = d.cidr(&s.cidr, &item, "cidr", false);
                // The route table and the ACL are both checked: one bad reference does not
                // hide the other.
                let route_table = self.subnet_route_table(d, s.route_table.as_ref(), &item, vpc);
                let acl = self.subnet_acl(d, s.acl.as_ref(), &item, vpc);
                let (vpc, cidr, route_table, acl) = (vpc?, cidr?, route_table?, acl?);
                let v = vpcs[vpc as usize].as_ref()?;
                if !v.cidr.contains(&cidr) {
                    d.err(
                        s.cidr.span(),
                        &item,
                        format!("cidr {cidr} lies outside vpc \"{}\" ({})", v.name, v.cidr),
                    );
                    return None;
                }
                if cidr.prefix_len() > 28 {
                    d.err(
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
                    d.err(
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
                    route_table: route_table.unwrap_or(v.default_route_table),
                    acl,
                    gateway: nth(cidr, 1),
                })
            })
            .collect()
    }

    /// A subnet's route table: `Some(None)` when it names none, `None` when the name is wrong
    /// or names a table of another VPC than the subnet's `vpc`.
    fn subnet_route_table(
        &self,
        d: &mut Diagnostics,
        table: Option<&Text>,
        item: &str,
        vpc: Option<u32>,
    ) -> Option<Option<RouteTableId>> {
        let Some(t) = table else { return Some(None) };
        match d.resolve(&self.names.table, "route_table", t, item) {
            Some(id) if matches!((self.table_vpcs[id as usize], vpc), (Some(tv), Some(v)) if tv != v) =>
            {
                d.err(
                    t.span(),
                    item,
                    format!("route_table \"{}\" belongs to another VPC", t.get_ref()),
                );
                None
            }
            id => id.map(|id| Some(RouteTableId(id))),
        }
    }

    /// A subnet's ACL: `Some(None)` when it names none, `None` when the name is wrong or
    /// names an ACL of another VPC than the subnet's `vpc`.
    fn subnet_acl(
        &self,
        d: &mut Diagnostics,
        acl: Option<&Text>,
        item: &str,
        vpc: Option<u32>,
    ) -> Option<Option<AclId>> {
        let Some(a) = acl else { return Some(None) };
        match d.resolve(&self.names.acl, "acl", a, item) {
            Some(id) if matches!((self.acls.get(id as usize), vpc), (Some(Some(acl)), Some(v)) if acl.vpc.0 != v) =>
            {
                d.err(
                    a.span(),
                    item,
                    format!("acl \"{}\" belongs to another VPC", a.get_ref()),
                );
                None
            }
            id => id.map(|id| Some(AclId(id))),
        }
    }

    /// Basic-network interconnects: one VPC per instance, of the same tenant and region,
    /// whose CIDR does not overlap the basic pool.
    pub(super) fn check_interconnects(&self, d: &mut Diagnostics) -> Vec<Option<Interconnect>> {
        let (f, instance_names, vpc_names) = (self.f, &self.names.instance, &self.names.vpc);
        let (instances, vpcs, hosts) = (&self.instances, &self.vpcs, &self.hosts);
        let basic = self.basic.as_ref();
        let mut linked: HashMap<u32, String> = HashMap::new();
        f.interconnects
            .iter()
            .map(|ic| {
                let r = ic.get_ref();
                let item = format!("interconnect ({} -> {})", r.instance.get_ref(), r.vpc.get_ref());
                let inst = d.resolve(instance_names, "instance", &r.instance, &item);
                let vpc = d.resolve(vpc_names, "vpc", &r.vpc, &item);
                let (inst, vpc) = (inst?, vpc?);
                let (i, v) = (instances[inst as usize].as_ref()?, vpcs[vpc as usize].as_ref()?);
                let Network::Basic { tenant } = &i.network else {
                    d.err(r.instance.span(), &item, format!("instance \"{}\" is not in the basic network", i.name));
                    return None;
                };
                if *tenant != v.tenant {
                    d.err(
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
                    d.err(
                        r.vpc.span(),
                        &item,
                        format!("instance \"{}\" runs in region \"{host_region}\", vpc \"{}\" is in \"{vpc_region}\": an interconnect stays within one region", i.name, v.name),
                    );
                    return None;
                }
                if let Some(pool) = basic
                    && overlaps(pool.cidr, v.cidr)
                {
                    d.err(
                        r.vpc.span(),
                        &item,
                        format!("vpc \"{}\" ({}) overlaps the basic pool {}", v.name, v.cidr, pool.cidr),
                    );
                    return None;
                }
                if let Some(other) = linked.insert(inst, v.name.clone()) {
                    d.err(
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
    pub(super) fn channel_keys(&self, d: &mut Diagnostics) -> Vec<(Channel, u32)> {
        let mut uses: Vec<KeyUse> = Vec::new();
        self.vpc_keys(&mut uses);
        self.peering_keys(&mut uses);
        self.interconnect_keys(&mut uses);
        self.internet_keys(&mut uses);
        self.appliance_keys(&mut uses);
        key_collisions(d, &uses);
        uses.into_iter().map(|u| (u.channel, u.key)).collect()
    }

    /// The name of a checked VPC ("?" for one that failed its checks).
    fn vpc_name(&self, v: VpcId) -> &str {
        self.vpcs[v.index()]
            .as_ref()
            .map_or("?", |v| v.name.as_str())
    }

    /// Each VPC's key, at the written key or else at the VPC's name.
    fn vpc_keys(&self, uses: &mut Vec<KeyUse>) {
        for (i, v) in self.vpcs.iter().enumerate() {
            let Some(v) = v else { continue };
            let raw = self.f.vpcs[i].get_ref();
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
    }

    /// A peering's two keys, one into each of its VPCs.
    fn peering_keys(&self, uses: &mut Vec<KeyUse>) {
        for (i, p) in self.peerings.iter().enumerate() {
            let Some(p) = p else { continue };
            for to in p.vpcs {
                let name = format!("peering:{}>{}", p.name, self.vpc_name(to));
                let what = format!(
                    "the key of peering \"{}\" into vpc \"{}\"",
                    p.name,
                    self.vpc_name(to)
                );
                let c = Channel::Peering {
                    peering: PeeringId(i as u32),
                    to,
                };
                let span = self.f.peerings[i].get_ref().name.span();
                uses.push(KeyUse::derived(c, KeyClass::Peering, &name, span, what));
            }
        }
    }

    /// The two keys of a VPC's interconnect (one per direction), once per linked VPC.
    fn interconnect_keys(&self, uses: &mut Vec<KeyUse>) {
        let mut linked: Vec<VpcId> = Vec::new();
        for (j, ic) in self.interconnects.iter().enumerate() {
            let Some(ic) = ic else { continue };
            if linked.contains(&ic.vpc) {
                continue;
            }
            linked.push(ic.vpc);
            for to_basic in [false, true] {
                let dir = if to_basic { "basic" } else { "vpc" };
                let name = format!("interconnect:{}>{dir}", self.vpc_name(ic.vpc));
                let what = format!(
                    "the key of vpc \"{}\"'s interconnect (towards the {dir})",
                    self.vpc_name(ic.vpc)
                );
                let c = Channel::Interconnect {
                    vpc: ic.vpc,
                    to_basic,
                };
                let span = self.f.interconnects[j].span();
                uses.push(KeyUse::derived(
                    c,
                    KeyClass::Interconnect,
                    &name,
                    span,
                    what,
                ));
            }
        }
    }

    /// With an internet gateway, the two internet keys (in, out) of every address space.
    fn internet_keys(&self, uses: &mut Vec<KeyUse>) {
        let internet = matches!(self.internet, Some(Some(_)));
        let Some(raw) = self.f.internet.as_ref().filter(|_| internet) else {
            return;
        };
        let spaces = self
            .vpcs
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                v.as_ref()
                    .map(|v| (Space::Vpc(VpcId(i as u32)), format!("vpc:{}", v.name)))
            })
            .chain(
                self.basic
                    .is_some()
                    .then(|| (Space::Basic, "basic".to_string())),
            );
        for (space, label) in spaces.collect::<Vec<_>>() {
            for inbound in [true, false] {
                let dir = if inbound { "in" } else { "out" };
                let name = format!("internet:{label}>{dir}");
                let what = format!("the key of {label}'s internet channel ({dir})");
                let c = Channel::Internet { space, inbound };
                uses.push(KeyUse::derived(
                    c,
                    KeyClass::Internet,
                    &name,
                    raw.span(),
                    what,
                ));
            }
        }
    }

    /// The key of every appliance (an instance with `source_check = false`).
    fn appliance_keys(&self, uses: &mut Vec<KeyUse>) {
        for (i, inst) in self.instances.iter().enumerate() {
            let Some(inst) = inst.as_ref().filter(|i| !i.source_check) else {
                continue;
            };
            let name = format!("appliance:{}", inst.name);
            let what = format!("the key of appliance \"{}\"", inst.name);
            let span = self.f.instances[i].get_ref().name.span();
            let c = Channel::Appliance(InstanceId(i as u32));
            uses.push(KeyUse::derived(c, KeyClass::Appliance, &name, span, what));
        }
    }
}

fn key_collisions(d: &mut Diagnostics, uses: &[KeyUse]) {
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
        d.err(at.span.clone(), item, message);
    }
}

/// The cloud's VPC ranges: 10/8 and 172.16/12 from /12, 192.168/16 from /16, down to /28.
/// The private ranges (RFC 1918), with the largest VPC each allows.
pub(super) fn private_ranges() -> [(Ipv4Net, u8); 3] {
    [
        (Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 8), 12),
        (Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 0, 0), 12), 12),
        (Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 0, 0), 16), 16),
    ]
}

pub(super) fn private_vpc_cidr(c: Ipv4Net) -> Result<(), String> {
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

pub(super) fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

pub(super) fn nth(net: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

/// Why `ip` is reserved in `subnet`: the network address, the gateway (first usable) and the
/// broadcast address (docs/semantics.md, "Networks": the first two addresses and the last one).
pub(super) fn reserved(subnet: Ipv4Net, ip: Ipv4Addr) -> Option<&'static str> {
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

/// A derived GRE key: the class in the top byte, 24 bits of FNV-1a of `name` below.
pub(super) fn derived_key(class: KeyClass, name: &str) -> u32 {
    (class as u32) << 24 | (fnv1a(name.as_bytes()) & 0x00ff_ffff)
}

pub(super) fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
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
    /// A key derived from `name`, never written.
    fn derived(
        channel: Channel,
        class: KeyClass,
        name: &str,
        span: Range<usize>,
        what: String,
    ) -> KeyUse {
        KeyUse::new(channel, derived_key(class, name), span, what, false)
    }

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
pub(super) enum KeyClass {
    Vpc = 1,
    Peering = 2,
    Interconnect = 3,
    Internet = 4,
    Appliance = 5,
}
