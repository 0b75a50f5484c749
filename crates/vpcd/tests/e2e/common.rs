//! Helpers of the end-to-end tests (`tests/e2e.rs`): labs that tear themselves down, checks
//! for root and tools, traffic inside namespaces, captures, statistics.
//!
//! Labs are built and removed with the real `vpcd` binary (`vpcd lab up` starts the daemons
//! as `/proc/self/exe run ...`, which inside this test binary would be the test binary
//! itself); everything else (statistics, `lab check`, entering namespaces) uses the library.

// Each test binary includes this file and uses a part of it: the rest would be dead code there.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vpcd::io::netns::NetnsGuard;
use vpcd::lab::Lab;
use vpcd::topology::Topology;

/// The real daemon binary.
pub const VPCD: &str = env!("CARGO_BIN_EXE_vpcd");
/// What a test needs besides root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// iproute2.
    Ip,
    /// ping (iputils).
    Ping,
    /// tshark (and its dumpcap).
    Tshark,
    /// A Python 3 with scapy (see [`python`]).
    Scapy,
    /// nft (nftables): the appliances' forwarding rules.
    Nft,
    /// conntrack (conntrack-tools): the kernel referee's tables.
    Conntrack,
    /// etcd (etcd-server): the store of `vpcd lab up --store`.
    Etcd,
}

impl Tool {
    /// Whether the tool is here.
    fn present(self) -> bool {
        match self {
            Tool::Ip => on_path("ip").is_some(),
            Tool::Ping => on_path("ping").is_some(),
            Tool::Tshark => on_path("tshark").is_some() && on_path("dumpcap").is_some(),
            Tool::Scapy => find_python().is_some(),
            Tool::Nft => on_path("nft").is_some(),
            Tool::Conntrack => on_path("conntrack").is_some(),
            Tool::Etcd => on_path("etcd").is_some(),
        }
    }

    /// What is missing when it is, and the Debian package that brings it.
    fn missing(self) -> (&'static str, &'static str) {
        match self {
            Tool::Ip => ("ip", "iproute2"),
            Tool::Ping => ("ping", "iputils-ping"),
            Tool::Tshark => ("tshark/dumpcap", "tshark"),
            Tool::Scapy => (
                "a python3 with scapy ($VPCD_PYTHON, else python3 on PATH or /usr/bin/python3)",
                "python3-scapy",
            ),
            Tool::Nft => ("nft", "nftables"),
            Tool::Conntrack => ("conntrack", "conntrack"),
            Tool::Etcd => ("etcd", "etcd-server"),
        }
    }
}

/// The first executable file called `exe` in a directory of `PATH`.
pub fn on_path(exe: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(exe))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn imports_scapy(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import scapy.all"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Python the scapy scripts run with: `$VPCD_PYTHON` when set (and only it), else the
/// first of every `python3` on `PATH`, then `/usr/bin/python3`, that imports scapy.
fn find_python() -> Option<&'static Path> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("VPCD_PYTHON") {
                let p = PathBuf::from(p);
                return imports_scapy(&p).then_some(p);
            }
            let path = std::env::var("PATH").unwrap_or_default();
            path.split(':')
                .filter(|d| !d.is_empty())
                .map(|d| Path::new(d).join("python3"))
                .chain([PathBuf::from("/usr/bin/python3")])
                .find(|p| imports_scapy(p))
        })
        .as_deref()
}

/// The Python with scapy; call it after [`can_run`] with [`Tool::Scapy`] said yes.
pub fn python() -> &'static str {
    find_python()
        .and_then(Path::to_str)
        .expect("no python3 with scapy (check can_run(.., &[Tool::Scapy]) first)")
}

/// The effective uid is 0 (read from /proc: nix's `user` feature is not enabled).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let uids = s.lines().find_map(|l| l.strip_prefix("Uid:"))?.to_string();
            uids.split_whitespace().nth(1).map(|e| e == "0")
        })
        .unwrap_or(false)
}

/// Where skipped tests record themselves, a line `test: reason` each (scripts/test.sh
/// empties it first and counts it in its summary).
pub fn skips_file() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("vpcd-skips.txt")
}

/// `VPCD_REQUIRE_E2E=1`: a test that cannot run fails instead of skipping (.ci/run sets it).
pub fn e2e_required() -> bool {
    std::env::var("VPCD_REQUIRE_E2E").is_ok_and(|v| v == "1")
}

/// Skips `test` for `reason`: says so on stderr and in [`skips_file`]; with
/// `VPCD_REQUIRE_E2E=1`, fails instead, saying what is missing and how to install it.
pub fn skip(test: &str, reason: &str, install: &str) {
    if e2e_required() {
        panic!("VPCD_REQUIRE_E2E=1, but `{test}` cannot run: {reason}; {install}");
    }
    eprintln!("\n!!!!!!!! SKIPPED e2e test `{test}`: {reason}; {install} !!!!!!!!\n");
    let line = format!("{test}: {reason}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(skips_file())
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!(
            "could not record the skip in {}: {e}",
            skips_file().display()
        );
    }
}

/// True when `test` can run here: root and every tool of `tools`. Otherwise the test is
/// skipped (see [`skip`]: recorded, or a failure under `VPCD_REQUIRE_E2E=1`).
pub fn can_run(test: &str, tools: &[Tool]) -> bool {
    let mut missing = Vec::new();
    let mut packages = Vec::new();
    if !is_root() {
        missing.push("root privileges");
    }
    for t in tools.iter().filter(|t| !t.present()) {
        let (what, package) = t.missing();
        missing.push(what);
        packages.push(package);
    }
    if missing.is_empty() {
        return true;
    }
    let install = if packages.is_empty() {
        "run the tests as root (`sudo .ci/run` sets up everything)".to_string()
    } else {
        format!(
            "install with `apt-get install {}` (or run `sudo .ci/run`, which sets up everything)",
            packages.join(" ")
        )
    };
    skip(test, &format!("missing {}", missing.join(", ")), &install);
    false
}

/// Runs `vpcd ARGS...` and returns its output.
pub fn vpcd(args: &[&str]) -> Output {
    Command::new(VPCD)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running vpcd")
}

pub fn show(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `vpcd lab down --name NAME`, asserting success.
pub fn lab_down(name: &str) {
    let o = vpcd(&["lab", "down", "--name", name]);
    assert!(
        o.status.success(),
        "vpcd lab down --name {name}: {}",
        show(&o)
    );
}

/// A lab built from a topology; dropping it runs `vpcd lab down` (also when the test fails).
pub struct LabUp {
    /// The library's handle on it.
    pub lab: Lab,
    /// Its topology.
    pub topo: Topology,
    file: PathBuf,
}

impl LabUp {
    /// Builds lab `name` from `toml` with `vpcd lab up`. Leftovers of an earlier, killed run
    /// of the same test are removed first.
    pub fn start(name: &str, toml: &str) -> LabUp {
        LabUp::start_with(name, toml, 2)
    }

    /// [`LabUp::start`] with `workers` worker threads per daemon (2 by default, whatever the
    /// number of cores, so that flows are spread over workers everywhere).
    pub fn start_with(name: &str, toml: &str, workers: usize) -> LabUp {
        LabUp::start_args(name, toml, workers, &[])
    }

    /// [`LabUp::start`] with `vpcd lab up --store`: the lab's etcd, its daemons following it.
    pub fn start_store(name: &str, toml: &str) -> LabUp {
        LabUp::start_args(name, toml, 1, &["--store"])
    }

    fn start_args(name: &str, toml: &str, workers: usize, extra: &[&str]) -> LabUp {
        let topo = Topology::parse(toml, name).unwrap_or_else(|e| panic!("topology: {e}"));
        let lab = Lab::new(name).expect("lab name");
        // The names are this test's own: whatever carries them is a leftover of ours.
        lab_down(name);
        for i in &topo.instances {
            let ns = i.netns.as_deref().expect("instances have a netns");
            if vpcd::io::netns::exists(ns) {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
        let file = std::env::temp_dir().join(format!("vpcd-e2e-{name}.toml"));
        std::fs::write(&file, toml).expect("writing the topology");
        // From here on, dropping the guard removes whatever `up` made, even half of it.
        let up = LabUp { lab, topo, file };
        let workers = workers.to_string();
        let mut args = vec![
            "lab",
            "up",
            up.file.to_str().unwrap(),
            "--name",
            name,
            "--workers",
            &workers,
        ];
        args.extend_from_slice(extra);
        let o = vpcd(&args);
        assert!(o.status.success(), "vpcd lab up {name}: {}", show(&o));
        up
    }

    /// The lab's name.
    pub fn name(&self) -> &str {
        &self.lab.name
    }

    /// The namespace of an instance (or host, or `underlay`).
    pub fn ns(&self, target: &str) -> String {
        self.lab.namespace_of(target).expect("lab target")
    }

    /// An instance's address.
    pub fn ip(&self, instance: &str) -> Ipv4Addr {
        let id = self.topo.instance_named(instance).expect("instance");
        self.topo.instance(id).ip
    }

    /// Fresh statistics of every host (the daemons rewrite them on SIGUSR1).
    pub fn stats(&self) -> Stats {
        self.lab.refresh_stats();
        Stats(
            self.topo
                .hosts
                .iter()
                .map(|h| (h.name.clone(), self.lab.read_stats(&h.name)))
                .collect(),
        )
    }

    /// Every host's counters once the instances' traffic has settled (no instance counter
    /// moved for 500 ms, at most 5 s): the start of a window that must see nothing, so that
    /// the last packets of earlier flows (a FIN, a delayed ACK) don't count in it.
    pub fn quiet_stats(&self) -> Stats {
        let instances = |s: &Stats| -> Vec<u64> {
            s.0.values()
                .flat_map(|m| m.iter())
                .filter(|(k, _)| k.starts_with("instance."))
                .map(|(_, v)| *v)
                .collect()
        };
        let mut last = self.stats();
        for _ in 0..10 {
            std::thread::sleep(std::time::Duration::from_millis(500));
            let now = self.stats();
            if instances(&now) == instances(&last) {
                return now;
            }
            last = now;
        }
        last
    }

    /// Every host's log, for a failing test's report.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for h in &self.topo.hosts {
            let log = std::fs::read_to_string(self.lab.log_path(&h.name)).unwrap_or_default();
            s.push_str(&format!("----- {} log\n{}", h.name, log));
            let stats = std::fs::read_to_string(self.lab.stats_path(&h.name)).unwrap_or_default();
            let nonzero: Vec<&str> = stats.lines().filter(|l| !l.ends_with(" 0")).collect();
            s.push_str(&format!(
                "----- {} stats (non-zero)\n{}\n",
                h.name,
                nonzero.join("\n")
            ));
        }
        s
    }
}

impl Drop for LabUp {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("===== lab {} at the failure:\n{}", self.name(), self.logs());
        }
        let o = vpcd(&["lab", "down", "--name", &self.lab.name]);
        if !o.status.success() {
            eprintln!("vpcd lab down --name {}: {}", self.lab.name, show(&o));
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Every host's counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct Stats(pub BTreeMap<String, BTreeMap<String, u64>>);

impl Stats {
    /// A counter of a host (`drop.RouteDrop`, `delivered`, `instance.NAME.received`...).
    pub fn get(&self, host: &str, key: &str) -> u64 {
        self.0
            .get(host)
            .and_then(|m| m.get(key))
            .copied()
            .unwrap_or(0)
    }

    /// How much a counter grew since `before`.
    pub fn grew(&self, before: &Stats, host: &str, key: &str) -> u64 {
        self.get(host, key).saturating_sub(before.get(host, key))
    }

    /// How many packets a host dropped for `reason` since `before`.
    pub fn dropped(&self, before: &Stats, host: &str, reason: &str) -> u64 {
        self.grew(before, host, &format!("drop.{reason}"))
    }

    /// Every counter that grew since `before`, as `host: key +n` (for messages).
    pub fn diff(&self, before: &Stats) -> String {
        let mut out = Vec::new();
        for (h, m) in &self.0 {
            for (k, v) in m {
                let was = before.get(h, k);
                if *v > was && k != "seq" {
                    out.push(format!("{h}: {k} +{}", v - was));
                }
            }
        }
        out.join("; ")
    }
}

/// Runs `ARGS...` inside namespace `ns` (`ip netns exec`).
pub fn exec_in(ns: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("ip netns exec")
}

/// `ip ARGS...`, asserting success.
pub fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("ip");
    assert!(o.status.success(), "ip {}: {}", args.join(" "), show(&o));
}

/// Pings `dst` `count` times from namespace `ns`; returns how many replies came back.
pub fn ping(ns: &str, dst: Ipv4Addr, count: u32) -> u32 {
    ping_with(ns, dst, count, &[])
}

/// [`ping`] with extra options (`-I ADDR`...).
pub fn ping_with(ns: &str, dst: Ipv4Addr, count: u32, extra: &[&str]) -> u32 {
    let count_s = count.to_string();
    let dst_s = dst.to_string();
    let mut args = vec!["ping", "-n", "-q", "-c", &count_s, "-i", "0.2", "-W", "1"];
    args.extend_from_slice(extra);
    args.push(&dst_s);
    let o = exec_in(ns, &args);
    let text = String::from_utf8_lossy(&o.stdout);
    // "3 packets transmitted, 3 received, 0% packet loss"
    text.lines()
        .find_map(|l| {
            let (_, rest) = l.split_once("transmitted, ")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// Runs `f` on a new thread that first enters namespace `ns`.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    thread::spawn(move || {
        let _g = NetnsGuard::enter(&ns).unwrap_or_else(|e| panic!("entering {ns}: {e}"));
        f()
    })
    .join()
    .expect("thread in namespace panicked")
}

/// One thing a listener received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The sender.
    pub from: SocketAddr,
    /// The address it reached (TCP: the connection's own end; UDP: the socket's, 0.0.0.0).
    pub local: SocketAddr,
    /// What it sent (TCP: the first line).
    pub data: String,
}

/// A TCP or UDP listener inside a namespace, answering `NAME DATA` to whatever arrives and
/// recording it, until [`Listener::finish`].
pub struct Listener {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<Seen>>>,
}

impl Listener {
    /// Listens on TCP `port` in `ns` (all addresses); answers as `name`.
    pub fn tcp(ns: &str, name: &str, port: u16) -> Listener {
        Listener::start(ns, name, port, true)
    }

    /// Listens on UDP `port` in `ns` (all addresses); answers as `name`.
    pub fn udp(ns: &str, name: &str, port: u16) -> Listener {
        Listener::start(ns, name, port, false)
    }

    fn start(ns: &str, name: &str, port: u16, tcp: bool) -> Listener {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (ns, name, st) = (ns.to_string(), name.to_string(), stop.clone());
        let handle = thread::spawn(move || {
            let _g = match NetnsGuard::enter(&ns) {
                Ok(g) => g,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("entering {ns}: {e}")));
                    return Vec::new();
                }
            };
            if tcp {
                tcp_serve(&name, port, &st, ready_tx)
            } else {
                udp_serve(&name, port, &st, ready_tx)
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("listener: {e}"),
            Err(_) => panic!("listener did not start"),
        }
        Listener {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops listening; returns everything that arrived.
    pub fn finish(mut self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .map(|h| h.join().expect("listener panicked"))
            .unwrap_or_default()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn tcp_serve(
    name: &str,
    port: u16,
    stop: &AtomicBool,
    ready: mpsc::Sender<Result<(), String>>,
) -> Vec<Seen> {
    let l = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("tcp bind {port}: {e}")));
            return Vec::new();
        }
    };
    l.set_nonblocking(true).unwrap();
    let _ = ready.send(Ok(()));
    let mut seen = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((mut s, from)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let local = s.local_addr().expect("local address");
                let mut line = String::new();
                let _ = BufReader::new(&mut s).read_line(&mut line);
                let _ = writeln!(s, "{name} {}", line.trim());
                seen.push(Seen {
                    from,
                    local,
                    data: line.trim().to_string(),
                });
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
    seen
}

fn udp_serve(
    name: &str,
    port: u16,
    stop: &AtomicBool,
    ready: mpsc::Sender<Result<(), String>>,
) -> Vec<Seen> {
    let u = match UdpSocket::bind(("0.0.0.0", port)) {
        Ok(u) => u,
        Err(e) => {
            let _ = ready.send(Err(format!("udp bind {port}: {e}")));
            return Vec::new();
        }
    };
    u.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let _ = ready.send(Ok(()));
    let mut seen = Vec::new();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = u.recv_from(&mut buf) {
            let data = String::from_utf8_lossy(&buf[..n]).trim().to_string();
            let _ = u.send_to(format!("{name} {data}").as_bytes(), from);
            let local = u.local_addr().expect("local address");
            seen.push(Seen { from, local, data });
        }
    }
    seen
}

/// Connects from `ns` to `dst:port`, sends `msg`, returns the answer (`NAME msg` from a
/// [`Listener`]), or None if nothing answered within about a second and a half.
pub fn tcp_ask(ns: &str, dst: Ipv4Addr, port: u16, msg: &str) -> Option<String> {
    let msg = msg.to_string();
    in_ns(ns, move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_millis(1500))
                .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        writeln!(s, "{msg}").ok()?;
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        let reply = reply.trim().to_string();
        (!reply.is_empty()).then_some(reply)
    })
}

/// Sends one datagram from `ns` (from `src` when given) and waits a second for an answer.
pub fn udp_ask(
    ns: &str,
    src: Option<Ipv4Addr>,
    dst: Ipv4Addr,
    port: u16,
    msg: &str,
) -> Option<String> {
    let msg = msg.to_string();
    in_ns(ns, move || {
        let u = UdpSocket::bind(SocketAddrV4::new(src.unwrap_or(Ipv4Addr::UNSPECIFIED), 0))
            .unwrap_or_else(|e| panic!("udp bind {src:?}: {e}"));
        u.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        u.send_to(msg.as_bytes(), (dst, port)).ok()?;
        let mut buf = [0u8; 2048];
        let (n, _) = u.recv_from(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    })
}

/// Whether a TCP connection from `src_ns` to `dst:port` reaches a listener in `dst_ns`: the
/// answer, and what the listener saw (both must agree).
pub fn tcp_reaches(src_ns: &str, dst_ns: &str, dst: Ipv4Addr, port: u16) -> (bool, Vec<Seen>) {
    let l = Listener::tcp(dst_ns, dst_ns, port);
    let token = format!("probe-{port}-{}", std::process::id());
    let answer = tcp_ask(src_ns, dst, port, &token);
    thread::sleep(Duration::from_millis(100));
    let seen = l.finish();
    let ok = answer.as_deref() == Some(&format!("{dst_ns} {token}"));
    (ok, seen)
}

/// `len` deterministic bytes (xorshift), the same in every run.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// FNV-1a, 64 bits.
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Sends `data` over TCP from `src_ns` to a receiver in `dst_ns` on `dst:port`, which answers
/// with the FNV-1a hash of what it read. Returns (bytes received, hash the receiver sent back).
pub fn tcp_transfer(
    src_ns: &str,
    dst_ns: &str,
    dst: Ipv4Addr,
    port: u16,
    data: Arc<Vec<u8>>,
) -> (Vec<u8>, Option<u64>) {
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let dns = dst_ns.to_string();
    let receiver = thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let _g = NetnsGuard::enter(&dns)?;
        let l = TcpListener::bind(("0.0.0.0", port))?;
        l.set_nonblocking(true)?;
        let _ = ready_tx.send(());
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        s.write_all(&fnv(&got).to_be_bytes())?;
        s.shutdown(Shutdown::Write)?;
        Ok(got)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("receiver did not start");
    let echoed = in_ns(src_ns, move || -> Option<u64> {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_secs(3))
                .ok()?;
        s.set_write_timeout(Some(Duration::from_secs(20))).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(&data).ok()?;
        s.shutdown(Shutdown::Write).ok()?;
        let mut h = [0u8; 8];
        s.read_exact(&mut h).ok()?;
        Some(u64::from_be_bytes(h))
    });
    let got = receiver
        .join()
        .expect("receiver panicked")
        .unwrap_or_default();
    (got, echoed)
}

/// A tshark capture running in a namespace, written to a pcap file.
pub struct Capture {
    child: Option<Child>,
    /// The pcap file.
    pub file: PathBuf,
    stderr: Option<JoinHandle<String>>,
}

impl Capture {
    /// Starts capturing on `iface` in `ns` with capture filter `filter` ("" for all); returns
    /// once tshark says it is capturing. It stops by itself after `max_secs`.
    pub fn start(ns: &str, iface: &str, filter: &str, tag: &str, max_secs: u32) -> Capture {
        let file = std::env::temp_dir().join(format!("vpcd-e2e-{tag}.pcap"));
        let _ = std::fs::remove_file(&file);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "tshark", "-n", "-i", iface])
            .args(["-a", &format!("duration:{max_secs}"), "-w"])
            .arg(&file);
        if !filter.is_empty() {
            cmd.args(["-f", filter]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tshark");
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel::<()>();
        let stderr = thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("Capturing on") {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let mut cap = Capture {
            child: Some(child),
            file,
            stderr: Some(stderr),
        };
        if rx.recv_timeout(Duration::from_secs(15)).is_err() {
            let text = cap.stop_inner();
            panic!("tshark did not start capturing on {iface} in {ns}:\n{text}");
        }
        // dumpcap reports before its first read; leave it a moment.
        thread::sleep(Duration::from_millis(300));
        cap
    }

    fn stop_inner(&mut self) -> String {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    _ if Instant::now() > deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    _ => thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Stops the capture (after a moment for the last packets) and returns the file.
    pub fn stop(mut self) -> PathBuf {
        thread::sleep(Duration::from_millis(300));
        self.stop_inner();
        self.file.clone()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// `tshark -r FILE EXTRA... -T fields -e F...`: one row per packet, one column per field
/// (several occurrences of a field joined by ',').
pub fn tshark_fields(file: &Path, extra: &[&str], fields: &[&str]) -> Vec<Vec<String>> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-n").arg("-r").arg(file).args(extra).args([
        "-T",
        "fields",
        "-E",
        "separator=;",
        "-E",
        "occurrence=a",
        "-E",
        "aggregator=,",
    ]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let o = cmd.output().expect("tshark -r");
    assert!(o.status.success(), "tshark -r: {}", show(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(';').map(str::to_string).collect())
        .collect()
}

/// A namespace on the lab's underlay bridge, `vpcd-LAB-atk` (so that `lab down` sweeps it
/// too), with `addr`/24 on its end `atk0` of a veth whose other end is a port of br0.
pub fn attacker(lab: &LabUp, addr: &str) -> String {
    let ns = format!("vpcd-{}-atk", lab.name());
    let ul = lab.lab.underlay_ns();
    ip(&["netns", "add", &ns]);
    ip(&["-n", &ns, "link", "set", "lo", "up"]);
    ip(&[
        "link", "add", "atk0", "netns", &ns, "type", "veth", "peer", "name", "patk", "netns", &ul,
    ]);
    ip(&["-n", &ul, "link", "set", "patk", "master", "br0", "up"]);
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "atk0",
    ]);
    ip(&["-n", &ns, "link", "set", "atk0", "up"]);
    ns
}

/// The MAC address of `dev` in namespace `ns`.
pub fn mac_of(ns: &str, dev: &str) -> String {
    let o = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", dev])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&o.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC for {dev} in {ns}: {text}"))
        .to_string()
}

/// The directory of this file (scripts live next to it).
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/e2e")
        .join(name)
}

/// Runs a scapy script (or `-c CODE`) with [`python`] inside `ns`, asserting success.
pub fn python_in(ns: &str, args: &[&str]) -> Output {
    let mut all = vec![python()];
    all.extend_from_slice(args);
    let o = exec_in(ns, &all);
    assert!(
        o.status.success(),
        "python in {ns} ({}): {}",
        args.join(" "),
        show(&o)
    );
    o
}

/// True when `pid` runs: some thread of it is not a zombie.
pub fn running(pid: u32) -> bool {
    // A killed group leader is a zombie while its other threads still exit (and hold the
    // process's descriptors, its lock among them): alive while any thread is not a zombie.
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !matches!(r.trim_start().chars().next(), Some('Z' | 'X')))
        })
    })
}

/// Every named network namespace.
pub fn netns_list() -> Vec<String> {
    std::fs::read_dir(vpcd::io::netns::NETNS_DIR)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&p| p != me)
                .filter_map(|p| {
                    let c = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    c.contains(needle).then_some((p, c))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `flows` connected UDP sockets of `ns`, each from its own port, send to `dst:port`, which is
/// closed; after `wait`, returns how many saw the ICMP port unreachable (ECONNREFUSED).
pub fn udp_refused_to(ns: &str, dst: Ipv4Addr, port: u16, flows: usize, wait: Duration) -> usize {
    in_ns(ns, move || {
        let socks: Vec<std::net::UdpSocket> = (0..flows)
            .map(|_| {
                let u = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
                u.connect((dst, port)).unwrap();
                u.set_nonblocking(true).unwrap();
                u
            })
            .collect();
        for u in &socks {
            let _ = u.send(b"anyone there?");
        }
        std::thread::sleep(wait);
        socks
            .iter()
            .filter(|u| {
                let mut buf = [0u8; 64];
                matches!(u.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
            })
            .count()
    })
}

/// No rate limit on the ICMP errors a namespace's kernel sends (one error per flow).
pub fn no_icmp_ratelimit(ns: &str) {
    in_ns(ns, || {
        std::fs::write("/proc/sys/net/ipv4/icmp_ratelimit", "0").expect("icmp_ratelimit")
    });
}

// ----------------------------------------------------------------------------------------------
// Probes shared by the cloud and isolation tests

/// The internet's own address (the first usable of 203.0.113.0/24).
pub const INTERNET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

/// How many packets instance `inst` received, on every host.
pub fn received(s: &Stats, before: &Stats, inst: &str) -> u64 {
    s.0.keys()
        .map(|h| s.grew(before, h, &format!("instance.{inst}.received")))
        .sum()
}

/// Sends `n` datagrams from `ns` to `dst:port`, tagged `msg`, without waiting for answers.
pub fn udp_fire(ns: &str, dst: Ipv4Addr, port: u16, msg: &str, n: usize) {
    let msg = msg.to_string();
    in_ns(ns, move || {
        let u = UdpSocket::bind(("0.0.0.0", 0)).expect("udp bind");
        for _ in 0..n {
            // "Network unreachable" is an answer too: nothing leaves.
            let _ = u.send_to(msg.as_bytes(), (dst, port));
            thread::sleep(Duration::from_millis(20));
        }
    })
}

/// Connects from `src_ns` to `dst:port` where a TCP [`Listener`] of `dst_ns` listens; returns
/// the connection as the listener saw it (both ends), or None when the answer did not come
/// back (then the listener must have accepted nothing).
pub fn tcp_seen(src_ns: &str, dst_ns: &str, dst: Ipv4Addr, port: u16) -> Option<Seen> {
    let spy = Listener::tcp(dst_ns, "spy", port);
    let token = format!("hello-{port}");
    let answer = tcp_ask(src_ns, dst, port, &token);
    thread::sleep(Duration::from_millis(100));
    let seen = spy.finish();
    if answer.as_deref() != Some(&format!("spy {token}")) {
        assert!(
            seen.is_empty(),
            "{dst_ns} accepted a connection whose answer never came back: {seen:?}"
        );
        return None;
    }
    assert!(
        seen.len() == 1 && seen[0].data == token,
        "one connection, carrying {token}: {seen:?}"
    );
    Some(seen[0].clone())
}

/// GRE packets (or GRE-in-UDP) on the underlay bridge while `traffic` runs: the tshark
/// `fields` of each (`ip.src` and `ip.dst` read `outer,inner`).
pub fn gre_on_wire(
    lab: &LabUp,
    tag: &str,
    fields: &[&str],
    traffic: impl FnOnce(),
) -> Vec<Vec<String>> {
    let rows = gre_read(lab, tag, &["-Y", "gre"], fields, traffic);
    eprintln!("{tag} on the wire: {} GRE packets", rows.len());
    for r in rows.iter().take(40) {
        eprintln!("  {}", r.join(" | "));
    }
    rows
}

/// The underlay bridge's GRE (or GRE-in-UDP, decoded as GRE) while `traffic` runs, read by
/// tshark with `extra` options (a display filter among them): the `fields` of each packet.
pub fn gre_read(
    lab: &LabUp,
    tag: &str,
    extra: &[&str],
    fields: &[&str],
    traffic: impl FnOnce(),
) -> Vec<Vec<String>> {
    let filter = match lab.topo.underlay.transport {
        vpcd::topology::Transport::Gre => "ip proto 47",
        vpcd::topology::Transport::GreUdp => "udp port 4754",
    };
    let cap = Capture::start(&lab.lab.underlay_ns(), "br0", filter, tag, 60);
    traffic();
    let file = cap.stop();
    let mut args = vec!["-d", "udp.port==4754,gre"];
    args.extend_from_slice(extra);
    let rows = tshark_fields(&file, &args, fields);
    let _ = std::fs::remove_file(&file);
    rows
}

/// The GRE rows (of [`gre_on_wire`], `ip.src` and `ip.dst` first) carrying inner `src -> dst`
/// from host address `from` to host address `to`.
pub fn gre_rows<'a>(
    rows: &'a [Vec<String>],
    (from, to): (&str, &str),
    (src, dst): (Ipv4Addr, Ipv4Addr),
) -> Vec<&'a Vec<String>> {
    rows.iter()
        .filter(|r| r[0] == format!("{from},{src}") && r[1] == format!("{to},{dst}"))
        .collect()
}

/// `ip -br addr show dev DEV` in a namespace: the device's IPv4 addresses.
pub fn addrs_of(ns: &str, dev: &str) -> Vec<String> {
    let o = Command::new("ip")
        .args(["-n", ns, "-4", "-br", "addr", "show", "dev", dev])
        .output()
        .expect("ip -br addr");
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .skip(2)
        .map(str::to_string)
        .collect()
}

/// Lines of a host's log that contain `needle`.
pub fn log_count(lab: &LabUp, host: &str, needle: &str) -> usize {
    std::fs::read_to_string(lab.lab.log_path(host))
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// Writes `text` as the lab's topology, records its allocations in the lab's lock file as a
/// user would (`vpcd check`; an invalid file records nothing), sends SIGHUP to every daemon
/// and waits until each host's log has one more line containing `outcome`.
pub fn reload(lab: &LabUp, text: &str, outcome: &str) {
    let hosts: Vec<String> = lab.topo.hosts.iter().map(|h| h.name.clone()).collect();
    let before: Vec<usize> = hosts.iter().map(|h| log_count(lab, h, outcome)).collect();
    let path = lab.lab.topology_path();
    std::fs::write(&path, text).expect("writing the lab's topology");
    vpcd(&["check", path.to_str().unwrap()]);
    let daemons = lab.lab.daemons();
    assert_eq!(daemons.len(), hosts.len(), "daemons: {daemons:?}");
    for (h, pid) in &daemons {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap_or_else(|e| panic!("SIGHUP to {h}'s vpcd ({pid}): {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (h, was) in hosts.iter().zip(before) {
        while log_count(lab, h, outcome) <= was {
            assert!(
                Instant::now() < deadline,
                "{h}'s log does not say \"{outcome}\" after SIGHUP:\n{}",
                std::fs::read_to_string(lab.lab.log_path(h)).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Streams: numbered messages that must all arrive

/// What both ends of a [`Stream`] share.
#[derive(Default)]
struct StreamState {
    stop: AtomicBool,
    rstop: AtomicBool,
    sent: AtomicUsize,
    got: Mutex<Vec<(u32, Instant)>>,
    errors: Mutex<Vec<String>>,
}

impl StreamState {
    fn error(&self, e: String) {
        self.errors.lock().unwrap().push(e);
    }

    fn record(&self, line: &str) {
        if let Ok(n) = line.trim().parse() {
            self.got.lock().unwrap().push((n, Instant::now()));
        }
    }
}

/// Numbered messages sent every `every` from one namespace to another, over UDP or one TCP
/// connection; the receiver records each number and when it arrived, as it goes.
pub struct Stream {
    state: Arc<StreamState>,
    sender: Option<JoinHandle<()>>,
    receiver: Option<JoinHandle<()>>,
}

impl Stream {
    pub fn start(
        src_ns: &str,
        dst_ns: &str,
        dst: Ipv4Addr,
        port: u16,
        tcp: bool,
        every: Duration,
    ) -> Stream {
        let state = Arc::new(StreamState::default());
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let (dns, st) = (dst_ns.to_string(), state.clone());
        let receiver = thread::spawn(move || {
            let _g = NetnsGuard::enter(&dns).expect("receiver's namespace");
            if tcp {
                stream_tcp_receive(port, &st, ready_tx)
            } else {
                stream_udp_receive(port, &st, ready_tx)
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("stream receiver did not start");
        let (sns, st) = (src_ns.to_string(), state.clone());
        let sender = thread::spawn(move || {
            let _g = NetnsGuard::enter(&sns).expect("sender's namespace");
            if tcp {
                stream_tcp_send((dst, port), every, &st)
            } else {
                stream_udp_send((dst, port), every, &st)
            }
        });
        Stream {
            state,
            sender: Some(sender),
            receiver: Some(receiver),
        }
    }

    /// Numbers received so far, with their arrival times.
    pub fn received(&self) -> Vec<(u32, Instant)> {
        self.state.got.lock().unwrap().clone()
    }

    /// Stops sending; after `grace` for the last messages, stops receiving. Returns how many
    /// were sent, what arrived (in arrival order) and the errors either end met.
    pub fn finish(mut self, grace: Duration) -> (u32, Vec<(u32, Instant)>, Vec<String>) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.sender.take() {
            let _ = h.join();
        }
        thread::sleep(grace);
        self.state.rstop.store(true, Ordering::Relaxed);
        if let Some(h) = self.receiver.take() {
            let _ = h.join();
        }
        let sent = self.state.sent.load(Ordering::Relaxed) as u32;
        let got = self.state.got.lock().unwrap().clone();
        let errors = self.state.errors.lock().unwrap().clone();
        (sent, got, errors)
    }
}

impl Drop for Stream {
    /// A failing test stops its streams too (their threads end by themselves).
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        self.state.rstop.store(true, Ordering::Relaxed);
    }
}

/// The receiving end over TCP: accepts one connection (within 10 s), records every line.
fn stream_tcp_receive(port: u16, st: &StreamState, ready: mpsc::Sender<()>) {
    let l = TcpListener::bind(("0.0.0.0", port)).expect("tcp bind");
    l.set_nonblocking(true).unwrap();
    let _ = ready.send(());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(_) if Instant::now() < deadline && !st.rstop.load(Ordering::Relaxed) => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(_) => return st.error("receiver: no connection".into()),
        }
    };
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    while !st.rstop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                while let Some(p) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=p).collect();
                    st.record(&String::from_utf8_lossy(&line));
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return st.error(format!("receiver: {e}")),
        }
    }
}

/// The receiving end over UDP: records every datagram.
fn stream_udp_receive(port: u16, st: &StreamState, ready: mpsc::Sender<()>) {
    let u = UdpSocket::bind(("0.0.0.0", port)).expect("udp bind");
    u.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let _ = ready.send(());
    let mut buf = [0u8; 64];
    while !st.rstop.load(Ordering::Relaxed) {
        if let Ok((n, _)) = u.recv_from(&mut buf) {
            st.record(&String::from_utf8_lossy(&buf[..n]));
        }
    }
}

/// Writes as much of `pending` as the non-blocking socket takes.
fn stream_flush(s: &mut TcpStream, pending: &mut Vec<u8>) -> Result<(), String> {
    while !pending.is_empty() {
        match s.write(pending) {
            Ok(0) => return Err("sender: write: closed".into()),
            Ok(k) => {
                pending.drain(..k);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(format!("sender: write: {e}")),
        }
    }
    Ok(())
}

/// The sending end over TCP: one line a number, until told to stop; then the rest of the
/// buffer (within a second) and a half-close.
fn stream_tcp_send(dst: (Ipv4Addr, u16), every: Duration, st: &StreamState) {
    let mut s = match TcpStream::connect_timeout(&SocketAddr::from(dst), Duration::from_secs(3)) {
        Ok(s) => s,
        Err(e) => return st.error(format!("sender: connect: {e}")),
    };
    s.set_nodelay(true).unwrap();
    // Non-blocking, with a buffer of its own: a stalled connection (its send buffer full)
    // never blocks the sender, which only stops when told to.
    s.set_nonblocking(true).unwrap();
    let mut pending: Vec<u8> = Vec::new();
    while !st.stop.load(Ordering::Relaxed) {
        let n = st.sent.load(Ordering::Relaxed);
        pending.extend_from_slice(format!("{n}\n").as_bytes());
        st.sent.store(n + 1, Ordering::Relaxed);
        if let Err(e) = stream_flush(&mut s, &mut pending) {
            return st.error(e);
        }
        thread::sleep(every);
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while !pending.is_empty() && Instant::now() < deadline {
        if let Err(e) = stream_flush(&mut s, &mut pending) {
            return st.error(e);
        }
        thread::sleep(Duration::from_millis(5));
    }
    let _ = s.shutdown(Shutdown::Write);
    // Keep the socket until the receiver has read everything.
    thread::sleep(Duration::from_millis(200));
}

/// The sending end over UDP: one datagram a number, until told to stop.
fn stream_udp_send(dst: (Ipv4Addr, u16), every: Duration, st: &StreamState) {
    let u = UdpSocket::bind(("0.0.0.0", 0)).expect("udp bind");
    while !st.stop.load(Ordering::Relaxed) {
        let n = st.sent.load(Ordering::Relaxed);
        let _ = u.send_to(n.to_string().as_bytes(), dst);
        st.sent.store(n + 1, Ordering::Relaxed);
        thread::sleep(every);
    }
}

/// Stops a [`Stream`] (half a second for the last messages); says what went wrong if a
/// number sent did not arrive, either end met an error, or the stream stalled for `stall`.
pub fn loss(what: &str, s: Stream, stall: Duration) -> Option<String> {
    let (sent, got, errors) = s.finish(Duration::from_millis(500));
    let mut numbers: Vec<u32> = got.iter().map(|(n, _)| *n).collect();
    numbers.sort_unstable();
    numbers.dedup();
    let missing: Vec<u32> = (0..sent)
        .filter(|n| numbers.binary_search(n).is_err())
        .collect();
    eprintln!("{what}: {sent} sent, {} received", got.len());
    if !errors.is_empty() {
        return Some(format!("{what}: {errors:?}"));
    }
    if sent <= 100 {
        return Some(format!("{what}: only {sent} sent"));
    }
    if !missing.is_empty() {
        return Some(format!(
            "{what}: {} of {sent} lost: {:?}",
            missing.len(),
            &missing[..missing.len().min(30)]
        ));
    }
    let worst = got
        .windows(2)
        .map(|w| w[1].1 - w[0].1)
        .max()
        .unwrap_or_default();
    (worst >= stall).then(|| format!("{what}: stalled {worst:?}"))
}

/// [`loss`], as an assertion.
pub fn assert_no_loss(what: &str, s: Stream, stall: Duration) {
    if let Some(problem) = loss(what, s, stall) {
        panic!("{problem}");
    }
}

/// Samples of a metric family, parsed by prometheus_client's own parser: `labels -> value`.
pub fn scrape(text: &str, family: &str) -> Vec<(serde_json::Value, f64)> {
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

/// `vpcd ctl ARGS` on the control socket of `host`'s daemon in `lab`.
pub fn ctl_at(lab: &LabUp, host: &str, args: &[&str]) -> Output {
    let sock = format!("/run/vpcd/{}.sock", lab.lab.host_ns(host));
    let mut all = vec!["ctl", "--control", &sock];
    all.extend_from_slice(args);
    vpcd(&all)
}
