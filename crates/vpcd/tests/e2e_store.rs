//! End to end, `vpcd run --store` (`vpcd lab up --store`): a change applied to the store
//! reaches every host (`ctl status`: the store revision) and traffic follows it; with etcd
//! stopped traffic goes on as last applied; etcd back, the hosts catch up with a change made
//! while they were away.

#![cfg(feature = "store")]

#[path = "e2e/common.rs"]
mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const TOPOLOGY: &str = r#"
[[host]]
name = "host-a"
address = "192.0.2.1"

[[host]]
name = "host-b"
address = "192.0.2.2"

[[vpc]]
name = "vpc-st"
tenant = "t-st"
cidr = "10.78.0.0/16"

[[subnet]]
name = "net-st"
vpc = "vpc-st"
cidr = "10.78.1.0/24"

[[security_group]]
name = "sg-st"
ingress = [ { action = "accept", protocol = "icmp", source = "10.78.0.0/16" } ]
egress  = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "sta"
host = "host-a"
subnet = "net-st"
ip = "10.78.1.10"
security_groups = ["sg-st"]
netns = "st-a"

[[instance]]
name = "stb"
host = "host-b"
subnet = "net-st"
ip = "10.78.1.11"
security_groups = ["sg-st"]
netns = "st-b"
"#;

const ICMP: &str = r#"{ action = "accept", protocol = "icmp", source = "10.78.0.0/16" }"#;
const TCP22: &str =
    r#"{ action = "accept", protocol = "tcp", port = 22, source = "10.78.0.0/16" }"#;

/// An etcd the test restarted; killed by its pid when dropped.
struct Restarted(Child);

impl Drop for Restarted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test's topology with icmp admitted or not, as the lab runs it (prefixed), applied to
/// the store from the underlay namespace.
fn try_apply(lab: &LabUp, icmp: bool) -> std::process::Output {
    let text = if icmp {
        TOPOLOGY.to_string()
    } else {
        TOPOLOGY.replace(ICMP, TCP22)
    };
    let text = vpcd::lab::prefixed_topology(&text, "store test", &lab.lab.prefix()).unwrap();
    let file = lab.lab.dir().join("next.toml");
    std::fs::write(&file, text).expect("write");
    let url = lab.lab.store_url();
    exec_in(
        &lab.ns("underlay"),
        &[VPCD, "apply", file.to_str().unwrap(), "--store", &url],
    )
}

/// [`try_apply`], which must succeed: the revision written.
fn apply(lab: &LabUp, icmp: bool) -> i64 {
    let o = try_apply(lab, icmp);
    assert!(o.status.success(), "vpcd apply: {}", show(&o));
    applied_revision(&String::from_utf8_lossy(&o.stdout))
}

/// The store revision a host's daemon has applied.
fn revision(lab: &LabUp, host: &str) -> i64 {
    let o = vpcd(&["lab", "ctl", "--name", lab.name(), host, "--json", "status"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    v["data"]["store_revision"].as_i64().unwrap_or(0)
}

/// Waits until every host has applied `rev` (at most `secs`).
fn converge(lab: &LabUp, rev: i64, secs: u64) -> Duration {
    let start = Instant::now();
    for host in ["host-a", "host-b"] {
        while revision(lab, host) < rev {
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "{host} did not reach store revision {rev} in {secs} s (it has {})",
                revision(lab, host)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    start.elapsed()
}

fn applied_revision(out: &str) -> i64 {
    out.split_whitespace()
        .nth(2)
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {out:?}"))
}

fn store_pid(lab: &LabUp) -> u32 {
    let journal = std::fs::read_to_string(lab.lab.dir().join("journal")).expect("journal");
    journal
        .lines()
        .filter_map(|l| l.strip_prefix("store "))
        .filter_map(|p| p.trim().parse().ok())
        .next_back()
        .expect("the store's pid in the journal")
}

/// Stops the lab's etcd (SIGTERM, by its pid), waiting until it is gone.
fn stop_store(lab: &LabUp) {
    let pid = store_pid(lab);
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the lab's etcd again (its data kept) and applies a change (icmp no longer
/// admitted) as soon as it answers: before the hosts, still backing off, reconnect.
fn restart_store_and_apply(lab: &LabUp) -> (Restarted, i64) {
    let etcd = Restarted(
        Command::new("ip")
            .args(["netns", "exec", &lab.ns("underlay")])
            .args(lab.lab.etcd_args())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd restarts"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = try_apply(lab, false);
        if o.status.success() {
            return (etcd, applied_revision(&String::from_utf8_lossy(&o.stdout)));
        }
        assert!(
            Instant::now() < deadline,
            "etcd did not come back: {}",
            show(&o)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn hosts_follow_the_store_and_ride_out_its_outage() {
    if !can_run(
        "hosts_follow_the_store_and_ride_out_its_outage",
        &[Tool::Ip, Tool::Ping, Tool::Etcd],
    ) {
        return;
    }
    let lab = LabUp::start_store("st", TOPOLOGY);
    let (a, b) = (lab.ns("sta"), lab.ip("stb"));
    assert_eq!(ping(&a, b, 3), 3, "the first state forwards");
    assert!(revision(&lab, "host-a") > 0);
    let o = vpcd(&["lab", "status", "--name", lab.name()]);
    assert!(
        o.status.success(),
        "lab status knows its store daemons: {}",
        show(&o)
    );

    // A change reaches every host, and traffic follows it.
    let rev = apply(&lab, false);
    let took = converge(&lab, rev, 10);
    eprintln!("store revision {rev} on both hosts after {took:?}");
    assert_eq!(ping(&a, b, 3), 0, "icmp is no longer admitted");
    let rev = apply(&lab, true);
    converge(&lab, rev, 10);
    assert_eq!(ping(&a, b, 3), 3);

    // The store goes away: forwarding goes on with the last applied state.
    stop_store(&lab);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ping(&a, b, 3), 3, "traffic goes on without the store");
    assert_eq!(revision(&lab, "host-a"), rev);
    let log = std::fs::read_to_string(lab.lab.log_path("host-a")).unwrap_or_default();
    assert_eq!(
        log.matches("store unreachable").count(),
        1,
        "logged once:\n{log}"
    );

    // Back, with a change made before the hosts reconnect: they catch up.
    let (etcd, rev) = restart_store_and_apply(&lab);
    let took = converge(&lab, rev, 30);
    eprintln!("caught up with store revision {rev} {took:?} after the store came back");
    assert_eq!(ping(&a, b, 3), 0, "the change made meanwhile is in force");
    drop(etcd);
}
