//! Counters: per drop reason, per instance, and for the cache.

use std::collections::BTreeMap;

use super::{Decision, Dropped, Ingress, RuleRef};
use crate::reason::DropReason;
use crate::topology::InstanceId;

/// What happened to one instance's traffic on this host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Packets the instance sent that were forwarded.
    pub sent: u64,
    /// Packets the instance sent that were dropped.
    pub sent_dropped: u64,
    /// Packets delivered to the instance.
    pub received: u64,
    /// Packets for the instance that were dropped here on its receiving side (its subnet's
    /// ingress ACL, its groups, its connection table), not by its sender's egress policy.
    pub received_dropped: u64,
    /// Bytes (IP level) of the packets in `sent`.
    pub sent_bytes: u64,
    /// Bytes (IP level, outer headers stripped) of the packets in `received`.
    pub received_bytes: u64,
}

impl PortCounters {
    fn add(&mut self, b: &PortCounters) {
        self.sent += b.sent;
        self.sent_dropped += b.sent_dropped;
        self.received += b.received;
        self.received_dropped += b.received_dropped;
        self.sent_bytes += b.sent_bytes;
        self.received_bytes += b.received_bytes;
    }
}

/// What [`Counters::count`] needs to know of a packet beyond its decision.
#[derive(Debug, Clone, Copy)]
pub struct Counted {
    /// Where it came from.
    pub from: Ingress,
    /// Its length, outer headers included (the decision's `strip` says how many).
    pub len: usize,
    /// The local instance it was for, when the decision got that far.
    pub receiver: Option<InstanceId>,
}

/// Which of an instance's traffic a drop was: what it sent, or what was for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Way {
    /// A packet the instance sent (`sent_dropped`).
    Sent,
    /// A packet for the instance (`received_dropped`).
    Received,
}

/// One instance's drops: by [`Way`], then by reason.
type WayDrops = [[u64; DropReason::COUNT]; 2];

const NO_DROPS: WayDrops = [[0; DropReason::COUNT]; 2];

/// All counters of one pipeline.
#[derive(Debug, Clone)]
pub struct Counters {
    drops: [u64; DropReason::COUNT],
    ports: Vec<PortCounters>,
    /// Drops by instance (index), way and reason; an instance's table is made at its first
    /// drop (an index and an addition afterwards: no hashing on the drop path).
    port_drops: Vec<Option<Box<WayDrops>>>,
    rules: BTreeMap<(DropReason, RuleRef), u64>,
    /// Decisions served from the flow cache.
    pub cache_hits: u64,
    /// Decisions that took the full path.
    pub cache_misses: u64,
    /// Packets delivered to a local instance.
    pub delivered: u64,
    /// Packets encapsulated towards another host.
    pub encapsulated: u64,
    /// ICMP errors vpcd itself sent back to an instance.
    pub replied: u64,
    /// Packets written to the internet's device.
    pub to_internet: u64,
}

impl Counters {
    /// Zeroed counters for a topology of `instances` instances.
    pub fn new(instances: usize) -> Counters {
        Counters {
            drops: [0; DropReason::COUNT],
            ports: vec![PortCounters::default(); instances],
            port_drops: vec![None; instances],
            rules: BTreeMap::new(),
            cache_hits: 0,
            cache_misses: 0,
            delivered: 0,
            encapsulated: 0,
            replied: 0,
            to_internet: 0,
        }
    }

    /// Counts a decision taken for packet `p`: a handful of additions to counters of this
    /// pipeline's own (the bench `counting/count_deliver` measures it). A TSO super-packet
    /// counts once, with all its bytes.
    #[inline]
    pub fn count(&mut self, d: &Decision, p: Counted) {
        let sender = match p.from {
            Ingress::Instance(id) => Some(id.index()),
            _ => None,
        };
        let forwarded = match *d {
            Decision::Drop(x) => {
                self.count_drop(x, sender, p.receiver);
                return;
            }
            Decision::FragNeeded { .. } | Decision::EchoReply { .. } => {
                self.replied += 1;
                return;
            }
            Decision::Deliver { to, strip, .. } => {
                self.delivered += 1;
                if let Some(port) = self.ports.get_mut(to.index()) {
                    port.received += 1;
                    port.received_bytes += p.len.saturating_sub(usize::from(strip)) as u64;
                }
                true
            }
            Decision::Encapsulate { .. } => {
                self.encapsulated += 1;
                true
            }
            Decision::ToInternet { .. } => {
                self.to_internet += 1;
                true
            }
        };
        if forwarded && let Some(port) = sender.and_then(|s| self.ports.get_mut(s)) {
            port.sent += 1;
            port.sent_bytes += p.len as u64;
        }
    }

    fn count_drop(&mut self, x: Dropped, sender: Option<usize>, receiver: Option<InstanceId>) {
        self.drop(x.reason);
        if let Some(rule) = x.rule {
            self.rule_drop(x.reason, rule);
        }
        if let Some(s) = sender
            && let Some(p) = self.ports.get_mut(s)
        {
            p.sent_dropped += 1;
            self.port_drop(s, Way::Sent, x.reason);
        }
        let egress_policy = matches!(x.reason, DropReason::AclEgress | DropReason::SgEgress);
        if !egress_policy
            && let Some(r) = receiver.map(|r| r.index())
            && let Some(p) = self.ports.get_mut(r)
        {
            p.received_dropped += 1;
            self.port_drop(r, Way::Received, x.reason);
        }
    }

    fn port_drop(&mut self, instance: usize, way: Way, reason: DropReason) {
        if let Some(slot) = self.port_drops.get_mut(instance) {
            slot.get_or_insert_with(|| Box::new(NO_DROPS))[way as usize][reason.index()] += 1;
        }
    }

    /// One instance's drops (by instance index) that happened, by way and reason, in order.
    pub fn port_drops(&self, instance: usize) -> Vec<(Way, DropReason, u64)> {
        let Some(Some(t)) = self.port_drops.get(instance) else {
            return Vec::new();
        };
        let ways = [Way::Sent, Way::Received].into_iter();
        ways.flat_map(|w| {
            DropReason::ALL
                .iter()
                .map(move |r| (w, *r, t[w as usize][r.index()]))
        })
        .filter(|(.., n)| *n > 0)
        .collect()
    }

    /// Packets dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// Policy drops per deciding rule.
    pub fn rule_drops(&self) -> impl Iterator<Item = ((DropReason, RuleRef), u64)> + '_ {
        self.rules.iter().map(|(k, v)| (*k, *v))
    }

    /// Total drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// One instance's counters (by instance index).
    pub fn port(&self, instance: usize) -> PortCounters {
        self.ports.get(instance).copied().unwrap_or_default()
    }

    pub(crate) fn drop(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
    }

    pub(crate) fn rule_drop(&mut self, reason: DropReason, rule: RuleRef) {
        *self.rules.entry((reason, rule)).or_default() += 1;
    }

    /// Follows the instances into a new topology: `new_index(i)` is where instance `i` now
    /// is (by name), `None` when it is gone; `instances` is the new count.
    pub(crate) fn renumber(
        &mut self,
        instances: usize,
        new_index: impl Fn(usize) -> Option<usize>,
    ) {
        let mut ports = vec![PortCounters::default(); instances];
        for (i, p) in self.ports.iter().enumerate() {
            if let Some(slot) = new_index(i).and_then(|j| ports.get_mut(j)) {
                *slot = *p;
            }
        }
        self.ports = ports;
        let mut drops = vec![None; instances];
        for (i, t) in std::mem::take(&mut self.port_drops).into_iter().enumerate() {
            if let Some(slot) = new_index(i).and_then(|j| drops.get_mut(j)) {
                *slot = t;
            }
        }
        self.port_drops = drops;
    }

    /// Rule ids belong to one topology: forget them when it changes.
    pub(crate) fn forget_rules(&mut self) {
        self.rules.clear();
    }

    /// Adds another pipeline's counters (workers of one daemon).
    pub fn merge(&mut self, other: &Counters) {
        for (a, b) in self.drops.iter_mut().zip(other.drops.iter()) {
            *a += b;
        }
        if self.ports.len() < other.ports.len() {
            self.ports
                .resize(other.ports.len(), PortCounters::default());
        }
        for (a, b) in self.ports.iter_mut().zip(other.ports.iter()) {
            a.add(b);
        }
        for (k, v) in &other.rules {
            *self.rules.entry(*k).or_default() += v;
        }
        if self.port_drops.len() < other.port_drops.len() {
            self.port_drops.resize(other.port_drops.len(), None);
        }
        for (a, b) in self.port_drops.iter_mut().zip(&other.port_drops) {
            let Some(b) = b else { continue };
            let a = a.get_or_insert_with(|| Box::new(NO_DROPS));
            for (x, y) in a.iter_mut().flatten().zip(b.iter().flatten()) {
                *x += y;
            }
        }
        self.cache_hits += other.cache_hits;
        self.cache_misses += other.cache_misses;
        self.delivered += other.delivered;
        self.encapsulated += other.encapsulated;
        self.replied += other.replied;
        self.to_internet += other.to_internet;
    }
}
