//! What each stage of a traced decision found, field by field, with the topology's names.

use std::net::Ipv4Addr;

use super::super::decide::Origin;
use super::super::filter::Side;
use super::super::route::{Target, Via};
use super::super::{Decision, Ingress, Nat, RuleRef};
use crate::policy::conntrack::{Direction, State as ConnState, Track};
use crate::reason::DropReason;
use crate::topology::{HostId, InstanceId, Topology, Transport};
use crate::wire::ipv4::{Ipv4Packet, L4};

/// How people name where a packet came in.
pub fn ingress_name(t: &Topology, from: Ingress) -> String {
    match from {
        Ingress::Instance(id) => t
            .instances
            .get(id.index())
            .map_or_else(|| format!("instance #{}", id.0), |i| i.name.clone()),
        Ingress::UnderlayIp => "underlay (gre)".to_string(),
        Ingress::UnderlayUdp { from } => format!("underlay (gre-udp from {from})"),
        Ingress::Internet => "internet".to_string(),
    }
}

pub(super) fn nat_fields(nat: &Nat) -> Vec<(&'static str, String)> {
    let mut f = Vec::new();
    if let Some(s) = nat.src {
        f.push(("source", s.to_string()));
    }
    if let Some(d) = nat.dst {
        f.push(("destination", d.to_string()));
    }
    if let Some(p) = nat.sport {
        f.push(("source port", p.to_string()));
    }
    if let Some(p) = nat.dport {
        f.push(("destination port", p.to_string()));
    }
    f
}

pub(super) fn wire_fields(
    t: &Topology,
    key: Option<u32>,
    transport: Transport,
    next: HostId,
    to: Ipv4Addr,
) -> Vec<(&'static str, String)> {
    let channel = key
        .and_then(|k| t.channel(k))
        .map_or_else(|| "basic".to_string(), |c| t.channel_name(c));
    let key = key.map_or_else(|| "none".to_string(), |k| format!("{k:#010x}"));
    let transport = match transport {
        Transport::Gre => "gre",
        Transport::GreUdp => "gre-udp",
    };
    vec![
        ("key", key),
        ("channel", channel),
        ("transport", transport.to_string()),
        ("to", format!("{} {to}", t.host(next).name)),
    ]
}

pub(super) fn result_fields(t: &Topology, d: &Decision) -> Vec<(&'static str, String)> {
    let name = |id: InstanceId| t.instance(id).name.clone();
    match *d {
        Decision::Deliver { to, .. } => vec![("result", "deliver".into()), ("to", name(to))],
        Decision::Encapsulate { host, .. } => vec![
            ("result", "encapsulate".into()),
            ("to", t.host(host).name.clone()),
        ],
        Decision::ToInternet { .. } => vec![("result", "to the internet".into())],
        Decision::EchoReply { to } => vec![
            ("result", "echo reply from the VIP".into()),
            ("to", name(to)),
        ],
        Decision::FragNeeded { to, mtu } => vec![
            ("result", "fragmentation needed".into()),
            ("to", name(to)),
            ("mtu", mtu.to_string()),
        ],
        Decision::Drop(x) => {
            let mut f = vec![
                ("result", "drop".into()),
                ("reason", x.reason.name().into()),
            ];
            if let Some(rule) = x.rule {
                f.push(("rule", rule_label(t, x.reason, rule)));
            }
            f
        }
    }
}

/// A rule as people name it: `acl-web:egress#2`, `sg-web:ingress#3`, `[sg-a,sg-b]:ingress#no-match`
/// (indices count from 1, as in the file).
pub fn rule_label(t: &Topology, reason: DropReason, rule: RuleRef) -> String {
    let dir = match reason {
        DropReason::AclIngress | DropReason::SgIngress => "ingress",
        _ => "egress",
    };
    match rule {
        RuleRef::Acl { acl, rule } => {
            let name = t.acls.get(acl.index()).map_or("?", |a| a.name.as_str());
            match rule {
                Some(i) => format!("{name}:{dir}#{}", i + 1),
                None => format!("{name}:{dir}#no-match"),
            }
        }
        RuleRef::SecurityGroup { group, rule } => {
            let name = t
                .security_groups
                .get(group.index())
                .map_or("?", |g| g.name.as_str());
            format!("{name}:{dir}#{}", rule + 1)
        }
        RuleRef::SecurityGroupsEnd { instance } => {
            let groups: Vec<&str> = t.instances.get(instance.index()).map_or(Vec::new(), |i| {
                i.security_groups
                    .iter()
                    .map(|g| t.security_groups[g.index()].name.as_str())
                    .collect()
            });
            format!("[{}]:{dir}#no-match", groups.join(","))
        }
    }
}

/// Fields of what a stage found; built only while tracing.
pub(in crate::pipeline) type Fields = Vec<(&'static str, String)>;

/// The entry: who sent the packet, how it came in, and the packet.
pub(in crate::pipeline) fn entry_fields(t: &Topology, origin: Origin, ip: &Ipv4Packet) -> Fields {
    let mut f = match origin {
        Origin::Local { id, foreign } => {
            let mut f = vec![("port", t.instance(id).name.clone())];
            if foreign {
                f.push(("source", "not its own (source_check = false)".into()));
            }
            f
        }
        Origin::Remote {
            host,
            source,
            channel,
        } => vec![
            ("from", format!("underlay, {}", t.host(host).name)),
            ("channel", t.channel_name(channel)),
            ("sender", t.instance(source).name.clone()),
        ],
        Origin::Internet { relayed: None } => vec![("from", "the internet's device".into())],
        Origin::Internet {
            relayed: Some((host, _)),
        } => vec![(
            "from",
            format!("the internet, relayed by {}", t.host(host).name),
        )],
    };
    f.push(("packet", packet_summary(ip)));
    f
}

/// `tcp 10.0.1.10:49152 > 10.0.2.10:80 flags 0x02`, `icmp 10.0.1.10 > 10.0.2.10 type 8 code 0`.
pub(in crate::pipeline) fn packet_summary(ip: &Ipv4Packet) -> String {
    let (s, d) = (ip.src, ip.dst);
    match ip.l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
        } => format!("tcp {s}:{sport} > {d}:{dport} flags {:#04x}", flags.0),
        L4::Udp { sport, dport } => format!("udp {s}:{sport} > {d}:{dport}"),
        L4::Icmp { kind, code, .. } => format!("icmp {s} > {d} type {kind} code {code}"),
        L4::Other | L4::None => format!("protocol {} {s} > {d}", ip.protocol),
    }
}

/// What the flow cache holds for the flow (a trace notes it, then takes the full path).
pub(in crate::pipeline) fn cache_fields(t: &Topology, hit: Option<Decision>) -> Fields {
    match hit {
        None => vec![("entry", "none".into())],
        Some(d) => {
            let mut f = vec![("entry", "cached".into())];
            f.extend(
                result_fields(t, &d)
                    .into_iter()
                    .map(|(k, v)| if k == "result" { ("cached", v) } else { (k, v) }),
            );
            f.push(("note", "traced on the full path".into()));
            f
        }
    }
}

/// The route that matched (and its table), and where it led.
pub(in crate::pipeline) fn route_fields(
    t: &Topology,
    via: Via,
    target: &Result<Target, Decision>,
) -> Fields {
    let table = |rt: crate::topology::RouteTableId| t.route_tables[rt.index()].name.clone();
    let mut f = match via {
        Via::Nothing => vec![],
        Via::Local(rt) => vec![("table", table(rt)), ("route", "local".into())],
        Via::Custom(rt, i) => {
            let r = t.route_tables[rt.index()].routes.get(i);
            let what = r.map_or_else(String::new, |r| format!(" {}", r.destination));
            vec![("table", table(rt)), ("route", format!("#{}{what}", i + 1))]
        }
        Via::NoRoute(rt) => vec![("table", table(rt)), ("route", "none matched".into())],
        Via::Interconnect => vec![("route", "basic-network interconnect".into())],
        Via::Pool => vec![("route", "basic-network pool".into())],
        Via::Eip => vec![("route", "the sender's Elastic IP".into())],
        Via::EipReply => vec![(
            "route",
            "the Elastic IP its connection came in through".into(),
        )],
    };
    match target {
        Ok(Target::Instance { id, peering }) => {
            f.push(("target", t.instance(*id).name.clone()));
            if let Some(p) = peering {
                f.push(("peering", t.peerings[p.index()].name.clone()));
            }
        }
        Ok(Target::Internet) => f.push(("target", "the internet".into())),
        Err(Decision::Drop(x)) => {
            f.push(("result", "drop".into()));
            f.push(("reason", x.reason.name().into()));
        }
        Err(d) => f.extend(result_fields(t, d)),
    }
    f
}

/// A side as people name it: `web-1 egress`.
pub(in crate::pipeline) fn side_name(t: &Topology, side: &Side) -> String {
    let dir = if side.ingress { "ingress" } else { "egress" };
    format!("{} {dir}", t.instance(side.instance).name)
}

/// A connection's state, as `conntrack -L` would say it.
pub(in crate::pipeline) fn state_name(s: &ConnState) -> String {
    match s {
        ConnState::Tcp(tcp) => format!("{:?}", tcp.state).to_uppercase(),
        ConnState::Datagram { replied: true } => "REPLIED".into(),
        ConnState::Datagram { replied: false } => "UNREPLIED".into(),
    }
}

/// Connection tracking of one side: the entry found (its state before the packet), and what
/// tracking made of the packet.
pub(in crate::pipeline) fn tracked_fields(
    t: &Topology,
    side: &Side,
    before: Option<ConnState>,
    tracked: Option<&Track>,
) -> Fields {
    let mut f = vec![("side", side_name(t, side))];
    match (before, tracked) {
        (Some(s), Some(tr)) => {
            f.push(("entry", state_name(&s)));
            let result = match tr {
                Track::Accepted(Direction::Original) => "original direction".into(),
                Track::Accepted(Direction::Reply) => "reply direction".into(),
                Track::Ended => "ends the connection".into(),
                Track::Reopen => "reopens it: new traffic".into(),
                Track::Invalid(r) => format!("invalid: {r}"),
                Track::Gone => "expired: new traffic".into(),
            };
            f.push(("result", result));
        }
        _ => f.push(("entry", "none: new traffic".into())),
    }
    f
}

/// A security-group verdict for one side.
pub(in crate::pipeline) fn group_fields(
    t: &Topology,
    side: &Side,
    outbound: bool,
    reverse: bool,
    verdict: &Result<RuleRef, RuleRef>,
) -> Fields {
    let reason = if outbound {
        DropReason::SgEgress
    } else {
        DropReason::SgIngress
    };
    let (rule, result) = match verdict {
        Ok(r) => (rule_label(t, reason, *r), "accept"),
        Err(r) => (rule_label(t, reason, *r), "drop"),
    };
    let mut f = vec![
        ("instance", t.instance(side.instance).name.clone()),
        (
            "direction",
            if outbound { "egress" } else { "ingress" }.into(),
        ),
        ("rule", rule),
        ("result", result.into()),
    ];
    if reverse {
        f.push((
            "judged",
            "as the reply of a connection its destination opened (TCP pickup)".into(),
        ));
    }
    f
}

/// A network ACL's verdict.
pub(in crate::pipeline) fn acl_fields(
    t: &Topology,
    acl: crate::topology::AclId,
    ingress: bool,
    verdict: Result<u16, Option<u16>>,
) -> Fields {
    let (rule, result) = match verdict {
        Ok(i) => (format!("#{}", i + 1), "allow"),
        Err(Some(i)) => (format!("#{}", i + 1), "deny"),
        Err(None) => ("none matched".to_string(), "deny"),
    };
    vec![
        ("acl", t.acls[acl.index()].name.clone()),
        (
            "direction",
            if ingress { "ingress" } else { "egress" }.into(),
        ),
        ("rule", rule),
        ("result", result.into()),
    ]
}
