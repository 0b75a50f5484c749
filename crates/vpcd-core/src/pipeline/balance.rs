//! The load-balancing stage (docs/semantics.md 2.11), on the client's host: a connection's
//! first packet to VIP:port picks a backend among the listener's healthy ones and opens a
//! session; every packet of it is rewritten to that backend (destination address and port),
//! and its replies back to the VIP (source address and port), so that the client only ever
//! sees the VIP and the backend the client's real address. Then the packet goes on as if
//! sent to the backend: the client's egress rules judge what it sent (VIP and listener
//! port), the backend's ingress ACL and groups what it receives (the client's address, the
//! backend port). A public load balancer's Elastic IP is balanced the same way on the
//! internet gateway host.
//!
//! Load-balanced packets are never cached: a session is state the flow key does not hold.

use std::net::Ipv4Addr;

use super::Decision;
use super::decide::{Decider, INTERNET, Origin, ports, zone_of};
use super::route::Target;
use super::trace::Stage;
use crate::policy::balance::{Forward, Refused, Reply};
use crate::policy::conntrack::Zone;
use crate::reason::DropReason;
use crate::topology::{LbId, Network, Space};
use crate::wire::ipv4::{Ipv4Packet, L4, TcpFlags, icmp_type, proto};
use crate::wire::nat::Nat;

/// What the forward stage found for a packet.
pub(super) enum Balanced {
    /// Not a load balancer's: the route decides.
    No,
    /// To this backend instance, with this translation.
    To(Target, Nat),
}

/// A TCP FIN or RST: the connection is ending.
fn ends(ip: &Ipv4Packet) -> bool {
    matches!(ip.l4, L4::Tcp { flags, .. } if flags.0 & (TcpFlags::FIN | TcpFlags::RST) != 0)
}

fn is_l4(ip: &Ipv4Packet) -> bool {
    matches!(ip.protocol, proto::TCP | proto::UDP)
        && matches!(ip.l4, L4::Tcp { .. } | L4::Udp { .. })
}

impl Decider<'_> {
    /// A packet of a local client, or from the internet on the gateway, to a load
    /// balancer's VIP (or Elastic IP): its session's backend, or a new one's.
    pub fn balance(&mut self, origin: Origin, ip: &Ipv4Packet) -> Result<Balanced, Decision> {
        let topo = self.topo;
        let (zone, lb) = match origin {
            Origin::Local { id, foreign: false } => {
                let inst = topo.instance(id);
                (zone_of(topo, inst), topo.lb_at(inst.space(), ip.dst))
            }
            Origin::Internet { relayed: None } => (INTERNET, topo.lb_by_eip(ip.dst)),
            _ => return Ok(Balanced::No),
        };
        let (sport, dport) = ports(ip);
        let key = Forward {
            zone,
            protocol: ip.protocol,
            client: (ip.src, sport),
            vip: (ip.dst, dport),
        };
        let session = if is_l4(ip) && !self.state.balancer.is_empty() {
            self.state.balancer.forward(&key, self.now, ends(ip))
        } else {
            None
        };
        if let Some((backend, backend_zone)) = session {
            self.cacheable = false;
            let space = self
                .space_of(backend_zone)
                .ok_or(Decision::drop(DropReason::NoSuchInstance))?;
            let id = topo.instance_in(space, backend.0);
            self.note(Stage::Balance, |_| {
                vec![(
                    "session",
                    format!("existing: backend {}:{}", backend.0, backend.1),
                )]
            });
            let internet = matches!(origin, Origin::Internet { .. });
            return self.toward_backend(internet, backend, id);
        }
        let Some(lb) = lb else {
            return Ok(Balanced::No);
        };
        self.cacheable = false;
        self.new_session(origin, lb, key, (is_echo_request(ip), ends(ip)))
    }

    /// The address space of a conntrack zone: a VPC's, or the basic network.
    fn space_of(&self, zone: Zone) -> Option<Space> {
        if zone == super::decide::BASIC {
            return Some(Space::Basic);
        }
        let key = u32::try_from(zone.0).ok()?;
        self.topo.vpc_by_key(key).map(Space::Vpc)
    }

    /// A new connection to load balancer `lb`: its listener picks a backend.
    fn new_session(
        &mut self,
        origin: Origin,
        lb: LbId,
        key: Forward,
        (echo, ends): (bool, bool),
    ) -> Result<Balanced, Decision> {
        let topo = self.topo;
        let balancer = topo.lb(lb);
        if let Origin::Local { id, .. } = origin
            && let (Network::Basic { tenant }, Network::Basic { tenant: mine }) =
                (&balancer.network, &topo.instance(id).network)
            && (tenant != mine || !self.same_region(lb, id))
        {
            return Err(Decision::drop(DropReason::LbOtherTenant));
        }
        let listener = balancer.listener(key.protocol, key.vip.1);
        let Some((li, listener)) = listener.filter(|_| !echo) else {
            return Err(self.not_listened(origin, key, echo));
        };
        let backend_zone = match balancer.network {
            Network::Vpc { vpc, .. } => Zone::vpc(topo.vpc(vpc).key),
            Network::Basic { .. } => super::decide::BASIC,
        };
        let opened = self
            .state
            .balancer
            .open(topo, (lb, li), key, (backend_zone, ends), self.now);
        let bi = match opened {
            Ok(bi) => bi,
            Err(Refused::NoBackend) => return Err(Decision::drop(DropReason::LbNoBackend)),
            Err(Refused::Full) => return Err(Decision::drop(DropReason::LbSessionsFull)),
            Err(Refused::InUse) => return Err(Decision::drop(DropReason::LbTupleInUse)),
        };
        let b = listener.backends[bi];
        let inst = topo.instance(b.instance);
        self.note(Stage::Balance, |t| {
            vec![
                ("load balancer", balancer.name.clone()),
                (
                    "listener",
                    format!("{} {}", listener.protocol.word(), listener.port),
                ),
                ("scheduler", listener.scheduler.word().to_string()),
                (
                    "backend",
                    format!("{} {}:{}", t.instance(b.instance).name, inst.ip, b.port),
                ),
                ("session", "new".to_string()),
            ]
        });
        let internet = matches!(origin, Origin::Internet { .. });
        self.toward_backend(internet, (inst.ip, b.port), Some(b.instance))
    }

    /// A basic client and a basic load balancer's backends are in one region.
    fn same_region(&self, lb: LbId, client: crate::topology::InstanceId) -> bool {
        let topo = self.topo;
        let region = |id| &topo.host(topo.instance(id).host).region;
        topo.lb(lb)
            .listeners
            .iter()
            .flat_map(|l| l.backends.first())
            .all(|b| region(b.instance) == region(client))
    }

    /// The VIP answers ICMP echo itself, as the cloud's does; anything else without a
    /// listener is dropped.
    fn not_listened(&mut self, origin: Origin, key: Forward, echo: bool) -> Decision {
        if let (Origin::Local { id, .. }, true) = (origin, echo) {
            self.note(Stage::Balance, |_| {
                vec![("vip", "answers the echo request".into())]
            });
            return Decision::EchoReply { to: id };
        }
        self.note(Stage::Balance, |_| {
            vec![(
                "listener",
                format!("none for protocol {} port {}", key.protocol, key.vip.1),
            )]
        });
        Decision::drop(DropReason::LbNoListener)
    }

    /// The target and translation towards backend instance `id` at `addr:port`. From the
    /// internet the destination address is translated as an Elastic IP's is (the plan then
    /// treats the packet as one), and the port by the balancer; from a client in the cloud
    /// both by the balancer.
    fn toward_backend(
        &mut self,
        internet: bool,
        (addr, port): (Ipv4Addr, u16),
        id: Option<crate::topology::InstanceId>,
    ) -> Result<Balanced, Decision> {
        let Some(id) = id else {
            return Err(Decision::drop(DropReason::NoSuchInstance));
        };
        self.lb_nat = Nat {
            dst: (!internet).then_some(addr),
            dport: Some(port),
            ..Nat::NONE
        };
        let nat = Nat {
            dst: internet.then_some(addr),
            ..Nat::NONE
        };
        Ok(Balanced::To(Target::Instance { id, peering: None }, nat))
    }

    /// A packet of a backend to a client whose host holds the session (this one): its
    /// source becomes the VIP and the listener's port.
    pub fn balance_reply(&mut self, zone: Zone, space: Space, ip: &Ipv4Packet) {
        if !is_l4(ip) {
            return;
        }
        let (sport, dport) = ports(ip);
        if self.topo.is_backend(space, ip.protocol, ip.src, sport) {
            self.cacheable = false;
        }
        if self.state.balancer.is_empty() {
            return;
        }
        let key = Reply {
            zone,
            protocol: ip.protocol,
            backend: (ip.src, sport),
            client: (ip.dst, dport),
        };
        let Some((vip, vport)) = self.state.balancer.reply(&key, self.now, ends(ip)) else {
            return;
        };
        self.cacheable = false;
        self.lb_nat = Nat {
            src: Some(vip),
            sport: Some(vport),
            ..Nat::NONE
        };
        self.note(Stage::Balance, |_| {
            vec![("reply", format!("source back to the VIP {vip}:{vport}"))]
        });
    }
}

/// An ICMP echo request (the one ICMP a VIP answers).
pub(super) fn is_echo_request(ip: &Ipv4Packet) -> bool {
    matches!(ip.l4, L4::Icmp { kind, .. } if kind == icmp_type::ECHO_REQUEST)
}
