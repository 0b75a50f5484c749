//! Scenario tests of load balancers (docs/semantics.md 2.11): the pick, the translation both
//! ways, sessions, health, draining, the VIP's own answers, the other networks, the internet.

use std::net::Ipv4Addr;
use std::sync::Arc;

use super::tests_cloud::{Cloud, reason, udp};
use super::*;
use crate::policy::balance::{BackendName, Health};
use crate::topology::{LbProtocol, Topology};
use crate::wire::ipv4::{self, TcpFlags, proto};

const LB: &str = r#"
[[host]]
name = "a"
address = "192.0.2.1"
[[host]]
name = "b"
address = "192.0.2.2"
[[host]]
name = "g"
address = "192.0.2.9"

[basic]
cidr = "10.128.0.0/16"

[internet]
cidr = "203.0.113.0/24"
gateway = "g"

[[vpc]]
name = "alice"
tenant = "alice"
cidr = "10.0.0.0/16"
[[vpc]]
name = "bob"
tenant = "bob"
cidr = "10.0.0.0/16"

[[subnet]]
name = "web"
vpc = "alice"
cidr = "10.0.1.0/24"
[[subnet]]
name = "bob-web"
vpc = "bob"
cidr = "10.0.1.0/24"

[[security_group]]
name = "open"
ingress = [ { action = "accept", protocol = "all", source = "0.0.0.0/0" } ]
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "client"
host = "a"
subnet = "web"
ip = "10.0.1.10"
security_groups = ["open"]
[[instance]]
name = "web1"
host = "a"
subnet = "web"
ip = "10.0.1.11"
security_groups = ["open"]
[[instance]]
name = "web2"
host = "b"
subnet = "web"
ip = "10.0.1.12"
security_groups = ["open"]
[[instance]]
name = "bob1"
host = "a"
subnet = "bob-web"
ip = "10.0.1.20"
security_groups = ["open"]
[[instance]]
name = "bob2"
host = "b"
subnet = "bob-web"
ip = "10.0.1.11"
security_groups = ["open"]
[[instance]]
name = "classic1"
host = "a"
network = "basic"
tenant = "alice"
security_groups = ["open"]
[[instance]]
name = "classic2"
host = "b"
network = "basic"
tenant = "alice"
security_groups = ["open"]
[[instance]]
name = "classic3"
host = "a"
network = "basic"
tenant = "bob"
security_groups = ["open"]

[[load_balancer]]
name = "lb-web"
vpc = "alice"
subnet = "web"
vip = "10.0.1.100"
eip = "203.0.113.20"
listeners = [
  { protocol = "tcp", port = 80, backends = [
      { instance = "web1", port = 8080, weight = WEIGHT1 },
      { instance = "web2", port = 8080, weight = 10 } ] },
  { protocol = "udp", port = 53, scheduler = "hash", backends = [
      { instance = "web1", port = 5353 }, { instance = "web2", port = 5353 } ] },
]

[[load_balancer]]
name = "lb-classic"
network = "basic"
tenant = "alice"
listeners = [ { protocol = "tcp", port = 80, scheduler = "wlc", backends = [
    { instance = "classic1" }, { instance = "classic2" } ] } ]
"#;

const VIP: [u8; 4] = [10, 0, 1, 100];
const PUBLIC: [u8; 4] = [198, 51, 100, 7];

fn cloud(weight1: u8) -> Cloud {
    Cloud::new(&LB.replace("WEIGHT1", &weight1.to_string()))
}

/// A TCP packet with a correct checksum.
fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = ipv4::tests::tcp(sport, dport, flags);
    t.extend_from_slice(b"hello");
    let mut p = ipv4::tests::packet(src, dst, proto::TCP, &t);
    let ip = etherparse::Ipv4HeaderSlice::from_slice(&p)
        .unwrap()
        .to_header();
    let h = etherparse::TcpHeaderSlice::from_slice(&p[20..])
        .unwrap()
        .to_header();
    let c = h.calc_checksum_ipv4(&ip, &p[40..]).unwrap();
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p
}

/// The addresses and ports of a TCP or UDP packet, and whether its checksums hold.
fn seen(p: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16, bool) {
    let ip = etherparse::Ipv4HeaderSlice::from_slice(p).unwrap();
    let ports = (
        u16::from_be_bytes([p[20], p[21]]),
        u16::from_be_bytes([p[22], p[23]]),
    );
    let ok = ipv4::checksum(&p[..20]) == 0
        && match p[9] {
            proto::TCP => {
                let t = etherparse::TcpHeaderSlice::from_slice(&p[20..]).unwrap();
                t.checksum() == t.calc_checksum_ipv4(&ip, &p[40..]).unwrap()
            }
            _ => true,
        };
    (
        ip.source_addr(),
        ports.0,
        ip.destination_addr(),
        ports.1,
        ok,
    )
}

fn delivered(c: &Cloud, d: Decision) -> Option<String> {
    match d {
        Decision::Deliver { to, .. } => Some(c.t.instance(to).name.clone()),
        _ => None,
    }
}

/// Opens a connection from `client` to the VIP from `sport`: who received the SYN and how.
fn connect(c: &mut Cloud, client: &str, sport: u16) -> (String, Vec<u8>) {
    let from = Ingress::Instance(c.id(client));
    let host = c.t.host(c.t.instance(c.id(client)).host).name.clone();
    let (d, bytes) = c.trip(
        from,
        &host,
        &tcp(c.ip(client), VIP, sport, 80, TcpFlags::SYN),
    );
    (delivered(c, d).unwrap_or_else(|| format!("{d:?}")), bytes)
}

/// [`connect`], and the backend's SYN-ACK back to the client.
fn establish(c: &mut Cloud, sport: u16) -> String {
    let (to, _) = connect(c, "client", sport);
    let reply = tcp(
        c.ip(&to),
        c.ip("client"),
        8080,
        sport,
        TcpFlags::SYN | TcpFlags::ACK,
    );
    let host = c.t.host(c.t.instance(c.id(&to)).host).name.clone();
    let (d, _) = c.trip(Ingress::Instance(c.id(&to)), &host, &reply);
    assert_eq!(delivered(c, d).as_deref(), Some("client"), "{d:?}");
    to
}

#[test]
fn a_connection_is_translated_to_its_backend_and_back() {
    let mut c = cloud(10);
    let client = c.ip("client");
    let (to, bytes) = connect(&mut c, "client", 40000);
    let backend = c.ip(&to);
    assert_eq!(
        seen(&bytes),
        (client.into(), 40000, backend.into(), 8080, true)
    );
    // The backend answers from its own address; its host does not know the balancer.
    let reply = tcp(backend, client, 8080, 40000, TcpFlags::SYN | TcpFlags::ACK);
    let backend_host = c.t.host(c.t.instance(c.id(&to)).host).name.clone();
    let (d, bytes) = c.trip(Ingress::Instance(c.id(&to)), &backend_host, &reply);
    assert_eq!(delivered(&c, d).as_deref(), Some("client"), "{d:?}");
    assert_eq!(
        seen(&bytes),
        (VIP.into(), 80, client.into(), 40000, true),
        "the client sees only the VIP"
    );
    // Later packets stay on the backend.
    let from = Ingress::Instance(c.id("client"));
    let (d, bytes) = c.trip(from, "a", &tcp(client, VIP, 40000, 80, TcpFlags::ACK));
    assert_eq!(delivered(&c, d), Some(to));
    assert_eq!(seen(&bytes).2, Ipv4Addr::from(backend));
}

#[test]
fn round_robin_spreads_new_connections_by_weight() {
    for (w1, expect) in [(10u8, 20usize), (30, 30)] {
        let mut c = cloud(w1);
        let mut web1 = 0;
        for sport in 0..40 {
            web1 += usize::from(connect(&mut c, "client", 41000 + sport).0 == "web1");
        }
        assert_eq!(web1, expect, "weights {w1}:10 over 40 connections");
    }
}

fn health(c: &Cloud, down: &[&str]) -> Health {
    crate::policy::balance::backend_names(&c.t)
        .into_iter()
        .map(|(.., n)| {
            let up = !down.contains(&n.instance.as_str());
            (n, up)
        })
        .collect()
}

#[test]
fn only_healthy_backends_take_new_connections_and_all_down_fails_open() {
    let mut c = cloud(10);
    let h = health(&c, &["web2"]);
    c.host("a").set_health(h);
    for sport in 0..10 {
        assert_eq!(connect(&mut c, "client", 42000 + sport).0, "web1");
    }
    let h = health(&c, &["web1", "web2"]);
    c.host("a").set_health(h);
    let spread: std::collections::BTreeSet<String> = (0..10)
        .map(|s| connect(&mut c, "client", 42100 + s).0)
        .collect();
    assert_eq!(
        spread.len(),
        2,
        "every backend down: all of them serve ({spread:?})"
    );
}

#[test]
fn a_backend_set_to_weight_zero_drains() {
    let mut c = cloud(10);
    let conns: Vec<(u16, String)> = (0..6)
        .map(|s| (43000 + s, establish(&mut c, 43000 + s)))
        .collect();
    assert!(conns.iter().any(|(_, b)| b == "web1"));
    let t = Arc::new(Topology::parse(&LB.replace("WEIGHT1", "0"), "lb.toml").unwrap());
    for h in &mut c.hosts {
        h.set_topology(t.clone());
    }
    c.t = t;
    for (sport, backend) in &conns {
        let from = Ingress::Instance(c.id("client"));
        let (d, _) = c.trip(
            from,
            "a",
            &tcp(c.ip("client"), VIP, *sport, 80, TcpFlags::ACK),
        );
        assert_eq!(
            delivered(&c, d).as_ref(),
            Some(backend),
            "an existing connection keeps its backend"
        );
    }
    for s in 0..6 {
        assert_eq!(
            connect(&mut c, "client", 43100 + s).0,
            "web2",
            "no new connection to weight 0"
        );
    }
}

#[test]
fn the_vip_answers_echo_and_drops_other_ports() {
    let mut c = cloud(10);
    let client = c.ip("client");
    let echo = ipv4::tests::packet(client, VIP, proto::ICMP, &[8, 0, 0xf7, 0xfe, 0, 1, 0, 0]);
    let d = c.send("client", &echo);
    assert_eq!(d, Decision::EchoReply { to: c.id("client") });
    let mut buf = PacketBuf::from_packet(&echo);
    let id = c.id("client");
    assert_eq!(c.host("a").apply(d, &mut buf, false), Action::Reply(id));
    let r = buf.as_slice();
    assert_eq!(
        (r[12..16].to_vec(), r[16..20].to_vec(), r[20]),
        (VIP.to_vec(), client.to_vec(), 0)
    );
    assert_eq!(ipv4::checksum(&r[20..]), 0);
    let d = c.send("client", &tcp(client, VIP, 40000, 22, TcpFlags::SYN));
    assert_eq!(reason(d), Some(DropReason::LbNoListener));
}

#[test]
fn another_tenant_never_reaches_the_balancer_or_its_backends() {
    let mut c = cloud(10);
    // bob's VPC has the same addresses, and no load balancer at 10.0.1.100.
    let d = c.send("bob1", &tcp(c.ip("bob1"), VIP, 40000, 80, TcpFlags::SYN));
    assert_eq!(reason(d), Some(DropReason::NoSuchInstance));
    // bob's 10.0.1.11 is bob2, not alice's web1.
    let from = Ingress::Instance(c.id("bob1"));
    let (d, _) = c.trip(
        from,
        "a",
        &tcp(c.ip("bob1"), c.ip("bob2"), 40000, 8080, TcpFlags::SYN),
    );
    assert_eq!(delivered(&c, d).as_deref(), Some("bob2"));
    // The basic load balancer serves its tenant only.
    let vip = c.t.load_balancers[1].vip.octets();
    let d = c.send(
        "classic3",
        &tcp(c.ip("classic3"), vip, 40000, 80, TcpFlags::SYN),
    );
    assert_eq!(reason(d), Some(DropReason::LbOtherTenant));
    let from = Ingress::Instance(c.id("classic1"));
    let (d, bytes) = c.trip(
        from,
        "a",
        &tcp(c.ip("classic1"), vip, 40000, 80, TcpFlags::SYN),
    );
    assert!(
        matches!(delivered(&c, d).as_deref(), Some("classic1" | "classic2")),
        "{d:?}"
    );
    assert_eq!(
        seen(&bytes).3,
        80,
        "the backend port defaults to the listener's"
    );
}

#[test]
fn a_udp_listener_hashes_the_source_and_replies_come_from_the_vip() {
    let mut c = cloud(10);
    let client = c.ip("client");
    let from = Ingress::Instance(c.id("client"));
    let (d, bytes) = c.trip(from, "a", &udp(client, VIP, 5000, 53));
    let backend = delivered(&c, d).expect("delivered");
    assert_eq!(seen(&bytes).3, 5353);
    for sport in 5001..5010 {
        let (d, _) = c.trip(from, "a", &udp(client, VIP, sport, 53));
        assert_eq!(
            delivered(&c, d).as_ref(),
            Some(&backend),
            "one source, one backend"
        );
    }
    let host = c.t.host(c.t.instance(c.id(&backend)).host).name.clone();
    let reply = udp(c.ip(&backend), client, 5353, 5000);
    let (d, bytes) = c.trip(Ingress::Instance(c.id(&backend)), &host, &reply);
    assert_eq!(delivered(&c, d).as_deref(), Some("client"));
    assert_eq!(seen(&bytes), (VIP.into(), 53, client.into(), 5000, true));
}

#[test]
fn a_public_load_balancer_serves_the_internet_through_the_gateway() {
    let mut c = cloud(10);
    let eip = [203, 0, 113, 20];
    let mut backends = std::collections::BTreeSet::new();
    for sport in 0..4u16 {
        let (d, bytes) = c.trip(
            Ingress::Internet,
            "g",
            &tcp(PUBLIC, eip, 50000 + sport, 80, TcpFlags::SYN),
        );
        let to = delivered(&c, d).unwrap_or_else(|| panic!("{d:?}"));
        let (src, sp, dst, dp, ok) = seen(&bytes);
        assert_eq!(
            (src, sp, dst, dp, ok),
            (PUBLIC.into(), 50000 + sport, c.ip(&to).into(), 8080, true)
        );
        // The backend has no Elastic IP: its reply leaves through the balancer's.
        let host = c.t.host(c.t.instance(c.id(&to)).host).name.clone();
        let reply = tcp(
            c.ip(&to),
            PUBLIC,
            8080,
            50000 + sport,
            TcpFlags::SYN | TcpFlags::ACK,
        );
        let (d, bytes) = c.trip(Ingress::Instance(c.id(&to)), &host, &reply);
        assert!(matches!(d, Decision::ToInternet { .. }), "{d:?}");
        assert_eq!(
            seen(&bytes),
            (eip.into(), 80, PUBLIC.into(), 50000 + sport, true)
        );
        backends.insert(to);
    }
    assert_eq!(backends.len(), 2);
}

#[test]
fn least_connections_counts_open_sessions() {
    let mut c = cloud(10);
    let vip = c.t.load_balancers[1].vip.octets();
    let from = Ingress::Instance(c.id("classic1"));
    let mut got = Vec::new();
    for sport in 0..4 {
        let (d, _) = c.trip(
            from,
            "a",
            &tcp(c.ip("classic1"), vip, 40000 + sport, 80, TcpFlags::SYN),
        );
        got.push(delivered(&c, d).unwrap());
    }
    assert_eq!(got, ["classic1", "classic2", "classic1", "classic2"]);
    // Two of classic1's close: the next two go to it.
    for sport in [40000, 40002] {
        c.trip(
            from,
            "a",
            &tcp(
                c.ip("classic1"),
                vip,
                sport,
                80,
                TcpFlags::FIN | TcpFlags::ACK,
            ),
        );
    }
    for sport in 4..6 {
        let (d, _) = c.trip(
            from,
            "a",
            &tcp(c.ip("classic1"), vip, 40000 + sport, 80, TcpFlags::SYN),
        );
        assert_eq!(delivered(&c, d).as_deref(), Some("classic1"));
    }
}

#[test]
fn health_names_outlive_reloads() {
    let c = cloud(10);
    let name = BackendName {
        lb: "lb-web".into(),
        protocol: LbProtocol::Tcp,
        port: 80,
        instance: "web2".into(),
        backend_port: 8080,
    };
    let names = crate::policy::balance::backend_names(&c.t);
    assert!(names.iter().any(|(.., n)| *n == name));
    assert_eq!(names.len(), 6);
}

#[test]
fn load_balancers_are_validated() {
    let bad = |find: &str, replace: &str| -> String {
        let text = LB.replace("WEIGHT1", "10").replace(find, replace);
        match Topology::parse(&text, "lb.toml") {
            Ok(_) => panic!("accepted: {replace}"),
            Err(e) => e.to_string(),
        }
    };
    let mixed = bad(
        r#"{ instance = "classic1" }, { instance = "classic2" }"#,
        r#"{ instance = "classic1" }, { instance = "web2" }"#,
    );
    assert!(
        mixed.contains("cannot be shared between the basic network and a VPC"),
        "{mixed}"
    );
    let mixed = bad(
        r#"{ instance = "web2", port = 5353 }"#,
        r#"{ instance = "classic2", port = 5353 }"#,
    );
    assert!(
        mixed.contains("even where the basic-network interconnect links them"),
        "{mixed}"
    );
    assert!(
        bad(r#"vip = "10.0.1.100""#, r#"vip = "10.0.1.11""#)
            .contains("already instance \"web1\"'s")
    );
    assert!(bad(r#"vip = "10.0.1.100""#, r#"vip = "10.0.2.100""#).contains("outside its subnet"));
    assert!(bad(r#"vip = "10.0.1.100""#, r#"vip = "10.0.1.1""#).contains("reserved"));
    assert!(
        bad(
            r#"protocol = "udp", port = 53"#,
            r#"protocol = "tcp", port = 80"#
        )
        .contains("duplicate listener tcp 80")
    );
    assert!(
        bad(
            r#"instance = "web1", port = 5353"#,
            r#"instance = "nope", port = 5353"#
        )
        .contains("unknown instance \"nope\"")
    );
    assert!(
        bad(r#"weight = 10 }"#, r#"weight = 101 }"#).contains("backend weight 101 is out of range")
    );
    let taken = LB.replace("WEIGHT1", "10").replace(
        "name = \"classic1\"\nhost = \"a\"\nnetwork = \"basic\"",
        "name = \"classic1\"\nhost = \"a\"\neip = \"203.0.113.20\"\nnetwork = \"basic\"",
    );
    let e = Topology::parse(&taken, "lb.toml").unwrap_err().to_string();
    assert!(e.contains("eip 203.0.113.20 is already bound"), "{e}");
    assert!(e.contains("lb.toml:"), "errors name the file and line: {e}");
}

#[test]
fn an_allocated_vip_is_stable() {
    let t = Topology::parse(&LB.replace("WEIGHT1", "10"), "lb.toml").unwrap();
    let vip = t.load_balancers[1].vip;
    assert!(t.basic.unwrap().cidr.contains(&vip));
    assert_eq!(t.allocations.vip.get("lb-classic"), Some(&vip));
    // A new basic instance that hashes anywhere never takes it, and the lock keeps it.
    let more = format!(
        "{}\n[[instance]]\nname = \"classic9\"\nhost = \"a\"\nnetwork = \"basic\"\ntenant = \"alice\"\nsecurity_groups = [\"open\"]\n",
        LB.replace("WEIGHT1", "10")
    );
    let t2 = Topology::parse_locked(&more, "lb.toml", &t.allocations).unwrap();
    assert_eq!(t2.load_balancers[1].vip, vip);
    assert!(t2.instances.iter().all(|i| i.ip != vip));
}
