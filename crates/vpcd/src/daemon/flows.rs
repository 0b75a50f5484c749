//! `vpcd ctl flows`: each worker's connections as rows named in its topology, and the text
//! people read of them.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::pipeline::{BASIC_ZONE, Decision, FlowEntry, INTERNET_ZONE};
use crate::policy::conntrack::{State, Zone};
use crate::topology::Topology;
use crate::wire::ipv4::proto;

/// What a worker answers to `Msg::Flows`.
pub enum FlowsAnswer {
    /// Its connections, one JSON object each.
    Listed(Vec<Value>),
    /// How many it removed.
    Flushed(usize),
}

/// The name of a connection-tracking zone: its VPC, `basic` or `internet`.
fn zone_name(t: &Topology, z: Zone) -> String {
    match z {
        BASIC_ZONE => "basic".into(),
        INTERNET_ZONE => "internet".into(),
        Zone(k) => u32::try_from(k)
            .ok()
            .and_then(|k| t.vpc_by_key(k))
            .map_or_else(|| format!("zone-{k}"), |v| t.vpc(v).name.clone()),
    }
}

fn protocol_name(p: u8) -> String {
    match p {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::ICMP => "icmp".into(),
        p => p.to_string(),
    }
}

/// A cached decision as people name it: `deliver web-1`, `encapsulate host-b`, `drop SgIngress`.
fn verdict(t: &Topology, d: Option<Decision>) -> Value {
    let Some(d) = d else {
        return Value::Null;
    };
    let name = |id: crate::topology::InstanceId| {
        t.instances.get(id.index()).map_or("?", |i| i.name.as_str())
    };
    json!(match d {
        Decision::Deliver { to, .. } => format!("deliver {}", name(to)),
        Decision::Encapsulate { host, .. } => {
            format!(
                "encapsulate {}",
                t.hosts.get(host.index()).map_or("?", |h| h.name.as_str())
            )
        }
        Decision::ToInternet { .. } => "to-internet".into(),
        Decision::FragNeeded { .. } => "frag-needed".into(),
        Decision::EchoReply { .. } => "echo-reply".into(),
        Decision::Drop(x) => format!("drop {}", x.reason.name()),
    })
}

/// One connection as `vpcd ctl flows --json` lists it.
pub fn row(t: &Topology, f: &FlowEntry) -> Value {
    let c = &f.conn;
    let (src, dst) = (c.opener, c.peer());
    let state = match c.state {
        State::Tcp(tcp) => tcp.state.name(),
        State::Datagram { replied: true } => "REPLIED",
        State::Datagram { replied: false } => "UNREPLIED",
    };
    let instance = f.instance.map(|id| t.instance(id));
    let network = instance.map_or_else(
        || zone_name(t, c.key.port.zone),
        |i| match i.vpc() {
            Some(v) => t.vpc(v).name.clone(),
            None => "basic".into(),
        },
    );
    json!({
        "instance": instance.map(|i| i.name.clone()),
        "network": network,
        "protocol": protocol_name(c.key.protocol),
        "src": src.addr.to_string(),
        "sport": src.port,
        "src_zone": zone_name(t, src.zone),
        "dst": dst.addr.to_string(),
        "dport": dst.port,
        "dst_zone": zone_name(t, dst.zone),
        "state": state,
        "age_ms": f.age_ms,
        "left_ms": f.left_ms,
        "original": {"packets": c.packets[0], "bytes": c.bytes[0]},
        "reply": {"packets": c.packets[1], "bytes": c.bytes[1]},
        "verdict": {"original": verdict(t, f.verdicts[0]), "reply": verdict(t, f.verdicts[1])},
    })
}

/// The listing for people: one line per connection, then how many.
pub fn text(rows: &[Value]) -> String {
    let mut s = String::new();
    for r in rows {
        let side = |d: &str| {
            format!(
                "{} pkts {} B",
                r[d]["packets"].as_u64().unwrap_or(0),
                r[d]["bytes"].as_u64().unwrap_or(0)
            )
        };
        let cached = |d: &str| r["verdict"][d].as_str().unwrap_or("-").to_string();
        let (src, dst) = (
            r["src"].as_str().unwrap_or("?"),
            r["dst"].as_str().unwrap_or("?"),
        );
        let ends = if r["protocol"] == "icmp" {
            format!("{src} -> {dst} id {}", r["sport"])
        } else {
            format!("{src}:{} -> {dst}:{}", r["sport"], r["dport"])
        };
        let _ = writeln!(
            s,
            "{} {} {} {ends} {} age {}s left {}s orig {} reply {} cached {} / {}",
            r["instance"].as_str().unwrap_or("?"),
            r["network"].as_str().unwrap_or("?"),
            r["protocol"].as_str().unwrap_or("?"),
            r["state"].as_str().unwrap_or("?"),
            r["age_ms"].as_u64().unwrap_or(0) / 1000,
            r["left_ms"].as_u64().unwrap_or(0) / 1000,
            side("original"),
            side("reply"),
            cached("original"),
            cached("reply"),
        );
    }
    let n = rows.len();
    let _ = writeln!(s, "{n} connection{}", if n == 1 { "" } else { "s" });
    s
}
