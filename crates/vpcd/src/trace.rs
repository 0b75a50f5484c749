//! `vpcd trace` and `vpcd ctl trace`: a packet the user describes, taken through the
//! pipeline's own decision on each host it visits ([`vpcd_core::pipeline::trace`]), and the
//! trace printed for people or as JSON.
//!
//! Offline, every host decides with empty tables (no connection, nothing cached): the
//! answer the topology gives to a first packet. Live, the daemon's own host decides with its
//! tables as they are (its connections, its flow cache) and the other hosts with empty ones;
//! each host's part says which.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use vpcd_core::pipeline::trace::{self, Hop, Next, Probe, Stage, Trace, Verdict};
use vpcd_core::policy::rules::Protocol;
use vpcd_core::{Pipeline, Timestamp, Topology};

/// What to trace: `--from INSTANCE|internet --to INSTANCE|ADDR --protocol tcp|udp|icmp
/// [--port N]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceArgs {
    /// An instance's name, or `internet`.
    pub from: String,
    /// An instance's name, or an IPv4 address.
    pub to: String,
    /// `tcp`, `udp` or `icmp`.
    pub protocol: String,
    /// The destination port (tcp and udp).
    #[serde(default)]
    pub port: Option<u16>,
}

impl TraceArgs {
    /// The probe packet these arguments describe, in topology `t`.
    pub fn probe(&self, t: &Topology) -> Result<Probe, String> {
        let protocol = match self.protocol.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "icmp" => Protocol::Icmp,
            other => return Err(format!("--protocol {other}: tcp, udp or icmp")),
        };
        if protocol == Protocol::Icmp && self.port.is_some() {
            return Err("--port: icmp has no ports".into());
        }
        trace::probe(t, &self.from, &self.to, protocol, self.port)
    }
}

/// Traces `args` through `t` with empty tables on every host.
pub fn offline(t: &Arc<Topology>, args: &TraceArgs, now: Timestamp) -> Result<Trace, String> {
    let probe = args.probe(t)?;
    let first = fresh(t, probe.host, &probe.packet, probe.from, now);
    Ok(trace::follow(first, |n: &Next| {
        fresh(t, n.host, &n.packet, n.from, now)
    }))
}

/// One host's part, decided by a new pipeline of that host (empty tables).
pub fn fresh(
    t: &Arc<Topology>,
    host: vpcd_core::topology::HostId,
    packet: &[u8],
    from: vpcd_core::Ingress,
    now: Timestamp,
) -> Hop {
    Pipeline::new(t.clone(), host).trace(packet, from, now)
}

/// The verdict in one line: `delivered to db-1 on host-b`, `dropped at security-group by
/// [sg-db]:ingress#no-match on host-b (SgIngress)`.
pub fn verdict_line(t: &Topology, v: &Verdict) -> String {
    let host = |h: vpcd_core::topology::HostId| t.host(h).name.clone();
    match *v {
        Verdict::Delivered { to, host: h } => {
            format!("delivered to {} on {}", t.instance(to).name, host(h))
        }
        Verdict::ToInternet { host: h } => format!("delivered to the internet by {}", host(h)),
        Verdict::Replied { to, host: h, echo } => format!(
            "answered with ICMP {} to {} on {}",
            if echo {
                "echo reply from the VIP"
            } else {
                "fragmentation needed"
            },
            t.instance(to).name,
            host(h)
        ),
        Verdict::Dropped {
            host: h,
            stage,
            dropped,
        } => {
            let by = match dropped.rule {
                Some(r) => format!(" by {}", trace::rule_label(t, dropped.reason, r)),
                None => String::new(),
            };
            format!(
                "dropped at {}{by} on {} ({})",
                stage.name(),
                host(h),
                dropped.reason.name()
            )
        }
    }
}

/// The trace for people: each host's stages, then the verdict.
pub fn text(t: &Topology, tr: &Trace) -> String {
    let mut out = String::new();
    for hop in &tr.hops {
        let tables = if hop.live {
            "live tables"
        } else {
            "empty tables"
        };
        out.push_str(&format!("{} ({tables})\n", t.host(hop.host).name));
        for s in &hop.steps {
            let fields: Vec<String> = s.fields.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            out.push_str(&format!("  {:<15} {}\n", s.stage.name(), fields.join(", ")));
        }
    }
    out.push_str(&format!("verdict: {}\n", verdict_line(t, &tr.verdict)));
    if let Verdict::Dropped { dropped, .. } = tr.verdict {
        out.push_str(&format!("  {}\n", dropped.reason));
    }
    out
}

/// The trace for programs: `{verdict, reason, host, instance, stage, rule, line, stages}`.
pub fn json(t: &Topology, tr: &Trace) -> Value {
    let stages: Vec<Value> = tr
        .hops
        .iter()
        .flat_map(|hop| {
            hop.steps.iter().map(move |s| {
                let mut o = serde_json::Map::new();
                o.insert("host".into(), json!(t.host(s.host).name));
                o.insert("stage".into(), json!(s.stage.name()));
                o.insert("live".into(), json!(hop.live));
                for (k, v) in &s.fields {
                    o.insert((*k).into(), json!(v));
                }
                Value::Object(o)
            })
        })
        .collect();
    let (verdict, host, reason, rule, stage, instance) = match tr.verdict {
        Verdict::Delivered { to, host } => ("delivered", host, None, None, None, Some(to)),
        Verdict::ToInternet { host } => ("delivered", host, None, None, None, None),
        // The VIP's own echo reply: answered, as a delivery is.
        Verdict::Replied {
            to,
            host,
            echo: true,
        } => ("delivered", host, None, None, None, Some(to)),
        // Too big for the path: not delivered; the sender got an ICMP error instead.
        Verdict::Replied { to, host, .. } => (
            "dropped",
            host,
            Some("FragmentationNeeded".to_string()),
            None,
            None,
            Some(to),
        ),
        Verdict::Dropped {
            host,
            stage,
            dropped,
        } => (
            "dropped",
            host,
            Some(dropped.reason.name().to_string()),
            dropped
                .rule
                .map(|r| trace::rule_label(t, dropped.reason, r)),
            Some(stage),
            None,
        ),
    };
    json!({
        "verdict": verdict,
        "reason": reason,
        "host": t.host(host).name,
        "instance": instance.map(|i| t.instance(i).name.clone()),
        "stage": stage.map(Stage::name),
        "rule": rule,
        "line": verdict_line(t, &tr.verdict),
        "stages": stages,
    })
}
