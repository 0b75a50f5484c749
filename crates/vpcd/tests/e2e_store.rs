//! End to end, `vpcd run --store` (`vpcd lab up --store`): a change applied to the store
//! reaches every host (`ctl status`: the store revision) and traffic follows it; with etcd
//! stopped traffic goes on as last applied; etcd back, the hosts catch up with a change made
//! while they were away. A host's daemon killed and restarted (`vpcd lab restart`) comes back
//! at the store's revision and a TCP connection held across it carries data both ways. A
//! rollout of 100 revisions (`vpcd lab reload`, which is `vpcd apply` in a store lab) while
//! traffic runs: nothing crosses tenants, nothing denied is delivered, nothing is lost.

#![cfg(feature = "store")]

#[path = "e2e/common.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
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
    status(lab, host)["store_revision"].as_i64().unwrap_or(0)
}

/// Waits until every host has applied `rev` (at most `secs` in all).
fn converge(lab: &LabUp, rev: i64, secs: u64) -> Duration {
    let start = Instant::now();
    for host in ["host-a", "host-b"] {
        host_converges_since(lab, host, rev, start, secs);
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

// ----------------------------------------------------------------------------------------------
// Through `vpcd lab reload` (a store lab's reload is `vpcd apply`) and `vpcd lab restart`

/// `vpcd lab reload FILE` with `text` as FILE (the lab prefixes it): in a store lab, `vpcd
/// apply` to the lab's store, its output.
fn lab_reload(lab: &LabUp, text: &str) -> std::process::Output {
    let file = std::env::temp_dir().join(format!("vpcd-e2e-{}-next.toml", lab.name()));
    std::fs::write(&file, text).expect("write");
    let o = vpcd(&[
        "lab",
        "reload",
        file.to_str().unwrap(),
        "--name",
        lab.name(),
    ]);
    let _ = std::fs::remove_file(&file);
    o
}

/// [`lab_reload`], which must apply: the revision written, from `applied: revision N`.
fn reload_applied(lab: &LabUp, text: &str) -> i64 {
    let o = lab_reload(lab, text);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "vpcd lab reload: {}", show(&o));
    let line = out
        .lines()
        .find(|l| l.starts_with("applied: revision "))
        .unwrap_or_else(|| panic!("lab reload did not apply: {}", show(&o)));
    applied_revision(line)
}

/// Waits until `host` has applied `rev` (at most `secs`); how long that took.
fn host_converges(lab: &LabUp, host: &str, rev: i64, secs: u64) -> Duration {
    host_converges_since(lab, host, rev, Instant::now(), secs)
}

/// Waits until `host` has applied `rev`, at most `secs` after `start`; how long since `start`.
fn host_converges_since(lab: &LabUp, host: &str, rev: i64, start: Instant, secs: u64) -> Duration {
    while revision(lab, host) < rev {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{host} did not reach store revision {rev} in {secs} s (it has {})",
            revision(lab, host)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// Two instances of one tenant on two hosts; tcp 7100 admitted, icmp too when `icmp`;
/// host-b at `b_address`.
fn restart_topology(icmp: bool, b_address: &str) -> String {
    let icmp = if icmp { ICMP_RS } else { "" };
    format!(
        r#"
[[host]]
name = "host-a"
address = "192.0.2.1"

[[host]]
name = "host-b"
address = "{b_address}"

[[vpc]]
name = "vpc-rs"
tenant = "t-rs"
cidr = "10.79.0.0/16"

[[subnet]]
name = "net-rs"
vpc = "vpc-rs"
cidr = "10.79.1.0/24"

[[security_group]]
name = "sg-rs"
ingress = [ {{ action = "accept", protocol = "tcp", port = 7100, source = "10.79.0.0/16" }},{icmp} ]
egress  = [ {{ action = "accept", protocol = "all", destination = "0.0.0.0/0" }} ]

[[instance]]
name = "rsa"
host = "host-a"
subnet = "net-rs"
ip = "10.79.1.10"
security_groups = ["sg-rs"]
netns = "rs-a"

[[instance]]
name = "rsb"
host = "host-b"
subnet = "net-rs"
ip = "10.79.1.11"
security_groups = ["sg-rs"]
netns = "rs-b"
"#
    )
}

const ICMP_RS: &str = r#" { action = "accept", protocol = "icmp", source = "10.79.0.0/16" }"#;

/// One TCP connection held open from an instance's namespace to an echo server in another's:
/// every line sent comes back.
struct Held {
    client: TcpStream,
    lines: BufReader<TcpStream>,
}

impl Held {
    fn open(src_ns: &str, dst_ns: &str, dst: Ipv4Addr, port: u16) -> Held {
        let listener = in_ns(dst_ns, move || {
            TcpListener::bind(("0.0.0.0", port)).expect("bind")
        });
        // The server: accepts one connection (within 10 s) and echoes every line until EOF.
        std::thread::spawn(move || {
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let s = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => return,
                }
            };
            s.set_nonblocking(false).unwrap();
            let mut out = s.try_clone().unwrap();
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { return };
                if writeln!(out, "{line}").is_err() {
                    return;
                }
            }
        });
        let client = in_ns(src_ns, move || {
            TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_secs(3))
                .expect("the held connection connects")
        });
        // A bound, not a timing: data sent while a daemon was down waits for TCP's
        // retransmission (its timer backed off), which must come within it.
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let lines = BufReader::new(client.try_clone().unwrap());
        Held { client, lines }
    }

    /// Sends `msg` (one line).
    fn send(&mut self, msg: &str) {
        writeln!(self.client, "{msg}").expect("the held connection takes a line");
    }

    /// Reads the next line that comes back, which must be `msg`; how long it took.
    fn expect(&mut self, msg: &str) -> Duration {
        let start = Instant::now();
        let mut line = String::new();
        let r = match self.lines.read_line(&mut line) {
            Ok(0) => Err("the connection was closed".to_string()),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(e) => Err(format!("read: {e}")),
        };
        assert_eq!(
            r.as_deref(),
            Ok(msg),
            "the held connection's echo of {msg:?}"
        );
        start.elapsed()
    }

    /// Sends `msg` and reads its echo; how long that took.
    fn assert_echo(&mut self, msg: &str) -> Duration {
        self.send(msg);
        self.expect(msg)
    }
}

/// SIGKILL to `host`'s daemon, by the pid the lab's journal records; waits until it is gone.
fn kill_daemon(lab: &LabUp, host: &str) -> u32 {
    let pid = lab.lab.verified_pid(host).expect("the host's daemon runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!running(pid), "{host}'s daemon {pid} survived SIGKILL");
    pid
}

/// Pings both ways between two instances: the replies each way.
fn pings(lab: &LabUp, a: &str, b: &str) -> (u32, u32) {
    (
        ping(&lab.ns(a), lab.ip(b), 3),
        ping(&lab.ns(b), lab.ip(a), 3),
    )
}

/// The lines of `host`'s log saying its daemon read its state from the store.
fn read_from_store(lab: &LabUp, host: &str) -> Vec<String> {
    std::fs::read_to_string(lab.lab.log_path(host))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("topology read from the store"))
        .map(String::from)
        .collect()
}

/// `vpcd lab restart host-b` after its daemon (`pid`) was killed: the new daemon reads its
/// state from the store, revision `rev`.
fn restart_host_b(lab: &LabUp, test: &str, pid: u32, rev: i64) {
    let start = Instant::now();
    let o = vpcd(&["lab", "restart", "--name", lab.name(), "host-b"]);
    assert!(o.status.success(), "vpcd lab restart: {}", show(&o));
    let new_pid = lab.lab.verified_pid("host-b").expect("host-b's new daemon");
    eprintln!(
        "{test}: host-b's daemon {pid} killed, {new_pid} forwarding {:?} after `lab restart`",
        start.elapsed()
    );
    assert_ne!(new_pid, pid);
    // It read its share at the store's newest revision: `rev`, or later when the daemons'
    // own reports (`/vpcd/v2/applied/HOST`) have moved the store's revision on since.
    let read_at = revision(lab, "host-b");
    assert!(
        read_at >= rev,
        "host-b runs revision {read_at}, the store's is {rev}"
    );
    let reads = read_from_store(lab, "host-b");
    assert_eq!(reads.len(), 2, "each daemon read the store once: {reads:?}");
    assert!(
        reads[1].contains(&format!("revision={read_at}")),
        "the restarted daemon read revision {read_at}: {reads:?}"
    );
}

/// A refused change (a host's address cannot change live): `lab reload` says so, fails, and
/// the hosts stay where they were (at `rev` or after).
fn refused_change_writes_nothing(lab: &LabUp, rev: i64) {
    let before = (revision(lab, "host-a"), revision(lab, "host-b"));
    assert!(before.0 >= rev && before.1 >= rev, "{before:?} {rev}");
    let o = lab_reload(lab, &restart_topology(true, "192.0.2.9"));
    assert!(
        !o.status.success(),
        "a host's address changed: {}",
        show(&o)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("was not changed"), "{}", show(&o));
    let now = (revision(lab, "host-a"), revision(lab, "host-b"));
    assert_eq!(now, before, "the hosts kept their revisions");
}

#[test]
fn a_restarted_host_resumes_from_the_store() {
    let test = "a_restarted_host_resumes_from_the_store";
    if !can_run(test, &[Tool::Ip, Tool::Ping, Tool::Etcd]) {
        return;
    }
    let lab = LabUp::start_store("st_rs", &restart_topology(true, "192.0.2.2"));
    let mut held = Held::open(&lab.ns("rsa"), &lab.ns("rsb"), lab.ip("rsb"), 7100);
    held.assert_echo("before the restart");
    assert_eq!(
        pings(&lab, "rsa", "rsb"),
        (3, 3),
        "the first state admits icmp"
    );

    // host-b's daemon killed; while it is down, a change (icmp no longer admitted) and a
    // line on the held connection.
    let pid = kill_daemon(&lab, "host-b");
    let rev = reload_applied(&lab, &restart_topology(false, "192.0.2.2"));
    host_converges(&lab, "host-a", rev, 10);

    held.send("sent while host-b was down");
    restart_host_b(&lab, test, pid, rev);

    // The connection established before the restart carries data both ways (loose pickup):
    // what was sent meanwhile (retransmitted), then a new line.
    let took = held.expect("sent while host-b was down");
    eprintln!("{test}: the line sent while host-b was down came back {took:?} after its restart");
    held.assert_echo("after the restart");
    assert_eq!(
        pings(&lab, "rsa", "rsb"),
        (0, 0),
        "the store's state is in force"
    );

    // A change applied after the restart reaches host-b too.
    let rev = reload_applied(&lab, &restart_topology(true, "192.0.2.2"));
    let took = converge(&lab, rev, 10);
    eprintln!("{test}: store revision {rev} on both hosts {took:?} after the apply");
    assert_eq!(pings(&lab, "rsa", "rsb"), (3, 3), "icmp admitted again");
    held.assert_echo("after the change");

    refused_change_writes_nothing(&lab, rev);
    held.assert_echo("after the refusal");
}

// ----------------------------------------------------------------------------------------------
// A rollout: 100 revisions while traffic runs

/// How many revisions the rollout applies.
const ROLLOUT: usize = 100;

const ROLLOUT_HOSTS: &str = r#"
[[host]]
name = "host-a"
address = "192.0.2.1"

[[host]]
name = "host-b"
address = "192.0.2.2"
"#;

/// A tenant `T` (its VPC, subnet and an instance on each host).
const ROLLOUT_TENANT: &str = r#"
[[vpc]]
name = "vpc-T"
tenant = "t-T"
cidr = "10.91.0.0/16"

[[subnet]]
name = "net-T"
vpc = "vpc-T"
cidr = "10.91.1.0/24"

[[instance]]
name = "T1"
host = "host-a"
subnet = "net-T"
ip = "10.91.1.10"
security_groups = ["sg-T"]
netns = "ro-T1"

[[instance]]
name = "T2"
host = "host-b"
subnet = "net-T"
ip = "10.91.1.11"
security_groups = ["sg-T"]
netns = "ro-T2"
"#;

/// Tenant `T`'s security group, `EXTRA` where the unrelated rule goes.
const ROLLOUT_GROUP: &str = r#"
[[security_group]]
name = "sg-T"
ingress = [
  { action = "accept", protocol = "udp", port = 7000, source = "10.91.0.0/16" },
  { action = "accept", protocol = "udp", port = 7001, source = "10.91.0.0/16" },
  { action = "accept", protocol = "tcp", port = 7003, source = "10.91.0.0/16" },EXTRA
]
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]
"#;

/// The unrelated rule: tcp 5555, which nobody uses.
const UNRELATED: &str =
    r#" { action = "accept", protocol = "tcp", port = 5555, source = "10.91.0.0/16" },"#;

/// Two tenants, `a` and `b`, that chose the same addresses, each with an instance on each
/// host. Both groups admit the same ports (udp 7000, 7001, tcp 7003: a packet that crossed
/// tenants would be delivered, not dropped by the other tenant's group); udp 7099 is admitted
/// by no revision. `extra_a`/`extra_b`: the unrelated rule in each tenant's group.
fn rollout_topology(extra_a: bool, extra_b: bool) -> String {
    let group = |t: &str, extra: bool| {
        ROLLOUT_GROUP
            .replace("sg-T", &format!("sg-{t}"))
            .replace("EXTRA", if extra { UNRELATED } else { "" })
    };
    let tenant = |t: &str| ROLLOUT_TENANT.replace('T', t);
    format!(
        "{ROLLOUT_HOSTS}{}{}{}{}",
        tenant("a"),
        tenant("b"),
        group("a", extra_a),
        group("b", extra_b)
    )
}

/// Datagrams to udp 7099, which no revision admits, from each tenant's instance on host-a to
/// its instance on host-b, until `stop`: how many were sent.
fn deny_probes(lab: &LabUp, stop: Arc<AtomicBool>) -> JoinHandle<usize> {
    let targets: Vec<(String, Ipv4Addr)> = [("a1", "a2"), ("b1", "b2")]
        .iter()
        .map(|(src, dst)| (lab.ns(src), lab.ip(dst)))
        .collect();
    std::thread::spawn(move || {
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            for (ns, dst) in &targets {
                udp_fire(ns, *dst, 7099, "denied", 1);
                sent += 1;
            }
        }
        sent
    })
}

/// What the rollout's applies did.
struct Rollout {
    applied: usize,
    failures: Vec<String>,
    took: Vec<Duration>,
    last: i64,
    started: Instant,
    done: Instant,
}

/// [`ROLLOUT`] applies through `vpcd lab reload`, one after the other, alternating the
/// unrelated rule between the tenants' groups.
fn roll_out(lab: &LabUp) -> Rollout {
    let mut r = Rollout {
        applied: 0,
        failures: Vec::new(),
        took: Vec::new(),
        last: 0,
        started: Instant::now(),
        done: Instant::now(),
    };
    for i in 0..ROLLOUT {
        let start = Instant::now();
        let o = lab_reload(lab, &rollout_topology(i % 2 == 0, i % 2 == 1));
        r.took.push(start.elapsed());
        let out = String::from_utf8_lossy(&o.stdout);
        let rev = out
            .lines()
            .find(|l| l.starts_with("applied: revision "))
            .map(applied_revision);
        match rev {
            Some(rev) if o.status.success() && rev > r.last => {
                r.applied += 1;
                r.last = rev;
            }
            _ => r.failures.push(format!("apply {i}: {}", show(&o))),
        }
    }
    r.done = Instant::now();
    r
}

/// A stream's figures.
struct Tally {
    sent: u32,
    lost: usize,
    /// Every number after the one before it.
    in_order: bool,
    /// What either end met.
    errors: Vec<String>,
}

/// Stops a stream and counts what arrived.
fn tally(what: &str, s: Stream) -> Tally {
    let (sent, got, errors) = s.finish(Duration::from_millis(500));
    let numbers: Vec<u32> = got.iter().map(|(n, _)| *n).collect();
    let in_order = numbers.windows(2).all(|w| w[0] < w[1]);
    let mut distinct = numbers.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let lost = (0..sent)
        .filter(|n| distinct.binary_search(n).is_err())
        .count();
    let gap = got
        .windows(2)
        .map(|w| w[1].1 - w[0].1)
        .max()
        .unwrap_or_default();
    eprintln!(
        "{what}: {sent} sent, {} received ({} distinct), {lost} lost, in order: {in_order}, longest gap {gap:?}, errors {errors:?}",
        numbers.len(),
        distinct.len()
    );
    Tally {
        sent,
        lost,
        in_order,
        errors,
    }
}

/// Waits until every host has applied `rev`: the time since `since` (the last apply).
fn converged_since(lab: &LabUp, rev: i64, since: Instant) -> Duration {
    for host in ["host-a", "host-b"] {
        host_converges(lab, host, rev, 30);
    }
    since.elapsed()
}

/// Listeners where a packet that crossed tenants would arrive (the other tenant's instance
/// at the same address, on the port of the flow), and where a denied probe would.
fn spies(lab: &LabUp) -> Vec<(&'static str, Listener)> {
    vec![
        (
            "crossed a -> b2 (udp 7000)",
            Listener::udp(&lab.ns("b2"), "b2", 7000),
        ),
        (
            "crossed a -> b2 (tcp 7003)",
            Listener::tcp(&lab.ns("b2"), "b2", 7003),
        ),
        (
            "crossed b -> a2 (udp 7001)",
            Listener::udp(&lab.ns("a2"), "a2", 7001),
        ),
        (
            "denied -> a2 (udp 7099)",
            Listener::udp(&lab.ns("a2"), "a2", 7099),
        ),
        (
            "denied -> b2 (udp 7099)",
            Listener::udp(&lab.ns("b2"), "b2", 7099),
        ),
    ]
}

/// The traffic of the rollout: the unaffected flows, the spies and the denied probes.
struct Traffic {
    streams: Vec<(&'static str, Stream)>,
    spies: Vec<(&'static str, Listener)>,
    stop: Arc<AtomicBool>,
    probes: JoinHandle<usize>,
    before: Stats,
}

/// What the traffic saw.
struct Observed {
    /// Per stream: its name and figures.
    streams: Vec<(&'static str, Tally)>,
    /// Per spy: where, and how many things arrived there.
    spied: Vec<(&'static str, usize)>,
    probes: usize,
    /// The security groups' ingress drops on all hosts.
    denied: u64,
}

impl Traffic {
    /// Tenant a's flows udp 7000 and tcp 7003 and tenant b's udp 7001 from host-a to host-b
    /// (a message every 2 ms each), the spies, the probes.
    fn start(lab: &LabUp) -> Traffic {
        let spies = spies(lab);
        let every = Duration::from_millis(2);
        let (a1, a2, a2_ip) = (lab.ns("a1"), lab.ns("a2"), lab.ip("a2"));
        let (b1, b2, b2_ip) = (lab.ns("b1"), lab.ns("b2"), lab.ip("b2"));
        let streams = vec![
            (
                "udp a1 -> a2",
                Stream::start(&a1, &a2, a2_ip, 7000, false, every),
            ),
            (
                "udp b1 -> b2",
                Stream::start(&b1, &b2, b2_ip, 7001, false, every),
            ),
            (
                "tcp a1 -> a2",
                Stream::start(&a1, &a2, a2_ip, 7003, true, every),
            ),
        ];
        let before = lab.stats();
        let stop = Arc::new(AtomicBool::new(false));
        let probes = deny_probes(lab, stop.clone());
        Traffic {
            streams,
            spies,
            stop,
            probes,
            before,
        }
    }

    fn finish(self, lab: &LabUp) -> Observed {
        self.stop.store(true, Ordering::Relaxed);
        let probes = self.probes.join().expect("probes");
        let streams = self
            .streams
            .into_iter()
            .map(|(what, s)| (what, tally(what, s)))
            .collect();
        let spied = self
            .spies
            .into_iter()
            .map(|(w, l)| (w, l.finish().len()))
            .collect();
        let after = lab.stats();
        let denied = ["host-a", "host-b"]
            .iter()
            .map(|h| after.dropped(&self.before, h, "SgIngress"))
            .sum();
        Observed {
            streams,
            spied,
            probes,
            denied,
        }
    }
}

/// A host's `ctl status --json` data.
fn status(lab: &LabUp, host: &str) -> serde_json::Value {
    let o = vpcd(&["lab", "ctl", "--name", lab.name(), host, "--json", "status"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    v["data"].clone()
}

/// Every host's generation (how many states it has applied).
fn generations(lab: &LabUp) -> Vec<i64> {
    ["host-a", "host-b"]
        .iter()
        .map(|h| status(lab, h)["generation"].as_i64().unwrap_or(0))
        .collect()
}

/// The rollout's figures, on stderr.
fn report(test: &str, r: &Rollout, converged: Duration, applied_by: &[i64], seen: &Observed) {
    let mut took = r.took.clone();
    took.sort();
    let rollout = r.done - r.started;
    eprintln!(
        "{test}: {} of {ROLLOUT} applies (last revision {}) in {rollout:?}: {:.1} applies/s, each {:?} to {:?} (median {:?}); every host at the last revision {converged:?} after the last apply; states applied by host-a, host-b meanwhile: {applied_by:?}",
        r.applied,
        r.last,
        r.applied as f64 / rollout.as_secs_f64(),
        took[0],
        took[took.len() - 1],
        took[took.len() / 2]
    );
    eprintln!(
        "{test}: delivered where nothing may arrive: {:?}; {} denied probes sent, {} SgIngress drops",
        seen.spied, seen.probes, seen.denied
    );
}

#[test]
fn a_rollout_of_100_revisions_crosses_nothing_and_loses_nothing() {
    let test = "a_rollout_of_100_revisions_crosses_nothing_and_loses_nothing";
    if !can_run(test, &[Tool::Ip, Tool::Etcd]) {
        return;
    }
    let lab = LabUp::start_store("st_ro", &rollout_topology(false, false));
    let traffic = Traffic::start(&lab);
    std::thread::sleep(Duration::from_millis(500));
    let generation = generations(&lab);
    let r = roll_out(&lab);
    let converged = converged_since(&lab, r.last, r.done);
    // `lab status` (`vpcd get --hosts`): every host has applied every change to its share.
    let o = vpcd(&["lab", "status", "--name", lab.name()]);
    assert!(o.status.success(), "lab status: {}", show(&o));
    let status = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        status.contains("converged: 2 of 2 hosts current"),
        "{status}"
    );
    let applied_by: Vec<i64> = generations(&lab)
        .iter()
        .zip(&generation)
        .map(|(now, was)| now - was)
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let seen = traffic.finish(&lab);
    report(test, &r, converged, &applied_by, &seen);

    assert_eq!(
        r.applied, ROLLOUT,
        "every apply succeeded: {:?}",
        r.failures
    );
    for (what, t) in &seen.streams {
        assert!(t.sent > 100, "{what}: only {} sent", t.sent);
        assert!(t.errors.is_empty(), "{what}: {:?}", t.errors);
        assert_eq!(t.lost, 0, "{what}: nothing of an unaffected flow is lost");
        assert!(
            t.in_order || what.starts_with("udp"),
            "{what}: TCP in order"
        );
    }
    assert!(
        seen.spied.iter().all(|(_, n)| *n == 0),
        "nothing crossed tenants, nothing denied was delivered: {:?}",
        seen.spied
    );
    assert!(
        seen.denied >= seen.probes as u64,
        "a group dropped every denied probe: {} sent, {} drops",
        seen.probes,
        seen.denied
    );
    for host in ["host-a", "host-b"] {
        assert_eq!(
            log_count(&lab, host, "refused"),
            0,
            "{host} refused a revision"
        );
    }
}
