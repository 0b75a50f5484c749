//! End-to-end tests of the operator surface on a running lab: `vpcd ctl` over the control
//! socket (status, reload with its errors, stats, clear-counters), malformed requests, and the
//! Prometheus metrics read by a real Prometheus parser (python3-prometheus-client) against the
//! traffic the test sent.

#[path = "e2e/common.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;

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
    let sock = format!("/run/vpcd/{}.sock", lab.lab.host_ns("host-a"));
    let mut all = vec!["ctl", "--control", &sock];
    all.extend_from_slice(args);
    vpcd(&all)
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(o)))
}

/// Samples of a metric family, parsed by prometheus_client's own parser: `labels -> value`.
fn scrape(text: &str, family: &str) -> Vec<(serde_json::Value, f64)> {
    let code = format!(
        "import sys, json\nfrom prometheus_client.parser import text_string_to_metric_families as p\n\
         out = [[s.labels, s.value] for f in p(sys.stdin.read()) for s in f.samples if f.name == {family:?}]\n\
         print(json.dumps(out))"
    );
    let mut child = Command::new(python())
        .args(["-c", &code])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "the Prometheus parser refused: {}",
        show(&o)
    );
    serde_json::from_slice(&o.stdout).unwrap()
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
