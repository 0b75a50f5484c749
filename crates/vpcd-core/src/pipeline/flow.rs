//! The flow cache: the first packet of a flow takes the full path, later packets reuse its
//! decision.
//!
//! A 2-way set-associative table of fixed size, indexed by a seeded hash of the flow
//! key: bounded memory, no allocation per packet, no eviction logic. The key holds every field
//! the decision read, so two packets that differ in any of them never share a decision.
//!
//! An entry is valid in the topology generation it is tagged with: a hit is one key compare
//! and one generation compare. A topology change bumps the generation; the entries whose
//! decision it cannot affect are carried into the new one ([`FlowCache::carry`]), ids
//! renumbered, before the first packet: each entry records the address spaces its decision
//! depended on ([`Deps`]), and only the entries of the spaces the change touched are left
//! behind (the rule is [`super::scope`]'s).

use std::hash::{BuildHasher, Hash};

use super::Decision;
use super::scope::Deps;
use crate::policy::conntrack::{ConnRef, Endpoint};
use crate::topology::InstanceId;
use crate::wire::ipv4::{Ipv4Packet, L4};

/// Everything the decision reads from a packet and its arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    /// Where it came from: an instance id, a host id with the top bit set, or
    /// [`FROM_INTERNET`]. With the GRE key and the source address it determines the sender's
    /// zone, which so needs no field of its own.
    pub ingress: u32,
    /// For underlay packets, the GRE key they came with (it names the channel, and so the
    /// network, they came on): the key, or 2³² for none; 0 for the packets of other ingresses.
    pub gre_key: u64,
    /// Source address.
    pub src: u32,
    /// Destination address.
    pub dst: u32,
    /// Source port, or ICMP identifier.
    pub sport: u16,
    /// Destination port, or ICMP identifier.
    pub dport: u16,
    /// IP protocol.
    pub protocol: u8,
    /// ICMP type (0 for other protocols).
    pub icmp_type: u8,
    /// ICMP code (0 for other protocols).
    pub icmp_code: u8,
}

impl Hash for FlowKey {
    /// Four wide words instead of ten fields: the hash is on the fast path.
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(self.gre_key ^ u64::from(self.ingress) << 33);
        h.write_u64(u64::from(self.src) | u64::from(self.dst) << 32);
        h.write_u64(
            u64::from(self.sport)
                | u64::from(self.dport) << 16
                | u64::from(self.protocol) << 32
                | u64::from(self.icmp_type) << 40
                | u64::from(self.icmp_code) << 48,
        );
    }
}

/// Marks a host id in [`FlowKey::ingress`].
pub const FROM_UNDERLAY: u32 = 1 << 31;
/// [`FlowKey::ingress`] of the internet's device.
pub const FROM_INTERNET: u32 = u32::MAX;

impl FlowKey {
    /// The key of a TCP or UDP packet read by the fast lane.
    #[inline]
    pub fn from_fields(ingress: u32, gre_key: u64, f: crate::wire::ipv4::QuickFields) -> FlowKey {
        FlowKey {
            ingress,
            gre_key,
            src: f.src,
            dst: f.dst,
            sport: f.sport,
            dport: f.dport,
            protocol: f.protocol,
            icmp_type: 0,
            icmp_code: 0,
        }
    }

    /// The key of a packet.
    pub fn new(ingress: u32, gre_key: u64, ip: &Ipv4Packet) -> FlowKey {
        let (sport, dport, icmp_type, icmp_code) = match ip.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport, 0, 0),
            L4::Icmp { kind, code, ident } => (ident, ident, kind, code),
            L4::Other | L4::None => (0, 0, 0, 0),
        };
        FlowKey {
            ingress,
            gre_key,
            src: ip.src.into(),
            dst: ip.dst.into(),
            sport,
            dport,
            protocol: ip.protocol,
            icmp_type,
            icmp_code,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    key: FlowKey,
    generation: u64,
    hit: Hit,
    stamp: u32,
    /// The spaces the decision depended on (what a topology change must leave untouched for
    /// the entry to be carried).
    deps: Deps,
}

// What an entry records of the spaces its decision depended on fits the slot's padding (a
// slot is as large as it was without it); a load balancer's ports in the NAT took one word.
const _: () = assert!(std::mem::size_of::<Option<Slot>>() == 144);

/// The cache.
pub struct FlowCache {
    slots: Box<[Option<Slot>]>,
    mask: usize,
    hasher: foldhash::fast::FixedState,
    clock: u32,
}

/// A cache hit: the decision and, for tracked flows, the connections to update (the sending
/// side's and the receiving side's, where local), with the packet's source as each sees it.
#[derive(Debug, Clone, Copy)]
pub struct Hit {
    /// The cached decision.
    pub decision: Decision,
    /// The tracked connections behind it.
    pub conns: [Option<ConnRef>; 2],
    /// The packet's source as the sending side's connection knows it.
    pub egress_src: Endpoint,
    /// The packet's source as the receiving side's connection knows it.
    pub ingress_src: Endpoint,
    /// The local instance the packets are for, if any (its counters).
    pub receiver: Option<InstanceId>,
}

impl FlowCache {
    /// A cache of `slots` entries (rounded up to a power of two, at least 2), its hash seeded
    /// with `seed`.
    pub fn new(slots: usize, seed: u64) -> FlowCache {
        let n = slots.max(2).next_power_of_two();
        FlowCache {
            slots: vec![None; n].into_boxed_slice(),
            mask: n - 1,
            hasher: foldhash::fast::FixedState::with_seed(seed ^ 0x666c_6f77),
            clock: 0,
        }
    }

    #[inline]
    fn set(&self, key: &FlowKey) -> usize {
        let mut h = self.hasher.build_hasher();
        key.hash(&mut h);
        (std::hash::Hasher::finish(&h) as usize) & self.mask & !1
    }

    /// The decision cached for `key` in this generation.
    #[inline]
    pub fn get(&mut self, key: &FlowKey, generation: u64) -> Option<Hit> {
        let i = self.set(key);
        self.clock = self.clock.wrapping_add(1);
        let clock = self.clock;
        for s in self.slots[i..i + 2].iter_mut().flatten() {
            if s.key == *key && s.generation == generation {
                s.stamp = clock;
                return Some(s.hit);
            }
        }
        None
    }

    /// The decision cached for `key` in this generation, the cache left as it is (a trace).
    pub fn peek(&self, key: &FlowKey, generation: u64) -> Option<Hit> {
        let i = self.set(key);
        let found = self.slots[i..i + 2].iter().flatten();
        found
            .filter(|s| s.key == *key && s.generation == generation)
            .map(|s| s.hit)
            .next()
    }

    /// Caches a decision that depended on the spaces `deps`, replacing the least recently
    /// used entry of the set.
    pub fn insert(&mut self, key: FlowKey, generation: u64, deps: Deps, mut hit: Hit) {
        self.clock = self.clock.wrapping_add(1);
        // One connection serving both sides is updated once per packet.
        if hit.conns[0].is_some() && hit.conns[0] == hit.conns[1] {
            hit.conns[1] = None;
        }
        let stamp = self.clock;
        self.place(Slot {
            key,
            generation,
            hit,
            stamp,
            deps,
        });
    }

    /// Puts `slot` in its set: over the entry of the same key, in a free slot, or over the
    /// entry of another generation or else the least recently used one.
    fn place(&mut self, slot: Slot) {
        let (key, generation) = (slot.key, slot.generation);
        let i = self.set(&key);
        let pair = &mut self.slots[i..i + 2];
        let victim = match (&pair[0], &pair[1]) {
            (Some(a), _) if a.key == key => 0,
            (_, Some(b)) if b.key == key => 1,
            (None, _) => 0,
            (_, None) => 1,
            (Some(a), Some(b)) => {
                if a.generation != generation
                    || (b.generation == generation && a.stamp.wrapping_sub(b.stamp) > u32::MAX / 2)
                {
                    0
                } else {
                    1
                }
            }
        };
        pair[victim] = Some(slot);
    }

    /// Carries the entries of generation `from` into generation `to` (a topology change):
    /// `carry` says what each entry's key, spaces and hit become in the new topology (ids
    /// renumbered), or `None` to leave it behind. An entry whose key is unchanged stays in
    /// its slot; the others are placed again, oldest first. Returns how many were carried.
    pub fn carry(
        &mut self,
        from: u64,
        to: u64,
        mut carry: impl FnMut(FlowKey, Deps, Hit) -> Option<(FlowKey, Deps, Hit)>,
    ) -> usize {
        let mut moved = Vec::new();
        for s in self.slots.iter_mut() {
            let Some(old) = s.take_if(|x| x.generation == from) else {
                continue;
            };
            let Some((key, deps, hit)) = carry(old.key, old.deps, old.hit) else {
                continue;
            };
            let new = Slot {
                key,
                generation: to,
                hit,
                stamp: old.stamp,
                deps,
            };
            if key == old.key {
                *s = Some(new);
            } else {
                moved.push(new);
            }
        }
        let clock = self.clock;
        moved.sort_by_key(|s| std::cmp::Reverse(clock.wrapping_sub(s.stamp)));
        for s in moved {
            self.place(s);
        }
        self.slots
            .iter()
            .flatten()
            .filter(|s| s.generation == to)
            .count()
    }

    /// The hits cached in `generation`.
    pub fn hits(&self, generation: u64) -> impl Iterator<Item = &Hit> {
        self.slots
            .iter()
            .flatten()
            .filter(move |s| s.generation == generation)
            .map(|s| &s.hit)
    }

    /// Forgets every entry whose hit `doomed` selects; returns how many.
    pub fn forget(&mut self, mut doomed: impl FnMut(&Hit) -> bool) -> usize {
        let mut n = 0;
        for s in self.slots.iter_mut() {
            if s.as_ref().is_some_and(|x| doomed(&x.hit)) {
                *s = None;
                n += 1;
            }
        }
        n
    }
}

impl std::fmt::Debug for FlowCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowCache")
            .field("slots", &self.slots.len())
            .finish()
    }
}
