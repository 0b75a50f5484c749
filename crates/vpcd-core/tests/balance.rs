//! Load balancers against the reference model ([`model::balance`]), on random cases: random
//! regions (two tenants with the same addresses, VPC and basic load balancers, VIPs that two
//! VPCs share, weights of 0, every scheduler, UDP and TCP listeners), random health (every
//! backend down included), and random packets from every instance of every network to the
//! VIPs: new connections, their later packets, the backends' replies, FINs, echo requests.
//! Every packet makes the real trip across the hosts' pipelines (encapsulated and
//! decapsulated). The pipeline must deliver exactly where the model says, with the bytes
//! translated as it says; replies must come back from the VIP; nothing may reach an instance
//! outside the client's network (or tenant, in the basic network).
//!
//! `cargo test --release -p vpcd-core --test balance -- --nocapture` prints the figures.

#[path = "model/balance.rs"]
mod model_balance;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use etherparse::PacketBuilder;
use model_balance::{Balance, Expect};
use vpcd_core::policy::balance::{Health, backend_names};
use vpcd_core::topology::{HostId, Network, Space};
use vpcd_core::wire::PacketBuf;
use vpcd_core::{Action, Decision, Ingress, Pipeline, Timestamp, Topology};

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const PORTS: [u16; 3] = [80, 53, 443];

/// A random region: two hosts, alice's and bob's VPCs on the same CIDR, four instances each
/// and two basic instances per tenant, one to three load balancers.
fn region(rng: &mut Rng) -> String {
    let mut s = String::from(
        "[[host]]\nname = \"h0\"\naddress = \"192.0.2.1\"\n[[host]]\nname = \"h1\"\naddress = \"192.0.2.2\"\n\
         [basic]\ncidr = \"10.128.0.0/24\"\n\
         [[security_group]]\nname = \"open\"\n\
         ingress = [ { action = \"accept\", protocol = \"all\", source = \"0.0.0.0/0\" } ]\n\
         egress = [ { action = \"accept\", protocol = \"all\", destination = \"0.0.0.0/0\" } ]\n",
    );
    for t in ["alice", "bob"] {
        s += &format!(
            "[[vpc]]\nname = \"{t}\"\ntenant = \"{t}\"\ncidr = \"10.0.0.0/16\"\n[[subnet]]\nname = \"{t}-net\"\nvpc = \"{t}\"\ncidr = \"10.0.1.0/24\"\n"
        );
        for k in 0..4 {
            s += &format!(
                "[[instance]]\nname = \"{t}{k}\"\nhost = \"h{}\"\nsubnet = \"{t}-net\"\nip = \"10.0.1.{}\"\nsecurity_groups = [\"open\"]\n",
                rng.below(2),
                10 + k
            );
        }
        for k in 0..2 {
            s += &format!(
                "[[instance]]\nname = \"{t}-b{k}\"\nhost = \"h{}\"\nnetwork = \"basic\"\ntenant = \"{t}\"\nsecurity_groups = [\"open\"]\n",
                rng.below(2)
            );
        }
    }
    for n in 0..1 + rng.below(3) {
        let t = if rng.chance(50) { "alice" } else { "bob" };
        let basic = rng.chance(30);
        let head = if basic {
            format!("network = \"basic\"\ntenant = \"{t}\"")
        } else {
            // Two VPCs may give the same VIP: each serves its own.
            format!(
                "vpc = \"{t}\"\nsubnet = \"{t}-net\"\nvip = \"10.0.1.{}\"",
                100 + rng.below(2) + 2 * n
            )
        };
        let members: Vec<String> = if basic {
            (0..2).map(|k| format!("{t}-b{k}")).collect()
        } else {
            (0..4).map(|k| format!("{t}{k}")).collect()
        };
        let mut listeners = Vec::new();
        for (i, port) in PORTS.iter().enumerate() {
            if !rng.chance(70) {
                continue;
            }
            let protocol = if i == 1 { "udp" } else { "tcp" };
            let scheduler = ["wrr", "wlc", "hash"][rng.below(3)];
            let mut backends = Vec::new();
            for m in &members {
                if rng.chance(75) {
                    let weight = [0, 1, 10, 10, 50, 100][rng.below(6)];
                    let port = 8000 + rng.below(2);
                    backends.push(format!(
                        "{{ instance = \"{m}\", port = {port}, weight = {weight} }}"
                    ));
                }
            }
            listeners.push(format!("{{ protocol = \"{protocol}\", port = {port}, scheduler = \"{scheduler}\", backends = [ {} ] }}", backends.join(", ")));
        }
        s += &format!(
            "[[load_balancer]]\nname = \"lb{n}\"\n{head}\nlisteners = [ {} ]\n",
            listeners.join(", ")
        );
    }
    s
}

fn packet(protocol: u8, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src.0.octets(), dst.0.octets(), 64);
    let mut out = Vec::new();
    let payload = b"lb";
    match protocol {
        6 => {
            let mut t = b.tcp(src.1, dst.1, 1000, 64000);
            if flags & 0x02 != 0 {
                t = t.syn();
            }
            if flags & 0x10 != 0 {
                t = t.ack(2000);
            }
            if flags & 0x01 != 0 {
                t = t.fin();
            }
            t.write(&mut out, payload).unwrap();
        }
        17 => b.udp(src.1, dst.1).write(&mut out, payload).unwrap(),
        _ => b
            .icmpv4_echo_request(src.1, 1)
            .write(&mut out, payload)
            .unwrap(),
    }
    out
}

/// A TCP or UDP packet's source and destination (address, port), and whether its checksum holds.
type Seen = ((Ipv4Addr, u16), (Ipv4Addr, u16), bool);

/// Addresses, ports and checksum validity of a TCP or UDP packet.
fn seen(p: &[u8]) -> Option<Seen> {
    let s = etherparse::SlicedPacket::from_ip(p).ok()?;
    let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else {
        return None;
    };
    let h = ip.header();
    let (sport, dport, ok) = match &s.transport {
        Some(etherparse::TransportSlice::Tcp(t)) => {
            let c = t
                .to_header()
                .calc_checksum_ipv4(&h.to_header(), t.payload())
                .ok()?;
            (t.source_port(), t.destination_port(), c == t.checksum())
        }
        Some(etherparse::TransportSlice::Udp(u)) => {
            let c = u
                .to_header()
                .calc_checksum_ipv4(&h.to_header(), u.payload())
                .ok()?;
            (u.source_port(), u.destination_port(), c == u.checksum())
        }
        _ => return None,
    };
    Some(((h.source_addr(), sport), (h.destination_addr(), dport), ok))
}

/// The packet's trip from instance `from` over the hosts: the last decision and the bytes.
fn trip(
    hosts: &mut [Pipeline],
    t: &Topology,
    from: usize,
    pkt: &[u8],
    now: Timestamp,
) -> (Decision, Vec<u8>) {
    let mut host = t.instances[from].host;
    let mut ingress = Ingress::Instance(vpcd_core::topology::InstanceId(from as u32));
    let mut buf = PacketBuf::from_packet(pkt);
    for _ in 0..4 {
        let p = &mut hosts[host.index()];
        let d = p.decide(buf.as_slice(), ingress, now);
        match d {
            Decision::Encapsulate { host: next, .. } => {
                let a = p.apply(d, &mut buf, false);
                assert!(matches!(a, Action::Transmit { .. }), "{a:?}");
                (host, ingress) = (next, Ingress::UnderlayIp);
            }
            _ => {
                p.apply(d, &mut buf, false);
                return (d, buf.as_slice().to_vec());
            }
        }
    }
    panic!("a packet went round in circles");
}

#[derive(Default, Debug)]
struct Figures {
    cases: usize,
    packets: usize,
    to_backend: usize,
    replies: usize,
    echo: usize,
    drops: BTreeMap<String, usize>,
    not_balanced: usize,
    all_down: usize,
}

fn same_network(t: &Topology, a: usize, b: usize) -> bool {
    let (x, y) = (&t.instances[a], &t.instances[b]);
    match (&x.network, &y.network) {
        (Network::Basic { tenant: p }, Network::Basic { tenant: q }) => p == q,
        _ => x.space() == y.space(),
    }
}

/// One random case of `ops` packets.
fn case(seed: u64, ops: usize, f: &mut Figures) {
    let mut rng = Rng(seed | 1);
    let text = region(&mut rng);
    let t =
        Arc::new(Topology::parse(&text, "balance.toml").unwrap_or_else(|e| panic!("{e}\n{text}")));
    let mut hosts: Vec<Pipeline> = (0..2)
        .map(|h| Pipeline::with_seed(t.clone(), HostId(h), seed))
        .collect();
    let mut model = Balance::new(seed);
    let mut health = Health::new();
    let vips: Vec<Ipv4Addr> = t
        .load_balancers
        .iter()
        .map(|l| l.vip)
        .chain([Ipv4Addr::new(10, 0, 1, 10)])
        .collect();
    f.cases += 1;
    for op in 0..ops {
        let now = Timestamp::from_millis(1000 + op as u64 * 10);
        if rng.chance(5) {
            health = backend_names(&t)
                .into_iter()
                .map(|(.., n)| (n, !rng.chance(40)))
                .collect();
            for h in &mut hosts {
                h.set_health(health.clone());
            }
            f.all_down += usize::from(health.values().all(|up| !up));
            continue;
        }
        let ctx = format!("seed {seed} op {op}\n{text}");
        if rng.chance(30) && !model.sessions.is_empty() {
            reply(&mut hosts, &t, &mut model, &mut rng, now, f, &ctx);
            continue;
        }
        let client = rng.below(t.instances.len());
        let protocol = [6u8, 6, 17, 1][rng.below(4)];
        let src = (t.instances[client].ip, 40000 + rng.below(6) as u16);
        // Mostly a VIP of the client's own network, else any (another network's, an instance's).
        let own: Vec<Ipv4Addr> = (t.load_balancers.iter())
            .filter(|l| l.space() == t.instances[client].space())
            .map(|l| l.vip)
            .collect();
        let vip = match own.is_empty() || rng.chance(30) {
            true => vips[rng.below(vips.len())],
            false => own[rng.below(own.len())],
        };
        let dst = (vip, PORTS[rng.below(3)]);
        let fin = protocol == 6 && rng.chance(20);
        let flags = if fin { 0x11 } else { 0x02 };
        let pkt = packet(protocol, src, dst, flags);
        let host = t.instances[client].host.index();
        let want = model.packet(
            &t,
            &health,
            (host, client),
            protocol,
            (src, dst),
            fin,
            protocol == 1,
        );
        let (got, bytes) = trip(&mut hosts, &t, client, &pkt, now);
        f.packets += 1;
        if let Decision::Deliver { to, .. } = got {
            assert!(
                same_network(&t, client, to.index()),
                "{ctx}\ndelivered outside the client's network: {got:?}"
            );
        }
        match want {
            Expect::Backend(b, addr) => {
                f.to_backend += 1;
                if fin {
                    continue; // a FIN without a handshake: conntrack judges it; the session closes anyway
                }
                assert!(
                    matches!(got, Decision::Deliver { to, .. } if to.index() == b),
                    "{ctx}\nwant backend {}, got {got:?}",
                    t.instances[b].name
                );
                assert_eq!(
                    seen(&bytes),
                    Some((src, addr, true)),
                    "{ctx}\nthe translated packet"
                );
            }
            Expect::Echo => {
                f.echo += 1;
                assert!(
                    matches!(got, Decision::EchoReply { to } if to.index() == client),
                    "{ctx}\n{got:?}"
                );
            }
            Expect::Drop(r) => {
                *f.drops.entry(format!("{r:?}")).or_default() += 1;
                assert!(
                    matches!(got, Decision::Drop(x) if x.reason == r),
                    "{ctx}\nwant {r:?}, got {got:?}"
                );
            }
            Expect::NotBalanced => {
                f.not_balanced += 1;
                let to_other = matches!(got, Decision::Deliver { to, .. } if t.instances[to.index()].ip != dst.0);
                assert!(!to_other, "{ctx}\nnot a VIP here, yet translated: {got:?}");
            }
        }
    }
}

/// A backend answers one of the sessions: the client gets it from the VIP.
fn reply(
    hosts: &mut [Pipeline],
    t: &Topology,
    model: &mut Balance,
    rng: &mut Rng,
    now: Timestamp,
    f: &mut Figures,
    ctx: &str,
) {
    let s = model.sessions[rng.below(model.sessions.len())].clone();
    let flags = if s.protocol == 6 { 0x12 } else { 0 };
    let pkt = packet(s.protocol, s.backend, s.client, flags);
    let client = t
        .instances
        .iter()
        .position(|i| i.space() == s.space && i.ip == s.client.0)
        .expect("the client");
    let vip = model.reply(s.host, s.space, s.protocol, s.backend, s.client);
    let (got, bytes) = trip(hosts, t, s.backend_instance, &pkt, now);
    f.packets += 1;
    if s.closing || s.protocol == 6 && !matches!(s.space, Space::Vpc(_) | Space::Basic) {
        return;
    }
    if s.backend_instance == client {
        return; // a backend balanced to itself: one port, both ends
    }
    f.replies += 1;
    assert!(
        matches!(got, Decision::Deliver { to, .. } if to.index() == client),
        "{ctx}\nreply of {s:?}: {got:?}"
    );
    assert_eq!(
        seen(&bytes),
        Some((vip.unwrap(), s.client, true)),
        "{ctx}\nthe reply comes from the VIP"
    );
}

#[test]
fn load_balancers_agree_with_the_model() {
    let mut f = Figures::default();
    for seed in 1..=2000u64 {
        case(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 120, &mut f);
    }
    eprintln!("{f:?}");
    assert!(
        f.to_backend > 10_000 && f.replies > 20_000 && f.echo > 1000 && f.all_down > 100,
        "{f:?}"
    );
    for (r, at_least) in [
        ("LbNoListener", 1000),
        ("LbNoBackend", 200),
        ("LbOtherTenant", 1000),
        ("LbTupleInUse", 10),
    ] {
        assert!(
            f.drops.get(r).copied().unwrap_or(0) >= at_least,
            "the generator reaches {r}: {f:?}"
        );
    }
}
