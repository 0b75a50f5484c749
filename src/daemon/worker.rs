//! Workers: each owns a shard of the flow state (its own [`Pipeline`]) and its own underlay
//! sending sockets, and takes whole batches of packets from the readers.
//!
//! A flow always lands on the same worker: the readers pick the worker from a hash that is
//! the same for both directions of a connection, so the connection's state lives in one shard
//! and no lock is taken per packet.
//!
//! Payload bytes are copied once per direction, by the kernel: a super-packet read from a TUN
//! device is cut for the underlay by writing each segment's headers apart and gathering the
//! payloads where they lie (`sendmsg` with UDP GSO, or `sendmmsg`); packets for a TUN device
//! are decided where they landed (a GRO train is decided datagram by datagram, in place) and
//! consecutive TCP segments are written as one super-packet, headers rebuilt, payloads
//! gathered (`writev`).

use std::io::IoSlice;
use std::net::Ipv4Addr;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use super::pool::Pool;
use crate::io::tun::Tun;
use crate::io::underlay::{CutFrames, UnderlayTx};
use crate::pipeline::{Action, Counters, Decision, Ingress, Pipeline};
use crate::time::{MonotonicClock, Timestamp};
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
    /// Packets to process.
    Packets(Vec<Packet>),
    /// A new topology and the devices that go with it.
    Topology(Arc<Topology>, Devices),
    /// Expire connections, then report the counters.
    Tick(Sender<WorkerReport>),
}

/// A worker's answer to a tick.
pub struct WorkerReport {
    /// Its counters.
    pub counters: Counters,
    /// Its tracked connections.
    pub connections: usize,
}

/// A packet to write to a device: `held[buf][start..end]`.
#[derive(Debug, Clone, Copy)]
struct Piece {
    to: Port,
    buf: u32,
    start: u32,
    end: u32,
}

/// The virtio-net header of a plain packet (no offload, checksums complete).
const PLAIN: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

/// One worker.
pub struct Worker {
    pipeline: Pipeline,
    devices: Devices,
    tx: UnderlayTx,
    local: Ipv4Addr,
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
        pipeline: Pipeline,
        devices: Devices,
        tx: UnderlayTx,
        pool: Pool,
        clock: MonotonicClock,
    ) -> Worker {
        let t = pipeline.topology().clone();
        let local = t.host(pipeline.host()).address;
        Worker {
            pipeline,
            devices,
            tx,
            local,
            pool,
            clock,
            heads: Vec::new(),
            held: Vec::new(),
            pieces: Vec::new(),
            transmits: Vec::new(),
            runs: Vec::new(),
        }
    }

    /// Runs until every sender of `inbox` is gone.
    pub fn run(mut self, inbox: Receiver<Msg>) {
        while let Ok(msg) = inbox.recv() {
            match msg {
                Msg::Packets(batch) => self.handle(batch),
                Msg::Topology(t, devices) => {
                    self.pipeline.set_topology(t);
                    self.devices = devices;
                }
                Msg::Tick(reply) => {
                    self.pipeline.sweep(self.clock.now());
                    let _ = reply.send(WorkerReport {
                        counters: self.pipeline.counters().clone(),
                        connections: self.pipeline.conntrack().len(),
                    });
                }
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
                    let mut buf = self.pool.take();
                    let dgram = &p.buf.as_slice()[at..end];
                    let area = buf.read_area(crate::wire::buf::HEADROOM);
                    area[..dgram.len()].copy_from_slice(dgram);
                    buf.set_filled(crate::wire::buf::HEADROOM, dgram.len());
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
                    let outer = outer_ip.then_some((self.local, to));
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
