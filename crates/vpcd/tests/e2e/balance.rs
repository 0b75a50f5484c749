//! End-to-end tests of load balancers (docs/semantics.md 2.11) with real traffic between
//! namespaces: a VPC load balancer spreading TCP connections by weight and a UDP listener,
//! the VIP's own answers, another tenant with the same addresses seeing nothing; health
//! checks taking a stopped backend out of the rotation on every host and bringing it back
//! while the connections to the others lose nothing; the basic network's load balancer, a
//! public one from the internet, and the refusal of one that binds both networks.
//!
//! Every backend runs an echo server that answers each line with its own name and the
//! address it saw the client at, so each test knows who got each connection and that the
//! backend saw the client's real address. Root and iproute2 needed. A module of the
//! `e2e_cloud` test binary (one binary less to link).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::common::*;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 100);
const EIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 50);

/// The lab: alice's VPC with two clients (one per host) and three backends, bob's VPC with
/// the same addresses and spies on the backend ports, alice's and bob's basic instances, the
/// internet behind host-a.
fn topology(name: &str) -> String {
    let ns = format!("vpcd-{name}");
    let mut s = String::from(
        r#"
[underlay]
transport = "gre"
[[host]]
name = "host-a"
address = "192.0.2.1"
[[host]]
name = "host-b"
address = "192.0.2.2"
[basic]
cidr = "10.128.0.0/16"
[internet]
cidr = "203.0.113.0/24"
gateway = "host-a"
netns = "@NS-internet"
[[vpc]]
name = "vpc-alice"
tenant = "alice"
cidr = "10.0.0.0/16"
[[vpc]]
name = "vpc-bob"
tenant = "bob"
cidr = "10.0.0.0/16"
[[subnet]]
name = "alice-web"
vpc = "vpc-alice"
cidr = "10.0.1.0/24"
[[subnet]]
name = "bob-web"
vpc = "vpc-bob"
cidr = "10.0.1.0/24"
[[security_group]]
name = "client"
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]
[[security_group]]
name = "backend"
ingress = [
  { action = "accept", protocol = "tcp", port = "8080", source = "0.0.0.0/0" },
  { action = "accept", protocol = "udp", port = "5353", source = "10.0.0.0/16" },
  { action = "accept", protocol = "udp", port = "5353", source = "100.64.0.0/10" },
]
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]
"#,
    );
    let inst = |name: &str, host: &str, net: &str| {
        let network = match net.split_once('@') {
            Some((subnet, ip)) => format!("subnet = \"{subnet}\"\nip = \"{ip}\""),
            None => format!("network = \"basic\"\ntenant = \"{net}\""),
        };
        let group =
            if name.contains("web") || name.starts_with("classic-b") || name.starts_with("spy") {
                "backend"
            } else {
                "client"
            };
        format!(
            "\n[[instance]]\nname = \"{name}\"\nhost = \"{host}\"\n{network}\nsecurity_groups = [\"{group}\"]\nnetns = \"@NS-{name}\"\n"
        )
    };
    for (n, h, net) in [
        ("c1", "host-a", "alice-web@10.0.1.10"),
        ("c2", "host-b", "alice-web@10.0.1.20"),
        ("web1", "host-a", "alice-web@10.0.1.11"),
        ("web2", "host-b", "alice-web@10.0.1.12"),
        ("web3", "host-b", "alice-web@10.0.1.13"),
        ("bobc", "host-a", "bob-web@10.0.1.10"),
        ("spy1", "host-a", "bob-web@10.0.1.11"),
        ("spy2", "host-b", "bob-web@10.0.1.12"),
        ("classic-c", "host-a", "alice"),
        ("classic-b1", "host-a", "alice"),
        ("classic-b2", "host-b", "alice"),
        ("classic-bob", "host-b", "bob"),
    ] {
        s.push_str(&inst(n, h, net));
    }
    s.push_str(
        r#"
[[load_balancer]]
name = "lb-web"
vpc = "vpc-alice"
subnet = "alice-web"
vip = "10.0.1.100"
eip = "203.0.113.50"
listeners = [
  { protocol = "tcp", port = 80, backends = [
      { instance = "web1", port = 8080, weight = 10 },
      { instance = "web2", port = 8080, weight = 10 },
      { instance = "web3", port = 8080, weight = 20 } ],
    health = { interval = 1, timeout = 1, healthy = 2, unhealthy = 2 } },
  { protocol = "udp", port = 53, scheduler = "hash", backends = [
      { instance = "web1", port = 5353 }, { instance = "web3", port = 5353 } ],
    health = { interval = 1, timeout = 1, healthy = 2, unhealthy = 2 } },
]

[[load_balancer]]
name = "lb-classic"
network = "basic"
tenant = "alice"
listeners = [ { protocol = "tcp", port = 80, scheduler = "wlc", backends = [
    { instance = "classic-b1", port = 8080 }, { instance = "classic-b2", port = 8080 } ] } ]
"#,
    );
    s.replace("@NS", &ns)
}

/// A TCP echo server in a namespace: every line of every connection comes back as
/// `NAME PEER LINE` (PEER: the client's address as the server sees it), until it stops.
struct Echo {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Echo {
    fn start(ns: &str, name: &str, port: u16) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, name, st) = (ns.to_string(), name.to_string(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = thread::spawn(move || {
            let l = in_ns(&ns, move || {
                TcpListener::bind(("0.0.0.0", port)).expect("echo bind")
            });
            l.set_nonblocking(true).unwrap();
            let _ = ready_tx.send(());
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, peer)) => {
                        let name = name.clone();
                        thread::spawn(move || echo_lines(s, &name, peer));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("echo server started");
        Echo {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn echo_lines(s: TcpStream, name: &str, peer: SocketAddr) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { return };
        if writeln!(w, "{name} {} {line}", peer.ip()).is_err() {
            return;
        }
    }
}

/// One line to `dst:port` from `ns` on a new connection: the answer's (backend, seen peer).
fn ask(ns: &str, dst: Ipv4Addr, port: u16) -> Option<(String, String)> {
    in_ns(ns, move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_millis(1500))
                .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        writeln!(s, "hello").ok()?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).ok()?;
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() == 3).then(|| (f[0].to_string(), f[1].to_string()))
    })
}

/// A connection held open from a namespace: a line every `every`, each echo recorded.
struct Held {
    backend: String,
    sent: Arc<Mutex<u32>>,
    echoed: Arc<Mutex<u32>>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Held {
    fn open(ns: &str, dst: Ipv4Addr, port: u16, every: Duration) -> Held {
        let s = in_ns(ns, move || {
            TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_secs(2))
        })
        .expect("held connection");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        writeln!(w, "0").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).expect("first echo");
        let backend = line.split_whitespace().next().unwrap_or("").to_string();
        let (sent, echoed, stop) = (
            Arc::new(Mutex::new(1)),
            Arc::new(Mutex::new(1)),
            Arc::new(AtomicBool::new(false)),
        );
        let (s2, e2, st) = (sent.clone(), echoed.clone(), stop.clone());
        let handle = thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                thread::sleep(every);
                let n = *s2.lock().unwrap();
                if writeln!(w, "{n}").is_err() {
                    return;
                }
                *s2.lock().unwrap() += 1;
                let mut line = String::new();
                if r.read_line(&mut line).is_ok_and(|k| k > 0)
                    && line.trim().ends_with(&format!(" {n}"))
                {
                    *e2.lock().unwrap() += 1;
                }
            }
        });
        Held {
            backend,
            sent,
            echoed,
            stop,
            handle: Some(handle),
        }
    }

    /// Stops; (lines sent, lines echoed).
    fn finish(mut self) -> (u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        (*self.sent.lock().unwrap(), *self.echoed.lock().unwrap())
    }
}

/// The backends that answered `n` new connections from `ns` to the VIP, counted.
fn spread(lab: &LabUp, ns: &str, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let who = ask(ns, VIP, 80).map_or("(no answer)".to_string(), |(b, _)| b);
        *out.entry(who).or_default() += 1;
    }
    let _ = lab;
    out
}

#[test]
fn a_vpc_load_balancer_spreads_by_weight_and_only_its_tenant_reaches_it() {
    if !can_run(
        "a_vpc_load_balancer_spreads_by_weight_and_only_its_tenant_reaches_it",
        &[Tool::Ip, Tool::Ping],
    ) {
        return;
    }
    let name = "lbvpc";
    let lab = LabUp::start(name, &topology(name));
    let _echo: Vec<Echo> = ["web1", "web2", "web3"]
        .iter()
        .map(|w| Echo::start(&lab.ns(w), w, 8080))
        .collect();
    let _u: Vec<Listener> = ["web1", "web3"]
        .iter()
        .map(|w| Listener::udp(&lab.ns(w), w, 5353))
        .collect();
    let spies: Vec<Listener> = ["spy1", "spy2"]
        .iter()
        .map(|s| Listener::tcp(&lab.ns(s), s, 8080))
        .collect();
    let before = lab.stats();
    let (a, b) = (
        spread(&lab, &lab.ns("c1"), 40),
        spread(&lab, &lab.ns("c2"), 40),
    );
    eprintln!("40 connections from c1 (host-a): {a:?}; 40 from c2 (host-b): {b:?}");
    for s in [&a, &b] {
        // Weights 10:10:20, round robin on each client's host.
        assert_eq!(s.get("web1"), Some(&10), "{s:?}");
        assert_eq!(s.get("web2"), Some(&10), "{s:?}");
        assert_eq!(s.get("web3"), Some(&20), "{s:?}");
    }
    // The backend saw the client's own address; the client only the VIP (it connected to it).
    let (who, peer) = ask(&lab.ns("c2"), VIP, 80).expect("an answer");
    assert!(who.starts_with("web"));
    assert_eq!(
        peer, "10.0.1.20",
        "the backend sees the client's real address"
    );
    // UDP: a source hash picks one backend per client, whatever its port; the answer comes
    // from the VIP (a connected socket takes no other).
    let udp = in_ns(&lab.ns("c1"), || {
        (0..5)
            .map(|k| {
                let u = UdpSocket::bind(("0.0.0.0", 0)).ok()?;
                u.connect((VIP, 53)).ok()?;
                u.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
                u.send(format!("q{k}").as_bytes()).ok()?;
                let mut buf = [0u8; 256];
                let n = u.recv(&mut buf).ok()?;
                Some(
                    String::from_utf8_lossy(&buf[..n])
                        .split(' ')
                        .next()?
                        .to_string(),
                )
            })
            .collect::<Vec<_>>()
    });
    eprintln!("UDP answers through the VIP: {udp:?}");
    assert!(
        udp.iter().all(|w| w.is_some() && *w == udp[0]),
        "one backend per source: {udp:?}"
    );
    // The VIP answers ping; a port without a listener is dropped and counted.
    assert_eq!(ping(&lab.ns("c1"), VIP, 2), 2, "the VIP answers echo");
    assert!(ask(&lab.ns("c1"), VIP, 22).is_none());
    // bob has the same addresses, and no load balancer: his client reaches nothing, his
    // spies at the backends' addresses see nothing of alice's.
    assert!(ask(&lab.ns("bobc"), VIP, 80).is_none());
    let after = lab.stats();
    assert!(
        after.dropped(&before, "host-a", "LbNoListener") > 0,
        "{}",
        after.diff(&before)
    );
    for s in spies {
        assert!(s.finish().is_empty(), "bob's spies see nothing");
    }
    let o = ctl_at(&lab, "host-a", &["health"]);
    let text = String::from_utf8_lossy(&o.stdout);
    eprintln!("{text}");
    assert!(
        o.status.success() && text.contains("lb-web") && text.contains("web3:8080"),
        "{}",
        show(&o)
    );
}

/// Connections from both hosts every 100 ms for `d`: (backend or "(no answer)", when).
fn poll_connections(lab: &LabUp, d: Duration) -> Vec<(String, Instant)> {
    let start = Instant::now();
    let mut out = Vec::new();
    while start.elapsed() < d {
        for c in ["c1", "c2"] {
            let who = ask(&lab.ns(c), VIP, 80).map_or("(no answer)".to_string(), |(b, _)| b);
            out.push((who, Instant::now()));
        }
        thread::sleep(Duration::from_millis(100));
    }
    out
}

#[test]
fn health_checks_take_a_stopped_backend_out_and_bring_it_back() {
    if !can_run(
        "health_checks_take_a_stopped_backend_out_and_bring_it_back",
        &[Tool::Ip],
    ) {
        return;
    }
    let name = "lbhealth";
    let lab = LabUp::start(name, &topology(name));
    let e1 = Echo::start(&lab.ns("web1"), "web1", 8080);
    let e2 = Echo::start(&lab.ns("web2"), "web2", 8080);
    let e3 = Echo::start(&lab.ns("web3"), "web3", 8080);
    thread::sleep(Duration::from_secs(3));
    // Connections held to the backends that stay.
    let mut held = Vec::new();
    for k in 0..16 {
        let ns = lab.ns(if k % 2 == 0 { "c1" } else { "c2" });
        let h = Held::open(&ns, VIP, 80, Duration::from_millis(100));
        if h.backend == "web2" {
            h.finish();
        } else {
            held.push(h);
        }
    }
    assert!(
        held.len() >= 6,
        "held connections to web1 and web3: {}",
        held.len()
    );
    // web2's listener stops: the hosts' checks and reports take it out.
    drop(e2);
    let stopped = Instant::now();
    let polled = poll_connections(&lab, Duration::from_secs(8));
    let last_to_web2 = polled
        .iter()
        .filter(|(w, _)| w == "(no answer)" || w == "web2")
        .map(|(_, t)| *t)
        .max();
    let out_after = last_to_web2.map_or(Duration::ZERO, |t| t.duration_since(stopped));
    eprintln!(
        "web2 stopped: its last new connection {out_after:?} later (interval 1 s x unhealthy 2)"
    );
    // The bound is the check's (2 s) with room for a loaded machine: a correctness bound.
    assert!(
        out_after < Duration::from_secs(6),
        "web2 stays in the rotation: {polled:?}"
    );
    let o = ctl_at(&lab, "host-a", &["health"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    eprintln!("{text}");
    let web2: Vec<&str> = text.lines().filter(|l| l.contains("web2:8080")).collect();
    assert!(
        web2.iter()
            .all(|l| l.contains("unhealthy") && l.contains("host-b")),
        "host-a learns from host-b: {text}"
    );
    let metrics = ctl_at(&lab, "host-a", &["stats", "--prometheus"]);
    let metrics = String::from_utf8_lossy(&metrics.stdout).to_string();
    // Read by prometheus_client's own parser.
    let healthy: BTreeMap<String, f64> = scrape(&metrics, "vpcd_lb_backend_healthy")
        .into_iter()
        .filter(|(l, _)| l["listener"] == "tcp 80")
        .map(|(l, v)| (l["backend"].as_str().unwrap_or("").to_string(), v))
        .collect();
    eprintln!("vpcd_lb_backend_healthy on host-a: {healthy:?}");
    assert_eq!(healthy.get("web2:8080"), Some(&0.0), "{metrics}");
    assert_eq!(healthy.get("web1:8080"), Some(&1.0), "{metrics}");
    assert!(log_count(&lab, "host-b", "backend unhealthy") >= 1);
    // It listens again: it gets new connections again.
    let _e2 = Echo::start(&lab.ns("web2"), "web2", 8080);
    let restarted = Instant::now();
    let polled = poll_connections(&lab, Duration::from_secs(8));
    let first_back = polled
        .iter()
        .find(|(w, _)| w == "web2")
        .map(|(_, t)| t.duration_since(restarted));
    eprintln!(
        "web2 listens again: its first new connection {first_back:?} later (interval 1 s x healthy 2)"
    );
    assert!(
        first_back.is_some_and(|d| d < Duration::from_secs(6)),
        "{polled:?}"
    );
    let lost = polled.iter().filter(|(w, _)| w == "(no answer)").count();
    assert_eq!(
        lost, 0,
        "no connection fails while web2 comes back: {polled:?}"
    );
    for h in held {
        let backend = h.backend.clone();
        let (sent, echoed) = h.finish();
        assert_eq!(sent, echoed, "a connection held to {backend} lost lines");
        assert!(sent > 50, "{sent}");
    }
    drop((e1, e3));
}

#[test]
fn basic_and_public_load_balancers_and_the_mixed_one_is_refused() {
    if !can_run(
        "basic_and_public_load_balancers_and_the_mixed_one_is_refused",
        &[Tool::Ip],
    ) {
        return;
    }
    let name = "lbnets";
    let text = topology(name);
    let lab = LabUp::start(name, &text);
    let vip = lab.topo.load_balancers[1].vip;
    let _b: Vec<Echo> = ["classic-b1", "classic-b2", "web1", "web2", "web3"]
        .iter()
        .map(|w| Echo::start(&lab.ns(w), w, 8080))
        .collect();
    // The basic network's load balancer: alice's basic instances only. Least connections:
    // one at a time, each closed before the next, all go to the first of equals; held open,
    // they alternate.
    let (who, peer) = ask(&lab.ns("classic-c"), vip, 80).expect("the basic VIP answers");
    assert_eq!(
        (who.as_str(), peer),
        ("classic-b1", lab.ip("classic-c").to_string())
    );
    thread::sleep(Duration::from_millis(200));
    let held: Vec<Held> = (0..6)
        .map(|_| Held::open(&lab.ns("classic-c"), vip, 80, Duration::from_millis(200)))
        .collect();
    let got: Vec<String> = held.iter().map(|h| h.backend.clone()).collect();
    eprintln!("basic load balancer (wlc), 6 connections held open: {got:?}");
    assert_eq!(
        got.iter().filter(|b| *b == "classic-b1").count(),
        3,
        "{got:?}"
    );
    assert_eq!(
        got.iter().filter(|b| *b == "classic-b2").count(),
        3,
        "{got:?}"
    );
    for h in held {
        let (sent, echoed) = h.finish();
        assert_eq!(sent, echoed);
    }
    let before = lab.stats();
    assert!(
        ask(&lab.ns("classic-bob"), vip, 80).is_none(),
        "bob's basic instance is refused"
    );
    let after = lab.stats();
    assert!(
        after.dropped(&before, "host-b", "LbOtherTenant") > 0,
        "{}",
        after.diff(&before)
    );
    // The public load balancer, from the internet: the backend sees the internet's address.
    let client = lab.topo.internet.as_ref().unwrap().client.to_string();
    let mut got = BTreeMap::<String, usize>::new();
    for _ in 0..8 {
        let (who, peer) =
            ask(&lab.ns("internet"), EIP, 80).expect("the public load balancer answers");
        assert_eq!(peer, client);
        *got.entry(who).or_default() += 1;
    }
    eprintln!("public load balancer, 8 connections from the internet: {got:?}");
    assert_eq!(got.values().sum::<usize>(), 8);
    // One load balancer for both networks is refused, and the running lab keeps its own.
    let mixed = text.replace(
        r#"{ instance = "web3", port = 5353 }"#,
        r#"{ instance = "classic-b1", port = 5353 }"#,
    );
    assert_ne!(mixed, text);
    let file = std::env::temp_dir().join("vpcd-e2e-lbnets-mixed.toml");
    std::fs::write(&file, &mixed).unwrap();
    let o = vpcd(&["check", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{}", show(&o));
    assert!(
        err.contains("cannot be shared between the basic network and a VPC") && err.contains(":"),
        "{err}"
    );
    let c1 = lab.ns("c1");
    reload(&lab, &mixed, "reload refused");
    std::fs::write(lab.lab.topology_path(), &text).unwrap();
    assert!(
        ask(&c1, VIP, 80).is_some(),
        "the running load balancer stays"
    );
    let _ = std::fs::remove_file(file);
}
