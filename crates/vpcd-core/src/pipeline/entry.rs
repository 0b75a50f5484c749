//! The entry points (docs/semantics.md 2.2-2.4): a local instance's device, the underlay, and
//! the internet's device. Each parses and checks what belongs to its side, finds who sent the
//! packet, and hands it to the flow decision.

use std::net::Ipv4Addr;

use super::decide::{Decider, INTERNET, NO_GRE_KEY, Origin, is_public, with_strip, zone_of};
use super::flow::{FROM_INTERNET, FROM_UNDERLAY};
use super::{Decision, Ingress};
use crate::reason::DropReason;
use crate::topology::{Channel, HostId, InstanceId, Space};
use crate::wire::ipv4::{self, Ipv4Packet, L4, proto};
use crate::wire::{gre, gro};

impl Decider<'_> {
    pub fn decide(&mut self, packet: &[u8], from: Ingress, segmented: bool) -> Decision {
        match from {
            Ingress::Instance(id) => self.instance_packet(id, packet, segmented),
            Ingress::UnderlayIp => match ipv4::parse_outer(packet) {
                Err(r) => Decision::drop(r),
                Ok(o) if o.dst != self.host.address => {
                    Decision::drop(DropReason::NotAddressedToHost)
                }
                Ok(o) => self.underlay_packet(o.src, packet, o.header_len),
            },
            Ingress::UnderlayUdp { from } => self.underlay_packet(from, packet, 0),
            Ingress::Internet => self.internet_packet(packet),
        }
    }

    fn instance_packet(&mut self, id: InstanceId, pkt: &[u8], segmented: bool) -> Decision {
        let mtu = usize::from(self.host.instance_mtu);
        if !self.host.is_local(id) {
            return Decision::drop(DropReason::UnknownPort);
        }
        if (segmented || pkt.len() <= mtu)
            && let Some(d) = self.cached_from_bytes(id.0, 0, pkt)
        {
            return d;
        }
        let inst = self.topo.instance(id);
        let ip = match ipv4::parse(pkt) {
            Ok(ip) => ip,
            Err(r) => return Decision::drop(r),
        };
        let foreign = ip.src != inst.ip;
        if foreign && inst.source_check {
            return Decision::drop(DropReason::SourceSpoofed);
        }
        if let Err(r) = self.check_destination(&ip) {
            return Decision::drop(r);
        }
        if !segmented && pkt.len() > mtu {
            return if ip.dont_fragment {
                Decision::FragNeeded {
                    to: id,
                    mtu: self.host.instance_mtu,
                }
            } else {
                Decision::drop(DropReason::OversizeNoDf)
            };
        }
        let zone = zone_of(self.topo, inst);
        self.flow(Origin::Local { id, foreign }, zone, 0, &ip, pkt, 0)
    }

    fn internet_packet(&mut self, pkt: &[u8]) -> Decision {
        if !self.host.gateway {
            return Decision::drop(DropReason::UnknownPort);
        }
        if let Some(d) = self.cached_from_bytes(FROM_INTERNET, 0, pkt) {
            return d;
        }
        let ip = match ipv4::parse(pkt) {
            Ok(ip) => ip,
            Err(r) => return Decision::drop(r),
        };
        if let Err(r) = self.check_destination(&ip) {
            return Decision::drop(r);
        }
        let origin = Origin::Internet { relayed: None };
        self.flow(origin, INTERNET, 0, &ip, pkt, 0)
    }

    fn underlay_packet(&mut self, sender: Ipv4Addr, pkt: &[u8], gre_at: usize) -> Decision {
        let Some(host) = self.topo.host_by_address(sender) else {
            return Decision::drop(DropReason::UnknownUnderlaySource);
        };
        // This host's own instances reach it through their devices, never the underlay: a
        // packet that says otherwise would skip their egress policy.
        if host == self.host.host {
            return Decision::drop(DropReason::UnderlayFromSelf);
        }
        let g = match gre::parse(&pkt[gre_at.min(pkt.len())..]) {
            Ok(g) => g,
            Err(r) => return Decision::drop(r),
        };
        let inner_at = gre_at + g.len;
        let inner = &pkt[inner_at..];
        if let Err(r) = gre_protocol(g.protocol, inner) {
            return Decision::drop(r);
        }
        let channel = match self.channel(g.key) {
            Ok(c) => c,
            Err(r) => return Decision::drop(r),
        };
        // The kernel reassembles outer fragments before vpcd reads them: an inner packet
        // that does not fit the instance MTU stops here, never written to a device, unless
        // it is a TCP super-segment (the underlay kernel's GRO merged segments, or a jumbo
        // underlay carried several), which the instance's kernel takes as a super-packet and
        // cuts at its MTU.
        let mtu = usize::from(self.host.instance_mtu);
        if inner.len() > mtu && !gro::is_super_segment(inner, mtu) {
            return Decision::drop(DropReason::UnderlayTooBig);
        }
        let gre_key = g.key.map_or(NO_GRE_KEY, u64::from);
        let strip = inner_at as u16;
        if let Some(d) = self.cached_from_bytes(FROM_UNDERLAY | host.0, gre_key, inner) {
            return with_strip(d, strip);
        }
        let ip = match ipv4::parse(inner) {
            Ok(ip) => ip,
            Err(r) => return Decision::drop(r),
        };
        if let Err(r) = self.check_destination(&ip) {
            return Decision::drop(r);
        }
        let Some(origin) = self.sender(host, channel, &ip) else {
            return Decision::drop(DropReason::InnerSourceNotOnSender);
        };
        let zone = match origin.source() {
            Some(s) => zone_of(self.topo, self.topo.instance(s)),
            None => INTERNET,
        };
        self.flow(origin, zone, gre_key, &ip, inner, strip)
    }

    /// The channel a GRE key names, if its receiving side is on this host (2.3 step 4).
    fn channel(&self, key: Option<u32>) -> Result<Channel, DropReason> {
        let channel = match key {
            Some(k) => self.topo.channel(k).ok_or(DropReason::GreUnknownKey)?,
            None if self.topo.basic.is_none() => return Err(DropReason::GreNoKey),
            None => Channel::Basic,
        };
        if self.host.receives(self.topo, channel) {
            Ok(channel)
        } else {
            Err(DropReason::GreKeyNotOnHost)
        }
    }

    /// Who sent an underlay packet, by its channel (2.3 step 7): the sending side comes from
    /// the key, the instance from the inner source address within that side, and it must be
    /// on the sending host. Never a guess among spaces.
    fn sender(&self, host: HostId, channel: Channel, ip: &Ipv4Packet) -> Option<Origin> {
        let topo = self.topo;
        let on_host = |id: InstanceId| topo.instance(id).host == host;
        let at = |space: Space| topo.instance_in(space, ip.src).filter(|&id| on_host(id));
        let source = match channel {
            Channel::Vpc(v)
            | Channel::Interconnect {
                vpc: v,
                to_basic: true,
            }
            | Channel::Internet {
                space: Space::Vpc(v),
                inbound: false,
            } => at(Space::Vpc(v)),
            Channel::Peering { peering, to } => {
                let [a, b] = topo.peerings[peering.index()].vpcs;
                at(Space::Vpc(if a == to { b } else { a }))
            }
            Channel::Interconnect {
                vpc,
                to_basic: false,
            } => at(Space::Basic).filter(|&id| topo.linked_vpc(id) == Some(vpc)),
            Channel::Basic
            | Channel::Internet {
                space: Space::Basic,
                inbound: false,
            } => at(Space::Basic),
            Channel::Appliance(x) => Some(x).filter(|&x| on_host(x)),
            Channel::Internet {
                space,
                inbound: true,
            } => {
                let from_gateway = topo.internet.as_ref().is_some_and(|i| i.gateway == host);
                return (from_gateway && is_public(ip.src)).then_some(Origin::Internet {
                    relayed: Some((host, space)),
                });
            }
        }?;
        Some(Origin::Remote {
            host,
            source,
            channel,
        })
    }

    /// Broadcast, multicast and underlay destinations are refused on every side.
    fn check_destination(&self, ip: &Ipv4Packet) -> Result<(), DropReason> {
        if ip.dst.is_broadcast() || ip.dst.is_multicast() {
            return Err(DropReason::NotUnicast);
        }
        if self.topo.host_by_address(ip.dst).is_some() {
            let tunnel = ip.protocol == proto::GRE
                || matches!(
                    ip.l4,
                    L4::Udp {
                        dport: gre::UDP_PORT,
                        ..
                    }
                );
            return Err(if tunnel {
                DropReason::TunnelLoop
            } else {
                DropReason::InnerDstUnderlay
            });
        }
        Ok(())
    }
}

/// The GRE protocol type must be IPv4 and match the inner packet.
fn gre_protocol(protocol: u16, inner: &[u8]) -> Result<(), DropReason> {
    match (protocol, inner.first().map(|b| b >> 4)) {
        (gre::PROTO_IPV4, Some(6)) => Err(DropReason::GreProtocolMismatch),
        (gre::PROTO_IPV4, _) => Ok(()),
        (gre::PROTO_IPV6, Some(6)) => Err(DropReason::Ipv6Unsupported),
        (gre::PROTO_IPV6, _) => Err(DropReason::GreProtocolMismatch),
        _ => Err(DropReason::GreProtocolUnsupported),
    }
}
