//! Helpers of the end-to-end tests (`tests/e2e.rs`): labs that tear themselves down, checks
//! for root and tools, traffic inside namespaces, captures, statistics.
//!
//! Labs are built and removed with the real `vpcd` binary (`vpcd lab up` starts the daemons
//! as `/proc/self/exe run ...`, which inside this test binary would be the test binary
//! itself); everything else (statistics, `lab check`, entering namespaces) uses the library.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vpcd::io::netns::NetnsGuard;
use vpcd::lab::Lab;
use vpcd::topology::Topology;

/// The real daemon binary.
pub const VPCD: &str = env!("CARGO_BIN_EXE_vpcd");
/// The interpreter the scapy scripts run with.
pub const PYTHON: &str = "/usr/bin/python3";

/// What a test needs besides root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// iproute2.
    Ip,
    /// ping (iputils).
    Ping,
    /// tshark (and its dumpcap).
    Tshark,
    /// /usr/bin/python3 with scapy.
    Scapy,
}

fn on_path(exe: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':').filter(|d| !d.is_empty()).any(|d| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(Path::new(d).join(exe))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

fn scapy_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        Command::new(PYTHON)
            .args(["-c", "import scapy.all"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
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

/// True when `test` can run here: root and every tool of `tools`. Otherwise says loudly why
/// the test is skipped (CI installs everything, so nothing skips there).
pub fn can_run(test: &str, tools: &[Tool]) -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root privileges".to_string());
    }
    for t in tools {
        let ok = match t {
            Tool::Ip => on_path("ip"),
            Tool::Ping => on_path("ping"),
            Tool::Tshark => on_path("tshark") && on_path("dumpcap"),
            Tool::Scapy => scapy_available(),
        };
        if !ok {
            missing.push(match t {
                Tool::Ip => "ip (iproute2)".to_string(),
                Tool::Ping => "ping".to_string(),
                Tool::Tshark => "tshark/dumpcap".to_string(),
                Tool::Scapy => format!("{PYTHON} with scapy"),
            });
        }
    }
    if missing.is_empty() {
        return true;
    }
    eprintln!(
        "\n!!!!!!!! SKIPPED e2e test `{test}`: missing {} (CI runs it as root with every tool) !!!!!!!!\n",
        missing.join(", ")
    );
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
        let o = vpcd(&[
            "lab",
            "up",
            up.file.to_str().unwrap(),
            "--name",
            name,
            "--workers",
            &workers.to_string(),
        ]);
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
                let mut line = String::new();
                let _ = BufReader::new(&mut s).read_line(&mut line);
                let _ = writeln!(s, "{name} {}", line.trim());
                seen.push(Seen {
                    from,
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
            seen.push(Seen { from, data });
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

/// Runs a scapy script (or `-c CODE`) with [`PYTHON`] inside `ns`, asserting success.
pub fn python_in(ns: &str, args: &[&str]) -> Output {
    let mut all = vec![PYTHON];
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
