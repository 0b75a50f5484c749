//! Arbitrary bytes into host-a's decision, from both sides (instance ports and the underlay).
//!
//! Input layout (see README.md):
//!
//! ```text
//!  byte 0     bits 0-3  ingress:  0-9  Instance(InstanceId(n))  (0-7 VPC, 8-9 basic)
//!                                 10   UnderlayIp               (outer IPv4 first)
//!                                 11   UnderlayUdp from host-b  (192.0.2.2, GRE first)
//!                                 12   UnderlayUdp from host-c  (192.0.2.3)
//!                                 13   UnderlayUdp from 198.51.100.7 (not a host)
//!                                 14   UnderlayUdp from host-a itself (192.0.2.1)
//!                                 15   Internet (host-a is the internet gateway)
//!             bit 4     pipeline: 0 transport "gre", 1 "gre-udp" with GRE checksums
//!             bit 5     after `decide`, also `process` the same bytes in a PacketBuf
//!             bits 6-7  3: install the other topology variant first (db-local moves to
//!                          host-c, web-new appears as id 10); 2: sweep the connection
//!                          table after
//!  bytes 1-2  time step v, big endian: v >= 0xf000: (v & 0x0fff) seconds (up to 68 min);
//!             else (v & 0x03ff) milliseconds (so that most inputs stay within timeouts)
//!  bytes 3..  the packet
//! ```
//!
//! One pipeline per transport lives across inputs (thread-local), with small tables, so that
//! conntrack, the flow cache, the fragment table and eviction see sequences of packets: the
//! "gre" one with the topology's 256 connections (32 per instance) and 64 flow-cache slots,
//! the "gre-udp" one with 3 connections (2 per instance) and 16 slots.
//!
//! The topology has both networks: two overlapping VPCs, the basic network (two instances of
//! one tenant, one linked to a VPC), Elastic IPs, and host-a as the internet gateway, so that
//! NAT (ICMP quotes included), relays and hairpins are reached.
//!
//! Beyond "never panics", each decision is checked against what the pipeline promises: a
//! delivery goes to a local instance with the inner packet at `strip`; only instance traffic
//! and the gateway's relays are encapsulated; only instance traffic is answered; `process`
//! leaves in the buffer what its action says (the inner packet unchanged unless NAT applies).

#![no_main]

use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vpcd_core::topology::{HostId, InstanceId, Transport};
use vpcd_core::wire::ipv4::{self, L4};
use vpcd_core::wire::{PacketBuf, gre};
use vpcd_core::{Action, Decision, Ingress, Pipeline, Timestamp, Topology};

const HOST_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

fn topology_text(transport: &str, checksum: bool, variant: bool) -> String {
    let (db_local_host, extra) = if variant {
        (
            "host-c",
            r#"
[[instance]]
name = "web-new"
host = "host-a"
subnet = "blue-web"
ip = "10.0.1.12"
security_groups = ["sg-web", "sg-open"]
eip = "203.0.113.12"
"#,
        )
    } else {
        ("host-a", "")
    };
    format!(
        r#"
[underlay]
transport = "{transport}"
mtu = 1500
checksum = {checksum}

[conntrack]
max_entries = 256
max_per_instance = 32
flow_cache = 64

[basic]
cidr = "10.128.0.0/16"

[internet]
cidr = "203.0.113.0/24"
gateway = "host-a"

[[host]]
name = "host-a"
address = "192.0.2.1"

[[host]]
name = "host-b"
address = "192.0.2.2"

[[host]]
name = "host-c"
address = "192.0.2.3"

[[vpc]]
name = "blue"
tenant = "t1"
cidr = "10.0.0.0/16"
key = 1001

[[vpc]]
name = "red"
tenant = "t2"
cidr = "10.0.0.0/16"
key = 2002

[[subnet]]
name = "blue-web"
vpc = "blue"
cidr = "10.0.1.0/24"
acl = "acl-web"
route_table = "rt-web"

[[subnet]]
name = "blue-db"
vpc = "blue"
cidr = "10.0.2.0/24"

[[subnet]]
name = "blue-fw"
vpc = "blue"
cidr = "10.0.9.0/24"

[[subnet]]
name = "red-a"
vpc = "red"
cidr = "10.0.1.0/24"

[[route_table]]
name = "rt-web"
vpc = "blue"
routes = [
  {{ destination = "198.51.100.0/24", next_hop = "drop" }},
  {{ destination = "203.0.113.0/24", next_hop = "instance:fw" }},
  {{ destination = "203.0.113.128/25", next_hop = "instance:fw-remote" }},
  {{ destination = "100.64.0.0/10", next_hop = "instance:fw-remote" }},
  {{ destination = "172.16.0.0/12", next_hop = "instance:web-local" }},
  {{ destination = "0.0.0.0/0", next_hop = "internet" }},
]

[[acl]]
name = "acl-web"
vpc = "blue"
ingress = [
  {{ action = "accept", protocol = "tcp",  port = "80,22",       cidr = "10.0.0.0/16" }},
  {{ action = "accept", protocol = "tcp",  port = "32768-60999", cidr = "10.0.0.0/16" }},
  {{ action = "accept", protocol = "icmp",                       cidr = "10.0.0.0/16" }},
  {{ action = "drop",   protocol = "udp",  port = 53,            cidr = "10.0.2.0/24" }},
  {{ action = "accept", protocol = "udp",                        cidr = "10.0.0.0/8" }},
]
egress = [
  {{ action = "drop",   protocol = "tcp", port = 25, cidr = "0.0.0.0/0" }},
  {{ action = "accept", protocol = "all",            cidr = "0.0.0.0/0" }},
]

[[security_group]]
name = "sg-web"
ingress = [
  {{ action = "accept", protocol = "tcp",  port = "80",        source = "10.0.0.0/16" }},
  {{ action = "accept", protocol = "tcp",  port = "22",        source = "sg:sg-db" }},
  {{ action = "accept", protocol = "icmp",                     source = "sg:sg-db" }},
  {{ action = "accept", protocol = "udp",  port = "5000-6000", source = "10.0.0.0/8" }},
]
egress = [
  {{ action = "drop",   protocol = "udp", port = 9999, destination = "0.0.0.0/0" }},
  {{ action = "accept", protocol = "all",               destination = "0.0.0.0/0" }},
]

[[security_group]]
name = "sg-db"
ingress = [
  {{ action = "accept", protocol = "tcp",  port = 5432,        source = "sg:sg-web" }},
  {{ action = "drop",   protocol = "udp",  port = "1000-2000", source = "0.0.0.0/0" }},
  {{ action = "accept", protocol = "icmp",                     source = "10.0.0.0/16" }},
  {{ action = "accept", protocol = "tcp",  port = "80",        source = "10.0.0.0/16" }},
  {{ action = "accept", protocol = "udp",  port = "53",        source = "10.0.0.0/16" }},
]
egress = [ {{ action = "accept", protocol = "all", destination = "0.0.0.0/0" }} ]

[[security_group]]
name = "sg-fw"
ingress = [ {{ action = "accept", protocol = "all", source = "10.0.0.0/16" }} ]
egress = [ {{ action = "accept", protocol = "all", destination = "0.0.0.0/0" }} ]

[[security_group]]
name = "sg-open"
ingress = [ {{ action = "accept", protocol = "all", source = "0.0.0.0/0" }} ]
egress = [ {{ action = "accept", protocol = "all", destination = "0.0.0.0/0" }} ]

# 0: the sender of every tests/data/gre vector
[[instance]]
name = "web-remote"
host = "host-b"
subnet = "blue-web"
ip = "10.0.1.10"
security_groups = ["sg-web"]

# 1
[[instance]]
name = "web-local"
host = "host-a"
subnet = "blue-web"
ip = "10.0.1.11"
security_groups = ["sg-web"]
eip = "203.0.113.10"

# 2: the receiver of every tests/data/gre vector
[[instance]]
name = "db-local"
host = "{db_local_host}"
subnet = "blue-db"
ip = "10.0.2.20"
security_groups = ["sg-db"]

# 3
[[instance]]
name = "db-remote"
host = "host-c"
subnet = "blue-db"
ip = "10.0.2.30"
security_groups = ["sg-db"]

# 4
[[instance]]
name = "fw"
host = "host-a"
subnet = "blue-fw"
ip = "10.0.9.9"
security_groups = ["sg-fw"]

# 5
[[instance]]
name = "fw-remote"
host = "host-b"
subnet = "blue-fw"
ip = "10.0.9.10"
security_groups = ["sg-fw"]

# 6
[[instance]]
name = "red-a"
host = "host-a"
subnet = "red-a"
ip = "10.0.1.10"
security_groups = ["sg-open"]

# 7
[[instance]]
name = "red-b"
host = "host-b"
subnet = "red-a"
ip = "10.0.1.20"
security_groups = ["sg-open"]
eip = "203.0.113.11"

# 8
[[instance]]
name = "classic-a"
host = "host-a"
network = "basic"
tenant = "t1"
security_groups = ["sg-open"]
eip = "203.0.113.20"

# 9
[[instance]]
name = "classic-b"
host = "host-b"
network = "basic"
tenant = "t1"
security_groups = ["sg-web"]

[[interconnect]]
instance = "classic-a"
vpc = "blue"
{extra}"#
    )
}

struct Side {
    topologies: [Arc<Topology>; 2],
    variant: usize,
    pipeline: Pipeline,
}

struct State {
    sides: [Side; 2],
    now: Timestamp,
    /// `VPCD_FUZZ_TRACE=1`: print every decision (to replay a sequence of inputs).
    trace: bool,
    /// `VPCD_FUZZ_IGNORE=stale-fragments`: do not check the decisions of later fragments,
    /// which follow their first fragment's decision even across a topology change (the known
    /// finding in fuzz/regressions/stale-fragment-after-topology-change/), so that a long run
    /// looks for other problems. Panics are still caught.
    ignore_stale_fragments: bool,
}

/// The pipeline of host-a; `tiny` tables make eviction and refusals reachable.
fn side(transport: &str, checksum: bool, tiny: bool) -> Side {
    let topologies = [false, true].map(|v| {
        let text = topology_text(transport, checksum, v);
        Arc::new(Topology::parse(&text, "fuzz.toml").expect("the fuzz topology is valid"))
    });
    let topo = topologies[0].clone();
    let host = topo.host_named("host-a").unwrap();
    let pipeline = if tiny {
        // One of 64 shards of the topology's table: 4 entries, 1 per owner.
        Pipeline::shard(topo, host, 64, 0)
    } else {
        Pipeline::new(topo, host)
    };
    Side {
        pipeline,
        topologies,
        variant: 0,
    }
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State {
        sides: [side("gre", false, false), side("gre-udp", true, true)],
        now: Timestamp::from_secs(1),
        trace: std::env::var_os("VPCD_FUZZ_TRACE").is_some(),
        ignore_stale_fragments: std::env::var("VPCD_FUZZ_IGNORE")
            .is_ok_and(|v| v.split(',').any(|w| w == "stale-fragments")),
    });
}

fn ingress(sel: u8) -> Ingress {
    match sel & 0x0f {
        n @ 0..=9 => Ingress::Instance(InstanceId(u32::from(n))),
        10 => Ingress::UnderlayIp,
        15 => Ingress::Internet,
        11 => Ingress::UnderlayUdp {
            from: Ipv4Addr::new(192, 0, 2, 2),
        },
        12 => Ingress::UnderlayUdp {
            from: Ipv4Addr::new(192, 0, 2, 3),
        },
        13 => Ingress::UnderlayUdp {
            from: Ipv4Addr::new(198, 51, 100, 7),
        },
        _ => Ingress::UnderlayUdp { from: HOST_A },
    }
}

fn check_decision(t: &Topology, host: HostId, from: Ingress, pkt: &[u8], d: Decision) {
    match d {
        Decision::Deliver { to, strip, .. } => {
            let Some(dst) = t.instances.get(to.index()) else {
                panic!("delivered to an instance that does not exist: {d:?}");
            };
            assert_eq!(dst.host, host, "delivered to a remote instance: {d:?}");
            let strip = usize::from(strip);
            assert!(strip <= pkt.len(), "strip beyond the packet: {d:?}");
            if let Ingress::Instance(_) | Ingress::Internet = from {
                assert_eq!(strip, 0, "{d:?}");
            }
            let inner = ipv4::parse(&pkt[strip..]);
            assert!(
                inner.is_ok(),
                "delivered bytes do not parse: {inner:?}, {d:?}"
            );
        }
        Decision::Encapsulate { host: to, key, nat, .. } => {
            assert_ne!(to, host, "encapsulated to this host: {d:?}");
            // A key exactly when the receiving instance (or the gateway's relay) is in a VPC.
            if let Some(k) = key {
                assert!(t.vpcs.iter().any(|v| v.key == k), "unknown key: {d:?}");
            }
            match from {
                Ingress::Instance(_) => {}
                // host-a is the gateway: it relays the internet's packets, translated.
                Ingress::Internet | Ingress::UnderlayIp | Ingress::UnderlayUdp { .. } => {
                    assert!(nat != vpcd_core::pipeline::Nat::NONE, "a relay without NAT: {d:?}")
                }
            }
        }
        Decision::ToInternet { .. } => {
            assert!(!matches!(from, Ingress::Internet), "internet to internet: {d:?}");
        }
        Decision::FragNeeded { to, mtu } => {
            assert_eq!(from, Ingress::Instance(to), "{d:?}");
            assert!(pkt.len() > usize::from(mtu), "{d:?}");
        }
        Decision::Drop(_) => {}
    }
}

/// A non-first fragment: the packet itself (instance side) or the inner packet (underlay side).
fn is_later_fragment(pkt: &[u8], from: Ingress) -> bool {
    let inner = match from {
        Ingress::Instance(_) | Ingress::Internet => pkt,
        Ingress::UnderlayIp | Ingress::UnderlayUdp { .. } => {
            let at = match from {
                Ingress::UnderlayIp => match ipv4::parse_outer(pkt) {
                    Ok(o) => o.header_len,
                    Err(_) => return false,
                },
                _ => 0,
            };
            match gre::parse(&pkt[at..]) {
                Ok(g) => &pkt[at + g.len..],
                Err(_) => return false,
            }
        }
    };
    matches!(
        ipv4::parse(inner),
        Ok(ipv4::Ipv4Packet {
            fragment: ipv4::Fragment::Later { .. },
            ..
        })
    )
}

/// Bytes that `process` changed must be a translation: the addresses differ.
fn translated(before: &[u8], after: &[u8]) -> bool {
    match (ipv4::parse(before), ipv4::parse(after)) {
        (Ok(b), Ok(a)) => (b.src, b.dst) != (a.src, a.dst) && before.len() == after.len(),
        _ => false,
    }
}

fn check_action(t: &Topology, from: Ingress, pkt: &[u8], buf: &PacketBuf, a: Action) {
    let out = buf.as_slice();
    match a {
        Action::Deliver(_) | Action::ToInternet => {
            assert!(out.len() <= pkt.len(), "delivered more than was read: {a:?}");
            let tail = &pkt[pkt.len() - out.len()..];
            assert!(
                tail == out || translated(tail, out),
                "delivered bytes are neither the packet's tail nor its translation: {a:?}"
            );
            assert!(ipv4::parse(out).is_ok(), "{a:?}");
        }
        Action::Transmit { to, key, .. } => {
            let gre_at = match t.underlay.transport {
                Transport::Gre => {
                    let o = ipv4::parse_outer(out).expect("emitted outer header parses");
                    assert_eq!((o.src, o.dst), (HOST_A, to), "{a:?}");
                    o.header_len
                }
                Transport::GreUdp => 0,
            };
            let g = gre::parse(&out[gre_at..]).expect("emitted GRE header parses");
            assert_eq!(g.key, key, "{a:?}");
            assert_eq!(g.checksum_present, t.underlay.checksum, "{a:?}");
            let inner = &out[gre_at + g.len..];
            assert!(ipv4::parse(inner).is_ok(), "{a:?}");
            if matches!(from, Ingress::Instance(_)) {
                assert!(
                    inner == pkt || translated(pkt, inner),
                    "the inner packet changed beyond translation: {a:?}"
                );
            }
        }
        Action::Reply(to) => {
            assert_eq!(from, Ingress::Instance(to), "{a:?}");
            let ip = ipv4::parse(out).expect("the ICMP error parses");
            assert_eq!(ip.dst, t.instance(to).ip, "{a:?}");
            assert!(
                matches!(
                    ip.l4,
                    L4::Icmp {
                        kind: 3,
                        code: 4,
                        ..
                    }
                ),
                "{:?}, {a:?}",
                ip.l4
            );
            assert_eq!(ipv4::checksum(&out[..20]), 0, "{a:?}");
        }
        Action::Drop(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let [sel, t0, t1, pkt @ ..] = data else {
        return;
    };
    let step = u16::from_be_bytes([*t0, *t1]);
    let from = ingress(*sel);
    STATE.with_borrow_mut(|st| {
        st.now = st.now.after(if step >= 0xf000 {
            Duration::from_secs(u64::from(step & 0x0fff))
        } else {
            Duration::from_millis(u64::from(step & 0x03ff))
        });
        let now = st.now;
        let trace = st.trace;
        let ignore_stale_fragments = st.ignore_stale_fragments;
        let s = &mut st.sides[usize::from(sel >> 4 & 1)];
        let op = sel >> 6;
        if op == 3 {
            s.variant ^= 1;
            s.pipeline.set_topology(s.topologies[s.variant].clone());
        }
        let t = s.pipeline.topology().clone();
        let host = s.pipeline.host();

        let d = s.pipeline.decide(pkt, from, now);
        if trace {
            eprintln!(
                "vpcd-fuzz: sel {sel:#04x} pipeline {} variant {} now {}ms {from:?}: {d:?}",
                sel >> 4 & 1,
                s.variant,
                now.millis()
            );
        }
        if !(ignore_stale_fragments && is_later_fragment(pkt, from)) {
            check_decision(&t, host, from, pkt, d);
        }

        if sel & 0x20 != 0 {
            let mut buf = PacketBuf::from_packet(pkt);
            let a = s.pipeline.process(&mut buf, from, now);
            if trace {
                eprintln!("vpcd-fuzz:   process: {a:?}");
            }
            check_action(&t, from, pkt, &buf, a);
        }
        if op == 2 {
            s.pipeline.sweep(now);
        }
    });
});
