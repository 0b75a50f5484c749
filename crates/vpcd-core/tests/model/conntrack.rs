//! The model's connection tracking (docs/semantics.md 2.7): a plain vector scanned linearly,
//! written from the specification (no code of `vpcd_core::policy::conntrack`). The TCP machine is
//! nf_conntrack's `tcp_conntracks` table written out literally, plus the special rules of 2.7,
//! each in a branch of its own.
#![allow(non_upper_case_globals)]

use std::net::Ipv4Addr;

use vpcd_core::DropReason;

use super::wire::{ICMP, TCP, UDP};

/// One end of a connection: (zone, address, port). ICMP queries use the identifier as port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub zone: u64,
    pub addr: Ipv4Addr,
    pub port: u16,
}

/// An ICMP query's part of a key: the query kind (8 echo, 13 timestamp, 15 information,
/// 17 address mask) and the requester's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub kind: u8,
    pub requester: Endpoint,
}

/// What an entry is found by: protocol, port (the instance the side belongs to), the two ends
/// (unordered), and for ICMP queries the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub proto: u8,
    pub port: usize,
    pub a: Endpoint,
    pub b: Endpoint,
    pub query: Option<Query>,
}

impl Key {
    /// Equal as keys: the ends unordered.
    pub fn same(&self, o: &Key) -> bool {
        self.proto == o.proto
            && self.port == o.port
            && self.query == o.query
            && ((self.a == o.a && self.b == o.b) || (self.a == o.b && self.b == o.a))
    }
}

/// The query kind of an ICMP type and whether the type is the query (else the reply); `None`
/// for the types that have no entry.
pub fn icmp_query(ty: u8) -> Option<(u8, bool)> {
    match ty {
        8 | 13 | 15 | 17 => Some((ty, true)),
        0 => Some((8, false)),
        14 | 16 | 18 => Some((ty - 1, false)),
        _ => None,
    }
}

/// The query part of the key of an ICMP packet of type `ty` from `src` to `dst`: a query is
/// keyed with its source as requester, a reply with its destination.
pub fn query_part(ty: u8, src: Endpoint, dst: Endpoint) -> Option<Query> {
    icmp_query(ty).map(|(kind, query)| Query {
        kind,
        requester: if query { src } else { dst },
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Original,
    Reply,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    None,
    SynSent,
    SynRecv,
    Established,
    FinWait,
    CloseWait,
    LastAck,
    TimeWait,
    Close,
    SynSent2,
}

impl TcpState {
    /// The column of `tcp_conntracks`.
    fn column(self) -> usize {
        self as usize
    }

    fn timeout_secs(self) -> u64 {
        match self {
            TcpState::None => 0,
            TcpState::SynSent | TcpState::SynSent2 => 120,
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

/// A cell of `tcp_conntracks`: a state, invalid (sIV) or ignore (sIG).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cell {
    S(TcpState),
    Iv,
    Ig,
}

const sIV: Cell = Cell::Iv;
const sIG: Cell = Cell::Ig;
const sNO: Cell = Cell::S(TcpState::None);
const sSS: Cell = Cell::S(TcpState::SynSent);
const sSR: Cell = Cell::S(TcpState::SynRecv);
const sES: Cell = Cell::S(TcpState::Established);
const sFW: Cell = Cell::S(TcpState::FinWait);
const sCW: Cell = Cell::S(TcpState::CloseWait);
const sLA: Cell = Cell::S(TcpState::LastAck);
const sTW: Cell = Cell::S(TcpState::TimeWait);
const sCL: Cell = Cell::S(TcpState::Close);
const sS2: Cell = Cell::S(TcpState::SynSent2);

/// nf_conntrack's `tcp_conntracks[direction][flag class][old state]`. Flag classes: syn,
/// synack, fin, ack, rst, none. Columns: sNO, sSS, sSR, sES, sFW, sCW, sLA, sTW, sCL, sS2.
#[rustfmt::skip]
const TCP_CONNTRACKS: [[[Cell; 10]; 6]; 2] = [
    // ORIGINAL
    [
        /* syn    */ [sSS, sSS, sIG, sIG, sIG, sIG, sIG, sSS, sSS, sS2],
        /* synack */ [sIV, sIV, sSR, sIV, sIV, sIV, sIV, sIV, sIV, sSR],
        /* fin    */ [sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV],
        /* ack    */ [sES, sIV, sES, sES, sCW, sCW, sTW, sTW, sCL, sIV],
        /* rst    */ [sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL],
        /* none   */ [sIV; 10],
    ],
    // REPLY
    [
        /* syn    */ [sIV, sS2, sIV, sIV, sIV, sIV, sIV, sSS, sIV, sS2],
        /* synack */ [sIV, sSR, sIG, sIG, sIG, sIG, sIG, sIG, sIG, sSR],
        /* fin    */ [sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV],
        /* ack    */ [sIV, sIG, sSR, sES, sCW, sCW, sTW, sTW, sCL, sIG],
        /* rst    */ [sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL],
        /* none   */ [sIV; 10],
    ],
];

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;
pub const ECE: u8 = 0x40;
pub const CWR: u8 = 0x80;

const CLASS_SYN: usize = 0;
const CLASS_SYNACK: usize = 1;
const CLASS_FIN: usize = 2;
const CLASS_ACK: usize = 3;
const CLASS_RST: usize = 4;
const CLASS_NONE: usize = 5;

/// The flags with PSH, ECE and CWR ignored.
fn significant(raw: u8) -> u8 {
    raw & !(PSH | ECE | CWR)
}

/// nf_conntrack's `tcp_valid_flags`: valid in some state.
pub fn valid_flags(raw: u8) -> bool {
    const VALID: [u8; 9] = [
        SYN,
        SYN | URG,
        SYN | ACK,
        RST,
        RST | ACK,
        FIN | ACK,
        FIN | ACK | URG,
        ACK,
        ACK | URG,
    ];
    VALID.contains(&significant(raw))
}

/// A valid SYN without ACK: what opens a TCP connection.
pub fn opens_tcp(raw: u8) -> bool {
    valid_flags(raw) && significant(raw) & !URG == SYN
}

/// A pure ACK (with or without PSH or URG): a pickup candidate.
pub fn pickup_tcp(raw: u8) -> bool {
    valid_flags(raw) && significant(raw) & !URG == ACK
}

/// The flag class: RST if set; else SYN+ACK, SYN, FIN, ACK, none, in that order.
fn class(raw: u8) -> usize {
    if raw & RST != 0 {
        CLASS_RST
    } else if raw & SYN != 0 && raw & ACK != 0 {
        CLASS_SYNACK
    } else if raw & SYN != 0 {
        CLASS_SYN
    } else if raw & FIN != 0 {
        CLASS_FIN
    } else if raw & ACK != 0 {
        CLASS_ACK
    } else {
        CLASS_NONE
    }
}

#[derive(Debug, Clone)]
pub struct Entry {
    /// `key.a` is the opener's end: packets from it go in the original direction.
    pub key: Key,
    pub last_seen: u64,
    /// A packet of the reply direction was accepted.
    pub replied: bool,
    pub assured: bool,
    pub tcp: TcpState,
    /// The connection went through SYN_SENT2 (simultaneous open).
    pub simultaneous: bool,
    /// The connection once entered FIN_WAIT.
    pub fin_seen: bool,
    /// The last packet accepted (updating the entry or ignored): its direction and class.
    pub last: Option<(Dir, usize)>,
    /// A client SYN was ignored in LAST_ACK: the server's next ACK is its challenge ACK.
    pub challenge: bool,
    /// TCP: the timeout the last refreshing packet set, seconds.
    pub timeout_s: u64,
    /// The entry's place in its owner's order (opened, or last became (un)protected).
    pub order: u64,
}

impl Entry {
    pub fn opener(&self) -> Endpoint {
        self.key.a
    }

    /// A TCP packet from `src` with these flags would reopen this closed entry (it then
    /// belongs to a new connection, opened by `src`).
    pub fn reopened_by(&self, src: Endpoint, flags: u8) -> bool {
        let dir = if self.key.a == src {
            Dir::Original
        } else {
            Dir::Reply
        };
        self.key.proto == TCP && apply_tcp(&mut self.clone(), dir, flags, 0) == Applied::Reopen
    }

    /// The owner: the opener's (zone, address).
    pub fn owner(&self) -> (u64, Ipv4Addr) {
        (self.key.a.zone, self.key.a.addr)
    }

    /// The timeout: for TCP, the one the last refreshing packet set (2.7); for the others,
    /// that of the replied flag. SPEC: an entry is live up to and including its timeout.
    fn timeout_ms(&self) -> u64 {
        let secs = match self.key.proto {
            TCP => self.timeout_s,
            UDP if self.replied => 120,
            UDP => 30,
            ICMP => 30,
            _ => 600,
        };
        secs * 1000
    }

    /// Milliseconds left before expiry (negative once expired).
    pub fn slack(&self, now: u64) -> i64 {
        self.timeout_ms() as i64 - now.saturating_sub(self.last_seen) as i64
    }

    pub fn live(&self, now: u64) -> bool {
        now.saturating_sub(self.last_seen) <= self.timeout_ms()
    }

    /// Protected from eviction: assured and, for TCP, ESTABLISHED.
    /// SPEC: expiry changes nothing here: an expired entry keeps its protection, counts towards
    /// the limits and is evicted by the same rules (the model has no sweep: an expired entry
    /// goes when a packet of its key finds it, or by eviction).
    pub fn protected(&self) -> bool {
        self.assured && (self.key.proto != TCP || self.tcp == TcpState::Established)
    }
}

/// What a packet does to an existing entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Accepted,
    /// Passes, changes nothing.
    Ignored,
    /// A retransmitted SYN in SYN_SENT: passes, the entry is not refreshed.
    NotRefreshed,
    Invalid,
    /// The entry is removed and the packet is new traffic.
    Reopen,
    /// A RST before any reply: the entry is removed, the RST passes.
    Removed,
}

/// How a new entry starts.
#[derive(Debug, Clone, Copy)]
pub struct Opening {
    pub key: Key,
    pub tcp: TcpState,
    /// The packet itself went in the reply direction (a reverse pickup).
    pub replied: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Table {
    pub entries: Vec<Entry>,
    clock: u64,
    pub max_entries: usize,
    pub max_per_owner: usize,
}

impl Table {
    pub fn new(max_entries: u32, max_per_owner: u32) -> Table {
        Table {
            max_entries: max_entries as usize,
            max_per_owner: max_per_owner as usize,
            ..Table::default()
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Any entry of the key, live or not, and without touching it.
    pub fn peek(&self, key: &Key) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key.same(key))
    }

    /// A live entry of the key (nothing removed, nothing refreshed): ICMP errors' quotes and
    /// the Elastic IP reply check.
    pub fn find_live(&self, key: &Key, now: u64) -> Option<&Entry> {
        self.peek(key).filter(|e| e.live(now))
    }

    /// The entry of a packet's key with the packet's direction (`src` is the packet's source
    /// end); an expired entry found is removed.
    pub fn lookup(&mut self, key: &Key, src: Endpoint, now: u64) -> Option<(usize, Dir)> {
        let i = self.entries.iter().position(|e| e.key.same(key))?;
        if !self.entries[i].live(now) {
            self.entries.remove(i);
            return None;
        }
        let dir = if self.entries[i].key.a == src {
            Dir::Original
        } else {
            Dir::Reply
        };
        Some((i, dir))
    }

    pub fn remove(&mut self, i: usize) {
        self.entries.remove(i);
    }

    /// Applies a packet (its TCP flags for TCP) to entry `i`.
    pub fn apply(&mut self, i: usize, dir: Dir, flags: Option<u8>, now: u64) -> Applied {
        let was_protected = self.entries[i].protected();
        let e = &mut self.entries[i];
        let applied = if e.key.proto == TCP {
            apply_tcp(e, dir, flags.unwrap_or(0), now)
        } else {
            if dir == Dir::Reply && !e.replied {
                e.replied = true;
                e.assured = true;
            }
            e.last_seen = now;
            Applied::Accepted
        };
        if applied == Applied::Accepted && self.entries[i].protected() != was_protected {
            let t = self.tick();
            self.entries[i].order = t;
        }
        applied
    }

    fn count(&self, owner: (u64, Ipv4Addr)) -> usize {
        self.entries.iter().filter(|e| e.owner() == owner).count()
    }

    /// The oldest entry of `owner`, unprotected ones only if `unprotected`.
    fn oldest(&self, owner: (u64, Ipv4Addr), unprotected: bool) -> Option<usize> {
        (0..self.entries.len())
            .filter(|&i| self.entries[i].owner() == owner)
            .filter(|&i| !unprotected || !self.entries[i].protected())
            .min_by_key(|&i| self.entries[i].order)
    }

    /// The owner holding the most entries; ties: the smallest zone, then address.
    fn heaviest(&self) -> Option<(u64, Ipv4Addr)> {
        let mut owners: Vec<(u64, Ipv4Addr)> = self.entries.iter().map(|e| e.owner()).collect();
        owners.sort();
        owners.dedup();
        owners
            .into_iter()
            .max_by_key(|&o| (self.count(o), std::cmp::Reverse(o)))
    }

    /// Opens an entry, evicting as the limits say; the reason when it may not.
    pub fn open(&mut self, o: Opening, now: u64) -> Result<Evicted, DropReason> {
        let owner = (o.key.a.zone, o.key.a.addr);
        let mut evicted = Evicted::Nothing;
        if self.count(owner) >= self.max_per_owner {
            let i = self
                .oldest(owner, true)
                .ok_or(DropReason::ConntrackInstanceLimit)?;
            self.entries.remove(i);
            evicted = Evicted::OwnAtItsLimit;
        }
        if self.entries.len() >= self.max_entries {
            let h = self.heaviest().expect("a full table has owners");
            let i = if self.count(owner) >= self.count(h) {
                evicted = Evicted::OwnAtTheHostLimit;
                self.oldest(owner, true).ok_or(DropReason::ConntrackFull)?
            } else if let Some(i) = self.oldest(h, true) {
                evicted = Evicted::Heaviest;
                i
            } else {
                evicted = Evicted::HeaviestProtected;
                self.oldest(h, false).unwrap()
            };
            self.entries.remove(i);
        }
        let order = self.tick();
        self.entries.push(Entry {
            key: o.key,
            last_seen: now,
            replied: o.replied,
            assured: false,
            tcp: o.tcp,
            simultaneous: false,
            fin_seen: false,
            last: None,
            challenge: false,
            // A pickup (ESTABLISHED) has seen no reply yet: 300 s.
            timeout_s: if o.tcp == TcpState::Established {
                300
            } else {
                o.tcp.timeout_secs()
            },
            order,
        });
        Ok(evicted)
    }
}

/// Which entry an opening evicted (for the coverage report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evicted {
    Nothing,
    OwnAtItsLimit,
    OwnAtTheHostLimit,
    Heaviest,
    HeaviestProtected,
}

/// The TCP machine: the table, then the special rules of 2.7, one branch per rule.
fn apply_tcp(e: &mut Entry, dir: Dir, raw: u8, now: u64) -> Applied {
    if !valid_flags(raw) {
        return Applied::Invalid;
    }
    let class = class(raw);
    let old = e.tcp;
    let mut new = match TCP_CONNTRACKS[dir as usize][class][old.column()] {
        Cell::Iv => return Applied::Invalid,
        Cell::Ig => return ignored(e, dir, class),
        Cell::S(s) => s,
    };
    // A SYN_SENT result from TIME_WAIT or CLOSE: reopen, or ignore.
    if new == TcpState::SynSent && matches!(old, TcpState::TimeWait | TcpState::Close) {
        if e.fin_seen || e.last == Some((dir, CLASS_RST)) {
            return Applied::Reopen;
        }
        return ignored(e, dir, class);
    }
    // The server's challenge ACK to a client SYN ignored in LAST_ACK is no last ACK.
    if old == TcpState::LastAck
        && new == TcpState::TimeWait
        && class == CLASS_ACK
        && e.challenge
        && matches!(e.last, Some((d, c)) if c == CLASS_SYN && d != dir)
    {
        e.challenge = false;
        return Applied::NotRefreshed;
    }
    // Simultaneous open: through SYN_SENT2 and SYN/ACK to SYN_RECV, where an ACK from the
    // reply direction establishes.
    if new == TcpState::SynSent2 {
        e.simultaneous = true;
    }
    if new == TcpState::SynRecv && e.simultaneous && dir == Dir::Reply && class == CLASS_ACK {
        new = TcpState::Established;
    }
    let replied_before = e.replied;
    e.tcp = new;
    e.last = Some((dir, class));
    if old != new && new == TcpState::FinWait {
        e.fin_seen = true;
    }
    if dir == Dir::Reply {
        e.replied = true;
    }
    if !replied_before && class == CLASS_RST {
        return Applied::Removed;
    }
    if !replied_before && class == CLASS_SYN && old == TcpState::SynSent {
        return Applied::NotRefreshed;
    }
    if replied_before
        && matches!(old, TcpState::SynRecv | TcpState::Established)
        && new == TcpState::Established
    {
        e.assured = true;
    }
    e.timeout_s = if class == CLASS_RST {
        TcpState::Close.timeout_secs()
    } else if !replied_before && new == TcpState::Established {
        new.timeout_secs().min(300)
    } else {
        new.timeout_secs()
    };
    e.last_seen = now;
    Applied::Accepted
}

/// An ignored packet: it passes, the state stays, the entry is not refreshed; it is the last
/// packet accepted, and from the reply direction a reply seen. A client SYN ignored in
/// LAST_ACK expects a challenge ACK.
fn ignored(e: &mut Entry, dir: Dir, class: usize) -> Applied {
    e.challenge = class == CLASS_SYN && dir == Dir::Original && e.tcp == TcpState::LastAck;
    e.last = Some((dir, class));
    if dir == Dir::Reply {
        e.replied = true;
    }
    Applied::Ignored
}
