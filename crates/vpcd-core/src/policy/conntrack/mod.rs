//! Connection tracking: what makes security groups stateful (docs/semantics.md, 2.7).
//!
//! An entry is one side of one connection: it belongs to a **port** (the local instance whose
//! groups admitted it) and holds the connection's two ends in a canonical order, each end
//! carrying its zone (a VPC's key, the basic network, the internet), so that tenants with
//! overlapping addresses never share an entry and two instances of one host never share
//! their state. The entry remembers which end opened the connection, so a packet's direction
//! is known. ICMP queries are keyed by their kind and requester as well, so that only the
//! matching reply from the responder belongs to a query's entry.
//!
//! TCP follows nf_conntrack's state table ([`tcp`]); timeouts are its defaults.
//!
//! The table is bounded per host (`max_entries`) and per owner (`max_per_owner`), the owner
//! being the end that opened the connection. Entries that are assured (TCP: and ESTABLISHED)
//! are protected from early eviction; when a bound is hit, the owner's own oldest unprotected
//! entry goes, or, when the host table is full and the owner holds fewer entries than the
//! heaviest owner, the heaviest owner's oldest entry ([`owners`]): a flood only evicts the
//! flooder, and an idle instance can always open a connection. Eviction allocates nothing.
//!
//! The data path only stamps `now` on an entry; [`Conntrack::sweep`] expires old ones, and a
//! lookup never returns an expired entry.

mod owners;
pub mod tcp;

use std::net::Ipv4Addr;

use hashbrown::HashMap;

use crate::reason::DropReason;
use crate::time::Timestamp;
use crate::wire::ipv4::{L4, TcpFlags, proto};
use owners::{Links, Owners};
use tcp::{Step, Tcp, TcpState};

/// Which connection-tracking zone an address belongs to: a VPC (by its GRE key), or one of the
/// shared address spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Zone(pub u64);

impl Zone {
    /// The zone of the VPC with this key.
    pub const fn vpc(key: u32) -> Zone {
        Zone(key as u64)
    }
}

/// One end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// Its zone.
    pub zone: Zone,
    /// Its address.
    pub addr: Ipv4Addr,
    /// Its port (TCP, UDP), the ICMP query's identifier, or 0.
    pub port: u16,
}

impl Endpoint {
    /// A placeholder endpoint (zone 0, 0.0.0.0, port 0).
    pub const NONE: Endpoint = Endpoint {
        zone: Zone(0),
        addr: Ipv4Addr::UNSPECIFIED,
        port: 0,
    };

    /// The address this end stands for, without its port.
    pub const fn owner(&self) -> Owner {
        Owner {
            zone: self.zone,
            addr: self.addr,
        }
    }
}

/// An address in its zone: a connection's owner (the end that opened it), and a port (the
/// local instance an entry belongs to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    /// Zone.
    pub zone: Zone,
    /// Address.
    pub addr: Ipv4Addr,
}

/// The kind of an ICMP query or reply (RFC 792, RFC 950): the query's type, and whether this
/// message is the query. `None` for every other type (errors and the rest).
pub const fn icmp_query(kind: u8) -> Option<(u8, bool)> {
    match kind {
        8 | 13 | 15 | 17 => Some((kind, true)),
        0 => Some((8, false)),
        14 | 16 | 18 => Some((kind - 1, false)),
        _ => None,
    }
}

/// An entry's key: its port, the protocol and the two ends in canonical order; for an ICMP
/// query also its kind and which end is the requester.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The local instance whose side this is.
    pub port: Owner,
    /// IP protocol.
    pub protocol: u8,
    /// For ICMP queries: the query's type, plus 0x80 when the requester is `high`; else 0.
    pub query: u8,
    /// The smaller end.
    pub low: Endpoint,
    /// The larger end.
    pub high: Endpoint,
}

impl ConnKey {
    /// The key of a packet from `src` to `dst` on `port`'s side; `None` for an ICMP message
    /// that is neither a query nor a reply (never tracked).
    pub fn of(port: Owner, protocol: u8, l4: &L4, src: Endpoint, dst: Endpoint) -> Option<ConnKey> {
        let (low, high) = if src <= dst { (src, dst) } else { (dst, src) };
        let query = match (protocol, l4) {
            (proto::ICMP, L4::Icmp { kind, .. }) => {
                let (request, is_query) = icmp_query(*kind)?;
                let requester = if is_query { src } else { dst };
                request
                    | if requester == high && low != high {
                        0x80
                    } else {
                        0
                    }
            }
            (proto::ICMP, _) => return None,
            _ => 0,
        };
        Some(ConnKey {
            port,
            protocol,
            query,
            low,
            high,
        })
    }
}

/// A packet's direction within its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the end that opened the connection.
    Original = 0,
    /// From the other end.
    Reply = 1,
}

/// Per-protocol state of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// TCP.
    Tcp(Tcp),
    /// UDP, an ICMP query, or another protocol: `replied` once the other end answered.
    Datagram {
        /// The reply direction has been seen.
        replied: bool,
    },
}

impl State {
    /// Protected from early eviction: assured, and for TCP ESTABLISHED.
    pub fn protected(&self) -> bool {
        match self {
            State::Tcp(t) => t.protected(),
            State::Datagram { replied } => *replied,
        }
    }
}

/// UDP timeout before a reply, seconds (nf_conntrack_udp_timeout).
pub const UDP_TIMEOUT: u64 = 30;
/// UDP timeout once both directions were seen (nf_conntrack_udp_timeout_stream).
pub const UDP_STREAM_TIMEOUT: u64 = 120;
/// ICMP query timeout (nf_conntrack_icmp_timeout).
pub const ICMP_TIMEOUT: u64 = 30;
/// Other protocols (nf_conntrack_generic_timeout).
pub const GENERIC_TIMEOUT: u64 = 600;

fn datagram_timeout(protocol: u8, replied: bool) -> u64 {
    match protocol {
        proto::UDP if replied => UDP_STREAM_TIMEOUT,
        proto::UDP => UDP_TIMEOUT,
        proto::ICMP => ICMP_TIMEOUT,
        _ => GENERIC_TIMEOUT,
    }
}

/// A tracked connection (one side of it).
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    /// Its key.
    pub key: ConnKey,
    /// The end that opened it.
    pub opener: Endpoint,
    /// The owner it counts against (the opener's address).
    pub owner: Owner,
    /// Protocol state.
    pub state: State,
    /// Last packet that refreshed it.
    pub last_seen: Timestamp,
    /// Creation time.
    pub created: Timestamp,
    /// How long it lives from `last_seen` without traffic, in milliseconds.
    pub timeout_ms: u64,
    /// Packets seen, by [`Direction`] (original, reply).
    pub packets: [u64; 2],
    /// Bytes seen at the IP level, by [`Direction`].
    pub bytes: [u64; 2],
    serial: u32,
    live: bool,
}

impl Conn {
    /// The direction of a packet sent by `src`.
    pub fn direction(&self, src: &Endpoint) -> Direction {
        if *src == self.opener {
            Direction::Original
        } else {
            Direction::Reply
        }
    }

    /// True when a TCP packet from `src` with these transport fields would reopen this
    /// closed connection: it then belongs to a new connection, opened by `src`.
    pub fn reopened_by(&self, src: &Endpoint, l4: &L4) -> bool {
        match (self.state, l4) {
            (State::Tcp(mut t), L4::Tcp { flags, .. }) if flags.0 & TcpFlags::SYN != 0 => {
                t.step(self.direction(src), *flags) == Step::Reopen
            }
            _ => false,
        }
    }

    /// True when it has outlived its timeout at `now` (a sweep or a lookup removes it).
    pub fn expired(&self, now: Timestamp) -> bool {
        now.millis().saturating_sub(self.last_seen.millis()) > self.timeout_ms
    }

    /// Milliseconds it has left to live at `now` without more traffic (0 once expired).
    pub fn left_ms(&self, now: Timestamp) -> u64 {
        let idle = now.millis().saturating_sub(self.last_seen.millis());
        self.timeout_ms.saturating_sub(idle)
    }

    /// Milliseconds since it was created.
    pub fn age_ms(&self, now: Timestamp) -> u64 {
        now.millis().saturating_sub(self.created.millis())
    }

    /// The end that did not open it.
    pub fn peer(&self) -> Endpoint {
        if self.opener == self.key.low {
            self.key.high
        } else {
            self.key.low
        }
    }
}

/// A handle to a live entry, valid while the entry is: a slot and the serial it had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    slot: u32,
    serial: u32,
}

/// What a packet of a tracked connection did to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Track {
    /// Accepted; the entry is updated (or, for a packet the state table ignores, unchanged).
    Accepted(Direction),
    /// Accepted, and the entry ended (TCP: a RST before any reply).
    Ended,
    /// The packet opens a new connection over a closed one: the old entry is gone and the
    /// caller must treat the packet as new.
    Reopen,
    /// The packet is invalid for the connection's state.
    Invalid(DropReason),
    /// The entry expired or was evicted.
    Gone,
}

/// How a new entry starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// A TCP SYN, or a datagram's first packet, from the opener.
    New,
    /// A TCP connection picked up mid-stream (ESTABLISHED); `reply` when the packet comes from
    /// the far end (the connection was opened by its destination).
    Pickup {
        /// The packet is the reply direction's.
        reply: bool,
    },
}

/// Counts the table keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConntrackStats {
    /// Entries created.
    pub created: u64,
    /// Entries evicted to make room.
    pub evicted: u64,
    /// Entries expired.
    pub expired: u64,
    /// New connections refused because the host's table was full.
    pub refused_full: u64,
    /// New connections refused because the owner's share was full.
    pub refused_instance: u64,
}

/// The table's hash: seeded by the pipeline, so that a run replays exactly.
type Hasher = foldhash::fast::FixedState;

/// The connection table.
#[derive(Clone)]
pub struct Conntrack {
    map: HashMap<ConnKey, u32, Hasher>,
    slots: Vec<Conn>,
    links: Vec<Links>,
    free: Vec<u32>,
    owners: Owners,
    max_entries: u32,
    max_per_owner: u32,
    stats: ConntrackStats,
}

impl Conntrack {
    /// A table holding at most `max_entries` connections, `max_per_owner` per owner, its hash
    /// seeded with `seed` (the daemon passes a random one: no hash flooding).
    pub fn new(max_entries: u32, max_per_owner: u32, seed: u64) -> Conntrack {
        Conntrack {
            map: HashMap::with_hasher(Hasher::with_seed(seed)),
            slots: Vec::new(),
            links: Vec::new(),
            free: Vec::new(),
            owners: Owners::new(seed ^ 0x6f77_6e65),
            max_entries: max_entries.max(1),
            max_per_owner: max_per_owner.max(1),
            stats: ConntrackStats::default(),
        }
    }

    /// New bounds (a reload): they apply to the next connections; entries above a lowered
    /// bound stay until they end or are evicted.
    pub fn set_limits(&mut self, max_entries: u32, max_per_owner: u32) {
        self.max_entries = max_entries.max(1);
        self.max_per_owner = max_per_owner.max(1);
    }

    /// The bounds: (per host, per owner).
    pub fn limits(&self) -> (u32, u32) {
        (self.max_entries, self.max_per_owner)
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no connection is tracked.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Counters.
    pub fn stats(&self) -> ConntrackStats {
        self.stats
    }

    /// Zeroes the counts (the entries stay).
    pub fn clear_stats(&mut self) {
        self.stats = ConntrackStats::default();
    }

    /// Entries counted against `owner` (the tests' view of the owner limits).
    #[cfg(test)]
    pub fn owned_by(&self, owner: &Owner) -> u32 {
        self.owners.count(owner)
    }

    /// The live entry for `key`, if any; an expired entry is removed and not returned.
    pub fn lookup(&mut self, key: &ConnKey, now: Timestamp) -> Option<ConnRef> {
        let slot = *self.map.get(key)?;
        let c = &self.slots[slot as usize];
        if c.expired(now) {
            self.stats.expired += 1;
            self.remove_slot(slot);
            return None;
        }
        Some(ConnRef {
            slot,
            serial: c.serial,
        })
    }

    /// The live entry of `key`; reads only (an ICMP error's quote, or the Elastic IP reply
    /// check, removes and refreshes nothing).
    pub fn find_live(&self, key: &ConnKey, now: Timestamp) -> Option<&Conn> {
        let c = &self.slots[*self.map.get(key)? as usize];
        (!c.expired(now)).then_some(c)
    }

    /// True when the entry behind `r` is live and a packet from `src` with `l4` would go on
    /// with it (not reopen it): what the fast lane checks before it updates any entry.
    pub fn continues(&self, r: ConnRef, src: &Endpoint, l4: &L4, now: Timestamp) -> bool {
        self.get(r)
            .is_some_and(|c| !c.expired(now) && !c.reopened_by(src, l4))
    }

    /// The entry behind a handle, if the handle is still valid.
    pub fn get(&self, r: ConnRef) -> Option<&Conn> {
        self.slots
            .get(r.slot as usize)
            .filter(|c| c.live && c.serial == r.serial)
    }

    /// Applies a packet from `src` to a tracked connection: validates TCP flags against the
    /// state, advances the state and stamps `now`.
    pub fn track(&mut self, r: ConnRef, src: &Endpoint, l4: &L4, now: Timestamp) -> Track {
        let Some(c) = self
            .slots
            .get(r.slot as usize)
            .filter(|c| c.live && c.serial == r.serial)
        else {
            return Track::Gone;
        };
        if c.expired(now) {
            self.stats.expired += 1;
            self.remove_slot(r.slot);
            return Track::Gone;
        }
        let dir = c.direction(src);
        let before = c.state.protected();
        let c = &mut self.slots[r.slot as usize];
        match (&mut c.state, l4) {
            // The common case, settled first: data or a bare ACK on an assured, established
            // connection changes nothing but the time.
            (State::Tcp(t), L4::Tcp { flags, .. })
                if t.protected() && flags.0 & 0x3f & !0x08 == 0x10 =>
            {
                c.last_seen = now;
            }
            (State::Tcp(t), L4::Tcp { flags, .. }) => {
                if !tcp::valid_flags(*flags) {
                    return Track::Invalid(DropReason::TcpInvalid);
                }
                match t.step(dir, *flags) {
                    Step::Update { timeout } => {
                        c.last_seen = now;
                        c.timeout_ms = timeout * 1000;
                    }
                    Step::Unrefreshed => {}
                    Step::Invalid => return Track::Invalid(DropReason::TcpInvalid),
                    Step::End => {
                        self.remove_slot(r.slot);
                        return Track::Ended;
                    }
                    Step::Reopen => {
                        self.remove_slot(r.slot);
                        return Track::Reopen;
                    }
                }
            }
            (State::Datagram { replied }, _) => {
                *replied |= dir == Direction::Reply;
                c.last_seen = now;
                c.timeout_ms = datagram_timeout(c.key.protocol, *replied) * 1000;
            }
            // A packet without a transport header only refreshes the entry.
            (State::Tcp(_), _) => c.last_seen = now,
        }
        let after = c.state.protected();
        if before != after {
            let owner = c.owner;
            self.owners.relist(&owner, r.slot, &mut self.links, after);
        }
        Track::Accepted(dir)
    }

    /// Counts a packet of `len` bytes going `dir` on the entry behind `r` (what
    /// [`Conntrack::track`] accepted, or the packet that opened it); a stale handle counts
    /// nothing. Two additions: cheap enough for every packet.
    #[inline]
    pub fn account(&mut self, r: ConnRef, dir: Direction, len: usize) {
        if let Some(c) = self
            .slots
            .get_mut(r.slot as usize)
            .filter(|c| c.live && c.serial == r.serial)
        {
            c.packets[dir as usize] += 1;
            c.bytes[dir as usize] += len as u64;
        }
    }

    /// Opens the entry `key`, opened by `opener` and counted against `owner`. Makes room as
    /// docs/semantics.md 2.7 says: the owner at its share evicts its own oldest unprotected
    /// entry; a full table evicts the owner's own, or, when the owner holds fewer entries than
    /// the heaviest owner, the heaviest owner's oldest. Refuses when nothing may be evicted.
    pub fn open(
        &mut self,
        key: ConnKey,
        opener: Endpoint,
        owner: Owner,
        how: Open,
        now: Timestamp,
    ) -> Result<ConnRef, DropReason> {
        if let Some(old) = self.lookup(&key, now) {
            // A stale entry for the same key (only reachable through reopen races): replace.
            self.remove_slot(old.slot);
        }
        self.make_room(&owner)?;
        let (state, timeout) = match (key.protocol, how) {
            (proto::TCP, Open::New) => {
                let (t, timeout) = Tcp::new(TcpState::SynSent, Direction::Original);
                (State::Tcp(t), timeout)
            }
            (proto::TCP, Open::Pickup { reply }) => {
                let dir = if reply {
                    Direction::Reply
                } else {
                    Direction::Original
                };
                let (t, timeout) = Tcp::new(TcpState::Established, dir);
                (State::Tcp(t), timeout)
            }
            (p, _) => (
                State::Datagram { replied: false },
                datagram_timeout(p, false),
            ),
        };
        let conn = Conn {
            key,
            opener,
            owner,
            state,
            last_seen: now,
            created: now,
            timeout_ms: timeout * 1000,
            packets: [0; 2],
            bytes: [0; 2],
            serial: 0,
            live: true,
        };
        let slot = self.insert(conn);
        self.owners
            .add(owner, slot, &mut self.links, state.protected());
        self.stats.created += 1;
        Ok(ConnRef {
            slot,
            serial: self.slots[slot as usize].serial,
        })
    }

    fn insert(&mut self, mut conn: Conn) -> u32 {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(conn);
                self.links.push(Links::NONE);
                (self.slots.len() - 1) as u32
            }
        };
        conn.serial = self.slots[slot as usize].serial.wrapping_add(1);
        self.slots[slot as usize] = conn;
        self.map.insert(conn.key, slot);
        slot
    }

    fn make_room(&mut self, owner: &Owner) -> Result<(), DropReason> {
        if self.owners.count(owner) >= self.max_per_owner {
            let Some(victim) = self.owners.oldest(owner, false) else {
                self.stats.refused_instance += 1;
                return Err(DropReason::ConntrackInstanceLimit);
            };
            self.evict(victim);
        }
        if self.map.len() as u32 >= self.max_entries {
            let mine = self.owners.count(owner);
            let victim = match self.owners.heaviest() {
                Some((heavy, most)) if mine < most => self
                    .owners
                    .oldest(&heavy, false)
                    .or_else(|| self.owners.oldest(&heavy, true)),
                _ => self.owners.oldest(owner, false),
            };
            let Some(victim) = victim else {
                self.stats.refused_full += 1;
                return Err(DropReason::ConntrackFull);
            };
            self.evict(victim);
        }
        Ok(())
    }

    fn evict(&mut self, slot: u32) {
        self.remove_slot(slot);
        self.stats.evicted += 1;
    }

    /// Removes every expired entry; returns how many.
    pub fn sweep(&mut self, now: Timestamp) -> usize {
        let expired: Vec<u32> = self
            .map
            .values()
            .copied()
            .filter(|&s| self.slots[s as usize].expired(now))
            .collect();
        for &s in &expired {
            self.remove_slot(s);
        }
        self.stats.expired += expired.len() as u64;
        expired.len()
    }

    /// Removes every entry `f` selects (an instance moved away: its connections end).
    pub fn remove_if(&mut self, mut f: impl FnMut(&Conn) -> bool) -> usize {
        let doomed: Vec<u32> = self
            .map
            .values()
            .copied()
            .filter(|&s| f(&self.slots[s as usize]))
            .collect();
        for &s in &doomed {
            self.remove_slot(s);
        }
        doomed.len()
    }

    /// Iterates over live entries.
    pub fn iter(&self) -> impl Iterator<Item = &Conn> {
        self.map.values().map(|&s| &self.slots[s as usize])
    }

    /// Iterates over live entries with their handles.
    pub fn iter_refs(&self) -> impl Iterator<Item = (ConnRef, &Conn)> {
        self.map.values().map(|&slot| {
            let c = &self.slots[slot as usize];
            let r = ConnRef {
                slot,
                serial: c.serial,
            };
            (r, c)
        })
    }

    fn remove_slot(&mut self, slot: u32) {
        let c = &mut self.slots[slot as usize];
        if !c.live {
            return;
        }
        c.live = false;
        let (key, owner) = (c.key, c.owner);
        self.map.remove(&key);
        self.owners.remove(&owner, slot, &mut self.links);
        self.free.push(slot);
    }
}

impl std::fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conntrack")
            .field("len", &self.len())
            .field("stats", &self.stats)
            .finish()
    }
}

#[cfg(test)]
mod tests;
