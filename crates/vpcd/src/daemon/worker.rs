//! Workers: each owns a shard of the flow state (its own [`Pipeline`]), its sockets and some
//! of the devices, and runs to completion: it waits in `poll` on what it reads, reads a batch,
//! decides, writes, and waits again. Nothing is handed between threads on a single-worker
//! daemon.
//!
//! A flow always lands on the same worker: a packet read by a worker that does not own its
//! flow (by a hash that is the same for both directions of a connection) is handed to the
//! owner in a batch, with a wake-up on the owner's eventfd. So a connection's state lives in
//! one shard and no lock is taken per packet.
//!
//! Payload bytes are copied once per direction, by the kernel: a super-packet read from a TUN
//! device is cut for the underlay by writing each segment's headers apart and gathering the
//! payloads where they lie (`sendmsg` with UDP GSO, or `sendmmsg`); packets for a TUN device
//! are decided where they landed (a GRO train is decided datagram by datagram, in place) and
//! consecutive TCP segments are written as one super-packet, headers rebuilt, payloads
//! gathered (`writev`).

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::EventFd;
use tracing::warn;

use super::Affinity;
use super::flows::{self, FlowsAnswer};
use super::pool::Pool;
use super::tap::Tap;
use crate::capture::Direction;
use crate::clock::MonotonicClock;
use crate::io::tun::Tun;
use crate::io::underlay::{BATCH, CutFrames, Received, UnderlayRx, UnderlayTx};
use crate::pipeline::trace::Hop;
use crate::pipeline::{Action, Counters, Decision, Dropped, Egress, Ingress, Pipeline};
use crate::reason::DropReason;
use crate::time::Timestamp;
use crate::topology::{InstanceId, Topology, Transport};
use crate::wire::PacketBuf;
use crate::wire::gre::{self, Encap};
use crate::wire::gso::{self, Cut, F_NEEDS_CSUM, VnetHdr};

/// A packet in flight between threads.
pub struct Packet {
    /// The bytes.
    pub buf: PacketBuf,
    /// Where it came from.
    pub from: Ingress,
    /// Its virtio-net header (zero for underlay packets).
    pub vnet: VnetHdr,
    /// 0 for one packet; for a GRO train from the underlay, the size of its datagrams.
    pub stride: usize,
}

/// The devices of this host: the local instances', by instance id of the topology in force,
/// and on the internet gateway, the internet's.
#[derive(Default)]
pub struct DeviceTable {
    /// By instance id.
    pub instances: Vec<Option<Arc<Tun>>>,
    /// The internet's device.
    pub internet: Option<Arc<Tun>>,
}

/// The devices, shared by the workers.
pub type Devices = Arc<DeviceTable>;

/// Where a packet is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Port {
    /// A local instance's device.
    Instance(InstanceId),
    /// The internet's device.
    Internet,
}

impl Port {
    /// The port packets read from the same device come from.
    fn ingress(self) -> Ingress {
        match self {
            Port::Instance(id) => Ingress::Instance(id),
            Port::Internet => Ingress::Internet,
        }
    }
}

/// What a worker is told.
pub enum Msg {
    /// Packets of flows it owns, read by another worker under that topology (instance ids
    /// are the topology's: the two workers may not have switched to a new one together).
    Packets(Arc<Topology>, Vec<Packet>),
    /// A new topology and the devices that go with it.
    Topology(Arc<Topology>, Devices),
    /// Expire connections, then report the counters.
    Tick(Sender<WorkerReport>),
    /// Zero the counters (`vpcd ctl clear-counters`), then report them.
    ClearCounters(Sender<WorkerReport>),
    /// Trace a packet through this worker's tables if its flow is this worker's (`vpcd ctl
    /// trace`); the others answer `None`.
    Trace(TraceAsk),
    /// Start copying packets to a capture (`Some`), or stop (`None`).
    Capture(Option<Tap>),
    /// List the tracked connections (of the instance named, or all), or remove them.
    Flows {
        /// Only this instance's (by name, in the worker's topology).
        instance: Option<String>,
        /// Remove them rather than list them.
        flush: bool,
        /// Where the answer goes.
        reply: Sender<FlowsAnswer>,
    },
    /// The load balancers' backends' health ([`super::health`]).
    Health(crate::policy::balance::Health),
    /// Stop.
    Stop,
}

/// A packet to trace, as it enters this host, and the way back.
pub struct TraceAsk {
    /// The packet.
    pub packet: Vec<u8>,
    /// Where it enters.
    pub from: Ingress,
    /// The owning worker's trace of it.
    pub reply: Sender<Option<Hop>>,
}

/// The way to a worker: its inbox, and the eventfd that wakes it from `poll`.
pub struct Lane {
    /// The inbox.
    pub tx: Sender<Msg>,
    /// Its wake-up.
    pub wake: Arc<EventFd>,
}

impl Lane {
    /// Puts a message in the inbox and wakes the worker. A full inbox gives it back:
    /// blocking here could deadlock two workers handing packets to each other, so the
    /// sender keeps it and tries again (see `Worker::hand_off`).
    pub fn send(&self, m: Msg) -> Result<(), Msg> {
        let r = self.tx.try_send(m).map_err(|e| e.into_inner());
        let _ = self.wake.write(1);
        r
    }

    /// Like [`Lane::send`], but waits for room (the control thread's messages must arrive).
    pub fn send_blocking(&self, m: Msg) {
        let _ = self.tx.send(m);
        let _ = self.wake.write(1);
    }
}

/// What a worker reads and where it hands packets it does not own.
pub struct Wiring {
    /// Its index among the workers.
    pub me: usize,
    /// Every worker's lane, its own included.
    pub lanes: Arc<[Lane]>,
    /// Its inbox.
    pub inbox: Receiver<Msg>,
    /// Its underlay socket, if it has one.
    pub rx: Option<(UnderlayRx, Transport)>,
    /// Who owns a flow (under the topology this worker is in).
    pub affinity: Affinity,
}

/// The devices worker `me` of `workers` reads: local instances by rank, round robin, and the
/// internet's on worker 0.
fn assign(devices: &DeviceTable, me: usize, workers: usize) -> Vec<(Ingress, Arc<Tun>)> {
    let mut mine: Vec<(Ingress, Arc<Tun>)> = devices
        .instances
        .iter()
        .enumerate()
        .filter_map(|(i, d)| Some((InstanceId(i as u32), d.clone()?)))
        .enumerate()
        .filter(|(rank, _)| rank % workers == me)
        .map(|(_, (id, d))| (Ingress::Instance(id), d))
        .collect();
    if me == 0
        && let Some(d) = &devices.internet
    {
        mine.push((Ingress::Internet, d.clone()));
    }
    mine
}

/// A worker's answer to a tick.
pub struct WorkerReport {
    /// Its counters.
    pub counters: Counters,
    /// Its tracked connections.
    pub connections: usize,
    /// Its connection table's counts (evictions, refusals).
    pub conntrack: crate::policy::conntrack::ConntrackStats,
    /// Hand-offs that found an owner's inbox full and waited for room.
    pub handoff_waits: u64,
    /// Packets the kernel refused to take, by port.
    pub tx_errors: TxErrors,
    /// What went through its underlay sockets.
    pub underlay: UnderlayCounters,
    /// Packets it handed to the worker owning their flow.
    pub handoffs: u64,
    /// Its load balancers' sessions, by backend endpoint: open ones.
    pub lb_open: Vec<(std::net::Ipv4Addr, u16, u32)>,
    /// Its load balancers' sessions.
    pub lb_sessions: usize,
}

/// What went through a worker's underlay sockets: datagrams as the socket carries them
/// (`gre`: outer IPv4 header included; `gre-udp`: the UDP payload, GRE header first).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnderlayCounters {
    /// Datagrams received.
    pub rx_packets: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Receive calls that failed.
    pub rx_errors: u64,
    /// Datagrams handed to the socket to send (those it refused are also transmit errors).
    pub tx_packets: u64,
    /// Their bytes.
    pub tx_bytes: u64,
}

impl UnderlayCounters {
    /// Adds another worker's.
    pub fn merge(&mut self, o: &UnderlayCounters) {
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.rx_errors += o.rx_errors;
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
    }
}

/// Packets the kernel refused to take (a write or send that failed), by port: a local
/// instance's device, the internet's device, the underlay. One worker's share, summed into
/// the statistics (`instance.NAME.tx_errors`, `internet.tx_errors`, `underlay.tx_errors`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxErrors {
    /// By instance id of the topology in force.
    pub instances: Vec<u64>,
    /// The internet's device.
    pub internet: u64,
    /// The underlay sockets.
    pub underlay: u64,
}

impl TxErrors {
    /// No errors, for the `instances` of a topology.
    pub fn new(instances: usize) -> TxErrors {
        TxErrors {
            instances: vec![0; instances],
            ..TxErrors::default()
        }
    }

    fn count(&mut self, port: Port, n: u64) {
        match port {
            Port::Instance(id) => {
                if self.instances.len() <= id.index() {
                    self.instances.resize(id.index() + 1, 0);
                }
                self.instances[id.index()] += n;
            }
            Port::Internet => self.internet += n,
        }
    }

    /// Adds another worker's counts (of the same topology).
    pub fn merge(&mut self, other: &TxErrors) {
        if self.instances.len() < other.instances.len() {
            self.instances.resize(other.instances.len(), 0);
        }
        for (a, b) in self.instances.iter_mut().zip(&other.instances) {
            *a += b;
        }
        self.internet += other.internet;
        self.underlay += other.underlay;
    }

    /// Follows the instances by name from topology `old` into `new` (ids move when the
    /// file's order changes); the counts of instances that left go.
    pub fn renumber(&mut self, old: &Topology, new: &Topology) {
        let mut by_new = vec![0; new.instances.len()];
        for (i, &n) in self.instances.iter().enumerate() {
            let now = old
                .instances
                .get(i)
                .and_then(|x| new.instance_named(&x.name));
            if let Some(j) = now.filter(|_| n > 0) {
                by_new[j.index()] += n;
            }
        }
        self.instances = by_new;
    }
}

/// A packet to write to a device: `held[buf][start..end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    to: Port,
    buf: u32,
    start: u32,
    end: u32,
}

/// A datagram of a GRO train, copied out into a buffer of its own.
fn copied(pool: &Pool, dgram: &[u8]) -> PacketBuf {
    let mut buf = pool.take();
    let area = buf.read_area(crate::wire::buf::HEADROOM);
    area[..dgram.len()].copy_from_slice(dgram);
    buf.set_filled(crate::wire::buf::HEADROOM, dgram.len());
    buf
}

/// The datagrams of a GRO train of `len` bytes, `stride` bytes each (the last may be
/// shorter): their (start, end).
fn spans(len: usize, stride: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(stride.max(1))
        .map(move |at| (at, (at + stride.max(1)).min(len)))
}

/// The datagrams of what one underlay read brought, `len` bytes: the whole of it for a single
/// datagram (`stride` 0), a GRO train's datagrams otherwise.
fn datagrams(len: usize, stride: usize) -> impl Iterator<Item = (usize, usize)> {
    let stride = if stride == 0 { len } else { stride };
    spans(len, stride)
}

/// The worker that owns every datagram of a GRO train, or `None` when its datagrams have
/// different owners (or there are none).
fn sole_owner(train: &[u8], stride: usize, owner_of: impl Fn(&[u8]) -> usize) -> Option<usize> {
    let mut datagrams = spans(train.len(), stride).map(|(at, end)| owner_of(&train[at..end]));
    let first = datagrams.next()?;
    datagrams.all(|o| o == first).then_some(first)
}

/// The pieces sorted by port, each port's in their order (consecutive TCP segments must stay
/// consecutive to be coalesced), cut into one run per port.
fn by_port(pieces: &mut [Piece]) -> impl Iterator<Item = (Port, &[Piece])> {
    pieces.sort_by_key(|p| p.to);
    pieces
        .chunk_by(|a, b| a.to == b.to)
        .map(|run| (run[0].to, run))
}

/// One worker.
pub struct Worker {
    wiring: Wiring,
    mine: Vec<(Ingress, Arc<Tun>)>,
    local: Vec<Packet>,
    outgoing: Vec<Vec<Packet>>,
    received: Vec<Received>,
    /// Hand-offs that found the owner's inbox full and waited.
    pub handoff_waits: u64,
    handoffs: u64,
    underlay: UnderlayCounters,
    tx_errors: TxErrors,
    pipeline: Pipeline,
    devices: Devices,
    tx: UnderlayTx,
    pool: Pool,
    clock: MonotonicClock,
    heads: Vec<u8>,
    held: Vec<PacketBuf>,
    pieces: Vec<Piece>,
    transmits: Vec<(PacketBuf, Ipv4Addr, u32)>,
    runs: Vec<(usize, usize)>,
    /// A capture's tap; `None` (no capture) costs one branch per packet or batch.
    tap: Option<Tap>,
}

impl Worker {
    /// A worker with its shard, sockets and the shared buffer pool.
    pub fn new(
        wiring: Wiring,
        pipeline: Pipeline,
        devices: Devices,
        tx: UnderlayTx,
        pool: Pool,
        clock: MonotonicClock,
    ) -> Worker {
        let n = wiring.lanes.len();
        Worker {
            mine: assign(&devices, wiring.me, n),
            wiring,
            local: Vec::with_capacity(BATCH),
            outgoing: (0..n).map(|_| Vec::new()).collect(),
            received: Vec::with_capacity(BATCH),
            handoff_waits: 0,
            handoffs: 0,
            underlay: UnderlayCounters::default(),
            tx_errors: TxErrors::new(pipeline.topology().instances.len()),
            pipeline,
            devices,
            tx,
            pool,
            clock,
            heads: Vec::new(),
            held: Vec::new(),
            pieces: Vec::new(),
            transmits: Vec::new(),
            runs: Vec::new(),
            tap: None,
        }
    }

    /// Runs until told to stop: waits for its wake-up, its underlay socket or its devices,
    /// reads what is ready, decides, writes.
    pub fn run(mut self) {
        loop {
            let waiting = self.backlogged();
            let (woken, rx_ready, ready) = match self.wait(waiting) {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "poll");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
            };
            if (woken || waiting) && !self.inbox() {
                return;
            }
            if rx_ready {
                self.read_underlay();
            }
            for i in ready {
                self.read_device(i);
            }
            if !self.local.is_empty() {
                let batch = std::mem::take(&mut self.local);
                self.handle(batch);
            }
            self.hand_off();
        }
    }

    /// Waits until something is ready: (the wake-up, the underlay socket, devices by index).
    /// While a hand-off `waiting` for room, only the wake-up counts, for a millisecond at
    /// most: the worker takes its own inbox (the other worker may be waiting on it) and tries
    /// again, reading nothing new meanwhile, which is the backpressure.
    fn wait(&self, waiting: bool) -> nix::Result<(bool, bool, Vec<usize>)> {
        let mut fds = Vec::with_capacity(2 + self.mine.len());
        fds.push(PollFd::new(
            self.wiring.lanes[self.wiring.me].wake.as_fd(),
            PollFlags::POLLIN,
        ));
        if let Some((rx, _)) = &self.wiring.rx
            && !waiting
        {
            fds.push(PollFd::new(rx.fd(), PollFlags::POLLIN));
        }
        if !waiting {
            for (_, d) in &self.mine {
                fds.push(PollFd::new(d.fd(), PollFlags::POLLIN));
            }
        }
        let timeout = if waiting { 1u16 } else { 1000 };
        match poll(&mut fds, PollTimeout::from(timeout)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
        let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        let woken = ready(&fds[0]);
        if waiting {
            return Ok((woken, false, Vec::new()));
        }
        let first_dev = if self.wiring.rx.is_some() { 2 } else { 1 };
        let rx_ready = self.wiring.rx.is_some() && ready(&fds[1]);
        let devs = fds[first_dev..]
            .iter()
            .enumerate()
            .filter(|(_, f)| ready(f))
            .map(|(i, _)| i)
            .collect();
        Ok((woken, rx_ready, devs))
    }

    /// Takes the inbox's messages; false when told to stop.
    fn inbox(&mut self) -> bool {
        let _ = self.wiring.lanes[self.wiring.me].wake.read();
        while let Ok(msg) = self.wiring.inbox.try_recv() {
            match msg {
                Msg::Packets(t, batch) => self.adopt(&t, batch),
                Msg::Topology(t, devices) => self.switch(t, devices),
                Msg::Tick(reply) => {
                    self.pipeline.sweep(self.clock.now());
                    let _ = reply.send(self.report());
                }
                Msg::ClearCounters(reply) => {
                    self.pipeline.clear_counters();
                    self.handoff_waits = 0;
                    self.handoffs = 0;
                    self.underlay = UnderlayCounters::default();
                    self.tx_errors = TxErrors::new(self.pipeline.topology().instances.len());
                    let _ = reply.send(self.report());
                }
                Msg::Trace(ask) => {
                    let _ = ask.reply.send(self.trace(&ask.packet, ask.from));
                }
                Msg::Capture(tap) => {
                    self.tap = tap.map(|mut t| {
                        t.follow(self.pipeline.topology());
                        t
                    });
                }
                Msg::Flows {
                    instance,
                    flush,
                    reply,
                } => {
                    let _ = reply.send(self.flows(instance.as_deref(), flush));
                }
                Msg::Health(h) => self.pipeline.set_health(h),
                Msg::Stop => return false,
            }
        }
        true
    }

    /// This worker's trace of a packet, if its flow is this worker's: with the live tables.
    fn trace(&self, packet: &[u8], from: Ingress) -> Option<Hop> {
        let topo = self.pipeline.topology();
        let inner = match from {
            Ingress::UnderlayIp => gre::peek_inner(packet, true),
            Ingress::UnderlayUdp { .. } => gre::peek_inner(packet, false),
            Ingress::Instance(_) | Ingress::Internet => packet,
        };
        if self.wiring.affinity.owner(topo, inner) != self.wiring.me {
            return None;
        }
        let (mut t, next) = self.pipeline.trace(packet, from, self.clock.now());
        t.live = true;
        Some((t, next))
    }

    fn report(&self) -> WorkerReport {
        WorkerReport {
            counters: self.pipeline.counters().clone(),
            connections: self.pipeline.conntrack().len(),
            conntrack: self.pipeline.conntrack().stats(),
            handoff_waits: self.handoff_waits,
            tx_errors: self.tx_errors.clone(),
            underlay: self.underlay,
            handoffs: self.handoffs,
            lb_open: (self.pipeline.balancer().open_counts())
                .map(|((_, _, (a, p)), n)| (*a, *p, *n))
                .collect(),
            lb_sessions: self.pipeline.balancer().len(),
        }
    }

    /// Its connections (of `instance`, by name, or all) as rows, or (`flush`) how many it
    /// removed. An instance this worker's topology does not have on the host has none.
    fn flows(&mut self, instance: Option<&str>, flush: bool) -> FlowsAnswer {
        let t = self.pipeline.topology().clone();
        let host = self.pipeline.host();
        let id = match instance {
            None => None,
            Some(name) => match t
                .instance_named(name)
                .filter(|&i| t.instance(i).host == host)
            {
                Some(id) => Some(id),
                None if flush => return FlowsAnswer::Flushed(0),
                None => return FlowsAnswer::Listed(Vec::new()),
            },
        };
        if flush {
            return FlowsAnswer::Flushed(self.pipeline.flush_flows(id));
        }
        let now = self.clock.now();
        let entries = self.pipeline.flows(now, id);
        FlowsAnswer::Listed(entries.iter().map(|f| flows::row(&t, f)).collect())
    }

    /// Moves to a new topology and its devices. What was read under the old topology is
    /// decided under it first.
    fn switch(&mut self, t: Arc<Topology>, devices: Devices) {
        if !self.local.is_empty() {
            let batch = std::mem::take(&mut self.local);
            self.handle(batch);
        }
        self.tx_errors.renumber(self.pipeline.topology(), &t);
        if let Some(tap) = &mut self.tap {
            tap.follow(&t);
        }
        self.pipeline.set_topology(t);
        self.mine = assign(&devices, self.wiring.me, self.wiring.lanes.len());
        self.devices = devices;
    }

    /// Takes packets another worker read under topology `t`: an instance's packets follow the
    /// instance by name into this worker's topology (dropped as `UnknownPort` if it left).
    fn adopt(&mut self, t: &Arc<Topology>, batch: Vec<Packet>) {
        let mine = self.pipeline.topology().clone();
        if Arc::ptr_eq(t, &mine) {
            self.local.extend(batch);
            return;
        }
        let host = self.pipeline.host();
        for mut p in batch {
            if let Ingress::Instance(id) = p.from {
                let now = t
                    .instances
                    .get(id.index())
                    .and_then(|i| mine.instance_named(&i.name))
                    .filter(|&n| mine.instance(n).host == host);
                match now {
                    Some(n) => p.from = Ingress::Instance(n),
                    None => {
                        self.pipeline.count_drop(DropReason::UnknownPort);
                        if let Some(tap) = self.tap.as_ref().filter(|x| x.drops()) {
                            let why = DropReason::UnknownPort.into();
                            tap.dropped(p.buf.as_slice(), p.from, why, t);
                        }
                        self.pool.put(p.buf);
                        continue;
                    }
                }
            }
            self.local.push(p);
        }
    }

    /// Keeps a packet whose flow this worker owns; queues the others for their owners.
    fn sort(&mut self, p: Packet, owner: usize) {
        if owner == self.wiring.me {
            self.local.push(p);
        } else {
            self.outgoing[owner].push(p);
        }
    }

    fn read_underlay(&mut self) {
        let Some((rx, transport)) = &mut self.wiring.rx else {
            return;
        };
        let transport = *transport;
        let pool = &self.pool;
        if let Err(e) = rx.recv(&mut || pool.take(), &mut self.received) {
            self.underlay.rx_errors += 1;
            warn!(error = %e, "underlay receive");
        }
        for r in &self.received {
            let datagrams = match r.stride {
                0 => 1,
                stride => spans(r.buf.len(), stride).count(),
            };
            self.underlay.rx_packets += datagrams as u64;
            self.underlay.rx_bytes += r.buf.len() as u64;
        }
        // Taken out for the loop (which sorts into `self`) and put back, capacity kept.
        let mut received = std::mem::take(&mut self.received);
        let (affinity, topo) = (self.wiring.affinity, self.pipeline.topology().clone());
        let outer_ip = transport == Transport::Gre;
        let owner_of = |dgram: &[u8]| affinity.owner(&topo, gre::peek_inner(dgram, outer_ip));
        for r in received.drain(..) {
            let from = match transport {
                Transport::Gre => Ingress::UnderlayIp,
                Transport::GreUdp => Ingress::UnderlayUdp { from: r.from },
            };
            if let Some(tap) = self.tap.as_ref().filter(|t| t.underlay()) {
                for (at, end) in datagrams(r.buf.len(), r.stride) {
                    tap.datagram(Direction::In, r.from, &[&r.buf.as_slice()[at..end]]);
                }
            }
            self.sort_received(r, from, &owner_of);
        }
        self.received = received;
    }

    /// Sorts what one underlay read brought. A GRO train may carry several flows: when they
    /// all belong to one worker it goes there whole; otherwise each datagram goes to its
    /// owner, copied out.
    fn sort_received(&mut self, r: Received, from: Ingress, owner_of: &impl Fn(&[u8]) -> usize) {
        let packet = |buf, stride| Packet {
            buf,
            from,
            vnet: VnetHdr::default(),
            stride,
        };
        let whole = match r.stride {
            0 => Some(owner_of(r.buf.as_slice())),
            stride => sole_owner(r.buf.as_slice(), stride, owner_of),
        };
        if let Some(owner) = whole {
            self.sort(packet(r.buf, r.stride), owner);
            return;
        }
        for (at, end) in spans(r.buf.len(), r.stride) {
            let dgram = &r.buf.as_slice()[at..end];
            let owner = owner_of(dgram);
            self.sort(packet(copied(&self.pool, dgram), 0), owner);
        }
        self.pool.put(r.buf);
    }

    fn read_device(&mut self, i: usize) {
        let Some((from, dev)) = self.mine.get(i).cloned() else {
            return;
        };
        for _ in 0..BATCH {
            let mut buf = self.pool.take();
            match dev.read(&mut buf) {
                Ok(Some(vnet)) => {
                    if let Some(tap) = self.tap.as_ref().filter(|t| t.device() == Some(from)) {
                        tap.packet(Direction::In, buf.as_slice());
                    }
                    let t = self.pipeline.topology();
                    let owner = self.wiring.affinity.owner(t, buf.as_slice());
                    let stride = 0;
                    self.sort(
                        Packet {
                            buf,
                            from,
                            vnet,
                            stride,
                        },
                        owner,
                    );
                }
                Ok(None) => {
                    self.pool.put(buf);
                    break;
                }
                Err(e) => {
                    self.pool.put(buf);
                    warn!(device = %dev.config().name, error = %e, "read");
                    break;
                }
            }
        }
    }

    /// Hands the packets of other owners over, a batch per owner. A full inbox keeps the
    /// batch here (counted in `handoff_waits`): until it goes, the worker reads nothing new
    /// (see [`Worker::run`]), so the kernel's queues hold the rest and nothing is lost here.
    fn hand_off(&mut self) {
        for k in 0..self.outgoing.len() {
            if self.outgoing[k].is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut self.outgoing[k]);
            let t = self.pipeline.topology().clone();
            let n = batch.len() as u64;
            match self.wiring.lanes[k].send(Msg::Packets(t, batch)) {
                Ok(()) => self.handoffs += n,
                Err(Msg::Packets(_, batch)) => {
                    self.outgoing[k] = batch;
                    self.handoff_waits += 1;
                }
                Err(_) => {}
            }
        }
    }

    /// Whether a hand-off waits for room in another worker's inbox.
    fn backlogged(&self) -> bool {
        self.outgoing.iter().any(|o| !o.is_empty())
    }

    fn device(&self, port: Port) -> Option<Arc<Tun>> {
        match port {
            Port::Instance(id) => self.devices.instances.get(id.index()).cloned().flatten(),
            Port::Internet => self.devices.internet.clone(),
        }
    }

    fn handle(&mut self, batch: Vec<Packet>) {
        let now = self.clock.now();
        for p in batch {
            if p.stride > 0 {
                self.handle_train(p, now);
            } else if p.vnet.is_gso() {
                self.handle_super_packet(p, now);
            } else {
                self.handle_packet(p, now);
            }
        }
        self.flush();
    }

    fn hold(&mut self, buf: PacketBuf, to: Port) {
        let end = buf.len() as u32;
        self.pieces.push(Piece {
            to,
            buf: self.held.len() as u32,
            start: 0,
            end,
        });
        self.held.push(buf);
    }

    /// Sends a processed packet where its action says.
    fn route(&mut self, buf: PacketBuf, action: Action) {
        match action {
            Action::Deliver(id) | Action::Reply(id) => self.hold(buf, Port::Instance(id)),
            Action::ToInternet => self.hold(buf, Port::Internet),
            Action::Transmit { to, flow_hash, .. } => self.transmits.push((buf, to, flow_hash)),
            Action::Drop(_) => self.pool.put(buf),
        }
    }

    /// Shows a dropped packet to a capture of drops.
    fn tap_drop(&self, bytes: &[u8], from: Ingress, dropped: Dropped) {
        if let Some(tap) = self.tap.as_ref().filter(|t| t.drops()) {
            tap.dropped(bytes, from, dropped, self.pipeline.topology());
        }
    }

    /// Queues an inner packet for the underlay, `encap` prepended; false (counted) when
    /// there is no room for it.
    fn encapsulate(
        &mut self,
        mut buf: PacketBuf,
        to: Ipv4Addr,
        encap: Encap,
        flow_hash: u32,
    ) -> bool {
        match encap.prepend(&mut buf) {
            Ok(()) => {
                self.transmits.push((buf, to, flow_hash));
                true
            }
            Err(_) => {
                self.pipeline.count_drop(DropReason::NoHeadroom);
                self.pool.put(buf);
                false
            }
        }
    }

    fn handle_packet(&mut self, mut p: Packet, now: Timestamp) {
        if p.vnet.flags & F_NEEDS_CSUM != 0 {
            // The kernel left the checksum to whoever puts the packet on a wire. Offsets
            // that do not fit the packet leave it as it is: the pipeline judges it.
            let _ = gso::finish_checksum(
                p.buf.as_mut_slice(),
                usize::from(p.vnet.csum_start),
                usize::from(p.vnet.csum_offset),
            );
        }
        let action = self.pipeline.process(&mut p.buf, p.from, now);
        if let Action::Drop(why) = action {
            self.tap_drop(p.buf.as_slice(), p.from, why);
        }
        self.route(p.buf, action);
    }

    /// A GRO train from the underlay: each datagram is decided, and its plan applied, where
    /// it lies.
    fn handle_train(&mut self, mut p: Packet, now: Timestamp) {
        let index = self.held.len() as u32;
        for (at, end) in spans(p.buf.len(), p.stride) {
            let d = self
                .pipeline
                .decide(&p.buf.as_slice()[at..end], p.from, now);
            if let Decision::Drop(why) = d {
                self.tap_drop(&p.buf.as_slice()[at..end], p.from, why);
            }
            let dgram = &mut p.buf.as_mut_slice()[at..end];
            let Some(plan) = self.pipeline.transmit_plan(&d, dgram, false) else {
                continue;
            };
            let start = at + plan.start;
            let to = match plan.to {
                Egress::Instance(id) => Port::Instance(id),
                Egress::Internet => Port::Internet,
                // The internet gateway relays into the cloud: the datagram leaves the train.
                Egress::Underlay {
                    to,
                    encap,
                    flow_hash,
                } => {
                    let inner = copied(&self.pool, &p.buf.as_slice()[start..end]);
                    if !self.encapsulate(inner, to, encap, flow_hash) {
                        let why = DropReason::NoHeadroom.into();
                        self.tap_drop(&p.buf.as_slice()[at..end], p.from, why);
                    }
                    continue;
                }
            };
            let (start, end) = (start as u32, end as u32);
            self.pieces.push(Piece {
                to,
                buf: index,
                start,
                end,
            });
        }
        self.held.push(p.buf);
    }

    /// One decision for a whole super-packet: delivered whole to a local device, or cut into
    /// segments for the underlay.
    fn handle_super_packet(&mut self, mut p: Packet, now: Timestamp) {
        let partial = p.vnet.flags & F_NEEDS_CSUM != 0;
        let d = self
            .pipeline
            .decide_offloaded(p.buf.as_slice(), p.from, true, now);
        if let Decision::Drop(why) = d {
            self.tap_drop(p.buf.as_slice(), p.from, why);
        }
        if let Some(plan) = self
            .pipeline
            .transmit_plan(&d, p.buf.as_mut_slice(), partial)
        {
            p.buf.pull_front(plan.start);
            match plan.to {
                Egress::Instance(id) => self.write_whole(Port::Instance(id), &mut p),
                Egress::Internet => self.write_whole(Port::Internet, &mut p),
                Egress::Underlay {
                    to,
                    encap,
                    flow_hash,
                } => self.send_segmented(&p, to, &encap, flow_hash),
            }
        }
        self.pool.put(p.buf);
    }

    /// Writes a super-packet whole, with its GSO header: the instance's kernel takes it.
    fn write_whole(&mut self, port: Port, p: &mut Packet) {
        if let Some(tap) = self
            .tap
            .as_ref()
            .filter(|t| t.device() == Some(port.ingress()))
        {
            tap.packet(Direction::Out, p.buf.as_slice());
        }
        if let Some(dev) = self.device(port)
            && dev.write_with(&mut p.buf, &p.vnet).is_err()
        {
            self.tx_errors.count(port, 1);
        }
    }

    /// Cuts a super-packet into segments for the underlay, `encap` in front of each, and
    /// sends them, their payloads gathered where they lie.
    fn send_segmented(&mut self, p: &Packet, to: Ipv4Addr, encap: &Encap, flow_hash: u32) {
        let pkt = p.buf.as_slice();
        // A virtio-net header that disagrees with the packet the pipeline parsed: it cannot
        // be cut, and is counted as a packet the underlay did not take.
        let Ok(cut) = Cut::new(pkt, &p.vnet) else {
            self.tx_errors.underlay += 1;
            return;
        };
        let cut = cut.widened(usize::from(self.pipeline.topology().underlay.room()));
        let (head_stride, head_len) = gre::segment_heads(pkt, &cut, encap, &mut self.heads);
        let frames = CutFrames {
            pkt,
            cut: &cut,
            heads: &self.heads,
            head_stride,
            head_len,
        };
        if let Some(tap) = self.tap.as_ref().filter(|t| t.underlay()) {
            for i in 0..cut.count {
                let head = &self.heads[i * head_stride..i * head_stride + head_len];
                tap.datagram(Direction::Out, to, &[head, &pkt[cut.payload(i)]]);
            }
        }
        let failed = self.tx.send_cut(&frames, to, flow_hash);
        self.tx_errors.underlay += failed as u64;
        self.underlay.tx_packets += cut.count as u64;
        let payload: usize = (0..cut.count).map(|i| cut.payload(i).len()).sum();
        self.underlay.tx_bytes += (cut.count * head_len + payload) as u64;
    }

    fn flush(&mut self) {
        if !self.transmits.is_empty() {
            let msgs: Vec<(&[u8], Ipv4Addr, u32)> = self
                .transmits
                .iter()
                .map(|(b, to, h)| (b.as_slice(), *to, *h))
                .collect();
            if let Some(tap) = self.tap.as_ref().filter(|t| t.underlay()) {
                for (bytes, to, _) in &msgs {
                    tap.datagram(Direction::Out, *to, &[bytes]);
                }
            }
            let failed = self.tx.send(&msgs);
            self.tx_errors.underlay += failed as u64;
            self.underlay.tx_packets += msgs.len() as u64;
            self.underlay.tx_bytes += msgs.iter().map(|m| m.0.len() as u64).sum::<u64>();
            for (b, _, _) in self.transmits.drain(..) {
                self.pool.put(b);
            }
        }
        // Taken out for the loop (which writes through `self`) and put back, capacity kept.
        let mut pieces = std::mem::take(&mut self.pieces);
        for (to, run) in by_port(&mut pieces) {
            if let Some(dev) = self.device(to) {
                let failed = self.write_device(&dev, to, run);
                self.tx_errors.count(to, failed);
            }
        }
        pieces.clear();
        self.pieces = pieces;
        for b in self.held.drain(..) {
            self.pool.put(b);
        }
    }

    /// Writes `pieces` to `dev`, consecutive TCP segments of a flow coalesced; returns how
    /// many packets the device refused.
    fn write_device(&mut self, dev: &Tun, to: Port, pieces: &[Piece]) -> u64 {
        let held = &self.held;
        let pkts: Vec<&[u8]> = pieces
            .iter()
            .map(|p| &held[p.buf as usize].as_slice()[p.start as usize..p.end as usize])
            .collect();
        if let Some(tap) = self
            .tap
            .as_ref()
            .filter(|t| t.device() == Some(to.ingress()))
        {
            for pkt in &pkts {
                tap.packet(Direction::Out, pkt);
            }
        }
        let mtu = usize::from(self.pipeline.topology().underlay.instance_mtu());
        dev.write_runs(&pkts, mtu, &mut self.runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::csum::Sum;
    use crate::wire::gso::gso_type;
    use crate::wire::ipv4;

    #[test]
    fn a_train_is_cut_every_stride_bytes_the_last_datagram_shorter() {
        let cut = |len, stride| spans(len, stride).collect::<Vec<_>>();
        assert_eq!(cut(10, 4), [(0, 4), (4, 8), (8, 10)]);
        assert_eq!(cut(8, 4), [(0, 4), (4, 8)]);
        assert_eq!(cut(3, 4), [(0, 3)]);
        assert_eq!(cut(0, 4), []);
        // A stride of 0 (never a train) cuts bytes one by one rather than looping or panicking.
        assert_eq!(cut(2, 0), [(0, 1), (1, 2)]);
    }

    #[test]
    fn a_read_is_one_datagram_or_a_trains_datagrams() {
        let cut = |len, stride| datagrams(len, stride).collect::<Vec<_>>();
        assert_eq!(cut(10, 0), [(0, 10)]);
        assert_eq!(cut(10, 4), [(0, 4), (4, 8), (8, 10)]);
        assert_eq!(cut(0, 0), []);
    }

    #[test]
    fn a_train_goes_whole_only_to_the_owner_of_all_its_datagrams() {
        // The owner of a datagram is its first byte.
        let owner = |d: &[u8]| usize::from(d[0]);
        assert_eq!(sole_owner(&[1, 9, 1, 9, 1], 2, owner), Some(1));
        assert_eq!(sole_owner(&[1, 9, 2, 9, 1], 2, owner), None);
        assert_eq!(
            sole_owner(&[1, 9, 1, 9, 3], 2, owner),
            None,
            "the short last one"
        );
        assert_eq!(sole_owner(&[], 2, owner), None);
    }

    #[test]
    fn pieces_are_grouped_by_port_in_their_order() {
        let piece = |to, start| Piece {
            to,
            buf: 0,
            start,
            end: start + 1,
        };
        let (a, b) = (Port::Instance(InstanceId(1)), Port::Instance(InstanceId(0)));
        let mut pieces = [
            piece(a, 0),
            piece(Port::Internet, 1),
            piece(b, 2),
            piece(a, 3),
            piece(b, 4),
            piece(a, 5),
        ];
        let groups: Vec<(Port, Vec<u32>)> = by_port(&mut pieces)
            .map(|(to, run)| (to, run.iter().map(|p| p.start).collect()))
            .collect();
        assert_eq!(
            groups,
            [
                (b, vec![2, 4]),
                (a, vec![0, 3, 5]),
                (Port::Internet, vec![1])
            ]
        );
        assert_eq!(by_port(&mut []).count(), 0);
    }

    /// A TCP super-packet of `payload` bytes from 10.0.1.10 to 10.0.2.20, sequence 1000.
    fn super_tcp(payload: usize) -> Vec<u8> {
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x18; // PSH ACK
        tcp.extend((0..payload).map(|i| i as u8));
        let mut p = vec![0u8; ipv4::HEADER_LEN];
        let (src, dst) = ([10, 0, 1, 10].into(), [10, 0, 2, 20].into());
        ipv4::emit_header(
            &mut p,
            src,
            dst,
            ipv4::proto::TCP,
            0,
            (20 + tcp.len()) as u16,
        );
        p.extend(tcp);
        p
    }

    /// Each segment cut from a super-packet for the underlay is a whole GRE packet: outer
    /// IPv4 header and GRE (key, checksum) valid, the inner IPv4 and TCP checksums valid, the
    /// sequence numbers following each other, and the payloads, put together, the original.
    #[test]
    fn segment_heads_make_whole_gre_packets_of_the_payloads_where_they_lie() {
        let pkt = super_tcp(3000);
        let vnet = VnetHdr {
            gso_type: gso_type::TCPV4,
            hdr_len: 40,
            gso_size: 1400,
            ..VnetHdr::default()
        };
        let cut = Cut::new(&pkt, &vnet).unwrap();
        let (src, dst) = ([192, 0, 2, 1].into(), [192, 0, 2, 2].into());
        let encap = Encap {
            outer: Some((src, dst)),
            key: Some(1001),
            checksum: true,
        };
        let mut heads = Vec::new();
        let (stride, head_len) = gre::segment_heads(&pkt, &cut, &encap, &mut heads);
        assert_eq!((cut.count, head_len), (3, 20 + 12 + 40));
        assert!(stride >= head_len && stride.is_multiple_of(8));
        let mut payload = Vec::new();
        for i in 0..cut.count {
            let at = i * stride;
            let frame = [&heads[at..at + head_len], &pkt[cut.payload(i)]].concat();
            let outer = ipv4::parse_outer(&frame).unwrap();
            assert_eq!((outer.src, outer.dst), (src, dst));
            assert_eq!(
                usize::from(u16::from_be_bytes([frame[2], frame[3]])),
                frame.len()
            );
            let g = gre::parse(&frame[20..]).unwrap();
            assert_eq!((g.key, g.checksum_present), (Some(1001), true));
            let inner = gre::peek_inner(&frame, true);
            assert_eq!(ipv4::checksum(&inner[..20]), 0, "inner IPv4 checksum");
            let tcp = &inner[20..];
            let pseudo = Sum::new()
                .add_bytes(&inner[12..20])
                .add2([0, ipv4::proto::TCP])
                .add2((tcp.len() as u16).to_be_bytes());
            assert_eq!(pseudo.add_bytes(tcp).checksum(), 0, "TCP checksum");
            let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            assert_eq!(seq, 1000 + 1400 * i as u32);
            payload.extend_from_slice(&tcp[20..]);
        }
        assert_eq!(payload, pkt[40..]);
    }

    const TOPOLOGY: &str = r#"
[underlay]
transport = "gre-udp"
mtu = 1500

[[host]]
name = "a"
address = "192.0.2.1"

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
"#;

    fn topology(instances: &[&str]) -> Topology {
        let mut text = TOPOLOGY.to_string();
        for (i, name) in instances.iter().enumerate() {
            text += &format!(
                "[[instance]]\nname = \"{name}\"\nhost = \"a\"\nsubnet = \"s\"\nip = \"10.0.1.{}\"\nsecurity_groups = [\"sg\"]\n",
                10 + i
            );
        }
        Topology::parse(&text, "test.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    /// Transmit errors are counted per port, summed over workers, and follow their instance
    /// by name through a reload that renumbers instances (those that left are forgotten).
    #[test]
    fn transmit_errors_follow_their_instance() {
        let old = topology(&["x", "y", "z"]);
        let new = topology(&["z", "w", "x"]);
        let mut e = TxErrors::new(3);
        e.count(Port::Instance(InstanceId(0)), 2);
        e.count(Port::Instance(InstanceId(1)), 5);
        e.count(Port::Instance(InstanceId(2)), 7);
        e.count(Port::Internet, 1);
        e.underlay += 4;
        let mut other = TxErrors::new(3);
        other.count(Port::Instance(InstanceId(0)), 1);
        other.underlay += 1;
        e.merge(&other);
        assert_eq!(e.instances, [3, 5, 7]);
        assert_eq!((e.internet, e.underlay), (1, 5));
        e.renumber(&old, &new);
        // z was id 2, x id 0; y left; w is new.
        assert_eq!(e.instances, [7, 0, 3]);
        assert_eq!((e.internet, e.underlay), (1, 5));
    }
}
