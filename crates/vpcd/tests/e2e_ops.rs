//! End-to-end tests of the operator surface on a running lab: `vpcd ctl` over the control
//! socket (status, reload with its errors, stats, clear-counters), malformed requests, and the
//! Prometheus metrics read by a real Prometheus parser (python3-prometheus-client) against the
//! traffic the test sent.

#[path = "e2e/common.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use common::*;

fn topology(extra_rule: &str) -> String {
    format!(
        r#"
[[host]]
name = "host-a"
address = "192.0.2.1"

[[vpc]]
name = "vpc-ops"
tenant = "t-ops"
cidr = "10.77.0.0/16"

[[subnet]]
name = "net-ops"
vpc = "vpc-ops"
cidr = "10.77.1.0/24"

[[security_group]]
name = "sg-ops"
ingress = [ {{ action = "accept", protocol = "icmp", source = "10.77.0.0/16" }}{extra_rule} ]
egress  = [ {{ action = "accept", protocol = "all", destination = "0.0.0.0/0" }} ]

[[instance]]
name = "opa"
host = "host-a"
subnet = "net-ops"
ip = "10.77.1.10"
security_groups = ["sg-ops"]
netns = "ops-a"

[[instance]]
name = "opb"
host = "host-a"
subnet = "net-ops"
ip = "10.77.1.11"
security_groups = ["sg-ops"]
netns = "ops-b"
"#
    )
}

fn ctl(lab: &LabUp, args: &[&str]) -> std::process::Output {
    ctl_at(lab, "host-a", args)
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(o)))
}

fn value(samples: &[(serde_json::Value, f64)], key: &str, want: &str) -> f64 {
    samples
        .iter()
        .filter(|(l, _)| l[key] == want && l.get("rule").is_none())
        .map(|(_, v)| *v)
        .sum()
}

#[test]
fn ctl_status_stats_metrics_clear_and_reload() {
    if !can_run(
        "ctl_status_stats_metrics_clear_and_reload",
        &[Tool::Ip, Tool::Ping],
    ) {
        return;
    }
    let lab = LabUp::start("ops", &topology(""));
    let o = ctl(&lab, &["--json", "status"]);
    assert!(o.status.success(), "{}", show(&o));
    let s = json(&o);
    assert_eq!(s["ok"], true);
    assert_eq!(s["data"]["generation"], 1);
    assert_eq!(s["data"]["host"], "host-a");
    assert_eq!(s["data"]["topology_hash"].as_str().unwrap().len(), 16);

    // Traffic the counters must show: 5 pings a -> b, and 3 TCP SYNs the groups drop.
    let (a, b) = (lab.ns("opa"), lab.ns("opb"));
    assert_eq!(ping(&a, lab.ip("opb"), 5), 5);
    assert_eq!(tcp_ask(&a, lab.ip("opb"), 7000, "x"), None);
    let o = ctl(&lab, &["stats", "--prometheus"]);
    assert!(o.status.success(), "{}", show(&o));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let rx = scrape(&text, "vpcd_instance_rx_packets");
    assert!(value(&rx, "instance", "opb") >= 5.0, "{rx:?}");
    assert!(value(&rx, "instance", "opa") >= 5.0, "echo replies: {rx:?}");
    let drops = scrape(&text, "vpcd_drops");
    let sg: f64 = drops
        .iter()
        .filter(|(l, _)| l["reason"] == "SgIngress")
        .map(|(l, v)| {
            assert_eq!(l["rule"], "[sg-ops]:ingress#no-match", "{l}");
            *v
        })
        .sum();
    assert!(sg >= 1.0, "the SYNs' drops by their rule: {drops:?}");
    assert!(drops.iter().all(|(l, _)| l["host"] == "host-a"));

    // clear-counters zeroes them; new traffic counts from zero.
    assert!(ctl(&lab, &["clear-counters"]).status.success());
    let o = ctl(&lab, &["--json", "stats"]);
    let m = json(&o);
    assert_eq!(
        m["data"]["instance.opb.received"].as_u64().unwrap_or(0),
        0,
        "{m}"
    );
    assert_eq!(ping(&b, lab.ip("opa"), 2), 2);
    let m = json(&ctl(&lab, &["--json", "stats"]));
    assert_eq!(m["data"]["instance.opa.received"], 2, "{m}");

    // Garbage on the socket: an error reply, and the daemon goes on.
    let sock = format!("/run/vpcd/{}.sock", lab.lab.host_ns("host-a"));
    let s = UnixStream::connect(&sock).unwrap();
    (&s).write_all(b"{\"cmd\": \"format-disk\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(
        line.contains("\"ok\":false") && line.contains("malformed request"),
        "{line}"
    );
    drop(s);

    // A broken topology: reload refuses with the file and line; the running one stays.
    let path = lab.lab.topology_path();
    let good = std::fs::read_to_string(&path).unwrap();
    // The second instance names a group that does not exist.
    let needle = "security_groups = [\"sg-ops\"]";
    let at = good.rfind(needle).expect("the lab's copy names sg-ops");
    let rest = &good[at + needle.len()..];
    let broken = format!("{}security_groups = [\"sg-nope\"]{rest}", &good[..at]);
    std::fs::write(&path, broken).unwrap();
    let o = ctl(&lab, &["reload"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("reload refused") && err.contains("sg-nope") && err.contains("topology.toml:"),
        "{err}"
    );
    assert_eq!(ping(&a, lab.ip("opb"), 2), 2, "the running topology stays");
    // A good one: admitted, generation 2, and TCP 7000 now passes.
    // (The lab's copy is the topology re-written with its namespaces prefixed.)
    let icmp = "protocol = \"icmp\"\nsource = \"10.77.0.0/16\"\n";
    let tcp = "\n[[security_group.ingress]]\naction = \"accept\"\nprotocol = \"tcp\"\nport = \"7000\"\nsource = \"10.77.0.0/16\"\n";
    assert!(good.contains(icmp), "the lab's copy:\n{good}");
    std::fs::write(&path, good.replacen(icmp, &format!("{icmp}{tcp}"), 1)).unwrap();
    let o = ctl(&lab, &["reload"]);
    assert!(o.status.success(), "{}", show(&o));
    let s = json(&ctl(&lab, &["--json", "status"]));
    assert_eq!(s["data"]["generation"], 2, "{s}");
    assert_eq!(s["data"]["last_reload"]["ok"], true, "{s}");
    let (ok, _) = tcp_reaches(&a, &b, lab.ip("opb"), 7000);
    assert!(ok, "TCP 7000 admitted after the reload");
}

/// Two hosts: flows-a (fla, flb) and flows-b (flc); ICMP and TCP 7000 admitted inside the VPC.
const FLOWS_TOPOLOGY: &str = r#"
[[host]]
name = "host-a"
address = "192.0.2.1"
[[host]]
name = "host-b"
address = "192.0.2.2"

[[vpc]]
name = "vpc-flows"
tenant = "t-flows"
cidr = "10.78.0.0/16"

[[subnet]]
name = "net-flows"
vpc = "vpc-flows"
cidr = "10.78.1.0/24"

[[security_group]]
name = "sg-flows"
ingress = [
  { action = "accept", protocol = "icmp", source = "10.78.0.0/16" },
  { action = "accept", protocol = "tcp", port = "7000", source = "10.78.0.0/16" },
]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "fla"
host = "host-a"
subnet = "net-flows"
ip = "10.78.1.10"
security_groups = ["sg-flows"]
netns = "flows-a"

[[instance]]
name = "flb"
host = "host-a"
subnet = "net-flows"
ip = "10.78.1.11"
security_groups = ["sg-flows"]
netns = "flows-b"

[[instance]]
name = "flc"
host = "host-b"
subnet = "net-flows"
ip = "10.78.1.12"
security_groups = ["sg-flows"]
netns = "flows-c"
"#;

/// `vpcd ctl --json ARGS` on `host`'s daemon: the reply's `data`, the command asserted to succeed.
fn ctl_data(lab: &LabUp, host: &str, args: &[&str]) -> serde_json::Value {
    let sock = format!("/run/vpcd/{}.sock", lab.lab.host_ns(host));
    let mut all = vec!["ctl", "--control", &sock, "--json"];
    all.extend_from_slice(args);
    let o = vpcd(&all);
    assert!(o.status.success(), "vpcd {}: {}", all.join(" "), show(&o));
    json(&o)["data"].clone()
}

/// The listed connections of `data` (`ctl flows --json`).
fn flows_of(data: &serde_json::Value) -> Vec<serde_json::Value> {
    data["flows"].as_array().cloned().unwrap_or_default()
}

/// The one listed connection of `instance` with this protocol and destination.
fn flow<'a>(
    rows: &'a [serde_json::Value],
    instance: &str,
    protocol: &str,
    dst: &str,
) -> &'a serde_json::Value {
    let found: Vec<_> = rows
        .iter()
        .filter(|r| r["instance"] == instance && r["protocol"] == protocol && r["dst"] == dst)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{instance} {protocol} to {dst} in {rows:#?}"
    );
    found[0]
}

/// A TCP connection from `src_ns` to a listener in `dst_ns` at `dst:7000`: the client sends
/// `up` bytes, the server answers `down` bytes; both ends are returned, still open.
fn tcp_held(
    src_ns: &str,
    dst_ns: &str,
    dst: std::net::Ipv4Addr,
    up: usize,
    down: usize,
) -> (std::net::TcpStream, std::net::TcpStream) {
    use std::io::Read;
    let listener = in_ns(dst_ns, || {
        std::net::TcpListener::bind("0.0.0.0:7000").unwrap()
    });
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = vec![0u8; up];
        s.read_exact(&mut got).unwrap();
        s.write_all(&vec![7u8; down]).unwrap();
        s
    });
    let mut client = in_ns(src_ns, move || {
        let to = std::net::SocketAddr::from((dst, 7000));
        std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(3)).unwrap()
    });
    client.write_all(&vec![1u8; up]).unwrap();
    let mut back = vec![0u8; down];
    client.read_exact(&mut back).unwrap();
    (client, server.join().unwrap())
}

/// `vpcd ctl flows` lists the connections of known traffic (ICMP echo, a TCP connection held
/// open) with their 5-tuple, state and packets and bytes each way; `--instance` filters;
/// `--flush` removes them. The instances' byte counters match the traffic in `ctl stats` and
/// in the Prometheus text, a packet the groups refuse is the receiver's `received_dropped`,
/// and traffic to the other host shows in the underlay counters of both.
#[test]
fn ctl_flows_and_traffic_counters() {
    if !can_run("ctl_flows_and_traffic_counters", &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let lab = LabUp::start("flows", FLOWS_TOPOLOGY);
    let (a, b) = (lab.ns("fla"), lab.ns("flb"));
    assert_eq!(ping(&a, lab.ip("flb"), 1), 1, "the lab is up");
    ctl_data(&lab, "host-a", &["flows", "--flush"]);
    ctl_data(&lab, "host-a", &["clear-counters"]);
    echo_bytes_counted(&lab);
    let (mut client, _server) = tcp_held(&a, &b, lab.ip("flb"), 1000, 500);
    let sport = client.local_addr().unwrap().port();
    std::thread::sleep(std::time::Duration::from_millis(300));
    flows_listed(&lab, sport);
    refused_syn_counted(&lab);
    underlay_counted(&lab);
    flush_removes(&lab);
    // The held connection's next segment is judged by the rules again (port 7000: picked up).
    let misses = ctl_data(&lab, "host-a", &["stats"])["cache_misses"]
        .as_u64()
        .unwrap();
    client.write_all(b"more").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let m = ctl_data(&lab, "host-a", &["stats"]);
    assert!(m["cache_misses"].as_u64().unwrap() > misses, "{m:#}");
    let again = flows_of(&ctl_data(&lab, "host-a", &["flows", "--instance", "fla"]));
    let t = flow(&again, "fla", "tcp", &lab.ip("flb").to_string());
    assert_eq!(
        (&t["sport"], &t["state"]),
        (&sport.into(), &"ESTABLISHED".into()),
        "{t}"
    );
    assert!(
        t["original"]["packets"].as_u64().unwrap() <= 2,
        "a new entry: {t}"
    );
}

/// 4 echo requests of 100 bytes of data: 128 bytes each at the IP level, both ways, in the
/// statistics and the Prometheus text.
fn echo_bytes_counted(lab: &LabUp) {
    let (a, ip_b) = (lab.ns("fla"), lab.ip("flb"));
    assert_eq!(ping_with(&a, ip_b, 4, &["-s", "100"]), 4);
    let m = ctl_data(lab, "host-a", &["stats"]);
    for (key, want) in [
        ("instance.fla.sent", 4),
        ("instance.fla.sent_bytes", 4 * 128),
        ("instance.flb.received_bytes", 4 * 128),
        ("instance.flb.sent_bytes", 4 * 128),
        ("instance.fla.received_bytes", 4 * 128),
    ] {
        assert_eq!(m[key], want, "{key}: {m:#}");
    }
    let text = String::from_utf8_lossy(&ctl(lab, &["stats", "--prometheus"]).stdout).to_string();
    let rx = scrape(&text, "vpcd_instance_rx_bytes");
    assert_eq!(value(&rx, "instance", "flb"), 512.0, "{rx:?}");
    let tx = scrape(&text, "vpcd_instance_tx_bytes");
    assert_eq!(value(&tx, "instance", "fla"), 512.0, "{tx:?}");
}

/// The echo's and the TCP connection's entries, on both sides, with their 5-tuple, state,
/// counters and cached verdicts; `--instance` filters; the text names them.
fn flows_listed(lab: &LabUp, sport: u16) {
    let (ip_a, ip_b) = (lab.ip("fla"), lab.ip("flb"));
    let all = flows_of(&ctl_data(lab, "host-a", &["flows"]));
    let echo = flow(&all, "fla", "icmp", &ip_b.to_string());
    assert_eq!(echo["src"], ip_a.to_string());
    assert_eq!(echo["network"], "vpc-flows");
    assert_eq!(echo["state"], "REPLIED");
    assert_eq!(
        echo["original"],
        serde_json::json!({"packets": 4, "bytes": 512})
    );
    assert_eq!(
        echo["reply"],
        serde_json::json!({"packets": 4, "bytes": 512})
    );
    for side in ["fla", "flb"] {
        let t = flow(&all, side, "tcp", &ip_b.to_string());
        assert_eq!(
            (&t["src"], &t["sport"]),
            (&ip_a.to_string().into(), &sport.into()),
            "{t}"
        );
        assert_eq!(t["dport"], 7000, "{t}");
        assert_eq!(t["state"], "ESTABLISHED", "{t}");
        assert!(t["left_ms"].as_u64().unwrap() > 400_000_000, "{t}");
        let (up, down) = (&t["original"], &t["reply"]);
        let (up_p, down_p) = (
            up["packets"].as_u64().unwrap(),
            down["packets"].as_u64().unwrap(),
        );
        assert!(
            up_p >= 3 && down_p >= 2,
            "SYN, ACK, data; SYN-ACK, data: {t}"
        );
        // Each packet carries at least its 40 bytes of headers, the data at least once.
        assert!(up["bytes"].as_u64().unwrap() >= 1000 + 40 * up_p, "{t}");
        assert!(down["bytes"].as_u64().unwrap() >= 500 + 40 * down_p, "{t}");
        assert_eq!(t["verdict"]["original"], "deliver flb", "{t}");
        assert_eq!(t["verdict"]["reply"], "deliver fla", "{t}");
    }
    let only_b = flows_of(&ctl_data(lab, "host-a", &["flows", "--instance", "flb"]));
    assert!(
        !only_b.is_empty() && only_b.iter().all(|r| r["instance"] == "flb"),
        "{only_b:#?}"
    );
    assert_eq!(
        only_b.len() + flows_of(&ctl_data(lab, "host-a", &["flows", "--instance", "fla"])).len(),
        all.len()
    );
    let o = ctl(lab, &["flows"]);
    let people = String::from_utf8_lossy(&o.stdout);
    assert!(
        people.contains("ESTABLISHED") && people.contains(&format!("{} connections", all.len())),
        "{people}"
    );
}

/// A SYN to a port the groups refuse: dropped for flb, counted as flb's, by reason too.
fn refused_syn_counted(lab: &LabUp) {
    let (a, ip_b) = (lab.ns("fla"), lab.ip("flb"));
    assert_eq!(tcp_ask(&a, ip_b, 7001, "x"), None);
    let m = ctl_data(lab, "host-a", &["stats"]);
    assert!(
        m["instance.flb.received_dropped"].as_u64().unwrap() >= 1,
        "{m:#}"
    );
    assert_eq!(m["instance.fla.received_dropped"], 0, "{m:#}");
    let text = String::from_utf8_lossy(&ctl(lab, &["stats", "--prometheus"]).stdout).to_string();
    let dropped = scrape(&text, "vpcd_instance_rx_dropped_packets");
    assert!(value(&dropped, "instance", "flb") >= 1.0, "{dropped:?}");
    assert!(
        m["instance.flb.received_drop.SgIngress"].as_u64().unwrap() >= 1,
        "{m:#}"
    );
    let by_reason = scrape(&text, "vpcd_instance_drops");
    let sg: f64 = by_reason
        .iter()
        .filter(|(l, _)| l["instance"] == "flb" && l["way"] == "rx" && l["reason"] == "SgIngress")
        .map(|(_, v)| *v)
        .sum();
    assert!(sg >= 1.0, "{by_reason:?}");
}

/// To the other host: through the underlay, counted on both, and listed on host-b.
fn underlay_counted(lab: &LabUp) {
    let (a, ip_c) = (lab.ns("fla"), lab.ip("flc"));
    assert_eq!(ping_with(&a, ip_c, 3, &["-s", "200"]), 3);
    for host in ["host-a", "host-b"] {
        let m = ctl_data(lab, host, &["stats"]);
        for dir in ["rx", "tx"] {
            let p = m[format!("underlay.{dir}_packets")].as_u64().unwrap();
            let bytes = m[format!("underlay.{dir}_bytes")].as_u64().unwrap();
            assert!(p >= 3 && bytes >= p * 228, "{host} {dir}: {m:#}");
        }
        let text = String::from_utf8_lossy(
            &vpcd(&[
                "ctl",
                "--control",
                &format!("/run/vpcd/{}.sock", lab.lab.host_ns(host)),
                "stats",
                "--prometheus",
            ])
            .stdout,
        )
        .to_string();
        let tx = scrape(&text, "vpcd_underlay_tx_bytes");
        assert!(
            tx.iter().map(|(_, v)| *v).sum::<f64>() >= 3.0 * 228.0,
            "{host}: {tx:?}"
        );
    }
    let on_b = flows_of(&ctl_data(lab, "host-b", &["flows"]));
    let echo = flow(&on_b, "flc", "icmp", &ip_c.to_string());
    assert_eq!(
        echo["original"],
        serde_json::json!({"packets": 3, "bytes": 3 * 228})
    );
}

/// Flush one instance's, then the rest: nothing left; an unknown instance is an error.
fn flush_removes(lab: &LabUp) {
    let mine = flows_of(&ctl_data(lab, "host-a", &["flows", "--instance", "fla"])).len();
    let d = ctl_data(lab, "host-a", &["flows", "--flush", "--instance", "fla"]);
    assert_eq!(d["flushed"], mine, "{d}");
    assert!(flows_of(&ctl_data(lab, "host-a", &["flows", "--instance", "fla"])).is_empty());
    let rest = flows_of(&ctl_data(lab, "host-a", &["flows"]));
    assert!(
        !rest.is_empty() && rest.iter().all(|r| r["instance"] == "flb"),
        "{rest:#?}"
    );
    let d = ctl_data(lab, "host-a", &["flows", "--flush"]);
    assert_eq!(d["flushed"], rest.len(), "{d}");
    assert!(flows_of(&ctl_data(lab, "host-a", &["flows"])).is_empty());
    let o = ctl(lab, &["flows", "--instance", "nobody"]);
    assert!(!o.status.success(), "{}", show(&o));
}
