//! Tracing a packet (`vpcd trace`, `vpcd ctl trace`): the pipeline's own decision, observed.
//!
//! The decision's context carries an optional sink ([`Decider::note`]); each stage writes
//! what it found there as it decides: the route and its table, each ACL and the rule that
//! decided, each security-group verdict, the connection-tracking state, and the result. With
//! no sink (every packet of the data plane) a note costs one predictable branch and builds
//! nothing. [`Pipeline::trace`] decides one packet on a copy of the pipeline's tables, so a
//! trace changes no connection, cached decision or counter; [`follow`] carries the packet
//! from host to host (the sender's host runs the egress half, the receiver's the ingress
//! half) until it is delivered or dropped.
//!
//! A trace never takes the flow cache's shortcut: it notes what the cache holds for the flow,
//! then takes the full path, so that every stage is shown. The cache is kept equal to the
//! full path (the property tests check it), and so is the verdict.

use std::net::Ipv4Addr;

use etherparse::PacketBuilder;

use super::decide::{Decider, Origin};
use super::filter::Side;
use super::flow::FlowCache;
use super::route::{Target, Via};
use super::{Counters, Decision, Dropped, Egress, Ingress, Nat, Pipeline, RuleRef};
use crate::policy::conntrack::{Direction, State as ConnState, Track};
use crate::policy::rules::Protocol;
use crate::reason::DropReason;
use crate::time::Timestamp;
use crate::topology::{HostId, InstanceId, Topology, Transport};
use crate::wire::PacketBuf;
use crate::wire::ipv4::{Ipv4Packet, L4};

/// A stage of the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Where the packet came in, and who sent it.
    Entry,
    /// What the flow cache holds for the flow.
    Cache,
    /// The route (and its table) that matched.
    Route,
    /// A network ACL.
    Acl,
    /// Connection tracking.
    Conntrack,
    /// A security-group list.
    SecurityGroup,
    /// 1:1 NAT.
    Nat,
    /// The key and transport on the wire.
    Wire,
    /// The decision.
    Result,
}

impl Stage {
    /// The stage's name, as printed and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Entry => "entry",
            Stage::Cache => "cache",
            Stage::Route => "route",
            Stage::Acl => "acl",
            Stage::Conntrack => "conntrack",
            Stage::SecurityGroup => "security-group",
            Stage::Nat => "nat",
            Stage::Wire => "wire",
            Stage::Result => "result",
        }
    }
}

/// What one stage found on one host, field by field (`("acl", "acl-web")`, `("rule", "#2")`,
/// `("result", "allow")`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The host it ran on.
    pub host: HostId,
    /// The stage.
    pub stage: Stage,
    /// What it found.
    pub fields: Vec<(&'static str, String)>,
}

/// One host's part of a trace.
#[derive(Debug, Clone)]
pub struct HostTrace {
    /// The host.
    pub host: HostId,
    /// Its decision.
    pub decision: Decision,
    /// Its stages, in order.
    pub steps: Vec<Step>,
    /// Decided with the tables of a running daemon (else empty ones).
    pub live: bool,
}

/// The packet as it leaves a host for the next one, through the underlay.
#[derive(Debug, Clone)]
pub struct Next {
    /// The receiving host.
    pub host: HostId,
    /// What that host reads: the outer IPv4 packet (`gre`) or the UDP payload (`gre-udp`).
    pub packet: Vec<u8>,
    /// How it reads it.
    pub from: Ingress,
}

/// Where the packet ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Written to an instance's device.
    Delivered {
        /// The instance.
        to: InstanceId,
        /// Its host.
        host: HostId,
    },
    /// Written to the internet's device, on the gateway.
    ToInternet {
        /// The gateway.
        host: HostId,
    },
    /// Answered with ICMP "fragmentation needed" to its sender.
    Replied {
        /// The sender.
        to: InstanceId,
        /// Its host.
        host: HostId,
    },
    /// Dropped.
    Dropped {
        /// Where.
        host: HostId,
        /// At which stage (the last one that ran).
        stage: Stage,
        /// Why, and by which rule.
        dropped: Dropped,
    },
}

/// A whole trace: each host's part, and the verdict.
#[derive(Debug, Clone)]
pub struct Trace {
    /// The hosts in the order the packet visited them.
    pub hops: Vec<HostTrace>,
    /// Where it ended.
    pub verdict: Verdict,
}

/// Where a decision being traced writes its notes, and the flow cache it only looks at.
pub(super) struct Sink<'a> {
    /// The notes.
    pub steps: &'a mut Vec<Step>,
    /// The pipeline's flow cache (the decision being traced runs with an empty one).
    pub cache: &'a FlowCache,
}

/// A host's part of a trace, and the packet it sends on (if it sends one).
pub type Hop = (HostTrace, Option<Next>);

/// Hosts a trace visits at most (sender, internet gateway, receiver, and room to spare).
const MAX_HOPS: usize = 8;

impl Decider<'_> {
    /// True when a trace is being taken.
    #[inline]
    pub fn tracing(&self) -> bool {
        self.trace.is_some()
    }

    /// Notes what a stage found, if a trace is being taken: `fields` runs only then. The
    /// decision's own code sees one branch; the note is made out of line.
    #[inline(always)]
    pub fn note(&mut self, stage: Stage, fields: impl FnOnce(&Topology) -> Fields) {
        if self.trace.is_some() {
            self.note_cold(stage, fields);
        }
    }

    #[cold]
    #[inline(never)]
    fn note_cold(&mut self, stage: Stage, fields: impl FnOnce(&Topology) -> Fields) {
        if let Some(t) = self.trace.as_mut() {
            t.steps.push(Step {
                host: self.host.host,
                stage,
                fields: fields(self.topo),
            });
        }
    }
}

impl Pipeline {
    /// Decides `packet` as [`Pipeline::decide`] would, on a copy of this pipeline's
    /// connections (nothing here changes), noting every stage; and the packet it sends to the
    /// next host. The flow cache is looked at, not copied: the trace takes the full path.
    pub fn trace(&self, packet: &[u8], from: Ingress, now: Timestamp) -> Hop {
        let mut state = super::State {
            conntrack: self.state.conntrack.clone(),
            flows: FlowCache::new(2, self.seed),
            frags: self.state.frags.clone(),
            counters: Counters::new(self.topo.instances.len()),
        };
        let mut steps = Vec::new();
        let sink = Sink {
            steps: &mut steps,
            cache: &self.state.flows,
        };
        let mut decider = Decider {
            topo: &self.topo,
            host: &self.view,
            state: &mut state,
            now,
            cacheable: true,
            trace: Some(sink),
            receiver: None,
            via: Default::default(),
        };
        let decision = decider.decide(packet, from, false);
        let host = self.view.host;
        if steps.is_empty() {
            steps.push(Step {
                host,
                stage: Stage::Entry,
                fields: vec![("ingress", ingress_name(&self.topo, from))],
            });
        }
        let next = self.next_hop(&decision, packet, &mut steps);
        steps.push(Step {
            host,
            stage: Stage::Result,
            fields: result_fields(&self.topo, &decision),
        });
        let trace = HostTrace {
            host,
            decision,
            steps,
            live: false,
        };
        (trace, next)
    }

    /// The NAT and the wire of a forwarding decision, as its transmit plan makes them, noted;
    /// the underlay packet for the next host.
    fn next_hop(&self, d: &Decision, packet: &[u8], steps: &mut Vec<Step>) -> Option<Next> {
        let host = self.view.host;
        let nat = match *d {
            Decision::Deliver { nat, .. }
            | Decision::ToInternet { nat, .. }
            | Decision::Encapsulate { nat, .. } => nat,
            _ => Nat::NONE,
        };
        if !nat.is_none() {
            steps.push(Step {
                host,
                stage: Stage::Nat,
                fields: nat_fields(&nat),
            });
        }
        let mut bytes = packet.to_vec();
        let plan = self.transmit_plan(d, &mut bytes, false)?;
        let Egress::Underlay { to, encap, .. } = plan.to else {
            return None;
        };
        let mut buf = PacketBuf::from_packet(&bytes[plan.start..]);
        encap.prepend(&mut buf).ok()?;
        let next = self.topo.host_by_address(to)?;
        let transport = self.topo.underlay.transport;
        steps.push(Step {
            host,
            stage: Stage::Wire,
            fields: wire_fields(&self.topo, encap.key, transport, next, to),
        });
        let from = match transport {
            Transport::Gre => Ingress::UnderlayIp,
            Transport::GreUdp => Ingress::UnderlayUdp {
                from: self.view.address,
            },
        };
        Some(Next {
            host: next,
            packet: buf.as_slice().to_vec(),
            from,
        })
    }
}

/// Follows a packet from its first host to where it ends: `at` traces it on each next host.
pub fn follow(first: Hop, mut at: impl FnMut(&Next) -> Hop) -> Trace {
    let (mut trace, mut next) = first;
    let mut hops = Vec::new();
    while let Some(n) = next.take() {
        hops.push(trace);
        if hops.len() >= MAX_HOPS {
            let host = n.host;
            let dropped = Dropped::from(DropReason::TunnelLoop);
            let verdict = Verdict::Dropped {
                host,
                stage: Stage::Wire,
                dropped,
            };
            return Trace { hops, verdict };
        }
        (trace, next) = at(&n);
    }
    let verdict = verdict_of(&trace);
    hops.push(trace);
    Trace { hops, verdict }
}

/// The verdict of a host's part that sends nothing on.
fn verdict_of(t: &HostTrace) -> Verdict {
    let host = t.host;
    match t.decision {
        Decision::Deliver { to, .. } => Verdict::Delivered { to, host },
        Decision::ToInternet { .. } => Verdict::ToInternet { host },
        Decision::FragNeeded { to, .. } => Verdict::Replied { to, host },
        Decision::Drop(dropped) => Verdict::Dropped {
            host,
            stage: deciding_stage(&t.steps),
            dropped,
        },
        // An encapsulation whose host the topology does not know (it cannot make one).
        Decision::Encapsulate { .. } => Verdict::Dropped {
            host,
            stage: Stage::Wire,
            dropped: DropReason::UnknownUnderlaySource.into(),
        },
    }
}

/// The stage that decided a drop: the last one before the result.
fn deciding_stage(steps: &[Step]) -> Stage {
    steps
        .iter()
        .rev()
        .map(|s| s.stage)
        .find(|s| *s != Stage::Result)
        .unwrap_or(Stage::Entry)
}

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

fn nat_fields(nat: &Nat) -> Vec<(&'static str, String)> {
    let mut f = Vec::new();
    if let Some(s) = nat.src {
        f.push(("source", s.to_string()));
    }
    if let Some(d) = nat.dst {
        f.push(("destination", d.to_string()));
    }
    f
}

fn wire_fields(
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

fn result_fields(t: &Topology, d: &Decision) -> Vec<(&'static str, String)> {
    let name = |id: InstanceId| t.instance(id).name.clone();
    match *d {
        Decision::Deliver { to, .. } => vec![("result", "deliver".into()), ("to", name(to))],
        Decision::Encapsulate { host, .. } => vec![
            ("result", "encapsulate".into()),
            ("to", t.host(host).name.clone()),
        ],
        Decision::ToInternet { .. } => vec![("result", "to the internet".into())],
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

/// Fields of what a stage found; built only while tracing.
pub(super) type Fields = Vec<(&'static str, String)>;

/// The entry: who sent the packet, how it came in, and the packet.
pub(super) fn entry_fields(t: &Topology, origin: Origin, ip: &Ipv4Packet) -> Fields {
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
pub(super) fn packet_summary(ip: &Ipv4Packet) -> String {
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
pub(super) fn cache_fields(t: &Topology, hit: Option<Decision>) -> Fields {
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
pub(super) fn route_fields(t: &Topology, via: Via, target: &Result<Target, Decision>) -> Fields {
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
pub(super) fn side_name(t: &Topology, side: &Side) -> String {
    let dir = if side.ingress { "ingress" } else { "egress" };
    format!("{} {dir}", t.instance(side.instance).name)
}

/// A connection's state, as `conntrack -L` would say it.
pub(super) fn state_name(s: &ConnState) -> String {
    match s {
        ConnState::Tcp(tcp) => format!("{:?}", tcp.state).to_uppercase(),
        ConnState::Datagram { replied: true } => "REPLIED".into(),
        ConnState::Datagram { replied: false } => "UNREPLIED".into(),
    }
}

/// Connection tracking of one side: the entry found (its state before the packet), and what
/// tracking made of the packet.
pub(super) fn tracked_fields(
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
pub(super) fn group_fields(
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
pub(super) fn acl_fields(
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
