//! The model's connection tracking: a plain vector scanned linearly, written from the
//! specification (no code of `vpcd::policy::conntrack`). The state machine keeps one branch
//! per clause of the specification, even where two clauses lead to the same state.
#![allow(clippy::if_same_then_else)]

use std::net::Ipv4Addr;

use super::wire::{ICMP, TCP, UDP};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub zone: u64,
    pub addr: Ipv4Addr,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Original,
    Reply,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    SynSent,
    SynRecv,
    Established,
    FinWait,
    CloseWait,
    LastAck,
    TimeWait,
    Close,
}

impl TcpState {
    fn timeout_secs(self) -> u64 {
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

#[derive(Debug, Clone)]
pub struct Conn {
    pub proto: u8,
    pub orig: Endpoint,
    pub reply: Endpoint,
    pub last_seen: u64,
    pub replied: bool,
    pub tcp: TcpState,
    pub fin_from: Dir,
}

impl Conn {
    fn timeout_ms(&self) -> u64 {
        let secs = match self.proto {
            TCP => self.tcp.timeout_secs(),
            UDP => {
                if self.replied {
                    120
                } else {
                    30
                }
            }
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
}

/// What a packet does to an existing connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Accepted,
    Invalid,
    Reopen,
}

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const URG: u8 = 0x20;

/// The flags without PSH and URG, if the combination is valid.
pub fn tcp_flags(raw: u8) -> Option<u8> {
    let f = raw & 0x3f;
    if f & SYN != 0 && f & PSH != 0 {
        return None;
    }
    let g = f & !(PSH | URG);
    [SYN, SYN | ACK, RST, RST | ACK, FIN | ACK, ACK]
        .contains(&g)
        .then_some(g)
}

/// True for a valid SYN without ACK (what opens a TCP connection).
pub fn opens_tcp(raw: u8) -> bool {
    tcp_flags(raw) == Some(SYN)
}

#[derive(Debug, Clone, Default)]
pub struct Table {
    pub conns: Vec<Conn>,
}

impl Table {
    fn same_key(c: &Conn, proto: u8, a: Endpoint, b: Endpoint) -> bool {
        c.proto == proto && ((c.orig == a && c.reply == b) || (c.orig == b && c.reply == a))
    }

    /// The live connection of (proto, {src, dst}), with the packet's direction.
    pub fn find_live(
        &self,
        proto: u8,
        src: Endpoint,
        dst: Endpoint,
        now: u64,
    ) -> Option<(usize, Dir)> {
        let i = self
            .conns
            .iter()
            .position(|c| Self::same_key(c, proto, src, dst) && c.live(now))?;
        let dir = if self.conns[i].orig == src {
            Dir::Original
        } else {
            Dir::Reply
        };
        Some((i, dir))
    }

    /// Any entry of the key, live or not.
    pub fn find_any(&self, proto: u8, a: Endpoint, b: Endpoint) -> Option<&Conn> {
        self.conns.iter().find(|c| Self::same_key(c, proto, a, b))
    }

    pub fn remove(&mut self, i: usize) {
        self.conns.swap_remove(i);
    }

    /// Opens a connection in the packet's direction, replacing any expired one of the same key.
    pub fn open(&mut self, proto: u8, src: Endpoint, dst: Endpoint, now: u64) {
        self.conns.retain(|c| !Self::same_key(c, proto, src, dst));
        self.conns.push(Conn {
            proto,
            orig: src,
            reply: dst,
            last_seen: now,
            replied: false,
            tcp: TcpState::SynSent,
            fin_from: Dir::Original,
        });
    }

    /// Applies a packet (TCP flags when TCP) to connection `i`.
    pub fn apply(&mut self, i: usize, dir: Dir, raw_flags: Option<u8>, now: u64) -> Applied {
        let c = &mut self.conns[i];
        if c.proto != TCP {
            if dir == Dir::Reply {
                c.replied = true;
            }
            c.last_seen = now;
            return Applied::Accepted;
        }
        let Some(f) = tcp_flags(raw_flags.unwrap_or(0)) else {
            return Applied::Invalid;
        };
        let syn = f & SYN != 0;
        let ack = f & ACK != 0;
        let fin = f & FIN != 0;
        let orig = dir == Dir::Original;
        use TcpState::*;
        let next = if f & RST != 0 {
            Some(Close)
        } else {
            match c.tcp {
                SynSent => {
                    if orig && f == SYN {
                        Some(SynSent)
                    } else if !orig && syn {
                        Some(SynRecv)
                    } else {
                        None
                    }
                }
                SynRecv => {
                    if orig && f == ACK {
                        Some(Established)
                    } else if f == FIN | ACK {
                        c.fin_from = dir;
                        Some(FinWait)
                    } else if orig && f == SYN {
                        Some(SynRecv)
                    } else if !orig && (f == SYN | ACK || f == ACK) {
                        Some(SynRecv)
                    } else {
                        None
                    }
                }
                Established => {
                    if fin && !syn {
                        c.fin_from = dir;
                        Some(FinWait)
                    } else if !syn && !fin {
                        Some(Established)
                    } else if !orig && f == SYN | ACK {
                        Some(Established)
                    } else {
                        None
                    }
                }
                FinWait | CloseWait | LastAck => {
                    if syn {
                        None
                    } else {
                        let other = dir != c.fin_from;
                        Some(match c.tcp {
                            FinWait | CloseWait if other && fin => LastAck,
                            FinWait if other && !fin => CloseWait,
                            LastAck if !other && !fin => TimeWait,
                            s => s,
                        })
                    }
                }
                TimeWait | Close => {
                    if syn && !ack {
                        return Applied::Reopen;
                    } else if syn {
                        None
                    } else {
                        Some(c.tcp)
                    }
                }
            }
        };
        match next {
            Some(s) => {
                c.tcp = s;
                c.last_seen = now;
                Applied::Accepted
            }
            None => Applied::Invalid,
        }
    }
}
