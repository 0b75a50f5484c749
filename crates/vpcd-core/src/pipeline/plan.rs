//! The plan of a packet (docs/semantics.md 2.5 steps 2-4): its target, any NAT on the way,
//! the forward decision with the channel (and so the GRE key) it travels on, and which sides
//! of it run their policy on this host.

use super::decide::{Decider, Origin};
use super::route::{Target, route};
use super::{Decision, Nat};
use crate::reason::DropReason;
use crate::topology::{Channel, InstanceId, PeeringId, Space, Topology};
use crate::wire::ipv4::Ipv4Packet;

/// Where a packet goes and what this host checks on the way.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    /// The decision if the policy lets it through.
    pub forward: Decision,
    /// The target instance, when an instance is the target.
    pub target: Option<InstanceId>,
    /// The target is on this host: its ingress side runs here.
    pub target_local: bool,
    /// The target is the internet (through the sender's Elastic IP).
    pub to_internet: bool,
    /// The addresses as the Elastic IP's NAT rewrites them.
    pub nat: Nat,
    /// The addresses and ports as a load balancer rewrites them ([`super::balance`]).
    pub lb: Nat,
    /// False when this host only relays (the gateway between two remote ends).
    pub policy: bool,
}

/// The channel a packet from `sender` to `target` travels on (docs/semantics.md 2.1).
pub(super) fn channel_between(
    topo: &Topology,
    sender: InstanceId,
    target: InstanceId,
    peering: Option<PeeringId>,
    foreign: bool,
) -> Channel {
    let (s, d) = (topo.instance(sender).space(), topo.instance(target).space());
    match (foreign, peering, s, d) {
        (true, ..) => Channel::Appliance(sender),
        (_, Some(p), _, Space::Vpc(to)) => Channel::Peering { peering: p, to },
        (_, _, Space::Vpc(v), Space::Basic) => Channel::Interconnect {
            vpc: v,
            to_basic: true,
        },
        (_, _, Space::Basic, Space::Vpc(v)) => Channel::Interconnect {
            vpc: v,
            to_basic: false,
        },
        (_, _, Space::Basic, Space::Basic) => Channel::Basic,
        (_, _, _, Space::Vpc(v)) => Channel::Vpc(v),
    }
}

impl Decider<'_> {
    /// The target of a packet (2.5 step 2), with the destination NAT of the internet side.
    pub fn target(
        &mut self,
        origin: Origin,
        ip: &Ipv4Packet,
        pkt: &[u8],
    ) -> Result<(Target, Nat), Decision> {
        let topo = self.topo;
        let mut nat = Nat::NONE;
        if let super::balance::Balanced::To(target, nat) = self.balance(origin, ip)? {
            return Ok((target, nat));
        }
        let target = match origin {
            Origin::Local { id, .. } => self.local_route(id, ip, pkt).map_err(Decision::drop)?,
            Origin::Remote {
                channel: Channel::Internet { inbound: false, .. },
                ..
            } => Target::Internet,
            Origin::Remote {
                source, channel, ..
            } => {
                let target = route(topo, source, topo.instance(source), ip.dst, &mut self.via)
                    .map_err(Decision::drop)?;
                self.came_on_its_channel(source, target, channel, origin.foreign())?;
                target
            }
            Origin::Internet { relayed: None } => {
                let owner = topo
                    .eip_owner(ip.dst)
                    .ok_or(Decision::drop(DropReason::NoSuchEip))?;
                nat.dst = Some(topo.instance(owner).ip);
                Target::Instance {
                    id: owner,
                    peering: None,
                }
            }
            Origin::Internet {
                relayed: Some((_, space)),
            } => match topo
                .instance_in(space, ip.dst)
                .filter(|&id| self.host.is_local(id))
            {
                Some(id) => Target::Instance { id, peering: None },
                None => return Err(Decision::drop(DropReason::NotLocalDestination)),
            },
        };
        if origin.foreign() {
            self.stays_in_vpc(origin, target)?;
        }
        if let Some(s) = origin.source() {
            let inst = topo.instance(s);
            self.balance_reply(super::decide::zone_of(topo, inst), inst.space(), ip);
        }
        Ok((target, nat))
    }

    /// A remote sender's route must lead to the channel its packet came on.
    fn came_on_its_channel(
        &self,
        source: InstanceId,
        target: Target,
        channel: Channel,
        foreign: bool,
    ) -> Result<(), Decision> {
        let expected = match target {
            Target::Instance { id, peering } => {
                Some(channel_between(self.topo, source, id, peering, foreign))
            }
            Target::Internet => None,
        };
        if expected == Some(channel) {
            Ok(())
        } else {
            Err(Decision::drop(DropReason::GreKeyMismatch))
        }
    }

    /// A packet an appliance sends with another source than its own stays in its VPC: an
    /// instance of that VPC, reached without a peering, an interconnect or the internet.
    fn stays_in_vpc(&self, origin: Origin, target: Target) -> Result<(), Decision> {
        let topo = self.topo;
        let sender = origin.source().map(|s| topo.instance(s).space());
        match target {
            Target::Instance { id, peering: None } if Some(topo.instance(id).space()) == sender => {
                Ok(())
            }
            _ => Err(Decision::drop(DropReason::ForeignSourceLeavesVpc)),
        }
    }

    /// The plan (2.5 steps 3 and 4): the forward decision and the sides that run here.
    pub fn plan(
        &mut self,
        origin: Origin,
        (target, mut nat): (Target, Nat),
        ip: &Ipv4Packet,
    ) -> Result<Plan, Decision> {
        let (id, peering) = match target {
            Target::Instance { id, peering } => (id, peering),
            Target::Internet => match self.internet_plan(origin, &mut nat, ip)? {
                Ok(plan) => return Ok(plan),
                Err(hairpin) => (hairpin, None),
            },
        };
        let dst = self.topo.instance(id);
        let target_local = self.host.is_local(id);
        let translated = !nat.is_none();
        let local_sender = matches!(origin, Origin::Local { .. });
        if !(local_sender || target_local || self.host.gateway && translated) {
            return Err(Decision::drop(DropReason::NotLocalDestination));
        }
        if let (Some(p), true) = (peering, target_local) {
            self.peering_returns(origin, id, p)?;
        }
        let lb = self.lb_nat;
        let forward = if target_local {
            Decision::Deliver {
                to: id,
                strip: 0,
                nat: nat.then(lb),
            }
        } else {
            let channel = match origin.source() {
                Some(s) if !translated => {
                    channel_between(self.topo, s, id, peering, origin.foreign())
                }
                _ => Channel::Internet {
                    space: dst.space(),
                    inbound: true,
                },
            };
            Decision::Encapsulate {
                strip: 0,
                host: dst.host,
                key: self.topo.key_of(channel),
                nat: nat.then(lb),
            }
        };
        Ok(Plan {
            forward,
            target: Some(id),
            target_local,
            to_internet: false,
            nat,
            lb,
            // The gateway relaying between the internet (or an Elastic IP) and a remote
            // instance runs no policy: the instance's host does.
            policy: local_sender || target_local,
        })
    }

    /// The internet as target (2.5 step 3). `Ok(Ok(plan))`: out to the internet (or to the
    /// gateway); `Ok(Err(instance))`: a hairpin, the destination an Elastic IP of `instance`.
    fn internet_plan(
        &mut self,
        origin: Origin,
        nat: &mut Nat,
        ip: &Ipv4Packet,
    ) -> Result<Result<Plan, InstanceId>, Decision> {
        let topo = self.topo;
        let Some(sender) = origin.source() else {
            return Err(Decision::drop(DropReason::NotLocalDestination));
        };
        let local_sender = matches!(origin, Origin::Local { .. });
        let lb = self.lb_nat;
        let out = |forward, nat| Plan {
            forward,
            target: None,
            target_local: false,
            to_internet: true,
            nat,
            lb,
            policy: local_sender,
        };
        if !self.host.gateway {
            if !local_sender {
                return Err(Decision::drop(DropReason::NotLocalDestination));
            }
            let Some(gateway) = topo.internet.as_ref().map(|i| i.gateway) else {
                return Err(Decision::drop(DropReason::NoEip));
            };
            let channel = Channel::Internet {
                space: topo.instance(sender).space(),
                inbound: false,
            };
            let key = topo.key_of(channel);
            let forward = Decision::Encapsulate {
                strip: 0,
                host: gateway,
                key,
                nat: Nat::NONE,
            };
            return Ok(Ok(out(forward, Nat::NONE)));
        }
        // A public load balancer's reply leaves from its Elastic IP (the balancer's
        // translation), any other packet from the sender's own.
        if lb.src.is_none() {
            nat.src = Some(
                topo.instance(sender)
                    .eip
                    .ok_or(Decision::drop(DropReason::NoEip))?,
            );
        }
        if let Some(owner) = topo.eip_owner(ip.dst) {
            nat.dst = Some(topo.instance(owner).ip);
            return Ok(Err(owner));
        }
        Ok(Ok(out(
            Decision::ToInternet {
                strip: 0,
                nat: nat.then(lb),
            },
            *nat,
        )))
    }

    /// Across a peering, the receiving side's route table must lead back the same way.
    fn peering_returns(
        &self,
        origin: Origin,
        target: InstanceId,
        p: PeeringId,
    ) -> Result<(), Decision> {
        let topo = self.topo;
        let Some(src) = origin.source().map(|s| topo.instance(s)) else {
            return Err(Decision::drop(DropReason::PeeringNoReturnRoute));
        };
        let back = topo
            .instance(target)
            .subnet()
            .map(|s| &topo.route_tables[topo.subnet(s).route_table.index()])
            .and_then(|rt| rt.routes.lookup(src.ip))
            .map(|(_, r)| r.next_hop);
        if back == Some(crate::policy::route::NextHop::Peering(p)) {
            Ok(())
        } else {
            Err(Decision::drop(DropReason::PeeringNoReturnRoute))
        }
    }
}
