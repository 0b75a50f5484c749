//! End-to-end tests of the cloud features, with real traffic in labs of network namespaces
//! (`vpcd lab up` with the real `vpcd` binary): the basic (classic) network, Elastic IPs and
//! the internet, VPC peering, the basic-network interconnect, moving an instance from the
//! basic network into a VPC while the daemons run (SIGHUP), reloads that renumber the
//! instances, and `vpcd lab check` from the internet.
//!
//! Every test builds its own small lab under a name of its own; every namespace it makes is
//! called `vpcd-LAB-...`, so `vpcd lab down` (run by a guard, also when the test fails) sweeps
//! them all. Whatever must not get through is proven twice: a listener that must see nothing,
//! and the drop reason counted in the hosts' statistics. They need root, iproute2, ping and
//! tshark; when something is missing they skip, recorded in target/tmp/vpcd-skips.txt (under
//! `VPCD_REQUIRE_E2E=1` they fail instead). Underlay addresses are in
//! 192.0.2.0/24, the internet is 203.0.113.0/24.

#[path = "e2e/common.rs"]
mod common;

/// Load balancers: their own tests, in this binary.
#[path = "e2e/balance.rs"]
mod balance;

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

// ----------------------------------------------------------------------------------------------
// Helpers of this file

/// What [`gre_on_wire`] reads of each GRE packet: (outer+inner ip.src, outer+inner ip.dst,
/// gre.flags.key, gre.key, icmp.type, gre.flags.checksum, gre.checksum.status).
const WIRE: &[&str] = &[
    "ip.src",
    "ip.dst",
    "gre.flags.key",
    "gre.key",
    "icmp.type",
    "gre.flags.checksum",
    "gre.checksum.status",
];

/// The longest pause a stream may take across reloads.
const STALL: Duration = Duration::from_millis(500);

/// `[underlay]` over `transport` (GRE checksums when `checksum`) and hosts `host-a`
/// (192.0.2.1), `host-b` (192.0.2.2), ... one per region given.
fn underlay_with(transport: &str, checksum: bool, regions: &[&str]) -> String {
    let mut s =
        format!("[underlay]\ntransport = \"{transport}\"\nmtu = 1500\nchecksum = {checksum}\n");
    for (n, r) in regions.iter().enumerate() {
        s.push_str(&format!(
            "\n[[host]]\nname = \"host-{}\"\naddress = \"192.0.2.{}\"\nregion = \"{r}\"\n",
            (b'a' + n as u8) as char,
            n + 1
        ));
    }
    s
}

/// [`underlay_with`] plain GRE.
fn underlay(regions: &[&str]) -> String {
    underlay_with("gre", false, regions)
}

/// Builds lab `name` from `toml`, in which `@NS` stands for `vpcd-NAME` (the prefix `lab
/// down` sweeps).
fn cloud_lab(name: &str, toml: &str) -> LabUp {
    LabUp::start(name, &toml.replace("@NS", &format!("vpcd-{name}")))
}

/// UDP listeners on `port` in every namespace of `targets` while `probe` runs; asserts that
/// none saw anything.
fn nothing_seen(targets: &[(&str, String)], port: u16, probe: impl FnOnce()) {
    let ls: Vec<(&str, Listener)> = targets
        .iter()
        .map(|(name, ns)| (*name, Listener::udp(ns, name, port)))
        .collect();
    probe();
    thread::sleep(Duration::from_millis(300));
    for (name, l) in ls {
        let seen = l.finish();
        assert!(seen.is_empty(), "{name} must see nothing, saw {seen:?}");
    }
}

/// Asserts that `reason` grew by at least 1 on `host` (and says what did move otherwise).
fn assert_dropped(after: &Stats, before: &Stats, host: &str, reason: &str, what: &str) {
    assert!(
        after.dropped(before, host, reason) > 0,
        "{what}: {reason} should be counted on {host}; what moved: {}",
        after.diff(before)
    );
}

/// A TCP transfer of `len` bytes from `src_ns` to `dst_ns` at `dst`, checked byte for byte.
fn transfer(src_ns: &str, dst_ns: &str, dst: Ipv4Addr, port: u16, len: usize, what: &str) {
    let data = Arc::new(pattern(len, u64::from(port)));
    let (got, echoed) = tcp_transfer(src_ns, dst_ns, dst, port, data.clone());
    let first_bad = got.iter().zip(data.iter()).position(|(x, y)| x != y);
    assert!(
        got.len() == data.len() && first_bad.is_none(),
        "{what}: received {} of {} bytes, first difference at {first_bad:?}",
        got.len(),
        data.len()
    );
    assert_eq!(echoed, Some(fnv(&data)), "{what}: the receiver's hash");
}

/// The GRE key of the channel named `name` (`peering:pcx-ab>vpc-b`, `internet:vpc-e>in`, ...:
/// docs/semantics.md 2.1).
fn key_of(lab: &LabUp, name: &str) -> u32 {
    let t = &lab.topo;
    t.channels()
        .find(|&(_, c)| t.channel_name(c) == name)
        .map(|(k, _)| k)
        .unwrap_or_else(|| panic!("no channel {name}"))
}

/// A TCP connection from `ns` to the closed `dst:port` is refused (a reset came back).
fn tcp_refused_to(ns: &str, dst: Ipv4Addr, port: u16) -> bool {
    in_ns(ns, move || {
        matches!(
            TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_millis(1500)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    })
}

/// The index and name of a device in a namespace (`ip -o link show dev DEV`).
fn link_of(ns: &str, dev: &str) -> (u32, String) {
    let o = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "dev", dev])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let mut parts = text.split(':');
    let index = parts.next().and_then(|i| i.trim().parse().ok());
    let name = parts.next().map(|n| n.trim().to_string());
    match (index, name) {
        (Some(i), Some(n)) => (i, n),
        _ => panic!("no device {dev} in {ns}: {text}"),
    }
}

// ----------------------------------------------------------------------------------------------
// 1. The basic network: one pool, tenants and regions apart, GRE without a key

const BASIC: &str = r#"
[basic]
cidr = "10.128.0.0/16"

[[security_group]]
name = "sg-basic"
ingress = [ { action = "accept", protocol = "all", source = "10.128.0.0/16" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "b1"
host = "host-a"
network = "basic"
tenant = "acme"
security_groups = ["sg-basic"]
netns = "@NS-b1"

[[instance]]
name = "b2"
host = "host-b"
network = "basic"
tenant = "acme"
security_groups = ["sg-basic"]
netns = "@NS-b2"

[[instance]]
name = "o2"
host = "host-b"
network = "basic"
tenant = "other"
security_groups = ["sg-basic"]
netns = "@NS-o2"

[[instance]]
name = "w3"
host = "host-c"
network = "basic"
tenant = "acme"
security_groups = ["sg-basic"]
netns = "@NS-w3"
"#;

#[test]
fn basic_network_isolates_tenants_and_regions() {
    basic_network(
        "basic_network_isolates_tenants_and_regions",
        "ec_basic",
        "gre",
        false,
    );
}

/// The same over GRE-in-UDP with GRE checksums: keyless headers of another length, cut with
/// UDP GSO, received in GRO trains.
#[test]
fn basic_network_over_gre_udp_with_checksums() {
    basic_network(
        "basic_network_over_gre_udp_with_checksums",
        "ec_basicu",
        "gre-udp",
        true,
    );
}

fn basic_network(test: &str, name: &str, transport: &str, checksum: bool) {
    if !can_run(test, &[Tool::Ip, Tool::Ping, Tool::Tshark]) {
        return;
    }
    let toml = underlay_with(transport, checksum, &["east", "east", "west"]) + BASIC;
    let lab = cloud_lab(name, &toml);
    let [b1, b2, o2, w3] = ["b1", "b2", "o2", "w3"].map(|i| lab.ns(i));
    let [b1_ip, b2_ip, o2_ip, w3_ip] = ["b1", "b2", "o2", "w3"].map(|i| lab.ip(i));
    // The provider allocated the addresses: in the pool, all different, and the devices
    // carry them with the pool's prefix.
    let pool: ipnet::Ipv4Net = "10.128.0.0/16".parse().unwrap();
    for (name, ns, a) in [
        ("b1", &b1, b1_ip),
        ("b2", &b2, b2_ip),
        ("o2", &o2, o2_ip),
        ("w3", &w3, w3_ip),
    ] {
        assert!(pool.contains(&a), "{name}: {a} outside the pool");
        assert_eq!(
            addrs_of(ns, name),
            vec![format!("{a}/16")],
            "{name}'s device"
        );
    }
    let mut all = vec![b1_ip, b2_ip, o2_ip, w3_ip];
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 4, "allocated addresses collide");
    eprintln!("{test}: b1 {b1_ip}, b2 {b2_ip}, o2 {o2_ip}, w3 {w3_ip}");
    // `vpcd check` shows the same allocation.
    let o = vpcd(&["check", lab.lab.topology_path().to_str().unwrap()]);
    let summary = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "vpcd check: {summary}");
    for (name, a) in [("b1", b1_ip), ("b2", b2_ip), ("o2", o2_ip), ("w3", w3_ip)] {
        assert!(
            summary.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() > 2 && w[0] == name && w[1] == a.to_string()
            }),
            "vpcd check should list {name} at {a}:\n{summary}"
        );
    }

    // Same tenant, same region, across hosts: ping both ways, TCP both ways; on the wire, GRE
    // without a key.
    let rows = gre_on_wire(&lab, name, WIRE, || {
        assert_eq!(ping(&b1, b2_ip, 3), 3, "b1 -> b2: ping");
    });
    for (dir, req) in [
        (("192.0.2.1", "192.0.2.2"), (b1_ip, b2_ip)),
        (("192.0.2.2", "192.0.2.1"), (b2_ip, b1_ip)),
    ] {
        let got = gre_rows(&rows, dir, req);
        assert!(got.len() >= 3, "GRE {dir:?} carrying {req:?}: {rows:?}");
        for r in got {
            assert!(
                r[2] == "0" || r[2] == "False",
                "basic-network GRE must have the key flag clear: {r:?}"
            );
            assert!(
                r[3].is_empty(),
                "basic-network GRE must carry no key: {r:?}"
            );
            if checksum {
                // Wireshark's checksum status: 1 is "Good".
                assert!(
                    r[5] == "1" && r[6] == "1",
                    "GRE checksum present and good: {r:?}"
                );
            }
        }
    }
    assert_eq!(ping(&b2, b1_ip, 3), 3, "b2 -> b1: ping");
    transfer(&b1, &b2, b2_ip, 7001, 1 << 20, "b1 -> b2 TCP");
    transfer(&b2, &b1, b1_ip, 7002, 1 << 20, "b2 -> b1 TCP");
    let seen = tcp_seen(&b2, &b1, b1_ip, 7003).expect("b2 -> b1: TCP");
    assert_eq!(seen.from.ip(), std::net::IpAddr::V4(b2_ip), "{seen:?}");

    // Another tenant, in the same pool: nothing gets through, either way, across hosts or on
    // the same host.
    let before = lab.quiet_stats();
    nothing_seen(&[("o2", o2.clone())], 7010, || {
        udp_fire(&b1, o2_ip, 7010, "b1-to-other-tenant", 3);
        udp_fire(&b2, o2_ip, 7010, "b2-to-other-tenant", 3);
    });
    nothing_seen(&[("b1", b1.clone()), ("b2", b2.clone())], 7011, || {
        udp_fire(&o2, b1_ip, 7011, "o2-to-acme", 3);
        udp_fire(&o2, b2_ip, 7011, "o2-to-acme", 3);
    });
    assert_eq!(ping(&b1, o2_ip, 1), 0, "b1 -> o2 (other tenant): ping");
    assert_eq!(tcp_ask(&b2, o2_ip, 7012, "x"), None, "b2 -> o2: TCP");
    let after = lab.stats();
    assert_dropped(&after, &before, "host-a", "BasicOtherTenant", "b1 -> o2");
    assert!(
        after.dropped(&before, "host-b", "BasicOtherTenant") >= 6,
        "b2 -> o2 and o2 -> b1, b2 (same host and across): {}",
        after.diff(&before)
    );
    for i in ["o2", "b1", "b2"] {
        assert_eq!(
            received(&after, &before, i),
            0,
            "{i} received something: {}",
            after.diff(&before)
        );
    }

    // The same tenant in another region: apart too.
    let before = lab.stats();
    nothing_seen(&[("w3", w3.clone())], 7020, || {
        udp_fire(&b1, w3_ip, 7020, "b1-to-west", 3);
    });
    nothing_seen(&[("b2", b2.clone())], 7021, || {
        udp_fire(&w3, b2_ip, 7021, "w3-to-east", 3);
    });
    assert_eq!(ping(&w3, b1_ip, 1), 0, "w3 -> b1 (other region): ping");
    let after = lab.stats();
    assert_dropped(&after, &before, "host-a", "BasicOtherRegion", "b1 -> w3");
    assert_dropped(
        &after,
        &before,
        "host-c",
        "BasicOtherRegion",
        "w3 -> b1, b2",
    );
    for i in ["w3", "b1", "b2"] {
        assert_eq!(
            received(&after, &before, i),
            0,
            "{i} received something: {}",
            after.diff(&before)
        );
    }
}

// ----------------------------------------------------------------------------------------------
// 2. Elastic IPs and the internet

const EIP: &str = r#"
[basic]
cidr = "10.128.0.0/16"

[internet]
cidr = "203.0.113.0/24"
gateway = "host-a"
netns = "@NS-inet"

[[vpc]]
name = "vpc-e"
tenant = "acme"
cidr = "10.20.0.0/16"
key = 4020

[[subnet]]
name = "net-e"
vpc = "vpc-e"
cidr = "10.20.1.0/24"

[[security_group]]
name = "sg-pub"
ingress = [ { action = "accept", protocol = "all", source = "0.0.0.0/0" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]   # on the gateway host
name = "ea"
host = "host-a"
subnet = "net-e"
ip = "10.20.1.10"
eip = "203.0.113.10"
security_groups = ["sg-pub"]
netns = "@NS-ea"

[[instance]]   # behind the gateway: relayed through the underlay
name = "eb"
host = "host-b"
subnet = "net-e"
ip = "10.20.1.20"
eip = "203.0.113.11"
security_groups = ["sg-pub"]
netns = "@NS-eb"

[[instance]]   # no Elastic IP: no way in, no way out
name = "en"
host = "host-b"
subnet = "net-e"
ip = "10.20.1.30"
security_groups = ["sg-pub"]
netns = "@NS-en"

[[instance]]   # a basic-network instance with an Elastic IP, behind the gateway
name = "bk"
host = "host-b"
network = "basic"
tenant = "acme"
eip = "203.0.113.20"
security_groups = ["sg-pub"]
netns = "@NS-bk"

[[instance]]   # and one on the gateway host
name = "bg"
host = "host-a"
network = "basic"
tenant = "acme"
eip = "203.0.113.21"
security_groups = ["sg-pub"]
netns = "@NS-bg"
"#;

fn v4(a: Ipv4Addr) -> std::net::IpAddr {
    std::net::IpAddr::V4(a)
}

#[test]
fn elastic_ips_translate_both_ways_and_nothing_else_gets_out() {
    elastic_ips(
        "elastic_ips_translate_both_ways_and_nothing_else_gets_out",
        "ec_eip",
        "gre",
        false,
    );
}

/// The same over GRE-in-UDP with checksums: the gateway relays GRO trains and UDP GSO
/// segments, translating each.
#[test]
fn elastic_ips_over_gre_udp_with_checksums() {
    elastic_ips(
        "elastic_ips_over_gre_udp_with_checksums",
        "ec_eipu",
        "gre-udp",
        true,
    );
}

fn elastic_ips(test: &str, name: &str, transport: &str, checksum: bool) {
    if !can_run(test, &[Tool::Ip, Tool::Ping, Tool::Tshark]) {
        return;
    }
    let lab = cloud_lab(
        name,
        &(underlay_with(transport, checksum, &["r", "r"]) + EIP),
    );
    let inet = lab.ns("internet");
    let [ea, eb, en, bk, bg] = ["ea", "eb", "en", "bk", "bg"].map(|i| lab.ns(i));
    let [ea_ip, eb_ip, en_ip, bk_ip, bg_ip] = ["ea", "eb", "en", "bk", "bg"].map(|i| lab.ip(i));
    let (ea_eip, eb_eip, bk_eip, bg_eip) = (
        Ipv4Addr::new(203, 0, 113, 10),
        Ipv4Addr::new(203, 0, 113, 11),
        Ipv4Addr::new(203, 0, 113, 20),
        Ipv4Addr::new(203, 0, 113, 21),
    );
    assert_eq!(
        addrs_of(&inet, "vpcd-internet"),
        vec!["203.0.113.1/24".to_string()],
        "the internet's device"
    );

    // Everything the internet's device carries while instances with Elastic IPs talk with
    // the internet, both ways: public addresses only.
    let cap = Capture::start(&inet, "vpcd-internet", "", &format!("{name}-inet"), 60);

    // In: the internet reaches each EIP; the instance sees the internet's real address and
    // its own private address.
    for (name, ns, eip, ip) in [("ea", &ea, ea_eip, ea_ip), ("eb", &eb, eb_eip, eb_ip)] {
        let seen = tcp_seen(&inet, ns, eip, 8080)
            .unwrap_or_else(|| panic!("internet -> {eip} ({name}): TCP"));
        assert_eq!(seen.from.ip(), v4(INTERNET), "{name} sees: {seen:?}");
        assert_eq!(seen.local.ip(), v4(ip), "{name} sees: {seen:?}");
        assert_eq!(ping(&inet, eip, 2), 2, "internet -> {eip} ({name}): ping");
    }
    transfer(
        &inet,
        &eb,
        eb_eip,
        8081,
        1 << 20,
        "internet -> eb's EIP, TCP",
    );
    // The gateway relays to eb through the underlay, translated, on vpc-e's channel from the
    // internet; eb's host sends the replies back to the gateway untranslated, on vpc-e's
    // channel to the internet.
    let rows = gre_on_wire(&lab, &format!("{name}-relay"), WIRE, || {
        assert_eq!(ping(&inet, eb_eip, 3), 3, "internet -> eb: ping");
    });
    for (dir, inner, channel) in [
        (
            ("192.0.2.1", "192.0.2.2"),
            (INTERNET, eb_ip),
            "internet:vpc-e>in",
        ),
        (
            ("192.0.2.2", "192.0.2.1"),
            (eb_ip, INTERNET),
            "internet:vpc-e>out",
        ),
    ] {
        let got = gre_rows(&rows, dir, inner);
        assert!(got.len() >= 3, "GRE {dir:?} carrying {inner:?}: {rows:?}");
        let key = key_of(&lab, channel);
        for r in got {
            assert_eq!(r[3], format!("0x{key:08x}"), "{channel}'s key: {r:?}");
            if checksum {
                assert!(r[5] == "1" && r[6] == "1", "GRE checksum: {r:?}");
            }
        }
    }
    assert!(
        !rows
            .iter()
            .any(|r| r.iter().any(|f| f.contains(&eb_eip.to_string()))),
        "eb's EIP never travels the underlay: {rows:?}"
    );

    // Out: each reaches the internet, which sees the EIP.
    for (name, ns, eip) in [("ea", &ea, ea_eip), ("eb", &eb, eb_eip)] {
        assert_eq!(ping(ns, INTERNET, 3), 3, "{name} -> internet: ping");
        let seen = tcp_seen(ns, &inet, INTERNET, 8090)
            .unwrap_or_else(|| panic!("{name} -> internet: TCP"));
        assert_eq!(
            seen.from.ip(),
            v4(eip),
            "the internet sees {name} as {seen:?}"
        );
        assert_eq!(seen.local.ip(), v4(INTERNET), "{seen:?}");
    }
    transfer(&eb, &inet, INTERNET, 8091, 1 << 20, "eb -> internet, TCP");
    transfer(&ea, &inet, INTERNET, 8092, 1 << 20, "ea -> internet, TCP");
    let file = cap.stop();
    let rows = tshark_fields(&file, &[], &["ip.src", "ip.dst"]);
    let _ = std::fs::remove_file(&file);
    assert!(rows.len() > 20, "the internet's device carried: {rows:?}");
    let public: ipnet::Ipv4Net = "203.0.113.0/24".parse().unwrap();
    for r in &rows {
        for a in r.iter().flat_map(|f| f.split(',')) {
            let a: Ipv4Addr = a.parse().unwrap_or_else(|_| panic!("not IPv4: {r:?}"));
            assert!(
                public.contains(&a),
                "a non-public address on the internet's side: {r:?}"
            );
        }
    }
    for eip in [ea_eip, eb_eip] {
        assert!(
            rows.iter().any(|r| r[0] == eip.to_string()),
            "no packet from {eip} on the internet's side"
        );
    }

    // Errors come back translated, quote included: a closed UDP port answers ICMP port
    // unreachable, a closed TCP port a reset, and the sender's socket matches them
    // (ECONNREFUSED), whichever side the error comes from.
    for ns in [&inet, &ea, &eb, &bk] {
        no_icmp_ratelimit(ns);
    }
    let before = lab.stats();
    let mut refusals = Vec::new();
    for (from, ns, to, dst) in [
        ("internet", &inet, "ea", ea_eip),
        ("internet", &inet, "eb", eb_eip),
        ("ea", &ea, "internet", INTERNET),
        ("eb", &eb, "internet", INTERNET),
        ("bk", &bk, "internet", INTERNET),
        ("bk", &bk, "ea", ea_eip),
        ("eb", &eb, "bk", bk_eip),
    ] {
        let udp = udp_refused_to(ns, dst, 9, 8, Duration::from_millis(500));
        let tcp = tcp_refused_to(ns, dst, 9);
        if udp != 8 || !tcp {
            refusals.push(format!(
                "{from} -> {to} ({dst}): {udp} of 8 UDP flows refused, TCP refused: {tcp}"
            ));
        }
    }
    let after = lab.stats();
    assert!(
        refusals.is_empty(),
        "errors lost on the way back:\n  {}\n{}",
        refusals.join("\n  "),
        after.diff(&before)
    );

    // An instance without an EIP: the internet cannot reach it (not at an unbound public
    // address, not at its private address), and it cannot reach the internet.
    ip(&[
        "-n",
        &inet,
        "route",
        "add",
        "10.0.0.0/8",
        "dev",
        "vpcd-internet",
    ]);
    let before = lab.stats();
    let everyone = [
        ("ea", ea.clone()),
        ("eb", eb.clone()),
        ("en", en.clone()),
        ("bk", bk.clone()),
    ];
    nothing_seen(&everyone, 8100, || {
        udp_fire(&inet, Ipv4Addr::new(203, 0, 113, 50), 8100, "to-nobody", 3);
        udp_fire(&inet, en_ip, 8100, "to-private", 3);
    });
    assert_eq!(
        tcp_ask(&inet, Ipv4Addr::new(203, 0, 113, 50), 8101, "x"),
        None,
        "internet -> an unbound public address: TCP"
    );
    let after = lab.stats();
    assert!(
        after.dropped(&before, "host-a", "NoSuchEip") >= 6,
        "internet -> 203.0.113.50 and 10.20.1.30: NoSuchEip on the gateway: {}",
        after.diff(&before)
    );
    for i in ["ea", "eb", "en", "bk"] {
        assert_eq!(received(&after, &before, i), 0, "{}", after.diff(&before));
    }
    let before = lab.stats();
    nothing_seen(&[("internet", inet.clone())], 8110, || {
        udp_fire(&en, INTERNET, 8110, "en-out", 3);
    });
    assert_eq!(ping(&en, INTERNET, 1), 0, "en (no EIP) -> internet: ping");
    let after = lab.stats();
    assert!(
        after.dropped(&before, "host-b", "NoRoute") >= 4,
        "en -> internet: NoRoute on host-b: {}",
        after.diff(&before)
    );
    assert_eq!(after.grew(&before, "host-a", "to_internet"), 0);

    // Hairpin: basic and VPC instances meet over their public addresses (through the
    // gateway: from behind it, on it, or both), each seeing the other's EIP and its own
    // private address; privately, they do not meet.
    let who = |n: &str| match n {
        "ea" => (ea.clone(), ea_ip, ea_eip),
        "eb" => (eb.clone(), eb_ip, eb_eip),
        "bk" => (bk.clone(), bk_ip, bk_eip),
        _ => (bg.clone(), bg_ip, bg_eip),
    };
    for (n, (from, to)) in [
        ("bk", "ea"),
        ("bk", "eb"),
        ("bg", "ea"),
        ("bg", "eb"),
        ("eb", "bk"),
        ("ea", "bg"),
        ("eb", "bg"),
        ("ea", "bk"),
    ]
    .into_iter()
    .enumerate()
    {
        let ((src_ns, _, src_eip), (dst_ns, dst_ip, dst_eip)) = (who(from), who(to));
        let seen = tcp_seen(&src_ns, &dst_ns, dst_eip, 8200 + n as u16)
            .unwrap_or_else(|| panic!("{from} -> {to}'s EIP {dst_eip}: TCP"));
        assert_eq!(seen.from.ip(), v4(src_eip), "{to} sees {from} as {seen:?}");
        assert_eq!(seen.local.ip(), v4(dst_ip), "{to} sees itself as {seen:?}");
    }
    transfer(&bk, &ea, ea_eip, 8220, 500_000, "bk -> ea's EIP, TCP");
    transfer(&eb, &bk, bk_eip, 8221, 500_000, "eb -> bk's EIP, TCP");
    transfer(&bg, &eb, eb_eip, 8222, 500_000, "bg -> eb's EIP, TCP");
    assert_eq!(ping(&bg, ea_eip, 2), 2, "bg -> ea's EIP: ping");
    let before = lab.stats();
    nothing_seen(&[("ea", ea.clone())], 8210, || {
        udp_fire(&bk, ea_ip, 8210, "bk-private", 3);
    });
    nothing_seen(&[("bk", bk.clone())], 8211, || {
        udp_fire(&eb, bk_ip, 8211, "eb-private", 3);
    });
    let after = lab.stats();
    assert!(
        after.dropped(&before, "host-b", "NoRoute") >= 6,
        "basic <-> VPC at private addresses: NoRoute: {}",
        after.diff(&before)
    );
}

// ----------------------------------------------------------------------------------------------
// 3. VPC peering: both ways with the destination's key, not transitive, return route needed

const PEERING: &str = r#"
[[vpc]]
name = "vpc-a"
tenant = "ta"
cidr = "10.30.0.0/16"
key = 3001

[[vpc]]
name = "vpc-b"
tenant = "tb"
cidr = "10.31.0.0/16"
key = 3002

[[vpc]]
name = "vpc-c"
tenant = "tc"
cidr = "10.32.0.0/16"
key = 3003

[[vpc]]
name = "vpc-d"
tenant = "td"
cidr = "10.33.0.0/16"
key = 3004

[[peering]]
name = "pcx-ab"
vpcs = ["vpc-a", "vpc-b"]

[[peering]]
name = "pcx-bc"
vpcs = ["vpc-b", "vpc-c"]

[[peering]]
name = "pcx-ad"
vpcs = ["vpc-a", "vpc-d"]

[[route_table]]
name = "rt-a"
vpc = "vpc-a"
routes = [
  { destination = "10.31.0.0/16", next_hop = "peering:pcx-ab" },
  { destination = "10.32.0.0/16", next_hop = "peering:pcx-ab" },   # C through B: no transit
  { destination = "10.33.0.0/16", next_hop = "peering:pcx-ad" },
]

[[route_table]]
name = "rt-b"
vpc = "vpc-b"
routes = [
  { destination = "10.30.0.0/16", next_hop = "peering:pcx-ab" },
  { destination = "10.32.0.0/16", next_hop = "peering:pcx-bc" },
]

[[route_table]]
name = "rt-c"
vpc = "vpc-c"
routes = [
  { destination = "10.31.0.0/16", next_hop = "peering:pcx-bc" },
  { destination = "10.30.0.0/16", next_hop = "peering:pcx-bc" },   # A through B: no transit
]

[[subnet]]
name = "net-a"
vpc = "vpc-a"
cidr = "10.30.1.0/24"
route_table = "rt-a"

[[subnet]]
name = "net-b"
vpc = "vpc-b"
cidr = "10.31.1.0/24"
route_table = "rt-b"

[[subnet]]
name = "net-c"
vpc = "vpc-c"
cidr = "10.32.1.0/24"
route_table = "rt-c"

[[subnet]]   # the VPC's default table: no route back to A
name = "net-d"
vpc = "vpc-d"
cidr = "10.33.1.0/24"

[[security_group]]
name = "sg-peer"
ingress = [ { action = "accept", protocol = "all", source = "10.0.0.0/8" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "a1"
host = "host-a"
subnet = "net-a"
ip = "10.30.1.10"
security_groups = ["sg-peer"]
netns = "@NS-a1"

[[instance]]
name = "b1"
host = "host-b"
subnet = "net-b"
ip = "10.31.1.10"
security_groups = ["sg-peer"]
netns = "@NS-b1"

[[instance]]
name = "c1"
host = "host-a"
subnet = "net-c"
ip = "10.32.1.10"
security_groups = ["sg-peer"]
netns = "@NS-c1"

[[instance]]
name = "d1"
host = "host-b"
subnet = "net-d"
ip = "10.33.1.10"
security_groups = ["sg-peer"]
netns = "@NS-d1"
"#;

#[test]
fn peering_carries_both_ways_but_is_not_transitive_and_needs_a_return_route() {
    let test = "peering_carries_both_ways_but_is_not_transitive_and_needs_a_return_route";
    if !can_run(test, &[Tool::Ip, Tool::Ping, Tool::Tshark]) {
        return;
    }
    let lab = cloud_lab("ec_peer", &(underlay(&["r", "r"]) + PEERING));
    let [a1, b1, c1, d1] = ["a1", "b1", "c1", "d1"].map(|i| lab.ns(i));
    let [a1_ip, b1_ip, c1_ip, d1_ip] = ["a1", "b1", "c1", "d1"].map(|i| lab.ip(i));

    // A <-> B, across tenants and hosts: on the wire, each packet carries the key of the
    // peering's channel into the VPC it goes to (neither VPC's own key).
    let rows = gre_on_wire(&lab, "ec_peer", WIRE, || {
        assert_eq!(ping(&a1, b1_ip, 3), 3, "a1 -> b1: ping over pcx-ab");
    });
    for (dir, inner, key) in [
        (
            ("192.0.2.1", "192.0.2.2"),
            (a1_ip, b1_ip),
            key_of(&lab, "peering:pcx-ab>vpc-b"),
        ),
        (
            ("192.0.2.2", "192.0.2.1"),
            (b1_ip, a1_ip),
            key_of(&lab, "peering:pcx-ab>vpc-a"),
        ),
    ] {
        assert!(key != 3001 && key != 3002, "a peering's keys are its own");
        let got = gre_rows(&rows, dir, inner);
        assert!(got.len() >= 3, "GRE {dir:?} carrying {inner:?}: {rows:?}");
        for r in got {
            assert_eq!(
                r[3],
                format!("0x{key:08x}"),
                "a packet for the VPC of {} carries its key: {r:?}",
                inner.1
            );
        }
    }
    assert_eq!(ping(&b1, a1_ip, 3), 3, "b1 -> a1: ping over pcx-ab");
    transfer(&a1, &b1, b1_ip, 9001, 1 << 20, "a1 -> b1 TCP over pcx-ab");
    transfer(&b1, &a1, a1_ip, 9002, 1 << 20, "b1 -> a1 TCP over pcx-ab");
    let seen = tcp_seen(&a1, &b1, b1_ip, 9003).expect("a1 -> b1 TCP");
    assert_eq!(seen.from.ip(), v4(a1_ip), "no translation across a peering");
    // B <-> C, the other peering, works too.
    assert_eq!(ping(&c1, b1_ip, 2), 2, "c1 -> b1: ping over pcx-bc");

    // Not transitive: A -> C and C -> A, each routed to its peering with B, get nothing
    // through.
    let before = lab.stats();
    nothing_seen(&[("c1", c1.clone())], 9010, || {
        udp_fire(&a1, c1_ip, 9010, "a-to-c", 3);
    });
    nothing_seen(&[("a1", a1.clone())], 9011, || {
        udp_fire(&c1, a1_ip, 9011, "c-to-a", 3);
    });
    assert_eq!(ping(&a1, c1_ip, 1), 0, "a1 -> c1 through B: ping");
    let after = lab.stats();
    assert!(
        after.dropped(&before, "host-a", "PeeringNotTransitive") >= 7,
        "A <-> C through B: {}",
        after.diff(&before)
    );
    for i in ["a1", "c1", "b1"] {
        assert_eq!(received(&after, &before, i), 0, "{}", after.diff(&before));
    }

    // One-sided routes: A routes D's CIDR to pcx-ad, D has no route back: nothing is
    // delivered to d1, and d1's host counts it.
    let before = lab.stats();
    nothing_seen(&[("d1", d1.clone())], 9020, || {
        udp_fire(&a1, d1_ip, 9020, "a-to-d", 3);
    });
    assert_eq!(tcp_ask(&a1, d1_ip, 9021, "x"), None, "a1 -> d1: TCP");
    let after = lab.stats();
    assert!(
        after.dropped(&before, "host-b", "PeeringNoReturnRoute") >= 4,
        "a1 -> d1 without a return route: {}",
        after.diff(&before)
    );
    assert_eq!(
        received(&after, &before, "d1"),
        0,
        "{}",
        after.diff(&before)
    );
    // And from D, with no route at all to A.
    let before = lab.stats();
    nothing_seen(&[("a1", a1.clone())], 9022, || {
        udp_fire(&d1, a1_ip, 9022, "d-to-a", 3);
    });
    let after = lab.stats();
    assert_dropped(&after, &before, "host-b", "NoRoute", "d1 -> a1");
}

// ----------------------------------------------------------------------------------------------
// 4. The basic-network interconnect

const INTERCONNECT: &str = r#"
[basic]
cidr = "10.128.0.0/16"

[[vpc]]
name = "vpc-a"
tenant = "acme"
cidr = "10.40.0.0/16"
key = 4040

[[vpc]]
name = "vpc-p"
tenant = "acme"
cidr = "10.41.0.0/16"
key = 4041

[[peering]]
name = "pcx-ap"
vpcs = ["vpc-a", "vpc-p"]

[[route_table]]
name = "rt-a"
vpc = "vpc-a"
routes = [ { destination = "10.41.0.0/16", next_hop = "peering:pcx-ap" } ]

[[route_table]]
name = "rt-p"
vpc = "vpc-p"
routes = [
  { destination = "10.40.0.0/16", next_hop = "peering:pcx-ap" },
  { destination = "10.128.0.0/16", next_hop = "peering:pcx-ap" },   # classic-1 through vpc-a: no transit
]

[[subnet]]
name = "net-a"
vpc = "vpc-a"
cidr = "10.40.1.0/24"
route_table = "rt-a"

[[subnet]]
name = "net-p"
vpc = "vpc-p"
cidr = "10.41.1.0/24"
route_table = "rt-p"

[[interconnect]]
instance = "classic-1"
vpc = "vpc-a"

[[security_group]]
name = "sg-ic"
ingress = [ { action = "accept", protocol = "all", source = "10.0.0.0/8" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "classic-1"
host = "host-b"
network = "basic"
tenant = "acme"
security_groups = ["sg-ic"]
netns = "@NS-c1"

[[instance]]   # same tenant, not linked
name = "classic-2"
host = "host-a"
network = "basic"
tenant = "acme"
security_groups = ["sg-ic"]
netns = "@NS-c2"

[[instance]]
name = "va1"
host = "host-a"
subnet = "net-a"
ip = "10.40.1.10"
security_groups = ["sg-ic"]
netns = "@NS-va1"

[[instance]]
name = "va2"
host = "host-b"
subnet = "net-a"
ip = "10.40.1.20"
security_groups = ["sg-ic"]
netns = "@NS-va2"

[[instance]]
name = "p1"
host = "host-a"
subnet = "net-p"
ip = "10.41.1.10"
security_groups = ["sg-ic"]
netns = "@NS-p1"
"#;

#[test]
fn interconnect_links_one_basic_instance_to_one_vpc_without_transit() {
    let test = "interconnect_links_one_basic_instance_to_one_vpc_without_transit";
    if !can_run(test, &[Tool::Ip, Tool::Ping, Tool::Tshark]) {
        return;
    }
    let lab = cloud_lab("ec_ic", &(underlay(&["r", "r"]) + INTERCONNECT));
    let [c1, c2, va1, va2, p1] = ["classic-1", "classic-2", "va1", "va2", "p1"].map(|i| lab.ns(i));
    let [c1_ip, c2_ip, va1_ip, va2_ip, p1_ip] =
        ["classic-1", "classic-2", "va1", "va2", "p1"].map(|i| lab.ip(i));

    // classic-1 <-> vpc-a at private addresses, across hosts and on the same host. On the
    // wire: each way on its own channel of vpc-a's interconnect.
    let rows = gre_on_wire(&lab, "ec_ic", WIRE, || {
        assert_eq!(ping(&c1, va1_ip, 3), 3, "classic-1 -> va1: ping");
    });
    for (dir, inner, key) in [
        (
            ("192.0.2.2", "192.0.2.1"),
            (c1_ip, va1_ip),
            Some(key_of(&lab, "interconnect:vpc-a>vpc")),
        ),
        (
            ("192.0.2.1", "192.0.2.2"),
            (va1_ip, c1_ip),
            Some(key_of(&lab, "interconnect:vpc-a>basic")),
        ),
    ] {
        let got = gre_rows(&rows, dir, inner);
        assert!(got.len() >= 3, "GRE {dir:?} carrying {inner:?}: {rows:?}");
        for r in got {
            let want = key.map(|k| format!("0x{k:08x}")).unwrap_or_default();
            assert_eq!(r[3], want, "GRE key towards {}: {r:?}", inner.1);
        }
    }
    let seen = tcp_seen(&c1, &va1, va1_ip, 9101).expect("classic-1 -> va1: TCP");
    assert_eq!(seen.from.ip(), v4(c1_ip), "{seen:?}");
    let seen = tcp_seen(&va1, &c1, c1_ip, 9102).expect("va1 -> classic-1: TCP");
    assert_eq!(seen.from.ip(), v4(va1_ip), "{seen:?}");
    assert_eq!(
        ping(&va2, c1_ip, 2),
        2,
        "va2 -> classic-1 (same host): ping"
    );
    assert_eq!(
        ping(&c1, va2_ip, 2),
        2,
        "classic-1 -> va2 (same host): ping"
    );
    transfer(&c1, &va1, va1_ip, 9103, 500_000, "classic-1 -> va1 TCP");
    // The peering itself works.
    assert_eq!(ping(&p1, va1_ip, 2), 2, "p1 -> va1 over pcx-ap: ping");

    // classic-2, not linked, does not reach vpc-a; vpc-a does not reach it.
    let before = lab.stats();
    nothing_seen(&[("va1", va1.clone()), ("va2", va2.clone())], 9110, || {
        udp_fire(&c2, va1_ip, 9110, "c2-to-va1", 3);
        udp_fire(&c2, va2_ip, 9110, "c2-to-va2", 3);
    });
    nothing_seen(&[("classic-2", c2.clone())], 9111, || {
        udp_fire(&va1, c2_ip, 9111, "va1-to-c2", 3);
    });
    let after = lab.stats();
    assert!(
        after.dropped(&before, "host-a", "NoRoute") >= 9,
        "classic-2 <-> vpc-a: NoRoute on host-a: {}",
        after.diff(&before)
    );
    for i in ["va1", "va2", "classic-2"] {
        assert_eq!(received(&after, &before, i), 0, "{}", after.diff(&before));
    }

    // vpc-p, peered with vpc-a, does not reach classic-1 through it, nor the other way.
    let before = lab.stats();
    nothing_seen(&[("classic-1", c1.clone())], 9120, || {
        udp_fire(&p1, c1_ip, 9120, "p1-to-c1", 3);
    });
    nothing_seen(&[("p1", p1.clone())], 9121, || {
        udp_fire(&c1, p1_ip, 9121, "c1-to-p1", 3);
    });
    assert_eq!(ping(&p1, c1_ip, 1), 0, "p1 -> classic-1: ping");
    let after = lab.stats();
    assert!(
        after.dropped(&before, "host-a", "PeeringNotTransitive") >= 4,
        "p1 -> classic-1 through pcx-ap: {}",
        after.diff(&before)
    );
    assert!(
        after.dropped(&before, "host-b", "NoRoute") >= 3,
        "classic-1 -> p1: {}",
        after.diff(&before)
    );
    for i in ["classic-1", "p1"] {
        assert_eq!(received(&after, &before, i), 0, "{}", after.diff(&before));
    }
}

// ----------------------------------------------------------------------------------------------
// 5. Moving an instance from the basic network into a VPC while the daemons run

const MOVE_COMMON: &str = r#"
[basic]
cidr = "10.128.0.0/16"

[internet]
cidr = "203.0.113.0/24"
gateway = "host-a"
netns = "@NS-inet"

[[vpc]]
name = "vpc-m"
tenant = "acme"
cidr = "10.50.0.0/16"
key = 4050

[[subnet]]
name = "net-m"
vpc = "vpc-m"
cidr = "10.50.1.0/24"

[[security_group]]
name = "sg-all"
ingress = [ { action = "accept", protocol = "all", source = "0.0.0.0/0" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]
"#;

const BPEER: &str = r#"
[[instance]]
name = "bpeer"
host = "host-b"
network = "basic"
tenant = "acme"
eip = "203.0.113.31"
security_groups = ["sg-all"]
netns = "@NS-bpeer"
"#;

const F1: &str = r#"
[[instance]]
name = "f1"
host = "host-a"
subnet = "net-m"
ip = "10.50.1.11"
security_groups = ["sg-all"]
netns = "@NS-f1"
"#;

const F2: &str = r#"
[[instance]]
name = "f2"
host = "host-b"
subnet = "net-m"
ip = "10.50.1.12"
security_groups = ["sg-all"]
netns = "@NS-f2"
"#;

/// The instance that moves, as it starts (in the basic network)...
const MOVER_BASIC: &str = r#"
[[instance]]
name = "mover"
host = "host-a"
network = "basic"
tenant = "acme"
eip = "203.0.113.30"
security_groups = ["sg-all"]
netns = "@NS-mover"
"#;

/// ...and once moved into vpc-m (MOVED_IP stands for its new address).
const MOVER_VPC: &str = r#"
[[instance]]
name = "mover"
host = "host-a"
subnet = "net-m"
ip = "MOVED_IP"
eip = "203.0.113.30"
security_groups = ["sg-all"]
netns = "@NS-mover"
"#;

#[test]
fn moving_a_basic_instance_into_a_vpc_on_sighup_keeps_its_device_and_other_flows() {
    let test = "moving_a_basic_instance_into_a_vpc_on_sighup_keeps_its_device_and_other_flows";
    if !can_run(test, &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let name = "ec_move";
    // The topology with the instances in this order, MOVED_IP standing for `ip`.
    let text = |instances: &[&str], ip: &str| {
        (underlay(&["r", "r"]) + MOVE_COMMON + &instances.concat())
            .replace("MOVED_IP", ip)
            .replace("@NS", &format!("vpcd-{name}"))
    };
    let lab = LabUp::start(name, &text(&[BPEER, F1, F2, MOVER_BASIC], ""));
    let [mover, bpeer, f1, f2] = ["mover", "bpeer", "f1", "f2"].map(|i| lab.ns(i));
    let [old_ip, bpeer_ip, f1_ip, f2_ip] = ["mover", "bpeer", "f1", "f2"].map(|i| lab.ip(i));
    let new_ip = Ipv4Addr::new(10, 50, 1, 40);
    let (mover_eip, bpeer_eip) = (
        Ipv4Addr::new(203, 0, 113, 30),
        Ipv4Addr::new(203, 0, 113, 31),
    );
    let moved = text(&[BPEER, F1, F2, MOVER_VPC], &new_ip.to_string());
    vpcd::Topology::parse(&moved, "moved").expect("the moved topology is valid");

    // Before: in the basic network, not in vpc-m.
    assert_eq!(ping(&mover, bpeer_ip, 2), 2, "mover -> bpeer (basic): ping");
    let before = lab.stats();
    nothing_seen(&[("f2", f2.clone())], 9200, || {
        udp_fire(&mover, f2_ip, 9200, "not-yet", 2);
    });
    let after = lab.stats();
    assert_dropped(
        &after,
        &before,
        "host-a",
        "NoRoute",
        "mover -> f2 before the move",
    );
    let (index, dev) = link_of(&mover, "mover");
    assert_eq!(addrs_of(&mover, "mover"), vec![format!("{old_ip}/16")]);

    // Two other instances talk all along: numbered datagrams every 10 ms, and numbered lines
    // on one TCP connection.
    let udp = Stream::start(&f1, &f2, f2_ip, 9300, false, Duration::from_millis(10));
    let tcp = Stream::start(&f2, &f1, f1_ip, 9301, true, Duration::from_millis(10));
    thread::sleep(Duration::from_millis(300));

    // An invalid file is refused, and the running topology stays.
    let invalid = text(&[BPEER, F1, F2, MOVER_VPC], "10.99.1.40");
    assert!(vpcd::Topology::parse(&invalid, "invalid").is_err());
    reload(&lab, &invalid, "reload refused");
    for h in ["host-a", "host-b"] {
        let log = std::fs::read_to_string(lab.lab.log_path(h)).unwrap_or_default();
        assert!(
            log.contains("10.99.1.40"),
            "{h}'s log should name the error:\n{log}"
        );
    }
    // A file that is not even TOML: refused too.
    let broken = moved.replace(
        "[[instance]]\nname = \"mover\"",
        "[[instance]\nname = \"mover\"",
    );
    assert_ne!(broken, moved);
    reload(&lab, &broken, "reload refused");
    assert_eq!(
        ping(&mover, bpeer_ip, 2),
        2,
        "after refused reloads, mover -> bpeer (basic)"
    );
    assert_eq!(addrs_of(&mover, "mover"), vec![format!("{old_ip}/16")]);

    // The move.
    reload(&lab, &moved, "topology reloaded");
    assert!(
        log_count(&lab, "host-a", "device readdressed") >= 1,
        "host-a's log should say the device was readdressed"
    );
    assert_eq!(
        link_of(&mover, "mover"),
        (index, dev),
        "the device is kept (same name, same index)"
    );
    assert_eq!(
        addrs_of(&mover, "mover"),
        vec![format!("{new_ip}/24")],
        "the device has the new address"
    );
    assert_eq!(ping(&mover, f2_ip, 3), 3, "mover -> f2 in vpc-m: ping");
    assert_eq!(ping(&f1, new_ip, 3), 3, "f1 -> mover in vpc-m: ping");
    let seen = tcp_seen(&f2, &mover, new_ip, 9210).expect("f2 -> mover: TCP");
    assert_eq!(seen.from.ip(), v4(f2_ip), "{seen:?}");
    assert_eq!(seen.local.ip(), v4(new_ip), "{seen:?}");
    let seen = tcp_seen(&mover, &f2, f2_ip, 9211).expect("mover -> f2: TCP");
    assert_eq!(seen.from.ip(), v4(new_ip), "{seen:?}");

    // No longer in the basic network privately...
    let before = lab.stats();
    nothing_seen(&[("bpeer", bpeer.clone())], 9220, || {
        udp_fire(&mover, bpeer_ip, 9220, "mover-to-basic", 3);
    });
    nothing_seen(&[("mover", mover.clone())], 9221, || {
        udp_fire(&bpeer, old_ip, 9221, "basic-to-old-address", 3);
    });
    let after = lab.stats();
    assert!(
        after.dropped(&before, "host-a", "NoRoute") >= 3,
        "mover -> bpeer's private address: {}",
        after.diff(&before)
    );
    assert!(
        after.dropped(&before, "host-b", "NoSuchInstance") >= 3,
        "bpeer -> mover's old address: {}",
        after.diff(&before)
    );
    // ...but over the public addresses, both ways.
    let seen = tcp_seen(&mover, &bpeer, bpeer_eip, 9230).expect("mover -> bpeer's EIP: TCP");
    assert_eq!(seen.from.ip(), v4(mover_eip), "{seen:?}");
    let seen = tcp_seen(&bpeer, &mover, mover_eip, 9231).expect("bpeer -> mover's EIP: TCP");
    assert_eq!(seen.from.ip(), v4(bpeer_eip), "{seen:?}");
    assert_eq!(seen.local.ip(), v4(new_ip), "{seen:?}");
    assert_eq!(ping(&mover, INTERNET, 2), 2, "mover -> internet");
    let inet = lab.ns("internet");
    let seen = tcp_seen(&inet, &mover, mover_eip, 9232).expect("internet -> mover's EIP: TCP");
    assert_eq!(seen.from.ip(), v4(INTERNET), "{seen:?}");
    assert_eq!(seen.local.ip(), v4(new_ip), "{seen:?}");

    // The other flows never stopped.
    thread::sleep(Duration::from_millis(300));
    for (what, s) in [("UDP f1 -> f2", udp), ("TCP f2 -> f1", tcp)] {
        assert_no_loss(what, s, STALL);
    }
}

/// Instances of [`reordering_the_instances_on_sighup_changes_nothing`].
const ORDER_INSTANCES: [&str; 4] = [
    r#"
[[instance]]
name = "i1"
host = "host-a"
subnet = "net-o"
ip = "10.70.1.11"
security_groups = ["sg-o"]
netns = "@NS-i1"
"#,
    r#"
[[instance]]
name = "i2"
host = "host-a"
subnet = "net-o"
ip = "10.70.1.12"
security_groups = ["sg-o"]
netns = "@NS-i2"
"#,
    r#"
[[instance]]
name = "i3"
host = "host-b"
subnet = "net-o"
ip = "10.70.1.13"
security_groups = ["sg-o"]
netns = "@NS-i3"
"#,
    r#"
[[instance]]
name = "i4"
host = "host-b"
subnet = "net-o"
ip = "10.70.1.14"
security_groups = ["sg-o"]
netns = "@NS-i4"
"#,
];

const ORDER_NET: &str = r#"
[[vpc]]
name = "vpc-o"
tenant = "acme"
cidr = "10.70.0.0/16"
key = 4070

[[subnet]]
name = "net-o"
vpc = "vpc-o"
cidr = "10.70.1.0/24"

[[security_group]]
name = "sg-o"
ingress = [ { action = "accept", protocol = "all", source = "10.70.0.0/16" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]
"#;

/// Reordering the `[[instance]]` tables of the file (as an edit that adds or removes an
/// instance above others does) renumbers the instances: a reload must change nothing that
/// can be seen, neither the flows nor whose counters are whose in the statistics.
#[test]
fn reordering_the_instances_on_sighup_changes_nothing() {
    let test = "reordering_the_instances_on_sighup_changes_nothing";
    if !can_run(test, &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let name = "ec_order";
    let text = |order: [usize; 4]| {
        let instances: String = order.iter().map(|&i| ORDER_INSTANCES[i]).collect();
        (underlay(&["r", "r"]) + ORDER_NET + &instances).replace("@NS", &format!("vpcd-{name}"))
    };
    let lab = LabUp::start(name, &text([0, 1, 2, 3]));
    let [i1, i2, i3, i4] = ["i1", "i2", "i3", "i4"].map(|i| lab.ns(i));
    let [i1_ip, i2_ip, i3_ip, i4_ip] = ["i1", "i2", "i3", "i4"].map(|i| lab.ip(i));
    let udp = Stream::start(&i1, &i3, i3_ip, 9400, false, Duration::from_millis(1));
    let tcp = Stream::start(&i4, &i2, i2_ip, 9401, true, Duration::from_millis(2));
    thread::sleep(Duration::from_millis(300));
    let counters = [
        ("host-a", "instance.i1.sent"),
        ("host-a", "instance.i2.received"),
        ("host-b", "instance.i3.received"),
        ("host-b", "instance.i4.sent"),
    ];
    // The statistics' mistakes are gathered and reported last, after the traffic's checks.
    let mut wrong = Vec::new();
    for order in [[3, 2, 1, 0], [1, 3, 0, 2], [0, 1, 2, 3]] {
        let before = lab.stats();
        reload(&lab, &text(order), "topology reloaded");
        thread::sleep(Duration::from_millis(300));
        let after = lab.stats();
        for (host, stranger) in [
            ("host-a", "i3"),
            ("host-a", "i4"),
            ("host-b", "i1"),
            ("host-b", "i2"),
        ] {
            let key = format!("instance.{stranger}.sent");
            if after.get(host, &key) != 0 {
                wrong.push(format!(
                    "order {order:?}: {host} reports {key} {} though {stranger} never ran there",
                    after.get(host, &key)
                ));
            }
        }
        for (host, key) in counters {
            if after.get(host, key) <= before.get(host, key) {
                wrong.push(format!(
                    "order {order:?}: {host} {key} was {} before the reload, {} after",
                    before.get(host, key),
                    after.get(host, key)
                ));
            }
        }
    }
    // Reload after reload while the streams run: packets read around each reload must be
    // judged as coming from the instance that sent them. Flood pings between the four keep
    // packets in every reader at every moment.
    let floods: Vec<std::process::Child> = [(&i1, i3_ip), (&i2, i4_ip), (&i3, i2_ip), (&i4, i1_ip)]
        .into_iter()
        .map(|(ns, dst)| {
            Command::new("ip")
                .args(["netns", "exec", ns, "ping", "-n", "-q", "-f", "-w", "3"])
                .arg(dst.to_string())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("ping -f")
        })
        .collect();
    let until = Instant::now() + Duration::from_millis(2500);
    let mut reloads = 0;
    while Instant::now() < until {
        let order = if reloads % 2 == 0 {
            [3, 2, 1, 0]
        } else {
            [0, 1, 2, 3]
        };
        reload(&lab, &text(order), "topology reloaded");
        reloads += 1;
    }
    eprintln!("{reloads} reloads under floods");
    for f in floods {
        let o = f.wait_with_output().expect("ping -f");
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        eprintln!(
            "flood: {}",
            out.lines()
                .find(|l| l.contains("transmitted"))
                .unwrap_or("?")
        );
    }
    // An instance added at the end renumbers no one: the others' counters go on.
    let before = lab.stats();
    let grown = text([0, 1, 2, 3])
        + &ORDER_INSTANCES[0]
            .replace("i1", "i5")
            .replace("10.70.1.11", "10.70.1.15")
            .replace("@NS", &format!("vpcd-{name}"));
    reload(&lab, &grown, "topology reloaded");
    thread::sleep(Duration::from_millis(300));
    let after = lab.stats();
    for (host, key) in counters {
        if after.get(host, key) <= before.get(host, key) {
            wrong.push(format!(
                "instance i5 added: {host} {key} was {} before the reload, {} after",
                before.get(host, key),
                after.get(host, key)
            ));
        }
    }
    assert_eq!(ping(&i2, i4_ip, 2), 2, "i2 -> i4 after the reloads");
    assert_eq!(ping(&i3, i1_ip, 2), 2, "i3 -> i1 after the reloads");
    let all = lab.stats();
    let mut dropped = Vec::new();
    for host in ["host-a", "host-b"] {
        for reason in ["SourceSpoofed", "UnknownPort", "NotLocalDestination"] {
            let n = all.get(host, &format!("drop.{reason}"));
            if n > 0 {
                dropped.push(format!("{host} dropped {n} for {reason}"));
            }
        }
    }
    let lost: Vec<String> = [
        loss("UDP i1 -> i3", udp, STALL),
        loss("TCP i4 -> i2", tcp, STALL),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(
        lost.is_empty() && dropped.is_empty() && wrong.is_empty(),
        "reloads that renumber the instances must change nothing:\n\
         traffic lost:\n  {}\n\
         packets of local instances dropped as if from another port:\n  {}\n\
         per-instance statistics counting for the wrong instance, or going back:\n  {}",
        lost.join("\n  "),
        dropped.join("\n  "),
        wrong.join("\n  ")
    );
}

// ----------------------------------------------------------------------------------------------
// 6. `vpcd lab check` with expectations from the internet

const CHECK: &str = r#"
[internet]
cidr = "203.0.113.0/24"
gateway = "host-a"
netns = "@NS-inet"

[[vpc]]
name = "vpc-w"
tenant = "acme"
cidr = "10.60.0.0/16"
key = 4060

[[subnet]]
name = "net-w"
vpc = "vpc-w"
cidr = "10.60.1.0/24"

[[security_group]]
name = "sg-web"
ingress = [
  { action = "accept", protocol = "tcp",  port = 80, source = "0.0.0.0/0" },
  { action = "accept", protocol = "udp",  port = 53, source = "0.0.0.0/0" },
  { action = "accept", protocol = "icmp", source = "0.0.0.0/0" },
]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "web1"
host = "host-a"
subnet = "net-w"
ip = "10.60.1.10"
eip = "203.0.113.10"
security_groups = ["sg-web"]
netns = "@NS-web1"

[[instance]]
name = "web2"
host = "host-b"
subnet = "net-w"
ip = "10.60.1.20"
eip = "203.0.113.11"
security_groups = ["sg-web"]
netns = "@NS-web2"

[[instance]]
name = "dark"
host = "host-b"
subnet = "net-w"
ip = "10.60.1.30"
security_groups = ["sg-web"]
netns = "@NS-dark"

[[expect]]
from = "internet"
to = "203.0.113.10"
protocol = "tcp"
port = 80
reach = true

[[expect]]   # an instance by name: reached at its Elastic IP
from = "internet"
to = "web2"
protocol = "tcp"
port = 80
reach = true

[[expect]]
from = "internet"
to = "203.0.113.11"
protocol = "udp"
port = 53
reach = true

[[expect]]
from = "internet"
to = "web1"
protocol = "icmp"
reach = true

[[expect]]   # the security group: no rule for 8080
from = "internet"
to = "203.0.113.11"
protocol = "tcp"
port = 8080
reach = false

[[expect]]   # bound to no instance
from = "internet"
to = "203.0.113.99"
protocol = "tcp"
port = 80
reach = false

[[expect]]
from = "web2"
to = "203.0.113.1"
protocol = "icmp"
reach = true

[[expect]]   # no Elastic IP, no way out
from = "dark"
to = "203.0.113.1"
protocol = "icmp"
reach = false
"#;

#[test]
fn lab_check_probes_from_the_internet() {
    let test = "lab_check_probes_from_the_internet";
    if !can_run(test, &[Tool::Ip]) {
        return;
    }
    let name = "ec_check";
    let lab = cloud_lab(name, &(underlay(&["r", "r"]) + CHECK));
    let o = vpcd(&["lab", "check", "--name", name]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    eprintln!("{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "vpcd lab check failed:\n{out}");
    assert!(out.contains("8 of 8 expectations hold"), "{out}");
    let row = |to: &str, what: &str| -> String {
        out.lines()
            .find(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() >= 5 && w[1] == to && w[2] == what
            })
            .unwrap_or_else(|| panic!("no row to {to} {what}:\n{out}"))
            .to_string()
    };
    for (to, what, observed) in [
        ("203.0.113.10", "tcp:80", "reach"),
        ("web2", "tcp:80", "reach"),
        ("203.0.113.11", "udp:53", "reach"),
        ("web1", "icmp", "reach"),
        ("203.0.113.11", "tcp:8080", "blocked"),
        ("203.0.113.99", "tcp:80", "blocked"),
        ("203.0.113.1", "icmp", "reach"),
    ] {
        let r = row(to, what);
        assert!(
            r.split_whitespace().nth(4) == Some(observed) && r.contains(" ok"),
            "{to} {what}: {r}"
        );
    }
    assert!(
        row("203.0.113.11", "tcp:8080").contains("SgIngress"),
        "{out}"
    );
    assert!(
        row("203.0.113.99", "tcp:80").contains("on host-a (NoSuchEip)"),
        "{out}"
    );
    let dark = out
        .lines()
        .find(|l| l.starts_with("dark "))
        .unwrap_or_else(|| panic!("no row from dark:\n{out}"));
    assert!(
        dark.contains("dropped at route on host-b (NoRoute)"),
        "{dark}"
    );

    // The check is no rubber stamp: a wrong expectation fails it.
    let wrong = std::fs::read_to_string(lab.lab.topology_path()).unwrap()
        + "\n[[expect]]\nfrom = \"internet\"\nto = \"203.0.113.99\"\nprotocol = \"udp\"\nport = 53\nreach = true\n";
    std::fs::write(lab.lab.topology_path(), wrong).unwrap();
    let o = vpcd(&["lab", "check", "--name", name]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(!o.status.success(), "a wrong expectation passed:\n{out}");
    assert!(out.contains("8 of 9 expectations hold; 1 do not"), "{out}");
}
