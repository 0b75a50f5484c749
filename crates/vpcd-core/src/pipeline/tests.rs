//! Scenario tests of the decision: a topology, a packet in, what comes out.

use std::net::Ipv4Addr;
use std::sync::Arc;

use super::*;
use crate::topology::Topology;
use crate::wire::ipv4::{TcpFlags, proto};

const TOPOLOGY: &str = r#"
[underlay]
transport = "gre"
mtu = 1500

[[host]]
name = "a"
address = "192.0.2.1"
[[host]]
name = "b"
address = "192.0.2.2"

[[vpc]]
name = "alice"
tenant = "alice"
cidr = "10.0.0.0/16"
key = 1001
[[vpc]]
name = "bob"
tenant = "bob"
cidr = "10.0.0.0/16"
key = 2002
[[vpc]]
name = "carol"
tenant = "carol"
cidr = "172.16.0.0/16"
key = 3003

[[peering]]
name = "pcx"
vpcs = ["alice", "carol"]

[[subnet]]
name = "web"
vpc = "alice"
cidr = "10.0.1.0/24"
route_table = "rt-web"
acl = "acl-web"
[[subnet]]
name = "db"
vpc = "alice"
cidr = "10.0.2.0/24"
[[subnet]]
name = "bob-net"
vpc = "bob"
cidr = "10.0.1.0/24"
[[subnet]]
name = "carol-net"
vpc = "carol"
cidr = "172.16.1.0/24"

[[route_table]]
name = "rt-web"
vpc = "alice"
routes = [
  { destination = "198.51.100.0/24", next_hop = "drop" },
  { destination = "203.0.113.0/24", next_hop = "internet" },
  { destination = "172.16.0.0/16", next_hop = "peering:pcx" },
  { destination = "0.0.0.0/0", next_hop = "instance:nat" },
]

[[acl]]
name = "acl-web"
vpc = "alice"
ingress = [
  { action = "drop",   protocol = "tcp", port = "23", cidr = "0.0.0.0/0" },
  { action = "accept", protocol = "all", cidr = "10.0.0.0/16" },
]
egress = [
  { action = "drop",   protocol = "udp", port = "9999", cidr = "0.0.0.0/0" },
  { action = "accept", protocol = "all", cidr = "0.0.0.0/0" },
]

[[security_group]]
name = "sg-web"
ingress = [
  { action = "accept", protocol = "tcp", port = "80", source = "10.0.0.0/16" },
  { action = "accept", protocol = "icmp", source = "sg:sg-db" },
  { action = "drop",   protocol = "udp", port = "1000-2000", source = "0.0.0.0/0" },
]
egress = [
  { action = "drop",   protocol = "tcp", port = "25", destination = "0.0.0.0/0" },
  { action = "accept", protocol = "all", destination = "0.0.0.0/0" },
]

[[security_group]]
name = "sg-db"
ingress = [ { action = "accept", protocol = "tcp", port = "5432", source = "sg:sg-web" } ]
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[security_group]]
name = "sg-open"
ingress = [ { action = "accept", protocol = "all", source = "0.0.0.0/0" } ]
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[security_group]]
name = "sg-out-only"
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "web1"
host = "a"
subnet = "web"
ip = "10.0.1.10"
security_groups = ["sg-web"]
[[instance]]
name = "web2"
host = "a"
subnet = "web"
ip = "10.0.1.11"
security_groups = ["sg-web"]
[[instance]]
name = "db1"
host = "b"
subnet = "db"
ip = "10.0.2.20"
security_groups = ["sg-db"]
[[instance]]
name = "db-local"
host = "a"
subnet = "db"
ip = "10.0.2.21"
security_groups = ["sg-out-only"]
[[instance]]
name = "nat"
host = "b"
subnet = "db"
ip = "10.0.2.5"
security_groups = ["sg-open"]
[[instance]]
name = "bob1"
host = "a"
subnet = "bob-net"
ip = "10.0.1.10"
security_groups = ["sg-open"]
[[instance]]
name = "bob2"
host = "b"
subnet = "bob-net"
ip = "10.0.1.20"
security_groups = ["sg-open"]
"#;

fn topo() -> Arc<Topology> {
    Arc::new(Topology::parse(TOPOLOGY, "test.toml").unwrap())
}

struct Lab {
    t: Arc<Topology>,
    a: Pipeline,
    b: Pipeline,
}

impl Lab {
    fn new() -> Lab {
        let t = topo();
        Lab {
            a: Pipeline::new(t.clone(), t.host_named("a").unwrap()),
            b: Pipeline::new(t.clone(), t.host_named("b").unwrap()),
            t,
        }
    }

    fn id(&self, name: &str) -> InstanceId {
        self.t.instance_named(name).unwrap()
    }

    fn from(&self, name: &str) -> Ingress {
        Ingress::Instance(self.id(name))
    }

    fn deliver(&self, name: &str) -> Decision {
        Decision::Deliver {
            to: self.id(name),
            strip: 0,
            nat: Nat::NONE,
        }
    }
}

fn now(s: u64) -> Timestamp {
    Timestamp::from_secs(s)
}

fn ip(src: [u8; 4], dst: [u8; 4], protocol: u8, l4: &[u8]) -> Vec<u8> {
    ipv4::tests::packet(src, dst, protocol, l4)
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    ip(src, dst, proto::TCP, &ipv4::tests::tcp(sport, dport, flags))
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut u = vec![0u8; 12];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&12u16.to_be_bytes());
    ip(src, dst, proto::UDP, &u)
}

fn icmp(src: [u8; 4], dst: [u8; 4], kind: u8, ident: u16) -> Vec<u8> {
    let mut i = vec![kind, 0, 0, 0, 0, 0, 0, 1];
    i[4..6].copy_from_slice(&ident.to_be_bytes());
    ip(src, dst, proto::ICMP, &i)
}

fn drop(reason: DropReason) -> Decision {
    Decision::Drop(reason.into())
}

fn reason(d: Decision) -> Option<DropReason> {
    match d {
        Decision::Drop(x) => Some(x.reason),
        _ => None,
    }
}

/// Encapsulates `inner` as host `from` would, for host `to`.
fn gre_from(from: [u8; 4], to: [u8; 4], key: u32, inner: &[u8]) -> Vec<u8> {
    let mut b = PacketBuf::from_packet(inner);
    gre::encapsulate_ip(&mut b, from.into(), to.into(), Some(key), false).unwrap();
    b.as_slice().to_vec()
}

const WEB1: [u8; 4] = [10, 0, 1, 10];
const WEB2: [u8; 4] = [10, 0, 1, 11];
const DB1: [u8; 4] = [10, 0, 2, 20];
const DB_LOCAL: [u8; 4] = [10, 0, 2, 21];
const NAT: [u8; 4] = [10, 0, 2, 5];
const BOB2: [u8; 4] = [10, 0, 1, 20];
const HOST_A: [u8; 4] = [192, 0, 2, 1];
const HOST_B: [u8; 4] = [192, 0, 2, 2];
const SYN: u8 = TcpFlags::SYN;
const SYNACK: u8 = TcpFlags::SYN | TcpFlags::ACK;
const ACK: u8 = TcpFlags::ACK;

#[test]
fn routing_table() {
    let mut l = Lab::new();
    let web1 = l.from("web1");
    let db1_host = l.t.host_named("b").unwrap();
    let cases: Vec<(&str, Vec<u8>, Decision)> = vec![
        (
            "same subnet, same host",
            tcp(WEB1, 40000, WEB2, 80, SYN),
            l.deliver("web2"),
        ),
        (
            "other subnet, other host",
            tcp(WEB1, 40000, DB1, 5432, SYN),
            Decision::Encapsulate {
                strip: 0,
                host: db1_host,
                key: Some(1001),
                nat: Nat::NONE,
            },
        ),
        (
            "inside the VPC, no instance",
            tcp(WEB1, 1, [10, 0, 9, 9], 80, SYN),
            drop(DropReason::NoSuchInstance),
        ),
        (
            "gateway address",
            tcp(WEB1, 1, [10, 0, 1, 1], 80, SYN),
            drop(DropReason::NoSuchInstance),
        ),
        (
            "route to drop",
            tcp(WEB1, 1, [198, 51, 100, 7], 80, SYN),
            drop(DropReason::RouteDrop),
        ),
        (
            "route to the internet, but no Elastic IP",
            tcp(WEB1, 1, [203, 0, 113, 7], 80, SYN),
            drop(DropReason::NoEip),
        ),
        (
            "route to a peering whose VPC has no such instance",
            tcp(WEB1, 1, [172, 16, 1, 5], 80, SYN),
            drop(DropReason::NoSuchInstance),
        ),
        (
            "default route to an appliance on another host",
            udp(WEB1, 5000, [8, 8, 8, 8], 53),
            Decision::Encapsulate {
                strip: 0,
                host: db1_host,
                key: Some(1001),
                nat: Nat::NONE,
            },
        ),
        (
            "broadcast",
            udp(WEB1, 68, [255, 255, 255, 255], 67),
            drop(DropReason::NotUnicast),
        ),
        (
            "multicast",
            udp(WEB1, 5000, [224, 0, 0, 251], 5353),
            drop(DropReason::NotUnicast),
        ),
        (
            "an underlay address",
            udp(WEB1, 5000, HOST_B, 53),
            drop(DropReason::InnerDstUnderlay),
        ),
        (
            "GRE-in-UDP into the underlay",
            udp(WEB1, 5000, HOST_B, 4754),
            drop(DropReason::TunnelLoop),
        ),
        (
            "GRE into the underlay",
            ip(WEB1, HOST_A, proto::GRE, &[0; 8]),
            drop(DropReason::TunnelLoop),
        ),
        (
            "spoofed source",
            tcp([10, 0, 1, 99], 1, WEB2, 80, SYN),
            drop(DropReason::SourceSpoofed),
        ),
        (
            "the other tenant's address of the same instance",
            tcp([10, 0, 1, 20], 1, WEB2, 80, SYN),
            drop(DropReason::SourceSpoofed),
        ),
    ];
    for (what, pkt, want) in cases {
        assert_eq!(l.a.decide(&pkt, web1, now(1)), want, "{what}");
    }
}

#[test]
fn a_route_back_to_the_sender_is_a_loop() {
    let t = topo();
    let mut b = Pipeline::new(t.clone(), t.host_named("b").unwrap());
    // nat is in subnet db, whose table is the default one: no route for 8.8.8.8.
    let nat = Ingress::Instance(t.instance_named("nat").unwrap());
    assert_eq!(
        b.decide(&udp(NAT, 1, [8, 8, 8, 8], 53), nat, now(0)),
        drop(DropReason::NoRoute)
    );
    let mut custom = TOPOLOGY.replace(
        "[[subnet]]\nname = \"db\"\nvpc = \"alice\"\ncidr = \"10.0.2.0/24\"",
        "[[subnet]]\nname = \"db\"\nvpc = \"alice\"\ncidr = \"10.0.2.0/24\"\nroute_table = \"rt-db\"",
    );
    custom.push_str(
        "[[route_table]]\nname = \"rt-db\"\nvpc = \"alice\"\nroutes = [ { destination = \"0.0.0.0/0\", next_hop = \"instance:nat\" } ]\n",
    );
    let t = Arc::new(Topology::parse(&custom, "custom.toml").unwrap());
    let mut b = Pipeline::new(t.clone(), t.host_named("b").unwrap());
    let nat = Ingress::Instance(t.instance_named("nat").unwrap());
    assert_eq!(
        b.decide(&udp(NAT, 1, [8, 8, 8, 8], 53), nat, now(0)),
        drop(DropReason::RouteLoop)
    );
}

#[test]
fn overlapping_tenants_never_meet() {
    let mut l = Lab::new();
    // bob1 has alice web1's address; its packets carry bob's key and reach only bob.
    let bob1 = l.from("bob1");
    let d = l.a.decide(&tcp(WEB1, 1234, BOB2, 22, SYN), bob1, now(0));
    assert_eq!(
        d,
        Decision::Encapsulate {
            strip: 0,
            host: l.t.host_named("b").unwrap(),
            key: Some(2002),
            nat: Nat::NONE
        }
    );
    // bob1 cannot reach alice's db1 at its address: bob's VPC has no such instance.
    assert_eq!(
        l.a.decide(&tcp(WEB1, 1234, DB1, 5432, SYN), bob1, now(0)),
        drop(DropReason::NoSuchInstance)
    );
    // On host b, a packet with bob's key is delivered to bob2, never to an alice instance.
    let wire = gre_from(HOST_A, HOST_B, 2002, &tcp(WEB1, 1234, BOB2, 22, SYN));
    assert_eq!(
        l.b.decide(&wire, Ingress::UnderlayIp, now(0)),
        Decision::Deliver {
            to: l.id("bob2"),
            strip: 28,
            nat: Nat::NONE
        }
    );
    // The same inner packet with alice's key: no alice instance has 10.0.1.20.
    let wire = gre_from(HOST_A, HOST_B, 1001, &tcp(WEB1, 1234, BOB2, 22, SYN));
    assert_eq!(
        l.b.decide(&wire, Ingress::UnderlayIp, now(0)),
        drop(DropReason::NoSuchInstance)
    );
}

#[test]
fn security_group_rules_name_the_rule() {
    let mut l = Lab::new();
    let web1 = l.from("web1");
    // Egress rule 0 of sg-web drops SMTP.
    let d = l.a.decide(&tcp(WEB1, 1, DB1, 25, SYN), web1, now(0));
    assert_eq!(
        d,
        Decision::Drop(Dropped {
            reason: DropReason::SgEgress,
            rule: Some(RuleRef::SecurityGroup {
                group: SgId(0),
                rule: 0
            })
        })
    );
    // web2's ingress: rule 2 drops UDP 1000-2000.
    let d = l.a.decide(&udp(WEB1, 5, WEB2, 1500), web1, now(0));
    assert_eq!(
        d,
        Decision::Drop(Dropped {
            reason: DropReason::SgIngress,
            rule: Some(RuleRef::SecurityGroup {
                group: SgId(0),
                rule: 2
            })
        })
    );
    // No rule of web2's groups admits TCP 22: the implicit drop at the end.
    let d = l.a.decide(&tcp(WEB1, 1, WEB2, 22, SYN), web1, now(0));
    assert_eq!(
        d,
        Decision::Drop(Dropped {
            reason: DropReason::SgIngress,
            rule: Some(RuleRef::SecurityGroupsEnd {
                instance: l.id("web2")
            })
        })
    );
}

#[test]
fn sg_peers_are_members_of_the_group() {
    let mut l = Lab::new();
    // sg-web admits ICMP from members of sg-db only; db-local is in sg-out-only.
    let from_db_local =
        l.a.decide(&icmp(DB_LOCAL, WEB1, 8, 1), l.from("db-local"), now(0));
    assert_eq!(reason(from_db_local), Some(DropReason::SgIngress));
    // db1 (sg-db, on host b) pinging web1: host a checks web1's ingress.
    let wire = gre_from(HOST_B, HOST_A, 1001, &icmp(DB1, WEB1, 8, 1));
    assert_eq!(
        l.a.decide(&wire, Ingress::UnderlayIp, now(0)),
        Decision::Deliver {
            to: l.id("web1"),
            strip: 28,
            nat: Nat::NONE
        }
    );
}

#[test]
fn stateful_replies_pass_without_rules() {
    let mut l = Lab::new();
    let db_local = l.from("db-local");
    let web1 = l.from("web1");
    // db-local's group admits nothing inbound, but its own connections' replies come back.
    assert_eq!(
        l.a.decide(&tcp(DB_LOCAL, 40000, WEB1, 80, SYN), db_local, now(0)),
        l.deliver("web1")
    );
    assert_eq!(
        l.a.decide(&tcp(WEB1, 80, DB_LOCAL, 40000, SYNACK), web1, now(0)),
        l.deliver("db-local")
    );
    assert_eq!(
        l.a.decide(&tcp(DB_LOCAL, 40000, WEB1, 80, ACK), db_local, now(0)),
        l.deliver("web1")
    );
    // A new connection from web1 to db-local is judged by the rules: dropped.
    let d =
        l.a.decide(&tcp(WEB1, 80, DB_LOCAL, 40001, SYN), web1, now(1));
    assert_eq!(reason(d), Some(DropReason::SgIngress));
    // Reply traffic with no connection behind it is not a new connection either.
    let d =
        l.a.decide(&tcp(WEB1, 80, DB_LOCAL, 40002, SYNACK), web1, now(1));
    assert_eq!(reason(d), Some(DropReason::TcpNoConnection));
}

#[test]
fn stateful_replies_across_hosts() {
    let mut l = Lab::new();
    let web1 = l.from("web1");
    let db1 = l.from("db1");
    let b_host = l.t.host_named("b").unwrap();
    let enc = Decision::Encapsulate {
        strip: 0,
        host: b_host,
        key: Some(1001),
        nat: Nat::NONE,
    };
    assert_eq!(
        l.a.decide(&tcp(WEB1, 40000, DB1, 5432, SYN), web1, now(0)),
        enc
    );
    let wire = gre_from(HOST_A, HOST_B, 1001, &tcp(WEB1, 40000, DB1, 5432, SYN));
    assert_eq!(
        l.b.decide(&wire, Ingress::UnderlayIp, now(0)),
        Decision::Deliver {
            to: l.id("db1"),
            strip: 28,
            nat: Nat::NONE
        }
    );
    // db1 replies; host b lets it out, host a lets it in: neither SG has a rule for it.
    let reply = tcp(DB1, 5432, WEB1, 40000, SYNACK);
    assert!(matches!(
        l.b.decide(&reply, db1, now(0)),
        Decision::Encapsulate {
            key: Some(1001),
            ..
        }
    ));
    let wire = gre_from(HOST_B, HOST_A, 1001, &reply);
    assert_eq!(
        l.a.decide(&wire, Ingress::UnderlayIp, now(0)),
        Decision::Deliver {
            to: l.id("web1"),
            strip: 28,
            nat: Nat::NONE
        }
    );
    // Without the outbound SYN, the same SYN-ACK is not a connection on host a.
    let mut fresh = Lab::new();
    assert_eq!(
        reason(fresh.a.decide(&wire, Ingress::UnderlayIp, now(0))),
        Some(DropReason::TcpNoConnection)
    );
}

#[test]
fn acls_are_stateless_and_skip_traffic_inside_a_subnet() {
    let mut l = Lab::new();
    let web1 = l.from("web1");
    // Egress ACL of web drops UDP 9999 towards any subnet...
    let d = l.a.decide(&udp(WEB1, 1, DB_LOCAL, 9999), web1, now(0));
    assert_eq!(
        d,
        Decision::Drop(Dropped {
            reason: DropReason::AclEgress,
            rule: Some(RuleRef::Acl {
                acl: AclId(0),
                rule: Some(0)
            })
        })
    );
    // ...but not inside the subnet (web1 -> web2 is judged by the SGs only).
    let d = l.a.decide(&udp(WEB1, 1, WEB2, 9999), web1, now(0));
    assert_eq!(reason(d), Some(DropReason::SgIngress));
    // Ingress ACL of web drops telnet from db-local, whatever the groups say.
    let d =
        l.a.decide(&tcp(DB_LOCAL, 1, WEB1, 23, SYN), l.from("db-local"), now(0));
    assert_eq!(
        d,
        Decision::Drop(Dropped {
            reason: DropReason::AclIngress,
            rule: Some(RuleRef::Acl {
                acl: AclId(0),
                rule: Some(0)
            })
        })
    );
    // On the receiving host the ingress ACL runs too: nat (10.0.2.5, host b) is inside
    // 10.0/16, so the ACL admits it and web1's group decides.
    let wire = gre_from(HOST_B, HOST_A, 1001, &udp(NAT, 1, WEB1, 80));
    let d = l.a.decide(&wire, Ingress::UnderlayIp, now(0));
    assert_eq!(reason(d), Some(DropReason::SgIngress));
    let wire = gre_from(HOST_B, HOST_A, 1001, &tcp(NAT, 1, WEB1, 23, SYN));
    assert_eq!(
        reason(l.a.decide(&wire, Ingress::UnderlayIp, now(0))),
        Some(DropReason::AclIngress)
    );
}

#[test]
fn acl_with_no_matching_rule_denies() {
    // The web ACL's egress, narrowed to TCP: UDP leaving the subnet matches no rule.
    let t = Arc::new(
        Topology::parse(
            &TOPOLOGY.replace(
                "{ action = \"accept\", protocol = \"all\", cidr = \"0.0.0.0/0\" },\n]\n\n[[security_group]]",
                "{ action = \"accept\", protocol = \"tcp\", cidr = \"0.0.0.0/0\" },\n]\n\n[[security_group]]",
            ),
            "t.toml",
        )
        .unwrap(),
    );
    let mut a = Pipeline::new(t.clone(), t.host_named("a").unwrap());
    let d = a.decide(
        &udp(WEB1, 1, DB_LOCAL, 53),
        Ingress::Instance(t.instance_named("web1").unwrap()),
        now(0),
    );
    assert_eq!(
        d,
        Decision::Drop(Dropped {
            reason: DropReason::AclEgress,
            rule: Some(RuleRef::Acl {
                acl: AclId(0),
                rule: None
            })
        })
    );
}

#[test]
fn too_big_with_df_gets_frag_needed_from_the_gateway() {
    let mut l = Lab::new();
    let web1 = l.from("web1");
    let mut big = udp(WEB1, 1, WEB2, 80);
    big.resize(1473, 0);
    big[2..4].copy_from_slice(&1473u16.to_be_bytes());
    big[6] = 0x40; // DF
    big[10..12].fill(0);
    let c = ipv4::checksum(&big[..20]);
    big[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        l.a.decide(&big, web1, now(0)),
        Decision::FragNeeded {
            to: l.id("web1"),
            mtu: 1472
        }
    );
    let mut buf = PacketBuf::from_packet(&big);
    assert_eq!(
        l.a.process(&mut buf, web1, now(0)),
        Action::Reply(l.id("web1"))
    );
    let reply = ipv4::parse(buf.as_slice()).unwrap();
    assert_eq!(reply.src, Ipv4Addr::new(10, 0, 1, 1));
    assert_eq!(reply.dst, Ipv4Addr::from(WEB1));
    assert_eq!(
        u16::from_be_bytes([buf.as_slice()[26], buf.as_slice()[27]]),
        1472
    );
    // Without DF: refused and counted, not fragmented.
    big[6] = 0;
    big[10..12].fill(0);
    let c = ipv4::checksum(&big[..20]);
    big[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        l.a.decide(&big, web1, now(0)),
        drop(DropReason::OversizeNoDf)
    );
    // Exactly the MTU passes.
    big.truncate(1472);
    big[2..4].copy_from_slice(&1472u16.to_be_bytes());
    assert!(reason(l.a.decide(&big, web1, now(0))) != Some(DropReason::OversizeNoDf));
}

fn fragment(mut p: Vec<u8>, ident: u16, offset_words: u16, more: bool) -> Vec<u8> {
    p[4..6].copy_from_slice(&ident.to_be_bytes());
    let f = offset_words | if more { 0x2000 } else { 0 };
    p[6..8].copy_from_slice(&f.to_be_bytes());
    p
}

#[test]
fn later_fragments_follow_the_first_and_never_bypass_a_port_rule() {
    let mut l = Lab::new();
    let web1 = l.from("web1");
    // A datagram to an admitted port: its later fragments follow.
    let first = fragment(udp(WEB1, 5000, DB_LOCAL, 53), 7, 0, true);
    let later = fragment(ip(WEB1, DB_LOCAL, proto::UDP, &[0; 16]), 7, 3, false);
    assert_eq!(
        reason(l.a.decide(&later, web1, now(0))),
        Some(DropReason::FragmentWithoutFirst)
    );
    // db-local admits nothing inbound: first fragment dropped by its group...
    assert_eq!(
        reason(l.a.decide(&first, web1, now(0))),
        Some(DropReason::SgIngress)
    );
    // ...so the later one, which has no ports, is dropped too.
    assert_eq!(
        reason(l.a.decide(&later, web1, now(0))),
        Some(DropReason::FragmentWithoutFirst)
    );
    // To web2 on TCP 80 (admitted): the first fragment opens, the later follows.
    let first = fragment(tcp(WEB1, 5000, WEB2, 80, SYN), 9, 0, true);
    let later = fragment(ip(WEB1, WEB2, proto::TCP, &[0; 16]), 9, 3, false);
    assert_eq!(l.a.decide(&first, web1, now(0)), l.deliver("web2"));
    assert_eq!(l.a.decide(&later, web1, now(1)), l.deliver("web2"));
    // 30 s later the memory is gone.
    assert_eq!(
        reason(l.a.decide(&later, web1, now(40))),
        Some(DropReason::FragmentWithoutFirst)
    );
    // A different datagram id does not follow.
    let other = fragment(ip(WEB1, WEB2, proto::TCP, &[0; 16]), 10, 3, false);
    assert_eq!(
        reason(l.a.decide(&other, web1, now(1))),
        Some(DropReason::FragmentWithoutFirst)
    );
}

#[test]
fn tcp_flags_no_connection_sends_are_invalid() {
    let mut l = Lab::new();
    let web1 = l.from("web1");
    for flags in [0x03u8, 0x06, 0x00, 0x01, 0x29] {
        assert_eq!(
            reason(l.a.decide(
                &tcp(WEB1, 40000 + u16::from(flags), WEB2, 80, flags),
                web1,
                now(0)
            )),
            Some(DropReason::TcpInvalid),
            "{flags:#x}"
        );
    }
    // After the handshake, a SYN from the client passes unchanged (nf_conntrack ignores it:
    // the server answers with a challenge ACK); invalid flags are still refused, and the
    // cache does not hide them.
    l.a.decide(&tcp(WEB1, 41000, WEB2, 80, SYN), web1, now(0));
    l.a.decide(&tcp(WEB2, 80, WEB1, 41000, SYNACK), l.from("web2"), now(0));
    assert_eq!(
        l.a.decide(&tcp(WEB1, 41000, WEB2, 80, ACK), web1, now(0)),
        l.deliver("web2")
    );
    assert_eq!(
        l.a.decide(&tcp(WEB1, 41000, WEB2, 80, ACK), web1, now(0)),
        l.deliver("web2")
    );
    assert_eq!(
        l.a.decide(&tcp(WEB1, 41000, WEB2, 80, SYN), web1, now(0)),
        l.deliver("web2")
    );
    assert_eq!(
        reason(l.a.decide(&tcp(WEB1, 41000, WEB2, 80, 0x03), web1, now(0))),
        Some(DropReason::TcpInvalid)
    );
}

fn icmp_error_about(src: [u8; 4], dst: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut body = vec![3, 3, 0, 0, 0, 0, 0, 0];
    body.extend_from_slice(&quoted[..28]);
    ip(src, dst, proto::ICMP, &body)
}

#[test]
fn icmp_errors_are_related_only_to_a_tracked_connection_of_the_same_vpc() {
    let mut l = Lab::new();
    let db_local = l.from("db-local");
    let web1 = l.from("web1");
    let syn = tcp(DB_LOCAL, 40000, WEB1, 80, SYN);
    // Unrelated: no connection yet.
    let err = icmp_error_about(WEB1, DB_LOCAL, &syn);
    assert_eq!(
        reason(l.a.decide(&err, web1, now(0))),
        Some(DropReason::IcmpErrorUnrelated)
    );
    assert_eq!(l.a.decide(&syn, db_local, now(0)), l.deliver("web1"));
    // Related: port unreachable about db-local's SYN reaches db-local, whose group admits
    // nothing inbound.
    assert_eq!(l.a.decide(&err, web1, now(1)), l.deliver("db-local"));
    // The same error inside bob's VPC relates to nothing: zones differ.
    let bob1 = l.from("bob1");
    let bob_err = icmp_error_about(
        WEB1,
        [10, 0, 1, 20],
        &tcp([10, 0, 1, 20], 40000, WEB1, 80, SYN),
    );
    assert_eq!(
        reason(l.a.decide(&bob_err, bob1, now(1))),
        Some(DropReason::IcmpErrorUnrelated)
    );
}

#[test]
fn echo_is_tracked_by_identifier() {
    let mut l = Lab::new();
    let db_local = l.from("db-local");
    let web1 = l.from("web1");
    // web1 pings db-local: sg-out-only admits no inbound ICMP.
    assert_eq!(
        reason(l.a.decide(&icmp(WEB1, DB_LOCAL, 8, 5), web1, now(0))),
        Some(DropReason::SgIngress)
    );
    // db-local pings web1 (sg-web admits ICMP only from sg-db members: db-local is not).
    assert_eq!(
        reason(l.a.decide(&icmp(DB_LOCAL, WEB1, 8, 5), db_local, now(0))),
        Some(DropReason::SgIngress)
    );
    // Through a group that admits it, the reply with the same id comes back; another id not.
    let bob1 = l.from("bob1");
    let bob2_host = l.t.host_named("b").unwrap();
    assert_eq!(
        l.a.decide(&icmp(WEB1, BOB2, 8, 5), bob1, now(0)),
        Decision::Encapsulate {
            strip: 0,
            host: bob2_host,
            key: Some(2002),
            nat: Nat::NONE
        }
    );
    let reply = gre_from(HOST_B, HOST_A, 2002, &icmp(BOB2, WEB1, 0, 5));
    assert!(matches!(
        l.a.decide(&reply, Ingress::UnderlayIp, now(1)),
        Decision::Deliver { .. }
    ));
}

#[test]
fn the_flow_cache_key_holds_every_field_the_decision_reads() {
    let mut l = Lab::new();
    let web1 = l.from("web1");
    // Warm the cache with an admitted flow; then change one field at a time: each variant
    // must get its own decision, not the cached one.
    let base = tcp(WEB1, 40000, WEB2, 80, SYN);
    assert_eq!(l.a.decide(&base, web1, now(0)), l.deliver("web2"));
    assert_eq!(l.a.decide(&base, web1, now(0)), l.deliver("web2"));
    let hits = l.a.counters().cache_hits;
    assert!(hits >= 1);
    let variants: Vec<(&str, Vec<u8>, Ingress, Decision)> = vec![
        (
            "dport",
            tcp(WEB1, 40000, WEB2, 81, SYN),
            web1,
            drop(DropReason::SgIngress),
        ),
        (
            "sport",
            tcp(WEB1, 40001, WEB2, 80, SYN),
            web1,
            l.deliver("web2"),
        ),
        (
            "dst",
            tcp(WEB1, 40000, DB_LOCAL, 80, SYN),
            web1,
            drop(DropReason::SgIngress),
        ),
        (
            "src (and ingress)",
            tcp(DB_LOCAL, 40000, WEB2, 80, SYN),
            l.from("db-local"),
            l.deliver("web2"),
        ),
        (
            "protocol",
            udp(WEB1, 40000, WEB2, 80),
            web1,
            drop(DropReason::SgIngress),
        ),
        (
            "vpc (same addresses in bob)",
            tcp(WEB1, 40000, BOB2, 80, SYN),
            l.from("bob1"),
            {
                Decision::Encapsulate {
                    strip: 0,
                    host: l.t.host_named("b").unwrap(),
                    key: Some(2002),
                    nat: Nat::NONE,
                }
            },
        ),
        (
            "ingress (spoofed from another port)",
            base.clone(),
            l.from("web2"),
            drop(DropReason::SourceSpoofed),
        ),
    ];
    for (what, pkt, from, want) in variants {
        let got = l.a.decide(&pkt, from, now(0));
        assert_eq!(reason(got), reason(want), "{what}: {got:?}");
        if reason(want).is_none() {
            assert_eq!(got, want, "{what}");
        }
    }
    // ICMP type, code and id: an echo request is admitted (bob), an echo reply with the same
    // id and no request behind it is judged statelessly.
    let bob1 = l.from("bob1");
    let a = l.a.decide(&icmp(WEB1, [10, 0, 1, 20], 8, 1), bob1, now(0));
    let b = l.a.decide(&icmp(WEB1, [10, 0, 1, 20], 8, 2), bob1, now(0));
    assert_eq!(a, b);
    let mut code = icmp(WEB1, WEB2, 8, 1);
    code[21] = 1;
    let _ = l.a.decide(&code, web1, now(0));
    let key = |ingress: u32, gre_key: u64, p: &[u8]| {
        FlowKey::new(ingress, gre_key, &ipv4::parse(p).unwrap())
    };
    let k1 = key(1, 0, &icmp(WEB1, WEB2, 8, 1));
    assert_ne!(k1, key(1, 0, &code), "ICMP code");
    assert_ne!(k1, key(1, 0, &icmp(WEB1, WEB2, 0, 1)), "ICMP type");
    assert_ne!(k1, key(1, 0, &icmp(WEB1, WEB2, 8, 2)), "ICMP id");
    assert_ne!(k1, key(2, 0, &icmp(WEB1, WEB2, 8, 1)), "ingress");
    assert_ne!(k1, key(1, 1001, &icmp(WEB1, WEB2, 8, 1)), "GRE key");
}

#[test]
fn a_new_generation_invalidates_cached_decisions_but_keeps_connections() {
    let mut l = Lab::new();
    let web1 = l.from("web1");
    let web2 = l.from("web2");
    let syn = tcp(WEB1, 40000, WEB2, 80, SYN);
    assert_eq!(l.a.decide(&syn, web1, now(0)), l.deliver("web2"));
    l.a.decide(&tcp(WEB2, 80, WEB1, 40000, SYNACK), web2, now(0));
    let ack = tcp(WEB1, 40000, WEB2, 80, ACK);
    assert_eq!(l.a.decide(&ack, web1, now(0)), l.deliver("web2"));
    // A new topology where sg-web no longer admits port 80.
    let t2 = Arc::new(
        Topology::parse(
            &TOPOLOGY.replace(
                "{ action = \"accept\", protocol = \"tcp\", port = \"80\", source = \"10.0.0.0/16\" },",
                "",
            ),
            "t2.toml",
        )
        .unwrap(),
    );
    let gen1 = l.a.generation();
    l.a.set_topology(t2);
    assert_eq!(l.a.generation(), gen1 + 1);
    // The tracked connection keeps flowing...
    assert_eq!(l.a.decide(&ack, web1, now(1)), l.deliver("web2"));
    // ...new ones are judged by the new rules.
    let d = l.a.decide(&tcp(WEB1, 40001, WEB2, 80, SYN), web1, now(1));
    assert_eq!(reason(d), Some(DropReason::SgIngress));
    // A route change is seen at once by a flow whose decision was cached.
    let mut l = Lab::new();
    let web1 = l.from("web1");
    let dns = udp(WEB1, 5000, [198, 51, 100, 53], 53);
    assert_eq!(
        reason(l.a.decide(&dns, web1, now(0))),
        Some(DropReason::RouteDrop)
    );
    assert_eq!(
        reason(l.a.decide(&dns, web1, now(0))),
        Some(DropReason::RouteDrop)
    );
    let t3 = Arc::new(
        Topology::parse(
            &TOPOLOGY.replace(
                "{ destination = \"198.51.100.0/24\", next_hop = \"drop\" },",
                "",
            ),
            "t3.toml",
        )
        .unwrap(),
    );
    l.a.set_topology(t3);
    assert!(matches!(
        l.a.decide(&dns, web1, now(0)),
        Decision::Encapsulate { .. }
    ));
}

#[test]
fn an_instance_that_leaves_ends_its_connections() {
    let mut l = Lab::new();
    let web1 = l.from("web1");
    l.a.decide(&tcp(WEB1, 40000, WEB2, 80, SYN), web1, now(0));
    l.a.decide(
        &udp(DB_LOCAL, 1, [10, 0, 1, 20], 5),
        l.from("db-local"),
        now(0),
    );
    assert_eq!(
        l.a.conntrack().len(),
        2,
        "one entry per side (web1's, web2's); db-local's UDP to a nonexistent address was not tracked"
    );
    // web2 moves to host b: its side ends on host a; web1's side stays (web2 is still web2).
    let moved = TOPOLOGY.replace(
        "name = \"web2\"\nhost = \"a\"",
        "name = \"web2\"\nhost = \"b\"",
    );
    l.a.set_topology(Arc::new(Topology::parse(&moved, "moved.toml").unwrap()));
    assert_eq!(l.a.conntrack().len(), 1);
    // web2 is removed and another instance takes its address: web1's side ends too, so the
    // newcomer can never pass as web2's replies.
    let taken = TOPOLOGY.replace(
        "name = \"web2\"\nhost = \"a\"",
        "name = \"web9\"\nhost = \"b\"",
    );
    l.a.set_topology(Arc::new(Topology::parse(&taken, "taken.toml").unwrap()));
    assert_eq!(l.a.conntrack().len(), 0);
}

#[test]
fn underlay_acceptance() {
    let mut l = Lab::new();
    let inner = tcp(DB1, 5432, WEB1, 40000, SYN);
    let cases: Vec<(&str, Vec<u8>, Ingress, DropReason)> = vec![
        (
            "unknown sender",
            gre_from([192, 0, 2, 99], HOST_A, 1001, &inner),
            Ingress::UnderlayIp,
            DropReason::UnknownUnderlaySource,
        ),
        (
            "not for this host",
            gre_from(HOST_B, [192, 0, 2, 3], 1001, &inner),
            Ingress::UnderlayIp,
            DropReason::NotAddressedToHost,
        ),
        (
            "unknown key",
            gre_from(HOST_B, HOST_A, 4242, &inner),
            Ingress::UnderlayIp,
            DropReason::GreUnknownKey,
        ),
        (
            "key of a VPC with nothing here",
            gre_from(HOST_B, HOST_A, 3003, &inner),
            Ingress::UnderlayIp,
            DropReason::GreKeyNotOnHost,
        ),
        (
            "inner source is not on the sending host (web2 lives on host a)",
            gre_from(HOST_B, HOST_A, 1001, &tcp(WEB2, 1, WEB1, 80, SYN)),
            Ingress::UnderlayIp,
            DropReason::InnerSourceNotOnSender,
        ),
        (
            "destination lives on another host",
            gre_from(HOST_B, HOST_A, 1001, &tcp(DB1, 1, NAT, 80, SYN)),
            Ingress::UnderlayIp,
            DropReason::NotLocalDestination,
        ),
        (
            "GRE-in-UDP from an unknown address",
            gre_from(HOST_B, HOST_A, 1001, &inner)[20..].to_vec(),
            Ingress::UnderlayUdp {
                from: Ipv4Addr::new(198, 51, 100, 1),
            },
            DropReason::UnknownUnderlaySource,
        ),
    ];
    for (what, pkt, from, want) in cases {
        assert_eq!(reason(l.a.decide(&pkt, from, now(0))), Some(want), "{what}");
    }
    // GRE-in-UDP from host b with the right key is accepted; the inner packet starts after
    // the GRE header.
    let udp_payload = gre_from(HOST_B, HOST_A, 1001, &icmp(DB1, WEB1, 8, 3))[20..].to_vec();
    assert_eq!(
        l.a.decide(
            &udp_payload,
            Ingress::UnderlayUdp {
                from: HOST_B.into()
            },
            now(0)
        ),
        Decision::Deliver {
            to: l.id("web1"),
            strip: 8,
            nat: Nat::NONE
        }
    );
}

#[test]
fn process_encapsulates_and_decapsulates_in_place() {
    let mut l = Lab::new();
    let web1 = l.from("web1");
    let inner = tcp(WEB1, 40000, DB1, 5432, SYN);
    let mut buf = PacketBuf::from_packet(&inner);
    let payload = buf.as_slice().as_ptr();
    let action = l.a.process(&mut buf, web1, now(0));
    let Action::Transmit { to, key, .. } = action else {
        panic!("{action:?}")
    };
    assert_eq!((to, key), (Ipv4Addr::from(HOST_B), Some(1001)));
    assert_eq!(buf.len(), inner.len() + 28);
    assert_eq!(
        buf.as_slice()[28..].as_ptr(),
        payload,
        "the inner packet did not move"
    );
    // Host b receives exactly these bytes and hands db1 the original packet, again in place.
    let action = l.b.process(&mut buf, Ingress::UnderlayIp, now(0));
    assert_eq!(action, Action::Deliver(l.id("db1")));
    assert_eq!(buf.as_slice(), &inner[..]);
    assert_eq!(buf.as_slice().as_ptr(), payload);
}

#[test]
fn gre_udp_transport_pushes_only_gre() {
    let t = Arc::new(
        Topology::parse(
            &TOPOLOGY.replace("transport = \"gre\"", "transport = \"gre-udp\""),
            "u.toml",
        )
        .unwrap(),
    );
    let mut a = Pipeline::new(t.clone(), t.host_named("a").unwrap());
    let inner = tcp(WEB1, 40000, DB1, 5432, SYN);
    let mut buf = PacketBuf::from_packet(&inner);
    let web1 = Ingress::Instance(t.instance_named("web1").unwrap());
    let Action::Transmit { to, flow_hash, .. } = a.process(&mut buf, web1, now(0)) else {
        panic!()
    };
    assert_eq!(to, Ipv4Addr::from(HOST_B));
    assert_eq!(buf.len(), inner.len() + 8);
    assert_eq!(gre::parse(buf.as_slice()).unwrap().key, Some(1001));
    assert_eq!(flow_hash, ipv4::flow_hash(&inner, a.flow_seed()));
    assert_eq!(t.underlay.instance_mtu(), 1464);
}

#[test]
fn counters_per_reason_and_per_instance() {
    let mut l = Lab::new();
    let web1 = l.from("web1");
    l.a.decide(&tcp(WEB1, 1, WEB2, 80, SYN), web1, now(0));
    l.a.decide(&tcp(WEB1, 1, [10, 0, 9, 9], 80, SYN), web1, now(0));
    l.a.decide(&tcp([1, 2, 3, 4], 1, WEB2, 80, SYN), web1, now(0));
    l.a.decide(&[0x45, 0], web1, now(0));
    let c = l.a.counters();
    assert_eq!(c.drops(DropReason::NoSuchInstance), 1);
    assert_eq!(c.drops(DropReason::SourceSpoofed), 1);
    assert_eq!(c.drops(DropReason::InnerTruncated), 1);
    assert_eq!(c.total_drops(), 3);
    let p = c.port(l.id("web1").index());
    assert_eq!((p.sent, p.sent_dropped), (1, 3));
    assert_eq!(c.port(l.id("web2").index()).received, 1);
    assert_eq!(c.delivered, 1);
}

#[test]
fn instance_counters_follow_their_instance_when_ids_move() {
    let mut l = Lab::new();
    let web1 = l.from("web1");
    l.a.decide(&tcp(WEB1, 1, WEB2, 80, SYN), web1, now(0));
    // A new instance ahead of the others in the file: every id moves up by one.
    let grown = TOPOLOGY.replacen(
        "[[instance]]",
        "[[instance]]\nname = \"web0\"\nhost = \"a\"\nsubnet = \"web\"\nip = \"10.0.1.9\"\nsecurity_groups = [\"sg-web\"]\n[[instance]]",
        1,
    );
    let t = Arc::new(Topology::parse(&grown, "grown.toml").unwrap());
    l.a.set_topology(t.clone());
    let c = l.a.counters();
    let at = |name: &str| c.port(t.instance_named(name).unwrap().index());
    assert_eq!(at("web1").sent, 1);
    assert_eq!(at("web2").received, 1);
    assert_eq!(at("web0"), Default::default());
}

#[test]
fn a_syn_flood_cannot_evict_another_tenants_established_connection() {
    let text = format!("[conntrack]\nmax_entries = 64\nmax_per_instance = 16\n{TOPOLOGY}");
    let t = Arc::new(Topology::parse(&text, "flood.toml").unwrap());
    let mut a = Pipeline::new(t.clone(), t.host_named("a").unwrap());
    let bob1 = Ingress::Instance(t.instance_named("bob1").unwrap());
    let web1 = Ingress::Instance(t.instance_named("web1").unwrap());
    let web2 = Ingress::Instance(t.instance_named("web2").unwrap());
    // alice's web1 -> web2 connection is established.
    a.decide(&tcp(WEB1, 40000, WEB2, 80, SYN), web1, now(0));
    a.decide(&tcp(WEB2, 80, WEB1, 40000, SYNACK), web2, now(0));
    a.decide(&tcp(WEB1, 40000, WEB2, 80, ACK), web1, now(0));
    // bob1 floods SYNs to bob2 from 5,000 ports.
    for port in 0..5000u16 {
        a.decide(&tcp(WEB1, port, BOB2, 22, SYN), bob1, now(1));
    }
    // web1's connection holds two entries (one per side); bob1's flood holds its share, 16.
    assert!(a.conntrack().len() <= 18, "{}", a.conntrack().len());
    assert_eq!(
        a.decide(&tcp(WEB2, 80, WEB1, 40000, ACK), web2, now(2)),
        Decision::Deliver {
            to: t.instance_named("web1").unwrap(),
            strip: 0,
            nat: Nat::NONE
        }
    );
    assert!(a.conntrack().stats().evicted >= 4900);
}

#[test]
fn no_panic_on_short_or_garbage_input_from_either_side() {
    let mut l = Lab::new();
    let web1 = l.from("web1");
    let mut seed = 0x1234_5678u32;
    for len in 0..200usize {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        for from in [
            web1,
            Ingress::UnderlayIp,
            Ingress::UnderlayUdp {
                from: HOST_B.into(),
            },
            Ingress::Instance(InstanceId(999)),
        ] {
            let mut buf = PacketBuf::from_packet(&bytes);
            let _ = l.a.process(&mut buf, from, now(0));
        }
    }
    assert_eq!(
        l.a.decide(
            &tcp(WEB1, 1, WEB2, 80, SYN),
            Ingress::Instance(InstanceId(999)),
            now(0)
        ),
        drop(DropReason::UnknownPort)
    );
}

#[test]
fn reloaded_connection_limits_and_flow_cache_size_take_effect() {
    let text = |entries: u32, per: u32, cache: u32| {
        format!(
            "[conntrack]\nmax_entries = {entries}\nmax_per_instance = {per}\nflow_cache = {cache}\n{TOPOLOGY}"
        )
    };
    let t = Arc::new(Topology::parse(&text(1000, 1000, 64), "a.toml").unwrap());
    let mut a = Pipeline::new(t.clone(), t.host_named("a").unwrap());
    assert_eq!(a.conntrack().limits(), (1000, 1000));
    let t2 = Arc::new(Topology::parse(&text(500, 3, 1024), "b.toml").unwrap());
    a.set_topology(t2.clone());
    assert_eq!(a.conntrack().limits(), (500, 3));
    // The new share holds: db-local opens 5 UDP flows, 3 stay.
    let db = Ingress::Instance(t2.instance_named("db-local").unwrap());
    for port in 0..5 {
        a.decide(&udp(DB_LOCAL, 1000 + port, NAT, 53), db, now(0));
    }
    let owner = crate::policy::conntrack::Owner {
        zone: crate::policy::conntrack::Zone::vpc(1001),
        addr: DB_LOCAL.into(),
    };
    assert_eq!(a.conntrack().owned_by(&owner), 3);
    // A shard's share is the host's divided among the workers.
    let shard = Pipeline::shard(t2.clone(), t2.host_named("a").unwrap(), 4, 7);
    assert_eq!(shard.conntrack().limits(), (125, 1));
}
