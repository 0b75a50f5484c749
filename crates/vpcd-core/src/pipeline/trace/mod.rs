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

mod fields;
mod probe;

pub(super) use fields::{
    Fields, acl_fields, cache_fields, entry_fields, group_fields, route_fields, side_name,
    tracked_fields,
};
pub use fields::{ingress_name, rule_label};
pub use probe::{PROBE_PORT, Probe, probe, probe_packet};

use super::decide::Decider;
use super::flow::FlowCache;
use super::{Counters, Decision, Dropped, Egress, Ingress, Nat, Pipeline};
use crate::reason::DropReason;
use crate::time::Timestamp;
use crate::topology::{HostId, InstanceId, Topology, Transport};
use crate::wire::PacketBuf;
use fields::{nat_fields, result_fields, wire_fields};

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
    /// Load balancing: the session or new pick, or the VIP's own answer.
    Balance,
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
            Stage::Balance => "load-balancer",
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
    /// Answered by vpcd itself: ICMP "fragmentation needed" to its sender, or (`echo`) a
    /// load balancer's VIP answering an echo request.
    Replied {
        /// The sender.
        to: InstanceId,
        /// Its host.
        host: HostId,
        /// The VIP's echo reply (else fragmentation needed).
        echo: bool,
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
            balancer: self.state.balancer.clone(),
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
            lb_nat: crate::wire::nat::Nat::NONE,
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
        Decision::FragNeeded { to, .. } => Verdict::Replied {
            to,
            host,
            echo: false,
        },
        Decision::EchoReply { to } => Verdict::Replied {
            to,
            host,
            echo: true,
        },
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
