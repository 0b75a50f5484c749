//! `vpcd lab check`: every `[[expect]]` tried with real traffic, and a matrix of what reached
//! what, and why not.
//!
//! TCP and UDP probes are made in-process: one thread enters the sender's namespace and
//! connects (or sends), other threads enter the namespace of *every* instance that has the
//! destination address, in any VPC, and answer with their name. So a probe proves both that
//! the right instance answered and that no instance of another tenant saw anything. ICMP uses
//! a raw ICMP echo (vpcd's own ping, so the lab needs no iputils).
//!
//! The "why" is the probe's trace ([`crate::trace`]): the pipeline's own decision for that
//! packet on each host, with the lab's topology and empty tables (a probe is a first
//! packet), so it names the stage and rule that decided whatever else runs in the lab. A
//! row whose trace disagrees with what the probe observed says so.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use socket2::{Domain, Protocol as SockProtocol, Socket, Type};

use super::Lab;
use crate::io::netns::NetnsGuard;
use crate::pipeline::trace::Verdict;
use crate::policy::rules::Protocol;
use crate::topology::{Expect, ExpectSource, ExpectTarget, Instance, Space, Topology};
use crate::trace::TraceArgs;

/// One row of the matrix.
#[derive(Debug, Clone)]
pub struct Row {
    /// Sender.
    pub from: String,
    /// Target as written.
    pub to: String,
    /// `tcp:80`, `icmp`, ...
    pub what: String,
    /// Expected to reach.
    pub expected: bool,
    /// Observed to reach.
    pub observed: bool,
    /// Instances of another VPC that saw the probe (must be none).
    pub leaked_to: Vec<String>,
    /// The probe's traced verdict: where it was delivered, or the stage, rule and host that
    /// dropped it.
    pub why: String,
    /// The traced verdict disagrees with what the probe observed.
    pub trace_differs: bool,
}

impl Row {
    /// As expected, and nothing leaked.
    pub fn ok(&self) -> bool {
        self.expected == self.observed && self.leaked_to.is_empty()
    }
}

/// The matrix.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// One row per expectation, in file order.
    pub rows: Vec<Row>,
}

impl CheckReport {
    /// Rows that differ from the expectation.
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| !r.ok()).count()
    }
}

/// Tries every expectation of the lab's topology; prints the matrix to `out` row by row.
/// Refuses a topology without expectations, and a lab whose daemons are not all running,
/// before the first probe and after each one: a probe nothing forwards is "blocked" for no
/// reason of the topology's.
pub fn check(lab: &Lab, out: &mut dyn Write) -> Result<CheckReport> {
    let t = lab.topology()?;
    if t.expects.is_empty() {
        bail!(
            "lab \"{}\": its topology has no [[expect]]: nothing to check",
            lab.name
        );
    }
    lab.require_running()?;
    let mut report = CheckReport::default();
    writeln!(
        out,
        "{:<14} {:<14} {:<10} {:<9} {:<9} {:<6} why",
        "from", "to", "traffic", "expected", "observed", ""
    )?;
    let shared = Arc::new(t.clone());
    for (n, e) in t.expects.iter().enumerate() {
        let (observed, leaked_to) = probe(&t, e, n as u16)?;
        require_all_running(lab)?;
        let (why, traced_reach) = traced(&shared, e);
        let row = Row {
            from: match e.from {
                ExpectSource::Instance(id) => t.instance(id).name.clone(),
                ExpectSource::Internet => "internet".to_string(),
            },
            to: target_label(&t, e),
            what: match e.port {
                Some(p) => format!("{}:{p}", e.protocol.word()),
                None => e.protocol.word().to_string(),
            },
            expected: e.reach,
            observed,
            leaked_to,
            why,
            trace_differs: traced_reach != Some(observed),
        };
        print_row(out, &row)?;
        report.rows.push(row);
    }
    let bad = report.failures();
    writeln!(
        out,
        "{} of {} expectations hold{}",
        report.rows.len() - bad,
        report.rows.len(),
        if bad > 0 {
            format!("; {bad} do not")
        } else {
            String::new()
        }
    )?;
    Ok(report)
}

/// The target as the matrix names it: an instance, a load balancer (`lb:NAME`) when the
/// address is one's VIP in the sender's network or its Elastic IP, or the address.
fn target_label(t: &Topology, e: &Expect) -> String {
    let a = match &e.to {
        ExpectTarget::Instance(id) => return t.instance(*id).name.clone(),
        ExpectTarget::Address(a) => *a,
    };
    let lb = match e.from {
        ExpectSource::Instance(id) => t.lb_at(t.instance(id).space(), a),
        ExpectSource::Internet => t.lb_by_eip(a),
    };
    lb.map_or_else(|| a.to_string(), |lb| format!("lb:{}", t.lb(lb).name))
}

fn print_row(out: &mut dyn Write, row: &Row) -> Result<()> {
    let word = |b: bool| if b { "reach" } else { "blocked" };
    let mut why = row.why.clone();
    if row.trace_differs {
        why = format!("TRACE DIFFERS: {why}");
    }
    if !row.leaked_to.is_empty() {
        why = format!("LEAKED to {} {why}", row.leaked_to.join(", "));
    }
    writeln!(
        out,
        "{:<14} {:<14} {:<10} {:<9} {:<9} {:<6} {}",
        row.from,
        row.to,
        row.what,
        word(row.expected),
        word(row.observed),
        if row.ok() { "ok" } else { "FAIL" },
        why
    )?;
    Ok(())
}

/// The lab's daemons are all running; else the check is void (a probe nothing forwards is
/// "blocked" for no reason of the topology's).
fn require_all_running(lab: &Lab) -> Result<()> {
    let bad: Vec<String> = lab
        .refresh_stats()
        .iter()
        .filter(|h| !h.ok())
        .map(|h| h.to_string())
        .collect();
    if !bad.is_empty() {
        bail!(
            "lab \"{}\" during the check: {}: the check is void",
            lab.name,
            bad.join("; ")
        );
    }
    Ok(())
}

/// The probe's traced verdict, and whether the trace says it reaches (`None`: it cannot be
/// traced).
fn traced(t: &Arc<Topology>, e: &Expect) -> (String, Option<bool>) {
    let args = TraceArgs {
        from: match e.from {
            ExpectSource::Instance(id) => t.instance(id).name.clone(),
            ExpectSource::Internet => "internet".to_string(),
        },
        to: match &e.to {
            ExpectTarget::Instance(id) => t.instance(*id).name.clone(),
            ExpectTarget::Address(a) => a.to_string(),
        },
        protocol: e.protocol.word().to_string(),
        port: e.port,
    };
    match crate::trace::offline(t, &args, crate::Timestamp::from_millis(0)) {
        Ok(tr) => {
            let reach = match tr.verdict {
                Verdict::Delivered { to, .. } => {
                    endpoints(t, e).intended.contains(&t.instance(to).name)
                }
                Verdict::ToInternet { .. } => true,
                // A VIP answers echo itself.
                Verdict::Replied { echo, .. } => echo,
                Verdict::Dropped { .. } => false,
            };
            (crate::trace::verdict_line(t, &tr.verdict), Some(reach))
        }
        Err(err) => (format!("no trace: {err}"), None),
    }
}

/// Where a probe starts and goes: the sender's namespace, the destination address and the
/// instances meant to answer (a load balancer's VIP: any of its listener's backends, each at
/// its own port).
struct Endpoints {
    src_ns: String,
    dst: Ipv4Addr,
    intended: Vec<String>,
    backends: Vec<(String, String, u16)>,
}

fn endpoints(t: &Topology, e: &Expect) -> Endpoints {
    let (src_ns, src) = match e.from {
        ExpectSource::Instance(id) => (
            t.instance(id).netns.clone().unwrap_or_default(),
            Some(t.instance(id)),
        ),
        ExpectSource::Internet => (
            t.internet
                .as_ref()
                .and_then(|i| i.netns.clone())
                .unwrap_or_default(),
            None,
        ),
    };
    let (dst, intended) = match &e.to {
        // From the internet an instance is reached at its Elastic IP.
        ExpectTarget::Instance(id) => {
            let i = t.instance(*id);
            let addr = if src.is_none() {
                i.eip.unwrap_or(i.ip)
            } else {
                i.ip
            };
            (addr, vec![i.name.clone()])
        }
        ExpectTarget::Address(a) => (*a, intended_at(t, src, *a).into_iter().collect()),
    };
    let backends = lb_backends(t, src, dst, e);
    Endpoints {
        src_ns,
        dst,
        intended: if backends.is_empty() {
            intended
        } else {
            backends.iter().map(|(name, ..)| name.clone()).collect()
        },
        backends,
    }
}

/// The backends (name, namespace, port) of the load balancer listener a probe of `e` to
/// `dst` meets: a VIP of the sender's network, or (from the internet) a public load
/// balancer's Elastic IP.
fn lb_backends(
    t: &Topology,
    src: Option<&Instance>,
    dst: Ipv4Addr,
    e: &Expect,
) -> Vec<(String, String, u16)> {
    let lb = match src {
        Some(i) => t.lb_at(i.space(), dst),
        None => t.lb_by_eip(dst),
    };
    // Listeners are TCP or UDP: an ICMP probe meets none.
    let number = e.protocol.number();
    let Some((_, l)) = lb.and_then(|lb| t.lb(lb).listener(number, e.port.unwrap_or(0))) else {
        return Vec::new();
    };
    l.backends
        .iter()
        .map(|b| {
            let i = t.instance(b.instance);
            (i.name.clone(), i.netns.clone().unwrap_or_default(), b.port)
        })
        .collect()
}

/// Sends the probe of `e`; returns whether the intended instance answered, and which
/// instances of other VPCs saw it.
fn probe(t: &Topology, e: &Expect, n: u16) -> Result<(bool, Vec<String>)> {
    let Endpoints {
        src_ns,
        dst,
        intended,
        backends,
    } = endpoints(t, e);
    let tries = if e.reach { 3 } else { 1 };
    if e.protocol == Protocol::Icmp {
        let ident = 0x7000 | n;
        let ok = thread::spawn(move || (0..tries).any(|_| ping(&src_ns, dst, ident)))
            .join()
            .unwrap_or(false);
        return Ok((ok, Vec::new()));
    }
    let port = e.port.unwrap_or(0);
    let tcp = e.protocol == Protocol::Tcp;
    let stop = Arc::new(AtomicBool::new(false));
    let mut listeners = listen_everywhere(t, dst, tcp, port, &stop);
    for (name, ns, port) in backends {
        listeners.push(listen_at(ns, name, tcp, port, &stop));
    }
    let token = format!("vpcd-probe-{n}-{}", std::process::id());
    let answer = thread::spawn(move || {
        (0..tries).find_map(|_| {
            if tcp {
                tcp_probe(&src_ns, dst, port, &token)
            } else {
                udp_probe(&src_ns, dst, port, &token)
            }
        })
    })
    .join()
    .unwrap_or(None);
    thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let mut leaked = Vec::new();
    for (name, h) in listeners {
        let seen = h.join().unwrap_or(false);
        if seen && !intended.contains(&name) {
            leaked.push(name);
        }
    }
    let reached = answer.is_some_and(|who| intended.contains(&who));
    Ok((reached, leaked))
}

/// A listener in every instance that has the address `dst`, in any VPC, each ready before
/// this returns (at most 2 s each).
fn listen_everywhere(
    t: &Topology,
    dst: Ipv4Addr,
    tcp: bool,
    port: u16,
    stop: &Arc<AtomicBool>,
) -> Vec<(String, thread::JoinHandle<bool>)> {
    let mut listeners = Vec::new();
    for i in t
        .instances
        .iter()
        .filter(|i| i.ip == dst || i.eip == Some(dst))
    {
        let ns = i.netns.clone().unwrap_or_default();
        listeners.push(listen_at(ns, i.name.clone(), tcp, port, stop));
    }
    listeners
}

/// A listener in `ns` answering as `name`, ready before this returns (at most 2 s).
fn listen_at(
    ns: String,
    name: String,
    tcp: bool,
    port: u16,
    stop: &Arc<AtomicBool>,
) -> (String, thread::JoinHandle<bool>) {
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let (n, stop) = (name.clone(), stop.clone());
    let h = thread::spawn(move || listen(&ns, &n, tcp, port, &stop, ready_tx));
    let _ = ready_rx.recv_timeout(Duration::from_secs(2));
    (name, h)
}

/// The instance the cloud delivers a packet for `a` to: the owner of an Elastic IP, or the
/// instance with that private address in the sender's network, a network linked to it by an
/// interconnect, or a peered VPC.
fn intended_at(t: &Topology, src: Option<&Instance>, a: Ipv4Addr) -> Option<String> {
    if let Some(owner) = t.eip_owner(a) {
        return Some(t.instance(owner).name.clone());
    }
    let src = src?;
    let mut spaces = vec![src.space()];
    if let Some(v) = src.vpc() {
        spaces.extend(t.peerings.iter().filter_map(|p| match p.vpcs {
            [x, y] if x == v => Some(Space::Vpc(y)),
            [x, y] if y == v => Some(Space::Vpc(x)),
            _ => None,
        }));
        if t.interconnects.iter().any(|ic| ic.vpc == v) {
            spaces.push(Space::Basic);
        }
    }
    if let Some(id) = t.instance_named(&src.name).and_then(|id| t.linked_vpc(id)) {
        spaces.push(Space::Vpc(id));
    }
    spaces
        .into_iter()
        .find_map(|sp| t.instance_in(sp, a))
        .map(|id| t.instance(id).name.clone())
}

/// One ICMP echo from `ns` to `dst` on a raw socket; true when the matching reply comes back
/// within a second.
fn ping(ns: &str, dst: Ipv4Addr, ident: u16) -> bool {
    let Ok(_guard) = NetnsGuard::enter(ns) else {
        return false;
    };
    let Ok(s) = Socket::new(Domain::IPV4, Type::RAW, Some(SockProtocol::ICMPV4)) else {
        return false;
    };
    let mut req = [
        8u8, 0, 0, 0, 0, 0, 0, 1, b'v', b'p', b'c', b'd', b'-', b'l', b'a', b'b',
    ];
    req[4..6].copy_from_slice(&ident.to_be_bytes());
    let c = crate::wire::ipv4::checksum(&req);
    req[2..4].copy_from_slice(&c.to_be_bytes());
    if s.send_to(&req, &SocketAddr::from((dst, 0)).into()).is_err() {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 1500];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .is_err()
        {
            return false;
        }
        let Ok(n) = (&s).read(&mut buf) else {
            return false;
        };
        // A raw ICMP socket receives the IPv4 header too.
        let got = &buf[..n];
        let Ok(ip) = crate::wire::ipv4::parse(got) else {
            continue;
        };
        let icmp = &got[ip.l4_offset()..];
        if ip.src == dst && icmp.len() >= 8 && icmp[0] == 0 && icmp[4..6] == ident.to_be_bytes() {
            return true;
        }
    }
    false
}

/// Listens in `ns` until `stop`; answers every probe with `name token`. True if any probe
/// arrived.
fn listen(
    ns: &str,
    name: &str,
    tcp: bool,
    port: u16,
    stop: &AtomicBool,
    ready: crossbeam_channel::Sender<()>,
) -> bool {
    let Ok(_guard) = NetnsGuard::enter(ns) else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = false;
    if tcp {
        let Ok(l) = TcpListener::bind(("0.0.0.0", port)) else {
            return false;
        };
        let _ = l.set_nonblocking(true);
        let _ = ready.send(());
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match l.accept() {
                Ok((mut s, _)) => {
                    seen = true;
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut line = String::new();
                    if BufReader::new(&mut s).read_line(&mut line).is_ok() {
                        let _ = writeln!(s, "{name} {}", line.trim());
                    }
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    } else {
        let Ok(u) = UdpSocket::bind(("0.0.0.0", port)) else {
            return false;
        };
        let _ = u.set_read_timeout(Some(Duration::from_millis(20)));
        let _ = ready.send(());
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok((n, from)) = u.recv_from(&mut buf) {
                seen = true;
                let msg = format!("{name} {}", String::from_utf8_lossy(&buf[..n]).trim());
                let _ = u.send_to(msg.as_bytes(), from);
            }
        }
    }
    seen
}

/// Connects from `ns`; returns the name of whoever answered with our token.
fn tcp_probe(ns: &str, dst: Ipv4Addr, port: u16, token: &str) -> Option<String> {
    let _guard = NetnsGuard::enter(ns).ok()?;
    let mut s =
        TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    writeln!(s, "{token}").ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok();
    answerer(&reply, token)
}

/// Sends a datagram from `ns`; returns the name of whoever echoed our token.
fn udp_probe(ns: &str, dst: Ipv4Addr, port: u16, token: &str) -> Option<String> {
    let _guard = NetnsGuard::enter(ns).ok()?;
    let u = UdpSocket::bind(("0.0.0.0", 0)).ok()?;
    u.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    u.send_to(token.as_bytes(), (dst, port)).ok()?;
    let mut buf = [0u8; 512];
    let (n, _) = u.recv_from(&mut buf).ok()?;
    answerer(&String::from_utf8_lossy(&buf[..n]), token)
}

fn answerer(reply: &str, token: &str) -> Option<String> {
    let (name, echoed) = reply.trim().split_once(' ')?;
    (echoed == token).then(|| name.to_string())
}
