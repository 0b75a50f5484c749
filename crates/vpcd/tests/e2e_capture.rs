//! End-to-end tests of `vpcd ctl capture` on a running lab of two hosts: the pcapng files it
//! writes are read back by tshark, the referee, with real traffic sent meanwhile. Drops (with
//! their reason and rule as the packet comment, passing traffic absent), an instance's port
//! (echo request in, reply out, count honoured), the underlay (GRE-in-UDP and raw GRE
//! decoded, the VPC's key, the inner ICMP), and a TCP transfer through the segmented paths
//! (every segment on the underlay whole, its checksums valid, all the bytes there).

#[path = "e2e/common.rs"]
mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const KEY: u32 = 4242;

fn topology(transport: &str) -> String {
    format!(
        r#"
[underlay]
transport = "{transport}"
mtu = 1500

[[host]]
name = "host-a"
address = "192.0.2.1"

[[host]]
name = "host-b"
address = "192.0.2.2"

[[vpc]]
name = "vpc-cap"
tenant = "t-cap"
cidr = "10.78.0.0/16"
key = {KEY}

[[subnet]]
name = "net-cap"
vpc = "vpc-cap"
cidr = "10.78.1.0/24"

[[security_group]]
name = "sg-cap"
ingress = [ {{ action = "accept", protocol = "icmp", source = "10.78.0.0/16" }},
            {{ action = "accept", protocol = "tcp", port = "7001", source = "10.78.0.0/16" }} ]
egress  = [ {{ action = "accept", protocol = "all", destination = "0.0.0.0/0" }} ]

[[instance]]
name = "cpa1"
host = "host-a"
subnet = "net-cap"
ip = "10.78.1.10"
security_groups = ["sg-cap"]
netns = "cap-a1"

[[instance]]
name = "cpa2"
host = "host-a"
subnet = "net-cap"
ip = "10.78.1.11"
security_groups = ["sg-cap"]
netns = "cap-a2"

[[instance]]
name = "cpb"
host = "host-b"
subnet = "net-cap"
ip = "10.78.1.20"
security_groups = ["sg-cap"]
netns = "cap-b"
"#
    )
}

fn socket(lab: &LabUp, host: &str) -> String {
    format!("/run/vpcd/{}.sock", lab.lab.host_ns(host))
}

/// A `vpcd ctl --json capture` running in the background.
struct Running {
    child: Child,
    file: PathBuf,
    point: String,
}

impl Running {
    /// Starts `vpcd ctl capture POINT -w FILE ARGS...` on `host`'s daemon (a relative file,
    /// which the client makes absolute); returns once the daemon's status shows it.
    fn start(lab: &LabUp, host: &str, point: &str, args: &[&str]) -> Running {
        let dir = std::env::temp_dir();
        let name = format!("vpcd-e2e-capture-{point}.pcapng");
        let file = dir.join(&name);
        let _ = std::fs::remove_file(&file);
        let child = Command::new(VPCD)
            .current_dir(&dir)
            .args(["ctl", "--control", &socket(lab, host), "--json"])
            .args(["capture", point, "-w", &name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vpcd ctl capture");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let o = ctl_at(lab, host, &["--json", "status"]);
            let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            if s["data"]["capture"] == point {
                break;
            }
            assert!(Instant::now() < deadline, "the capture did not start: {s}");
            thread::sleep(Duration::from_millis(50));
        }
        let point = point.to_string();
        Running { child, file, point }
    }

    /// Waits for the capture's reply (its `data`), asserting it succeeded and says so.
    fn finish(self) -> (PathBuf, serde_json::Value) {
        let o = self.child.wait_with_output().expect("vpcd ctl capture");
        assert!(o.status.success(), "capture: {}", show(&o));
        let reply: serde_json::Value =
            serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&o)));
        assert_eq!(reply["ok"], true, "{reply}");
        let says = format!(
            "{} packets captured on {}",
            reply["data"]["packets"], self.point
        );
        let text = reply["text"].as_str().unwrap_or_default();
        assert!(text.starts_with(&says), "{reply}");
        assert!(text.contains(&self.file.display().to_string()), "{reply}");
        (self.file, reply["data"].clone())
    }
}

/// The rows of a capture file (tshark's fields), printed for whoever reads a failure. The
/// packet's direction (`frame.packet_flags_direction`, which tshark prints in hex) reads
/// `in` or `out`.
fn read(file: &Path, extra: &[&str], fields: &[&str]) -> Vec<Vec<String>> {
    let mut rows = tshark_fields(file, extra, fields);
    eprintln!("{}: {} packets", file.display(), rows.len());
    let dir = fields
        .iter()
        .position(|f| *f == "frame.packet_flags_direction");
    for r in rows.iter_mut() {
        if let Some(d) = dir.and_then(|i| r.get_mut(i)) {
            let n = match d.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => d.parse().ok(),
            };
            *d = match n {
                Some(1) => "in",
                Some(2) => "out",
                _ => "?",
            }
            .to_string();
        }
        eprintln!("  {}", r.join(" | "));
    }
    rows
}

#[test]
fn captures_of_drops_an_instance_and_the_underlay_read_by_tshark() {
    if !can_run(
        "captures_of_drops_an_instance_and_the_underlay_read_by_tshark",
        &[Tool::Ip, Tool::Ping, Tool::Tshark],
    ) {
        return;
    }
    let lab = LabUp::start("cap", &topology("gre-udp"));
    let (a1, a2, b) = (lab.ip("cpa1"), lab.ip("cpa2"), lab.ip("cpb"));
    assert_eq!(ping(&lab.ns("cpa1"), b, 2), 2, "the lab works");
    // cpb is on host-b: host-a's daemon refuses at once, and writes nothing.
    let o = ctl_at(
        &lab,
        "host-a",
        &["capture", "cpb", "-w", "/tmp/vpcd-e2e-nothing.pcapng"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains("no instance \"cpb\" on host host-a"),
        "{said}"
    );
    assert!(!Path::new("/tmp/vpcd-e2e-nothing.pcapng").exists());
    drops(&lab, (a1, a2, b));
    instance(&lab, a1, b);
    underlay(&lab, a1, b);
    segmented(&lab, b);
    stopped(lab, a1, a2);
}

#[test]
fn a_capture_of_the_raw_gre_underlay_read_by_tshark() {
    if !can_run(
        "a_capture_of_the_raw_gre_underlay_read_by_tshark",
        &[Tool::Ip, Tool::Ping, Tool::Tshark],
    ) {
        return;
    }
    let lab = LabUp::start("capgre", &topology("gre"));
    underlay(&lab, lab.ip("cpa1"), lab.ip("cpb"));
}

/// `capture drops`: the SYNs the groups drop are there with their reason, rule and port of
/// arrival (a local instance's, or the underlay's: GRE-in-UDP, decoded); the pings that pass
/// are not. A second capture meanwhile is refused.
fn drops(lab: &LabUp, (a1, a2, b): (Ipv4Addr, Ipv4Addr, Ipv4Addr)) {
    let cap = Running::start(lab, "host-a", "drops", &["--seconds", "6"]);
    let second = ctl_at(
        lab,
        "host-a",
        &["capture", "underlay", "-w", "/tmp/x.pcapng"],
    );
    assert_eq!(second.status.code(), Some(1), "{}", show(&second));
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(said.contains("one at a time"), "{}", show(&second));
    assert_eq!(ping(&lab.ns("cpa1"), a2, 3), 3);
    assert_eq!(ping(&lab.ns("cpb"), a1, 3), 3);
    assert_eq!(tcp_ask(&lab.ns("cpa1"), a2, 7000, "x"), None);
    assert_eq!(tcp_ask(&lab.ns("cpb"), a1, 7000, "x"), None);
    let (file, data) = cap.finish();
    let fields = [
        "frame.comment",
        "ip.src",
        "ip.dst",
        "tcp.dstport",
        "icmp.type",
        "gre.key",
    ];
    let rows = read(&file, &["-d", "udp.port==4754,gre"], &fields);
    let _ = std::fs::remove_file(&file);
    assert_eq!(data["packets"], rows.len(), "{data}");
    assert_eq!(data["lost"], 0, "{data}");
    let rule = "drop: SgIngress by [sg-cap]:ingress#no-match on host-a";
    let key = format!("{KEY:#010x}");
    let local = [format!("{rule}, from cpa1"), a1.to_string(), a2.to_string()];
    let local = [&local[..], &["7000".into(), "".into(), "".into()]].concat();
    let remote = [
        format!("{rule}, from underlay 192.0.2.2"),
        format!("192.0.2.2,{b}"),
        format!("192.0.2.1,{a1}"),
        "7000".into(),
        "".into(),
        key,
    ]
    .to_vec();
    assert!(rows.contains(&local), "a SYN cpa1 -> cpa2 dropped");
    assert!(
        rows.contains(&remote),
        "a SYN cpb -> cpa1 dropped on arrival"
    );
    let syns = rows.iter().filter(|r| r[3] == "7000");
    assert!(
        syns.clone().all(|r| *r == local || *r == remote),
        "only those"
    );
    assert!(syns.count() >= 2);
    assert!(
        rows.iter().all(|r| r[0].starts_with("drop: ")),
        "every packet has its comment"
    );
    assert!(
        rows.iter().all(|r| r[4].is_empty()),
        "no ICMP: the pings passed"
    );
}

/// `capture INSTANCE --count 4`: the echo requests as read from its device (in), the replies
/// as written to it (out), with their addresses; the capture stops at 4 packets.
fn instance(lab: &LabUp, a1: Ipv4Addr, b: Ipv4Addr) {
    let cap = Running::start(lab, "host-a", "cpa1", &["--count", "4", "--seconds", "20"]);
    let started = Instant::now();
    assert_eq!(ping(&lab.ns("cpa1"), b, 3), 3);
    let (file, data) = cap.finish();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "ended by --count"
    );
    assert_eq!(data["packets"], 4, "{data}");
    let fields = [
        "frame.interface_name",
        "frame.packet_flags_direction",
        "ip.src",
        "ip.dst",
        "icmp.type",
    ];
    let rows = read(&file, &[], &fields);
    let _ = std::fs::remove_file(&file);
    assert_eq!(rows.len(), 4);
    let (a1, b) = (a1.to_string(), b.to_string());
    let has = |dir: &str, src: &str, dst: &str, icmp: &str| {
        rows.iter()
            .any(|r| r == &["cpa1", dir, src, dst, icmp].map(String::from))
    };
    assert!(has("in", &a1, &b, "8"), "the echo request, sent by cpa1");
    assert!(has("out", &b, &a1, "0"), "the echo reply, written to cpa1");
}

/// `capture underlay`: GRE (in UDP, or raw) between the hosts, the VPC's key, the inner ICMP
/// both ways.
fn underlay(lab: &LabUp, a1: Ipv4Addr, b: Ipv4Addr) {
    let cap = Running::start(lab, "host-a", "underlay", &["--seconds", "3"]);
    assert_eq!(ping(&lab.ns("cpa1"), b, 3), 3);
    let (file, data) = cap.finish();
    let fields = [
        "frame.packet_flags_direction",
        "ip.src",
        "ip.dst",
        "gre.key",
        "icmp.type",
    ];
    let rows = read(&file, &["-d", "udp.port==4754,gre"], &fields);
    let _ = std::fs::remove_file(&file);
    assert_eq!(data["packets"], rows.len(), "{data}");
    let (ha, hb) = ("192.0.2.1", "192.0.2.2");
    let row = |dir: &str, (o1, i1): (&str, &str), (o2, i2): (&str, &str), icmp: &str| {
        let (src, dst) = (format!("{o1},{i1}"), format!("{o2},{i2}"));
        [dir, &src, &dst, &format!("{KEY:#010x}"), icmp].map(String::from)
    };
    let (a1, b) = (a1.to_string(), b.to_string());
    let sent = row("out", (ha, &a1), (hb, &b), "8");
    let got = row("in", (hb, &b), (ha, &a1), "0");
    assert_eq!(
        rows.iter().filter(|r| **r == sent).count(),
        3,
        "requests out"
    );
    assert_eq!(rows.iter().filter(|r| **r == got).count(), 3, "replies in");
}

/// A TCP transfer cpa1 -> cpb while host-a captures the underlay and host-b captures cpb:
/// the segments sent on the underlay are each a whole datagram of at most the underlay's
/// MTU with valid checksums, and every byte of the transfer is in both files.
fn segmented(lab: &LabUp, b: Ipv4Addr) {
    const SIZE: usize = 256 * 1024;
    let wire = Running::start(lab, "host-a", "underlay", &["--seconds", "6"]);
    let port = Running::start(lab, "host-b", "cpb", &["--seconds", "6"]);
    let data = Arc::new(pattern(SIZE, 7));
    let (got, hash) = tcp_transfer(&lab.ns("cpa1"), &lab.ns("cpb"), b, 7001, data.clone());
    assert_eq!((got.len(), hash), (SIZE, Some(fnv(&data))), "the transfer");
    let (file, data) = wire.finish();
    assert_eq!(data["lost"], 0, "{data}");
    let check = ["-d", "udp.port==4754,gre", "-o", "tcp.check_checksum:TRUE"];
    let filter = format!("ip.dst == {b} && tcp.len > 0");
    let fields = [
        "frame.len",
        "ip.checksum.status",
        "tcp.checksum.status",
        "tcp.len",
    ];
    let rows = read(
        &file,
        &[&check[..], &["-o", "ip.check_checksum:TRUE", "-Y", &filter]].concat(),
        &fields,
    );
    let _ = std::fs::remove_file(&file);
    let bytes: usize = rows
        .iter()
        .map(|r| r[3].parse::<usize>().unwrap_or(0))
        .sum();
    assert!(bytes >= SIZE, "{bytes} bytes of {SIZE} on the underlay");
    for r in &rows {
        let len: usize = r[0].parse().unwrap_or(usize::MAX);
        assert!(len <= 1500, "a datagram of {len} bytes: {r:?}");
        assert_eq!(
            (r[1].as_str(), r[2].as_str()),
            ("1,1", "1"),
            "checksums good (1): {r:?}"
        );
    }
    let (file, data) = port.finish();
    assert_eq!(data["lost"], 0, "{data}");
    let rows = read(
        &file,
        &["-Y", &filter],
        &["frame.packet_flags_direction", "tcp.len"],
    );
    let _ = std::fs::remove_file(&file);
    let bytes: usize = rows
        .iter()
        .map(|r| r[1].parse::<usize>().unwrap_or(0))
        .sum();
    assert!(bytes >= SIZE, "{bytes} bytes of {SIZE} written to cpb");
    assert!(rows.iter().all(|r| r[0] == "out"), "written to cpb");
}

/// A daemon stopped during a capture leaves a whole file: its drops are in it.
fn stopped(lab: LabUp, a1: Ipv4Addr, a2: Ipv4Addr) {
    let cap = Running::start(&lab, "host-a", "drops", &["--seconds", "60"]);
    assert_eq!(tcp_ask(&lab.ns("cpa1"), a2, 7000, "x"), None);
    let started = Instant::now();
    drop(lab);
    // The client's answer (if any: the daemon may go before it is sent) does not matter.
    let Running {
        mut child, file, ..
    } = cap;
    let _ = child.wait();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the capture ended with its daemon"
    );
    let rows = read(
        &file,
        &[],
        &["frame.comment", "ip.src", "ip.dst", "tcp.dstport"],
    );
    let _ = std::fs::remove_file(&file);
    assert!(
        rows.iter()
            .any(|r| r[1] == a1.to_string() && r[2] == a2.to_string() && r[3] == "7000"),
        "the drops before the daemon stopped"
    );
}
