//! Scenario tests of the rest of the cloud: the basic network, Elastic IPs and the internet,
//! peering, the basic-network interconnect, and moving an instance into a VPC.

use std::net::Ipv4Addr;
use std::sync::Arc;

use super::*;
use crate::topology::Topology;
use crate::wire::ipv4::{self, TcpFlags, proto};

const CLOUD: &str = r#"
[[host]]
name = "a"
address = "192.0.2.1"
region = "r1"
[[host]]
name = "b"
address = "192.0.2.2"
region = "r1"
[[host]]
name = "c"
address = "192.0.2.3"
region = "r2"
[[host]]
name = "g"
address = "192.0.2.9"
region = "r1"

[basic]
cidr = "10.128.0.0/16"

[internet]
cidr = "203.0.113.0/24"
gateway = "g"

[[vpc]]
name = "alice"
tenant = "alice"
cidr = "10.0.0.0/16"
key = 1001
[[vpc]]
name = "bob"
tenant = "bob"
cidr = "10.1.0.0/16"
key = 2002
[[vpc]]
name = "carol"
tenant = "carol"
cidr = "10.2.0.0/16"
key = 3003
[[vpc]]
name = "dave"
tenant = "dave"
cidr = "10.3.0.0/16"
key = 4004

[[peering]]
name = "ab"
vpcs = ["alice", "bob"]
[[peering]]
name = "bc"
vpcs = ["bob", "carol"]
[[peering]]
name = "ad"
vpcs = ["alice", "dave"]

[[subnet]]
name = "web"
vpc = "alice"
cidr = "10.0.1.0/24"
route_table = "rt-alice"
[[subnet]]
name = "bob-net"
vpc = "bob"
cidr = "10.1.1.0/24"
route_table = "rt-bob"
[[subnet]]
name = "carol-net"
vpc = "carol"
cidr = "10.2.1.0/24"
route_table = "rt-carol"
[[subnet]]
name = "dave-net"
vpc = "dave"
cidr = "10.3.1.0/24"

[[route_table]]
name = "rt-alice"
vpc = "alice"
routes = [
  { destination = "10.1.0.0/16", next_hop = "peering:ab" },
  { destination = "10.2.0.0/16", next_hop = "peering:ab" },
  { destination = "10.3.0.0/16", next_hop = "peering:ad" },
  { destination = "198.51.100.0/25", next_hop = "instance:web2" },
  { destination = "100.64.0.0/10", next_hop = "internet" },
]
[[route_table]]
name = "rt-bob"
vpc = "bob"
routes = [
  { destination = "10.0.0.0/16", next_hop = "peering:ab" },
  { destination = "10.2.0.0/16", next_hop = "peering:bc" },
]
[[route_table]]
name = "rt-carol"
vpc = "carol"
routes = [ { destination = "10.1.0.0/16", next_hop = "peering:bc" } ]

[[security_group]]
name = "open"
ingress = [ { action = "accept", protocol = "all", source = "0.0.0.0/0" } ]
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]
[[security_group]]
name = "out-only"
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "web1"
host = "a"
subnet = "web"
ip = "10.0.1.10"
eip = "203.0.113.10"
security_groups = ["open"]
[[instance]]
name = "web2"
host = "b"
subnet = "web"
ip = "10.0.1.11"
security_groups = ["open"]
[[instance]]
name = "b1"
host = "b"
subnet = "bob-net"
ip = "10.1.1.10"
security_groups = ["open"]
[[instance]]
name = "c1"
host = "a"
subnet = "carol-net"
ip = "10.2.1.10"
security_groups = ["open"]
[[instance]]
name = "d1"
host = "b"
subnet = "dave-net"
ip = "10.3.1.10"
security_groups = ["open"]
[[instance]]
name = "classic1"
host = "a"
network = "basic"
tenant = "alice"
eip = "203.0.113.20"
security_groups = ["open"]
[[instance]]
name = "classic2"
host = "b"
network = "basic"
tenant = "alice"
security_groups = ["open"]
[[instance]]
name = "classic3"
host = "b"
network = "basic"
tenant = "bob"
security_groups = ["open"]
[[instance]]
name = "classic4"
host = "c"
network = "basic"
tenant = "alice"
security_groups = ["open"]
[[instance]]
name = "gw1"
host = "g"
subnet = "web"
ip = "10.0.1.30"
eip = "203.0.113.30"
security_groups = ["out-only"]

[[interconnect]]
instance = "classic1"
vpc = "alice"
"#;

pub(super) struct Cloud {
    pub t: Arc<Topology>,
    pub hosts: Vec<Pipeline>,
}

impl Cloud {
    pub(super) fn new(text: &str) -> Cloud {
        let t = Arc::new(Topology::parse(text, "cloud.toml").unwrap());
        let hosts = (0..t.hosts.len())
            .map(|h| Pipeline::new(t.clone(), HostId(h as u32)))
            .collect();
        Cloud { t, hosts }
    }

    pub(super) fn host(&mut self, name: &str) -> &mut Pipeline {
        let h = self.t.host_named(name).unwrap();
        &mut self.hosts[h.index()]
    }

    pub(super) fn id(&self, name: &str) -> InstanceId {
        self.t.instance_named(name).unwrap()
    }

    pub(super) fn ip(&self, name: &str) -> [u8; 4] {
        self.t.instance(self.id(name)).ip.octets()
    }

    pub(super) fn hid(&self, name: &str) -> HostId {
        self.t.host_named(name).unwrap()
    }

    /// Sends `pkt` from instance `from`: the decision on its host.
    pub(super) fn send(&mut self, from: &str, pkt: &[u8]) -> Decision {
        let id = self.id(from);
        let host = self.t.instance(id).host;
        self.hosts[host.index()].decide(pkt, Ingress::Instance(id), now())
    }

    /// The whole trip of a packet sent by `from`: through the underlay (encapsulated and
    /// decapsulated for real), with NAT applied, until it is delivered, leaves for the
    /// internet or is dropped. Returns the last decision and the bytes as they arrive.
    pub(super) fn trip(&mut self, from: Ingress, at: &str, pkt: &[u8]) -> (Decision, Vec<u8>) {
        let mut host = self.hid(at);
        let mut buf = PacketBuf::from_packet(pkt);
        let mut ingress = from;
        for _ in 0..4 {
            let p = &mut self.hosts[host.index()];
            let d = p.decide(buf.as_slice(), ingress, now());
            match d {
                Decision::Encapsulate { host: next, .. } => {
                    let action = p.apply(d, &mut buf, false);
                    assert!(matches!(action, Action::Transmit { .. }), "{action:?}");
                    host = next;
                    ingress = Ingress::UnderlayIp;
                }
                Decision::Deliver { .. } | Decision::ToInternet { .. } => {
                    p.apply(d, &mut buf, false);
                    return (d, buf.as_slice().to_vec());
                }
                _ => return (d, buf.as_slice().to_vec()),
            }
        }
        panic!("a packet went round in circles");
    }
}

pub(super) fn now() -> Timestamp {
    Timestamp::from_secs(1)
}

pub(super) fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut u = vec![0u8; 12];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&12u16.to_be_bytes());
    ipv4::tests::packet(src, dst, proto::UDP, &u)
}

pub(super) fn syn(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    ipv4::tests::packet(
        src,
        dst,
        proto::TCP,
        &ipv4::tests::tcp(sport, dport, TcpFlags::SYN),
    )
}

pub(super) fn reason(d: Decision) -> Option<DropReason> {
    match d {
        Decision::Drop(x) => Some(x.reason),
        _ => None,
    }
}

fn delivered_to(c: &Cloud, d: Decision, name: &str) -> bool {
    matches!(d, Decision::Deliver { to, .. } if to == c.id(name))
}

const CLIENT: [u8; 4] = [198, 51, 100, 200];

#[test]
fn basic_network_reaches_the_same_tenant_in_the_same_region_only() {
    let mut c = Cloud::new(CLOUD);
    let (c1, c2, c3, c4) = (
        c.ip("classic1"),
        c.ip("classic2"),
        c.ip("classic3"),
        c.ip("classic4"),
    );
    assert_eq!(
        c.send("classic1", &udp(c1, c2, 5000, 53)),
        Decision::Encapsulate {
            strip: 0,
            host: c.hid("b"),
            key: None,
            nat: Nat::NONE
        }
    );
    let (d, _) = c.trip(
        Ingress::Instance(c.id("classic1")),
        "a",
        &udp(c1, c2, 5000, 53),
    );
    assert!(delivered_to(&c, d, "classic2"), "{d:?}");
    assert_eq!(
        reason(c.send("classic1", &udp(c1, c3, 5000, 53))),
        Some(DropReason::BasicOtherTenant)
    );
    assert_eq!(
        reason(c.send("classic1", &udp(c1, c4, 5000, 53))),
        Some(DropReason::BasicOtherRegion)
    );
    // The receiving host checks too: bob's classic3 cannot be reached by forging the way.
    let mut b = PacketBuf::from_packet(&udp(c1, c3, 5000, 53));
    gre::encapsulate_ip(
        &mut b,
        [192, 0, 2, 1].into(),
        [192, 0, 2, 2].into(),
        None,
        false,
    )
    .unwrap();
    let d = c.host("b").decide(b.as_slice(), Ingress::UnderlayIp, now());
    assert_eq!(reason(d), Some(DropReason::BasicOtherTenant));
    // A basic address is no VPC's: a VPC instance not linked to it has no route there.
    let web2 = c.ip("web2");
    assert_eq!(
        reason(c.send("web2", &udp(web2, c2, 5000, 53))),
        Some(DropReason::NoRoute)
    );
}

#[test]
fn elastic_ips_translate_at_the_gateway_both_ways() {
    let mut c = Cloud::new(CLOUD);
    let web1 = c.ip("web1");
    // Out: web1's host sends to the gateway on alice's channel to the internet; the gateway
    // rewrites the source to the EIP.
    let out = syn(web1, CLIENT, 40000, 443);
    let alice = c.t.vpcs.iter().position(|v| v.name == "alice").unwrap();
    let alice_out = Channel::Internet {
        space: Space::Vpc(crate::topology::VpcId(alice as u32)),
        inbound: false,
    };
    assert_eq!(
        c.send("web1", &out),
        Decision::Encapsulate {
            strip: 0,
            host: c.hid("g"),
            key: c.t.key_of(alice_out),
            nat: Nat::NONE
        }
    );
    let (d, bytes) = c.trip(Ingress::Instance(c.id("web1")), "a", &out);
    assert!(matches!(d, Decision::ToInternet { .. }), "{d:?}");
    let seen = ipv4::parse(&bytes).unwrap();
    assert_eq!(
        (seen.src, seen.dst),
        (Ipv4Addr::new(203, 0, 113, 10), Ipv4Addr::from(CLIENT))
    );
    // Back: the internet answers the EIP; web1 sees its private address, and the reply of
    // its own connection gets in.
    let mut reply = ipv4::tests::packet(
        CLIENT,
        [203, 0, 113, 10],
        proto::TCP,
        &ipv4::tests::tcp(443, 40000, TcpFlags::SYN | TcpFlags::ACK),
    );
    let (d, bytes) = c.trip(Ingress::Internet, "g", &reply);
    assert!(delivered_to(&c, d, "web1"), "{d:?}");
    let seen = ipv4::parse(&bytes).unwrap();
    assert_eq!(
        (seen.src, seen.dst),
        (Ipv4Addr::from(CLIENT), Ipv4Addr::from(web1))
    );
    assert_eq!(ipv4::checksum(&bytes[..20]), 0);
    // A new connection from the internet is judged by web1's group (open) on web1's host.
    reply = syn(CLIENT, [203, 0, 113, 10], 50000, 22);
    let (d, _) = c.trip(Ingress::Internet, "g", &reply);
    assert!(delivered_to(&c, d, "web1"), "{d:?}");
    // An address that is no EIP.
    let d = c.host("g").decide(
        &syn(CLIENT, [203, 0, 113, 11], 1, 22),
        Ingress::Internet,
        now(),
    );
    assert_eq!(reason(d), Some(DropReason::NoSuchEip));
}

#[test]
fn an_instance_without_an_eip_neither_reaches_nor_is_reached() {
    let mut c = Cloud::new(CLOUD);
    let web2 = c.ip("web2");
    assert_eq!(
        reason(c.send("web2", &syn(web2, CLIENT, 1, 443))),
        Some(DropReason::NoRoute)
    );
    // A route to the internet needs an EIP.
    assert_eq!(
        reason(c.send("web2", &syn(web2, [100, 64, 1, 1], 1, 443))),
        Some(DropReason::NoEip)
    );
    // With one, the same route sends it out.
    let web1 = c.ip("web1");
    let (d, _) = c.trip(
        Ingress::Instance(c.id("web1")),
        "a",
        &syn(web1, [100, 64, 1, 1], 1, 443),
    );
    assert!(matches!(d, Decision::ToInternet { .. }), "{d:?}");
}

#[test]
fn a_custom_route_wins_over_the_eip() {
    let mut c = Cloud::new(CLOUD);
    let web1 = c.ip("web1");
    // 198.51.100.0/25 goes to the appliance web2, though web1 has an EIP.
    let (d, bytes) = c.trip(
        Ingress::Instance(c.id("web1")),
        "a",
        &syn(web1, [198, 51, 100, 7], 1, 443),
    );
    assert!(delivered_to(&c, d, "web2"), "{d:?}");
    assert_eq!(
        ipv4::parse(&bytes).unwrap().dst,
        Ipv4Addr::new(198, 51, 100, 7),
        "unchanged"
    );
    // 198.51.100.200 is outside the route: the EIP.
    let (d, _) = c.trip(
        Ingress::Instance(c.id("web1")),
        "a",
        &syn(web1, CLIENT, 1, 443),
    );
    assert!(matches!(d, Decision::ToInternet { .. }), "{d:?}");
}

#[test]
fn basic_and_vpc_instances_meet_over_their_public_addresses() {
    let mut c = Cloud::new(CLOUD);
    let c1 = c.ip("classic1");
    // classic1 (EIP .20) to web1's EIP (.10): out through the gateway and straight back in.
    let (d, bytes) = c.trip(
        Ingress::Instance(c.id("classic1")),
        "a",
        &syn(c1, [203, 0, 113, 10], 40000, 80),
    );
    assert!(delivered_to(&c, d, "web1"), "{d:?}");
    let seen = ipv4::parse(&bytes).unwrap();
    assert_eq!(
        (seen.src, seen.dst),
        (Ipv4Addr::new(203, 0, 113, 20), Ipv4Addr::new(10, 0, 1, 10))
    );
    // And web1's reply comes back to classic1 at its private address.
    let web1 = c.ip("web1");
    let back = ipv4::tests::packet(
        web1,
        [203, 0, 113, 20],
        proto::TCP,
        &ipv4::tests::tcp(80, 40000, TcpFlags::SYN | TcpFlags::ACK),
    );
    let (d, bytes) = c.trip(Ingress::Instance(c.id("web1")), "a", &back);
    assert!(delivered_to(&c, d, "classic1"), "{d:?}");
    let seen = ipv4::parse(&bytes).unwrap();
    assert_eq!(
        (seen.src, seen.dst),
        (Ipv4Addr::new(203, 0, 113, 10), Ipv4Addr::from(c1))
    );
}

#[test]
fn an_instance_on_the_gateway_host() {
    let mut c = Cloud::new(CLOUD);
    let gw1 = c.ip("gw1");
    let d = c.send("gw1", &syn(gw1, CLIENT, 40000, 443));
    assert_eq!(
        d,
        Decision::ToInternet {
            strip: 0,
            nat: Nat {
                src: Some(Ipv4Addr::new(203, 0, 113, 30)),
                dst: None,
                ..Nat::NONE
            }
        }
    );
    // Its group admits nothing inbound: a new connection from the internet is refused...
    let d = c.host("g").decide(
        &syn(CLIENT, [203, 0, 113, 30], 1, 22),
        Ingress::Internet,
        now(),
    );
    assert_eq!(reason(d), Some(DropReason::SgIngress));
    // ...but the reply to its own connection gets in, at its private address.
    let reply = ipv4::tests::packet(
        CLIENT,
        [203, 0, 113, 30],
        proto::TCP,
        &ipv4::tests::tcp(443, 40000, TcpFlags::SYN | TcpFlags::ACK),
    );
    let d = c.host("g").decide(&reply, Ingress::Internet, now());
    assert_eq!(
        d,
        Decision::Deliver {
            to: c.id("gw1"),
            strip: 0,
            nat: Nat {
                src: None,
                dst: Some(Ipv4Addr::from(gw1)),
                ..Nat::NONE
            }
        }
    );
}

#[test]
fn peering_needs_routes_on_both_sides_and_is_not_transitive() {
    let mut c = Cloud::new(CLOUD);
    let web1 = c.ip("web1");
    // alice -> bob across "ab": the key of "ab" into bob on the wire.
    let ab = c.t.peerings.iter().find(|p| p.name == "ab").unwrap();
    let into_bob = ab.keys[usize::from(c.t.vpc(ab.vpcs[1]).name == "bob")];
    assert_eq!(
        c.send("web1", &syn(web1, [10, 1, 1, 10], 1, 80)),
        Decision::Encapsulate {
            strip: 0,
            host: c.hid("b"),
            key: Some(into_bob),
            nat: Nat::NONE
        }
    );
    let (d, _) = c.trip(
        Ingress::Instance(c.id("web1")),
        "a",
        &syn(web1, [10, 1, 1, 10], 1, 80),
    );
    assert!(delivered_to(&c, d, "b1"), "{d:?}");
    // bob answers back across the same peering.
    let b1 = c.ip("b1");
    let back = ipv4::tests::packet(
        b1,
        web1,
        proto::TCP,
        &ipv4::tests::tcp(80, 1, TcpFlags::SYN | TcpFlags::ACK),
    );
    let (d, _) = c.trip(Ingress::Instance(c.id("b1")), "b", &back);
    assert!(delivered_to(&c, d, "web1"), "{d:?}");
    // alice -> carol through "ab": bob is peered with carol, but peering is not transitive.
    assert_eq!(
        reason(c.send("web1", &syn(web1, [10, 2, 1, 10], 1, 80))),
        Some(DropReason::PeeringNotTransitive)
    );
    // alice -> dave: alice routes to "ad", dave has no route back: nothing flows.
    let (d, _) = c.trip(
        Ingress::Instance(c.id("web1")),
        "a",
        &syn(web1, [10, 3, 1, 10], 1, 80),
    );
    assert_eq!(reason(d), Some(DropReason::PeeringNoReturnRoute));
    let d1 = c.ip("d1");
    assert_eq!(
        reason(c.send("d1", &syn(d1, web1, 1, 80))),
        Some(DropReason::NoRoute)
    );
}

#[test]
fn the_interconnect_links_one_classic_instance_to_one_vpc_and_carries_no_transit() {
    let mut c = Cloud::new(CLOUD);
    let (c1, c2, web2) = (c.ip("classic1"), c.ip("classic2"), c.ip("web2"));
    // classic1 reaches alice's VPC by private address, on alice's interconnect channel.
    let alice =
        crate::topology::VpcId(c.t.vpcs.iter().position(|v| v.name == "alice").unwrap() as u32);
    let into_alice = Channel::Interconnect {
        vpc: alice,
        to_basic: false,
    };
    assert_eq!(
        c.send("classic1", &udp(c1, web2, 5000, 53)),
        Decision::Encapsulate {
            strip: 0,
            host: c.hid("b"),
            key: c.t.key_of(into_alice),
            nat: Nat::NONE
        }
    );
    let (d, _) = c.trip(
        Ingress::Instance(c.id("classic1")),
        "a",
        &udp(c1, web2, 5000, 53),
    );
    assert!(delivered_to(&c, d, "web2"), "{d:?}");
    // And alice's instances reach it, on the interconnect's other channel.
    let (d, _) = c.trip(
        Ingress::Instance(c.id("web2")),
        "b",
        &udp(web2, c1, 53, 5000),
    );
    assert!(delivered_to(&c, d, "classic1"), "{d:?}");
    // classic2 is not linked: no route into alice's VPC.
    assert_eq!(
        reason(c.send("classic2", &udp(c2, web2, 5000, 53))),
        Some(DropReason::NoRoute)
    );
    // No transit: bob is peered with alice, yet classic1 has no way to bob...
    assert_eq!(
        reason(c.send("classic1", &udp(c1, [10, 1, 1, 10], 5000, 53))),
        Some(DropReason::NoRoute)
    );
    // ...and bob none to classic1.
    let b1 = c.ip("b1");
    assert_eq!(
        reason(c.send("b1", &udp(b1, c1, 5000, 53))),
        Some(DropReason::NoRoute)
    );
}

#[test]
fn moving_an_instance_into_a_vpc_ends_its_connections_only() {
    let c = Cloud::new(CLOUD);
    let c2 = c.ip("classic2");
    let web2 = c.ip("web2");
    let b1 = c.ip("b1");
    // On host b, two connections: web2 -> b1 (across the peering), and classic2 -> classic5
    // (basic network, host a).
    let classic5 = CLOUD.replace(
        "[[interconnect]]",
        "[[instance]]\nname = \"classic5\"\nhost = \"a\"\nnetwork = \"basic\"\ntenant = \"alice\"\nsecurity_groups = [\"open\"]\n\n[[interconnect]]",
    );
    let mut c = Cloud::new(&classic5);
    let c5 = c.ip("classic5");
    assert!(matches!(
        c.send("web2", &syn(web2, b1, 1000, 80)),
        Decision::Deliver { .. }
    ));
    assert!(matches!(
        c.send("classic2", &udp(c2, c5, 7, 7)),
        Decision::Encapsulate { .. }
    ));
    // web2 -> b1 holds two entries on host b (one per side), classic2's one.
    assert_eq!(c.host("b").conntrack().len(), 3);
    // classic2 moves into alice's VPC with a new address.
    let moved = classic5.replace(
        "name = \"classic2\"\nhost = \"b\"\nnetwork = \"basic\"\ntenant = \"alice\"",
        "name = \"classic2\"\nhost = \"b\"\nsubnet = \"web\"\nip = \"10.0.1.12\"",
    );
    let t2 = Arc::new(Topology::parse(&moved, "moved.toml").unwrap());
    c.host("b").set_topology(t2.clone());
    assert_eq!(
        c.host("b").conntrack().len(),
        2,
        "classic2's connection ended, web2's stayed"
    );
    let new_id = t2.instance_named("classic2").unwrap();
    // It now speaks from its VPC address; the basic network is reached over public IPs only.
    let d = c.host("b").decide(
        &udp([10, 0, 1, 12], c5, 7, 7),
        Ingress::Instance(new_id),
        now(),
    );
    assert_eq!(reason(d), Some(DropReason::NoRoute));
    let d = c.host("b").decide(
        &udp([10, 0, 1, 12], web2, 7, 7),
        Ingress::Instance(new_id),
        now(),
    );
    assert!(matches!(d, Decision::Deliver { .. }), "{d:?}");
    // Its old address is gone.
    let d = c
        .host("b")
        .decide(&udp(c2, c5, 7, 7), Ingress::Instance(new_id), now());
    assert_eq!(reason(d), Some(DropReason::SourceSpoofed));
}

#[test]
fn later_fragments_do_not_outlive_a_topology_change() {
    let mut c = Cloud::new(CLOUD);
    let (web2, b1) = (c.ip("web2"), c.ip("b1"));
    let mut first = udp(web2, b1, 5000, 53);
    first[4..6].copy_from_slice(&77u16.to_be_bytes());
    first[6] = 0x20;
    let mut later = ipv4::tests::packet(web2, b1, proto::UDP, &[0; 16]);
    later[4..6].copy_from_slice(&77u16.to_be_bytes());
    later[7] = 3;
    assert!(matches!(c.send("web2", &first), Decision::Deliver { .. }));
    assert!(matches!(c.send("web2", &later), Decision::Deliver { .. }));
    let t = c.t.clone();
    c.host("b").set_topology(t);
    assert_eq!(
        reason(c.send("web2", &later)),
        Some(DropReason::FragmentWithoutFirst)
    );
}
