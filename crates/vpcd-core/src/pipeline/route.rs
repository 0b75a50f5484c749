//! Route order (docs/semantics.md 2.6): where an instance's packet goes.
//!
//! For a VPC instance: the local route (unless a subnet route sends the destination's subnet
//! through an appliance), a basic instance linked to the VPC, the longest custom route, and
//! only when nothing matched, the instance's Elastic IP for a public destination. For a basic
//! instance: the pool (same tenant, same region), its linked VPC, its Elastic IP. Before all
//! of these, for a local sender: the replies of connections that came in through its Elastic
//! IP leave through it.

use std::net::Ipv4Addr;

use super::decide::{Decider, INTERNET, is_public, ports, zone_of};
use crate::policy::conntrack::{ConnKey, Endpoint};
use crate::policy::route::NextHop;
use crate::reason::DropReason;
use crate::topology::{Instance, InstanceId, Network, PeeringId, RouteTableId, Space, Topology};
use crate::wire::ipv4::{self, Ipv4Packet, L4, icmp_type};

/// Where a route leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    /// An instance; `peering` when reached across a peering connection.
    Instance {
        id: InstanceId,
        peering: Option<PeeringId>,
    },
    /// The internet, through the sender's Elastic IP.
    Internet,
}

impl Target {
    fn local(id: InstanceId) -> Target {
        Target::Instance { id, peering: None }
    }
}

/// Which route a packet took (for a trace: [`route`] writes it as it decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Via {
    /// No route was looked up.
    #[default]
    Nothing,
    /// The VPC's local route, in the sender subnet's table.
    Local(RouteTableId),
    /// The custom route of this index in the table.
    Custom(RouteTableId, usize),
    /// No custom route matched in the table.
    NoRoute(RouteTableId),
    /// The interconnect between a VPC and a basic instance linked to it.
    Interconnect,
    /// The basic network's pool.
    Pool,
    /// The sender's Elastic IP, for a public destination nothing else matched.
    Eip,
    /// The reply of a connection that came in through the sender's Elastic IP.
    EipReply,
}

/// The route of `sender` (the instance `src`) towards `dst`; `via` says which one matched.
pub(super) fn route(
    topo: &Topology,
    sender: InstanceId,
    src: &Instance,
    dst: Ipv4Addr,
    via: &mut Via,
) -> Result<Target, DropReason> {
    match &src.network {
        Network::Basic { tenant } => basic_route(topo, sender, src, tenant, dst, via),
        Network::Vpc { vpc, subnet } => {
            let sender_vpc = topo.vpc(*vpc);
            let rt = topo.subnet(*subnet).route_table;
            let custom = topo.route_tables[rt.index()].routes.lookup(dst);
            if sender_vpc.cidr.contains(&dst) {
                // Only a subnet route lies inside the VPC's CIDR; any other match is a wider
                // route the local route beats.
                return match custom {
                    Some((i, r)) if sender_vpc.cidr.contains(&r.destination) => {
                        *via = Via::Custom(rt, i);
                        hop(topo, sender, src, *vpc, r.next_hop, dst)
                    }
                    _ => {
                        *via = Via::Local(rt);
                        instance_in(topo, Space::Vpc(*vpc), dst)
                    }
                };
            }
            if let Some(classic) = topo.instance_in(Space::Basic, dst)
                && topo.linked_vpc(classic) == Some(*vpc)
            {
                *via = Via::Interconnect;
                return Ok(Target::local(classic));
            }
            match custom {
                Some((i, r)) => {
                    *via = Via::Custom(rt, i);
                    hop(topo, sender, src, *vpc, r.next_hop, dst)
                }
                None => {
                    *via = Via::NoRoute(rt);
                    eip_or(src, dst, DropReason::NoRoute, via)
                }
            }
        }
    }
}

fn basic_route(
    topo: &Topology,
    sender: InstanceId,
    src: &Instance,
    tenant: &str,
    dst: Ipv4Addr,
    via: &mut Via,
) -> Result<Target, DropReason> {
    if let Some(pool) = topo.basic
        && pool.cidr.contains(&dst)
    {
        *via = Via::Pool;
        let id = topo
            .instance_in(Space::Basic, dst)
            .ok_or(DropReason::NoSuchInstance)?;
        let other = topo.instance(id);
        if !matches!(&other.network, Network::Basic { tenant: o } if o == tenant) {
            return Err(DropReason::BasicOtherTenant);
        }
        if topo.host(other.host).region != topo.host(src.host).region {
            return Err(DropReason::BasicOtherRegion);
        }
        return Ok(Target::local(id));
    }
    if let Some(vpc) = topo.linked_vpc(sender)
        && topo.vpc(vpc).cidr.contains(&dst)
    {
        *via = Via::Interconnect;
        return instance_in(topo, Space::Vpc(vpc), dst);
    }
    eip_or(src, dst, DropReason::NoRoute, via)
}

fn instance_in(topo: &Topology, space: Space, dst: Ipv4Addr) -> Result<Target, DropReason> {
    topo.instance_in(space, dst)
        .map(Target::local)
        .ok_or(DropReason::NoSuchInstance)
}

/// Through the sender's Elastic IP for a public destination, else `fallback`.
fn eip_or(
    src: &Instance,
    dst: Ipv4Addr,
    fallback: DropReason,
    via: &mut Via,
) -> Result<Target, DropReason> {
    if src.eip.is_some() && is_public(dst) {
        *via = Via::Eip;
        Ok(Target::Internet)
    } else {
        Err(fallback)
    }
}

/// Where a custom route's next hop leads.
fn hop(
    topo: &Topology,
    sender: InstanceId,
    src: &Instance,
    vpc: crate::topology::VpcId,
    next: NextHop,
    dst: Ipv4Addr,
) -> Result<Target, DropReason> {
    match next {
        NextHop::Drop => Err(DropReason::RouteDrop),
        NextHop::Internet if src.eip.is_some() => Ok(Target::Internet),
        NextHop::Internet => Err(DropReason::NoEip),
        NextHop::Instance(i) if i == sender => Err(DropReason::RouteLoop),
        NextHop::Instance(i) => Ok(Target::local(i)),
        NextHop::Peering(p) => {
            let [a, b] = topo.peerings[p.index()].vpcs;
            let peer = if a == vpc { b } else { a };
            if !topo.vpc(peer).cidr.contains(&dst) {
                return Err(DropReason::PeeringNotTransitive);
            }
            let id = topo
                .instance_at(peer, dst)
                .ok_or(DropReason::NoSuchInstance)?;
            Ok(Target::Instance {
                id,
                peering: Some(p),
            })
        }
    }
}

impl Decider<'_> {
    /// The route of a local sender: the replies of a connection that came in through its
    /// Elastic IP leave through it, whatever the routes say; the rest follows route order.
    /// A decision that depended on there being no such connection is not cached (a later
    /// packet of the same flow may be a reply).
    pub fn local_route(
        &mut self,
        id: InstanceId,
        ip: &Ipv4Packet,
        pkt: &[u8],
    ) -> Result<Target, DropReason> {
        let src = self.topo.instance(id);
        // A public load balancer's backend answers the internet without an Elastic IP of its
        // own: its connections came in through the balancer's.
        let backend = self.topo.lb_address(u32::from(src.ip));
        if (src.eip.is_none() && !backend) || !is_public(ip.dst) {
            return route(self.topo, id, src, ip.dst, &mut self.via);
        }
        if self.came_in_through_eip(id, ip, pkt) {
            self.via = Via::EipReply;
            return Ok(Target::Internet);
        }
        let target = route(self.topo, id, src, ip.dst, &mut self.via);
        if target != Ok(Target::Internet) {
            self.cacheable = false;
        }
        target
    }

    /// True when this packet of local instance `id` belongs to a connection that a public
    /// end opened to it (for an ICMP error: the connection its quote belongs to).
    fn came_in_through_eip(&self, id: InstanceId, ip: &Ipv4Packet, pkt: &[u8]) -> bool {
        let inst = self.topo.instance(id);
        let zone = zone_of(self.topo, inst);
        let port = Endpoint {
            zone,
            addr: inst.ip,
            port: 0,
        }
        .owner();
        let key = match ip.l4 {
            L4::Icmp { kind, .. } if icmp_type::is_error(kind) => {
                let Some(q) = pkt.get(ip.l4_offset() + 8..).and_then(ipv4::parse_quoted) else {
                    return false;
                };
                let (qs, qd) = ports(&q);
                let from = Endpoint {
                    zone: INTERNET,
                    addr: q.src,
                    port: qs,
                };
                let to = Endpoint {
                    zone,
                    addr: q.dst,
                    port: qd,
                };
                ConnKey::of(port, q.protocol, &q.l4, from, to)
            }
            _ => {
                let (sp, dp) = ports(ip);
                let from = Endpoint {
                    zone,
                    addr: ip.src,
                    port: sp,
                };
                let to = Endpoint {
                    zone: INTERNET,
                    addr: ip.dst,
                    port: dp,
                };
                ConnKey::of(port, ip.protocol, &ip.l4, from, to)
            }
        };
        // A packet that reopens the connection belongs to a new one, opened by the instance.
        let src = Endpoint {
            zone,
            addr: ip.src,
            port: ports(ip).0,
        };
        let ct = &self.state.conntrack;
        key.and_then(|k| ct.find_live(&k, self.now))
            .is_some_and(|c| c.opener.zone == INTERNET && !c.reopened_by(&src, &ip.l4))
    }
}
