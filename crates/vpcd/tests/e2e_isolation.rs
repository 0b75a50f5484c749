//! End-to-end tests of isolation (docs/semantics.md), with real traffic in labs of network
//! namespaces (`vpcd lab up` with the real `vpcd` binary):
//!
//! 1. who sent a peered packet: the GRE key names the channel, so two overlapping VPCs
//!    peered with the same VPC are never taken for one another;
//! 2. identities that never renumber: basic-network addresses recorded in the lock file
//!    (migration is one-way), a running VPC's key, every host's address;
//! 3. ICMP tracked as nf_conntrack does: by query kind and requester;
//! 4. TCP states and fair shares of the connection table: closed connections, restarts
//!    (loose pickup), SYN floods answered by resets, many flows towards one instance, a full
//!    host table;
//! 5. replies to an Elastic IP leave through it, whatever the custom routes say;
//! 6. appliances that forward (`source_check = false`): a NAT instance, a firewall between
//!    two subnets (subnet routes), and the same firewall without the switch.
//!
//! Every test builds its own small lab under a name of its own (`iso_*`); every namespace is
//! `vpcd-LAB-...`, so `vpcd lab down` (run by a guard, also when the test fails) sweeps them.
//! They need root, iproute2, ping, tshark, scapy and nft; when something is missing they skip,
//! recorded in target/tmp/vpcd-skips.txt (under `VPCD_REQUIRE_E2E=1` they fail instead).
//! Underlay addresses are in 192.0.2.0/24, the internet is 203.0.113.0/24.

#[path = "e2e/common.rs"]
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use vpcd::io::netns::NetnsGuard;

// ----------------------------------------------------------------------------------------------
// Helpers of this file

/// What [`gre_on_wire`] reads of each GRE packet: (outer+inner ip.src, outer+inner ip.dst,
/// gre.key, icmp.type, udp.dstport, tcp.dstport, tcp.srcport).
const WIRE: &[&str] = &[
    "ip.src",
    "ip.dst",
    "gre.key",
    "icmp.type",
    "udp.dstport",
    "tcp.dstport",
    "tcp.srcport",
];

/// `[underlay]` (plain GRE) and `n` hosts `host-a` (192.0.2.1), `host-b` (192.0.2.2), ...
fn underlay(n: usize) -> String {
    let mut s = "[underlay]\ntransport = \"gre\"\nmtu = 1500\n".to_string();
    for i in 0..n {
        s.push_str(&format!(
            "\n[[host]]\nname = \"host-{}\"\naddress = \"192.0.2.{}\"\n",
            (b'a' + i as u8) as char,
            i + 1
        ));
    }
    s
}

/// The topology text of lab `name`: `@NS` stands for `vpcd-NAME` (the prefix `lab down`
/// sweeps).
fn text_of(name: &str, toml: &str) -> String {
    toml.replace("@NS", &format!("vpcd-{name}"))
}

/// Builds lab `name` from `toml` (see [`text_of`]) with `workers` workers per daemon.
fn lab_up(name: &str, toml: &str, workers: usize) -> LabUp {
    LabUp::start_with(name, &text_of(name, toml), workers)
}

/// An `[[instance]]` table of a VPC instance; `extra` is appended as is (`eip = ...`,
/// `source_check = false`).
fn vpc_instance(name: &str, host: &str, subnet: &str, ip: &str, sg: &str, extra: &str) -> String {
    format!(
        "\n[[instance]]\nname = \"{name}\"\nhost = \"{host}\"\nsubnet = \"{subnet}\"\nip = \"{ip}\"\nsecurity_groups = [\"{sg}\"]\nnetns = \"@NS-{name}\"\n{extra}"
    )
}

/// An `[[instance]]` table of a basic-network instance of tenant acme.
fn basic_instance(name: &str, host: &str, sg: &str) -> String {
    format!(
        "\n[[instance]]\nname = \"{name}\"\nhost = \"{host}\"\nnetwork = \"basic\"\ntenant = \"acme\"\nsecurity_groups = [\"{sg}\"]\nnetns = \"@NS-{name}\"\n"
    )
}

/// 32-bit FNV-1a (docs/semantics.md 2.1).
fn fnv1a32(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The GRE key of a derived channel, as docs/semantics.md 2.1 defines it: `class` in the top
/// byte (2 peering, 5 appliance...), 24 bits of FNV-1a of the channel's name below. Computed
/// from the specification, not from the code under test.
fn derived_key(class: u32, name: &str) -> u32 {
    class << 24 | (fnv1a32(name) & 0x00ff_ffff)
}

/// Connection-table counters of every host, for the report.
fn conntrack_report(s: &Stats, before: &Stats) -> String {
    let mut out = Vec::new();
    for h in s.0.keys() {
        let mut parts = Vec::new();
        for k in [
            "drop.ConntrackFull",
            "drop.ConntrackInstanceLimit",
            "conntrack_evicted",
            "conntrack_refused_full",
            "conntrack_refused_instance",
        ] {
            parts.push(format!("{k} +{}", s.grew(before, h, k)));
        }
        parts.push(format!("connections {}", s.get(h, "connections")));
        out.push(format!("{h}: {}", parts.join(", ")));
    }
    out.join("; ")
}

/// One datagram from `ns` to `dst:port`; the answer and the address it came from.
fn udp_ask_from(ns: &str, dst: Ipv4Addr, port: u16, msg: &str) -> Option<(String, SocketAddr)> {
    let msg = msg.to_string();
    in_ns(ns, move || {
        let u = UdpSocket::bind(("0.0.0.0", 0)).expect("udp bind");
        u.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        u.send_to(msg.as_bytes(), (dst, port)).ok()?;
        let mut buf = [0u8; 2048];
        let (n, from) = u.recv_from(&mut buf).ok()?;
        Some((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from))
    })
}

/// Connects from `ns` to `dst:port` within `timeout` (shorter than TCP's first
/// retransmission, 1 s, when the point is that the first SYN gets through), sends a line and
/// returns the answer of the [`Listener`] there.
fn tcp_quick(ns: &str, dst: Ipv4Addr, port: u16, timeout: Duration) -> Result<String, String> {
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((dst, port)), timeout)
            .map_err(|e| format!("connect to {dst}:{port}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        writeln!(s, "quick").map_err(|e| format!("write: {e}"))?;
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        let reply = reply.trim().to_string();
        if reply.is_empty() {
            Err(format!("no answer from {dst}:{port}"))
        } else {
            Ok(reply)
        }
    })
}

/// `flows` UDP flows from `ns` (each socket its own source port) to `dst:port`, where a
/// [`Listener`] answers; returns how many got their answer within `wait`.
fn udp_flows(ns: &str, dst: Ipv4Addr, port: u16, flows: usize, wait: Duration) -> usize {
    in_ns(ns, move || {
        let socks: Vec<UdpSocket> = (0..flows)
            .map(|_| {
                let u = UdpSocket::bind(("0.0.0.0", 0)).expect("udp bind");
                u.connect((dst, port)).expect("udp connect");
                u.set_nonblocking(true).unwrap();
                u
            })
            .collect();
        for (i, u) in socks.iter().enumerate() {
            let _ = u.send(format!("flow {i}").as_bytes());
            // One at a time, as applications open them: the table sees them in order.
            thread::sleep(Duration::from_millis(2));
        }
        let deadline = Instant::now() + wait;
        let mut answered = vec![false; flows];
        while Instant::now() < deadline && answered.iter().any(|a| !a) {
            for (i, u) in socks.iter().enumerate() {
                let mut buf = [0u8; 256];
                if !answered[i] && u.recv(&mut buf).is_ok() {
                    answered[i] = true;
                }
            }
            thread::sleep(Duration::from_millis(10));
        }
        answered.iter().filter(|a| **a).count()
    })
}

/// Rows carrying inner `src -> dst` whatever the hosts.
fn inner_rows(rows: &[Vec<String>], (src, dst): (Ipv4Addr, Ipv4Addr)) -> Vec<&Vec<String>> {
    rows.iter()
        .filter(|r| r[0].ends_with(&format!(",{src}")) && r[1].ends_with(&format!(",{dst}")))
        .collect()
}

fn hex(key: u32) -> String {
    format!("0x{key:08x}")
}

/// Runs `sh -c SCRIPT` inside `ns`, asserting success.
fn sh_in(ns: &str, script: &str) -> String {
    let o = exec_in(ns, &["sh", "-c", script]);
    assert!(
        o.status.success(),
        "in {ns}: {script}\n--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Turns the instance of namespace `ns` into a router: forwarding on, no ICMP redirects
/// (the packets enter and leave through the same device).
fn make_router(ns: &str) {
    sh_in(
        ns,
        "sysctl -qw net.ipv4.ip_forward=1 && \
         for c in all default; do sysctl -qw net.ipv4.conf.$c.send_redirects=0; done && \
         for f in /proc/sys/net/ipv4/conf/*/send_redirects; do echo 0 > $f; done",
    );
}

/// A tshark capture on an instance's own device, inside its namespace.
fn capture_instance(lab: &LabUp, inst: &str, filter: &str, tag: &str) -> Capture {
    Capture::start(&lab.ns(inst), inst, filter, tag, 60)
}

// ----------------------------------------------------------------------------------------------
// 1. Who sent a peered packet: the key names the channel

/// vpc-b and vpc-d overlap (10.41.0.0/16), both peered with vpc-a; b1 and d1 have the same
/// address on the same host. vpc-a routes 10.41.0.0/16 to pcx-ab only.
const WHO: &str = r#"
[[vpc]]
name = "vpc-a"
tenant = "ta"
cidr = "10.40.0.0/16"
key = 4140

[[vpc]]
name = "vpc-b"
tenant = "tb"
cidr = "10.41.0.0/16"
key = 4141

[[vpc]]
name = "vpc-d"
tenant = "td"
cidr = "10.41.0.0/16"
key = 4142

[[peering]]
name = "pcx-ab"
vpcs = ["vpc-a", "vpc-b"]

[[peering]]
name = "pcx-ad"
vpcs = ["vpc-a", "vpc-d"]

[[route_table]]
name = "rt-a"
vpc = "vpc-a"
routes = [ { destination = "10.41.0.0/16", next_hop = "peering:pcx-ab" } ]

[[route_table]]
name = "rt-b"
vpc = "vpc-b"
routes = [ { destination = "10.40.0.0/16", next_hop = "peering:pcx-ab" } ]

[[route_table]]
name = "rt-d"
vpc = "vpc-d"
routes = [ { destination = "10.40.0.0/16", next_hop = "peering:pcx-ad" } ]

[[subnet]]
name = "net-a"
vpc = "vpc-a"
cidr = "10.40.1.0/24"
route_table = "rt-a"

[[subnet]]
name = "net-b"
vpc = "vpc-b"
cidr = "10.41.1.0/24"
route_table = "rt-b"

[[subnet]]
name = "net-d"
vpc = "vpc-d"
cidr = "10.41.1.0/24"
route_table = "rt-d"

[[security_group]]
name = "sg-peer"
ingress = [ { action = "accept", protocol = "all", source = "10.0.0.0/8" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "a1"
host = "host-a"
subnet = "net-a"
ip = "10.40.1.10"
security_groups = ["sg-peer"]
netns = "@NS-a1"

[[instance]]
name = "b1"
host = "host-b"
subnet = "net-b"
ip = "10.41.1.10"
security_groups = ["sg-peer"]
netns = "@NS-b1"

[[instance]]
name = "d1"
host = "host-b"
subnet = "net-d"
ip = "10.41.1.10"
security_groups = ["sg-peer"]
netns = "@NS-d1"
"#;

#[test]
fn a_peered_packet_is_known_by_its_channel_not_by_its_overlapping_source_address() {
    let test = "a_peered_packet_is_known_by_its_channel_not_by_its_overlapping_source_address";
    if !can_run(test, &[Tool::Ip, Tool::Ping, Tool::Tshark]) {
        return;
    }
    let lab = lab_up("iso_who", &(underlay(2) + WHO), 2);
    let [a1, b1, d1] = ["a1", "b1", "d1"].map(|i| lab.ns(i));
    let [a1_ip, b1_ip, d1_ip] = ["a1", "b1", "d1"].map(|i| lab.ip(i));
    assert_eq!(
        b1_ip, d1_ip,
        "the lab's point: the same address, the same host"
    );
    let key_ab = derived_key(2, "peering:pcx-ab>vpc-a");
    let key_ad = derived_key(2, "peering:pcx-ad>vpc-a");
    assert_ne!(key_ab, key_ad);

    // b1 <-> a1 over pcx-ab: ping and TCP, both ways.
    assert_eq!(ping(&b1, a1_ip, 3), 3, "b1 -> a1: ping");
    assert_eq!(ping(&a1, b1_ip, 3), 3, "a1 -> b1: ping");
    let seen = tcp_seen(&b1, &a1, a1_ip, 9401).expect("b1 -> a1: TCP");
    assert_eq!(seen.from.ip(), std::net::IpAddr::V4(b1_ip), "{seen:?}");
    tcp_seen(&a1, &b1, b1_ip, 9402).expect("a1 -> b1: TCP");

    // On the wire, b1's and d1's packets to a1 differ only by their key; a1's listener never
    // sees d1's, and host-a counts them: vpc-a routes 10.41.0.0/16 to pcx-ab, not pcx-ad.
    let la = Listener::udp(&a1, "a1", 9410);
    let before = lab.stats();
    let rows = gre_on_wire(&lab, "iso_who", WIRE, || {
        assert_eq!(ping(&b1, a1_ip, 3), 3, "b1 -> a1: ping, in the capture");
        udp_fire(&d1, a1_ip, 9410, "from-d1", 3);
    });
    assert_eq!(tcp_ask(&d1, a1_ip, 9411, "d1-tcp"), None, "d1 -> a1: TCP");
    assert_eq!(ping(&d1, a1_ip, 2), 0, "d1 -> a1: ping");
    thread::sleep(Duration::from_millis(200));
    let after = lab.stats();
    let seen = la.finish();
    assert!(
        seen.is_empty(),
        "a1 received d1's datagrams (taken for b1's?): {seen:?}; {}",
        after.diff(&before)
    );
    assert!(
        after.dropped(&before, "host-a", "PeeringNoReturnRoute") >= 3 + 1 + 2,
        "d1 -> a1 (UDP, TCP, ping): PeeringNoReturnRoute on host-a; {}",
        after.diff(&before)
    );
    let from_b = gre_rows(&rows, ("192.0.2.2", "192.0.2.1"), (b1_ip, a1_ip));
    let icmp: Vec<_> = from_b.iter().filter(|r| r[3] == "8").collect();
    let udp: Vec<_> = from_b.iter().filter(|r| r[4] == "9410").collect();
    assert!(icmp.len() >= 3, "b1's echo requests on the wire: {rows:?}");
    assert!(udp.len() >= 3, "d1's datagrams on the wire: {rows:?}");
    for r in icmp {
        assert_eq!(
            r[2],
            hex(key_ab),
            "b1 -> a1 must carry the key of peering:pcx-ab>vpc-a: {r:?}"
        );
    }
    for r in udp {
        assert_eq!(
            r[2],
            hex(key_ad),
            "d1 -> a1 must carry the key of peering:pcx-ad>vpc-a: {r:?}"
        );
    }

    // a1's packets to 10.41.1.10 go to b1 (vpc-a's route), never to d1.
    let lb = Listener::udp(&b1, "b1", 9420);
    let ld = Listener::udp(&d1, "d1", 9420);
    udp_fire(&a1, b1_ip, 9420, "from-a1", 3);
    thread::sleep(Duration::from_millis(200));
    let (sb, sd) = (lb.finish(), ld.finish());
    assert!(sd.is_empty(), "d1 received a1's datagrams: {sd:?}");
    assert_eq!(sb.len(), 3, "b1 receives a1's datagrams: {sb:?}");
    // And d1 gets no answer from a1 (its requests never arrive, no reply comes back).
    let la = Listener::udp(&a1, "a1", 9421);
    assert_eq!(
        udp_ask_from(&d1, a1_ip, 9421, "d1-asks"),
        None,
        "d1 -> a1: an answer came back"
    );
    assert!(la.finish().is_empty());
}

// ----------------------------------------------------------------------------------------------
// 2. Identities that never renumber

/// Two names that FNV-1a hashes into the same slot of a 13-address pool (a /28), and a third
/// whose slot is neither theirs nor the next two.
fn slot_names() -> (String, String, String) {
    let slot = |s: &str| fnv1a32(s) % 13;
    let mut seen = std::collections::HashMap::new();
    let (a, b) = (0..)
        .find_map(|i| {
            let n = format!("c{i}");
            seen.insert(slot(&n), n.clone()).map(|o| (o, n))
        })
        .unwrap();
    let s = slot(&a);
    let p = (0..)
        .map(|i| format!("p{i}"))
        .find(|p| ![s, (s + 1) % 13, (s + 2) % 13].contains(&slot(p)))
        .unwrap();
    (a, b, p)
}

const SLOT_NET: &str = r#"
[basic]
cidr = "10.128.0.0/28"

[[vpc]]
name = "vpc-m"
tenant = "acme"
cidr = "10.50.0.0/16"
key = 4150

[[subnet]]
name = "net-m"
vpc = "vpc-m"
cidr = "10.50.1.0/24"

[[security_group]]
name = "sg-all"
ingress = [ { action = "accept", protocol = "all", source = "0.0.0.0/0" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]
"#;

#[test]
fn basic_network_addresses_never_move_and_migration_is_one_way_on_every_host() {
    let test = "basic_network_addresses_never_move_and_migration_is_one_way_on_every_host";
    if !can_run(test, &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let name = "iso_slot";
    let (first, second, peer) = slot_names();
    eprintln!("{test}: {first} and {second} share a slot; the peer is {peer}");
    let moved_ip = "10.50.1.40";
    let text = |first_moved: bool| {
        let first_inst = if first_moved {
            vpc_instance(&first, "host-a", "net-m", moved_ip, "sg-all", "")
        } else {
            basic_instance(&first, "host-a", "sg-all")
        };
        text_of(
            name,
            &(underlay(2)
                + SLOT_NET
                + &first_inst
                + &basic_instance(&second, "host-b", "sg-all")
                + &basic_instance(&peer, "host-a", "sg-all")
                + &vpc_instance("v1", "host-b", "net-m", "10.50.1.11", "sg-all", "")),
        )
    };
    let lab = LabUp::start_with(name, &text(false), 2);
    let [first_ns, second_ns, peer_ns] = [&first, &second, &peer].map(|i| lab.ns(i));
    let [first_ip, second_ip] = [&first, &second].map(|i| lab.ip(i));
    let (v1_ns, v1_ip) = (lab.ns("v1"), lab.ip("v1"));
    eprintln!(
        "{first} {first_ip}, {second} {second_ip}, {peer} {}",
        lab.ip(&peer)
    );
    assert_eq!(
        u32::from(second_ip),
        u32::from(first_ip) + 1,
        "{second} probed past {first}'s slot"
    );
    assert_eq!(ping(&peer_ns, second_ip, 2), 2, "{peer} -> {second}: ping");
    assert_eq!(ping(&peer_ns, first_ip, 2), 2, "{peer} -> {first}: ping");

    // A stream to the second instance runs through both reloads.
    let stream = Stream::start(
        &peer_ns,
        &second_ns,
        second_ip,
        9500,
        false,
        Duration::from_millis(10),
    );
    thread::sleep(Duration::from_millis(300));

    // The first instance moves into vpc-m: the second keeps its address.
    reload(&lab, &text(true), "topology reloaded");
    let now = vpcd::files::load_topology(&lab.lab.topology_path()).expect("the lab's topology");
    let id = now.instance_named(&second).unwrap();
    assert_eq!(
        now.instance(id).ip,
        second_ip,
        "{second}'s address moved when {first} left the basic network"
    );
    assert_eq!(
        addrs_of(&second_ns, &second),
        vec![format!("{second_ip}/28")],
        "{second}'s device"
    );
    assert_eq!(
        addrs_of(&first_ns, &first),
        vec![format!("{moved_ip}/24")],
        "{first}'s device, moved"
    );
    assert_eq!(ping(&first_ns, v1_ip, 2), 2, "{first} -> v1 in vpc-m: ping");
    let lock =
        std::fs::read_to_string(lab.lab.topology_path().with_extension("lock")).unwrap_or_default();
    eprintln!("the lab's lock file after the move:\n{lock}");

    // Back into the basic network: refused on every host, the running topology stays.
    let one_way: Vec<usize> = ["host-a", "host-b"]
        .iter()
        .map(|h| log_count(&lab, h, "migration is one-way"))
        .collect();
    reload(&lab, &text(false), "reload refused");
    for (h, was) in ["host-a", "host-b"].iter().zip(one_way) {
        assert!(
            log_count(&lab, h, "migration is one-way") > was,
            "{h}'s log should say why: migration is one-way:\n{}",
            std::fs::read_to_string(lab.lab.log_path(h)).unwrap_or_default()
        );
    }
    assert_eq!(
        ping(&first_ns, v1_ip, 2),
        2,
        "{first} -> v1, still in vpc-m"
    );
    assert_eq!(
        ping(&v1_ns, Ipv4Addr::new(10, 50, 1, 40), 2),
        2,
        "v1 -> {first}"
    );
    assert_eq!(ping(&peer_ns, second_ip, 2), 2, "{peer} -> {second}: ping");
    thread::sleep(Duration::from_millis(300));
    assert_no_loss(
        &format!("UDP {peer} -> {second}"),
        stream,
        Duration::from_millis(500),
    );
}

const KEYS: &str = r#"
[[vpc]]
name = "vpc-k"
tenant = "acme"
cidr = "10.60.0.0/16"
key = 4160

[[subnet]]
name = "net-k"
vpc = "vpc-k"
cidr = "10.60.1.0/24"

[[security_group]]
name = "sg-k"
ingress = [ { action = "accept", protocol = "all", source = "10.60.0.0/16" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "k1"
host = "host-a"
subnet = "net-k"
ip = "10.60.1.10"
security_groups = ["sg-k"]
netns = "@NS-k1"

[[instance]]
name = "k2"
host = "host-b"
subnet = "net-k"
ip = "10.60.1.20"
security_groups = ["sg-k"]
netns = "@NS-k2"
"#;

#[test]
fn a_running_vpcs_key_and_any_hosts_address_are_refused_by_every_host() {
    let test = "a_running_vpcs_key_and_any_hosts_address_are_refused_by_every_host";
    if !can_run(test, &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let name = "iso_keys";
    let text = text_of(name, &(underlay(2) + KEYS));
    let lab = LabUp::start_with(name, &text, 2);
    let (k1, k2_ip) = (lab.ns("k1"), lab.ip("k2"));
    assert_eq!(ping(&k1, k2_ip, 2), 2, "k1 -> k2: ping");

    let why = |needle: &str| -> Vec<usize> {
        ["host-a", "host-b"]
            .iter()
            .map(|h| log_count(&lab, h, needle))
            .collect()
    };
    let assert_every_host_says = |needle: &str, was: Vec<usize>| {
        for (h, was) in ["host-a", "host-b"].iter().zip(was) {
            assert!(
                log_count(&lab, h, needle) > was,
                "{h}'s log should say \"{needle}\":\n{}",
                std::fs::read_to_string(lab.lab.log_path(h)).unwrap_or_default()
            );
        }
    };

    // Another explicit key for the running vpc-k.
    let rekeyed = text.replace("key = 4160", "key = 4161");
    assert_ne!(rekeyed, text);
    let was = why("cannot change its key");
    reload(&lab, &rekeyed, "reload refused");
    assert_every_host_says("cannot change its key", was);
    assert_eq!(ping(&k1, k2_ip, 2), 2, "k1 -> k2 after the refused new key");

    // host-b's address changes: host-a must refuse it as well as host-b.
    let moved = text.replace("192.0.2.2\"", "192.0.2.9\"");
    assert_ne!(moved, text);
    let was = why("cannot change its address");
    reload(&lab, &moved, "reload refused");
    assert_every_host_says("cannot change its address", was);
    assert_eq!(
        ping(&k1, k2_ip, 3),
        3,
        "k1 -> k2 after the refused host address"
    );
    let k2 = lab.ns("k2");
    assert_eq!(
        ping(&k2, lab.ip("k1"), 3),
        3,
        "k2 -> k1 after the refused host address"
    );
}

// ----------------------------------------------------------------------------------------------
// 3. ICMP tracked as nf_conntrack does

const ICMP: &str = r#"
[[vpc]]
name = "vpc-i"
tenant = "acme"
cidr = "10.70.0.0/16"
key = 4170

[[subnet]]
name = "net-i"
vpc = "vpc-i"
cidr = "10.70.1.0/24"

[[security_group]]   # no ICMP in
name = "sg-x"
ingress = [ { action = "accept", protocol = "tcp", source = "10.70.0.0/16" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[security_group]]
name = "sg-y"
ingress = [ { action = "accept", protocol = "all", source = "10.70.0.0/16" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "x"
host = "host-a"
subnet = "net-i"
ip = "10.70.1.10"
security_groups = ["sg-x"]
netns = "@NS-x"

[[instance]]
name = "y"
host = "host-b"
subnet = "net-i"
ip = "10.70.1.20"
security_groups = ["sg-y"]
netns = "@NS-y"
"#;

#[test]
fn an_icmp_query_admits_only_its_reply_not_the_peers_queries() {
    let test = "an_icmp_query_admits_only_its_reply_not_the_peers_queries";
    if !can_run(test, &[Tool::Ip, Tool::Ping, Tool::Tshark, Tool::Scapy]) {
        return;
    }
    let lab = lab_up("iso_icmp", &(underlay(2) + ICMP), 2);
    let (x, y) = (lab.ns("x"), lab.ns("y"));
    let (x_ip, y_ip) = (lab.ip("x"), lab.ip("y"));
    // The groups: x pings y; y cannot ping x.
    assert_eq!(ping(&x, y_ip, 2), 2, "x -> y: ping");
    assert_eq!(ping(&y, x_ip, 1), 0, "y -> x: ping (x admits no ICMP)");

    const N: u16 = 0x4e4e;
    let cap = capture_instance(&lab, "x", "icmp", "iso_icmp_x");
    let before = lab.stats();
    // x's queries: echo requests with identifier N and with identifier 0.
    python_in(
        &x,
        &[
            "-c",
            &format!(
                "from scapy.all import IP, ICMP, send\n\
                 for ident in ({N}, 0):\n\
                 \x20   for seq in (1, 2, 3):\n\
                 \x20       send(IP(dst='{y_ip}')/ICMP(type=8, id=ident, seq=seq)/b'x-asks', verbose=False)\n"
            ),
        ],
    );
    thread::sleep(Duration::from_millis(300));
    // y's queries to x, right after: an echo request with x's identifier, and timestamp,
    // information and address-mask requests with either identifier.
    python_in(
        &y,
        &[
            "-c",
            &format!(
                "from scapy.all import IP, ICMP, send\n\
                 for seq in (101, 102, 103):\n\
                 \x20   send(IP(dst='{x_ip}')/ICMP(type=8, id={N}, seq=seq)/b'y-asks', verbose=False)\n\
                 for ident in ({N}, 0):\n\
                 \x20   send(IP(dst='{x_ip}')/ICMP(type=13, id=ident, seq=7, ts_ori=1, ts_rx=0, ts_tx=0), verbose=False)\n\
                 \x20   send(IP(dst='{x_ip}')/ICMP(type=15, id=ident, seq=7), verbose=False)\n\
                 \x20   send(IP(dst='{x_ip}')/ICMP(type=17, id=ident, seq=7, addr_mask='0.0.0.0'), verbose=False)\n"
            ),
        ],
    );
    thread::sleep(Duration::from_millis(300));
    let after = lab.stats();
    let file = cap.stop();
    let rows = tshark_fields(
        &file,
        &[],
        &["ip.src", "ip.dst", "icmp.type", "icmp.ident", "icmp.seq"],
    );
    let _ = std::fs::remove_file(&file);
    eprintln!("on x's device:");
    for r in &rows {
        eprintln!("  {}", r.join(" | "));
    }
    let from_y: Vec<&Vec<String>> = rows.iter().filter(|r| r[0] == y_ip.to_string()).collect();
    // The control: y's replies to x's queries arrived, for both identifiers.
    for ident in [N, 0] {
        assert!(
            from_y
                .iter()
                .filter(|r| r[2] == "0"
                    && (r[3] == ident.to_string() || r[3] == format!("0x{ident:04x}")))
                .count()
                >= 3,
            "y's echo replies to x's requests with identifier {ident}: {rows:?}"
        );
    }
    let queries: Vec<&&Vec<String>> = from_y
        .iter()
        .filter(|r| ["8", "13", "15", "17"].contains(&r[2].as_str()))
        .collect();
    assert!(
        queries.is_empty(),
        "y's queries reached x, which admits no ICMP (an entry of x's echo let them in): {queries:?}; {}",
        after.diff(&before)
    );
    assert!(
        after.dropped(&before, "host-a", "SgIngress") >= 3 + 6,
        "y's queries: SgIngress on host-a; {}",
        after.diff(&before)
    );
}

// ----------------------------------------------------------------------------------------------
// 4. TCP states and fair shares of the connection table

/// A VPC 10.80.0.0/16 with `[conntrack]` limits and the instances given (name, host, ip).
fn ct_topology(max_entries: u32, per_instance: u32, instances: &[(&str, &str, &str)]) -> String {
    let mut s = underlay(2);
    s.push_str(&format!(
        "\n[conntrack]\nmax_entries = {max_entries}\nmax_per_instance = {per_instance}\n"
    ));
    s.push_str(
        r#"
[[vpc]]
name = "vpc-c"
tenant = "acme"
cidr = "10.80.0.0/16"
key = 4180

[[subnet]]
name = "net-c"
vpc = "vpc-c"
cidr = "10.80.1.0/24"

[[security_group]]
name = "sg-c"
ingress = [ { action = "accept", protocol = "all", source = "10.80.0.0/16" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]
"#,
    );
    for (name, host, ip) in instances {
        s.push_str(&vpc_instance(name, host, "net-c", ip, "sg-c", ""));
    }
    s
}

/// A TCP server in `ns` on `port` that accepts and closes at once; returns how many it
/// accepted when stopped.
struct Closer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<usize>>,
}

impl Closer {
    fn start(ns: &str, port: u16) -> Closer {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<()>();
        let (ns, st) = (ns.to_string(), stop.clone());
        let handle = thread::spawn(move || {
            let _g = NetnsGuard::enter(&ns).expect("closer's namespace");
            let l = TcpListener::bind(("0.0.0.0", port)).expect("tcp bind");
            l.set_nonblocking(true).unwrap();
            let _ = tx.send(());
            let mut n = 0;
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        drop(s);
                        n += 1;
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
            n
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("closer did not start");
        Closer {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().map(|h| h.join().unwrap()).unwrap_or(0)
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_thousand_closed_connections_leave_room_for_new_ones() {
    let test = "a_thousand_closed_connections_leave_room_for_new_ones";
    if !can_run(test, &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let toml = ct_topology(
        200,
        60,
        &[
            ("cl", "host-a", "10.80.1.10"),
            ("sv", "host-b", "10.80.1.20"),
        ],
    );
    let lab = lab_up("iso_ct_close", &toml, 1);
    let (cl, sv) = (lab.ns("cl"), lab.ns("sv"));
    let (cl_ip, sv_ip) = (lab.ip("cl"), lab.ip("sv"));
    let before = lab.stats();

    // 1,000 connections, each accepted and closed by the server, the client reading its FIN
    // and closing too: every one ends normally (TIME_WAIT in the table).
    let closer = Closer::start(&sv, 9600);
    let started = Instant::now();
    let (ok, failures) = in_ns(&cl, move || {
        let (mut ok, mut failures, mut in_a_row) = (0usize, Vec::new(), 0);
        for i in 0..1000 {
            let r = TcpStream::connect_timeout(
                &SocketAddr::from((sv_ip, 9600)),
                Duration::from_millis(700),
            )
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                let mut b = [0u8; 16];
                match s.read(&mut b)? {
                    0 => Ok(()),
                    _ => Err(std::io::Error::other("data instead of a FIN")),
                }
            });
            match r {
                Ok(()) => {
                    ok += 1;
                    in_a_row = 0;
                }
                Err(e) => {
                    failures.push(format!("#{i}: {e}"));
                    in_a_row += 1;
                    if in_a_row >= 10 {
                        break;
                    }
                }
            }
        }
        (ok, failures)
    });
    let accepted = closer.finish();
    let mid = lab.stats();
    eprintln!(
        "{test}: {ok} of 1000 connections in {:?} ({accepted} accepted); {}",
        started.elapsed(),
        conntrack_report(&mid, &before)
    );

    // Afterwards: new TCP and UDP from the client, and the server connects out.
    let l = Listener::tcp(&sv, "sv", 9601);
    let tcp = tcp_quick(&cl, sv_ip, 9601, Duration::from_millis(900));
    drop(l);
    let lu = Listener::udp(&sv, "sv", 9602);
    let udp = udp_ask(&cl, None, sv_ip, 9602, "after");
    drop(lu);
    let lc = Listener::tcp(&cl, "cl", 9603);
    let out = tcp_quick(&sv, cl_ip, 9603, Duration::from_millis(900));
    drop(lc);
    let after = lab.stats();
    let report = format!(
        "{}; {}",
        conntrack_report(&after, &before),
        after.diff(&before)
    );
    assert_eq!(
        ok,
        1000,
        "normally closed connections: {} failed, first ones: {:?}; {report}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        tcp.as_deref(),
        Ok("sv quick"),
        "cl -> sv: a new TCP connection; {report}"
    );
    assert_eq!(
        udp.as_deref(),
        Some("sv after"),
        "cl -> sv: a new UDP flow; {report}"
    );
    assert_eq!(
        out.as_deref(),
        Ok("cl quick"),
        "sv -> cl: the server connects out; {report}"
    );
}

/// Restarts host `host`'s daemon the way the lab starts it (same topology, statistics and
/// log files; its command line points into the lab's directory, so `lab down` stops it);
/// returns its pid once its statistics file exists. A start that finds the killed daemon's
/// lock still held (its threads still exiting) is tried again.
fn restart_daemon(lab: &LabUp, host: &str, workers: usize) -> u32 {
    let stats = lab.lab.stats_path(host);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let _ = std::fs::remove_file(&stats);
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(lab.lab.log_path(host))
            .expect("the host's log");
        let mut child = Command::new(VPCD)
            .args(["run", "--netns", &lab.lab.host_ns(host), "--topology"])
            .arg(lab.lab.topology_path())
            .args(["--host", host, "--stats"])
            .arg(&stats)
            .args(["--workers", &workers.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("vpcd run");
        let pid = child.id();
        loop {
            if stats.exists() {
                // Not waited for: `lab down` stops it.
                drop(child);
                return pid;
            }
            let exited = child.try_wait().expect("try_wait").is_some();
            let log = std::fs::read_to_string(lab.lab.log_path(host)).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "the restarted daemon of {host} did not start:\n{log}"
            );
            if exited {
                assert!(
                    log.lines()
                        .last()
                        .is_some_and(|l| l.contains("already running")),
                    "the restarted daemon of {host} failed:\n{log}"
                );
                thread::sleep(Duration::from_millis(50));
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn a_daemon_killed_and_restarted_picks_its_established_flows_up_again() {
    let test = "a_daemon_killed_and_restarted_picks_its_established_flows_up_again";
    if !can_run(test, &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let toml = ct_topology(
        200,
        60,
        &[
            ("cl", "host-a", "10.80.1.10"),
            ("sv", "host-b", "10.80.1.20"),
        ],
    );
    let lab = lab_up("iso_ct_restart", &toml, 1);
    let (cl, sv) = (lab.ns("cl"), lab.ns("sv"));
    let sv_ip = lab.ip("sv");
    let stream = Stream::start(&cl, &sv, sv_ip, 9610, true, Duration::from_millis(5));
    thread::sleep(Duration::from_millis(500));
    let early = stream.received().len();
    assert!(
        early > 20,
        "the stream runs before the restart: {early} messages"
    );

    // kill -9 host-b's daemon (the receiver's): its devices vanish with it.
    let pid = lab.lab.daemon_pid("host-b").expect("host-b's daemon");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    let deadline = Instant::now() + Duration::from_secs(5);
    while (running(pid) || !addrs_of(&sv, "sv").is_empty()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert!(!running(pid), "host-b's daemon {pid} survived SIGKILL");
    let killed = Instant::now();
    // Down for a while: the sender's segments of that time are lost and retransmitted.
    thread::sleep(Duration::from_millis(300));
    let before_restart = stream.received().len();
    let new_pid = restart_daemon(&lab, "host-b", 1);
    let ready = Instant::now();
    eprintln!(
        "{test}: host-b's daemon {pid} killed, {new_pid} running after {:?}; {before_restart} messages before",
        ready - killed
    );

    // The stream resumes within a few seconds and catches up.
    let deadline = ready + Duration::from_secs(8);
    let resumed = loop {
        let got = stream.received();
        if let Some(&(_, at)) = got.iter().find(|(_, at)| *at > ready) {
            break Some(at - ready);
        }
        if Instant::now() > deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(lab.lab.log_path("host-b")).unwrap_or_default();
    let Some(resumed) = resumed else {
        let (sent, got, errors) = stream.finish(Duration::from_millis(100));
        let stats = std::fs::read_to_string(lab.lab.stats_path("host-b")).unwrap_or_default();
        let drops: Vec<&str> = stats
            .lines()
            .filter(|l| l.starts_with("drop.") && !l.ends_with(" 0"))
            .collect();
        panic!(
            "no data arrived within 8 s of the restart ({sent} sent, {} received, errors {errors:?}); host-b's drops: {drops:?}",
            got.len()
        );
    };
    eprintln!("{test}: data arrives again {resumed:?} after the restart");
    thread::sleep(Duration::from_millis(1000));
    let (sent, got, errors) = stream.finish(Duration::from_millis(1500));
    assert!(errors.is_empty(), "the stream broke: {errors:?}\n{log}");
    let numbers: Vec<u32> = got.iter().map(|(n, _)| *n).collect();
    assert!(
        numbers.iter().enumerate().all(|(i, n)| *n == i as u32),
        "TCP delivers every message once, in order"
    );
    assert_eq!(
        numbers.len() as u32,
        sent,
        "every message sent arrived, the ones across the restart too"
    );
    assert!(
        resumed < Duration::from_secs(5),
        "the stream took {resumed:?} to resume"
    );
}

#[test]
fn a_syn_flood_answered_by_resets_does_not_lock_the_flooder_out() {
    let test = "a_syn_flood_answered_by_resets_does_not_lock_the_flooder_out";
    if !can_run(test, &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let toml = ct_topology(
        200,
        60,
        &[
            ("fl", "host-a", "10.80.1.10"),
            ("sv", "host-b", "10.80.1.20"),
        ],
    );
    let lab = lab_up("iso_ct_rst", &toml, 1);
    let (fl, sv) = (lab.ns("fl"), lab.ns("sv"));
    let sv_ip = lab.ip("sv");
    let open = Listener::tcp(&sv, "sv", 9621);
    let before = lab.stats();

    // 2,000 connection attempts to a closed port: each SYN is answered by a reset.
    let started = Instant::now();
    let (refused, other) = in_ns(&fl, move || {
        let (mut refused, mut other, mut in_a_row) = (0usize, Vec::new(), 0);
        for i in 0..2000 {
            match TcpStream::connect_timeout(
                &SocketAddr::from((sv_ip, 9620)),
                Duration::from_millis(300),
            ) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    refused += 1;
                    in_a_row = 0;
                }
                r => {
                    other.push(format!("#{i}: {:?}", r.map(|_| "connected")));
                    in_a_row += 1;
                    if in_a_row >= 10 {
                        break;
                    }
                }
            }
        }
        (refused, other)
    });
    let flood = started.elapsed();
    // At once, to an open port: the first SYN must get through.
    let quick = tcp_quick(&fl, sv_ip, 9621, Duration::from_millis(800));
    drop(open);
    let after = lab.stats();
    let report = format!(
        "{}; {}",
        conntrack_report(&after, &before),
        after.diff(&before)
    );
    eprintln!("{test}: {refused} resets in {flood:?}; {report}");
    assert_eq!(
        refused,
        2000,
        "every attempt answered by a reset; others: {:?}; {report}",
        &other[..other.len().min(5)]
    );
    assert_eq!(
        quick.as_deref(),
        Ok("sv quick"),
        "fl -> sv's open port after the flood; {report}"
    );
}

#[test]
fn many_flows_towards_one_instance_are_not_its_share() {
    let test = "many_flows_towards_one_instance_are_not_its_share";
    if !can_run(test, &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let toml = ct_topology(
        200,
        60,
        &[
            ("u1", "host-a", "10.80.1.11"),
            ("u2", "host-a", "10.80.1.12"),
            ("w", "host-b", "10.80.1.20"),
        ],
    );
    let lab = lab_up("iso_ct_share", &toml, 1);
    let (u1, u2, w) = (lab.ns("u1"), lab.ns("u2"), lab.ns("w"));
    let (u1_ip, u2_ip, w_ip) = (lab.ip("u1"), lab.ip("u2"), lab.ip("w"));
    let before = lab.stats();

    // 2 x 50 answered UDP flows towards w: more than w's own share (60), each opener under
    // its own.
    let echo = Listener::udp(&w, "w", 9630);
    let a1 = udp_flows(&u1, w_ip, 9630, 50, Duration::from_secs(2));
    let a2 = udp_flows(&u2, w_ip, 9630, 50, Duration::from_secs(2));
    drop(echo);
    let mid = lab.stats();
    eprintln!(
        "{test}: u1 {a1} of 50 answered, u2 {a2} of 50; {}",
        conntrack_report(&mid, &before)
    );

    // w still pings out and connects out.
    let pings = ping(&w, u1_ip, 3);
    let l = Listener::tcp(&u1, "u1", 9631);
    let tcp = tcp_quick(&w, u1_ip, 9631, Duration::from_millis(900));
    drop(l);
    let lu = Listener::udp(&u2, "u2", 9632);
    let udp = udp_ask(&w, None, u2_ip, 9632, "w-out");
    drop(lu);
    let after = lab.stats();
    let report = format!(
        "{}; {}",
        conntrack_report(&after, &before),
        after.diff(&before)
    );
    assert_eq!(
        pings, 3,
        "w -> u1: ping after 100 flows towards w; {report}"
    );
    assert_eq!(tcp.as_deref(), Ok("u1 quick"), "w -> u1: TCP; {report}");
    assert_eq!(udp.as_deref(), Some("u2 w-out"), "w -> u2: UDP; {report}");
    assert_eq!(
        (a1, a2),
        (50, 50),
        "every flow towards w answered; {report}"
    );
}

#[test]
fn an_idle_instance_opens_a_connection_at_once_in_a_full_table() {
    let test = "an_idle_instance_opens_a_connection_at_once_in_a_full_table";
    if !can_run(test, &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let toml = ct_topology(
        100,
        60,
        &[
            ("c1", "host-a", "10.80.1.11"),
            ("c2", "host-a", "10.80.1.12"),
            ("i3", "host-a", "10.80.1.13"),
            ("sv", "host-b", "10.80.1.20"),
        ],
    );
    let lab = lab_up("iso_ct_full", &toml, 1);
    let (c1, c2, i3, sv) = (lab.ns("c1"), lab.ns("c2"), lab.ns("i3"), lab.ns("sv"));
    let sv_ip = lab.ip("sv");
    let before = lab.stats();

    // c1 and c2 each open 60 answered UDP flows (each at its own share): 120 for a table of
    // 100 on both hosts.
    let echo = Listener::udp(&sv, "sv", 9640);
    let a1 = udp_flows(&c1, sv_ip, 9640, 60, Duration::from_secs(2));
    let a2 = udp_flows(&c2, sv_ip, 9640, 60, Duration::from_secs(2));
    drop(echo);
    let mid = lab.stats();
    eprintln!(
        "{test}: c1 {a1} of 60 answered, c2 {a2} of 60; host-a holds {} connections, host-b {}; {}",
        mid.get("host-a", "connections"),
        mid.get("host-b", "connections"),
        conntrack_report(&mid, &before)
    );

    // i3, idle so far, connects at once (the first SYN gets through) and pings.
    let l = Listener::tcp(&sv, "sv", 9641);
    let tcp = tcp_quick(&i3, sv_ip, 9641, Duration::from_millis(800));
    drop(l);
    let pings = ping(&i3, sv_ip, 2);
    let after = lab.stats();
    let report = format!(
        "{}; {}",
        conntrack_report(&after, &before),
        after.diff(&before)
    );
    eprintln!("{test}: after i3: {report}");
    assert!(
        mid.get("host-a", "connections") >= 90,
        "c1 and c2 should fill host-a's table: {}",
        conntrack_report(&mid, &before)
    );
    assert_eq!(
        tcp.as_deref(),
        Ok("sv quick"),
        "i3 -> sv: TCP in a full table; {report}"
    );
    assert_eq!(pings, 2, "i3 -> sv: ping in a full table; {report}");
}

// ----------------------------------------------------------------------------------------------
// 5. Replies to an Elastic IP leave through it

const EIP_REPLY: &str = r#"
[internet]
cidr = "203.0.113.0/24"
gateway = "host-a"
netns = "@NS-inet"

[[vpc]]
name = "vpc-e"
tenant = "acme"
cidr = "10.90.0.0/16"
key = 4190

[[route_table]]   # everything the instances start goes to the appliance
name = "rt-e"
vpc = "vpc-e"
routes = [ { destination = "0.0.0.0/0", next_hop = "instance:app1" } ]

[[subnet]]
name = "net-e"
vpc = "vpc-e"
cidr = "10.90.1.0/24"
route_table = "rt-e"

[[subnet]]
name = "net-app"
vpc = "vpc-e"
cidr = "10.90.2.0/24"

[[security_group]]
name = "sg-pub"
ingress = [ { action = "accept", protocol = "all", source = "0.0.0.0/0" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]   # behind the gateway
name = "e1"
host = "host-b"
subnet = "net-e"
ip = "10.90.1.10"
eip = "203.0.113.10"
security_groups = ["sg-pub"]
netns = "@NS-e1"

[[instance]]   # on the gateway host
name = "e2"
host = "host-a"
subnet = "net-e"
ip = "10.90.1.20"
eip = "203.0.113.11"
security_groups = ["sg-pub"]
netns = "@NS-e2"

[[instance]]
name = "app1"
host = "host-b"
subnet = "net-app"
ip = "10.90.2.10"
security_groups = ["sg-pub"]
netns = "@NS-app1"
"#;

#[test]
fn replies_to_an_elastic_ip_leave_through_it_whatever_the_routes_say() {
    let test = "replies_to_an_elastic_ip_leave_through_it_whatever_the_routes_say";
    if !can_run(test, &[Tool::Ip, Tool::Ping, Tool::Tshark]) {
        return;
    }
    let lab = lab_up("iso_eip_reply", &(underlay(2) + EIP_REPLY), 2);
    let inet = lab.ns("internet");
    let app = capture_instance(&lab, "app1", "", "iso_eip_app1");
    let wire = Capture::start(&inet, "vpcd-internet", "", "iso_eip_inet", 60);
    let before = lab.stats();
    let mut problems = Vec::new();
    for (inst, eip, port) in [
        ("e1", Ipv4Addr::new(203, 0, 113, 10), 9700u16),
        ("e2", Ipv4Addr::new(203, 0, 113, 11), 9710),
    ] {
        let ns = lab.ns(inst);
        match tcp_seen(&inet, &ns, eip, port) {
            Some(s) if s.from.ip() == std::net::IpAddr::V4(INTERNET) => {}
            other => problems.push(format!("internet -> {inst}'s EIP {eip}: TCP: {other:?}")),
        }
        let l = Listener::udp(&ns, inst, port + 1);
        let udp = udp_ask_from(&inet, eip, port + 1, "ask");
        drop(l);
        if udp != Some((format!("{inst} ask"), SocketAddr::from((eip, port + 1)))) {
            problems.push(format!(
                "internet -> {inst}'s EIP {eip}: UDP answer {udp:?}"
            ));
        }
        let pings = ping(&inet, eip, 3);
        if pings != 3 {
            problems.push(format!(
                "internet -> {inst}'s EIP {eip}: {pings} of 3 pings"
            ));
        }
    }
    let after = lab.stats();
    let app_file = app.stop();
    let wire_file = wire.stop();
    let app_rows = tshark_fields(&app_file, &[], &["ip.src", "ip.dst", "ip.proto"]);
    let wire_rows = tshark_fields(
        &wire_file,
        &[],
        &[
            "ip.src",
            "ip.dst",
            "tcp.flags.syn",
            "tcp.flags.ack",
            "icmp.type",
        ],
    );
    let _ = (
        std::fs::remove_file(&app_file),
        std::fs::remove_file(&wire_file),
    );
    assert!(
        problems.is_empty(),
        "replies did not come back from the Elastic IPs:\n  {}\napp1 saw {} packets: {app_rows:?}\n{}",
        problems.join("\n  "),
        app_rows.len(),
        after.diff(&before)
    );
    assert!(
        app_rows.is_empty(),
        "the appliance saw replies: {app_rows:?}"
    );
    assert_eq!(
        received(&after, &before, "app1"),
        0,
        "{}",
        after.diff(&before)
    );
    // On the internet's side, the SYN-ACKs and echo replies come from the EIPs.
    for eip in ["203.0.113.10", "203.0.113.11"] {
        let from: Vec<&Vec<String>> = wire_rows.iter().filter(|r| r[0] == eip).collect();
        assert!(
            from.iter().any(|r| r[2] == "1" && r[3] == "1"),
            "a SYN-ACK from {eip}: {wire_rows:?}"
        );
        assert!(
            from.iter().filter(|r| r[4] == "0").count() >= 3,
            "echo replies from {eip}: {wire_rows:?}"
        );
    }

    // The control: what the instances start themselves does follow the route to app1.
    let before = lab.stats();
    let li = Listener::udp(&inet, "internet", 9720);
    udp_fire(&lab.ns("e1"), INTERNET, 9720, "e1-starts", 3);
    thread::sleep(Duration::from_millis(200));
    let after = lab.stats();
    assert!(li.finish().is_empty(), "e1's own traffic went out directly");
    assert!(
        received(&after, &before, "app1") >= 3,
        "e1's own traffic to the internet goes to app1: {}",
        after.diff(&before)
    );
}

// ----------------------------------------------------------------------------------------------
// 6. Appliances that forward

const NAT: &str = r#"
[internet]
cidr = "203.0.113.0/24"
gateway = "host-a"
netns = "@NS-inet"

[[vpc]]
name = "vpc-n"
tenant = "acme"
cidr = "10.91.0.0/16"
key = 4191

[[route_table]]
name = "rt-c"
vpc = "vpc-n"
routes = [ { destination = "0.0.0.0/0", next_hop = "instance:nat1" } ]

[[subnet]]
name = "net-c"
vpc = "vpc-n"
cidr = "10.91.1.0/24"
route_table = "rt-c"

[[subnet]]   # the VPC's default table: nat1's own traffic leaves through its EIP
name = "net-n"
vpc = "vpc-n"
cidr = "10.91.2.0/24"

[[security_group]]
name = "sg-n"
ingress = [ { action = "accept", protocol = "all", source = "10.91.0.0/16" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]   # no Elastic IP
name = "c1"
host = "host-a"
subnet = "net-c"
ip = "10.91.1.10"
security_groups = ["sg-n"]
netns = "@NS-c1"

[[instance]]
name = "nat1"
host = "host-b"
subnet = "net-n"
ip = "10.91.2.10"
eip = "203.0.113.20"
source_check = false
security_groups = ["sg-n"]
netns = "@NS-nat1"
"#;

#[test]
fn an_instance_without_an_elastic_ip_reaches_the_internet_through_a_nat_appliance() {
    let test = "an_instance_without_an_elastic_ip_reaches_the_internet_through_a_nat_appliance";
    if !can_run(test, &[Tool::Ip, Tool::Ping, Tool::Tshark, Tool::Nft]) {
        return;
    }
    let lab = lab_up("iso_nat", &(underlay(2) + NAT), 2);
    let (c1, nat1, inet) = (lab.ns("c1"), lab.ns("nat1"), lab.ns("internet"));
    let c1_ip = lab.ip("c1");
    let nat_eip = Ipv4Addr::new(203, 0, 113, 20);
    make_router(&nat1);
    sh_in(
        &nat1,
        "nft add table ip nat && \
         nft add chain ip nat post '{ type nat hook postrouting priority 100 ; }' && \
         nft add rule ip nat post ip saddr 10.91.1.0/24 counter masquerade",
    );
    let before = lab.stats();
    let mut seen = None;
    let rows = gre_on_wire(&lab, "iso_nat", WIRE, || {
        seen = tcp_seen(&c1, &inet, INTERNET, 9800);
    });
    let after = lab.stats();
    let nft = sh_in(&nat1, "nft list table ip nat");
    let seen = seen.unwrap_or_else(|| {
        panic!(
            "c1 -> the internet through nat1: TCP failed; nat1's rules:\n{nft}\n{}",
            after.diff(&before)
        )
    });
    assert_eq!(
        seen.from.ip(),
        std::net::IpAddr::V4(nat_eip),
        "the internet sees nat1's Elastic IP: {seen:?}"
    );
    assert!(
        received(&after, &before, "nat1") > 0,
        "{}",
        after.diff(&before)
    );
    // nat1's translated replies to c1 travel on nat1's appliance channel.
    let key = derived_key(5, "appliance:nat1");
    let back = gre_rows(&rows, ("192.0.2.2", "192.0.2.1"), (INTERNET, c1_ip));
    assert!(!back.is_empty(), "nat1 -> c1 on the wire: {rows:?}");
    for r in back {
        assert_eq!(
            r[2],
            hex(key),
            "nat1's forwarded packets carry appliance:nat1's key: {r:?}"
        );
    }
    assert_eq!(
        ping(&c1, INTERNET, 3),
        3,
        "c1 -> the internet through nat1: ping"
    );
    let li = Listener::udp(&inet, "internet", 9801);
    let udp = udp_ask_from(&c1, INTERNET, 9801, "c1-udp");
    let useen = li.finish();
    assert_eq!(
        udp.map(|(a, _)| a),
        Some("internet c1-udp".to_string()),
        "c1 -> the internet through nat1: UDP"
    );
    assert!(
        useen
            .iter()
            .all(|s| s.from.ip() == std::net::IpAddr::V4(nat_eip)),
        "{useen:?}"
    );
}

/// A firewall appliance `fw` between subnets s1 and s2 (subnet routes both ways), in s3;
/// `fw_extra` is added to fw's table (`source_check = false`, or nothing).
fn firewall_topology(fw_extra: &str) -> String {
    underlay(3)
        + r#"
[[vpc]]
name = "vpc-f"
tenant = "acme"
cidr = "10.92.0.0/16"
key = 4192

[[route_table]]
name = "rt-1"
vpc = "vpc-f"
routes = [ { destination = "10.92.2.0/24", next_hop = "instance:fw" } ]

[[route_table]]
name = "rt-2"
vpc = "vpc-f"
routes = [ { destination = "10.92.1.0/24", next_hop = "instance:fw" } ]

[[subnet]]
name = "s1"
vpc = "vpc-f"
cidr = "10.92.1.0/24"
route_table = "rt-1"

[[subnet]]
name = "s2"
vpc = "vpc-f"
cidr = "10.92.2.0/24"
route_table = "rt-2"

[[subnet]]
name = "s3"
vpc = "vpc-f"
cidr = "10.92.3.0/24"

[[security_group]]
name = "sg-f"
ingress = [ { action = "accept", protocol = "all", source = "10.92.0.0/16" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[security_group]]   # the server admits both ports: port 23 is the firewall's to block
name = "sg-srv"
ingress = [ { action = "accept", protocol = "tcp", port = "23,80", source = "10.92.1.0/24" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]
"# + &vpc_instance("cl", "host-a", "s1", "10.92.1.10", "sg-f", "")
        + &vpc_instance("srv", "host-b", "s2", "10.92.2.10", "sg-srv", "")
        + &vpc_instance("fw", "host-c", "s3", "10.92.3.10", "sg-f", fw_extra)
}

/// fw forwards, and its nftables drop TCP port 23 (with a counter) and accept the rest.
fn firewall_rules(ns: &str) {
    make_router(ns);
    sh_in(
        ns,
        "nft -f - <<'EOF'\n\
         table inet filter {\n\
           chain forward {\n\
             type filter hook forward priority 0; policy accept;\n\
             tcp dport 23 counter drop\n\
             counter accept\n\
           }\n\
         }\n\
         EOF\n",
    );
}

/// The packet counts of fw's rules: (port 23 dropped, accepted).
fn firewall_counters(ns: &str) -> (u64, u64) {
    let text = sh_in(ns, "nft list chain inet filter forward");
    let packets = |l: &str| {
        l.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let dropped = text
        .lines()
        .find(|l| l.contains("dport 23"))
        .map_or(0, packets);
    let accepted = text
        .lines()
        .find(|l| l.contains("accept") && !l.contains("policy"))
        .map_or(0, packets);
    (dropped, accepted)
}

#[test]
fn a_firewall_appliance_forwards_between_two_subnets_and_blocks_what_it_filters() {
    let test = "a_firewall_appliance_forwards_between_two_subnets_and_blocks_what_it_filters";
    if !can_run(test, &[Tool::Ip, Tool::Ping, Tool::Tshark, Tool::Nft]) {
        return;
    }
    let lab = lab_up("iso_fw", &firewall_topology("source_check = false\n"), 2);
    let (cl, srv, fw) = (lab.ns("cl"), lab.ns("srv"), lab.ns("fw"));
    let (cl_ip, srv_ip) = (lab.ip("cl"), lab.ip("srv"));
    firewall_rules(&fw);
    let before = lab.stats();
    let mut seen = None;
    let rows = gre_on_wire(&lab, "iso_fw", WIRE, || {
        seen = tcp_seen(&cl, &srv, srv_ip, 80);
    });
    let after = lab.stats();
    let seen = seen.unwrap_or_else(|| {
        panic!(
            "cl -> srv:80 through fw: TCP failed; {}",
            after.diff(&before)
        )
    });
    assert_eq!(
        seen.from.ip(),
        std::net::IpAddr::V4(cl_ip),
        "srv sees cl's real address: {seen:?}"
    );
    // Each way through fw (host-c): into it on the VPC's channel, out of it on its own.
    let vpc_key = hex(4192);
    let fw_key = hex(derived_key(5, "appliance:fw"));
    for (what, dir, inner, key) in [
        (
            "cl -> fw",
            ("192.0.2.1", "192.0.2.3"),
            (cl_ip, srv_ip),
            &vpc_key,
        ),
        (
            "fw -> srv",
            ("192.0.2.3", "192.0.2.2"),
            (cl_ip, srv_ip),
            &fw_key,
        ),
        (
            "srv -> fw",
            ("192.0.2.2", "192.0.2.3"),
            (srv_ip, cl_ip),
            &vpc_key,
        ),
        (
            "fw -> cl",
            ("192.0.2.3", "192.0.2.1"),
            (srv_ip, cl_ip),
            &fw_key,
        ),
    ] {
        let got = gre_rows(&rows, dir, inner);
        assert!(got.len() >= 3, "{what}: {rows:?}");
        for r in got {
            assert_eq!(&r[2], key, "{what}: {r:?}");
        }
    }
    let direct: Vec<_> = inner_rows(&rows, (cl_ip, srv_ip))
        .into_iter()
        .chain(inner_rows(&rows, (srv_ip, cl_ip)))
        .filter(|r| {
            (r[0].starts_with("192.0.2.1,") && r[1].starts_with("192.0.2.2,"))
                || (r[0].starts_with("192.0.2.2,") && r[1].starts_with("192.0.2.1,"))
        })
        .collect();
    assert!(direct.is_empty(), "cl <-> srv bypassed fw: {direct:?}");
    assert!(
        received(&after, &before, "fw") >= 6,
        "{}",
        after.diff(&before)
    );
    let (dropped0, accepted) = firewall_counters(&fw);
    assert!(
        accepted >= 6,
        "fw's nftables forwarded cl <-> srv: {accepted} packets"
    );

    // Port 23: the server's groups admit it, fw drops it.
    let before = lab.stats();
    let l23 = Listener::tcp(&srv, "srv", 23);
    let telnet = tcp_ask(&cl, srv_ip, 23, "telnet");
    let seen23 = l23.finish();
    let after = lab.stats();
    let (dropped, _) = firewall_counters(&fw);
    assert_eq!(telnet, None, "cl -> srv:23 got through fw");
    assert!(seen23.is_empty(), "srv accepted port 23: {seen23:?}");
    assert!(
        dropped > dropped0,
        "fw's nftables dropped port 23: {dropped0} -> {dropped}"
    );
    assert_eq!(
        after.dropped(&before, "host-b", "SgIngress"),
        0,
        "port 23 is blocked by fw, not by srv's groups: {}",
        after.diff(&before)
    );
    assert!(
        received(&after, &before, "fw") >= 1,
        "{}",
        after.diff(&before)
    );
    // And a transfer through fw arrives whole.
    let data = Arc::new(pattern(300_000, 80));
    let (got, echoed) = tcp_transfer(&cl, &srv, srv_ip, 80, data.clone());
    assert!(
        got == *data,
        "cl -> srv:80 through fw: {} of {} bytes",
        got.len(),
        data.len()
    );
    assert_eq!(echoed, Some(fnv(&data)));
}

#[test]
fn a_forwarding_appliance_without_source_check_off_is_dropped_as_spoofed() {
    let test = "a_forwarding_appliance_without_source_check_off_is_dropped_as_spoofed";
    if !can_run(test, &[Tool::Ip, Tool::Ping, Tool::Nft]) {
        return;
    }
    let lab = lab_up("iso_fw_spoof", &firewall_topology(""), 2);
    let (cl, srv, fw) = (lab.ns("cl"), lab.ns("srv"), lab.ns("fw"));
    let srv_ip = lab.ip("srv");
    firewall_rules(&fw);
    let before = lab.stats();
    let seen = tcp_seen(&cl, &srv, srv_ip, 80);
    let after = lab.stats();
    assert!(
        seen.is_none(),
        "cl -> srv:80 through fw with the source check on: {seen:?}"
    );
    let (_, accepted) = firewall_counters(&fw);
    assert!(accepted >= 1, "fw forwarded cl's packets: {accepted}");
    assert!(
        received(&after, &before, "fw") >= 1,
        "{}",
        after.diff(&before)
    );
    assert!(
        after.dropped(&before, "host-c", "SourceSpoofed") >= 1,
        "fw's forwarded packets: SourceSpoofed on host-c; {}",
        after.diff(&before)
    );
    assert_eq!(
        received(&after, &before, "srv"),
        0,
        "{}",
        after.diff(&before)
    );
}
