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

use std::io::IoSlice;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::EventFd;
use tracing::warn;

use super::Affinity;
use super::pool::Pool;
use crate::clock::MonotonicClock;
use crate::io::tun::Tun;
use crate::io::underlay::{BATCH, CutFrames, Received, UnderlayRx, UnderlayTx, peek_inner};
use crate::pipeline::{Action, Counters, Decision, Ingress, Pipeline};
use crate::reason::DropReason;
use crate::time::Timestamp;
use crate::topology::{InstanceId, Topology, Transport};
use crate::wire::gso::{self, Cut, F_NEEDS_CSUM, VNET_HDR_LEN, VnetHdr};
use crate::wire::{PacketBuf, gre, gro, nat};

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
    /// Stop.
    Stop,
}

/// The way to a worker: its inbox, and the eventfd that wakes it from `poll`.
pub struct Lane {
    /// The inbox.
    pub tx: Sender<Msg>,
    /// Its wake-up.
    pub wake: Arc<EventFd>,
}

impl Lane {
    /// Puts a message in the inbox and wakes the worker. A full inbox refuses it (false):
    /// blocking here could deadlock two workers handing packets to each other.
    pub fn send(&self, m: Msg) -> bool {
        let ok = self.tx.try_send(m).is_ok();
        let _ = self.wake.write(1);
        ok
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
    /// Who owns a flow.
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
    /// Batches it could not hand over (an owner's inbox was full).
    pub handoff_drops: u64,
}

/// A packet to write to a device: `held[buf][start..end]`.
#[derive(Debug, Clone, Copy)]
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

/// The virtio-net header of a plain packet (no offload, checksums complete).
const PLAIN: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

/// One worker.
pub struct Worker {
    wiring: Wiring,
    mine: Vec<(Ingress, Arc<Tun>)>,
    local: Vec<Packet>,
    outgoing: Vec<Vec<Packet>>,
    received: Vec<Received>,
    /// Batches lost because an owner's inbox was full.
    pub handoff_drops: u64,
    pipeline: Pipeline,
    devices: Devices,
    tx: UnderlayTx,
    local_addr: Ipv4Addr,
    pool: Pool,
    clock: MonotonicClock,
    heads: Vec<u8>,
    held: Vec<PacketBuf>,
    pieces: Vec<Piece>,
    transmits: Vec<(PacketBuf, Ipv4Addr, u32)>,
    runs: Vec<(usize, usize)>,
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
        let t = pipeline.topology().clone();
        let local_addr = t.host(pipeline.host()).address;
        let n = wiring.lanes.len();
        Worker {
            mine: assign(&devices, wiring.me, n),
            wiring,
            local: Vec::with_capacity(BATCH),
            outgoing: (0..n).map(|_| Vec::new()).collect(),
            received: Vec::with_capacity(BATCH),
            handoff_drops: 0,
            pipeline,
            devices,
            tx,
            local_addr,
            pool,
            clock,
            heads: Vec::new(),
            held: Vec::new(),
            pieces: Vec::new(),
            transmits: Vec::new(),
            runs: Vec::new(),
        }
    }

    /// Runs until told to stop: waits for its wake-up, its underlay socket or its devices,
    /// reads what is ready, decides, writes.
    pub fn run(mut self) {
        loop {
            let (woken, rx_ready, ready) = match self.wait() {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "poll");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
            };
            if woken && !self.inbox() {
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
    fn wait(&self) -> nix::Result<(bool, bool, Vec<usize>)> {
        let mut fds = Vec::with_capacity(2 + self.mine.len());
        fds.push(PollFd::new(
            self.wiring.lanes[self.wiring.me].wake.as_fd(),
            PollFlags::POLLIN,
        ));
        if let Some((rx, _)) = &self.wiring.rx {
            fds.push(PollFd::new(rx.fd(), PollFlags::POLLIN));
        }
        for (_, d) in &self.mine {
            fds.push(PollFd::new(d.fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
        let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        let woken = ready(&fds[0]);
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
                Msg::Topology(t, devices) => {
                    // What was read under the old topology is decided under it.
                    if !self.local.is_empty() {
                        let batch = std::mem::take(&mut self.local);
                        self.handle(batch);
                    }
                    self.pipeline.set_topology(t);
                    self.mine = assign(&devices, self.wiring.me, self.wiring.lanes.len());
                    self.devices = devices;
                }
                Msg::Tick(reply) => {
                    self.pipeline.sweep(self.clock.now());
                    let _ = reply.send(self.report());
                }
                Msg::ClearCounters(reply) => {
                    self.pipeline.clear_counters();
                    self.handoff_drops = 0;
                    let _ = reply.send(self.report());
                }
                Msg::Stop => return false,
            }
        }
        true
    }

    fn report(&self) -> WorkerReport {
        WorkerReport {
            counters: self.pipeline.counters().clone(),
            connections: self.pipeline.conntrack().len(),
            conntrack: self.pipeline.conntrack().stats(),
            handoff_drops: self.handoff_drops,
        }
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
            warn!(error = %e, "underlay receive");
        }
        // Taken out for the loop (which sorts into `self`) and put back, capacity kept.
        let mut received = std::mem::take(&mut self.received);
        let affinity = self.wiring.affinity.clone();
        let owner_of = |dgram: &[u8]| affinity.owner(peek_inner(dgram, transport));
        for r in received.drain(..) {
            let from = match transport {
                Transport::Gre => Ingress::UnderlayIp,
                Transport::GreUdp => Ingress::UnderlayUdp { from: r.from },
            };
            if r.stride == 0 {
                let owner = owner_of(r.buf.as_slice());
                self.sort(
                    Packet {
                        buf: r.buf,
                        from,
                        vnet: Default::default(),
                        stride: 0,
                    },
                    owner,
                );
                continue;
            }
            // A GRO train may carry several flows. When they all belong to one worker it goes
            // there whole; otherwise each datagram goes to its owner, copied out.
            let stride = r.stride;
            let spans = |len: usize| {
                (0..len)
                    .step_by(stride)
                    .map(move |at| (at, (at + stride).min(len)))
            };
            let len = r.buf.len();
            let owner = owner_of(r.buf.as_slice());
            let mixed = spans(len).any(|(at, end)| owner_of(&r.buf.as_slice()[at..end]) != owner);
            if !mixed {
                let p = Packet {
                    buf: r.buf,
                    from,
                    vnet: Default::default(),
                    stride,
                };
                self.sort(p, owner);
                continue;
            }
            for (at, end) in spans(len) {
                let dgram = &r.buf.as_slice()[at..end];
                let o = owner_of(dgram);
                let p = Packet {
                    buf: copied(&self.pool, dgram),
                    from,
                    vnet: Default::default(),
                    stride: 0,
                };
                self.sort(p, o);
            }
            self.pool.put(r.buf);
        }
        self.received = received;
    }

    fn read_device(&mut self, i: usize) {
        let Some((from, dev)) = self.mine.get(i).cloned() else {
            return;
        };
        for _ in 0..BATCH {
            let mut buf = self.pool.take();
            match dev.read(&mut buf) {
                Ok(Some(vnet)) => {
                    let owner = self.wiring.affinity.owner(buf.as_slice());
                    self.sort(
                        Packet {
                            buf,
                            from,
                            vnet,
                            stride: 0,
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

    /// Hands the packets of other owners over, a batch per owner.
    fn hand_off(&mut self) {
        for k in 0..self.outgoing.len() {
            if self.outgoing[k].is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut self.outgoing[k]);
            let t = self.pipeline.topology().clone();
            if !self.wiring.lanes[k].send(Msg::Packets(t, batch)) {
                self.handoff_drops += 1;
            }
        }
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

    fn handle_packet(&mut self, mut p: Packet, now: Timestamp) {
        if p.vnet.flags & F_NEEDS_CSUM != 0 {
            // The kernel left the checksum to whoever puts the packet on a wire.
            let _ = gso::finish_checksum(
                p.buf.as_mut_slice(),
                usize::from(p.vnet.csum_start),
                usize::from(p.vnet.csum_offset),
            );
        }
        let action = self.pipeline.process(&mut p.buf, p.from, now);
        self.route(p.buf, action);
    }

    /// A GRO train from the underlay: each datagram is decided where it lies.
    fn handle_train(&mut self, mut p: Packet, now: Timestamp) {
        let index = self.held.len() as u32;
        let len = p.buf.len();
        let mut at = 0;
        while at < len {
            let end = (at + p.stride).min(len);
            let d = self
                .pipeline
                .decide(&p.buf.as_slice()[at..end], p.from, now);
            let (to, strip, nat) = match d {
                Decision::Deliver { to, strip, nat } => (Port::Instance(to), strip, nat),
                Decision::ToInternet { strip, nat } => (Port::Internet, strip, nat),
                // The internet gateway relays into the cloud: the datagram leaves the train.
                Decision::Encapsulate { .. } => {
                    let mut buf = copied(&self.pool, &p.buf.as_slice()[at..end]);
                    let action = self.pipeline.apply(d, &mut buf, false);
                    self.route(buf, action);
                    at = end;
                    continue;
                }
                _ => {
                    at = end;
                    continue;
                }
            };
            let start = at + usize::from(strip);
            nat::apply(&mut p.buf.as_mut_slice()[start..end], &nat, false);
            self.pieces.push(Piece {
                to,
                buf: index,
                start: start as u32,
                end: end as u32,
            });
            at = end;
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
        match d {
            Decision::Deliver { nat, .. } | Decision::ToInternet { nat, .. } => {
                let port = match d {
                    Decision::Deliver { to, .. } => Port::Instance(to),
                    _ => Port::Internet,
                };
                nat::apply(p.buf.as_mut_slice(), &nat, partial);
                if let Some(dev) = self.device(port) {
                    let _ = dev.write_with(&mut p.buf, &p.vnet);
                }
            }
            Decision::Encapsulate { host, key, nat, .. } => {
                nat::apply(p.buf.as_mut_slice(), &nat, partial);
                let t = self.pipeline.topology().clone();
                let u = t.underlay;
                let to = t.host(host).address;
                let outer_ip = u.transport == Transport::Gre;
                let prefix = gre::encap_len(outer_ip, key.is_some(), u.checksum);
                let pkt = p.buf.as_slice();
                if let Ok(cut) = Cut::new(pkt, &p.vnet) {
                    let head_len = prefix + cut.headers;
                    let stride = head_len.next_multiple_of(8);
                    if self.heads.len() < cut.count * stride {
                        self.heads.resize(cut.count * stride, 0);
                    }
                    let outer = outer_ip.then_some((self.local_addr, to));
                    for i in 0..cut.count {
                        let chunk = &pkt[cut.payload(i)];
                        let h = &mut self.heads[i * stride..i * stride + head_len];
                        cut.write_header(pkt, i, chunk, &mut h[prefix..]);
                        gre::write_encap_gathered(h, chunk, outer, key, u.checksum);
                    }
                    let hash = crate::wire::ipv4::flow_hash(pkt, self.pipeline.flow_seed());
                    let frames = CutFrames {
                        pkt,
                        cut: &cut,
                        heads: &self.heads,
                        head_stride: stride,
                        head_len,
                    };
                    let _ = self.tx.send_cut(&frames, to, hash);
                }
            }
            Decision::FragNeeded { .. } | Decision::Drop(_) => {}
        }
        self.pool.put(p.buf);
    }

    fn flush(&mut self) {
        if !self.transmits.is_empty() {
            let msgs: Vec<(&[u8], Ipv4Addr, u32)> = self
                .transmits
                .iter()
                .map(|(b, to, h)| (b.as_slice(), *to, *h))
                .collect();
            let _ = self.tx.send(&msgs);
            for (b, _, _) in self.transmits.drain(..) {
                self.pool.put(b);
            }
        }
        if !self.pieces.is_empty() {
            self.pieces.sort_by_key(|p| p.to);
            let mut start = 0;
            while start < self.pieces.len() {
                let to = self.pieces[start].to;
                let end = start
                    + self.pieces[start..]
                        .iter()
                        .take_while(|p| p.to == to)
                        .count();
                if let Some(dev) = self.device(to) {
                    self.write_device(&dev, start, end);
                }
                start = end;
            }
            self.pieces.clear();
        }
        for b in self.held.drain(..) {
            self.pool.put(b);
        }
    }

    /// Writes `pieces[start..end]` to `dev`, consecutive TCP segments of a flow coalesced.
    fn write_device(&mut self, dev: &Tun, start: usize, end: usize) {
        let held = &self.held;
        let pkts: Vec<&[u8]> = self.pieces[start..end]
            .iter()
            .map(|p| &held[p.buf as usize].as_slice()[p.start as usize..p.end as usize])
            .collect();
        gro::plan(&pkts, &mut self.runs);
        let mut head = [0u8; gro::MAX_HEADER];
        for &(first, count) in &self.runs {
            let run = &pkts[first..first + count];
            if count == 1 {
                let _ = dev.write_gathered(&[IoSlice::new(&PLAIN), IoSlice::new(run[0])]);
                continue;
            }
            let n = gro::super_header(run, &mut head);
            let mut parts = Vec::with_capacity(count + 1);
            parts.push(IoSlice::new(&head[..n]));
            parts.extend(
                run.iter()
                    .map(|s| IoSlice::new(&s[gro::payload_offset(s)..])),
            );
            let _ = dev.write_gathered(&parts);
        }
    }
}
