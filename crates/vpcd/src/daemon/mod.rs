//! One host's data plane: `vpcd run --topology FILE --host NAME`.
//!
//! ```text
//!            ┌──────────────── worker k (one thread, run to completion) ───────────────┐
//!  poll ───► │ its TUN devices ─┐                     ┌─► TUN write (GRO coalesced)     │
//!            │ its UDP socket  ─┼─► Pipeline shard k ─┤                                 │
//!            │ its inbox       ─┘   (flows hashed    └─► underlay send (GSO/sendmmsg)  │
//!            │                       to k)             packets of other shards ─► inbox j
//!            └─────────────────────────────────────────────────────────────────────────┘
//!   control thread: signals, 1 s tick (sweep + stats file), SIGHUP reload ─► every inbox
//! ```
//!
//! Each worker waits in `poll` on its eventfd, its underlay socket (GRE-in-UDP: one per
//! worker, `SO_REUSEPORT`; raw GRE: worker 0's, since every raw socket sees every packet) and
//! the devices it was assigned, and carries what it reads through to the write. A packet of a
//! flow owned by another worker (a symmetric hash of the address pair) goes to that worker's
//! inbox in a batch; with one worker nothing crosses threads. The control thread runs on tokio
//! (signals and timers); the data path runs on plain threads.

mod flows;
mod health;
mod ops;
mod pool;
pub mod tap;
mod worker;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use crossbeam_channel::{Receiver, bounded};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tracing::{error, info, warn};

use crate::clock::MonotonicClock;
use crate::desired::Stored;
use crate::io::netns;
use crate::io::tun::{Tun, TunConfig};
use crate::io::underlay::{UnderlayRx, UnderlayTx};
use crate::pipeline::trace::rule_label;
use crate::pipeline::{Counters, Pipeline, Way};
use crate::reason::DropReason;
use crate::topology::{HostId, InstanceId, Topology, Transport, live_refusals};
use crate::wire::ipv4;
use ops::topo_text;
pub use pool::Pool;
pub use worker::{
    DeviceTable, Devices, Lane, Msg, Packet, TxErrors, UnderlayCounters, Wiring, Worker,
    WorkerReport,
};

/// The sender of the store's new states to the control loop.
type StoredTx = tokio::sync::mpsc::Sender<Stored>;

/// Where daemons keep their lock files and, by default, their statistics.
pub const RUN_DIR: &str = "/run/vpcd";
/// The name of the internet's device on the gateway host.
pub const INTERNET_DEVICE: &str = "vpcd-internet";
/// TUN transmit queue length (the kernel's default of 500 drops bursts of super-packets).
pub const TXQUEUELEN: u32 = 4096;
/// Messages (batches) queued per worker; a worker handing over to a full inbox keeps the batch,
/// reads nothing new and takes its own inbox until there is room (`handoff_waits` counts
/// it): never a drop, and never a block on a worker that may be waiting on it.
const INBOX: usize = 64;
/// What [`Affinity`] counts every load balancer's address as.
const LB_ADDRESS: u32 = 0;

/// How readers pick the worker that owns a packet: a hash of its address pair (see
/// [`ipv4::pair_hash`]), Elastic IPs counted as the private addresses they stand for, so that
/// both sides of a translated flow land on one worker. A load-balanced connection is
/// client↔VIP one way and backend↔client the other, and its session is one worker's: every
/// address a load balancer's flows carry (VIPs, their Elastic IPs, backends') counts as one
/// and the same, so that the pair's other end (the client) alone picks the worker. Each
/// worker asks with the topology it is in (its pipeline's): no lock, no shared pointer to
/// follow per packet.
#[derive(Debug, Clone, Copy)]
pub struct Affinity {
    seed: u32,
    workers: usize,
}

impl Affinity {
    /// The worker of an inner packet, Elastic IPs as `t` assigns them.
    fn owner(&self, t: &Topology, inner: &[u8]) -> usize {
        if self.workers <= 1 {
            return 0;
        }
        let private = |a: u32| {
            let a = t
                .eip_owner(Ipv4Addr::from(a))
                .map_or(a, |id| u32::from(t.instance(id).ip));
            if t.lb_address(a) { LB_ADDRESS } else { a }
        };
        ipv4::pair_hash(inner, self.seed, private) as usize % self.workers
    }
}

/// Where a daemon's topology comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A topology file and its lock file (`--topology`): reloaded on SIGHUP or `ctl reload`.
    File(PathBuf),
    /// The region's desired state in the store (`--store`): followed, each new revision
    /// applied as a reload is (docs/control-plane.md).
    Store(crate::desired::StoreOpts),
}

impl Source {
    /// The topology's name in logs and `ctl status`: the file, or the store's address.
    pub fn name(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Store(o) => format!("store {}", o.url),
        }
    }
}

/// `vpcd run` options.
#[derive(Debug, Clone)]
pub struct Options {
    /// The topology's source.
    pub source: Source,
    /// This host's name in it.
    pub host: String,
    /// Worker threads.
    pub workers: usize,
    /// Where to write statistics every second (default: /run/vpcd/HOST.stats).
    pub stats: Option<PathBuf>,
    /// A network namespace to enter first (the lab's host namespaces).
    pub netns: Option<String>,
    /// The control socket (default: /run/vpcd/HOST.sock).
    pub control: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP here (`GET /metrics`).
    pub metrics: Option<std::net::SocketAddr>,
}

/// The default number of workers: one per core, at most 4.
pub fn default_workers() -> usize {
    thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
}

/// A device this daemon opened for a local instance.
struct Device {
    name: String,
    tun: Arc<Tun>,
    /// The address the device has now (it may differ from its opening configuration).
    address: (Ipv4Addr, u8),
}

struct Daemon {
    opts: Options,
    topo: Arc<Topology>,
    host: HostId,
    lanes: Option<Arc<[Lane]>>,
    devices: Vec<Device>,
    pool: Pool,
    seed: u64,
    affinity: Affinity,
    internet: Option<Arc<Tun>>,
    created_netns: Vec<String>,
    stats_path: PathBuf,
    stats_seq: u64,
    /// What `vpcd ctl status` reports.
    status: ops::Status,
    /// The point of the capture running, if one is (its writer thread clears it).
    capturing: tap::Busy,
    /// With `--store`: where the store's watch resumes, taken by the control loop.
    follow: Option<crate::desired::FollowFrom>,
    /// The load balancers' health checks.
    health: Option<health::Hub>,
}

/// A daemon's first topology, its text (for the status hash) and, from the store, its
/// revision and where to watch from.
struct First {
    topology: Arc<Topology>,
    text: String,
    revision: Option<i64>,
    follow: Option<crate::desired::FollowFrom>,
}

fn first_load(source: &Source, host: &str) -> Result<First> {
    match source {
        Source::File(path) => Ok(First {
            topology: Arc::new(load(path)?),
            text: topo_text(path),
            revision: None,
            follow: None,
        }),
        #[cfg(feature = "store")]
        Source::Store(o) => store_first_load(o, host),
        #[cfg(not(feature = "store"))]
        Source::Store(_) => {
            let _ = host;
            bail!("this vpcd was built without store support (feature `store`)")
        }
    }
}

/// From the store: waits for it (an outage logged once), then for a first state: this
/// host's share.
#[cfg(feature = "store")]
fn store_first_load(o: &crate::desired::StoreOpts, host: &str) -> Result<First> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    loop {
        let read = rt.block_on(crate::store::first_read(o, host));
        if let Some(s) = &read.stored {
            let t = s.topology()?;
            let scopes = read.scopes.len();
            info!(store = %o.url, revision = s.revision, scopes, "topology read from the store (this host's share)");
            rt.block_on(crate::store::report(
                o.clone(),
                host.to_string(),
                s.revision,
            ));
            return Ok(First {
                topology: Arc::new(t),
                text: s.topology.clone(),
                revision: Some(s.revision),
                follow: Some(read.follow_from()),
            });
        }
        warn!(store = %o.url, host, "the store holds no share for this host yet (`vpcd apply`): waiting");
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Closes every descriptor this process inherited beyond stdin, stdout and stderr; returns
/// how many. A daemon lives for long and enters namespaces: whatever the shell, a supervisor
/// or a lab that started it left open without close-on-exec (a file, a pipe, another
/// namespace's socket, a descriptor of a namespace) would stay open for its whole life,
/// readable by it and kept alive by it. Call it first thing in `main`, before anything of
/// this process opens a descriptor: the ones it closes must belong to no object here.
pub fn close_inherited_descriptors() -> Result<usize> {
    use nix::dir::Dir;
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    use std::os::fd::{AsRawFd, RawFd};

    // List first, close after: closing while iterating would change what is iterated.
    let inherited: Vec<RawFd> = {
        let mut dir = Dir::open(
            "/proc/self/fd",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .context("listing /proc/self/fd")?;
        let own = dir.as_raw_fd();
        dir.iter()
            .filter_map(|e| e.ok()?.file_name().to_str().ok()?.parse::<RawFd>().ok())
            .filter(|&fd| fd > 2 && fd != own)
            .collect()
    };
    for &fd in &inherited {
        // By number: nothing here owns it. Linux releases the descriptor even when close
        // reports an error (EINTR, EIO).
        let _ = nix::unistd::close(fd);
    }
    Ok(inherited.len())
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(opts: Options) -> Result<()> {
    if let Some(ns) = &opts.netns {
        netns::enter_for_good(ns)?;
    }
    let first = first_load(&opts.source, &opts.host)?;
    let topo = first.topology.clone();
    let host = topo
        .host_named(&opts.host)
        .ok_or_else(|| anyhow!("{}: no host named \"{}\"", topo.file, opts.host))?;
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
        lanes: None,
        devices: Vec::new(),
        pool: Pool::new(),
        seed,
        affinity: Affinity {
            seed: (seed ^ (seed >> 32)) as u32,
            workers,
        },
        internet: None,
        created_netns: Vec::new(),
        stats_path,
        stats_seq: 0,
        status: ops::Status::new(&first.text, first.revision),
        follow: first.follow,
        capturing: Arc::default(),
        health: None,
    };
    let result = d.start(workers).and_then(|()| d.control());
    d.cleanup();
    result
}

impl Daemon {
    fn start(&mut self, workers: usize) -> Result<()> {
        let t = self.topo.clone();
        let address = t.host(self.host).address;
        let transport = t.underlay.transport;
        let place = match &self.opts.netns {
            Some(ns) => format!("{}, in network namespace {ns}", transport.word()),
            None => transport.word().to_string(),
        };
        // Before any device is made: a host started where its address is not fails at once.
        crate::io::underlay::check_local(address).with_context(|| format!("underlay ({place})"))?;
        self.open_internet(&t)?;
        let opened = self.open_new_devices(&t, self.host)?;
        self.devices.extend(opened);
        let devices = self.device_table(&t, self.host);
        let clock = MonotonicClock::new();
        let (lanes, inboxes) = make_lanes(workers)?;
        self.lanes = Some(lanes.clone());
        for (k, inbox) in inboxes.into_iter().enumerate() {
            // Every worker's tables share one seed: a flow hashes alike wherever it is read.
            let p = Pipeline::shard(t.clone(), self.host, workers as u32, self.seed);
            let (lanes, affinity) = (lanes.clone(), self.affinity);
            let (devices, pool, place) = (devices.clone(), self.pool.clone(), place.clone());
            // The sockets are opened by the thread that uses them (their batch headers are
            // not Send); the thread reports whether that worked.
            spawn_with_setup(format!("vpcd-worker-{k}"), move || {
                let sock = UnderlayTx::open(transport, address)
                    .with_context(|| format!("underlay ({place}), sending"))?;
                let reads = k == 0 || transport == Transport::GreUdp;
                let rx = reads.then(|| UnderlayRx::open(transport, address));
                let rx = rx
                    .transpose()
                    .with_context(|| format!("underlay ({place})"))?;
                let wiring = Wiring {
                    me: k,
                    lanes,
                    inbox,
                    rx: rx.map(|rx| (rx, transport)),
                    affinity,
                };
                Ok(move || Worker::new(wiring, p, devices, sock, pool, clock).run())
            })?;
        }
        match health::Hub::start(t.clone(), self.host, lanes) {
            Ok(hub) => self.health = Some(hub),
            Err(e) => {
                warn!(error = %e, "health checks not started: every backend counts as healthy")
            }
        }
        info!(host = %self.opts.host, "running");
        Ok(())
    }

    /// Opens the device of every instance of `t` on `host` that has none yet, creating missing
    /// namespaces. Nothing is kept when one fails: the devices opened so far close.
    fn open_new_devices(&mut self, t: &Topology, host: HostId) -> Result<Vec<Device>> {
        let mut opened = Vec::new();
        for id in t.instances_on(host) {
            let inst = t.instance(id);
            if self.devices.iter().any(|d| d.name == inst.name) {
                continue;
            }
            if let Some(ns) = &inst.netns
                && !netns::exists(ns)
            {
                create_netns(ns)?;
                self.created_netns.push(ns.clone());
            }
            let tun = Tun::open(instance_device(t, id))
                .with_context(|| format!("instance {}", inst.name))?;
            info!(instance = %inst.name, ip = %inst.ip, netns = inst.netns.as_deref().unwrap_or("-"), "device up");
            opened.push(Device {
                name: inst.name.clone(),
                tun: Arc::new(tun),
                address: (inst.ip, inst.prefix),
            });
        }
        Ok(opened)
    }

    /// The workers' device table for `t`: each local instance's device, by id.
    fn device_table(&self, t: &Topology, host: HostId) -> Devices {
        let mut instances: Vec<Option<Arc<Tun>>> = vec![None; t.instances.len()];
        for id in t.instances_on(host) {
            let name = &t.instance(id).name;
            instances[id.index()] = self
                .devices
                .iter()
                .find(|d| d.name == *name)
                .map(|d| d.tun.clone());
        }
        Arc::new(DeviceTable {
            instances,
            internet: self.internet.clone(),
        })
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
            create_netns(ns)?;
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
            let (mut asked, _servers) = self.open_control()?;
            let (_kept, mut updates) = self.follow_store();
            loop {
                tokio::select! {
                    Some(stored) = updates.recv() => self.apply_stored(stored),
                    _ = term.recv() => { info!("SIGTERM: stopping"); break; }
                    _ = int.recv() => { info!("SIGINT: stopping"); break; }
                    _ = hup.recv() => { let _ = self.reload(); }
                    Some((request, reply)) = asked.recv() => self.answer(request, reply),
                    _ = tick.tick() => self.tick(),
                    // The lab asks for fresh statistics around each probe.
                    _ = usr1.recv() => self.tick(),
                }
            }
            self.tick();
            Ok(())
        })
    }

    /// With `--store`: the task that follows the store, and the channel of its new states.
    /// With a file, the channel's sender comes back to be kept, so that the channel never
    /// closes (`recv` waits for ever rather than returning None at once).
    fn follow_store(&mut self) -> (Option<StoredTx>, tokio::sync::mpsc::Receiver<Stored>) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let follow = self.follow.take();
        #[cfg(feature = "store")]
        if let (Source::Store(o), Some(from)) = (&self.opts.source, follow) {
            let host = self.opts.host.clone();
            tokio::spawn(crate::store::follow(o.clone(), host, from, tx));
            return (None, rx);
        }
        #[cfg(not(feature = "store"))]
        let _ = follow;
        (Some(tx), rx)
    }

    /// A new revision of the store's desired state, applied as a reload is: all or nothing.
    fn apply_stored(&mut self, stored: Stored) {
        let result = stored
            .topology()
            .and_then(|t| self.replace(Arc::new(t)))
            .map_err(|e| format!("{e:#}"));
        match &result {
            Ok(()) => info!(revision = stored.revision, "store revision applied"),
            Err(e) => error!(
                revision = stored.revision,
                "store revision refused, the running topology stays:\n{e}"
            ),
        }
        let revision = result.is_ok().then_some(stored.revision);
        #[cfg(feature = "store")]
        if let (Source::Store(o), Some(r)) = (&self.opts.source, revision) {
            tokio::spawn(crate::store::report(o.clone(), self.opts.host.clone(), r));
        }
        self.status.reloaded(&result, &stored.topology, revision);
    }

    /// Re-reads the topology (SIGHUP). An invalid file, or one that changes what every host
    /// must agree on while running, changes nothing.
    fn reload(&mut self) -> Result<(), String> {
        let Source::File(path) = &self.opts.source else {
            let e = "this daemon follows the store: change it with `vpcd apply`".to_string();
            return Err(e);
        };
        let path = path.clone();
        let result = load(&path)
            .and_then(|t| self.replace(Arc::new(t)))
            .map_err(|e| format!("{e:#}"));
        match &result {
            Ok(()) => info!("topology reloaded"),
            Err(e) => error!("reload refused, the running topology stays:\n{e}"),
        }
        self.status.reloaded(&result, &topo_text(&path), None);
        result
    }

    /// The reload as a transaction: the new topology is checked and the new devices opened
    /// before anything of the running state changes; then it is committed whole.
    fn replace(&mut self, t: Arc<Topology>) -> Result<()> {
        let host = t
            .host_named(&self.opts.host)
            .ok_or_else(|| anyhow!("the new topology has no host named \"{}\"", self.opts.host))?;
        let refusals = live_refusals(&self.topo, &t);
        if !refusals.is_empty() {
            bail!("{}", refusals.join("\n"));
        }
        let opened = self.open_new_devices(&t, host)?;
        // Commit. Instances that stay keep their device; a new address is applied to it.
        let wanted: BTreeMap<&str, InstanceId> = t
            .instances_on(host)
            .map(|id| (t.instance(id).name.as_str(), id))
            .collect();
        self.devices.retain(|d| {
            let stays = wanted.contains_key(d.name.as_str());
            if !stays {
                // The workers let go of it with the new device table; it closes then.
                info!(instance = %d.name, "instance left this host: device closed");
            }
            stays
        });
        for d in &mut self.devices {
            let inst = t.instance(wanted[d.name.as_str()]);
            if d.address == (inst.ip, inst.prefix) {
                continue;
            }
            match readdress(&d.tun, inst.ip, inst.prefix) {
                Ok(()) => {
                    d.address = (inst.ip, inst.prefix);
                    info!(instance = %d.name, ip = %inst.ip, "device readdressed");
                }
                Err(e) => error!(instance = %d.name, error = %e, "readdress failed"),
            }
        }
        self.devices.extend(opened);
        self.host = host;
        let devices = self.device_table(&t, host);
        for lane in self.lanes.iter().flat_map(|l| l.iter()) {
            lane.send_blocking(Msg::Topology(t.clone(), devices.clone()));
        }
        if let Some(h) = &self.health {
            h.topology(t.clone());
        }
        self.topo = t;
        Ok(())
    }

    /// Sweeps expired connections and writes the statistics file.
    fn tick(&mut self) {
        let totals = self.collect(Msg::Tick);
        self.write_stats(&totals);
    }

    /// Every worker's report to `ask` (a tick, or clearing the counters), summed.
    fn collect(&self, ask: fn(crossbeam_channel::Sender<WorkerReport>) -> Msg) -> Totals {
        let mut totals = Totals::new(&self.topo);
        for r in self.ask_workers(ask) {
            totals.add(&r);
        }
        totals
    }

    /// Every worker's answer to `ask` (a message carrying the way back), in the order they
    /// arrive; the gathering stops at the first answer that takes over 500 ms.
    fn ask_workers<T>(&self, ask: impl Fn(crossbeam_channel::Sender<T>) -> Msg) -> Vec<T> {
        let lanes = self.lanes.clone().unwrap_or_else(|| Arc::from(Vec::new()));
        let (tx, rx) = bounded(lanes.len());
        for lane in lanes.iter() {
            lane.send_blocking(ask(tx.clone()));
        }
        (0..lanes.len())
            .map_while(|_| rx.recv_timeout(Duration::from_millis(500)).ok())
            .collect()
    }

    /// The number of workers.
    fn workers(&self) -> usize {
        self.lanes.as_ref().map_or(0, |l| l.len())
    }

    /// Writes the statistics file (atomically: a temporary file renamed over it).
    fn write_stats(&mut self, totals: &Totals) {
        self.stats_seq += 1;
        let text = totals.text(&self.topo, self.host, &self.opts.host, self.stats_seq);
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
        for lane in self.lanes.take().iter().flat_map(|l| l.iter()) {
            lane.send_blocking(Msg::Stop);
        }
        self.wait_for_capture();
        for ns in self.created_netns.drain(..) {
            match netns::del(&ns) {
                Ok(()) => info!(netns = %ns, "namespace removed"),
                Err(e) => warn!(netns = %ns, error = %e, "namespace removal"),
            }
        }
        info!("stopped");
    }
}

/// The receiving ends of the workers' inboxes.
type Inboxes = Vec<Receiver<Msg>>;

/// Every worker's lane (inbox and wake-up), and the receiving ends of the inboxes.
fn make_lanes(workers: usize) -> Result<(Arc<[Lane]>, Inboxes)> {
    let mut inboxes = Vec::with_capacity(workers);
    let mut lanes = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = bounded(INBOX);
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).context("eventfd")?;
        lanes.push(Lane {
            tx,
            wake: Arc::new(wake),
        });
        inboxes.push(rx);
    }
    Ok((lanes.into(), inboxes))
}

/// Gives a device its new address (the old ones go) and routes everything through it again.
fn readdress(tun: &Tun, ip: Ipv4Addr, prefix: u8) -> std::io::Result<()> {
    let cfg = tun.config();
    let nl = netns::Netlink::open_in(cfg.netns.as_deref())?;
    nl.flush_addresses(&cfg.name)?;
    nl.add_address(&cfg.name, ip, prefix)?;
    nl.replace_default_route(&cfg.name)
}

/// Creates an instance's (or the internet's) namespace, its loopback up.
fn create_netns(ns: &str) -> Result<()> {
    netns::add(ns).with_context(|| format!("creating namespace {ns}"))?;
    netns::Netlink::open_in(Some(ns))
        .and_then(|nl| nl.link_up("lo"))
        .with_context(|| format!("namespace {ns}: loopback"))
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

/// Loads a topology with its lock file; a daemon never allocates, so a lock that does not
/// record every allocation the topology needs is an error (every host must read the same
/// record: docs/semantics.md 2.10).
fn load(path: &Path) -> Result<Topology> {
    let t = crate::files::load_topology(path)?;
    if !t.unlocked.is_empty() {
        bail!(
            "{}: the lock file does not record {}: run `vpcd check {}` to record it, and give every host the same {}",
            crate::topology::lock_path(path).display(),
            t.unlocked.join("; "),
            path.display(),
            crate::topology::lock_path(path).display(),
        );
    }
    Ok(t)
}

/// A daemon's lock: held (flock) while it runs, its file removed when it stops. A daemon
/// killed with SIGKILL leaves the file behind; the next one for the same host and namespace
/// locks and reuses it.
pub struct LockFile {
    path: PathBuf,
    _file: File,
}

impl LockFile {
    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // Removed while still locked (the descriptor closes after this): a daemon starting
        // now either fails to lock the old file, or finds it gone (see `lock`).
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How instance `id`'s device is set up: named after it, in its namespace, its address and
/// subnet prefix, the instance MTU, [`TXQUEUELEN`].
pub fn instance_device(t: &Topology, id: InstanceId) -> TunConfig {
    let inst = t.instance(id);
    TunConfig {
        name: inst.name.clone(),
        netns: inst.netns.clone(),
        address: inst.ip,
        prefix: inst.prefix,
        mtu: t.underlay.instance_mtu(),
        txqueuelen: TXQUEUELEN,
    }
}

/// The lock file of a daemon for `host` in the current thread's network namespace.
pub fn lock_path(host: &str) -> PathBuf {
    let ns = netns::current_id().unwrap_or_default();
    let digits: String = ns.chars().filter(char::is_ascii_digit).collect();
    Path::new(RUN_DIR).join(format!("{host}-{digits}.lock"))
}

/// How long [`lock`] waits for a held lock: a daemon just killed holds it until its last
/// thread has exited and closed its descriptors, which can come after its pid already
/// looks dead (a zombie group leader); a restart right after a kill must not fail on that.
pub const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Refuses a second daemon for the same host in the same network namespace (after waiting
/// up to [`LOCK_WAIT`] for the first to let go).
pub fn lock(host: &str) -> Result<LockFile> {
    use std::os::unix::fs::MetadataExt;
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
    let path = lock_path(host);
    let deadline = Instant::now() + LOCK_WAIT;
    // A daemon that stops removes its file while holding its lock: one that opened the file
    // just before may lock it after, a file no longer at the path. So the lock counts only
    // if the path still names the locked file; otherwise try again with the new one.
    for _ in 0..1000 {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        if f.try_lock().is_err() {
            if Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            bail!(
                "another vpcd is already running for host \"{host}\" in this network namespace (lock {})",
                path.display()
            );
        }
        let held = f.metadata()?;
        match std::fs::metadata(&path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                return Ok(LockFile { path, _file: f });
            }
            _ => continue,
        }
    }
    bail!("cannot lock {}: it keeps being replaced", path.display())
}

/// The daemon's seed: the one source of randomness, drawn at the edge and passed to the core.
fn rand_seed() -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::RandomState::default().hash_one(std::process::id())
}

/// The workers' reports, summed.
struct Totals {
    counters: Counters,
    connections: usize,
    conntrack: crate::policy::conntrack::ConntrackStats,
    handoff_waits: u64,
    handoffs: u64,
    underlay: UnderlayCounters,
    tx_errors: TxErrors,
    lb_sessions: usize,
    lb_open: BTreeMap<(Ipv4Addr, u16), u32>,
}

impl Totals {
    fn new(t: &Topology) -> Totals {
        Totals {
            counters: Counters::new(t.instances.len()),
            connections: 0,
            conntrack: Default::default(),
            handoff_waits: 0,
            handoffs: 0,
            underlay: UnderlayCounters::default(),
            tx_errors: TxErrors::new(t.instances.len()),
            lb_sessions: 0,
            lb_open: BTreeMap::new(),
        }
    }

    fn add(&mut self, r: &WorkerReport) {
        self.counters.merge(&r.counters);
        self.connections += r.connections;
        self.handoff_waits += r.handoff_waits;
        self.handoffs += r.handoffs;
        self.underlay.merge(&r.underlay);
        self.conntrack.created += r.conntrack.created;
        self.conntrack.expired += r.conntrack.expired;
        self.conntrack.evicted += r.conntrack.evicted;
        self.conntrack.refused_full += r.conntrack.refused_full;
        self.conntrack.refused_instance += r.conntrack.refused_instance;
        self.tx_errors.merge(&r.tx_errors);
        self.lb_sessions += r.lb_sessions;
        for &(a, p, n) in &r.lb_open {
            *self.lb_open.entry((a, p)).or_default() += n;
        }
    }

    /// The statistics file of host `host` (named `name`).
    fn text(&self, t: &Topology, host: HostId, name: &str, seq: u64) -> String {
        let c = &self.conntrack;
        let mut s = stats_text(t, name, seq, &self.counters, self.connections);
        let _ = write!(
            s,
            "conntrack_evicted {}\nconntrack_refused_full {}\nconntrack_refused_instance {}\nhandoff_waits {}\n",
            c.evicted, c.refused_full, c.refused_instance, self.handoff_waits
        );
        let u = &self.underlay;
        let _ = write!(
            s,
            "handoffs {}\nunderlay.rx_packets {}\nunderlay.rx_bytes {}\nunderlay.rx_errors {}\nunderlay.tx_packets {}\nunderlay.tx_bytes {}\n",
            self.handoffs, u.rx_packets, u.rx_bytes, u.rx_errors, u.tx_packets, u.tx_bytes
        );
        s.push_str(&tx_errors_text(t, host, &self.tx_errors));
        s
    }
}

/// The transmit errors of host `host`: `instance.NAME.tx_errors` for each of its instances,
/// `internet.tx_errors` on the internet gateway, and `underlay.tx_errors`.
pub fn tx_errors_text(t: &Topology, host: HostId, e: &TxErrors) -> String {
    let mut s = String::new();
    for id in t.instances_on(host) {
        let n = e.instances.get(id.index()).copied().unwrap_or(0);
        let _ = writeln!(s, "instance.{}.tx_errors {n}", t.instance(id).name);
    }
    if t.internet.as_ref().is_some_and(|i| i.gateway == host) {
        let _ = writeln!(s, "internet.tx_errors {}", e.internet);
    }
    let _ = writeln!(s, "underlay.tx_errors {}", e.underlay);
    s
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
        let _ = writeln!(
            s,
            "rule.{}.{} {n}",
            rule.0.name(),
            rule_label(t, rule.0, rule.1)
        );
    }
    for (i, inst) in t.instances.iter().enumerate() {
        let p = c.port(i);
        if p != Default::default() {
            let n = &inst.name;
            let _ = writeln!(
                s,
                "instance.{n}.sent {}\ninstance.{n}.sent_dropped {}\ninstance.{n}.received {}\n\
                 instance.{n}.received_dropped {}\ninstance.{n}.sent_bytes {}\ninstance.{n}.received_bytes {}",
                p.sent,
                p.sent_dropped,
                p.received,
                p.received_dropped,
                p.sent_bytes,
                p.received_bytes
            );
        }
        for (way, reason, count) in c.port_drops(i) {
            let way = match way {
                Way::Sent => "sent",
                Way::Received => "received",
            };
            let _ = writeln!(
                s,
                "instance.{}.{way}_drop.{} {count}",
                inst.name,
                reason.name()
            );
        }
    }
    s
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The lock refuses a second daemon, and its file goes when the daemon stops; a file
    /// left by a killed daemon is locked again and reused.
    #[test]
    fn the_lock_file_goes_with_the_daemon() {
        if std::fs::create_dir_all(RUN_DIR).is_err() {
            eprintln!(
                "\n!!!!!!!! SKIPPED `the_lock_file_goes_with_the_daemon`: {RUN_DIR} cannot be made !!!!!!!!\n"
            );
            return;
        }
        let host = format!("unit-test-{}", std::process::id());
        let path = lock_path(&host);
        let held = lock(&host).unwrap();
        assert_eq!(held.path(), path);
        assert!(path.exists());
        let second = lock(&host).map(|_| ()).unwrap_err().to_string();
        assert!(
            second.starts_with(&format!(
                "another vpcd is already running for host \"{host}\" in this network namespace"
            )),
            "{second}"
        );
        drop(held);
        assert!(!path.exists(), "{} left behind", path.display());
        // As a SIGKILLed daemon leaves it: an unlocked file at the path.
        std::fs::write(&path, "").unwrap();
        let again = lock(&host).unwrap();
        assert!(lock(&host).is_err());
        drop(again);
        assert!(!path.exists());
    }

    const TOPOLOGY: &str = r#"
[underlay]
transport = "gre-udp"
mtu = 1500

[internet]
cidr = "203.0.113.0/24"
gateway = "a"

[[host]]
name = "a"
address = "192.0.2.1"
[[host]]
name = "b"
address = "192.0.2.2"

[[vpc]]
name = "v"
tenant = "t"
cidr = "10.0.0.0/16"
key = 1001

[[subnet]]
name = "s"
vpc = "v"
cidr = "10.0.1.0/24"

[[security_group]]
name = "sg"
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]

[[instance]]
name = "web"
host = "b"
subnet = "s"
ip = "10.0.1.10"
eip = "203.0.113.10"
security_groups = ["sg"]
[[instance]]
name = "db"
host = "a"
subnet = "s"
ip = "10.0.1.20"
security_groups = ["sg"]
"#;

    fn packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        ipv4::emit_header(&mut p, src.into(), dst.into(), ipv4::proto::UDP, 0, 28);
        p
    }

    /// Both sides of a translated flow land on one worker: the instance's packet to the
    /// internet and the internet's reply to its Elastic IP, which the topology maps back to
    /// the private address; other addresses are hashed as they are.
    #[test]
    fn an_elastic_ip_counts_as_its_private_address() {
        let t = Topology::parse(TOPOLOGY, "test.toml").unwrap_or_else(|e| panic!("{e}"));
        let (out, back) = (
            packet([10, 0, 1, 10], [198, 51, 100, 7]),
            packet([198, 51, 100, 7], [203, 0, 113, 10]),
        );
        let other = packet([198, 51, 100, 7], [203, 0, 113, 11]);
        let mut apart = 0;
        for seed in 0..64 {
            let a = Affinity { seed, workers: 4 };
            assert_eq!(a.owner(&t, &out), a.owner(&t, &back), "seed {seed}");
            apart += usize::from(a.owner(&t, &out) != a.owner(&t, &other));
            assert_eq!(Affinity { seed, workers: 1 }.owner(&t, &other), 0);
        }
        assert!(
            apart > 16,
            "an address that is no Elastic IP is its own: {apart}/64"
        );
    }

    /// A load-balanced connection's two directions (client→VIP, backend→client), from the
    /// cloud and from the internet, land on one worker: the one its session is on.
    #[test]
    fn a_load_balanced_connection_keeps_one_worker() {
        let lb = "\n[[load_balancer]]\nname = \"lb\"\nvpc = \"v\"\nsubnet = \"s\"\nvip = \"10.0.1.100\"\neip = \"203.0.113.50\"\nlisteners = [ { protocol = \"tcp\", port = 80, backends = [ { instance = \"web\" } ] } ]\n";
        let t = Topology::parse(&format!("{TOPOLOGY}{lb}"), "test.toml")
            .unwrap_or_else(|e| panic!("{e}"));
        let db = t.instance(t.instance_named("db").unwrap()).ip.octets();
        let pairs = [
            (packet(db, [10, 0, 1, 100]), packet([10, 0, 1, 10], db)),
            (
                packet([198, 51, 100, 7], [203, 0, 113, 50]),
                packet([10, 0, 1, 10], [198, 51, 100, 7]),
            ),
        ];
        for seed in 0..64 {
            let a = Affinity { seed, workers: 4 };
            for (to_vip, reply) in &pairs {
                assert_eq!(a.owner(&t, to_vip), a.owner(&t, reply), "seed {seed}");
            }
        }
    }

    /// The statistics name every transmit error counter of the host: each of its instances,
    /// the internet's device on the gateway, the underlay.
    #[test]
    fn transmit_errors_are_in_the_statistics() {
        let t = Topology::parse(TOPOLOGY, "test.toml").unwrap_or_else(|e| panic!("{e}"));
        let mut e = TxErrors::new(2);
        e.instances[1] = 3;
        e.internet = 2;
        e.underlay = 5;
        let a = t.host_named("a").unwrap();
        let stats = parse_stats(&tx_errors_text(&t, a, &e));
        let want = [
            ("instance.db.tx_errors", 3),
            ("internet.tx_errors", 2),
            ("underlay.tx_errors", 5),
        ];
        assert_eq!(stats, want.map(|(k, v)| (k.to_string(), v)).into());
        let b = t.host_named("b").unwrap();
        let stats = parse_stats(&tx_errors_text(&t, b, &e));
        let want = [("instance.web.tx_errors", 0), ("underlay.tx_errors", 5)];
        assert_eq!(stats, want.map(|(k, v)| (k.to_string(), v)).into());
    }
}
