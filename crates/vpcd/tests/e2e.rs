//! End-to-end tests: real labs (`vpcd lab up`: an underlay bridge, one namespace per host with
//! its `vpcd run`, one namespace per instance) and real traffic: ping, TCP and UDP from inside
//! the instances' namespaces, scapy-crafted hostile packets, tshark reading the wire.
//!
//! Every test builds its own small lab under a name of its own (and instance namespaces named
//! after it), so the tests run in parallel; a guard runs `vpcd lab down` when the test ends,
//! failed or not. They need root, iproute2, ping, tshark and a python3 with scapy; when
//! something is missing they skip, recorded in target/tmp/vpcd-skips.txt (under
//! `VPCD_REQUIRE_E2E=1` they fail instead). Underlay addresses are in 192.0.2.0/24.

#[path = "e2e/common.rs"]
mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// `[underlay]` and two hosts.
fn underlay(transport: &str, checksum: bool) -> String {
    format!(
        r#"
[underlay]
transport = "{transport}"
mtu = 1500
checksum = {checksum}

[[host]]
name = "host-a"
address = "192.0.2.1"

[[host]]
name = "host-b"
address = "192.0.2.2"
"#
    )
}

/// One VPC (10.N.0.0/16, `key`), one subnet, a security group open to the VPC, instance
/// `{tag}a` (10.N.1.10) on host-a and `{tag}b` (10.N.1.20) on host-b, in namespaces
/// `e2-{tag}a` and `e2-{tag}b`.
fn pair(tag: &str, transport: &str, checksum: bool, n: u8, key: u32) -> String {
    underlay(transport, checksum)
        + &format!(
            r#"
[[vpc]]
name = "vpc-{tag}"
tenant = "t-{tag}"
cidr = "10.{n}.0.0/16"
key = {key}

[[subnet]]
name = "net-{tag}"
vpc = "vpc-{tag}"
cidr = "10.{n}.1.0/24"

[[security_group]]
name = "sg-{tag}"
ingress = [ {{ action = "accept", protocol = "all", source = "10.{n}.0.0/16" }} ]
egress  = [ {{ action = "accept", protocol = "all", destination = "0.0.0.0/0" }} ]

[[instance]]
name = "{tag}a"
host = "host-a"
subnet = "net-{tag}"
ip = "10.{n}.1.10"
security_groups = ["sg-{tag}"]
netns = "e2-{tag}a"

[[instance]]
name = "{tag}b"
host = "host-b"
subnet = "net-{tag}"
ip = "10.{n}.1.20"
security_groups = ["sg-{tag}"]
netns = "e2-{tag}b"
"#
        )
}

// ----------------------------------------------------------------------------------------------
// 1. ping and a checked TCP transfer across hosts, over both transports

fn ping_and_transfer(
    test: &str,
    lab_name: &str,
    tag: &str,
    transport: &str,
    checksum: bool,
    n: u8,
) {
    if !can_run(test, &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let key = 1000 + u32::from(n);
    let lab = LabUp::start(lab_name, &pair(tag, transport, checksum, n, key));
    let (a, b) = (format!("{tag}a"), format!("{tag}b"));
    let (a_ns, b_ns) = (lab.ns(&a), lab.ns(&b));
    let (a_ip, b_ip) = (lab.ip(&a), lab.ip(&b));
    let before = lab.stats();

    assert_eq!(ping(&a_ns, b_ip, 3), 3, "{a} -> {b}: ping over {transport}");
    assert_eq!(ping(&b_ns, a_ip, 3), 3, "{b} -> {a}: ping over {transport}");

    transfers_intact(test, [(&a, &a_ns, a_ip), (&b, &b_ns, b_ip)], transport);

    let after = lab.stats();
    for host in ["host-a", "host-b"] {
        no_format_drops(&before, &after, host, transport);
        assert!(
            after.grew(&before, host, "encapsulated") > 0
                && after.grew(&before, host, "delivered") > 0,
            "{host} should have encapsulated and delivered: {}",
            after.diff(&before)
        );
    }
}

/// A megabyte and a bit each way between two instances (name, namespace, address), checked
/// byte for byte, and the receiver's hash of it checked by the sender.
fn transfers_intact(test: &str, [a, b]: [(&str, &str, Ipv4Addr); 2], transport: &str) {
    for ((from, from_ns, _), (_, to_ns, to_ip), seed) in [(a, b, 1u64), (b, a, 2u64)] {
        let data = Arc::new(pattern((1 << 20) + 12_345, seed));
        let started = Instant::now();
        let (got, echoed) = tcp_transfer(from_ns, to_ns, to_ip, 5201, data.clone());
        let first_bad = got.iter().zip(data.iter()).position(|(x, y)| x != y);
        assert!(
            got.len() == data.len() && first_bad.is_none(),
            "TCP from {from} over {transport}: received {} of {} bytes, first difference at {first_bad:?}",
            got.len(),
            data.len()
        );
        assert_eq!(
            echoed,
            Some(fnv(&data)),
            "TCP from {from} over {transport}: the receiver's hash did not come back intact"
        );
        eprintln!(
            "{test}: {} bytes from {from} in {:?}",
            data.len(),
            started.elapsed()
        );
    }
}

/// What vpcd emits, vpcd accepts: not one packet lost to a wire-format check on `host`.
fn no_format_drops(before: &Stats, after: &Stats, host: &str, transport: &str) {
    for reason in [
        "OuterMalformed",
        "GreTruncated",
        "GreBadChecksum",
        "GreReservedBits",
        "InnerTruncated",
        "InnerBadIhl",
        "InnerLengthMismatch",
        "L4Malformed",
        "OversizeNoDf",
        "NoHeadroom",
        "UnderlayTooBig",
    ] {
        assert_eq!(
            after.dropped(before, host, reason),
            0,
            "{host} dropped {reason} over {transport}: {}",
            after.diff(before)
        );
    }
}

/// A jumbo underlay (9,000 bytes) under instances of the default MTU (1,500 less the
/// overhead): the instances' devices keep that MTU, a megabyte each way arrives intact, and
/// tshark on the underlay bridge reads standard GRE packets far longer than 1,500 bytes, each
/// carrying several of an instance's segments as one TCP segment longer than the instance
/// MTU, its TCP checksum correct. The receiver hands them to its instance whole (a GSO
/// header has the instance's kernel cut them), so nothing is dropped as too big.
fn jumbo_underlay(test: &str, lab_name: &str, tag: &str, transport: &str, checksum: bool, n: u8) {
    if !can_run(test, &[Tool::Ip, Tool::Tshark]) {
        return;
    }
    let toml = pair(tag, transport, checksum, n, 1000 + u32::from(n));
    let lab = LabUp::start(lab_name, &toml.replace("mtu = 1500", "mtu = 9000"));
    let mtu = lab.topo.underlay.instance_mtu();
    let (a, b) = (format!("{tag}a"), format!("{tag}b"));
    let (a_ns, b_ns) = (lab.ns(&a), lab.ns(&b));
    for (name, ns) in [(&a, &a_ns), (&b, &b_ns)] {
        let o = exec_in(ns, &["ip", "link", "show", "dev", name]);
        let shown = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(shown.contains(&format!(" mtu {mtu} ")), "{name}: {shown}");
    }
    let before = lab.stats();
    // Frame length, IPv4 lengths (outer,inner), the inner TCP checksum's status as tshark
    // verifies it.
    let extra = ["-o", "tcp.check_checksum:TRUE", "-Y", "gre && tcp.len > 0"];
    let fields = ["frame.len", "ip.len", "tcp.checksum.status"];
    let rows = gre_read(&lab, tag, &extra, &fields, || {
        transfers_intact(
            test,
            [(&a, &a_ns, lab.ip(&a)), (&b, &b_ns, lab.ip(&b))],
            transport,
        )
    });
    let long: Vec<&Vec<String>> = rows
        .iter()
        .filter(|r| r[0].parse::<usize>().is_ok_and(|l| l > 3000))
        .collect();
    assert!(
        long.len() > 20,
        "{transport}: few long GRE packets: {rows:?}"
    );
    for r in &long {
        let inner = r[1].rsplit(',').next().and_then(|l| l.parse::<u16>().ok());
        assert!(
            inner.is_some_and(|l| l > mtu),
            "{transport}: inner length {r:?}"
        );
        assert_eq!(
            r[2], "1",
            "{transport}: TCP checksum status (1: good) of {r:?}"
        );
    }
    let after = lab.stats();
    for host in ["host-a", "host-b"] {
        no_format_drops(&before, &after, host, transport);
    }
}

#[test]
fn a_jumbo_underlay_carries_several_segments_per_packet() {
    let test = "a_jumbo_underlay_carries_several_segments_per_packet";
    jumbo_underlay(test, "e2e_jgre", "jg", "gre", false, 15);
    jumbo_underlay(test, "e2e_judp", "ju", "gre-udp", false, 16);
    jumbo_underlay(test, "e2e_jcs", "jc", "gre", true, 17);
}

#[test]
fn gre_ping_and_tcp_transfer() {
    ping_and_transfer(
        "gre_ping_and_tcp_transfer",
        "e2e_gre",
        "gr",
        "gre",
        false,
        11,
    );
}

#[test]
fn gre_udp_ping_and_tcp_transfer() {
    ping_and_transfer(
        "gre_udp_ping_and_tcp_transfer",
        "e2e_udp",
        "gu",
        "gre-udp",
        false,
        12,
    );
}

/// With GRE checksums, every segment of a super-packet carries its own.
#[test]
fn checksummed_gre_and_gre_udp_transfers() {
    let test = "checksummed_gre_and_gre_udp_transfers";
    ping_and_transfer(test, "e2e_gcs", "gc", "gre", true, 13);
    ping_and_transfer(test, "e2e_ucs", "uc", "gre-udp", true, 14);
}

// ----------------------------------------------------------------------------------------------
// 2. two tenants with the same CIDR and the same instance addresses

const TENANTS: &str = r#"
[[vpc]]
name = "vpc-red"
tenant = "red"
cidr = "10.0.0.0/16"
key = 2101

[[vpc]]
name = "vpc-blue"
tenant = "blue"
cidr = "10.0.0.0/16"
key = 2202

[[subnet]]
name = "red-net"
vpc = "vpc-red"
cidr = "10.0.1.0/24"

[[subnet]]
name = "blue-net"
vpc = "vpc-blue"
cidr = "10.0.1.0/24"

[[security_group]]
name = "sg-open"
ingress = [ { action = "accept", protocol = "all", source = "10.0.0.0/16" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "red-a"
host = "host-a"
subnet = "red-net"
ip = "10.0.1.10"
security_groups = ["sg-open"]
netns = "e2t-red-a"

[[instance]]
name = "red-b"
host = "host-b"
subnet = "red-net"
ip = "10.0.1.20"
security_groups = ["sg-open"]
netns = "e2t-red-b"

[[instance]]
name = "red-c"
host = "host-b"
subnet = "red-net"
ip = "10.0.1.30"
security_groups = ["sg-open"]
netns = "e2t-red-c"

[[instance]]
name = "blue-a"
host = "host-a"
subnet = "blue-net"
ip = "10.0.1.10"
security_groups = ["sg-open"]
netns = "e2t-blue-a"

[[instance]]
name = "blue-b"
host = "host-b"
subnet = "blue-net"
ip = "10.0.1.20"
security_groups = ["sg-open"]
netns = "e2t-blue-b"

[[expect]]
from = "red-a"
to = "red-b"
protocol = "tcp"
port = 7000
reach = true

[[expect]]
from = "blue-a"
to = "blue-b"
protocol = "tcp"
port = 7000
reach = true

[[expect]]
from = "blue-b"
to = "blue-a"
protocol = "udp"
port = 7001
reach = true

[[expect]]
from = "red-b"
to = "red-a"
protocol = "udp"
port = 7001
reach = true

[[expect]]
from = "red-a"
to = "red-b"
protocol = "icmp"
reach = true

[[expect]]   # 10.0.1.30 is red-c's: blue has no such instance
from = "blue-a"
to = "10.0.1.30"
protocol = "tcp"
port = 7000
reach = false

[[expect]]
from = "blue-a"
to = "10.0.1.30"
protocol = "udp"
port = 7001
reach = false
"#;

#[test]
fn tenants_with_overlapping_addresses_stay_apart() {
    let test = "tenants_with_overlapping_addresses_stay_apart";
    if !can_run(test, &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let lab = LabUp::start("e2e_ten", &(underlay("gre", false) + TENANTS));
    let peer = Ipv4Addr::new(10, 0, 1, 20);
    let [red_a, red_b, red_c, blue_a, blue_b] =
        ["red-a", "red-b", "red-c", "blue-a", "blue-b"].map(|i| lab.ns(i));

    // Both tenants' instances at 10.0.1.20 listen; each tenant talks to 10.0.1.20.
    for (tenant, me, mine, theirs, other) in [
        (
            "red",
            &red_a,
            ("red-b", &red_b),
            ("blue-b", &blue_b),
            "blue",
        ),
        (
            "blue",
            &blue_a,
            ("blue-b", &blue_b),
            ("red-b", &red_b),
            "red",
        ),
    ] {
        let lt_mine = Listener::tcp(mine.1, mine.0, 7100);
        let lu_mine = Listener::udp(mine.1, mine.0, 7101);
        let lt_theirs = Listener::tcp(theirs.1, theirs.0, 7100);
        let lu_theirs = Listener::udp(theirs.1, theirs.0, 7101);
        let before = lab.stats();

        let token = format!("{tenant}-tcp");
        assert_eq!(
            tcp_ask(me, peer, 7100, &token),
            Some(format!("{} {token}", mine.0)),
            "{tenant}: TCP to 10.0.1.20 must reach {}",
            mine.0
        );
        let token = format!("{tenant}-udp");
        assert_eq!(
            udp_ask(me, None, peer, 7101, &token),
            Some(format!("{} {token}", mine.0)),
            "{tenant}: UDP to 10.0.1.20 must reach {}",
            mine.0
        );
        assert_eq!(ping(me, peer, 3), 3, "{tenant}: ping 10.0.1.20");

        thread::sleep(Duration::from_millis(200));
        let after = lab.stats();
        let seen_mine: Vec<String> = lt_mine
            .finish()
            .into_iter()
            .chain(lu_mine.finish())
            .map(|s| s.data)
            .collect();
        let seen_theirs: Vec<_> = lt_theirs
            .finish()
            .into_iter()
            .chain(lu_theirs.finish())
            .collect();
        assert_eq!(
            seen_mine,
            vec![format!("{tenant}-tcp"), format!("{tenant}-udp")],
            "{tenant}'s own peer"
        );
        assert!(
            seen_theirs.is_empty(),
            "{tenant}'s traffic reached {} of tenant {other}: {seen_theirs:?}",
            theirs.0
        );
        // Not a packet of any kind reached the other tenant's instances.
        for inst in [theirs.0.to_string(), format!("{other}-a")] {
            assert_eq!(
                after.grew(&before, "host-a", &format!("instance.{inst}.received"))
                    + after.grew(&before, "host-b", &format!("instance.{inst}.received")),
                0,
                "{tenant}'s traffic delivered to {inst}: {}",
                after.diff(&before)
            );
        }
    }

    // Blue asks for red-c's address: blue has no such instance, and red-c hears nothing.
    let l = Listener::tcp(&red_c, "red-c", 7100);
    let lu = Listener::udp(&red_c, "red-c", 7101);
    let before = lab.stats();
    let c = Ipv4Addr::new(10, 0, 1, 30);
    assert_eq!(tcp_ask(&blue_a, c, 7100, "blue-to-c"), None);
    assert_eq!(udp_ask(&blue_a, None, c, 7101, "blue-to-c"), None);
    assert_eq!(ping(&blue_a, c, 1), 0);
    let after = lab.stats();
    assert!(
        l.finish().is_empty() && lu.finish().is_empty(),
        "red-c heard blue"
    );
    assert!(
        after.dropped(&before, "host-a", "NoSuchInstance") >= 3,
        "NoSuchInstance on host-a: {}",
        after.diff(&before)
    );
    assert_eq!(after.grew(&before, "host-a", "encapsulated"), 0);

    // The lab's own check: every [[expect]], with every same-address instance listening.
    let mut out = Vec::new();
    let report = vpcd::lab::check(&lab.lab, &mut out).expect("lab check");
    let text = String::from_utf8_lossy(&out);
    eprintln!("{text}");
    assert_eq!(report.rows.len(), 7);
    assert_eq!(report.failures(), 0, "lab check:\n{text}");
    for r in &report.rows {
        assert!(r.leaked_to.is_empty(), "leak: {r:?}");
    }
}

// ----------------------------------------------------------------------------------------------
// 3. security groups, network ACLs, stateful replies, drop routes, appliance routes

const POLICY: &str = r#"
[[vpc]]
name = "vpc-pol"
tenant = "pol"
cidr = "10.3.0.0/16"
key = 3003

[[subnet]]
name = "front"
vpc = "vpc-pol"
cidr = "10.3.1.0/24"
acl = "acl-front"
route_table = "rt-front"

[[subnet]]
name = "back"
vpc = "vpc-pol"
cidr = "10.3.2.0/24"
acl = "acl-back"

[[subnet]]
name = "edge"
vpc = "vpc-pol"
cidr = "10.3.3.0/24"

[[route_table]]
name = "rt-front"
vpc = "vpc-pol"
routes = [
  { destination = "198.51.100.0/24", next_hop = "drop" },
  { destination = "0.0.0.0/0", next_hop = "instance:pol-ap" },
]

[[acl]]
name = "acl-front"
vpc = "vpc-pol"
ingress = [ { action = "accept", protocol = "all", cidr = "0.0.0.0/0" } ]
egress = [
  { action = "drop",   protocol = "tcp", port = "5001", cidr = "10.3.2.0/24" },
  { action = "accept", protocol = "all", cidr = "0.0.0.0/0" },
]

[[acl]]
name = "acl-back"
vpc = "vpc-pol"
ingress = [
  { action = "drop",   protocol = "tcp", port = "5002", cidr = "10.3.1.0/24" },
  { action = "accept", protocol = "all", cidr = "10.3.0.0/16" },
]
egress = [ { action = "accept", protocol = "all", cidr = "0.0.0.0/0" } ]

[[security_group]]
name = "sg-out"
# Nothing inbound: only replies to its own connections come in.
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[security_group]]
name = "sg-open"
ingress = [ { action = "accept", protocol = "all", source = "0.0.0.0/0" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[security_group]]
name = "sg-web"
ingress = [
  { action = "accept", protocol = "tcp",  port = "80,5001,5002", source = "10.3.0.0/16" },
  { action = "accept", protocol = "icmp", source = "10.3.0.0/16" },
]
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "pol-fa"
host = "host-a"
subnet = "front"
ip = "10.3.1.10"
security_groups = ["sg-out"]
netns = "e2p-fa"

[[instance]]
name = "pol-fb"
host = "host-b"
subnet = "front"
ip = "10.3.1.20"
security_groups = ["sg-open"]
netns = "e2p-fb"

[[instance]]
name = "pol-ba"
host = "host-b"
subnet = "back"
ip = "10.3.2.20"
security_groups = ["sg-web"]
netns = "e2p-ba"

[[instance]]
name = "pol-ap"
host = "host-b"
subnet = "edge"
ip = "10.3.3.30"
security_groups = ["sg-open"]
netns = "e2p-ap"

[[expect]]
from = "pol-fa"
to = "pol-ba"
protocol = "tcp"
port = 80
reach = true

[[expect]]
from = "pol-fa"
to = "pol-ba"
protocol = "tcp"
port = 8080
reach = false

[[expect]]
from = "pol-fa"
to = "pol-ba"
protocol = "tcp"
port = 5001
reach = false

[[expect]]
from = "pol-fa"
to = "pol-ba"
protocol = "tcp"
port = 5002
reach = false

[[expect]]
from = "pol-fa"
to = "pol-fb"
protocol = "tcp"
port = 80
reach = true

[[expect]]
from = "pol-fb"
to = "pol-fa"
protocol = "tcp"
port = 80
reach = false
"#;

#[test]
fn policy_drops_stateful_replies_and_routes() {
    let test = "policy_drops_stateful_replies_and_routes";
    if !can_run(test, &[Tool::Ip, Tool::Ping, Tool::Tshark]) {
        return;
    }
    let lab = LabUp::start("e2e_pol", &(underlay("gre", false) + POLICY));
    let [fa, fb, ba, ap] = ["pol-fa", "pol-fb", "pol-ba", "pol-ap"].map(|i| lab.ns(i));
    let [fa_ip, fb_ip, ba_ip] = ["pol-fa", "pol-fb", "pol-ba"].map(|i| lab.ip(i));

    // The control: what no rule forbids gets through.
    let (ok, seen) = tcp_reaches(&fa, &ba, ba_ip, 80);
    assert!(
        ok && seen.len() == 1,
        "pol-fa -> pol-ba tcp:80 must reach: {seen:?}"
    );

    // Each blocked probe: nobody hears it, and the expected host counts the expected reason
    // (with the deciding rule), and nothing else decided it.
    let blocked = |src: &str,
                   dst: &str,
                   dst_ip: Ipv4Addr,
                   port: u16,
                   host: &str,
                   reason: &str,
                   rule: &str| {
        let before = lab.stats();
        let (ok, seen) = tcp_reaches(src, dst, dst_ip, port);
        let after = lab.stats();
        assert!(
            !ok && seen.is_empty(),
            "{src} -> {dst_ip}:{port} must be blocked ({reason}), the listener saw {seen:?}"
        );
        assert!(
            after.dropped(&before, host, reason) >= 1,
            "{src} -> {dst_ip}:{port}: no {reason} on {host}: {}",
            after.diff(&before)
        );
        assert!(
            after.grew(&before, host, &format!("rule.{reason}.{rule}")) >= 1,
            "{src} -> {dst_ip}:{port}: rule {rule} not counted on {host}: {}",
            after.diff(&before)
        );
        after.diff(&before)
    };

    // Security group: sg-web admits 80, 5001, 5002 only.
    blocked(
        &fa,
        &ba,
        ba_ip,
        8080,
        "host-b",
        "SgIngress",
        "[sg-web]:ingress#no-match",
    );

    // The source subnet's ACL, egress, on the source's host; the destination never sees it.
    let before = lab.stats();
    blocked(
        &fa,
        &ba,
        ba_ip,
        5001,
        "host-a",
        "AclEgress",
        "acl-front:egress#1",
    );
    let after = lab.stats();
    assert_eq!(after.dropped(&before, "host-b", "AclIngress"), 0);
    assert_eq!(
        after.grew(&before, "host-a", "encapsulated"),
        0,
        "{}",
        after.diff(&before)
    );

    // The destination subnet's ACL, ingress, on the destination's host.
    let before = lab.stats();
    blocked(
        &fa,
        &ba,
        ba_ip,
        5002,
        "host-b",
        "AclIngress",
        "acl-back:ingress#1",
    );
    let after = lab.stats();
    assert_eq!(after.dropped(&before, "host-a", "AclEgress"), 0);

    // Stateful: sg-out admits nothing inbound, yet pol-fa's own connection gets its replies...
    let (ok, seen) = tcp_reaches(&fa, &fb, fb_ip, 80);
    assert!(
        ok && seen.len() == 1,
        "pol-fa -> pol-fb tcp:80 (replies through sg-out): {seen:?}"
    );
    let before = lab.stats();
    assert_eq!(
        ping(&fa, fb_ip, 2),
        2,
        "pol-fa pings pol-fb: the echo replies come back"
    );
    let after = lab.stats();
    assert_eq!(
        after.dropped(&before, "host-a", "SgIngress"),
        0,
        "{}",
        after.diff(&before)
    );
    // ...and pol-fb cannot open anything towards pol-fa.
    blocked(
        &fb,
        &fa,
        fa_ip,
        80,
        "host-a",
        "SgIngress",
        "[sg-out]:ingress#no-match",
    );
    let before = lab.stats();
    assert_eq!(ping(&fb, fa_ip, 2), 0, "pol-fb must not ping pol-fa");
    let after = lab.stats();
    assert!(
        after.dropped(&before, "host-a", "SgIngress") >= 2,
        "{}",
        after.diff(&before)
    );

    // A route to drop.
    let before = lab.stats();
    assert_eq!(ping(&fa, Ipv4Addr::new(198, 51, 100, 7), 2), 0);
    let after = lab.stats();
    assert!(
        after.dropped(&before, "host-a", "RouteDrop") >= 2,
        "RouteDrop on host-a: {}",
        after.diff(&before)
    );
    assert_eq!(after.grew(&before, "host-a", "encapsulated"), 0);

    // An appliance next hop: 0.0.0.0/0 -> instance:pol-ap on the other host, which sees the
    // packet as it left pol-fa.
    let cap = Capture::start(&ap, "pol-ap", "icmp", "pol-ap", 20);
    let before = lab.stats();
    let _ = ping(&fa, Ipv4Addr::new(203, 0, 113, 9), 2);
    let after = lab.stats();
    let file = cap.stop();
    let rows = tshark_fields(&file, &[], &["ip.src", "ip.dst", "icmp.type"]);
    let _ = std::fs::remove_file(&file);
    let hits = rows
        .iter()
        .filter(|r| r == &&["10.3.1.10", "203.0.113.9", "8"])
        .count();
    assert!(
        hits >= 2,
        "pol-ap should have seen pol-fa's echo requests to 203.0.113.9, it saw {rows:?}"
    );
    assert!(
        after.grew(&before, "host-b", "instance.pol-ap.received") >= 2,
        "{}",
        after.diff(&before)
    );

    // The lab's check agrees, naming the stage and rule from each probe's trace, which agrees
    // with what every probe observed.
    let mut out = Vec::new();
    let report = vpcd::lab::check(&lab.lab, &mut out).expect("lab check");
    let text = String::from_utf8_lossy(&out);
    eprintln!("{text}");
    assert_eq!(report.failures(), 0, "lab check:\n{text}");
    assert!(!text.contains("TRACE DIFFERS"), "lab check:\n{text}");
    let why: Vec<String> = report.rows.iter().map(|r| r.why.clone()).collect();
    for (row, reason) in [
        (
            1,
            "dropped at security-group by [sg-web]:ingress#no-match on host-b (SgIngress",
        ),
        (
            2,
            "dropped at acl by acl-front:egress#1 on host-a (AclEgress",
        ),
        (
            3,
            "dropped at acl by acl-back:ingress#1 on host-b (AclIngress",
        ),
        (
            5,
            "dropped at security-group by [sg-out]:ingress#no-match on host-a (SgIngress",
        ),
    ] {
        assert!(
            why[row].contains(reason),
            "row {row}: why {:?}, want {reason}",
            why[row]
        );
    }
}

// ----------------------------------------------------------------------------------------------
// 4. anti-spoofing: an instance that forges its source reaches no one

#[test]
fn forged_source_addresses_reach_no_one() {
    let test = "forged_source_addresses_reach_no_one";
    if !can_run(test, &[Tool::Ip, Tool::Ping, Tool::Scapy]) {
        return;
    }
    let mut toml = pair("sp", "gre", false, 4, 4004);
    toml.push_str(
        r#"
[[instance]]
name = "spc"
host = "host-b"
subnet = "net-sp"
ip = "10.4.1.30"
security_groups = ["sg-sp"]
netns = "e2-spc"
"#,
    );
    let lab = LabUp::start("e2e_spf", &toml);
    let [sa, sb, sc] = ["spa", "spb", "spc"].map(|i| lab.ns(i));
    let b_ip = lab.ip("spb");
    let lb = Listener::udp(&sb, "spb", 7000);
    let lc = Listener::udp(&sc, "spc", 7000);

    // The control: from its own address, spa reaches spb.
    assert_eq!(
        udp_ask(&sa, None, b_ip, 7000, "honest"),
        Some("spb honest".to_string())
    );
    thread::sleep(Duration::from_millis(100));
    let before = lab.stats();

    // scapy in spa's namespace: claim to be the neighbour spc, then someone outside the VPC.
    python_in(
        &sa,
        &[
            "-c",
            "from scapy.all import IP, UDP, Raw, send\n\
             for src in ('10.4.1.30', '172.16.0.1'):\n\
             \x20   send(IP(src=src, dst='10.4.1.20')/UDP(sport=40000, dport=7000)/Raw(b'forged ' + src.encode()), count=3, verbose=False)\n",
        ],
    );
    // The kernel's own path: a second address on spa's device, used as a source.
    ip(&["-n", &sa, "addr", "add", "10.4.1.99/32", "dev", "spa"]);
    assert_eq!(
        udp_ask(
            &sa,
            Some(Ipv4Addr::new(10, 4, 1, 99)),
            b_ip,
            7000,
            "second-address"
        ),
        None
    );
    assert_eq!(ping_with(&sa, b_ip, 2, &["-I", "10.4.1.99"]), 0);
    thread::sleep(Duration::from_millis(200));
    let after = lab.stats();

    let spoofed = after.dropped(&before, "host-a", "SourceSpoofed");
    assert!(
        spoofed >= 3 + 3 + 1 + 2,
        "SourceSpoofed on host-a: {spoofed}; {}",
        after.diff(&before)
    );
    assert!(after.grew(&before, "host-a", "instance.spa.sent_dropped") >= 9);
    assert_eq!(
        after.grew(&before, "host-a", "encapsulated"),
        0,
        "{}",
        after.diff(&before)
    );
    assert_eq!(
        after.grew(&before, "host-b", "delivered"),
        0,
        "{}",
        after.diff(&before)
    );
    let seen_b: Vec<String> = lb.finish().into_iter().map(|s| s.data).collect();
    let seen_c = lc.finish();
    assert_eq!(
        seen_b,
        vec!["honest".to_string()],
        "spb heard forged packets"
    );
    assert!(seen_c.is_empty(), "spc heard something: {seen_c:?}");
}

// ----------------------------------------------------------------------------------------------
// 5. the underlay refuses hostile GRE: unknown sender, unknown key, truncated, version 1...

fn underlay_refuses(test: &str, lab_name: &str, tag: &str, transport: &str, n: u8) {
    if !can_run(test, &[Tool::Ip, Tool::Scapy]) {
        return;
    }
    let key = 5000 + u32::from(n);
    let lab = LabUp::start(lab_name, &pair(tag, transport, false, n, key));
    let b = format!("{tag}b");
    let (a_ip, b_ip) = (lab.ip(&format!("{tag}a")), lab.ip(&b));
    let atk = attacker(&lab, "192.0.2.99");
    let mac = mac_of(&lab.lab.host_ns("host-b"), "ul0");
    let listener = Listener::udp(&lab.ns(&b), &b, 7000);
    let script = script("gre_attack.py");
    let send = |count: &str, cases: &[String]| {
        let mut args = vec![
            script.to_str().unwrap(),
            "atk0",
            &mac,
            "192.0.2.2",
            transport,
            count,
        ];
        args.extend(cases.iter().map(String::as_str));
        python_in(&atk, &args);
    };

    // (case, outer source, key, inner source) -> the reason host-b must count.
    let attacks = [
        ("valid", "192.0.2.99", key, a_ip, "UnknownUnderlaySource"),
        ("valid", "192.0.2.1", 424_242, a_ip, "GreUnknownKey"),
        ("truncated", "192.0.2.1", key, a_ip, "GreTruncated"),
        ("badversion", "192.0.2.1", key, a_ip, "GreBadVersion"),
        ("nokey", "192.0.2.1", key, a_ip, "GreNoKey"),
        // A real host's address and the right key, but an inner source that is no instance
        // of that host.
        (
            "valid",
            "192.0.2.1",
            key,
            Ipv4Addr::new(10, n, 1, 77),
            "InnerSourceNotOnSender",
        ),
    ];
    let cases: Vec<String> = attacks
        .iter()
        .map(|(case, src, k, inner, _)| format!("{case}:{src}:{k}:{inner}:{b_ip}"))
        .collect();
    let before = lab.stats();
    send("3", &cases);
    thread::sleep(Duration::from_millis(300));
    let after = lab.stats();
    for (case, src, k, _, reason) in &attacks {
        assert_eq!(
            after.dropped(&before, "host-b", reason),
            3,
            "{transport} {case} from {src} key {k}: host-b should count 3 {reason}; {}",
            after.diff(&before)
        );
    }
    assert_eq!(
        after.grew(&before, "host-b", "delivered"),
        0,
        "{}",
        after.diff(&before)
    );
    assert_eq!(
        after.grew(&before, "host-b", &format!("instance.{b}.received")),
        0
    );
    let seen: Vec<_> = listener.finish();
    assert!(seen.is_empty(), "hostile GRE reached {b}: {seen:?}");

    // The control, proving the path and the listener: the same packet from a known host with
    // the right key and a real inner source is delivered (GRE authenticates nothing: the
    // underlay must be a trusted network).
    let listener = Listener::udp(&lab.ns(&b), &b, 7000);
    let before = lab.stats();
    send("1", &[format!("valid:192.0.2.1:{key}:{a_ip}:{b_ip}")]);
    thread::sleep(Duration::from_millis(300));
    let after = lab.stats();
    let seen: Vec<String> = listener.finish().into_iter().map(|s| s.data).collect();
    assert_eq!(
        seen,
        vec!["e2e valid".to_string()],
        "{}",
        after.diff(&before)
    );
    eprintln!("{transport} control: {}", after.diff(&before));
    // At least 1: the listener's answer to the forged inner source may bring back an ICMP
    // port unreachable from the real instance, which is delivered too.
    assert!(
        after.grew(&before, "host-b", &format!("instance.{b}.received")) >= 1,
        "{}",
        after.diff(&before)
    );
}

#[test]
fn underlay_refuses_hostile_gre() {
    underlay_refuses("underlay_refuses_hostile_gre", "e2e_ulg", "ug", "gre", 51);
}

#[test]
fn underlay_refuses_hostile_gre_in_udp() {
    underlay_refuses(
        "underlay_refuses_hostile_gre_in_udp",
        "e2e_ulu",
        "uu",
        "gre-udp",
        52,
    );
}

// ----------------------------------------------------------------------------------------------
// 6. tshark decodes what vpcd puts on the wire

/// Pings a -> b three times while capturing on the underlay bridge; returns the GRE packets
/// decoded by tshark as (outer+inner ip.src, outer+inner ip.dst, gre.key, icmp.type,
/// udp.srcport, udp.dstport, gre.flags.checksum, gre.checksum.status).
fn wire(lab: &LabUp, tag: &str, transport: &str) -> Vec<Vec<String>> {
    let filter = if transport == "gre" {
        "ip proto 47"
    } else {
        "udp port 4754"
    };
    let cap = Capture::start(&lab.lab.underlay_ns(), "br0", filter, tag, 20);
    let b_ip = lab.ip(&format!("{tag}b"));
    assert_eq!(ping(&lab.ns(&format!("{tag}a")), b_ip, 3), 3);
    let file = cap.stop();
    let rows = tshark_fields(
        &file,
        &["-d", "udp.port==4754,gre", "-Y", "gre && icmp"],
        &[
            "ip.src",
            "ip.dst",
            "gre.key",
            "icmp.type",
            "udp.srcport",
            "udp.dstport",
            "gre.flags.checksum",
            "gre.checksum.status",
        ],
    );
    let _ = std::fs::remove_file(&file);
    eprintln!("{tag} on the wire:");
    for r in &rows {
        eprintln!("  {}", r.join(" | "));
    }
    rows
}

fn tshark_decodes(test: &str, lab_name: &str, tag: &str, transport: &str, checksum: bool, n: u8) {
    if !can_run(test, &[Tool::Ip, Tool::Ping, Tool::Tshark]) {
        return;
    }
    let key = 6000 + u32::from(n);
    let lab = LabUp::start(lab_name, &pair(tag, transport, checksum, n, key));
    let rows = wire(&lab, tag, transport);
    let (a, b) = (format!("10.{n}.1.10"), format!("10.{n}.1.20"));
    let key_hex = format!("0x{key:08x}");
    for (src, dst, inner_src, inner_dst, icmp) in [
        ("192.0.2.1", "192.0.2.2", &a, &b, "8"),
        ("192.0.2.2", "192.0.2.1", &b, &a, "0"),
    ] {
        let matching: Vec<&Vec<String>> = rows
            .iter()
            .filter(|r| {
                r[0] == format!("{src},{inner_src}")
                    && r[1] == format!("{dst},{inner_dst}")
                    && r[3] == icmp
            })
            .collect();
        assert_eq!(
            matching.len(),
            3,
            "{transport}: want 3 GRE packets {src}->{dst} carrying ICMP type {icmp} {inner_src}->{inner_dst}: {rows:?}"
        );
        for r in matching {
            assert_eq!(r[2], key_hex, "{transport}: GRE key of {r:?}");
            if transport == "gre" {
                assert!(
                    r[4].is_empty() && r[5].is_empty(),
                    "GRE should not be in UDP: {r:?}"
                );
            } else {
                assert_eq!(r[5], "4754", "GRE-in-UDP destination port: {r:?}");
            }
            let c = if checksum { "1" } else { "0" };
            assert_eq!(r[6], c, "{transport}: GRE checksum flag: {r:?}");
            if checksum {
                // Wireshark's checksum status: 1 is "Good".
                assert_eq!(r[7], "1", "{transport}: GRE checksum should verify: {r:?}");
            }
        }
    }
}

#[test]
fn tshark_decodes_gre() {
    tshark_decodes("tshark_decodes_gre", "e2e_shg", "wg", "gre", false, 61);
}

#[test]
fn tshark_decodes_gre_in_udp_with_checksums() {
    tshark_decodes(
        "tshark_decodes_gre_in_udp_with_checksums",
        "e2e_shu",
        "wu",
        "gre-udp",
        true,
        62,
    );
}

/// RFC 8086 §3.2.1 (and vpcd's own `wire::gre::udp_source_port`): the source port of
/// GRE-in-UDP is taken from the flow's hash, in the ephemeral range 49152-65535, so that the
/// underlay's ECMP spreads flows.
#[test]
fn gre_udp_source_port_is_in_rfc8086_range() {
    let test = "gre_udp_source_port_is_in_rfc8086_range";
    if !can_run(test, &[Tool::Ip, Tool::Ping, Tool::Tshark]) {
        return;
    }
    let lab = LabUp::start("e2e_spt", &pair("wp", "gre-udp", false, 63, 6063));
    let rows = wire(&lab, "wp", "gre-udp");
    assert!(rows.len() >= 6, "{rows:?}");
    for r in &rows {
        let port: u16 = r[4].parse().expect("udp.srcport");
        assert!(
            port >= 49152,
            "GRE-in-UDP source port {port} is outside 49152-65535 (RFC 8086 §3.2.1; vpcd's wire::gre::udp_source_port): {r:?}"
        );
    }
}

// ----------------------------------------------------------------------------------------------
// 7. one daemon per host and namespace; `lab down` after a killed daemon leaves nothing

#[test]
fn lab_down_after_a_killed_daemon_leaves_nothing() {
    let test = "lab_down_after_a_killed_daemon_leaves_nothing";
    if !can_run(test, &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let name = "e2e_kil";
    let lab = LabUp::start(name, &pair("kl", "gre", false, 7, 7007));
    let dir = lab.lab.dir();
    let host_ns = lab.lab.host_ns("host-a");
    let instance_ns = [lab.ns("kla"), lab.ns("klb")];
    assert_eq!(ping(&instance_ns[0], lab.ip("klb"), 1), 1);

    // A second daemon for host-a in host-a's namespace refuses to start, both ways of
    // entering the namespace.
    let topo = lab.lab.topology_path();
    let stats = dir.join("second.stats");
    let (topo, stats) = (topo.to_str().unwrap(), stats.to_str().unwrap());
    let vpcd_run = [
        "run",
        "--topology",
        topo,
        "--host",
        "host-a",
        "--stats",
        stats,
    ];
    let mut via_ip = vec!["ip", "netns", "exec", host_ns.as_str(), VPCD];
    via_ip.extend_from_slice(&vpcd_run);
    let mut via_flag = vec![VPCD, "run", "--netns", host_ns.as_str()];
    via_flag.extend_from_slice(&vpcd_run[1..]);
    for cmd in [via_ip, via_flag] {
        let mut child = std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("second vpcd run");
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if child.try_wait().unwrap().is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "a second `vpcd run` for host-a kept running: {}",
                cmd.join(" ")
            );
        }
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "a second `vpcd run` succeeded: {}",
            cmd.join(" ")
        );
        assert!(
            err.contains("already running"),
            "a second `vpcd run` should say another is already running; it said: {err}"
        );
    }
    // The first one still forwards.
    assert_eq!(ping(&instance_ns[0], lab.ip("klb"), 1), 1);

    // SIGKILL host-a's daemon: no clean-up of its own.
    let pid = lab.lab.daemon_pid("host-a").expect("host-a's pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    let deadline = Instant::now() + Duration::from_secs(5);
    let alive = |p: u32| {
        std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    };
    while alive(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(pid), "vpcd {pid} survived SIGKILL");
    let ours = |n: &String| n.starts_with(&format!("vpcd-{name}-")) || instance_ns.contains(n);
    let present: Vec<String> = netns_list().into_iter().filter(ours).collect();
    assert_eq!(present.len(), 5, "before down: {present:?}");

    lab_down(name);
    let left: Vec<String> = netns_list().into_iter().filter(ours).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    for ns in &instance_ns {
        assert!(!vpcd::io::netns::exists(ns), "{ns} left behind");
    }
    let procs = processes_mentioning(&format!("{}/", dir.display()));
    assert!(procs.is_empty(), "processes left behind: {procs:?}");
    assert!(!dir.exists(), "{} left behind", dir.display());
    // Devices lived in the namespaces; none leaked into this one.
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    for dev in ["kla", "klb"] {
        assert!(
            !links.lines().any(|l| l
                .split(':')
                .nth(1)
                .is_some_and(|n| n.trim().split('@').next() == Some(dev))),
            "device {dev} in the root namespace"
        );
    }
    // And down stays idempotent.
    lab_down(name);
}

// ----------------------------------------------------------------------------------------------
// 8. what conntrack and the fragment table must relate, whatever worker a packet lands on

/// An ICMP error belongs to the connection it quotes: a port unreachable answering a UDP
/// flow must come back to the flow's sender. Several flows, so that they spread over the
/// daemons' workers.
#[test]
fn icmp_errors_of_tracked_flows_come_back() {
    let test = "icmp_errors_of_tracked_flows_come_back";
    if !can_run(test, &[Tool::Ip]) {
        return;
    }
    let lab = LabUp::start("e2e_ice", &pair("ie", "gre", false, 8, 8008));
    // One ICMP error per flow, without the kernel's rate limit getting in the way.
    // (/proc/sys/net is the namespace's of the thread that opens it.)
    no_icmp_ratelimit(&lab.ns("ieb"));
    let flows = 16;
    let before = lab.stats();
    // UDP flows from iea to a closed port of ieb, each from its own source port: each sees the
    // ICMP port unreachable that ieb's kernel answers (ECONNREFUSED).
    let refused = udp_refused_to(
        &lab.ns("iea"),
        lab.ip("ieb"),
        9,
        flows,
        Duration::from_millis(1000),
    );
    let after = lab.stats();
    assert_eq!(
        refused,
        flows,
        "{} of {flows} UDP flows got their ICMP port unreachable back; IcmpErrorUnrelated: host-a {}, host-b {}; {}",
        refused,
        after.dropped(&before, "host-a", "IcmpErrorUnrelated"),
        after.dropped(&before, "host-b", "IcmpErrorUnrelated"),
        after.diff(&before)
    );
}

/// Later fragments follow their first fragment: UDP datagrams larger than the instance MTU
/// (fragmented by the sender's kernel) arrive whole. Several datagrams from different source
/// ports, so that they spread over the daemons' workers.
#[test]
fn fragmented_datagrams_arrive_whole() {
    let test = "fragmented_datagrams_arrive_whole";
    if !can_run(test, &[Tool::Ip]) {
        return;
    }
    let lab = LabUp::start("e2e_frg", &pair("fg", "gre", false, 9, 9009));
    let (a_ns, b_ns, b_ip) = (lab.ns("fga"), lab.ns("fgb"), lab.ip("fgb"));
    let datagrams = 16usize;
    let size = 3000;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = thread::spawn(move || {
        let _g = vpcd::io::netns::NetnsGuard::enter(&b_ns).unwrap();
        let u = std::net::UdpSocket::bind(("0.0.0.0", 7000)).unwrap();
        u.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        ready_tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while got.len() < datagrams && Instant::now() < deadline {
            if let Ok(n) = u.recv(&mut buf) {
                got.push(buf[..n].to_vec());
            }
        }
        got
    });
    ready_rx.recv().unwrap();
    let before = lab.stats();
    in_ns(&a_ns, move || {
        for i in 0..datagrams {
            let u = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
            u.send_to(&pattern(size, i as u64 + 1), (b_ip, 7000))
                .unwrap();
        }
    });
    let mut got = receiver.join().unwrap();
    let after = lab.stats();
    got.sort();
    let mut want: Vec<Vec<u8>> = (0..datagrams)
        .map(|i| pattern(size, i as u64 + 1))
        .collect();
    want.sort();
    assert!(
        got == want,
        "{} of {datagrams} fragmented datagrams of {size} bytes arrived whole; FragmentWithoutFirst: host-a {}, host-b {}; {}",
        got.iter().filter(|g| want.contains(g)).count(),
        after.dropped(&before, "host-a", "FragmentWithoutFirst"),
        after.dropped(&before, "host-b", "FragmentWithoutFirst"),
        after.diff(&before)
    );
}

// ----------------------------------------------------------------------------------------------
// 9. instances speak IPv4 only

/// vpcd disables IPv6 on the instances' devices so that they send none (router
/// solicitations, MLD) that would only be counted as drops: no instance should have sent any,
/// even while its device was coming up.
#[test]
fn instances_send_no_ipv6() {
    let test = "instances_send_no_ipv6";
    if !can_run(test, &[Tool::Ip]) {
        return;
    }
    let mut toml = pair("v6", "gre", false, 10, 1010);
    for (i, host) in ["host-a", "host-b", "host-a", "host-b"].iter().enumerate() {
        toml.push_str(&format!(
            r#"
[[instance]]
name = "v6{i}"
host = "{host}"
subnet = "net-v6"
ip = "10.10.1.{}"
security_groups = ["sg-v6"]
netns = "e2-v6{i}"
"#,
            30 + i
        ));
    }
    let lab = LabUp::start("e2e_ip6", &toml);
    // Link-up chatter (MLD reports, router solicitations) goes out within a second or two.
    thread::sleep(Duration::from_secs(3));
    let stats = lab.stats();
    let senders: Vec<String> = stats
        .0
        .iter()
        .flat_map(|(h, m)| {
            m.iter()
                .filter(|(k, v)| k.ends_with(".sent_dropped") && **v > 0)
                .map(move |(k, v)| format!("{h}: {k} {v}"))
        })
        .collect();
    for host in ["host-a", "host-b"] {
        assert_eq!(
            stats.get(host, "drop.Ipv6Unsupported"),
            0,
            "{host} counted IPv6 packets from its instances: {senders:?}"
        );
    }
}

// ----------------------------------------------------------------------------------------------
// 10. packets the underlay reassembles beyond the instance MTU

/// Sends from an attacker plugged into the underlay, as host-a (the right key, an inner source
/// of host-a), GRE whose inner packet is 8000 bytes, in outer IPv4 fragments: host-b's kernel
/// reassembles them before its underlay socket sees them (a raw socket and a UDP socket both
/// get whole packets), so vpcd meets an inner packet no instance device could carry and must
/// drop it (`UnderlayTooBig`) rather than deliver it. The same packet small and unfragmented
/// is delivered (the path, the listener and the crafting work). tshark on host-b's underlay
/// device checks what was sent: the fragments, and, reassembled, the key and the inner packet.
fn underlay_refuses_oversize(test: &str, lab_name: &str, tag: &str, transport: &str, n: u8) {
    if !can_run(test, &[Tool::Ip, Tool::Scapy, Tool::Tshark]) {
        return;
    }
    let key = 5000 + u32::from(n);
    let lab = LabUp::start(lab_name, &pair(tag, transport, false, n, key));
    let b = format!("{tag}b");
    let (a_ip, b_ip) = (lab.ip(&format!("{tag}a")), lab.ip(&b));
    let atk = attacker(&lab, "192.0.2.99");
    let host_b = lab.lab.host_ns("host-b");
    let mac = mac_of(&host_b, "ul0");
    let script = script("gre_attack.py");
    let send = |count: &str, case: &str| {
        let spec = format!("{case}:192.0.2.1:{key}:{a_ip}:{b_ip}");
        python_in(
            &atk,
            &[
                script.to_str().unwrap(),
                "atk0",
                &mac,
                "192.0.2.2",
                transport,
                count,
                &spec,
            ],
        );
    };

    // The control: small and whole, it is delivered.
    let listener = Listener::udp(&lab.ns(&b), &b, 7000);
    let before = lab.stats();
    send("1", "valid");
    thread::sleep(Duration::from_millis(300));
    let after = lab.stats();
    let seen: Vec<String> = listener.finish().into_iter().map(|s| s.data).collect();
    assert_eq!(
        seen,
        vec!["e2e valid".to_string()],
        "{transport}: the small control packet; {}",
        after.diff(&before)
    );
    // Its answer to the forged inner source (and the ICMP error that may come back) are done.
    thread::sleep(Duration::from_millis(300));

    // 8000 bytes inside, in outer fragments, three times.
    let packets = 3;
    let listener = Listener::udp(&lab.ns(&b), &b, 7000);
    let cap = Capture::start(
        &host_b,
        "ul0",
        "src host 192.0.2.1 and dst host 192.0.2.2",
        &format!("{tag}-oversize"),
        20,
    );
    let before = lab.stats();
    send(&packets.to_string(), "oversize");
    thread::sleep(Duration::from_millis(500));
    let after = lab.stats();
    let file = cap.stop();
    let seen = listener.finish();

    // What reached host-b: fragments of at most 1400 bytes of payload (6 per packet), the
    // last of each reassembled by tshark into GRE with the VPC's key around an inner IPv4
    // packet of 8000 bytes from a's address to b's UDP port 7000.
    let decode = ["-d", "udp.port==4754,gre"];
    let fragments = tshark_fields(
        &file,
        &[
            &decode[..],
            &["-Y", "ip.flags.mf == 1 || ip.frag_offset > 0"],
        ]
        .concat(),
        &["ip.id", "ip.len"],
    );
    let reassembled = tshark_fields(
        &file,
        &[&decode[..], &["-Y", "gre && ip.reassembled.length"]].concat(),
        &[
            "ip.id",
            "ip.fragment.count",
            "gre.key",
            "ip.src",
            "ip.dst",
            "ip.len",
            "udp.dstport",
        ],
    );
    let _ = std::fs::remove_file(&file);
    eprintln!("{transport}: {} fragments; reassembled:", fragments.len());
    for r in &reassembled {
        eprintln!("  {}", r.join(" | "));
    }
    assert_eq!(
        fragments.len(),
        6 * packets,
        "{transport}: outer fragments on host-b's ul0: {fragments:?}"
    );
    for f in &fragments {
        let len: usize = f[1].split(',').next().unwrap().parse().unwrap();
        assert!(
            len <= 20 + 1400,
            "{transport}: fragment of {len} bytes: {f:?}"
        );
    }
    assert_eq!(reassembled.len(), packets, "{transport}: {reassembled:?}");
    let inner_port = if transport == "gre" {
        "7000"
    } else {
        "4754,7000"
    };
    for r in &reassembled {
        assert_eq!(r[1], "6", "{transport}: fragments of {r:?}");
        assert_eq!(
            r[2],
            format!("0x{key:08x}"),
            "{transport}: GRE key of {r:?}"
        );
        assert_eq!(
            r[3],
            format!("192.0.2.1,{a_ip}"),
            "{transport}: sources {r:?}"
        );
        assert_eq!(
            r[4],
            format!("192.0.2.2,{b_ip}"),
            "{transport}: destinations {r:?}"
        );
        assert!(
            r[5].ends_with(",8000"),
            "{transport}: the inner packet of {r:?} should be 8000 bytes"
        );
        assert_eq!(r[6], inner_port, "{transport}: UDP ports of {r:?}");
    }

    // What vpcd made of it: nothing delivered, the drop counted.
    let seen: Vec<(std::net::SocketAddr, usize)> =
        seen.into_iter().map(|s| (s.from, s.data.len())).collect();
    assert!(
        seen.is_empty(),
        "{transport}: 8000-byte inner packets reached {b}'s listener: {seen:?}; {}",
        after.diff(&before)
    );
    assert_eq!(
        after.grew(&before, "host-b", &format!("instance.{b}.received")),
        0,
        "{transport}: {}",
        after.diff(&before)
    );
    let too_big = after.dropped(&before, "host-b", "UnderlayTooBig");
    assert!(
        too_big >= 1,
        "{transport}: host-b should count UnderlayTooBig (the decapsulated packet is larger than the instance MTU); {}",
        after.diff(&before)
    );
}

#[test]
fn gre_reassembled_beyond_the_instance_mtu_is_dropped() {
    underlay_refuses_oversize(
        "gre_reassembled_beyond_the_instance_mtu_is_dropped",
        "e2e_ovg",
        "og",
        "gre",
        53,
    );
}

#[test]
fn gre_in_udp_reassembled_beyond_the_instance_mtu_is_dropped() {
    underlay_refuses_oversize(
        "gre_in_udp_reassembled_beyond_the_instance_mtu_is_dropped",
        "e2e_ovu",
        "ou",
        "gre-udp",
        54,
    );
}

// ----------------------------------------------------------------------------------------------
// 11. a daemon keeps nothing open of whoever started it

/// `vpcd run` closes every descriptor it inherited beyond stdin, stdout and stderr. host-a's
/// daemon is restarted from a shell that holds a file open without close-on-exec on
/// descriptors 7 (writing) and 9 (reading), as a careless supervisor or a shell script would:
/// no descriptor of the daemon may lead to that file, and the daemon still forwards.
#[test]
fn daemons_close_the_descriptors_they_inherit() {
    let test = "daemons_close_the_descriptors_they_inherit";
    if !can_run(test, &[Tool::Ip, Tool::Ping]) {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    use std::process::{Command, Stdio};
    let lab = LabUp::start("e2e_fds", &pair("fd", "gre", false, 15, 1515));
    let (a_ns, b_ip) = (lab.ns("fda"), lab.ip("fdb"));
    let dir = lab.lab.dir();
    let marker = dir.join("inherited");
    std::fs::write(&marker, "").unwrap();
    let id = |m: std::fs::Metadata| (m.dev(), m.ino());
    let marker_id = id(std::fs::metadata(&marker).unwrap());
    // `bash -c 'exec 7>>FILE 9<FILE; exec CMD...'`: CMD starts with both open.
    let shell = |cmd: &[&str]| {
        let mut c = Command::new("bash");
        c.args(["-c", r#"exec 7>>"$1" 9<"$1"; shift; exec "$@""#, "bash"])
            .arg(&marker)
            .args(cmd)
            .stdin(Stdio::null());
        c
    };
    // The mechanism: what the shell starts inherits them.
    let o = shell(&["readlink", "/proc/self/fd/7", "/proc/self/fd/9"])
        .output()
        .unwrap();
    let m = marker.display().to_string();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .collect::<Vec<_>>(),
        [m.as_str(), m.as_str()],
        "the shell should pass descriptors 7 and 9 on"
    );

    // Stop the lab's daemon of host-a; start another the shell's way.
    let old = lab.lab.daemon_pid("host-a").expect("host-a's pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while running(old) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(!running(old), "host-a's daemon {old} did not stop");
    let (topo, stats) = (lab.lab.topology_path(), dir.join("fd-host-a.stats"));
    let log = std::fs::File::create(dir.join("fd-host-a.log")).unwrap();
    // Its command line names the lab's directory: if the test fails, `lab down` stops it.
    let mut daemon = shell(&[
        VPCD,
        "run",
        "--netns",
        &lab.lab.host_ns("host-a"),
        "--topology",
        topo.to_str().unwrap(),
        "--host",
        "host-a",
        "--stats",
        stats.to_str().unwrap(),
        "--workers",
        "2",
    ])
    .stdout(log.try_clone().unwrap())
    .stderr(log)
    .spawn()
    .expect("bash -c ... vpcd run");
    let pid = daemon.id();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !stats.exists() && daemon.try_wait().unwrap().is_none() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let log_text = || std::fs::read_to_string(dir.join("fd-host-a.log")).unwrap_or_default();
    assert!(
        stats.exists(),
        "the restarted daemon did not start:\n{}",
        log_text()
    );

    // Every descriptor of the running daemon (a sub-process would be another pid): its
    // number, where its link points, and the (device, inode) of what it leads to.
    type Descriptor = (String, String, Option<(u64, u64)>);
    let fds: Vec<Descriptor> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            let to = std::fs::metadata(e.path()).ok().map(id);
            let fd = e.file_name().to_string_lossy().into_owned();
            (fd, target.display().to_string(), to)
        })
        .collect();
    let forwards = ping(&a_ns, b_ip, 3);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.try_wait().unwrap().is_none() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        daemon.try_wait().unwrap().is_some(),
        "the restarted daemon {pid} did not stop on SIGTERM"
    );

    let leaked: Vec<&Descriptor> = fds
        .iter()
        .filter(|(_, _, to)| *to == Some(marker_id))
        .collect();
    assert!(
        leaked.is_empty(),
        "the daemon kept descriptors it inherited: {leaked:?}; all of them: {fds:?}"
    );
    for std_fd in ["0", "1", "2"] {
        assert!(
            fds.iter().any(|(fd, _, _)| fd == std_fd),
            "the daemon closed its descriptor {std_fd}: {fds:?}"
        );
    }
    assert_eq!(
        forwards,
        3,
        "fda -> fdb through the restarted daemon; its log:\n{}",
        log_text()
    );
}
