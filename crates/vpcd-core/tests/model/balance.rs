//! The reference model's load balancers (docs/semantics.md 2.11), written from the
//! specification with linear scans: which listener a packet to a VIP meets, the backends a
//! new connection may go to (healthy ones of nonzero weight, or every one of nonzero weight
//! when none is healthy), the schedulers' picks, and each host's sessions.

use std::net::Ipv4Addr;

use vpcd_core::DropReason;
use vpcd_core::policy::balance::{BackendName, Health};
use vpcd_core::topology::{Network, Scheduler, Space, Topology};

/// An address and port.
pub type Addr = (Ipv4Addr, u16);

/// One session, on the client's host.
#[derive(Debug, Clone)]
pub struct Session {
    pub host: usize,
    pub space: Space,
    pub protocol: u8,
    pub client: Addr,
    pub vip: Addr,
    pub backend: Addr,
    pub backend_instance: usize,
    pub closing: bool,
}

/// What the model expects of a client's packet to an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// No load balancer of the client's network has this VIP: the route decides.
    NotBalanced,
    /// Dropped for this reason on the client's host.
    Drop(DropReason),
    /// The VIP answers the echo request itself.
    Echo,
    /// To this backend instance, at this address and port.
    Backend(usize, Addr),
}

/// The model's load-balancing state: every host's sessions, every host's round robins.
#[derive(Debug, Default)]
pub struct Balance {
    pub sessions: Vec<Session>,
    wrr: Vec<((usize, usize, usize), Vec<i64>)>,
    pub seed: u64,
}

impl Balance {
    pub fn new(seed: u64) -> Balance {
        Balance {
            seed,
            ..Balance::default()
        }
    }

    /// A packet of `client` (an instance on `host`) from `src` to `dst`; `ends` for a TCP
    /// FIN or RST, `echo` for an ICMP echo request.
    #[allow(clippy::too_many_arguments)]
    pub fn packet(
        &mut self,
        t: &Topology,
        health: &Health,
        (host, client): (usize, usize),
        protocol: u8,
        (src, dst): (Addr, Addr),
        ends: bool,
        echo: bool,
    ) -> Expect {
        let inst = &t.instances[client];
        let space = inst.space();
        if let Some(s) = self.sessions.iter_mut().find(|s| {
            (s.host, s.space, s.protocol, s.client, s.vip) == (host, space, protocol, src, dst)
        }) {
            s.closing |= ends;
            return Expect::Backend(s.backend_instance, s.backend);
        }
        let Some((li, lb)) = t
            .load_balancers
            .iter()
            .enumerate()
            .find(|(_, l)| l.space() == space && l.vip == dst.0)
        else {
            return Expect::NotBalanced;
        };
        if let (Network::Basic { tenant }, Network::Basic { tenant: mine }) =
            (&lb.network, &inst.network)
            && tenant != mine
        {
            return Expect::Drop(DropReason::LbOtherTenant);
        }
        let listener = lb
            .listeners
            .iter()
            .enumerate()
            .find(|(_, l)| l.protocol.number() == protocol && l.port == dst.1);
        let Some((ln, l)) = listener.filter(|_| !echo) else {
            return if echo {
                Expect::Echo
            } else {
                Expect::Drop(DropReason::LbNoListener)
            };
        };
        let name = |b: usize| BackendName {
            lb: lb.name.clone(),
            protocol: l.protocol,
            port: l.port,
            instance: t.instances[l.backends[b].instance.index()].name.clone(),
            backend_port: l.backends[b].port,
        };
        let weighted: Vec<usize> = (0..l.backends.len())
            .filter(|&b| l.backends[b].weight > 0)
            .collect();
        let healthy: Vec<usize> = weighted
            .iter()
            .copied()
            .filter(|&b| health.get(&name(b)) != Some(&false))
            .collect();
        let eligible = if healthy.is_empty() {
            weighted
        } else {
            healthy
        };
        if eligible.is_empty() {
            return Expect::Drop(DropReason::LbNoBackend);
        }
        let w = |b: usize| i64::from(l.backends[b].weight);
        let addr = |b: usize| {
            (
                t.instances[l.backends[b].instance.index()].ip,
                l.backends[b].port,
            )
        };
        // A backend that already has a connection from this client address and port (another
        // listener's, another VIP's) would take the new one for it: it is not a choice.
        let in_use = |b: usize| {
            self.sessions.iter().any(|s| {
                (s.host, s.space, s.protocol, s.client, s.backend)
                    == (host, space, protocol, src, addr(b))
            })
        };
        let eligible: Vec<usize> = eligible.into_iter().filter(|&b| !in_use(b)).collect();
        if eligible.is_empty() {
            return Expect::Drop(DropReason::LbTupleInUse);
        }
        let pick = match l.scheduler {
            Scheduler::Wrr => {
                let key = (host, li, ln);
                if !self.wrr.iter().any(|(k, _)| *k == key) {
                    self.wrr.push((key, vec![0; l.backends.len()]));
                }
                let cur = &mut self.wrr.iter_mut().find(|(k, _)| *k == key).unwrap().1;
                let total: i64 = eligible.iter().map(|&b| w(b)).sum();
                for &b in &eligible {
                    cur[b] += w(b);
                }
                // The largest, the first of equals.
                let best = eligible.iter().copied().fold(eligible[0], |best, b| {
                    if cur[b] > cur[best] { b } else { best }
                });
                cur[best] -= total;
                best
            }
            Scheduler::Wlc => {
                let open = |b: usize| {
                    let a = addr(b);
                    self.sessions
                        .iter()
                        .filter(|s| {
                            s.host == host
                                && !s.closing
                                && s.protocol == protocol
                                && s.backend == a
                                && s.space == space
                        })
                        .count() as i64
                };
                // The fewest open per weight, the first of equals: a/wa < b/wb.
                eligible.iter().copied().fold(eligible[0], |best, b| {
                    if open(b) * w(best) < open(best) * w(b) {
                        b
                    } else {
                        best
                    }
                })
            }
            Scheduler::Hash => {
                let total: i64 = eligible.iter().map(|&b| w(b)).sum();
                let mut h =
                    (u64::from(u32::from(src.0)) ^ self.seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                h ^= h >> 29;
                let mut point = (h % total as u64) as i64;
                let mut pick = eligible[0];
                for &b in &eligible {
                    if point < w(b) {
                        pick = b;
                        break;
                    }
                    point -= w(b);
                }
                pick
            }
        };
        let backend = addr(pick);
        let backend_instance = l.backends[pick].instance.index();
        self.sessions.push(Session {
            host,
            space,
            protocol,
            client: src,
            vip: dst,
            backend,
            backend_instance,
            // A stray FIN or RST opens a session already closing.
            closing: ends,
        });
        Expect::Backend(backend_instance, backend)
    }

    /// The session a backend's packet to a client belongs to, on `host`: its VIP.
    pub fn reply(
        &self,
        host: usize,
        space: Space,
        protocol: u8,
        backend: Addr,
        client: Addr,
    ) -> Option<Addr> {
        self.sessions
            .iter()
            .find(|s| {
                (s.host, s.space, s.protocol, s.backend, s.client)
                    == (host, space, protocol, backend, client)
            })
            .map(|s| s.vip)
    }
}
