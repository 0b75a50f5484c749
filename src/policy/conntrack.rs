//! Connection tracking: what makes security groups stateful.
//!
//! One entry per connection, found from either direction: the key is the connection's two
//! endpoints in a canonical order, each endpoint carrying its zone (the VPC's key, so that
//! tenants with overlapping addresses never share an entry). The entry remembers which endpoint
//! opened the connection, so a packet's direction is known.
//!
//! Timeouts are Linux nf_conntrack's defaults (CLOUD-SEMANTICS). The TCP state machine follows
//! nf_conntrack's states and flag validation, without its sequence-window tracking.
//!
//! The table is bounded twice: per host (`max_entries`) and per instance (`max_per_owner`), so
//! that one instance's SYN flood cannot take another's slots. When a bound is hit, the owner's
//! (or the host's) oldest entry that is not yet established is evicted; established entries are
//! never evicted, and when nothing can be evicted the new connection is refused and counted.
//!
//! The data path only stamps `now` on an entry; [`Conntrack::sweep`] expires old ones, and a
//! lookup never returns an expired entry.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use hashbrown::HashMap;

use crate::reason::DropReason;
use crate::time::Timestamp;
use crate::wire::ipv4::{L4, TcpFlags, proto};

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
    /// Its port (TCP, UDP), echo identifier (ICMP), or 0.
    pub port: u16,
}

impl Endpoint {
    /// A placeholder endpoint (zone 0, 0.0.0.0, port 0).
    pub const NONE: Endpoint = Endpoint {
        zone: Zone(0),
        addr: Ipv4Addr::UNSPECIFIED,
        port: 0,
    };
}

/// A connection, independent of direction: endpoints in canonical order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// IP protocol.
    pub protocol: u8,
    /// The smaller endpoint.
    pub low: Endpoint,
    /// The larger endpoint.
    pub high: Endpoint,
}

impl ConnKey {
    /// The key of the connection a packet from `src` to `dst` belongs to.
    pub fn new(protocol: u8, src: Endpoint, dst: Endpoint) -> ConnKey {
        let (low, high) = if src <= dst { (src, dst) } else { (dst, src) };
        ConnKey {
            protocol,
            low,
            high,
        }
    }
}

/// A packet's direction within its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the endpoint that opened the connection.
    Original,
    /// From the other endpoint.
    Reply,
}

/// TCP states, as nf_conntrack names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    /// SYN seen.
    SynSent,
    /// SYN-ACK seen.
    SynRecv,
    /// Handshake complete.
    Established,
    /// One side sent FIN.
    FinWait,
    /// The FIN was acknowledged; the other side may still send.
    CloseWait,
    /// Both sides sent FIN.
    LastAck,
    /// The last FIN was acknowledged.
    TimeWait,
    /// Reset.
    Close,
}

impl TcpState {
    /// nf_conntrack's default timeout for the state, in seconds.
    pub const fn timeout_secs(self) -> u64 {
        match self {
            TcpState::SynSent => 120,
            TcpState::SynRecv => 60,
            TcpState::Established => 432_000,
            TcpState::FinWait => 120,
            TcpState::CloseWait => 60,
            TcpState::LastAck => 30,
            TcpState::TimeWait => 120,
            TcpState::Close => 10,
        }
    }
}

/// Per-protocol state of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// TCP; `fin_from` is the direction of the first FIN.
    Tcp {
        /// State.
        state: TcpState,
        /// Who sent the first FIN.
        fin_from: Option<Direction>,
    },
    /// UDP, ICMP echo, or another protocol: `replied` once the reply direction was seen.
    Datagram {
        /// The reply direction has been seen.
        replied: bool,
    },
}

/// UDP timeout before a reply, seconds (nf_conntrack_udp_timeout).
pub const UDP_TIMEOUT: u64 = 30;
/// UDP timeout once both directions were seen (nf_conntrack_udp_timeout_stream).
pub const UDP_STREAM_TIMEOUT: u64 = 120;
/// ICMP echo timeout (nf_conntrack_icmp_timeout).
pub const ICMP_TIMEOUT: u64 = 30;
/// Other protocols (nf_conntrack_generic_timeout).
pub const GENERIC_TIMEOUT: u64 = 600;

/// A tracked connection.
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    /// Its key.
    pub key: ConnKey,
    /// The endpoint that opened it.
    pub opener: Endpoint,
    /// Protocol state.
    pub state: State,
    /// Last packet seen.
    pub last_seen: Timestamp,
    /// Creation time.
    pub created: Timestamp,
    /// The local instance it is accounted to.
    pub owner: Owner,
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

    /// Established (TCP) or replied (other protocols): never evicted, and the longer UDP
    /// timeout applies. nf_conntrack calls this "assured".
    pub fn is_established(&self) -> bool {
        match self.state {
            State::Tcp { state, .. } => !matches!(state, TcpState::SynSent | TcpState::SynRecv),
            State::Datagram { replied } => replied,
        }
    }

    /// How long the entry lives without traffic, in milliseconds.
    pub fn timeout_ms(&self) -> u64 {
        1000 * match self.state {
            State::Tcp { state, .. } => state.timeout_secs(),
            State::Datagram { replied } => match self.key.protocol {
                proto::UDP if replied => UDP_STREAM_TIMEOUT,
                proto::UDP => UDP_TIMEOUT,
                proto::ICMP => ICMP_TIMEOUT,
                _ => GENERIC_TIMEOUT,
            },
        }
    }

    fn expired(&self, now: Timestamp) -> bool {
        now.millis().saturating_sub(self.last_seen.millis()) > self.timeout_ms()
    }
}

/// The local instance a connection counts against: its zone and address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    /// Zone.
    pub zone: Zone,
    /// Address.
    pub addr: Ipv4Addr,
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
    /// Accepted; the entry is updated.
    Accepted(Direction),
    /// The packet is invalid for the connection's state.
    Invalid(DropReason),
    /// The packet opens a new connection over a closed one (SYN after TIME_WAIT or CLOSE):
    /// the old entry is gone and the caller must treat the packet as new.
    Reopen,
    /// The entry expired or was evicted.
    Gone,
}

/// Counts the table keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConntrackStats {
    /// Entries created.
    pub created: u64,
    /// Non-established entries evicted to make room.
    pub evicted: u64,
    /// Entries expired.
    pub expired: u64,
    /// New connections refused because the host's table was full.
    pub refused_full: u64,
    /// New connections refused because the instance's share was full.
    pub refused_instance: u64,
}

#[derive(Debug, Default)]
struct OwnerSlots {
    count: u32,
    /// Entries that were not established when created, oldest first; stale handles (evicted,
    /// expired, since established) are skipped lazily and pruned when they pile up.
    young: VecDeque<ConnRef>,
}

type Hasher = foldhash::fast::RandomState;

/// The connection table.
pub struct Conntrack {
    map: HashMap<ConnKey, u32, Hasher>,
    slots: Vec<Conn>,
    free: Vec<u32>,
    owners: HashMap<Owner, OwnerSlots, Hasher>,
    max_entries: u32,
    max_per_owner: u32,
    stats: ConntrackStats,
}

impl Conntrack {
    /// A table holding at most `max_entries` connections, `max_per_owner` per instance. The
    /// hash is seeded at random (no hash flooding).
    pub fn new(max_entries: u32, max_per_owner: u32) -> Conntrack {
        Conntrack {
            map: HashMap::with_hasher(Hasher::default()),
            slots: Vec::new(),
            free: Vec::new(),
            owners: HashMap::with_hasher(Hasher::default()),
            max_entries: max_entries.max(1),
            max_per_owner: max_per_owner.max(1),
            stats: ConntrackStats::default(),
        }
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

    /// Entries accounted to `owner`.
    pub fn owned_by(&self, owner: &Owner) -> u32 {
        self.owners.get(owner).map_or(0, |o| o.count)
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
            .get_mut(r.slot as usize)
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
        match (&mut c.state, l4) {
            // The common case, settled first: data or a bare ACK on an established
            // connection (only ACK and PSH set) changes nothing but the time.
            (
                State::Tcp {
                    state: TcpState::Established,
                    ..
                },
                L4::Tcp { flags, .. },
            ) if flags.0 & 0x3f & !TcpFlags::PSH == TcpFlags::ACK => {}
            (State::Tcp { state, fin_from }, L4::Tcp { flags, .. }) => {
                match tcp_transition(*state, *fin_from, dir, *flags) {
                    Step::Next(s, f) => {
                        *state = s;
                        *fin_from = f;
                    }
                    Step::Reopen => {
                        self.remove_slot(r.slot);
                        return Track::Reopen;
                    }
                    Step::Invalid => return Track::Invalid(DropReason::TcpInvalid),
                }
            }
            (State::Datagram { replied }, _) => {
                if dir == Direction::Reply {
                    *replied = true;
                }
            }
            // A non-first fragment carries no flags: it only refreshes the entry.
            (State::Tcp { .. }, _) => {}
        }
        c.last_seen = now;
        Track::Accepted(dir)
    }

    /// Whether a packet may open a connection: TCP needs a bare SYN (flags validated).
    pub fn may_open(l4: &L4) -> Result<(), DropReason> {
        match l4 {
            L4::Tcp { flags, .. } => {
                if !valid_tcp_flags(*flags) {
                    Err(DropReason::TcpInvalid)
                } else if flags.has(TcpFlags::SYN) && !flags.has(TcpFlags::ACK) {
                    Ok(())
                } else {
                    Err(DropReason::TcpNoConnection)
                }
            }
            _ => Ok(()),
        }
    }

    /// Opens a connection from `src` to `dst`, accounted to `owner`. Makes room by evicting
    /// the oldest non-established entry (of the owner when the owner is at its cap, of the
    /// host otherwise); refuses when nothing can be evicted.
    pub fn open(
        &mut self,
        protocol: u8,
        src: Endpoint,
        dst: Endpoint,
        owner: Owner,
        now: Timestamp,
    ) -> Result<ConnRef, DropReason> {
        let key = ConnKey::new(protocol, src, dst);
        if let Some(old) = self.lookup(&key, now) {
            // A stale entry for the same key (only reachable through reopen races): replace.
            self.remove_slot(old.slot);
        }
        if self.owned_by(&owner) >= self.max_per_owner && !self.evict_oldest_of(owner, now) {
            self.stats.refused_instance += 1;
            return Err(DropReason::ConntrackInstanceLimit);
        }
        if self.map.len() as u32 >= self.max_entries && !self.evict_oldest(now) {
            self.stats.refused_full += 1;
            return Err(DropReason::ConntrackFull);
        }
        let state = if protocol == proto::TCP {
            State::Tcp {
                state: TcpState::SynSent,
                fin_from: None,
            }
        } else {
            State::Datagram { replied: false }
        };
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Conn {
                    key,
                    opener: src,
                    state,
                    last_seen: now,
                    created: now,
                    owner,
                    serial: 0,
                    live: false,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let c = &mut self.slots[slot as usize];
        let serial = c.serial.wrapping_add(1);
        *c = Conn {
            key,
            opener: src,
            state,
            last_seen: now,
            created: now,
            owner,
            serial,
            live: true,
        };
        self.map.insert(key, slot);
        let r = ConnRef { slot, serial };
        let o = self.owners.entry(owner).or_default();
        o.count += 1;
        o.young.push_back(r);
        if o.young.len() > 2 * o.count as usize + 16 {
            let slots = &self.slots;
            o.young.retain(|y| {
                let c = &slots[y.slot as usize];
                c.live && c.serial == y.serial && !c.is_established()
            });
        }
        self.stats.created += 1;
        Ok(r)
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

    fn evict_oldest_of(&mut self, owner: Owner, now: Timestamp) -> bool {
        match self.oldest_young(owner, now) {
            Some(r) => {
                self.remove_slot(r.slot);
                self.stats.evicted += 1;
                true
            }
            None => false,
        }
    }

    fn evict_oldest(&mut self, now: Timestamp) -> bool {
        let owners: Vec<Owner> = self.owners.keys().copied().collect();
        let candidates: Vec<ConnRef> = owners
            .into_iter()
            .filter_map(|o| self.oldest_young(o, now))
            .collect();
        let oldest = candidates
            .into_iter()
            .min_by_key(|r| (self.slots[r.slot as usize].created, r.slot));
        match oldest {
            Some(r) => {
                self.remove_slot(r.slot);
                self.stats.evicted += 1;
                true
            }
            None => false,
        }
    }

    /// The owner's oldest entry that is live and not established; drops stale handles met on
    /// the way. Expired entries found are removed too.
    fn oldest_young(&mut self, owner: Owner, now: Timestamp) -> Option<ConnRef> {
        loop {
            let front = *self.owners.get(&owner)?.young.front()?;
            let c = &self.slots[front.slot as usize];
            if c.live && c.serial == front.serial && !c.is_established() {
                if c.expired(now) {
                    self.stats.expired += 1;
                    self.remove_slot(front.slot);
                    continue;
                }
                return Some(front);
            }
            if let Some(o) = self.owners.get_mut(&owner) {
                o.young.pop_front();
            }
        }
    }

    fn remove_slot(&mut self, slot: u32) {
        let c = &mut self.slots[slot as usize];
        if !c.live {
            return;
        }
        c.live = false;
        let (key, owner) = (c.key, c.owner);
        self.map.remove(&key);
        self.free.push(slot);
        if let Some(o) = self.owners.get_mut(&owner) {
            o.count -= 1;
            if o.count == 0 {
                self.owners.remove(&owner);
            }
        }
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

/// nf_conntrack's valid flag combinations (tcp_valid_flags): once PSH and URG are set aside,
/// SYN, SYN+ACK, RST, RST+ACK, FIN+ACK and ACK; a SYN never carries PSH. Everything else
/// (SYN+RST, SYN+FIN, FIN without ACK, no flags at all, ...) is a packet no real connection
/// sends. ECE and CWR are ignored.
pub fn valid_tcp_flags(flags: TcpFlags) -> bool {
    const URG: u8 = 0x20;
    let f = flags.0 & 0x3f;
    let base = f & !(TcpFlags::PSH | URG);
    let syn_psh = f & TcpFlags::SYN != 0 && f & TcpFlags::PSH != 0;
    !syn_psh
        && matches!(
            base,
            TcpFlags::SYN
                | 0x12 // SYN+ACK
                | TcpFlags::RST
                | 0x14 // RST+ACK
                | 0x11 // FIN+ACK
                | TcpFlags::ACK
        )
}

enum Step {
    Next(TcpState, Option<Direction>),
    Reopen,
    Invalid,
}

/// The TCP state machine. `dir` is the packet's direction.
fn tcp_transition(
    state: TcpState,
    fin_from: Option<Direction>,
    dir: Direction,
    flags: TcpFlags,
) -> Step {
    use Direction::*;
    use TcpState::*;
    if !valid_tcp_flags(flags) {
        return Step::Invalid;
    }
    let syn = flags.has(TcpFlags::SYN);
    let ack = flags.has(TcpFlags::ACK);
    let fin = flags.has(TcpFlags::FIN);
    let rst = flags.has(TcpFlags::RST);
    let same = |s| Step::Next(s, fin_from);
    if rst {
        return same(Close);
    }
    match state {
        SynSent => match (dir, syn, ack) {
            (Original, true, false) => same(SynSent),
            (Reply, true, _) => same(SynRecv),
            _ => Step::Invalid,
        },
        SynRecv => match (dir, syn, ack, fin) {
            (Original, false, true, false) => same(Established),
            (_, false, true, true) => Step::Next(FinWait, Some(dir)),
            (Original, true, false, _) => same(SynRecv),
            (Reply, true, true, _) => same(SynRecv),
            (Reply, false, true, false) => same(SynRecv),
            _ => Step::Invalid,
        },
        Established => match (dir, syn, fin) {
            (_, false, true) => Step::Next(FinWait, Some(dir)),
            (_, false, false) => same(Established),
            // The server retransmits its SYN-ACK when the last ACK of the handshake was lost.
            (Reply, true, false) if ack => same(Established),
            _ => Step::Invalid,
        },
        FinWait | CloseWait | LastAck => {
            if syn {
                return Step::Invalid;
            }
            let other = fin_from != Some(dir);
            match (state, fin, other) {
                (FinWait | CloseWait, true, true) => same(LastAck),
                (FinWait, false, true) => same(CloseWait),
                (LastAck, false, false) => same(TimeWait),
                _ => same(state),
            }
        }
        TimeWait | Close => {
            if syn && !ack {
                Step::Reopen
            } else if syn {
                Step::Invalid
            } else {
                same(state)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Endpoint = Endpoint {
        zone: Zone(1001),
        addr: Ipv4Addr::new(10, 0, 1, 10),
        port: 40000,
    };
    const B: Endpoint = Endpoint {
        zone: Zone(1001),
        addr: Ipv4Addr::new(10, 0, 2, 20),
        port: 80,
    };
    const OWNER: Owner = Owner {
        zone: Zone(1001),
        addr: Ipv4Addr::new(10, 0, 1, 10),
    };

    fn tcp(flags: u8) -> L4 {
        L4::Tcp {
            sport: 0,
            dport: 0,
            flags: TcpFlags(flags),
        }
    }

    fn t(s: u64) -> Timestamp {
        Timestamp::from_secs(s)
    }

    fn state(ct: &Conntrack, r: ConnRef) -> TcpState {
        match ct.get(r).unwrap().state {
            State::Tcp { state, .. } => state,
            _ => unreachable!(),
        }
    }

    #[test]
    fn key_is_the_same_from_both_directions_and_zoned() {
        assert_eq!(ConnKey::new(6, A, B), ConnKey::new(6, B, A));
        let other_tenant = Endpoint {
            zone: Zone(2002),
            ..A
        };
        assert_ne!(ConnKey::new(6, A, B), ConnKey::new(6, other_tenant, B));
    }

    #[test]
    fn tcp_handshake_data_and_close() {
        let mut ct = Conntrack::new(100, 100);
        let r = ct.open(proto::TCP, A, B, OWNER, t(0)).unwrap();
        assert_eq!(state(&ct, r), TcpState::SynSent);
        assert_eq!(
            ct.track(r, &B, &tcp(0x12), t(1)),
            Track::Accepted(Direction::Reply)
        );
        assert_eq!(state(&ct, r), TcpState::SynRecv);
        assert_eq!(
            ct.track(r, &A, &tcp(0x10), t(1)),
            Track::Accepted(Direction::Original)
        );
        assert_eq!(state(&ct, r), TcpState::Established);
        assert!(ct.get(r).unwrap().is_established());
        ct.track(r, &B, &tcp(0x18), t(2));
        assert_eq!(state(&ct, r), TcpState::Established);
        ct.track(r, &A, &tcp(0x11), t(3));
        assert_eq!(state(&ct, r), TcpState::FinWait);
        ct.track(r, &B, &tcp(0x10), t(3));
        assert_eq!(state(&ct, r), TcpState::CloseWait);
        ct.track(r, &B, &tcp(0x11), t(4));
        assert_eq!(state(&ct, r), TcpState::LastAck);
        ct.track(r, &A, &tcp(0x10), t(4));
        assert_eq!(state(&ct, r), TcpState::TimeWait);
        // TIME_WAIT lasts 120 s.
        assert!(ct.lookup(&ConnKey::new(6, A, B), t(4 + 120)).is_some());
        assert!(ct.lookup(&ConnKey::new(6, A, B), t(4 + 121)).is_none());
    }

    #[test]
    fn rst_closes_and_close_times_out_in_10s() {
        let mut ct = Conntrack::new(100, 100);
        let r = ct.open(proto::TCP, A, B, OWNER, t(0)).unwrap();
        ct.track(r, &B, &tcp(0x14), t(1));
        assert_eq!(state(&ct, r), TcpState::Close);
        assert!(ct.lookup(&ConnKey::new(6, A, B), t(11)).is_some());
        assert!(ct.lookup(&ConnKey::new(6, A, B), t(12)).is_none());
    }

    #[test]
    fn invalid_flags_are_refused_in_every_state() {
        for bad in [
            0x03, /* SYN+FIN */
            0x06, /* SYN+RST */
            0x01, /* FIN alone */
            0x00, 0x08, /* PSH */
            0x0a, /* SYN+PSH */
        ] {
            assert!(!valid_tcp_flags(TcpFlags(bad)), "{bad:#x}");
            assert_eq!(Conntrack::may_open(&tcp(bad)), Err(DropReason::TcpInvalid));
        }
        let mut ct = Conntrack::new(100, 100);
        let r = ct.open(proto::TCP, A, B, OWNER, t(0)).unwrap();
        assert_eq!(
            ct.track(r, &A, &tcp(0x03), t(0)),
            Track::Invalid(DropReason::TcpInvalid)
        );
        // No ACK after the handshake: a SYN from the client in ESTABLISHED.
        ct.track(r, &B, &tcp(0x12), t(0));
        ct.track(r, &A, &tcp(0x10), t(0));
        assert_eq!(
            ct.track(r, &A, &tcp(0x02), t(0)),
            Track::Invalid(DropReason::TcpInvalid)
        );
        // ACK before SYN-ACK is invalid.
        let r2 = ct.open(proto::TCP, B, A, OWNER, t(0)).unwrap_or(r);
        let _ = r2;
    }

    #[test]
    fn only_a_bare_syn_opens() {
        assert_eq!(Conntrack::may_open(&tcp(0x02)), Ok(()));
        assert_eq!(
            Conntrack::may_open(&tcp(0x12)),
            Err(DropReason::TcpNoConnection)
        );
        assert_eq!(
            Conntrack::may_open(&tcp(0x10)),
            Err(DropReason::TcpNoConnection)
        );
        assert_eq!(Conntrack::may_open(&L4::Udp { sport: 1, dport: 2 }), Ok(()));
    }

    #[test]
    fn syn_after_time_wait_reopens() {
        let mut ct = Conntrack::new(100, 100);
        let r = ct.open(proto::TCP, A, B, OWNER, t(0)).unwrap();
        ct.track(r, &B, &tcp(0x14), t(0));
        assert_eq!(ct.track(r, &A, &tcp(0x02), t(1)), Track::Reopen);
        assert!(ct.get(r).is_none());
        assert!(ct.is_empty());
    }

    #[test]
    fn udp_timeouts_30s_then_120s_once_replied() {
        let mut ct = Conntrack::new(100, 100);
        let key = ConnKey::new(proto::UDP, A, B);
        let l4 = L4::Udp { sport: 1, dport: 2 };
        let r = ct.open(proto::UDP, A, B, OWNER, t(0)).unwrap();
        assert!(ct.lookup(&key, t(30)).is_some());
        assert!(ct.lookup(&key, t(31)).is_none());
        let r2 = ct.open(proto::UDP, A, B, OWNER, t(100)).unwrap();
        assert_ne!(r, r2);
        assert_eq!(
            ct.track(r2, &B, &l4, t(101)),
            Track::Accepted(Direction::Reply)
        );
        assert!(ct.get(r2).unwrap().is_established());
        assert!(ct.lookup(&key, t(101 + 120)).is_some());
        assert!(ct.lookup(&key, t(101 + 121)).is_none());
    }

    #[test]
    fn icmp_times_out_in_30s_and_stale_handles_are_gone() {
        let mut ct = Conntrack::new(100, 100);
        let l4 = L4::Icmp {
            kind: 8,
            code: 0,
            ident: 7,
        };
        let r = ct.open(proto::ICMP, A, B, OWNER, t(0)).unwrap();
        assert_eq!(ct.track(r, &A, &l4, t(31)), Track::Gone);
        assert!(ct.get(r).is_none());
    }

    #[test]
    fn full_table_evicts_oldest_non_established_and_never_established() {
        let mut ct = Conntrack::new(3, 100);
        let port = |p| Endpoint { port: p, ..A };
        let est = ct.open(proto::TCP, port(1), B, OWNER, t(0)).unwrap();
        ct.track(est, &B, &tcp(0x12), t(0));
        ct.track(est, &port(1), &tcp(0x10), t(0));
        let young1 = ct.open(proto::TCP, port(2), B, OWNER, t(1)).unwrap();
        let young2 = ct.open(proto::TCP, port(3), B, OWNER, t(2)).unwrap();
        let newer = ct.open(proto::TCP, port(4), B, OWNER, t(3)).unwrap();
        assert!(ct.get(est).is_some(), "established survives");
        assert!(ct.get(young1).is_none(), "oldest young is evicted");
        assert!(ct.get(young2).is_some());
        assert!(ct.get(newer).is_some());
        assert_eq!(ct.stats().evicted, 1);
        // Only established entries left: refuse and count.
        for (r, p) in [(young2, 3), (newer, 4)] {
            ct.track(r, &B, &tcp(0x12), t(3));
            ct.track(r, &port(p), &tcp(0x10), t(3));
        }
        assert_eq!(
            ct.open(proto::TCP, port(5), B, OWNER, t(4)),
            Err(DropReason::ConntrackFull)
        );
        assert_eq!(ct.stats().refused_full, 1);
        assert_eq!(ct.len(), 3);
    }

    #[test]
    fn a_flooding_instance_evicts_only_its_own_entries() {
        let mut ct = Conntrack::new(1000, 10);
        let victim = Owner {
            zone: Zone(7),
            addr: Ipv4Addr::new(10, 0, 0, 7),
        };
        let v = Endpoint {
            zone: Zone(7),
            addr: victim.addr,
            port: 1,
        };
        let victim_conn = ct.open(proto::TCP, v, B, victim, t(0)).unwrap();
        // The victim's connection is still in its handshake: the most evictable kind.
        for p in 0..500 {
            let _ = ct.open(proto::TCP, Endpoint { port: p, ..A }, B, OWNER, t(1));
        }
        assert_eq!(ct.owned_by(&OWNER), 10);
        assert!(ct.get(victim_conn).is_some());
        assert_eq!(ct.stats().evicted, 490);
    }

    #[test]
    fn owner_with_only_established_entries_is_refused() {
        let mut ct = Conntrack::new(1000, 1);
        let r = ct.open(proto::UDP, A, B, OWNER, t(0)).unwrap();
        ct.track(r, &B, &L4::Udp { sport: 0, dport: 0 }, t(0));
        let other = Endpoint { port: 9, ..A };
        assert_eq!(
            ct.open(proto::UDP, other, B, OWNER, t(0)),
            Err(DropReason::ConntrackInstanceLimit)
        );
        assert_eq!(ct.stats().refused_instance, 1);
    }

    #[test]
    fn sweep_expires_and_accounting_follows() {
        let mut ct = Conntrack::new(100, 100);
        ct.open(proto::UDP, A, B, OWNER, t(0)).unwrap();
        ct.open(proto::ICMP, A, B, OWNER, t(20)).unwrap();
        assert_eq!(ct.sweep(t(40)), 1);
        assert_eq!(ct.owned_by(&OWNER), 1);
        assert_eq!(ct.sweep(t(60)), 1);
        assert_eq!(ct.owned_by(&OWNER), 0);
        assert!(ct.is_empty());
    }
}
