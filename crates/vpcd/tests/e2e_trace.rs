//! End-to-end tests of `vpcd trace` (offline) and `vpcd lab ctl HOST trace` (live, through a
//! daemon's control socket): each trace's verdict is checked against real traffic between the
//! lab's namespaces, and the live one against the daemon's own tables.

#[path = "e2e/common.rs"]
mod common;

use std::net::Ipv4Addr;

use common::*;
use serde_json::Value;

const TOPOLOGY: &str = r#"
[underlay]
transport = "gre"

[[host]]
name = "host-a"
address = "192.0.2.1"

[[host]]
name = "host-b"
address = "192.0.2.2"

[[vpc]]
name = "vpc-tr"
tenant = "t-tr"
cidr = "10.78.0.0/16"
key = 7801

[[subnet]]
name = "net-tr"
vpc = "vpc-tr"
cidr = "10.78.1.0/24"

[[security_group]]
name = "sg-tr"
ingress = [
  { action = "accept", protocol = "tcp", port = "80", source = "10.78.0.0/16" },
  { action = "accept", protocol = "udp", port = "5300", source = "10.78.0.0/16" },
  { action = "accept", protocol = "icmp", source = "10.78.0.0/16" },
]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "tra"
host = "host-a"
subnet = "net-tr"
ip = "10.78.1.10"
security_groups = ["sg-tr"]
netns = "tr-a"

[[instance]]
name = "trb"
host = "host-b"
subnet = "net-tr"
ip = "10.78.1.20"
security_groups = ["sg-tr"]
netns = "tr-b"
"#;

fn json(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "{}", show(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(o)))
}

/// The stages of a trace named `stage` on `host`.
fn stages<'a>(t: &'a Value, host: &str, stage: &str) -> Vec<&'a Value> {
    t["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .filter(|s| s["host"] == host && s["stage"] == stage)
        .collect()
}

fn offline(file: &str, proto: &str, port: Option<&str>) -> Value {
    let mut args = vec![
        "trace",
        file,
        "--from",
        "tra",
        "--to",
        "trb",
        "--protocol",
        proto,
        "--json",
    ];
    if let Some(p) = port {
        args.extend(["--port", p]);
    }
    json(&vpcd(&args))
}

#[test]
fn traces_agree_with_real_traffic_offline_and_live() {
    let test = "traces_agree_with_real_traffic_offline_and_live";
    if !can_run(test, &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let lab = LabUp::start("e2e_trace", TOPOLOGY);
    let file = std::env::temp_dir().join("vpcd-e2e-trace-topology.toml");
    std::fs::write(&file, TOPOLOGY).unwrap();
    let file = file.to_str().unwrap().to_string();
    let (a, b) = (lab.ns("tra"), lab.ns("trb"));
    let b_ip = lab.ip("trb");

    // Admitted: the trace says delivered, with each half on its host, and so does TCP.
    let t = offline(&file, "tcp", Some("80"));
    assert_eq!(t["verdict"], "delivered", "{t:#}");
    assert_eq!(
        (&t["host"], &t["instance"]),
        (&"host-b".into(), &"trb".into())
    );
    let wire = stages(&t, "host-a", "wire");
    assert_eq!(wire.len(), 1, "{t:#}");
    assert_eq!(wire[0]["key"], format!("{:#010x}", 7801), "{t:#}");
    assert_eq!(wire[0]["transport"], "gre");
    let sg_b = stages(&t, "host-b", "security-group");
    assert_eq!(sg_b[0]["rule"], "sg-tr:ingress#1", "{t:#}");
    assert_eq!(sg_b[0]["result"], "accept");
    assert!(stages(&t, "host-b", "wire").is_empty(), "{t:#}");
    assert!(
        tcp_reaches(&a, &b, b_ip, 80).0,
        "tra -> trb:80 should connect"
    );

    // Dropped: the trace names the stage, the rule and the host, and the real SYNs are
    // dropped there for that reason.
    let t = offline(&file, "tcp", Some("8080"));
    assert_eq!(t["verdict"], "dropped", "{t:#}");
    assert_eq!(t["reason"], "SgIngress");
    assert_eq!(t["stage"], "security-group");
    assert_eq!(t["rule"], "[sg-tr]:ingress#no-match");
    assert_eq!(t["host"], "host-b");
    let before = lab.stats();
    let (reached, seen) = tcp_reaches(&a, &b, b_ip, 8080);
    let after = lab.stats();
    assert!(
        !reached && seen.is_empty(),
        "8080 should be dropped: {seen:?}"
    );
    assert!(
        after.dropped(&before, "host-b", "SgIngress") >= 1,
        "{}",
        after.diff(&before)
    );

    live_trace_reads_the_daemons_tables(&lab, &a, b_ip);
    lab_ctl_refuses_an_unknown_host(&lab);
    let _ = std::fs::remove_file(&file);
}

/// After real UDP traffic from the probe's own source port, host-a's daemon traces the probe
/// with its tables: the flow cache holds the flow's decision and the connection is there.
fn live_trace_reads_the_daemons_tables(lab: &LabUp, a: &str, b_ip: Ipv4Addr) {
    let code = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('', 49152))\nfor _ in range(3): s.sendto(b'x', ('{b_ip}', 5300))\n"
    );
    python_in(a, &["-c", &code]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let args = [
        "lab",
        "ctl",
        "--name",
        lab.name(),
        "host-a",
        "--json",
        "trace",
        "--from",
        "tra",
        "--to",
        "trb",
        "--protocol",
        "udp",
        "--port",
        "5300",
    ];
    let reply = json(&vpcd(&args));
    assert_eq!(reply["ok"], true, "{reply:#}");
    let t = &reply["data"];
    assert_eq!(t["verdict"], "delivered", "{t:#}");
    let cache = stages(t, "host-a", "cache");
    assert_eq!(cache[0]["entry"], "cached", "{t:#}");
    assert_eq!(cache[0]["live"], true, "{t:#}");
    let ct = stages(t, "host-a", "conntrack");
    assert_eq!(ct[0]["entry"], "UNREPLIED", "{t:#}");
    // host-b's part is traced with empty tables by host-a's daemon.
    assert_eq!(stages(t, "host-b", "entry")[0]["live"], false, "{t:#}");

    // The same through host-b's daemon: its own part live, and it saw the datagrams.
    let args = [
        "lab",
        "ctl",
        "--name",
        lab.name(),
        "host-b",
        "trace",
        "--from",
        "tra",
        "--to",
        "trb",
        "--protocol",
        "udp",
        "--port",
        "5300",
    ];
    let o = vpcd(&args);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", show(&o));
    assert!(text.contains("host-b (live tables)"), "{text}");
    assert!(
        text.contains("verdict: delivered to trb on host-b"),
        "{text}"
    );
}

fn lab_ctl_refuses_an_unknown_host(lab: &LabUp) {
    let o = vpcd(&["lab", "ctl", "--name", lab.name(), "host-z", "status"]);
    assert!(!o.status.success(), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no host \"host-z\"") && err.contains("host-a, host-b"),
        "{err}"
    );
    let o = vpcd(&["lab", "ctl", "--name", lab.name(), "host-a", "status"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("host host-a"),
        "{}",
        show(&o)
    );
}
