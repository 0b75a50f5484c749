//! Load balancers (docs/semantics.md 2.11): a VIP in one network, listeners, backends of that
//! network only, and the VIP's allocation when the file gives none (recorded in the lock file,
//! as a basic instance's address is).

use std::net::Ipv4Addr;

use hashbrown::{HashMap, HashSet};
use ipnet::Ipv4Net;
use toml::Spanned;

use super::super::file;
use super::super::model::*;
use super::Scope;
use super::diagnostics::{Diagnostics, label};
use super::instances::eip_problem;
use super::network::{fnv1a, reserved};

/// The product page's rule, cited by the error that enforces it.
const ONE_NETWORK: &str = "a load balancer cannot be shared between the basic network and a VPC: one CLB never binds a VPC instance and a basic-network instance at the same time, even where the basic-network interconnect links them";

/// Where a load balancer lives, once checked: its network and the range its VIP comes from.
struct Home {
    network: Network,
    space: Space,
    range: Ipv4Net,
    /// The tenant whose instances it serves.
    tenant: String,
}

impl Scope<'_> {
    /// Every `[[load_balancer]]`, with VIPs allocated where none is written.
    pub(super) fn check_load_balancers(
        &mut self,
        d: &mut Diagnostics,
    ) -> Vec<Option<LoadBalancer>> {
        let f = self.f;
        let mut taken: HashMap<(Space, Ipv4Addr), String> = HashMap::new();
        for inst in self.instances.iter().flatten() {
            taken.insert(
                (inst.space(), inst.ip),
                format!("instance \"{}\"", inst.name),
            );
        }
        let mut eips: HashMap<Ipv4Addr, String> = self
            .instances
            .iter()
            .flatten()
            .filter_map(|i| Some((i.eip?, format!("instance \"{}\"", i.name))))
            .collect();
        let homes: Vec<Option<Home>> = f
            .load_balancers
            .iter()
            .map(|raw| self.home(d, raw))
            .collect();
        let mut vips: Vec<Option<Ipv4Addr>> = Vec::new();
        // Written VIPs first, then the lock's, then new allocations: none moves another.
        for (raw, home) in f.load_balancers.iter().zip(&homes) {
            vips.push(
                home.as_ref()
                    .and_then(|h| self.written_vip(d, raw, h, &mut taken)),
            );
        }
        for ((raw, home), vip) in f.load_balancers.iter().zip(&homes).zip(vips.iter_mut()) {
            if let (Some(h), None, None) = (home, &raw.get_ref().vip, &vip) {
                *vip = self.allocated_vip(d, raw, h, &mut taken);
            }
        }
        f.load_balancers
            .iter()
            .zip(homes)
            .zip(vips)
            .map(|((raw, home), vip)| {
                let item = label("load_balancer", &raw.get_ref().name);
                let eip = self.lb_eip(d, raw.get_ref(), &item, &mut eips);
                let listeners = self.listeners(d, raw.get_ref(), &item, home.as_ref());
                let home = home?;
                Some(LoadBalancer {
                    name: raw.get_ref().name.get_ref().clone(),
                    network: home.network,
                    vip: vip?,
                    eip: eip?,
                    listeners: listeners?,
                })
            })
            .collect()
    }

    /// The network of a load balancer, as its keys name it.
    fn home(&self, d: &mut Diagnostics, raw: &Spanned<file::LoadBalancer>) -> Option<Home> {
        let lb = raw.get_ref();
        let item = label("load_balancer", &lb.name);
        let basic = match &lb.network {
            None => false,
            Some(n) if n.get_ref() == "vpc" => false,
            Some(n) if n.get_ref() == "basic" => true,
            Some(n) => {
                let m = format!(
                    "network \"{}\" is neither \"vpc\" nor \"basic\"",
                    n.get_ref()
                );
                d.err(n.span(), &item, m);
                return None;
            }
        };
        if basic {
            return self.basic_home(d, raw, &item);
        }
        if let Some(t) = &lb.tenant {
            d.err(
                t.span(),
                &item,
                "a VPC load balancer takes its tenant from its VPC: remove tenant",
            );
        }
        let (Some(vpc_name), Some(subnet_name)) = (&lb.vpc, &lb.subnet) else {
            d.err(
                raw.span(),
                &item,
                "a VPC load balancer names its vpc and the subnet of its VIP",
            );
            return None;
        };
        let vpc = d.resolve(&self.names.vpc, "vpc", vpc_name, &item);
        let subnet = d.resolve(&self.names.subnet, "subnet", subnet_name, &item);
        let (vpc, subnet) = (vpc?, subnet?);
        let s = self.subnets[subnet as usize].as_ref()?;
        let v = self.vpcs[vpc as usize].as_ref()?;
        if s.vpc.0 != vpc {
            let m = format!("subnet \"{}\" is not in vpc \"{}\"", s.name, v.name);
            d.err(subnet_name.span(), &item, m);
            return None;
        }
        Some(Home {
            network: Network::Vpc {
                vpc: VpcId(vpc),
                subnet: SubnetId(subnet),
            },
            space: Space::Vpc(VpcId(vpc)),
            range: s.cidr,
            tenant: v.tenant.clone(),
        })
    }

    fn basic_home(
        &self,
        d: &mut Diagnostics,
        raw: &Spanned<file::LoadBalancer>,
        item: &str,
    ) -> Option<Home> {
        let lb = raw.get_ref();
        for t in [&lb.vpc, &lb.subnet].into_iter().flatten() {
            d.err(
                t.span(),
                item,
                "a basic-network load balancer takes no vpc or subnet",
            );
        }
        if let Some(t) = &lb.vip {
            d.err(t.span(), item, "a basic-network load balancer's VIP is allocated by the provider from [basic] cidr: remove vip");
        }
        let Some(pool) = self.basic else {
            d.err(
                raw.span(),
                item,
                "network = \"basic\" needs a [basic] section with the provider's pool",
            );
            return None;
        };
        let tenant = match &lb.tenant {
            Some(t) if !t.get_ref().trim().is_empty() => t.get_ref().clone(),
            _ => {
                d.err(
                    raw.span(),
                    item,
                    "a basic-network load balancer names its tenant",
                );
                return None;
            }
        };
        (lb.vpc.is_none() && lb.subnet.is_none() && lb.vip.is_none()).then_some(Home {
            network: Network::Basic {
                tenant: tenant.clone(),
            },
            space: Space::Basic,
            range: pool.cidr,
            tenant,
        })
    }

    /// A VIP the file gives: in its subnet, not reserved, nobody else's.
    fn written_vip(
        &self,
        d: &mut Diagnostics,
        raw: &Spanned<file::LoadBalancer>,
        home: &Home,
        taken: &mut HashMap<(Space, Ipv4Addr), String>,
    ) -> Option<Ipv4Addr> {
        let lb = raw.get_ref();
        let item = label("load_balancer", &lb.name);
        let t = lb.vip.as_ref()?;
        let vip = d.address(t, &item, "vip")?;
        let problem = if !home.range.contains(&vip) {
            Some(format!(
                "vip {vip} lies outside its subnet ({})",
                home.range
            ))
        } else if let Some(why) = reserved(home.range, vip) {
            Some(format!("vip {vip} is reserved in its subnet: {why}"))
        } else {
            let me = format!("load balancer \"{}\"", lb.name.get_ref());
            taken
                .insert((home.space, vip), me)
                .map(|other| format!("vip {vip} is already {other}'s address"))
        };
        match problem {
            Some(m) => {
                d.err(t.span(), &item, m);
                None
            }
            None => Some(vip),
        }
    }

    /// A VIP the provider gives: the lock's, else a hash of the name probing upwards over
    /// the range's usable addresses that no instance, VIP or allocation holds.
    fn allocated_vip(
        &mut self,
        d: &mut Diagnostics,
        raw: &Spanned<file::LoadBalancer>,
        home: &Home,
        taken: &mut HashMap<(Space, Ipv4Addr), String>,
    ) -> Option<Ipv4Addr> {
        let name = raw.get_ref().name.get_ref().clone();
        let mut held: HashSet<Ipv4Addr> = taken
            .keys()
            .filter(|(s, _)| *s == home.space)
            .map(|(_, a)| *a)
            .collect();
        if home.space == Space::Basic {
            held.extend(self.allocations.basic.values().map(|a| a.address));
        }
        held.extend(
            self.allocations
                .vip
                .iter()
                .filter(|(n, _)| **n != name)
                .map(|(_, a)| *a),
        );
        let usable = |a: Ipv4Addr| home.range.contains(&a) && reserved(home.range, a).is_none();
        let vip = match self.lock.vip.get(&name) {
            Some(&a) if usable(a) && !held.contains(&a) => a,
            _ => match probe(home.range, fnv1a(name.as_bytes()), &held) {
                Some(a) => a,
                None => {
                    let m = format!("no address is free in {} for the VIP", home.range);
                    d.err(raw.span(), label("load_balancer", &raw.get_ref().name), m);
                    return None;
                }
            },
        };
        taken.insert((home.space, vip), format!("load balancer \"{name}\""));
        self.allocations.vip.insert(name, vip);
        Some(vip)
    }

    /// A public load balancer's Elastic IP: inside `[internet] cidr`, bound to nothing else.
    fn lb_eip(
        &self,
        d: &mut Diagnostics,
        lb: &file::LoadBalancer,
        item: &str,
        eips: &mut HashMap<Ipv4Addr, String>,
    ) -> Option<Option<Ipv4Addr>> {
        let Some(t) = &lb.eip else { return Some(None) };
        let addr = d.address(t, item, "eip")?;
        let Some(Some(net)) = self.internet.as_ref() else {
            d.err(t.span(), item, "an Elastic IP needs an [internet] section");
            return None;
        };
        let owner = format!("load balancer \"{}\"", lb.name.get_ref());
        match eip_problem(net, addr, owner, eips) {
            Some(m) => {
                d.err(t.span(), item, m);
                None
            }
            None => Some(Some(addr)),
        }
    }

    fn listeners(
        &self,
        d: &mut Diagnostics,
        lb: &file::LoadBalancer,
        item: &str,
        home: Option<&Home>,
    ) -> Option<Vec<Listener>> {
        let mut seen: HashSet<(LbProtocol, u16)> = HashSet::new();
        let mut out = Vec::new();
        let mut ok = true;
        for raw in &lb.listeners {
            match self.listener(d, raw, item, home) {
                Some(l) if !seen.insert((l.protocol, l.port)) => {
                    let m = format!("duplicate listener {} {}", l.protocol.word(), l.port);
                    d.err(raw.span(), item, m);
                    ok = false;
                }
                Some(l) => out.push(l),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn listener(
        &self,
        d: &mut Diagnostics,
        raw: &Spanned<file::Listener>,
        item: &str,
        home: Option<&Home>,
    ) -> Option<Listener> {
        let l = raw.get_ref();
        let protocol = match l.protocol.get_ref().as_str() {
            "tcp" => Some(LbProtocol::Tcp),
            "udp" => Some(LbProtocol::Udp),
            other => {
                let m = format!("listener protocol \"{other}\" is neither \"tcp\" nor \"udp\"");
                d.err(l.protocol.span(), item, m);
                None
            }
        };
        let port = d.int_in(&l.port, item, "listener port", 1..65536);
        let scheduler = match l.scheduler.as_ref().map(|s| s.get_ref().as_str()) {
            None | Some("wrr") => Some(Scheduler::Wrr),
            Some("wlc") => Some(Scheduler::Wlc),
            Some("hash") => Some(Scheduler::Hash),
            Some(other) => {
                let m = format!("scheduler \"{other}\" is none of \"wrr\", \"wlc\", \"hash\"");
                d.err(
                    l.scheduler.as_ref().map_or(raw.span(), |s| s.span()),
                    item,
                    m,
                );
                None
            }
        };
        let health = self.health(d, l.health.as_ref(), item);
        let port = port? as u16;
        let backends = self.backends(d, l, port, item, home);
        Some(Listener {
            protocol: protocol?,
            port,
            scheduler: scheduler?,
            backends: backends?,
            health: health?,
        })
    }

    fn health(
        &self,
        d: &mut Diagnostics,
        raw: Option<&Spanned<file::Health>>,
        item: &str,
    ) -> Option<HealthCheck> {
        let mut h = HealthCheck::default();
        let Some(raw) = raw else { return Some(h) };
        let r = raw.get_ref();
        let mut ok = true;
        let fields = [
            (&r.interval, "health interval", 1..301, &mut h.interval),
            (&r.timeout, "health timeout", 1..301, &mut h.timeout),
            (&r.healthy, "health healthy", 1..11, &mut h.healthy),
            (&r.unhealthy, "health unhealthy", 1..11, &mut h.unhealthy),
        ];
        for (v, what, range, slot) in fields {
            match v.as_ref().map(|v| d.int_in(v, item, what, range)) {
                Some(Some(x)) => *slot = x as u32,
                Some(None) => ok = false,
                None => {}
            }
        }
        if ok && h.timeout > h.interval {
            let m = format!(
                "health timeout {} exceeds its interval {}",
                h.timeout, h.interval
            );
            d.err(raw.span(), item, m);
            return None;
        }
        ok.then_some(h)
    }

    fn backends(
        &self,
        d: &mut Diagnostics,
        l: &file::Listener,
        listener_port: u16,
        item: &str,
        home: Option<&Home>,
    ) -> Option<Vec<Backend>> {
        let mut out = Vec::new();
        let mut ok = true;
        for raw in &l.backends {
            let b = raw.get_ref();
            let id = d.resolve(&self.names.instance, "instance", &b.instance, item);
            let port = b.port.as_ref().map_or(Some(i64::from(listener_port)), |p| {
                d.int_in(p, item, "backend port", 1..65536)
            });
            let weight = b
                .weight
                .as_ref()
                .map_or(Some(10), |w| d.int_in(w, item, "backend weight", 0..101));
            let (Some(id), Some(port), Some(weight)) = (id, port, weight) else {
                ok = false;
                continue;
            };
            let Some(inst) = self.instances[id as usize].as_ref() else {
                ok = false;
                continue;
            };
            if let Some(h) = home
                && let Err(m) = serves(h, inst, &self.vpcs)
            {
                d.err(b.instance.span(), item, m);
                ok = false;
                continue;
            }
            let backend = Backend {
                instance: InstanceId(id),
                port: port as u16,
                weight: weight as u8,
            };
            if out
                .iter()
                .any(|o: &Backend| (o.instance, o.port) == (backend.instance, backend.port))
            {
                let m = format!("backend {}:{} is listed twice", inst.name, backend.port);
                d.err(raw.span(), item, m);
                ok = false;
                continue;
            }
            out.push(backend);
        }
        ok.then_some(out)
    }
}

/// Whether a load balancer at `home` may bind `inst`: an instance of its VPC, or a basic
/// instance of its tenant.
fn serves(home: &Home, inst: &Instance, vpcs: &[Option<Vpc>]) -> Result<(), String> {
    let name = &inst.name;
    match (&home.network, &inst.network) {
        (Network::Vpc { vpc, .. }, Network::Vpc { vpc: theirs, .. }) if vpc == theirs => Ok(()),
        (Network::Vpc { .. }, Network::Vpc { vpc: theirs, .. }) => {
            let other = vpcs[theirs.index()]
                .as_ref()
                .map_or("?", |v| v.name.as_str());
            Err(format!(
                "backend \"{name}\" is in vpc \"{other}\": a VPC load balancer's backends are instances of its own VPC"
            ))
        }
        (Network::Basic { .. }, Network::Basic { tenant }) if *tenant == home.tenant => Ok(()),
        (Network::Basic { .. }, Network::Basic { tenant }) => Err(format!(
            "backend \"{name}\" belongs to tenant \"{tenant}\": a basic-network load balancer's backends are basic instances of its tenant \"{}\"",
            home.tenant
        )),
        (Network::Vpc { .. }, Network::Basic { .. }) => Err(format!(
            "backend \"{name}\" is a basic-network instance: {ONE_NETWORK}"
        )),
        (Network::Basic { .. }, Network::Vpc { .. }) => Err(format!(
            "backend \"{name}\" is a VPC instance: {ONE_NETWORK}"
        )),
    }
}

/// The first usable address of `range` at or after slot `seed` (modulo the usable count),
/// skipping `held`: network, gateway and broadcast addresses are never given.
fn probe(range: Ipv4Net, seed: u32, held: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let base = u32::from(range.network());
    let size = 1u64 << (32 - range.prefix_len());
    let usable = size.saturating_sub(3);
    let start = u64::from(seed) % usable.max(1);
    (0..usable)
        .map(|i| Ipv4Addr::from(base + ((start + i) % usable + 2) as u32))
        .find(|a| !held.contains(a))
}
