//! What a topology change invalidates (docs/control-plane.md, "What a change invalidates").
//!
//! A cached decision was taken in the address space (a VPC, the basic network) its origin
//! names: a local sender's, a remote sender's, the space the internet gateway relayed a
//! packet into, or for a packet from the internet's device the space of the Elastic IP's
//! owner. A decision for a public destination, or from the internet's device, also read the
//! Elastic IPs (the "internet" space: each address with its owner, the owner's space, address
//! and host, and the internet channels' keys), since the gateway relays a packet for an
//! Elastic IP back in. Each flow-cache entry records those spaces ([`Deps`], space indexes
//! of the topology it was taken in).
//!
//! A decision reads more than its own space: the spaces its space is linked to (peerings,
//! interconnects, a route to an instance elsewhere), which with it form its *component*. On a
//! change, every space of both topologies is described by name ([`Prints`]: its VPC, subnets,
//! route tables, ACLs, instances with their hosts, addresses, Elastic IPs and security
//! groups, each group's rules and the members of every group an `sg:` rule names, its
//! peerings, interconnects and channel keys), ids replaced by names so that the file's order
//! does not matter. A space is kept when every space of its component has the same
//! description in the new topology; an entry is kept when all its spaces are, its ids
//! (instances, hosts, ACLs, security groups) renumbered by name ([`Carry`]). Whatever is
//! global (the underlay, the connection-table settings and limits, the hosts, the internet
//! gateway, the basic network's block) changing drops every entry.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use hashbrown::{HashMap, HashSet};

use super::decide::{Origin, is_public};
use super::flow::{FROM_INTERNET, FROM_UNDERLAY, FlowKey, Hit};
use super::{Decision, Dropped, RuleRef};
use crate::policy::route::NextHop;
use crate::policy::rules::{Peer, Rule};
use crate::topology::{AclId, HostId, InstanceId, SgId, Space, Topology};

/// No space (a packet from the internet for an address no instance owns).
pub(super) const NO_SPACE: u32 = ELASTIC_IPS - 1;
/// The bit of [`Deps`] that says the decision read the Elastic IPs.
const ELASTIC_IPS: u32 = 1 << 31;

/// The spaces a cached decision depended on, in one word (it fits the padding of a cache
/// slot): a space index of [`space_index`] (or [`NO_SPACE`]), and [`ELASTIC_IPS`] when it
/// also read the Elastic IPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Deps(u32);

/// The index of a space: a VPC's id, then the basic network, then the internet (its Elastic
/// IPs).
pub(super) fn space_index(topo: &Topology, s: Space) -> u32 {
    match s {
        Space::Vpc(v) => v.0,
        Space::Basic => topo.vpcs.len() as u32,
    }
}

fn internet_index(topo: &Topology) -> u32 {
    topo.vpcs.len() as u32 + 1
}

impl Deps {
    /// The spaces a decision for a packet from `origin` to `dst` depends on: the origin's
    /// (for a packet from the internet's device, the Elastic IP owner's), and for a public
    /// destination (which may be an Elastic IP, the gateway relaying it back in) or a packet
    /// from the internet's device, the Elastic IPs.
    pub fn of(topo: &Topology, origin: Origin, dst: Ipv4Addr) -> Deps {
        let of = |id: InstanceId| space_index(topo, topo.instance(id).space());
        let public = is_public(dst) || topo.eip_owner(dst).is_some();
        let (space, eips) = match origin {
            Origin::Local { id, .. } | Origin::Remote { source: id, .. } => (of(id), public),
            Origin::Internet {
                relayed: Some((_, space)),
            } => (space_index(topo, space), public),
            Origin::Internet { relayed: None } => (topo.eip_owner(dst).map_or(NO_SPACE, of), true),
        };
        Deps(space | if eips { ELASTIC_IPS } else { 0 })
    }
}

/// A topology described by name: what is global, and each space's description, name and
/// component (the smallest space index linked to it).
struct Prints {
    global: String,
    names: Vec<String>,
    prints: Vec<String>,
    component: Vec<u32>,
}

/// One line per item of each space; sorted, so that the file's order does not matter.
struct Lines<'t> {
    topo: &'t Topology,
    lines: Vec<Vec<String>>,
    /// Union-find parents, by space index.
    parent: Vec<u32>,
    /// The groups already described in a space: (space, group).
    described: HashSet<(u32, u32)>,
    /// Each group's members line, once made.
    members: HashMap<u32, String>,
}

impl<'t> Lines<'t> {
    fn space_name(&self, s: Space) -> String {
        match s {
            Space::Vpc(v) => format!("vpc:{}", self.topo.vpc(v).name),
            Space::Basic => "basic".into(),
        }
    }

    fn push(&mut self, space: u32, line: String) {
        self.lines[space as usize].push(line);
    }

    fn root(&mut self, mut s: u32) -> u32 {
        while self.parent[s as usize] != s {
            s = self.parent[s as usize];
        }
        s
    }

    /// Spaces `a` and `b` are linked: a decision in one may read the other.
    fn link(&mut self, a: u32, b: u32) {
        let (a, b) = (self.root(a), self.root(b));
        let (lo, hi) = (a.min(b), a.max(b));
        self.parent[hi as usize] = lo;
    }

    /// A rule as its decision reads it (the file's line left out), `sg:` peers by name.
    fn rule(&self, r: &Rule) -> String {
        let peer = match r.peer {
            Peer::Cidr(c) => c.to_string(),
            Peer::Group(g) => format!("sg:{}", self.topo.security_groups[g.index()].name),
        };
        format!("{:?} {:?} {:?} {peer}", r.action, r.protocol, r.ports)
    }

    fn rules(&self, rules: &[Rule]) -> String {
        let all: Vec<String> = rules.iter().map(|r| self.rule(r)).collect();
        all.join("; ")
    }

    /// The members of every group an `sg:` peer of `rules` names, wherever they are.
    fn members_of(&mut self, space: u32, rules: &[Rule]) {
        for r in rules {
            if let Peer::Group(g) = r.peer {
                let line = match self.members.get(&g.0) {
                    Some(line) => line.clone(),
                    None => self.members_line(g),
                };
                self.push(space, line);
            }
        }
    }

    /// The line of group `g`'s members (made once per topology).
    fn members_line(&mut self, g: SgId) -> String {
        let t = self.topo;
        let mut m: Vec<String> = (t.instances.iter())
            .filter(|i| i.security_groups.contains(&g))
            .map(|i| format!("{} {} {}", self.space_name(i.space()), i.name, i.ip))
            .collect();
        m.sort();
        let name = &t.security_groups[g.index()].name;
        let line = format!("members sg:{name} = {}", m.join(", "));
        self.members.insert(g.0, line.clone());
        line
    }

    /// A security group an instance of `space` is in: its rules, and the members of the
    /// groups they name (once per space).
    fn group(&mut self, space: u32, g: SgId) {
        if !self.described.insert((space, g.0)) {
            return;
        }
        let t = self.topo;
        let sg = &t.security_groups[g.index()];
        let line = format!(
            "sg {} in [{}] out [{}]",
            sg.name,
            self.rules(&sg.ingress),
            self.rules(&sg.egress)
        );
        self.push(space, line);
        self.members_of(space, &sg.ingress);
        self.members_of(space, &sg.egress);
    }
}

impl<'t> Lines<'t> {
    fn new(topo: &'t Topology) -> Lines<'t> {
        let n = topo.vpcs.len() + 2;
        Lines {
            topo,
            lines: vec![Vec::new(); n],
            parent: (0..n as u32).collect(),
            described: HashSet::new(),
            members: HashMap::new(),
        }
    }

    fn vpcs(&mut self) {
        let t = self.topo;
        for (v, x) in t.vpcs.iter().enumerate() {
            let rt = &t.route_tables[x.default_route_table.index()].name;
            let line = format!(
                "vpc {} tenant {} {} key {} {} {:?} default {rt}",
                x.name, x.tenant, x.cidr, x.key, x.key_assigned, x.region
            );
            self.push(v as u32, line);
        }
        for s in &t.subnets {
            let acl = s.acl.map_or("-", |a| t.acls[a.index()].name.as_str());
            let rt = &t.route_tables[s.route_table.index()].name;
            let line = format!(
                "subnet {} {} rt {rt} acl {acl} {}",
                s.name, s.cidr, s.gateway
            );
            self.push(s.vpc.0, line);
        }
        for a in &t.acls {
            let line = format!(
                "acl {} in [{}] out [{}]",
                a.name,
                self.rules(&a.ingress),
                self.rules(&a.egress)
            );
            self.push(a.vpc.0, line);
            self.members_of(a.vpc.0, &a.ingress);
            self.members_of(a.vpc.0, &a.egress);
        }
    }

    /// Route tables, their next hops by name; a hop to an instance links its space.
    fn route_tables(&mut self) {
        let t = self.topo;
        for rt in &t.route_tables {
            let mut routes = Vec::new();
            for r in rt.routes.as_slice() {
                let hop = match r.next_hop {
                    NextHop::Drop => "drop".to_string(),
                    NextHop::Internet => "internet".to_string(),
                    NextHop::Instance(i) => {
                        let space = space_index(t, t.instance(i).space());
                        self.link(rt.vpc.0, space);
                        format!("instance:{}", t.instance(i).name)
                    }
                    NextHop::Peering(p) => format!("peering:{}", t.peerings[p.index()].name),
                };
                routes.push(format!("{} {hop}", r.destination));
            }
            let line = format!("rt {} {} [{}]", rt.name, rt.implicit, routes.join("; "));
            self.push(rt.vpc.0, line);
        }
    }
}

impl<'t> Lines<'t> {
    /// Instances, in their spaces (and their Elastic IPs in the internet's).
    fn instances(&mut self) {
        let t = self.topo;
        for i in &t.instances {
            let space = space_index(t, i.space());
            let groups: Vec<&str> = (i.security_groups.iter())
                .map(|g| t.security_groups[g.index()].name.as_str())
                .collect();
            let tenant = match &i.network {
                crate::topology::Network::Basic { tenant } => tenant.as_str(),
                crate::topology::Network::Vpc { .. } => "-",
            };
            let subnet = i.subnet().map_or("-", |s| t.subnet(s).name.as_str());
            let line = format!(
                "instance {} host {} {} {}/{} eip {:?} sgs {groups:?} {:?} check {} {tenant}",
                i.name,
                t.host(i.host).name,
                subnet,
                i.ip,
                i.prefix,
                i.eip,
                i.netns,
                i.source_check,
            );
            self.push(space, line);
            for &g in &i.security_groups {
                self.group(space, g);
            }
            if let Some(eip) = i.eip {
                let (host, space) = (&t.host(i.host).name, self.space_name(i.space()));
                let line = format!("eip {eip} {} {space} {} host {host}", i.name, i.ip);
                self.push(internet_index(t), line);
            }
        }
    }

    /// Peerings, interconnects and channel keys, in every space they touch.
    fn links(&mut self) {
        let t = self.topo;
        let basic = space_index(t, Space::Basic);
        for p in &t.peerings {
            let [a, b] = p.vpcs;
            let line = format!(
                "peering {} {} {} {:?}",
                p.name,
                t.vpc(a).name,
                t.vpc(b).name,
                p.keys
            );
            self.push(a.0, line.clone());
            self.push(b.0, line);
            self.link(a.0, b.0);
        }
        for c in &t.interconnects {
            let line = format!(
                "interconnect {} {}",
                t.instance(c.instance).name,
                t.vpc(c.vpc).name
            );
            self.push(c.vpc.0, line.clone());
            self.push(basic, line);
            self.link(c.vpc.0, basic);
        }
        let mut channels: Vec<_> = t.channels().collect();
        channels.sort();
        for (key, c) in channels {
            let line = format!("channel {} {key}", t.channel_name(c));
            for s in channel_spaces(t, c) {
                self.push(s, line.clone());
            }
        }
    }
}

/// The spaces a channel concerns.
fn channel_spaces(t: &Topology, c: crate::topology::Channel) -> Vec<u32> {
    use crate::topology::Channel;
    let basic = space_index(t, Space::Basic);
    match c {
        Channel::Vpc(v) => vec![v.0],
        Channel::Peering { peering, .. } => t.peerings[peering.index()].vpcs.map(|v| v.0).to_vec(),
        Channel::Interconnect { vpc, .. } => vec![vpc.0, basic],
        Channel::Internet { space, .. } => vec![space_index(t, space), internet_index(t)],
        Channel::Appliance(x) => vec![space_index(t, t.instance(x).space())],
        Channel::Basic => vec![basic],
    }
}

/// What every decision may read: the settings, the hosts, the internet gateway, the basic
/// network's block.
fn global(t: &Topology) -> String {
    let mut hosts: Vec<String> = (t.hosts.iter())
        .map(|h| format!("{} {} {}", h.name, h.address, h.region))
        .collect();
    hosts.sort();
    let internet = t.internet.as_ref().map(|i| {
        let gw = &t.host(i.gateway).name;
        format!("{} {gw} {:?} {}", i.cidr, i.netns, i.client)
    });
    let mut s = String::new();
    let _ = write!(
        s,
        "{:?} {:?} {:?} {:?} {internet:?} {hosts:?}",
        t.underlay, t.conntrack, t.limits, t.basic
    );
    s
}

impl Prints {
    fn of(topo: &Topology) -> Prints {
        let mut l = Lines::new(topo);
        l.vpcs();
        l.route_tables();
        l.instances();
        l.links();
        let n = l.lines.len() as u32;
        let component = (0..n).map(|s| l.root(s)).collect();
        let mut names: Vec<String> = (topo.vpcs.iter())
            .map(|v| format!("vpc:{}", v.name))
            .collect();
        names.extend(["basic".to_string(), "internet".to_string()]);
        let prints = (l.lines.into_iter())
            .map(|mut x| {
                x.sort();
                x.join("\n")
            })
            .collect();
        Prints {
            global: global(topo),
            names,
            prints,
            component,
        }
    }
}

/// How the entries of the old topology carry over to the new one: old index to new, or
/// `u32::MAX` for what is gone (or, for spaces, changed).
#[derive(Debug)]
pub(super) struct Carry {
    space: Vec<u32>,
    /// The Elastic IPs are kept.
    eips: bool,
    instance: Vec<u32>,
    host: Vec<u32>,
    acl: Vec<u32>,
    sg: Vec<u32>,
}

/// Old index to new of items named by `old_names` and `new_names`.
fn by_name(
    old_names: impl Iterator<Item = String>,
    new_names: impl Iterator<Item = String>,
) -> Vec<u32> {
    let new: HashMap<String, u32> = new_names.zip(0..).collect();
    old_names
        .map(|n| new.get(&n).copied().unwrap_or(u32::MAX))
        .collect()
}

impl Carry {
    /// The carry from `old` to `new`; `None` when something global changed (every entry is
    /// retaken).
    pub fn between(old: &Topology, new: &Topology) -> Option<Carry> {
        // A load balancer's change is global: which addresses are VIPs and backends decides
        // which flows may be cached at all.
        let (a, b) = (Prints::of(old), Prints::of(new));
        if a.global != b.global || balancers_differ(old, new) {
            return None;
        }
        let renamed = by_name(a.names.iter().cloned(), b.names.iter().cloned());
        let same =
            |s: usize| renamed[s] != u32::MAX && a.prints[s] == b.prints[renamed[s] as usize];
        let dirty: Vec<u32> = (0..a.prints.len())
            .filter(|&s| !same(s))
            .map(|s| a.component[s])
            .collect();
        let space: Vec<u32> = (0..a.prints.len())
            .map(|s| match dirty.contains(&a.component[s]) {
                true => u32::MAX,
                false => renamed[s],
            })
            .collect();
        let acl = |t: &Topology| -> Vec<String> {
            (t.acls.iter())
                .map(|x| format!("{}/{}", t.vpc(x.vpc).name, x.name))
                .collect()
        };
        let eips = Carry::map(&space, internet_index(old)).is_some();
        Some(Carry {
            space,
            eips,
            instance: by_name(
                old.instances.iter().map(|i| i.name.clone()),
                new.instances.iter().map(|i| i.name.clone()),
            ),
            host: by_name(
                old.hosts.iter().map(|h| h.name.clone()),
                new.hosts.iter().map(|h| h.name.clone()),
            ),
            acl: by_name(acl(old).into_iter(), acl(new).into_iter()),
            sg: by_name(
                old.security_groups.iter().map(|g| g.name.clone()),
                new.security_groups.iter().map(|g| g.name.clone()),
            ),
        })
    }

    fn map(table: &[u32], old: u32) -> Option<u32> {
        table.get(old as usize).copied().filter(|&n| n != u32::MAX)
    }

    /// The entry's spaces in the new topology, if all of them are kept.
    pub fn deps(&self, d: Deps) -> Option<Deps> {
        if d.0 & ELASTIC_IPS != 0 && !self.eips {
            return None;
        }
        let space = match d.0 & !ELASTIC_IPS {
            NO_SPACE => NO_SPACE,
            s => Carry::map(&self.space, s)?,
        };
        Some(Deps(space | (d.0 & ELASTIC_IPS)))
    }

    fn instance(&self, id: InstanceId) -> Option<InstanceId> {
        Carry::map(&self.instance, id.0).map(InstanceId)
    }

    /// The key with its ingress renumbered.
    pub fn key(&self, k: FlowKey) -> Option<FlowKey> {
        let ingress = match k.ingress {
            FROM_INTERNET => FROM_INTERNET,
            i if i & FROM_UNDERLAY != 0 => {
                FROM_UNDERLAY | Carry::map(&self.host, i & !FROM_UNDERLAY)?
            }
            i => Carry::map(&self.instance, i)?,
        };
        Some(FlowKey { ingress, ..k })
    }

    /// The hit with its decision and receiver renumbered.
    pub fn hit(&self, h: Hit) -> Option<Hit> {
        let receiver = match h.receiver {
            Some(r) => Some(self.instance(r)?),
            None => None,
        };
        Some(Hit {
            decision: self.decision(h.decision)?,
            receiver,
            ..h
        })
    }

    fn decision(&self, d: Decision) -> Option<Decision> {
        Some(match d {
            Decision::Deliver { to, strip, nat } => Decision::Deliver {
                to: self.instance(to)?,
                strip,
                nat,
            },
            Decision::Encapsulate {
                strip,
                host,
                key,
                nat,
            } => Decision::Encapsulate {
                strip,
                host: HostId(Carry::map(&self.host, host.0)?),
                key,
                nat,
            },
            Decision::EchoReply { to } => Decision::EchoReply {
                to: self.instance(to)?,
            },
            Decision::FragNeeded { to, mtu } => Decision::FragNeeded {
                to: self.instance(to)?,
                mtu,
            },
            Decision::ToInternet { .. } => d,
            Decision::Drop(x) => Decision::Drop(Dropped {
                reason: x.reason,
                rule: match x.rule {
                    Some(r) => Some(self.rule(r)?),
                    None => None,
                },
            }),
        })
    }

    fn rule(&self, r: RuleRef) -> Option<RuleRef> {
        Some(match r {
            RuleRef::Acl { acl, rule } => RuleRef::Acl {
                acl: AclId(Carry::map(&self.acl, acl.0)?),
                rule,
            },
            RuleRef::SecurityGroup { group, rule } => RuleRef::SecurityGroup {
                group: SgId(Carry::map(&self.sg, group.0)?),
                rule,
            },
            RuleRef::SecurityGroupsEnd { instance } => RuleRef::SecurityGroupsEnd {
                instance: self.instance(instance)?,
            },
        })
    }
}

/// True when the load balancers changed (ids included: conservative).
fn balancers_differ(old: &Topology, new: &Topology) -> bool {
    let names = |t: &Topology| -> Vec<String> {
        t.load_balancers
            .iter()
            .flat_map(|lb| lb.listeners.iter().flat_map(|l| l.backends.iter()))
            .map(|b| t.instance(b.instance).name.clone())
            .collect()
    };
    old.load_balancers != new.load_balancers || names(old) != names(new)
}
