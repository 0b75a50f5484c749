//! Health checks of load balancers' backends (docs/semantics.md 2.11, "Health"), at the
//! edge: each host probes its own backends, and tells every other host.
//!
//! - **Probes.** One thread per local backend (load balancer, listener, backend) probes at
//!   the listener's interval, from inside the backend's namespace: a TCP connect to its
//!   address and port within the timeout (the listener is up), or for UDP a datagram that
//!   must not be refused (ICMP port unreachable). A probe also fails when the backend's
//!   inbound ACL or groups do not admit the documented health-check source
//!   ([`HEALTH_SOURCE`]) on that port, as the cloud's checks do.
//! - **Thresholds.** [`HealthState::observe`]: `unhealthy` failures in a row make a backend
//!   unhealthy, `healthy` successes healthy again. A backend starts healthy.
//! - **Reports.** Every second, and at once on a change, the host sends its backends' states
//!   to every other host over the underlay (UDP [`HEALTH_PORT`], [`encode_report`]). A host
//!   believes a report only from a host's underlay address and only about that host's own
//!   backends; a host that stops reporting has its backends counted unhealthy after three
//!   of their intervals (it is down, or cut off). This works the same with a topology file or
//!   the store: health is observed state that changes by the second, not desired state.
//! - **Workers.** The merged view goes to every worker ([`Msg::Health`]) when it changes;
//!   each change is logged, and `vpcd ctl health` and the metrics show the board.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use tracing::{info, warn};

use super::worker::{Lane, Msg};
use crate::io::netns;
use vpcd_core::policy::balance::{
    BackendName, HEALTH_PORT, Health, HealthState, backend_names, encode_report, parse_report,
    probe_admitted,
};
use vpcd_core::topology::{HealthCheck, HostId, InstanceId, LbProtocol, Topology};

/// One backend on the board.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its state.
    pub state: HealthState,
    /// The host that checks it.
    pub checked_by: String,
    /// Why the last probe failed, if it did.
    pub last_error: Option<String>,
    /// When it last changed or was reported.
    pub updated: Instant,
    /// Its check.
    pub check: HealthCheck,
}

impl Entry {
    /// A backend first heard of now, healthy until its checks say otherwise.
    fn new(checked_by: String, check: HealthCheck) -> Entry {
        Entry {
            state: HealthState::default(),
            checked_by,
            last_error: None,
            updated: Instant::now(),
            check,
        }
    }
}

/// Every backend this host knows about.
pub type Board = Arc<Mutex<BTreeMap<BackendName, Entry>>>;

/// What the hub hears.
enum Heard {
    Topology(Arc<Topology>),
    Probe(BackendName, Result<(), String>),
    Report(Ipv4Addr, Vec<u8>),
}

/// The daemon's handle on health checking.
pub struct Hub {
    tx: Sender<Heard>,
    /// What `vpcd ctl health` and the metrics read.
    pub board: Board,
    stop: Arc<AtomicBool>,
}

impl Hub {
    /// Starts the hub, the report listener and the probes of `topo` on `host`.
    pub fn start(topo: Arc<Topology>, host: HostId, lanes: Arc<[Lane]>) -> std::io::Result<Hub> {
        let (tx, rx) = unbounded();
        let board: Board = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let address = topo.host(host).address;
        let socket = UdpSocket::bind((address, HEALTH_PORT))?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let listen = socket.try_clone()?;
        let (tx2, stop2) = (tx.clone(), stop.clone());
        std::thread::Builder::new()
            .name("vpcd-health-rx".into())
            .spawn(move || listen_reports(&listen, &tx2, &stop2))?;
        let mut state = HubState {
            topo: topo.clone(),
            host,
            lanes,
            board: board.clone(),
            socket,
            probes: BTreeMap::new(),
            tx: tx.clone(),
            pushed: None,
        };
        state.follow(topo);
        let stop3 = stop.clone();
        std::thread::Builder::new()
            .name("vpcd-health".into())
            .spawn(move || state.run(&rx, &stop3))?;
        Ok(Hub { tx, board, stop })
    }

    /// A new topology: probes follow its backends.
    pub fn topology(&self, t: Arc<Topology>) {
        let _ = self.tx.send(Heard::Topology(t));
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn listen_reports(socket: &UdpSocket, tx: &Sender<Heard>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, SocketAddr::V4(from))) = socket.recv_from(&mut buf) {
            let _ = tx.send(Heard::Report(*from.ip(), buf[..n].to_vec()));
        }
    }
}

/// A running probe thread: it stops when its flag is set.
struct Probe {
    stop: Arc<AtomicBool>,
    check: HealthCheck,
}

struct HubState {
    topo: Arc<Topology>,
    host: HostId,
    lanes: Arc<[Lane]>,
    board: Board,
    socket: UdpSocket,
    probes: BTreeMap<BackendName, Probe>,
    tx: Sender<Heard>,
    /// The view the workers have.
    pushed: Option<Health>,
}

impl HubState {
    fn run(&mut self, rx: &Receiver<Heard>, stop: &AtomicBool) {
        let mut last_report = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let mut changed = false;
            match rx.recv_timeout(Duration::from_millis(250)) {
                Ok(Heard::Topology(t)) => self.follow(t),
                Ok(Heard::Probe(name, result)) => changed = self.probed(name, result),
                Ok(Heard::Report(from, bytes)) => self.reported(from, &bytes),
                Err(_) => {}
            }
            if changed || last_report.elapsed() >= Duration::from_secs(1) {
                self.send_reports();
                last_report = Instant::now();
            }
            self.push();
        }
        for p in self.probes.values() {
            p.stop.store(true, Ordering::Relaxed);
        }
    }

    /// Starts and stops probes so that every local backend of `t` has one.
    fn follow(&mut self, t: Arc<Topology>) {
        let host_name = self.topo.host(self.host).name.clone();
        self.host = t.host_named(&host_name).unwrap_or(self.host);
        self.topo = t;
        let wanted = local_backends(&self.topo, self.host);
        self.probes.retain(|name, p| {
            let keep = wanted.get(name).is_some_and(|(_, c)| *c == p.check);
            if !keep {
                p.stop.store(true, Ordering::Relaxed);
            }
            keep
        });
        let names: Vec<BackendName> = backend_names(&self.topo)
            .into_iter()
            .map(|(.., n)| n)
            .collect();
        self.board.lock().unwrap().retain(|n, _| names.contains(n));
        for (name, (id, check)) in wanted {
            if self.probes.contains_key(&name) {
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let target = Target::of(&self.topo, id, &name);
            let (tx, flag) = (self.tx.clone(), stop.clone());
            let n = name.clone();
            let spawned = std::thread::Builder::new()
                .name("vpcd-probe".into())
                .spawn(move || probe_loop(&target, &n, check, &tx, &flag));
            if let Err(e) = spawned {
                warn!(error = %e, "health probe not started");
                continue;
            }
            self.probes.insert(name, Probe { stop, check });
        }
        self.pushed = None;
    }

    /// A local probe's result; true when the backend's health flipped.
    fn probed(&mut self, name: BackendName, result: Result<(), String>) -> bool {
        let Some(check) = self.probes.get(&name).map(|p| p.check) else {
            return false;
        };
        let me = self.topo.host(self.host).name.clone();
        let mut board = self.board.lock().unwrap();
        let e = (board.entry(name.clone())).or_insert_with(|| Entry::new(me, check));
        let flipped = e.state.observe(result.is_ok(), &check);
        e.last_error = result.err();
        if flipped {
            e.updated = Instant::now();
            log_change(&name, e);
        }
        flipped
    }

    /// Another host's report: believed only from a host, about its own backends.
    fn reported(&mut self, from: Ipv4Addr, bytes: &[u8]) {
        let t = &self.topo;
        let Some(sender) = t.host_by_address(from).filter(|&h| h != self.host) else {
            return;
        };
        let Some(entries) = parse_report(bytes) else {
            return;
        };
        let theirs = local_backends(t, sender);
        let mut board = self.board.lock().unwrap();
        for (name, up) in entries {
            let Some((_, check)) = theirs.get(&name) else {
                continue;
            };
            let by = t.host(sender).name.clone();
            let e = (board.entry(name.clone())).or_insert_with(|| Entry::new(by, *check));
            let flipped = e.state.healthy != up;
            e.state = HealthState {
                healthy: up,
                streak: 0,
            };
            e.updated = Instant::now();
            if flipped {
                log_change(&name, e);
            }
        }
    }

    fn send_reports(&self) {
        let board = self.board.lock().unwrap();
        let mine: Vec<(BackendName, bool)> = board
            .iter()
            .filter(|(n, _)| self.probes.contains_key(*n))
            .map(|(n, e)| (n.clone(), e.state.healthy))
            .collect();
        drop(board);
        if mine.is_empty() {
            return;
        }
        let bytes = encode_report(&mine);
        for (i, h) in self.topo.hosts.iter().enumerate() {
            if i != self.host.index() {
                let _ = self.socket.send_to(&bytes, (h.address, HEALTH_PORT));
            }
        }
    }

    /// The view every worker gets: local and reported states, a silent host's backends down.
    fn view(&self) -> Health {
        let board = self.board.lock().unwrap();
        board
            .iter()
            .map(|(n, e)| {
                let local = self.probes.contains_key(n);
                let silent =
                    e.updated.elapsed() > Duration::from_secs(u64::from(e.check.interval) * 3 + 1);
                (n.clone(), e.state.healthy && (local || !silent))
            })
            .collect()
    }

    fn push(&mut self) {
        let view = self.view();
        if self.pushed.as_ref() == Some(&view) {
            return;
        }
        for lane in self.lanes.iter() {
            lane.send_blocking(Msg::Health(view.clone()));
        }
        self.pushed = Some(view);
    }
}

fn log_change(name: &BackendName, e: &Entry) {
    let state = if e.state.healthy {
        "healthy"
    } else {
        "unhealthy"
    };
    info!(
        load_balancer = %name.lb,
        listener = %format!("{} {}", name.protocol.word(), name.port),
        backend = %format!("{}:{}", name.instance, name.backend_port),
        checked_by = %e.checked_by,
        reason = %e.last_error.clone().unwrap_or_default(),
        "backend {state}"
    );
}

/// The backends of instances on `host`, with their instance and check.
fn local_backends(t: &Topology, host: HostId) -> BTreeMap<BackendName, (InstanceId, HealthCheck)> {
    backend_names(t)
        .into_iter()
        .filter_map(|(lb, li, bi, name)| {
            let l = &t.lb(lb).listeners[li];
            let id = l.backends[bi].instance;
            (t.instance(id).host == host).then_some((name, (id, l.health)))
        })
        .collect()
}

/// What a probe thread needs: where to connect from and to, and the policy verdict.
struct Target {
    netns: Option<String>,
    addr: SocketAddr,
    protocol: LbProtocol,
    admitted: Result<(), String>,
}

impl Target {
    fn of(t: &Topology, id: InstanceId, name: &BackendName) -> Target {
        let inst = t.instance(id);
        Target {
            netns: inst.netns.clone(),
            addr: SocketAddr::from((inst.ip, name.backend_port)),
            protocol: name.protocol,
            admitted: probe_admitted(t, id, name.protocol, name.backend_port),
        }
    }
}

fn probe_loop(
    target: &Target,
    name: &BackendName,
    check: HealthCheck,
    tx: &Sender<Heard>,
    stop: &AtomicBool,
) {
    let interval = Duration::from_secs(u64::from(check.interval));
    let timeout = Duration::from_secs(u64::from(check.timeout));
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        next += interval;
        let result = target
            .admitted
            .clone()
            .and_then(|()| probe(target, timeout));
        if tx.send(Heard::Probe(name.clone(), result)).is_err() {
            return;
        }
    }
}

/// One probe from inside the backend's namespace.
fn probe(target: &Target, timeout: Duration) -> Result<(), String> {
    let ns = target.netns.as_deref();
    let result = netns::within(ns, || match target.protocol {
        LbProtocol::Tcp => TcpStream::connect_timeout(&target.addr, timeout).map(drop),
        LbProtocol::Udp => udp_probe(target.addr, timeout),
    });
    result.map_err(|e| format!("{} {}: {e}", target.protocol.word(), target.addr))
}

/// A UDP probe: a datagram the backend's port must not refuse. An answer, or silence for the
/// whole timeout, is a success; ICMP port unreachable (ECONNREFUSED) a failure.
fn udp_probe(addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let s = UdpSocket::bind(("0.0.0.0", 0))?;
    s.connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.send(b"vpcd-health-check")?;
    let mut buf = [0u8; 512];
    match s.recv(&mut buf) {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}
