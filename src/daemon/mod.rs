//! One host's data plane: `vpcd run --topology FILE --host NAME`.
//!
//! ```text
//!  TUN reader (one per instance) ──┐  batches, by flow    ┌─► worker 0: Pipeline shard ─┬─► TUN write (GRO)
//!                                  ├──────────────────────┤                             └─► underlay send (GSO / sendmmsg)
//!  underlay reader (recvmmsg/GRO) ─┘  (symmetric hash)    └─► worker 1: ...
//!                         control thread: signals, 1 s tick (sweep + stats file), SIGHUP reload
//! ```
//!
//! Readers block in poll/read, cut what they read into per-worker batches and hand each batch
//! over whole; workers own their shard of the flow state and their sending sockets. The
//! control thread runs on tokio (signals and timers); the data path runs on plain threads.

mod pool;
mod worker;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use crossbeam_channel::{Sender, bounded};
use hashbrown::HashMap;
use tracing::{error, info, warn};

use crate::io::netns;
use crate::io::tun::{Tun, TunConfig};
use crate::io::underlay::{BATCH, Received, UnderlayRx, UnderlayTx, peek_inner};
use crate::pipeline::{Counters, Ingress, Pipeline, RuleRef};
use crate::reason::DropReason;
use crate::time::MonotonicClock;
use crate::topology::{HostId, InstanceId, Topology, Transport};
use crate::wire::ipv4;
pub use pool::Pool;
pub use worker::{DeviceTable, Devices, Msg, Packet, Worker, WorkerReport};

/// Where daemons keep their lock files and, by default, their statistics.
pub const RUN_DIR: &str = "/run/vpcd";
/// The name of the internet's device on the gateway host.
pub const INTERNET_DEVICE: &str = "vpcd-internet";
/// TUN transmit queue length (the kernel's default of 500 drops bursts of super-packets).
pub const TXQUEUELEN: u32 = 4096;
/// Batches queued per worker before readers wait.
const INBOX: usize = 16;

/// How readers pick the worker that owns a packet: a hash of its address pair (see
/// [`ipv4::pair_hash`]), Elastic IPs counted as the private addresses they stand for, so that
/// both sides of a translated flow land on one worker.
#[derive(Clone)]
pub struct Affinity {
    seed: u32,
    workers: usize,
    eips: Arc<RwLock<Arc<HashMap<u32, u32>>>>,
}

impl Affinity {
    fn new(seed: u32, workers: usize, t: &Topology) -> Affinity {
        Affinity {
            seed,
            workers,
            eips: Arc::new(RwLock::new(Arc::new(Affinity::eip_map(t)))),
        }
    }

    fn eip_map(t: &Topology) -> HashMap<u32, u32> {
        t.instances
            .iter()
            .filter_map(|i| Some((u32::from(i.eip?), u32::from(i.ip))))
            .collect()
    }

    fn update(&self, t: &Topology) {
        if let Ok(mut m) = self.eips.write() {
            *m = Arc::new(Affinity::eip_map(t));
        }
    }

    /// The worker of an inner packet.
    fn owner(&self, inner: &[u8]) -> usize {
        if self.workers <= 1 {
            return 0;
        }
        let eips = self.eips.read().map(|m| m.clone()).unwrap_or_default();
        let map = |a: u32| eips.get(&a).copied().unwrap_or(a);
        ipv4::pair_hash(inner, self.seed, map) as usize % self.workers
    }
}

/// Where a TUN reader's packets come from.
#[derive(Clone)]
enum Source {
    /// A local instance (its id changes with the topology).
    Instance(Arc<AtomicU32>),
    /// The internet's device.
    Internet,
}

impl Source {
    fn ingress(&self) -> Ingress {
        match self {
            Source::Instance(id) => Ingress::Instance(InstanceId(id.load(Ordering::Relaxed))),
            Source::Internet => Ingress::Internet,
        }
    }
}

/// `vpcd run` options.
#[derive(Debug, Clone)]
pub struct Options {
    /// The topology file.
    pub topology: PathBuf,
    /// This host's name in it.
    pub host: String,
    /// Worker threads.
    pub workers: usize,
    /// Where to write statistics every second (default: /run/vpcd/HOST.stats).
    pub stats: Option<PathBuf>,
    /// A network namespace to enter first (the lab's host namespaces).
    pub netns: Option<String>,
}

/// The default number of workers: one per core, at most 4.
pub fn default_workers() -> usize {
    thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
}

struct Reader {
    name: String,
    id: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    tun: Arc<Tun>,
    /// The address the device has now (it may differ from its opening configuration).
    address: (Ipv4Addr, u8),
}

struct Daemon {
    opts: Options,
    topo: Arc<Topology>,
    host: HostId,
    workers: Vec<Sender<Msg>>,
    readers: Vec<Reader>,
    pool: Pool,
    seed: u32,
    affinity: Affinity,
    internet: Option<Arc<Tun>>,
    internet_stop: Arc<AtomicBool>,
    created_netns: Vec<String>,
    stats_path: PathBuf,
    stats_seq: u64,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(opts: Options) -> Result<()> {
    if let Some(ns) = &opts.netns {
        netns::enter_for_good(ns)?;
    }
    let topo = Arc::new(Topology::load(&opts.topology)?);
    let host = topo.host_named(&opts.host).ok_or_else(|| {
        anyhow!(
            "{}: no host named \"{}\"",
            opts.topology.display(),
            opts.host
        )
    })?;
    let _lock = lock(&opts.host)?;
    let address = topo.host(host).address;
    let transport = topo.underlay.transport;
    let workers = opts.workers.max(1);
    info!(
        host = %opts.host, %address, transport = transport.word(), workers,
        instances = topo.instances_on(host).count(), "starting"
    );
    let seed = rand_seed();
    let stats_path = opts
        .stats
        .clone()
        .unwrap_or_else(|| Path::new(RUN_DIR).join(format!("{}.stats", opts.host)));
    let mut d = Daemon {
        opts,
        topo: topo.clone(),
        host,
        workers: Vec::new(),
        readers: Vec::new(),
        pool: Pool::new(),
        seed,
        affinity: Affinity::new(seed, workers, &topo),
        internet: None,
        internet_stop: Arc::new(AtomicBool::new(false)),
        created_netns: Vec::new(),
        stats_path,
        stats_seq: 0,
    };
    let result = d.start(workers).and_then(|()| d.control());
    d.cleanup();
    result
}

impl Daemon {
    fn start(&mut self, workers: usize) -> Result<()> {
        let t = self.topo.clone();
        let address = t.host(self.host).address;
        self.open_internet(&t)?;
        let devices = self.open_devices(&t)?;
        let clock = MonotonicClock::new();
        let limits = t.conntrack;
        let n = workers as u32;
        for k in 0..workers {
            let (tx, rx) = bounded(INBOX);
            let mut p = Pipeline::with_limits(
                t.clone(),
                self.host,
                limits.max_entries.div_ceil(n),
                limits.max_per_instance.div_ceil(n),
                limits.flow_cache,
            );
            p.set_flow_seed(self.seed);
            let (devices, pool, transport) =
                (devices.clone(), self.pool.clone(), t.underlay.transport);
            // The sockets are opened by the thread that uses them (their batch headers are
            // not Send); the thread reports whether that worked.
            spawn_with_setup(format!("vpcd-worker-{k}"), move || {
                let sock = UnderlayTx::open(transport, address)
                    .with_context(|| format!("underlay sending socket on {address}"))?;
                Ok(move || Worker::new(p, devices, sock, pool, clock).run(rx))
            })?;
            self.workers.push(tx);
        }
        self.spawn_underlay_reader(address, t.underlay.transport)?;
        for (i, dev) in devices.instances.iter().enumerate() {
            if let Some(dev) = dev {
                self.spawn_tun_reader(InstanceId(i as u32), dev.clone())?;
            }
        }
        if let Some(dev) = self.internet.clone() {
            let (stop, workers, pool, aff) = (
                self.internet_stop.clone(),
                self.workers.clone(),
                self.pool.clone(),
                self.affinity.clone(),
            );
            thread::Builder::new()
                .name("vpcd-internet".into())
                .spawn(move || tun_reader(&dev, &Source::Internet, &stop, &workers, &pool, &aff))?;
        }
        info!(host = %self.opts.host, "running");
        Ok(())
    }

    /// Opens the device of every local instance, creating missing namespaces.
    fn open_devices(&mut self, t: &Topology) -> Result<Devices> {
        let mut devices: Vec<Option<Arc<Tun>>> = vec![None; t.instances.len()];
        let existing: BTreeMap<String, Arc<Tun>> = self
            .readers
            .iter()
            .map(|r| (r.name.clone(), r.tun.clone()))
            .collect();
        for id in t.instances_on(self.host) {
            let inst = t.instance(id);
            if let Some(dev) = existing.get(&inst.name) {
                devices[id.index()] = Some(dev.clone());
                continue;
            }
            if let Some(ns) = &inst.netns
                && !netns::exists(ns)
            {
                netns::ip(&["netns", "add", ns])
                    .with_context(|| format!("creating namespace {ns}"))?;
                netns::ip_in(Some(ns), &["link", "set", "lo", "up"])?;
                self.created_netns.push(ns.clone());
            }
            let cfg = TunConfig {
                name: inst.name.clone(),
                netns: inst.netns.clone(),
                address: inst.ip,
                prefix: inst.prefix,
                mtu: t.underlay.instance_mtu(),
                txqueuelen: TXQUEUELEN,
            };
            let tun = Tun::open(cfg).with_context(|| format!("instance {}", inst.name))?;
            info!(instance = %inst.name, ip = %inst.ip, netns = inst.netns.as_deref().unwrap_or("-"), "device up");
            devices[id.index()] = Some(Arc::new(tun));
        }
        Ok(Arc::new(DeviceTable {
            instances: devices,
            internet: self.internet.clone(),
        }))
    }

    /// On the internet gateway: the internet's device, in the internet's namespace, with the
    /// internet side's address; the Elastic IPs are on its link.
    fn open_internet(&mut self, t: &Topology) -> Result<()> {
        let Some(inet) = t.internet.as_ref().filter(|i| i.gateway == self.host) else {
            return Ok(());
        };
        if let Some(ns) = &inet.netns
            && !netns::exists(ns)
        {
            netns::ip(&["netns", "add", ns]).with_context(|| format!("creating namespace {ns}"))?;
            netns::ip_in(Some(ns), &["link", "set", "lo", "up"])?;
            self.created_netns.push(ns.clone());
        }
        let cfg = TunConfig {
            name: INTERNET_DEVICE.to_string(),
            netns: inet.netns.clone(),
            address: inet.client,
            prefix: inet.cidr.prefix_len(),
            mtu: t.underlay.instance_mtu(),
            txqueuelen: TXQUEUELEN,
        };
        let tun = Tun::open(cfg).context("the internet's device")?;
        info!(address = %inet.client, cidr = %inet.cidr, netns = inet.netns.as_deref().unwrap_or("-"), "internet device up");
        self.internet = Some(Arc::new(tun));
        Ok(())
    }

    fn spawn_tun_reader(&mut self, id: InstanceId, tun: Arc<Tun>) -> Result<()> {
        let name = tun.config().name.clone();
        let cell = Arc::new(AtomicU32::new(id.0));
        let stop = Arc::new(AtomicBool::new(false));
        let (workers, pool, aff) = (
            self.workers.clone(),
            self.pool.clone(),
            self.affinity.clone(),
        );
        let (t, source, s) = (tun.clone(), Source::Instance(cell.clone()), stop.clone());
        thread::Builder::new()
            .name(format!("vpcd-tun-{name}"))
            .spawn(move || tun_reader(&t, &source, &s, &workers, &pool, &aff))?;
        let address = (tun.config().address, tun.config().prefix);
        self.readers.push(Reader {
            name,
            id: cell,
            stop,
            tun,
            address,
        });
        Ok(())
    }

    fn spawn_underlay_reader(&mut self, address: Ipv4Addr, transport: Transport) -> Result<()> {
        let (workers, pool, aff) = (
            self.workers.clone(),
            self.pool.clone(),
            self.affinity.clone(),
        );
        spawn_with_setup("vpcd-underlay".into(), move || {
            let rx = UnderlayRx::open(transport, address)
                .with_context(|| format!("underlay on {address} ({})", transport.word()))?;
            Ok(move || underlay_reader(rx, transport, &workers, &pool, &aff))
        })
    }

    /// The control loop: signals and the one-second tick.
    fn control(&mut self) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            let mut hup = signal(SignalKind::hangup())?;
            let mut usr1 = signal(SignalKind::user_defined1())?;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = term.recv() => { info!("SIGTERM: stopping"); break; }
                    _ = int.recv() => { info!("SIGINT: stopping"); break; }
                    _ = hup.recv() => self.reload(),
                    _ = tick.tick() => self.tick(),
                    // The lab asks for fresh statistics around each probe.
                    _ = usr1.recv() => self.tick(),
                }
            }
            self.tick();
            Ok(())
        })
    }

    /// Re-reads the topology (SIGHUP). An invalid file changes nothing.
    fn reload(&mut self) {
        let path = self.opts.topology.clone();
        let t = match Topology::load(&path) {
            Ok(t) => Arc::new(t),
            Err(e) => {
                error!("reload refused, the running topology stays:\n{e}");
                return;
            }
        };
        let Some(host) = t.host_named(&self.opts.host) else {
            error!(host = %self.opts.host, "reload refused: the new topology has no such host");
            return;
        };
        if t.underlay != self.topo.underlay
            || t.host(host).address != self.topo.host(self.host).address
        {
            error!(
                "reload refused: the underlay (transport, MTU, checksum, this host's address) and [internet] cannot change while running"
            );
            return;
        }
        self.host = host;
        // Instances that stay keep their device; a new address is applied to it.
        let wanted: BTreeMap<String, InstanceId> = t
            .instances_on(host)
            .map(|id| (t.instance(id).name.clone(), id))
            .collect();
        let mut kept = Vec::new();
        for mut r in self.readers.drain(..) {
            match wanted.get(&r.name) {
                Some(&id) => {
                    let inst = t.instance(id);
                    let prefix = inst.prefix;
                    if r.address != (inst.ip, prefix) {
                        match readdress(&r.tun, inst.ip, prefix) {
                            Ok(()) => {
                                r.address = (inst.ip, prefix);
                                info!(instance = %r.name, ip = %inst.ip, "device readdressed");
                            }
                            Err(e) => error!(instance = %r.name, error = %e, "readdress failed"),
                        }
                    }
                    r.id.store(id.0, Ordering::Relaxed);
                    kept.push(r);
                }
                None => {
                    info!(instance = %r.name, "instance left this host: device closed");
                    r.stop.store(true, Ordering::Relaxed);
                }
            }
        }
        self.readers = kept;
        let devices = match self.open_devices(&t) {
            Ok(d) => d,
            Err(e) => {
                error!(error = %e, "reload: opening new devices failed");
                return;
            }
        };
        self.affinity.update(&t);
        for w in &self.workers {
            let _ = w.send(Msg::Topology(t.clone(), devices.clone()));
        }
        for (i, dev) in devices.instances.iter().enumerate() {
            if let Some(dev) = dev
                && !self.readers.iter().any(|r| r.name == dev.config().name)
                && let Err(e) = self.spawn_tun_reader(InstanceId(i as u32), dev.clone())
            {
                error!(error = %e, "reload: reader");
            }
        }
        self.topo = t;
        info!("topology reloaded");
    }

    /// Sweeps expired connections and writes the statistics file.
    fn tick(&mut self) {
        let (tx, rx) = bounded(self.workers.len());
        for w in &self.workers {
            let _ = w.send(Msg::Tick(tx.clone()));
        }
        let mut total = Counters::new(self.topo.instances.len());
        let mut connections = 0;
        for _ in 0..self.workers.len() {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(r) => {
                    total.merge(&r.counters);
                    connections += r.connections;
                }
                Err(_) => break,
            }
        }
        self.stats_seq += 1;
        let text = stats_text(
            &self.topo,
            &self.opts.host,
            self.stats_seq,
            &total,
            connections,
        );
        let tmp = self.stats_path.with_extension("tmp");
        if let Some(dir) = self.stats_path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &self.stats_path))
            .is_err()
        {
            warn!(path = %self.stats_path.display(), "cannot write statistics");
        }
    }

    fn cleanup(&mut self) {
        for r in &self.readers {
            r.stop.store(true, Ordering::Relaxed);
        }
        self.internet_stop.store(true, Ordering::Relaxed);
        for ns in self.created_netns.drain(..) {
            match netns::ip(&["netns", "del", &ns]) {
                Ok(()) => info!(netns = %ns, "namespace removed"),
                Err(e) => warn!(netns = %ns, error = %e, "namespace removal"),
            }
        }
        info!("stopped");
    }
}

fn readdress(tun: &Tun, ip: Ipv4Addr, prefix: u8) -> std::io::Result<()> {
    let cfg = tun.config();
    let ns = cfg.netns.as_deref();
    netns::ip_in(ns, &["addr", "flush", "dev", &cfg.name])?;
    netns::ip_in(
        ns,
        &["addr", "add", &format!("{ip}/{prefix}"), "dev", &cfg.name],
    )?;
    netns::ip_in(ns, &["route", "replace", "default", "dev", &cfg.name])
}

/// Spawns a thread that first runs `setup` (opening what the thread will own) and reports
/// its outcome, then runs what `setup` returned.
fn spawn_with_setup<F, R>(name: String, setup: F) -> Result<()>
where
    F: FnOnce() -> Result<R> + Send + 'static,
    R: FnOnce(),
{
    let (tx, rx) = bounded::<Result<()>>(1);
    thread::Builder::new()
        .name(name.clone())
        .spawn(move || match setup() {
            Ok(run) => {
                let _ = tx.send(Ok(()));
                run();
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        })?;
    rx.recv()
        .map_err(|_| anyhow!("thread {name} died while starting"))?
}

fn underlay_reader(
    mut rx: UnderlayRx,
    transport: Transport,
    workers: &[Sender<Msg>],
    pool: &Pool,
    affinity: &Affinity,
) {
    let mut got: Vec<Received> = Vec::with_capacity(BATCH);
    let mut batches: Vec<Vec<Packet>> = (0..workers.len())
        .map(|_| Vec::with_capacity(BATCH))
        .collect();
    let mut take = || pool.take();
    loop {
        match rx.wait_readable(Duration::from_millis(500)) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                error!(error = %e, "underlay poll");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        if let Err(e) = rx.recv(&mut take, &mut got) {
            warn!(error = %e, "underlay receive");
        }
        for r in got.drain(..) {
            let from = match transport {
                Transport::Gre => Ingress::UnderlayIp,
                Transport::GreUdp => Ingress::UnderlayUdp { from: r.from },
            };
            let k = affinity.owner(peek_inner(r.buf.as_slice(), transport));
            batches[k].push(Packet {
                buf: r.buf,
                from,
                vnet: Default::default(),
                stride: r.stride,
            });
        }
        if !dispatch(&mut batches, workers) {
            return;
        }
    }
}

fn tun_reader(
    tun: &Tun,
    source: &Source,
    stop: &AtomicBool,
    workers: &[Sender<Msg>],
    pool: &Pool,
    affinity: &Affinity,
) {
    let mut batches: Vec<Vec<Packet>> = (0..workers.len())
        .map(|_| Vec::with_capacity(BATCH))
        .collect();
    while !stop.load(Ordering::Relaxed) {
        match tun.wait_readable(Duration::from_millis(200)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                error!(device = %tun.config().name, error = %e, "poll");
                return;
            }
        }
        let from = source.ingress();
        for _ in 0..BATCH {
            let mut buf = pool.take();
            match tun.read(&mut buf) {
                Ok(Some(vnet)) => {
                    let k = affinity.owner(buf.as_slice());
                    batches[k].push(Packet {
                        buf,
                        from,
                        vnet,
                        stride: 0,
                    });
                }
                Ok(None) => {
                    pool.put(buf);
                    break;
                }
                Err(e) => {
                    pool.put(buf);
                    warn!(device = %tun.config().name, error = %e, "read");
                    break;
                }
            }
        }
        if !dispatch(&mut batches, workers) {
            return;
        }
    }
}

/// Hands each non-empty batch to its worker; false when the workers are gone.
fn dispatch(batches: &mut [Vec<Packet>], workers: &[Sender<Msg>]) -> bool {
    for (k, b) in batches.iter_mut().enumerate() {
        if !b.is_empty() {
            let batch = std::mem::replace(b, Vec::with_capacity(BATCH));
            if workers[k].send(Msg::Packets(batch)).is_err() {
                return false;
            }
        }
    }
    true
}

/// Refuses a second daemon for the same host in the same network namespace.
fn lock(host: &str) -> Result<File> {
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
    let ns = netns::current_id().unwrap_or_default();
    let digits: String = ns.chars().filter(char::is_ascii_digit).collect();
    let path = Path::new(RUN_DIR).join(format!("{host}-{digits}.lock"));
    let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(_) => bail!(
            "another vpcd is already running for host \"{host}\" in this network namespace (lock {})",
            path.display()
        ),
    }
}

fn rand_seed() -> u32 {
    use std::hash::BuildHasher;
    foldhash::fast::RandomState::default().hash_one(std::process::id()) as u32
}

/// The statistics file: one `name value` line per counter.
pub fn stats_text(t: &Topology, host: &str, seq: u64, c: &Counters, connections: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "host {host}");
    let _ = writeln!(s, "seq {seq}");
    let _ = writeln!(s, "delivered {}", c.delivered);
    let _ = writeln!(s, "encapsulated {}", c.encapsulated);
    let _ = writeln!(s, "replied {}", c.replied);
    let _ = writeln!(s, "to_internet {}", c.to_internet);
    let _ = writeln!(s, "cache_hits {}", c.cache_hits);
    let _ = writeln!(s, "cache_misses {}", c.cache_misses);
    let _ = writeln!(s, "connections {connections}");
    for r in DropReason::ALL {
        let _ = writeln!(s, "drop.{} {}", r.name(), c.drops(*r));
    }
    for (rule, n) in c.rule_drops() {
        let _ = writeln!(s, "rule.{}.{} {n}", rule.0.name(), rule_label(t, rule));
    }
    for (i, inst) in t.instances.iter().enumerate() {
        let p = c.port(i);
        if p != Default::default() {
            let _ = writeln!(
                s,
                "instance.{}.sent {}\ninstance.{}.sent_dropped {}\ninstance.{}.received {}",
                inst.name, p.sent, inst.name, p.sent_dropped, inst.name, p.received
            );
        }
    }
    s
}

/// A policy rule as people name it: `acl-web:ingress#2` (rules count from 1), `sg-web:egress#1`,
/// `[sg-web,sg-ssh]:ingress#no-match` (the implicit drop after an instance's groups).
pub fn rule_label(t: &Topology, (reason, rule): (DropReason, RuleRef)) -> String {
    let dir = match reason {
        DropReason::AclIngress | DropReason::SgIngress => "ingress",
        _ => "egress",
    };
    match rule {
        RuleRef::Acl { acl, rule } => {
            let name = t.acls.get(acl.index()).map_or("?", |a| a.name.as_str());
            match rule {
                Some(i) => format!("{name}:{dir}#{}", i + 1),
                None => format!("{name}:{dir}#no-match"),
            }
        }
        RuleRef::SecurityGroup { group, rule } => {
            let name = t
                .security_groups
                .get(group.index())
                .map_or("?", |g| g.name.as_str());
            format!("{name}:{dir}#{}", rule + 1)
        }
        RuleRef::SecurityGroupsEnd { instance } => {
            let groups: Vec<&str> = t.instances.get(instance.index()).map_or(Vec::new(), |i| {
                i.security_groups
                    .iter()
                    .map(|g| t.security_groups[g.index()].name.as_str())
                    .collect()
            });
            format!("[{}]:{dir}#no-match", groups.join(","))
        }
    }
}

/// Reads a statistics file back into `name -> value`.
pub fn parse_stats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}
