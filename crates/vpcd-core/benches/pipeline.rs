//! Per-packet cost of the decision and of the in-place GRE encapsulation and decapsulation.
//!
//!     cargo bench --bench pipeline
//!     cargo bench --bench pipeline -- --measurement-time 3      # shorter
//!     cargo bench --bench pipeline -- slow_path_routes           # one group
//!
//! Every benchmark measures one packet per iteration (`Throughput::Elements(1)`), so criterion's
//! "thrpt" line is packets per second. Topologies are generated as TOML text here and go through
//! `Topology::parse`, like a file would.
//!
//! - `fast_path/*`: a flow-cache hit on an established TCP flow (handshake done beforehand):
//!   `decide` on a byte slice (no copy measured), towards a local and a remote instance, and
//!   `process` encapsulating in place (the buffer is reset with `set_filled` each iteration).
//! - `slow_path`: the first packet of a new UDP flow (flow-cache and conntrack miss), with
//!   1,000 egress security-group rules (5 groups of 200, the accepting rule last) and 10,000
//!   routes, delivered to an appliance instance on the same host. Every iteration is a new
//!   flow; the connection table is swept outside the timed region before it fills.
//! - `slow_path_routes/N`: the same with N routes and a one-rule security group.
//! - `gre_encap/*`: `wire::gre::encapsulate_ip` on a 1,400-byte inner packet.
//! - `gre_decap/*`: an outer IPv4 + GRE + 1,400-byte inner packet from the underlay
//!   (`Ingress::UnderlayIp`) on an established flow: the receive fast path.
//! - `counting/*`: what counting adds to each packet's decision (part of every `decide`
//!   above): `Counters::count` of a delivery from a local instance (packets and bytes of
//!   sender and receiver, the host's totals) and of a drop for the receiver's groups, and
//!   `Conntrack::account` (a connection's packets and bytes in the packet's direction).

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use etherparse::PacketBuilder;
use vpcd_core::pipeline::{Counted, Counters, Nat};
use vpcd_core::policy::conntrack::{ConnKey, Conntrack, Direction, Endpoint, Open, Zone};
use vpcd_core::topology::{HostId, InstanceId};
use vpcd_core::wire::ipv4::L4;
use vpcd_core::wire::{PacketBuf, gre};
use vpcd_core::{Action, Decision, DropReason, Ingress, Pipeline, Timestamp, Topology};

const HOST_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const HOST_B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const KEY: u32 = 1001;
/// Total length of the data packets (inner IPv4 packet), below the 1,472-byte instance MTU.
const DATA_LEN: usize = 1400;

// --- packets ---------------------------------------------------------------------------------

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

/// An IPv4/TCP packet of `total` bytes (payload zero-filled), checksums computed.
#[allow(clippy::too_many_arguments)]
fn tcp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    total: usize,
) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).tcp(sport, dport, seq, 64240);
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & ACK != 0 {
        b = b.ack(ack);
    }
    if flags & PSH != 0 {
        b = b.psh();
    }
    let payload = vec![0u8; total.saturating_sub(40)];
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, &payload).unwrap();
    out
}

/// An IPv4/UDP packet of `total` bytes.
fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, total: usize) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).udp(sport, dport);
    let payload = vec![0u8; total.saturating_sub(28)];
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, &payload).unwrap();
    out
}

/// `inner` as host `from` sends it to host `to` over the `gre` transport.
fn encapsulated(inner: &[u8], from: Ipv4Addr, to: Ipv4Addr) -> Vec<u8> {
    let mut buf = PacketBuf::from_packet(inner);
    gre::encapsulate_ip(&mut buf, from, to, Some(KEY), false).unwrap();
    buf.as_slice().to_vec()
}

fn ipv4_header_checksum(h: &mut [u8]) {
    h[10] = 0;
    h[11] = 0;
    let mut sum = 0u32;
    for w in h[..20].chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    h[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

// --- topologies ------------------------------------------------------------------------------

const HOSTS: &str = r#"
[underlay]
transport = "gre"
mtu = 1500

[[host]]
name = "host-a"
address = "192.0.2.1"

[[host]]
name = "host-b"
address = "192.0.2.2"

[[vpc]]
name = "vpc"
tenant = "t"
cidr = "10.0.0.0/16"
key = 1001
"#;

/// Two subnets, three instances: `web` and `db-local` on host-a, `db-remote` on host-b.
fn fast_topology() -> String {
    format!(
        r#"{HOSTS}
[[subnet]]
name = "web"
vpc = "vpc"
cidr = "10.0.1.0/24"

[[subnet]]
name = "db"
vpc = "vpc"
cidr = "10.0.2.0/24"

[[security_group]]
name = "sg-web"
ingress = [ {{ action = "accept", protocol = "tcp", port = "80,443", source = "10.0.0.0/16" }} ]
egress = [ {{ action = "accept", protocol = "all", destination = "0.0.0.0/0" }} ]

[[security_group]]
name = "sg-db"
ingress = [ {{ action = "accept", protocol = "tcp", port = 5432, source = "sg:sg-web" }} ]
egress = [ {{ action = "accept", protocol = "all", destination = "0.0.0.0/0" }} ]

[[instance]]
name = "web"
host = "host-a"
subnet = "web"
ip = "10.0.1.10"
security_groups = ["sg-web"]

[[instance]]
name = "db-local"
host = "host-a"
subnet = "db"
ip = "10.0.2.20"
security_groups = ["sg-db"]

[[instance]]
name = "db-remote"
host = "host-b"
subnet = "db"
ip = "10.0.2.30"
security_groups = ["sg-db"]
"#
    )
}

/// The slow-path topology: `client` (10.0.1.10) sends to addresses outside the VPC, routed by
/// `routes` /24 routes (20.0.0.0/24, 20.0.1.0/24, ...) to the appliance `fw` (10.0.9.9), both
/// on host-a. With `heavy_rules`, the client's egress rules are 5 groups of 200 rules, only the
/// last of the last group accepting the benchmark's traffic (UDP to port 4000); otherwise one
/// accept-all rule.
fn slow_topology(routes: usize, heavy_rules: bool) -> String {
    use std::fmt::Write;
    let mut t = String::from(HOSTS);
    writeln!(
        t,
        r#"
[conntrack]
max_entries = {CONNTRACK}
max_per_instance = {CONNTRACK}

[limits]
rules_per_security_group = 200
routes_per_table = {}
"#,
        routes.max(1)
    )
    .unwrap();
    t.push_str(
        r#"
[[subnet]]
name = "app"
vpc = "vpc"
cidr = "10.0.1.0/24"
route_table = "rt-app"

[[subnet]]
name = "appliances"
vpc = "vpc"
cidr = "10.0.9.0/24"

[[security_group]]
name = "sg-fw"
ingress = [ { action = "accept", protocol = "all", source = "10.0.0.0/16" } ]
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "fw"
host = "host-a"
subnet = "appliances"
ip = "10.0.9.9"
security_groups = ["sg-fw"]

[[route_table]]
name = "rt-app"
vpc = "vpc"
routes = [
"#,
    );
    for i in 0..routes {
        let [a, b, c, _] = route_base(i).octets();
        writeln!(
            t,
            r#"  {{ destination = "{a}.{b}.{c}.0/24", next_hop = "instance:fw" }},"#
        )
        .unwrap();
    }
    t.push_str("]\n");
    let groups: Vec<String> = if heavy_rules {
        (1..=SG_GROUPS).map(|g| format!("sg-{g}")).collect()
    } else {
        vec!["sg-open".into()]
    };
    for (g, name) in groups.iter().enumerate() {
        writeln!(t, "\n[[security_group]]\nname = \"{name}\"\negress = [").unwrap();
        if heavy_rules {
            let last_group = g + 1 == SG_GROUPS;
            for r in 0..SG_RULES {
                if last_group && r + 1 == SG_RULES {
                    t.push_str(
                        r#"  { action = "accept", protocol = "udp", port = 4000, destination = "20.0.0.0/8" },"#,
                    );
                } else {
                    // Same protocol, a port range that holds 4000: each of these rules is
                    // checked down to its address, which never matches.
                    let n = g * SG_RULES + r;
                    write!(
                        t,
                        r#"  {{ action = "accept", protocol = "udp", port = "3000-5000", destination = "198.18.{}.{}/32" }},"#,
                        n / 256,
                        n % 256
                    )
                    .unwrap();
                }
                t.push('\n');
            }
        } else {
            t.push_str(r#"  { action = "accept", protocol = "all", destination = "0.0.0.0/0" },"#);
            t.push('\n');
        }
        t.push_str("]\n");
    }
    let list: Vec<String> = groups.iter().map(|g| format!("\"{g}\"")).collect();
    writeln!(
        t,
        r#"
[[instance]]
name = "client"
host = "host-a"
subnet = "app"
ip = "10.0.1.10"
security_groups = [{}]
"#,
        list.join(", ")
    )
    .unwrap();
    t
}

const SG_GROUPS: usize = 5;
const SG_RULES: usize = 200;
/// Connection-table size of the slow-path topologies.
const CONNTRACK: u32 = 1 << 20;
/// New flows between two sweeps of the connection table (two entries each: well under
/// [`CONNTRACK`]).
const SWEEP_EVERY: u64 = 200_000;

/// The network of route `i`: the i-th /24 from 20.0.0.0.
fn route_base(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(20, 0, 0, 0)) + (i as u32) * 256)
}

fn parse(text: &str, name: &str) -> Arc<Topology> {
    match Topology::parse(text, name) {
        Ok(t) => Arc::new(t),
        Err(e) => panic!("{name}: {e}"),
    }
}

fn host(t: &Topology, name: &str) -> HostId {
    t.host_named(name).unwrap()
}

fn instance(t: &Topology, name: &str) -> InstanceId {
    t.instance_named(name).unwrap()
}

// --- fast path -------------------------------------------------------------------------------

/// host-a's pipeline with two established TCP flows from `web`: to `db-local` (same host) and
/// to `db-remote` (host-b); and the data packets of each.
struct Established {
    pipeline: Pipeline,
    web: InstanceId,
    db_local: InstanceId,
    /// web -> db-local, ACK+PSH with data.
    to_local: Vec<u8>,
    /// web -> db-remote, ACK+PSH with data.
    to_remote: Vec<u8>,
    /// db-remote -> web, encapsulated by host-b: what host-a's raw GRE socket reads.
    from_remote: Vec<u8>,
}

const NOW: Timestamp = Timestamp::from_secs(1000);

fn established() -> Established {
    let t = parse(&fast_topology(), "fast.toml");
    let a = host(&t, "host-a");
    let web = instance(&t, "web");
    let db_local = instance(&t, "db-local");
    let db_remote = instance(&t, "db-remote");
    let ip = |id: InstanceId| t.instance(id).ip;
    let (w, l, r) = (ip(web), ip(db_local), ip(db_remote));
    let mut p = Pipeline::new(t.clone(), a);

    // web:40000 <-> db-local:5432, both on host-a.
    let d = p.decide(
        &tcp(w, l, 40000, 5432, SYN, 100, 0, 40),
        Ingress::Instance(web),
        NOW,
    );
    assert!(
        matches!(d, Decision::Deliver { to, .. } if to == db_local),
        "{d:?}"
    );
    let d = p.decide(
        &tcp(l, w, 5432, 40000, SYN | ACK, 500, 101, 40),
        Ingress::Instance(db_local),
        NOW,
    );
    assert!(
        matches!(d, Decision::Deliver { to, .. } if to == web),
        "{d:?}"
    );
    let d = p.decide(
        &tcp(w, l, 40000, 5432, ACK, 101, 501, 40),
        Ingress::Instance(web),
        NOW,
    );
    assert!(
        matches!(d, Decision::Deliver { to, .. } if to == db_local),
        "{d:?}"
    );

    // web:40001 <-> db-remote:5432, across the underlay.
    let encap = Decision::Encapsulate {
        strip: 0,
        host: host(&t, "host-b"),
        key: Some(KEY),
        nat: Nat::NONE,
    };
    let d = p.decide(
        &tcp(w, r, 40001, 5432, SYN, 100, 0, 40),
        Ingress::Instance(web),
        NOW,
    );
    assert_eq!(d, encap);
    let syn_ack = encapsulated(
        &tcp(r, w, 5432, 40001, SYN | ACK, 500, 101, 40),
        HOST_B,
        HOST_A,
    );
    let d = p.decide(&syn_ack, Ingress::UnderlayIp, NOW);
    assert_eq!(
        d,
        Decision::Deliver {
            to: web,
            strip: 28,
            nat: Nat::NONE
        }
    );
    let d = p.decide(
        &tcp(w, r, 40001, 5432, ACK, 101, 501, 40),
        Ingress::Instance(web),
        NOW,
    );
    assert_eq!(d, encap);

    let to_local = tcp(w, l, 40000, 5432, ACK | PSH, 101, 501, DATA_LEN);
    let to_remote = tcp(w, r, 40001, 5432, ACK | PSH, 101, 501, DATA_LEN);
    let from_remote = encapsulated(
        &tcp(r, w, 5432, 40001, ACK | PSH, 501, 101, DATA_LEN),
        HOST_B,
        HOST_A,
    );
    // The data packets hit the flow cache (it holds each flow since its SYN).
    let hits = p.counters().cache_hits;
    let local = Decision::Deliver {
        to: db_local,
        strip: 0,
        nat: Nat::NONE,
    };
    assert_eq!(p.decide(&to_local, Ingress::Instance(web), NOW), local);
    assert_eq!(p.decide(&to_local, Ingress::Instance(web), NOW), local);
    assert_eq!(p.decide(&to_remote, Ingress::Instance(web), NOW), encap);
    assert_eq!(
        p.decide(&from_remote, Ingress::UnderlayIp, NOW),
        Decision::Deliver {
            to: web,
            strip: 28,
            nat: Nat::NONE
        }
    );
    assert_eq!(
        p.counters().cache_hits,
        hits + 4,
        "the data packets must hit the flow cache"
    );
    Established {
        pipeline: p,
        web,
        db_local,
        to_local,
        to_remote,
        from_remote,
    }
}

fn fast_path(c: &mut Criterion) {
    let mut e = established();
    let web = Ingress::Instance(e.web);
    let mut g = c.benchmark_group("fast_path");
    g.throughput(Throughput::Elements(1));

    g.bench_function("decide_local", |b| {
        b.iter(|| e.pipeline.decide(black_box(&e.to_local), web, NOW))
    });
    g.bench_function("decide_remote", |b| {
        b.iter(|| e.pipeline.decide(black_box(&e.to_remote), web, NOW))
    });

    // process: decide + GRE/IPv4 headers prepended in place. One buffer, reset each iteration.
    let mut buf = PacketBuf::from_packet(&e.to_remote);
    let (start, len) = (buf.start(), buf.len());
    let action = e.pipeline.process(&mut buf, web, NOW);
    assert!(
        matches!(action, Action::Transmit { to, key: Some(KEY), .. } if to == HOST_B),
        "{action:?}"
    );
    assert_eq!(buf.len(), len + 28);
    assert_eq!(buf.as_slice()[9], 47, "outer protocol GRE");
    g.bench_function("process_encap", |b| {
        b.iter(|| {
            buf.set_filled(start, len);
            e.pipeline.process(black_box(&mut buf), web, NOW)
        })
    });
    // process towards the local instance: decide only, nothing to rewrite.
    let mut buf = PacketBuf::from_packet(&e.to_local);
    let (start, len) = (buf.start(), buf.len());
    assert_eq!(
        e.pipeline.process(&mut buf, web, NOW),
        Action::Deliver(e.db_local)
    );
    g.bench_function("process_local", |b| {
        b.iter(|| {
            buf.set_filled(start, len);
            e.pipeline.process(black_box(&mut buf), web, NOW)
        })
    });
    g.finish();
}

// --- slow path -------------------------------------------------------------------------------

/// First packets of new UDP flows from `client`, each to a different (destination, source
/// port): destinations cycle over every route's /24.
struct FlowGen {
    packet: Vec<u8>,
    routes: u64,
    /// Flows made so far (never reused: every packet is a cache and conntrack miss).
    n: u64,
}

impl FlowGen {
    /// Rewrites the packet into flow `n`: destination in route `n % routes`, then host and
    /// source port from the rest (unique for far more flows than a run sends).
    #[inline]
    fn next(&mut self) -> &[u8] {
        let n = self.n;
        self.n += 1;
        let rest = n / self.routes;
        let host = (rest % 254 + 1) as u32;
        let sport = ((rest / 254) % 64000 + 1024) as u16;
        let dst = u32::from(route_base((n % self.routes) as usize)) + host;
        let p = &mut self.packet;
        p[16..20].copy_from_slice(&dst.to_be_bytes());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        ipv4_header_checksum(&mut p[..20]);
        p
    }
}

struct NewFlows {
    pipeline: Pipeline,
    client: Ingress,
    fw: InstanceId,
    flows: FlowGen,
    /// Flows since the last sweep.
    since_sweep: u64,
    now: Timestamp,
}

impl NewFlows {
    fn new(routes: usize, heavy_rules: bool) -> NewFlows {
        let name = format!("slow-{routes}.toml");
        let t = parse(&slow_topology(routes, heavy_rules), &name);
        let client = instance(&t, "client");
        let fw = instance(&t, "fw");
        let rules = t.instance(client).egress_rules.len();
        assert_eq!(rules, if heavy_rules { SG_GROUPS * SG_RULES } else { 1 });
        let table = t.route_tables.iter().find(|r| r.name == "rt-app").unwrap();
        assert_eq!(table.routes.as_slice().len(), routes);
        NewFlows {
            pipeline: Pipeline::new(t.clone(), host(&t, "host-a")),
            client: Ingress::Instance(client),
            fw,
            flows: FlowGen {
                packet: udp(t.instance(client).ip, route_base(0), 1024, 4000, 64),
                routes: routes as u64,
                n: 0,
            },
            since_sweep: 0,
            now: Timestamp::from_secs(1000),
        }
    }

    /// Expires every connection (outside the timed region) before the table gets near its
    /// size, so that no iteration evicts or is refused.
    fn maybe_sweep(&mut self) {
        if self.since_sweep >= SWEEP_EVERY {
            self.now = self.now.after(Duration::from_secs(3600));
            self.pipeline.sweep(self.now);
            assert_eq!(self.pipeline.conntrack().len(), 0);
            self.since_sweep = 0;
        }
    }

    /// Sends `iters` new flows; returns the time spent deciding them.
    fn run(&mut self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            self.maybe_sweep();
            let chunk = left.min(SWEEP_EVERY - self.since_sweep);
            let (client, now) = (self.client, self.now);
            let start = Instant::now();
            for _ in 0..chunk {
                let pkt = self.flows.next();
                black_box(self.pipeline.decide(black_box(pkt), client, now));
            }
            total += start.elapsed();
            self.since_sweep += chunk;
            left -= chunk;
        }
        total
    }

    /// Checks, before measuring, that new flows take the slow path and are delivered to the
    /// appliance, and that none is refused by the connection table.
    fn check(&mut self) {
        let n = 3 * self.flows.routes.min(1000);
        let misses = self.pipeline.counters().cache_misses;
        for _ in 0..n {
            let (client, now) = (self.client, self.now);
            let pkt = self.flows.next();
            let d = self.pipeline.decide(pkt, client, now);
            assert_eq!(
                d,
                Decision::Deliver {
                    to: self.fw,
                    strip: 0,
                    nat: Nat::NONE,
                },
                "{pkt:02x?}"
            );
            self.since_sweep += 1;
        }
        assert_eq!(self.pipeline.counters().cache_misses, misses + n);
        // Two entries per flow: the client's egress side and the appliance's ingress side
        // (both on this host), each in its own port's entry.
        assert_eq!(self.pipeline.conntrack().len() as u64, 2 * self.since_sweep);
    }
}

fn slow_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("slow_path");
    g.throughput(Throughput::Elements(1));
    let mut s = NewFlows::new(10_000, true);
    s.check();
    g.bench_function("rules_1000_routes_10000", |b| {
        b.iter_custom(|iters| s.run(iters))
    });
    let stats = s.pipeline.conntrack().stats();
    assert_eq!(stats.refused_full + stats.refused_instance, 0, "{stats:?}");
    g.finish();

    let mut g = c.benchmark_group("slow_path_routes");
    g.throughput(Throughput::Elements(1));
    for routes in [10, 1_000, 100_000] {
        let mut s = NewFlows::new(routes, false);
        s.check();
        g.bench_function(BenchmarkId::from_parameter(routes), |b| {
            b.iter_custom(|iters| s.run(iters))
        });
        let stats = s.pipeline.conntrack().stats();
        assert_eq!(stats.refused_full + stats.refused_instance, 0, "{stats:?}");
    }
    g.finish();
}

// --- GRE -------------------------------------------------------------------------------------

fn gre_encap(c: &mut Criterion) {
    let mut g = c.benchmark_group("gre_encap");
    g.throughput(Throughput::Elements(1));
    let inner = tcp(
        Ipv4Addr::new(10, 0, 1, 10),
        Ipv4Addr::new(10, 0, 2, 30),
        40001,
        5432,
        ACK | PSH,
        1,
        1,
        DATA_LEN,
    );
    for checksum in [false, true] {
        let mut buf = PacketBuf::from_packet(&inner);
        let (start, len) = (buf.start(), buf.len());
        gre::encapsulate_ip(&mut buf, HOST_A, HOST_B, Some(KEY), checksum).unwrap();
        let h = gre::parse(&buf.as_slice()[20..]).unwrap();
        assert_eq!((h.key, h.checksum_present), (Some(KEY), checksum));
        assert_eq!(&buf.as_slice()[20 + h.len..], &inner[..]);
        let name = if checksum { "key_checksum" } else { "key" };
        g.bench_function(name, |b| {
            b.iter(|| {
                buf.set_filled(start, len);
                gre::encapsulate_ip(black_box(&mut buf), HOST_A, HOST_B, Some(KEY), checksum)
            })
        });
    }
    g.finish();
}

fn gre_decap(c: &mut Criterion) {
    let mut e = established();
    let web = e.web;
    let mut g = c.benchmark_group("gre_decap");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decide", |b| {
        b.iter(|| {
            e.pipeline
                .decide(black_box(&e.from_remote), Ingress::UnderlayIp, NOW)
        })
    });
    // process: decide + strip the outer headers (the inner packet does not move).
    let mut buf = PacketBuf::from_packet(&e.from_remote);
    let (start, len) = (buf.start(), buf.len());
    assert_eq!(
        e.pipeline.process(&mut buf, Ingress::UnderlayIp, NOW),
        Action::Deliver(web)
    );
    assert_eq!(buf.len(), DATA_LEN);
    g.bench_function("process", |b| {
        b.iter(|| {
            buf.set_filled(start, len);
            e.pipeline
                .process(black_box(&mut buf), Ingress::UnderlayIp, NOW)
        })
    });
    g.finish();
}

// --- counting --------------------------------------------------------------------------------

fn counting(c: &mut Criterion) {
    let t = parse(&fast_topology(), "fast.toml");
    let (web, db) = (instance(&t, "web"), instance(&t, "db-local"));
    let mut counters = Counters::new(t.instances.len());
    let mut g = c.benchmark_group("counting");
    g.throughput(Throughput::Elements(1));
    let deliver = Decision::Deliver {
        to: db,
        strip: 0,
        nat: Nat::NONE,
    };
    let sent = Counted {
        from: Ingress::Instance(web),
        len: DATA_LEN,
        receiver: Some(db),
    };
    let dropped = Decision::Drop(DropReason::TcpNoConnection.into());
    // What is measured counts what it should (checked here: a filter may skip the benches).
    counters.count(&deliver, sent);
    counters.count(&dropped, sent);
    assert!(counters.port(db.index()).received_bytes > 0);
    assert!(counters.port(db.index()).received_dropped > 0);
    g.bench_function("count_deliver", |b| {
        b.iter(|| counters.count(black_box(&deliver), black_box(sent)))
    });
    g.bench_function("count_drop", |b| {
        b.iter(|| counters.count(black_box(&dropped), black_box(sent)))
    });

    let mut ct = Conntrack::new(16, 16, 0);
    let end = |addr: Ipv4Addr, port| Endpoint {
        zone: Zone::vpc(KEY),
        addr,
        port,
    };
    let (a, z) = (end(t.instance(web).ip, 40000), end(t.instance(db).ip, 5432));
    let l4 = L4::Udp {
        sport: 40000,
        dport: 5432,
    };
    let key = ConnKey::of(a.owner(), 17, &l4, a, z).unwrap();
    let r = ct.open(key, a, a.owner(), Open::New, NOW).unwrap();
    ct.account(r, Direction::Reply, DATA_LEN);
    assert!(ct.get(r).unwrap().packets[1] > 0);
    g.bench_function("conn_account", |b| {
        b.iter(|| ct.account(black_box(r), Direction::Reply, black_box(DATA_LEN)))
    });
    g.finish();
}

criterion_group!(
    benches, counting, fast_path, slow_path, gre_encap, gre_decap
);
criterion_main!(benches);
