//! Load balancing (docs/semantics.md 2.11): the sessions that keep a connection on its
//! backend, the schedulers that pick one for a new connection, and the health the edge
//! reports. Plain data over addresses and time; the pipeline's load-balancing stage
//! (`pipeline::balance`) reads and writes it.
//!
//! A session is made by a connection's first packet to VIP:port on the client's host and
//! lives beside the connection: a TCP session ends [`CLOSING`] after a FIN or RST, any
//! session after [`idle`] without a packet. While it lives, the connection keeps its backend,
//! whatever the topology or health say (a backend removed by a reload, or set to weight 0,
//! drains).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use hashbrown::{HashMap, HashSet};

use super::conntrack::Zone;
use super::rules::{Outcome, Subject};
use crate::time::Timestamp;
use crate::topology::{HealthCheck, InstanceId, LbId, LbProtocol, Listener, Scheduler, Topology};

/// How long a TCP session outlives its FIN or RST.
pub const CLOSING: Duration = Duration::from_secs(10);

/// How long a session lives without a packet: as long as an established TCP connection's
/// conntrack entry (so that the balancer never forgets a connection conntrack still knows),
/// 180 s for UDP (a UDP stream's).
pub fn idle(protocol: u8) -> Duration {
    if protocol == LbProtocol::Tcp.number() {
        Duration::from_secs(432_000)
    } else {
        Duration::from_secs(180)
    }
}

/// An address and port.
pub type Addr = (Ipv4Addr, u16);

/// A connection as the client sent it: to the VIP (or the load balancer's Elastic IP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Forward {
    /// The client's zone (a VPC's, the basic network's, the internet's).
    pub zone: Zone,
    /// TCP or UDP.
    pub protocol: u8,
    /// The client.
    pub client: Addr,
    /// The VIP (or Elastic IP) and the listener's port.
    pub vip: Addr,
}

/// A connection's replies as the backend sends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reply {
    /// The backend's zone.
    pub zone: Zone,
    /// TCP or UDP.
    pub protocol: u8,
    /// The backend.
    pub backend: Addr,
    /// The client.
    pub client: Addr,
}

/// One load-balanced connection.
#[derive(Debug, Clone)]
pub struct Session {
    /// Its load balancer's name (for people: sessions outlive ids).
    pub lb: Arc<str>,
    /// The backend it is on.
    pub backend: Addr,
    /// The key of its replies.
    pub reply: Reply,
    /// When it last carried a packet.
    pub last: Timestamp,
    /// A TCP FIN or RST was seen: it ends [`CLOSING`] later.
    pub closing: bool,
}

/// A backend as health names it, stable across reloads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendName {
    /// The load balancer.
    pub lb: String,
    /// The listener's protocol.
    pub protocol: LbProtocol,
    /// The listener's port.
    pub port: u16,
    /// The backend instance.
    pub instance: String,
    /// The backend's port.
    pub backend_port: u16,
}

/// What the health checks say: a backend absent from the map has not been checked yet and
/// counts as healthy.
pub type Health = HashMap<BackendName, bool>;

/// Every listener's backends by name, in order.
pub fn backend_names(topo: &Topology) -> Vec<(LbId, usize, usize, BackendName)> {
    let mut out = Vec::new();
    for (i, lb) in topo.load_balancers.iter().enumerate() {
        for (li, l) in lb.listeners.iter().enumerate() {
            for (bi, b) in l.backends.iter().enumerate() {
                let name = BackendName {
                    lb: lb.name.clone(),
                    protocol: l.protocol,
                    port: l.port,
                    instance: topo.instance(b.instance).name.clone(),
                    backend_port: b.port,
                };
                out.push((LbId(i as u32), li, bi, name));
            }
        }
    }
    out
}

/// The documented source of health checks: backends' ingress ACLs and groups must admit it
/// (inside 100.64.0.0/10, the shared address space the cloud's checks come from) on the
/// backend port, or every probe fails.
pub const HEALTH_SOURCE: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);

/// The UDP port hosts report their backends' health on, over the underlay.
pub const HEALTH_PORT: u16 = 4755;

/// One backend's health as its checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthState {
    /// Healthy (a backend starts so: it takes connections until its checks say otherwise).
    pub healthy: bool,
    /// Results in a row that disagree with `healthy`.
    pub streak: u32,
}

impl Default for HealthState {
    fn default() -> Self {
        HealthState {
            healthy: true,
            streak: 0,
        }
    }
}

impl HealthState {
    /// One probe's result under `check`'s thresholds; true when the state flipped.
    pub fn observe(&mut self, ok: bool, check: &HealthCheck) -> bool {
        if ok == self.healthy {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let needed = if ok { check.healthy } else { check.unhealthy };
        if self.streak >= needed {
            *self = HealthState {
                healthy: ok,
                streak: 0,
            };
            return true;
        }
        false
    }
}

/// Whether backend `instance` admits a probe from [`HEALTH_SOURCE`] on `port`: its
/// subnet's inbound ACL and its groups' inbound rules, as for a packet.
pub fn probe_admitted(
    topo: &Topology,
    instance: InstanceId,
    protocol: LbProtocol,
    port: u16,
) -> Result<(), String> {
    let inst = topo.instance(instance);
    let s = Subject {
        peer: HEALTH_SOURCE,
        protocol: protocol.number(),
        dport: Some(port),
    };
    if let Some(acl) = inst.subnet().and_then(|s| topo.subnet(s).acl) {
        let acl = &topo.acls[acl.index()];
        if !matches!(acl.ingress_list.evaluate(&s), Outcome::Accepted(_)) {
            return Err(format!(
                "network ACL \"{}\" denies the health-check source {HEALTH_SOURCE}",
                acl.name
            ));
        }
    }
    match inst.ingress_rules.evaluate(&s) {
        Outcome::Accepted(_) => Ok(()),
        _ => Err(format!(
            "the security groups of \"{}\" do not admit the health-check source {HEALTH_SOURCE}",
            inst.name
        )),
    }
}

/// A health report's first line.
const REPORT_MAGIC: &str = "vpcd-health 1";

/// A host's report of its backends' health: one line per backend,
/// `LB PROTOCOL PORT INSTANCE BACKEND-PORT up|down`.
pub fn encode_report(entries: &[(BackendName, bool)]) -> Vec<u8> {
    let mut s = format!("{REPORT_MAGIC}\n");
    for (n, up) in entries {
        let state = if *up { "up" } else { "down" };
        s.push_str(&format!(
            "{} {} {} {} {} {state}\n",
            n.lb,
            n.protocol.word(),
            n.port,
            n.instance,
            n.backend_port
        ));
    }
    s.into_bytes()
}

/// A report's entries; `None` for anything that is not one (whatever the bytes, no panic).
pub fn parse_report(bytes: &[u8]) -> Option<Vec<(BackendName, bool)>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lines = text.lines();
    if lines.next()? != REPORT_MAGIC {
        return None;
    }
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let [lb, protocol, port, instance, backend_port, state] = f.as_slice() else {
                return None;
            };
            let protocol = match *protocol {
                "tcp" => LbProtocol::Tcp,
                "udp" => LbProtocol::Udp,
                _ => return None,
            };
            let up = match *state {
                "up" => true,
                "down" => false,
                _ => return None,
            };
            let name = BackendName {
                lb: lb.to_string(),
                protocol,
                port: port.parse().ok()?,
                instance: instance.to_string(),
                backend_port: backend_port.parse().ok()?,
            };
            Some((name, up))
        })
        .collect()
}

/// Why no session was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No backend has a nonzero weight.
    NoBackend,
    /// The table is full.
    Full,
    /// Every backend it may go to already has a connection from this client address and
    /// port (through another listener or VIP): the backend could not tell the two apart.
    InUse,
}

/// One host's (or worker's) sessions and scheduler state.
#[derive(Debug, Clone, Default)]
pub struct Balancer {
    sessions: HashMap<Forward, Session>,
    replies: HashMap<Reply, Forward>,
    /// Open (not closing) sessions per backend endpoint: weighted least connections.
    active: HashMap<(Zone, u8, Addr), u32>,
    /// Smooth weighted round robin's current weights, per listener.
    wrr: HashMap<(LbId, usize), Vec<i64>>,
    /// Unhealthy backends of the topology in force: (load balancer, listener, backend).
    down: HashSet<(LbId, usize, usize)>,
    health: Health,
    max: usize,
    seed: u64,
}

impl Balancer {
    /// An empty balancer holding at most `max` sessions.
    pub fn new(max: usize, seed: u64) -> Balancer {
        Balancer {
            max,
            seed,
            ..Balancer::default()
        }
    }

    /// The number of sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True when there is no session.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// A new topology: ids move, so health is mapped again and the round robin restarts.
    /// Sessions stay.
    pub fn set_topology(&mut self, topo: &Topology, max: usize) {
        self.max = max;
        self.wrr.clear();
        self.map_health(topo);
    }

    /// New health reports.
    pub fn set_health(&mut self, topo: &Topology, health: Health) {
        self.health = health;
        self.map_health(topo);
    }

    /// The health in force.
    pub fn health(&self) -> &Health {
        &self.health
    }

    fn map_health(&mut self, topo: &Topology) {
        self.down = backend_names(topo)
            .into_iter()
            .filter(|(.., name)| self.health.get(name) == Some(&false))
            .map(|(lb, l, b, _)| (lb, l, b))
            .collect();
    }

    /// True when the backend is healthy (or not checked yet).
    pub fn healthy(&self, lb: LbId, listener: usize, backend: usize) -> bool {
        !self.down.contains(&(lb, listener, backend))
    }

    /// The backend (and its zone) of a connection's packet, its session refreshed (a TCP
    /// FIN or RST starts its end).
    pub fn forward(&mut self, key: &Forward, now: Timestamp, ends: bool) -> Option<(Addr, Zone)> {
        let s = self.sessions.get_mut(key)?;
        s.last = now;
        let (backend, zone) = (s.backend, s.reply.zone);
        if ends && !s.closing {
            s.closing = true;
            decrement(&mut self.active, (zone, key.protocol, backend));
        }
        Some((backend, zone))
    }

    /// The session a reply belongs to: the VIP and port to write as its source.
    pub fn reply(&mut self, key: &Reply, now: Timestamp, ends: bool) -> Option<Addr> {
        let fwd = *self.replies.get(key)?;
        self.forward(&fwd, now, ends)?;
        Some(fwd.vip)
    }

    /// Picks a backend of listener `li` of `lb` for a new connection and opens its session.
    /// Returns the backend's index in the listener. A first packet that ends its connection
    /// (a stray TCP FIN or RST) opens a session already closing: it counts for no one.
    pub fn open(
        &mut self,
        topo: &Topology,
        (lb, li): (LbId, usize),
        key: Forward,
        (backend_zone, ends): (Zone, bool),
        now: Timestamp,
    ) -> Result<usize, Refused> {
        if self.sessions.len() >= self.max {
            return Err(Refused::Full);
        }
        let l = &topo.lb(lb).listeners[li];
        let bi = self.pick(topo, (lb, li), l, key, backend_zone)?;
        let b = l.backends[bi];
        let backend = (topo.instance(b.instance).ip, b.port);
        let reply = Reply {
            zone: backend_zone,
            protocol: key.protocol,
            backend,
            client: key.client,
        };
        if !ends {
            *self
                .active
                .entry((backend_zone, key.protocol, backend))
                .or_default() += 1;
        }
        let session = Session {
            lb: Arc::from(topo.lb(lb).name.as_str()),
            backend,
            reply,
            last: now,
            closing: ends,
        };
        if let Some(old) = self.sessions.insert(key, session) {
            self.forget(&old, key.protocol);
        }
        self.replies.insert(reply, key);
        Ok(bi)
    }

    /// The backends a new connection may go to: healthy ones of nonzero weight, or when
    /// none is healthy, every one of nonzero weight (fail open, as the cloud does).
    fn eligible(&self, lb: LbId, li: usize, l: &Listener) -> Vec<usize> {
        let weighted = (0..l.backends.len()).filter(|&b| l.backends[b].weight > 0);
        let healthy: Vec<usize> = weighted
            .clone()
            .filter(|&b| self.healthy(lb, li, b))
            .collect();
        if healthy.is_empty() {
            weighted.collect()
        } else {
            healthy
        }
    }

    fn pick(
        &mut self,
        topo: &Topology,
        (lb, li): (LbId, usize),
        l: &Listener,
        key: Forward,
        zone: Zone,
    ) -> Result<usize, Refused> {
        let mut eligible = self.eligible(lb, li, l);
        if eligible.is_empty() {
            return Err(Refused::NoBackend);
        }
        let client = key.client.0;
        // Two connections must never meet at the backend as one.
        eligible.retain(|&b| {
            let backend = (topo.instance(l.backends[b].instance).ip, l.backends[b].port);
            let reply = Reply {
                zone,
                protocol: key.protocol,
                backend,
                client: key.client,
            };
            !self.replies.contains_key(&reply)
        });
        if eligible.is_empty() {
            return Err(Refused::InUse);
        }
        let weight = |b: usize| i64::from(l.backends[b].weight);
        Ok(match l.scheduler {
            Scheduler::Wrr => {
                let cur = self
                    .wrr
                    .entry((lb, li))
                    .or_insert_with(|| vec![0; l.backends.len()]);
                smooth_wrr(cur, &eligible, weight)
            }
            Scheduler::Wlc => {
                let open = |b: usize| {
                    let addr = (topo.instance(l.backends[b].instance).ip, l.backends[b].port);
                    let n = self.active.get(&(zone, l.protocol.number(), addr));
                    i64::from(n.copied().unwrap_or(0))
                };
                // The fewest open connections per weight; the first of equals.
                let mut best = eligible[0];
                for &b in &eligible[1..] {
                    if open(b) * weight(best) < open(best) * weight(b) {
                        best = b;
                    }
                }
                best
            }
            Scheduler::Hash => source_hash(client, self.seed, &eligible, weight),
        })
    }

    fn forget(&mut self, s: &Session, protocol: u8) {
        self.replies.remove(&s.reply);
        if !s.closing {
            decrement(&mut self.active, (s.reply.zone, protocol, s.backend));
        }
    }

    /// Ends the sessions that are over at `now`; returns how many.
    pub fn sweep(&mut self, now: Timestamp) -> usize {
        let over: Vec<Forward> = self
            .sessions
            .iter()
            .filter(|(k, s)| {
                let limit = if s.closing { CLOSING } else { idle(k.protocol) };
                now.since(s.last) >= limit
            })
            .map(|(k, _)| *k)
            .collect();
        for k in &over {
            if let Some(s) = self.sessions.remove(k) {
                self.forget(&s, k.protocol);
            }
        }
        over.len()
    }

    /// Every session, for `vpcd ctl`.
    pub fn sessions(&self) -> impl Iterator<Item = (&Forward, &Session)> {
        self.sessions.iter()
    }

    /// Open sessions per backend endpoint (zone, protocol, address and port).
    pub fn open_counts(&self) -> impl Iterator<Item = (&(Zone, u8, Addr), &u32)> {
        self.active.iter()
    }
}

fn decrement(active: &mut HashMap<(Zone, u8, Addr), u32>, key: (Zone, u8, Addr)) {
    if let Some(n) = active.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            active.remove(&key);
        }
    }
}

/// Smooth weighted round robin (nginx): every eligible backend gains its weight, the
/// largest is picked and loses the total. Over any run of `total` picks each backend gets
/// exactly its weight's share, interleaved.
pub fn smooth_wrr(current: &mut [i64], eligible: &[usize], weight: impl Fn(usize) -> i64) -> usize {
    let mut best = eligible[0];
    let mut total = 0;
    for &b in eligible {
        current[b] += weight(b);
        total += weight(b);
        if current[b] > current[best] {
            best = b;
        }
    }
    current[best] -= total;
    best
}

/// Source hash: the client's address, mixed with the seed, picks a point on the eligible
/// backends' cumulative weights.
pub fn source_hash(
    client: Ipv4Addr,
    seed: u64,
    eligible: &[usize],
    weight: impl Fn(usize) -> i64,
) -> usize {
    let total: i64 = eligible.iter().map(|&b| weight(b)).sum();
    let mut h = (u64::from(u32::from(client)) ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 29;
    let mut point = (h % total.max(1) as u64) as i64;
    for &b in eligible {
        if point < weight(b) {
            return b;
        }
        point -= weight(b);
    }
    eligible[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_wrr_gives_each_backend_its_share_interleaved() {
        let w = [5i64, 1, 1];
        let mut cur = vec![0; 3];
        let picks: Vec<usize> = (0..7)
            .map(|_| smooth_wrr(&mut cur, &[0, 1, 2], |b| w[b]))
            .collect();
        assert_eq!(picks.iter().filter(|&&b| b == 0).count(), 5);
        assert_eq!(
            picks,
            vec![0, 0, 1, 0, 2, 0, 0],
            "nginx's sequence for 5:1:1"
        );
    }

    #[test]
    fn health_flips_only_after_its_threshold_in_a_row() {
        let check = HealthCheck {
            interval: 1,
            timeout: 1,
            healthy: 2,
            unhealthy: 3,
        };
        let mut h = HealthState::default();
        let flips: Vec<bool> = [false, false, true, false, false, false, true, true]
            .iter()
            .map(|&ok| h.observe(ok, &check))
            .collect();
        assert_eq!(
            flips,
            [false, false, false, false, false, true, false, true]
        );
        assert!(h.healthy);
    }

    #[test]
    fn reports_round_trip_and_garbage_is_refused() {
        let n = BackendName {
            lb: "lb-web".into(),
            protocol: LbProtocol::Udp,
            port: 53,
            instance: "web-1".into(),
            backend_port: 5353,
        };
        let entries = vec![(n.clone(), false), (BackendName { port: 80, ..n }, true)];
        assert_eq!(parse_report(&encode_report(&entries)), Some(entries));
        for bad in [
            &b""[..],
            b"vpcd-health 2\n",
            b"vpcd-health 1\nx tcp 80 a 80 maybe\n",
            &[0xff, 0xfe],
        ] {
            assert_eq!(parse_report(bad), None);
        }
    }

    #[test]
    fn source_hash_is_stable_and_follows_weights() {
        let w = [30i64, 10];
        let mut counts = [0; 2];
        for i in 0..4000u32 {
            let c = Ipv4Addr::from(0x0a00_0000 + i * 7919);
            let b = source_hash(c, 1, &[0, 1], |b| w[b]);
            assert_eq!(b, source_hash(c, 1, &[0, 1], |b| w[b]));
            counts[b] += 1;
        }
        assert!((2700..3300).contains(&counts[0]), "{counts:?}");
    }
}
