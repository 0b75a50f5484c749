//! The connection listing and flush (`vpcd ctl flows`), per-connection and per-instance
//! counters, on the full path and the fast lane.

use std::sync::Arc;

use super::*;
use crate::policy::conntrack::tcp::TcpState;
use crate::policy::conntrack::{Direction, State};
use crate::topology::Topology;
use crate::wire::ipv4::{TcpFlags, proto};

const TOPOLOGY: &str = r#"
[[host]]
name = "a"
address = "192.0.2.1"

[[vpc]]
name = "v"
tenant = "t"
cidr = "10.0.0.0/16"
key = 1001

[[subnet]]
name = "s"
vpc = "v"
cidr = "10.0.1.0/24"

[[security_group]]
name = "sg-client"
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[security_group]]
name = "sg-server"
ingress = [
  { action = "accept", protocol = "tcp", port = "80", source = "0.0.0.0/0" },
  { action = "accept", protocol = "udp", port = "53", source = "0.0.0.0/0" },
]
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "client"
host = "a"
subnet = "s"
ip = "10.0.1.10"
security_groups = ["sg-client"]
[[instance]]
name = "server"
host = "a"
subnet = "s"
ip = "10.0.1.20"
security_groups = ["sg-server"]
"#;

const C: [u8; 4] = [10, 0, 1, 10];
const S: [u8; 4] = [10, 0, 1, 20];

struct Lab {
    t: Arc<Topology>,
    p: Pipeline,
}

impl Lab {
    fn new() -> Lab {
        let t = Arc::new(Topology::parse(TOPOLOGY, "t.toml").unwrap());
        let p = Pipeline::new(t.clone(), t.host_named("a").unwrap());
        Lab { t, p }
    }

    fn id(&self, name: &str) -> InstanceId {
        self.t.instance_named(name).unwrap()
    }

    fn send(&mut self, from: &str, pkt: &[u8], at: u64) -> Decision {
        let from = Ingress::Instance(self.id(from));
        self.p.decide(pkt, from, Timestamp::from_secs(at))
    }

    fn deliver(&self, to: &str) -> Decision {
        Decision::Deliver {
            to: self.id(to),
            strip: 0,
            nat: Nat::NONE,
        }
    }
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let l4 = ipv4::tests::tcp(sport, dport, flags);
    ipv4::tests::packet(src, dst, proto::TCP, &l4)
}

/// A UDP datagram with `payload` bytes of data: 28 + payload bytes at the IP level.
fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: usize) -> Vec<u8> {
    let mut u = vec![0u8; 8 + payload];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    ipv4::tests::packet(src, dst, proto::UDP, &u)
}

/// A TCP handshake and three more segments from the client: each side's entry counts the
/// packets and bytes of each direction, those the fast lane served included; the listing
/// names the instance, the ends, the state, the times and the cached verdicts.
#[test]
fn connections_count_each_way_on_the_full_path_and_the_fast_lane() {
    let mut l = Lab::new();
    let (syn, ack) = (TcpFlags::SYN, TcpFlags::ACK);
    assert_eq!(
        l.send("client", &tcp(C, 40000, S, 80, syn), 0),
        l.deliver("server")
    );
    let synack = tcp(S, 80, C, 40000, syn | ack);
    assert_eq!(l.send("server", &synack, 0), l.deliver("client"));
    for _ in 0..4 {
        assert_eq!(
            l.send("client", &tcp(C, 40000, S, 80, ack), 1),
            l.deliver("server")
        );
    }
    assert!(l.p.counters().cache_hits >= 4, "{:?}", l.p.counters());
    let now = Timestamp::from_secs(3);
    assert_eq!(l.p.flows(now, None).len(), 2, "one entry per local side");
    for side in ["client", "server"] {
        let f = l.p.flows(now, Some(l.id(side)));
        assert_eq!(f.len(), 1, "{side}: {f:?}");
        let f = f[0];
        assert_eq!(f.instance, Some(l.id(side)));
        assert_eq!((f.conn.opener.addr, f.conn.opener.port), (C.into(), 40000));
        assert_eq!((f.conn.peer().addr, f.conn.peer().port), (S.into(), 80));
        assert_eq!(f.conn.key.protocol, proto::TCP);
        assert!(matches!(f.conn.state, State::Tcp(t) if t.state == TcpState::Established));
        assert_eq!(
            (f.conn.packets, f.conn.bytes),
            ([5, 1], [200, 40]),
            "{side}"
        );
        assert_eq!(f.age_ms, 3000);
        assert!(f.left_ms > 0 && f.left_ms <= f.conn.timeout_ms);
        let v = f.verdicts;
        assert_eq!(v[Direction::Original as usize], Some(l.deliver("server")));
        assert_eq!(v[Direction::Reply as usize], Some(l.deliver("client")));
    }
}

/// Per-instance bytes: what an instance sent and what was delivered to it, at the IP level;
/// a datagram its groups refuse is counted as the receiver's `received_dropped` (and the
/// sender's `sent_dropped`).
#[test]
fn instances_count_bytes_and_received_drops() {
    let mut l = Lab::new();
    for _ in 0..3 {
        assert_eq!(
            l.send("client", &udp(C, 5000, S, 53, 100), 0),
            l.deliver("server")
        );
    }
    assert_eq!(
        l.send("server", &udp(S, 53, C, 5000, 300), 0),
        l.deliver("client")
    );
    let refused = l.send("client", &udp(C, 5000, S, 54, 10), 0);
    assert!(matches!(refused, Decision::Drop(x) if x.reason == DropReason::SgIngress));
    let c = l.p.counters();
    let (client, server) = (
        c.port(l.id("client").index()),
        c.port(l.id("server").index()),
    );
    assert_eq!((client.sent, client.sent_bytes), (3, 3 * 128));
    assert_eq!((client.received, client.received_bytes), (1, 328));
    assert_eq!((server.sent, server.sent_bytes), (1, 328));
    assert_eq!((server.received, server.received_bytes), (3, 3 * 128));
    assert_eq!((client.sent_dropped, client.received_dropped), (1, 0));
    assert_eq!((server.sent_dropped, server.received_dropped), (0, 1));
    let by_reason = |name| c.port_drops(l.id(name).index());
    assert_eq!(by_reason("client"), [(Way::Sent, DropReason::SgIngress, 1)]);
    assert_eq!(
        by_reason("server"),
        [(Way::Received, DropReason::SgIngress, 1)]
    );
    let mut sum = Counters::new(2);
    sum.merge(c);
    sum.merge(c);
    assert_eq!(
        sum.port_drops(l.id("server").index()),
        [(Way::Received, DropReason::SgIngress, 2)]
    );
}

/// A flush removes the connections of one instance, or all, and the cached decisions that
/// relied on them: the next reply is judged again by the rules, which refuse it.
#[test]
fn a_flush_removes_connections_and_their_cached_decisions() {
    let mut l = Lab::new();
    let (query, answer) = (udp(C, 5000, S, 53, 20), udp(S, 53, C, 5000, 20));
    assert_eq!(l.send("client", &query, 0), l.deliver("server"));
    assert_eq!(l.send("server", &answer, 0), l.deliver("client"));
    assert_eq!(l.send("server", &answer, 0), l.deliver("client"), "cached");
    let generation = l.p.generation();
    let relying = |p: &Pipeline| {
        p.state
            .flows
            .hits(generation)
            .filter(|h| h.conns[0].is_some())
            .count()
    };
    assert_eq!(relying(&l.p), 2);
    assert_eq!(l.p.flush_flows(Some(l.id("client"))), 1);
    let now = Timestamp::from_secs(1);
    assert!(l.p.flows(now, Some(l.id("client"))).is_empty());
    assert_eq!(l.p.flows(now, None).len(), 1, "the server's side stays");
    assert_eq!(
        relying(&l.p),
        0,
        "both cached decisions relied on the client's entry"
    );
    assert_eq!(l.p.flush_flows(None), 1);
    assert!(l.p.flows(now, None).is_empty());
    assert_eq!(l.p.flush_flows(None), 0);
    let d = l.send("server", &answer, 1);
    assert!(
        matches!(d, Decision::Drop(x) if x.reason == DropReason::SgIngress),
        "{d:?}"
    );
}

/// An instance's drops by reason follow it by name when a reload moves its id.
#[test]
fn instance_drops_by_reason_follow_their_instance() {
    let mut l = Lab::new();
    let refused = l.send("client", &udp(C, 5000, S, 54, 10), 0);
    assert!(matches!(refused, Decision::Drop(_)));
    // The same topology with the two instances the other way round.
    let at = TOPOLOGY.find("[[instance]]").unwrap();
    let (head, instances) = TOPOLOGY.split_at(at);
    let second = instances.rfind("[[instance]]").unwrap();
    let swapped = format!("{head}{}\n{}", &instances[second..], &instances[..second]);
    let t = Arc::new(Topology::parse(&swapped, "t.toml").unwrap());
    l.p.set_topology(t.clone());
    let (client, server) = (
        t.instance_named("client").unwrap(),
        t.instance_named("server").unwrap(),
    );
    assert_eq!(server.index(), 0);
    let c = l.p.counters();
    assert_eq!(
        c.port_drops(server.index()),
        [(Way::Received, DropReason::SgIngress, 1)]
    );
    assert_eq!(
        c.port_drops(client.index()),
        [(Way::Sent, DropReason::SgIngress, 1)]
    );
}
