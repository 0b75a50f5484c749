//! Workers: each owns a shard of the flow state (its own [`Pipeline`]) and its own underlay
//! sending sockets, and takes whole batches of packets from the readers.
//!
//! A flow always lands on the same worker: the readers pick the worker from a hash that is
//! the same for both directions of a connection, so the connection's state lives in one shard
//! and no lock is taken per packet.

use std::net::Ipv4Addr;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use tun_rs::GROTable;

use super::pool::Pool;
use crate::io::tun::{Tun, TunFrame};
use crate::io::underlay::UnderlayTx;
use crate::pipeline::{Action, Counters, Decision, Ingress, Pipeline};
use crate::time::MonotonicClock;
use crate::topology::{InstanceId, Topology, Transport};
use crate::wire::gso::{self, F_NEEDS_CSUM, VnetHdr};
use crate::wire::{PacketBuf, gre};

/// A packet in flight between threads.
pub struct Packet {
    /// The bytes.
    pub buf: PacketBuf,
    /// Where it came from.
    pub from: Ingress,
    /// Its virtio-net header (zero for underlay packets).
    pub vnet: VnetHdr,
}

/// The local instances' devices, by instance id of the topology in force.
pub type Devices = Arc<Vec<Option<Arc<Tun>>>>;

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

/// One worker.
pub struct Worker {
    pipeline: Pipeline,
    devices: Devices,
    tx: UnderlayTx,
    local: Ipv4Addr,
    pool: Pool,
    clock: MonotonicClock,
    gro: GROTable,
    frames: Vec<u8>,
    deliveries: Vec<(InstanceId, PacketBuf)>,
    transmits: Vec<(PacketBuf, Ipv4Addr, u32)>,
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
            gro: GROTable::default(),
            frames: Vec::new(),
            deliveries: Vec::new(),
            transmits: Vec::new(),
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

    fn device(&self, id: InstanceId) -> Option<Arc<Tun>> {
        self.devices.get(id.index()).cloned().flatten()
    }

    fn handle(&mut self, batch: Vec<Packet>) {
        let now = self.clock.now();
        for mut p in batch {
            if p.vnet.is_gso() {
                self.handle_super_packet(p, now);
                continue;
            }
            if p.vnet.flags & F_NEEDS_CSUM != 0 {
                // The kernel left the checksum to whoever puts the packet on a wire.
                let _ = gso::finish_checksum(
                    p.buf.as_mut_slice(),
                    usize::from(p.vnet.csum_start),
                    usize::from(p.vnet.csum_offset),
                );
            }
            match self.pipeline.process(&mut p.buf, p.from, now) {
                Action::Deliver(id) | Action::Reply(id) => self.deliveries.push((id, p.buf)),
                Action::Transmit { to, flow_hash, .. } => {
                    self.transmits.push((p.buf, to, flow_hash))
                }
                Action::Drop(_) | Action::ToInternet => self.pool.put(p.buf),
            }
        }
        self.flush();
    }

    /// One decision for a whole super-packet: delivered whole to a local device, or cut into
    /// segments, each encapsulated, for the underlay.
    fn handle_super_packet(&mut self, mut p: Packet, now: crate::time::Timestamp) {
        match self
            .pipeline
            .decide_offloaded(p.buf.as_slice(), p.from, true, now)
        {
            Decision::Deliver { to, .. } => {
                if let Some(dev) = self.device(to) {
                    let _ = dev.write_with(&mut p.buf, &p.vnet);
                }
            }
            Decision::Encapsulate { host, key, .. } => {
                let t = self.pipeline.topology().clone();
                let u = t.underlay;
                let to = t.host(host).address;
                let outer_ip = u.transport == Transport::Gre;
                let prefix = gre::encap_len(outer_ip, true, u.checksum);
                let pkt = p.buf.as_slice();
                let Ok(segment_len) = gso::segment_len(pkt, &p.vnet) else {
                    self.pool.put(p.buf);
                    return;
                };
                let stride = prefix + segment_len;
                let need = pkt.len().div_ceil(usize::from(p.vnet.gso_size)).max(1) * stride;
                if self.frames.len() < need {
                    self.frames.resize(need, 0);
                }
                let hash = crate::wire::ipv4::flow_hash(pkt, self.pipeline.flow_seed());
                if let Ok(segs) = gso::segment(pkt, &p.vnet, &mut self.frames, stride, prefix) {
                    let outer = outer_ip.then_some((self.local, to));
                    for i in 0..segs.count {
                        let frame = &mut self.frames[i * stride..i * stride + segs.len_of(i)];
                        gre::write_encap(frame, outer, key, u.checksum);
                    }
                    let _ = self.tx.send_segments(&self.frames, &segs, stride, to, hash);
                }
            }
            Decision::FragNeeded { .. } | Decision::Drop(_) | Decision::ToInternet { .. } => {}
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
        if !self.deliveries.is_empty() {
            self.deliveries.sort_by_key(|(id, _)| *id);
            let mut deliveries = std::mem::take(&mut self.deliveries);
            for group in deliveries.chunk_by_mut(|a, b| a.0 == b.0) {
                let Some(dev) = self.device(group[0].0) else {
                    continue;
                };
                let mut frames: Vec<TunFrame<'_>> = group
                    .iter_mut()
                    .filter_map(|(_, b)| TunFrame::new(b).ok())
                    .collect();
                let _ = dev.write_batch(&mut self.gro, &mut frames);
            }
            for (_, b) in deliveries.drain(..) {
                self.pool.put(b);
            }
            self.deliveries = deliveries;
        }
    }
}
