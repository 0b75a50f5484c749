//! The packet a trace sends: built from `--from`, `--to`, `--protocol` and `--port`.

use std::net::Ipv4Addr;

use etherparse::PacketBuilder;

use super::super::Ingress;
use crate::policy::rules::Protocol;
use crate::topology::{HostId, Topology};

/// The packet a trace sends: where it enters, on which host, and its bytes.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The host it enters on.
    pub host: HostId,
    /// Where it enters.
    pub from: Ingress,
    /// An IPv4 packet: a TCP SYN, a UDP datagram or an ICMP echo request.
    pub packet: Vec<u8>,
}

/// The source port of a TCP or UDP probe.
pub const PROBE_PORT: u16 = 49152;

/// The probe `--from FROM --to TO --protocol P [--port N]` describes: `from` an instance's
/// name or `internet` (the lab internet's client address, entering at the gateway); `to` an
/// instance's name (its private address, or from the internet its Elastic IP) or an address.
pub fn probe(
    t: &Topology,
    from: &str,
    to: &str,
    protocol: Protocol,
    port: Option<u16>,
) -> Result<Probe, String> {
    let (host, ingress, src) = if from == "internet" {
        let i = t.internet.as_ref().ok_or("this topology has no internet")?;
        (i.gateway, Ingress::Internet, i.client)
    } else {
        let id = t
            .instance_named(from)
            .ok_or_else(|| format!("--from {from}: no such instance (nor `internet`)"))?;
        let i = t.instance(id);
        (i.host, Ingress::Instance(id), i.ip)
    };
    let dst = match (to.parse::<Ipv4Addr>(), t.instance_named(to)) {
        (Ok(a), _) => a,
        (_, Some(id)) if ingress == Ingress::Internet => t.instance(id).eip.ok_or_else(|| {
            format!("--to {to}: the internet reaches it only at an Elastic IP, and it has none")
        })?,
        (_, Some(id)) => t.instance(id).ip,
        _ => {
            return Err(format!(
                "--to {to}: neither an instance nor an IPv4 address"
            ));
        }
    };
    let packet = probe_packet(src, dst, protocol, port)?;
    Ok(Probe {
        host,
        from: ingress,
        packet,
    })
}

/// The bytes of a probe from `src` to `dst`.
pub fn probe_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: Protocol,
    port: Option<u16>,
) -> Result<Vec<u8>, String> {
    let ip = PacketBuilder::ipv4(src.octets(), dst.octets(), 64);
    let payload = b"vpcd trace";
    let mut out = Vec::new();
    let need_port = || port.ok_or_else(|| "--port is needed for tcp and udp".to_string());
    let written = match protocol {
        Protocol::Tcp => ip
            .tcp(PROBE_PORT, need_port()?, 1, 64240)
            .syn()
            .write(&mut out, &[]),
        Protocol::Udp => ip.udp(PROBE_PORT, need_port()?).write(&mut out, payload),
        Protocol::Icmp => ip.icmpv4_echo_request(0x7674, 1).write(&mut out, payload),
        other => return Err(format!("--protocol {}: tcp, udp or icmp", other.word())),
    };
    written.map_err(|e| e.to_string())?;
    Ok(out)
}
