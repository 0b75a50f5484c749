//! The daemon's counters in the Prometheus text exposition format (version 0.0.4), and a
//! minimal HTTP endpoint that serves them (`vpcd run --metrics ADDR:PORT`, `GET /metrics`).
//!
//! Names follow Prometheus' conventions: `vpcd_` prefix, `_total` for counters, base units
//! (packets, bytes). Every sample carries `host`. A drop decided by a rule carries the rule
//! as people name it (`sg-web:ingress#3`, `[sg-web]:ingress#no-match`); drops of the same
//! reason without a rule are the sample without `rule`, so `sum by (reason)` is the reason's
//! total.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use vpcd_core::policy::conntrack::ConntrackStats;
use vpcd_core::topology::HostId;
use vpcd_core::{DropReason, Topology};

use crate::pipeline::trace::rule_label;
use vpcd_core::pipeline::{Counters, Way};

/// A metric's type, as `# TYPE` states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (until a restart or `clear-counters`).
    Counter,
    /// A current value.
    Gauge,
}

/// One metric family: its name, help, type and samples (labels beyond `host`, value).
#[derive(Debug, Clone)]
pub struct Family {
    /// The metric name (`vpcd_drops_total`).
    pub name: &'static str,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// Each sample's labels (after `host`) and value.
    pub samples: Vec<(Vec<(&'static str, String)>, u64)>,
}

impl Family {
    fn new(name: &'static str, kind: Kind, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    fn one(name: &'static str, kind: Kind, help: &'static str, value: u64) -> Family {
        let mut f = Family::new(name, kind, help);
        f.samples.push((Vec::new(), value));
        f
    }
}

/// What one daemon counts, at one moment.
pub struct Snapshot<'a> {
    /// The topology in force (names of rules and instances).
    pub topology: &'a Topology,
    /// This host.
    pub host: HostId,
    /// The workers' counters, summed.
    pub counters: &'a Counters,
    /// The connection tables' counters, summed.
    pub conntrack: ConntrackStats,
    /// Live connections.
    pub connections: usize,
}

/// Every family of a snapshot.
pub fn families(s: &Snapshot<'_>) -> Vec<Family> {
    let c = s.counters;
    let mut out = vec![
        Family::one(
            "vpcd_delivered_packets_total",
            Kind::Counter,
            "Packets written to a local instance.",
            c.delivered,
        ),
        Family::one(
            "vpcd_encapsulated_packets_total",
            Kind::Counter,
            "Packets encapsulated towards another host.",
            c.encapsulated,
        ),
        Family::one(
            "vpcd_to_internet_packets_total",
            Kind::Counter,
            "Packets written to the internet device.",
            c.to_internet,
        ),
        Family::one(
            "vpcd_icmp_errors_sent_total",
            Kind::Counter,
            "ICMP errors vpcd itself sent back to an instance.",
            c.replied,
        ),
        Family::one(
            "vpcd_flow_cache_hits_total",
            Kind::Counter,
            "Decisions served from the flow cache.",
            c.cache_hits,
        ),
        Family::one(
            "vpcd_flow_cache_misses_total",
            Kind::Counter,
            "Decisions that took the full path.",
            c.cache_misses,
        ),
    ];
    out.extend(conntrack(s));
    out.push(drops(s));
    out.extend(instances(s));
    out
}

fn conntrack(s: &Snapshot<'_>) -> Vec<Family> {
    let ct = s.conntrack;
    let mut refused = Family::new(
        "vpcd_conntrack_refused_total",
        Kind::Counter,
        "New connections refused: the host's table or the owner's share was full.",
    );
    refused
        .samples
        .push((vec![("limit", "host".into())], ct.refused_full));
    refused
        .samples
        .push((vec![("limit", "instance".into())], ct.refused_instance));
    vec![
        Family::one(
            "vpcd_conntrack_entries",
            Kind::Gauge,
            "Live connection-table entries.",
            s.connections as u64,
        ),
        Family::one(
            "vpcd_conntrack_created_total",
            Kind::Counter,
            "Connection-table entries created.",
            ct.created,
        ),
        Family::one(
            "vpcd_conntrack_evicted_total",
            Kind::Counter,
            "Entries evicted to make room.",
            ct.evicted,
        ),
        Family::one(
            "vpcd_conntrack_expired_total",
            Kind::Counter,
            "Entries that expired.",
            ct.expired,
        ),
        refused,
    ]
}

/// Drops by reason, and by deciding rule where a rule decided.
fn drops(s: &Snapshot<'_>) -> Family {
    let mut f = Family::new(
        "vpcd_drops_total",
        Kind::Counter,
        "Dropped packets by reason, and by the rule that decided where one did.",
    );
    for r in DropReason::ALL {
        let mut ruled = 0;
        for ((reason, rule), n) in s.counters.rule_drops().filter(|((x, _), _)| x == r) {
            ruled += n;
            let label = rule_label(s.topology, reason, rule);
            f.samples
                .push((vec![("reason", r.name().to_string()), ("rule", label)], n));
        }
        let rest = s.counters.drops(*r).saturating_sub(ruled);
        if rest > 0 || ruled == 0 {
            f.samples
                .push((vec![("reason", r.name().to_string())], rest));
        }
    }
    f
}

fn instances(s: &Snapshot<'_>) -> Vec<Family> {
    let mut fams = [
        Family::new(
            "vpcd_instance_tx_packets_total",
            Kind::Counter,
            "Packets an instance sent that were forwarded.",
        ),
        Family::new(
            "vpcd_instance_tx_dropped_packets_total",
            Kind::Counter,
            "Packets an instance sent that were dropped.",
        ),
        Family::new(
            "vpcd_instance_rx_packets_total",
            Kind::Counter,
            "Packets delivered to an instance.",
        ),
        Family::new(
            "vpcd_instance_rx_dropped_packets_total",
            Kind::Counter,
            "Packets for an instance that were dropped on this host on its receiving side.",
        ),
        Family::new(
            "vpcd_instance_tx_bytes_total",
            Kind::Counter,
            "Bytes (IP level) of the packets an instance sent that were forwarded.",
        ),
        Family::new(
            "vpcd_instance_rx_bytes_total",
            Kind::Counter,
            "Bytes (IP level) of the packets delivered to an instance.",
        ),
    ];
    for id in s.topology.instances_on(s.host) {
        let (i, inst) = (id.index(), s.topology.instance(id));
        let p = s.counters.port(i);
        let values = [
            p.sent,
            p.sent_dropped,
            p.received,
            p.received_dropped,
            p.sent_bytes,
            p.received_bytes,
        ];
        for (f, v) in fams.iter_mut().zip(values) {
            f.samples.push((vec![("instance", inst.name.clone())], v));
        }
    }
    let mut out: Vec<Family> = fams.into();
    out.push(instance_drops(s));
    out
}

/// Each instance's drops by way and reason (only those that happened).
fn instance_drops(s: &Snapshot<'_>) -> Family {
    let mut drops = Family::new(
        "vpcd_instance_drops_total",
        Kind::Counter,
        "An instance's dropped packets by way (tx: it sent them; rx: they were for it) and reason; only reasons that happened.",
    );
    for id in s.topology.instances_on(s.host) {
        let (i, inst) = (id.index(), s.topology.instance(id));
        for (way, reason, n) in s.counters.port_drops(i) {
            let way = match way {
                Way::Sent => "tx",
                Way::Received => "rx",
            };
            let labels = vec![
                ("instance", inst.name.clone()),
                ("way", way.to_string()),
                ("reason", reason.name().to_string()),
            ];
            drops.samples.push((labels, n));
        }
    }
    drops
}

/// The underlay sockets' traffic: datagrams and bytes each way, receive errors (transmit
/// errors are `vpcd_tx_errors_total{port="underlay"}`).
pub fn underlay(u: &crate::daemon::UnderlayCounters) -> Vec<Family> {
    let c = Kind::Counter;
    vec![
        Family::one(
            "vpcd_underlay_rx_packets_total",
            c,
            "Datagrams received from the underlay.",
            u.rx_packets,
        ),
        Family::one(
            "vpcd_underlay_rx_bytes_total",
            c,
            "Bytes of the datagrams received from the underlay, as the socket delivers them.",
            u.rx_bytes,
        ),
        Family::one(
            "vpcd_underlay_rx_errors_total",
            c,
            "Underlay receive calls that failed.",
            u.rx_errors,
        ),
        Family::one(
            "vpcd_underlay_tx_packets_total",
            c,
            "Datagrams handed to the underlay socket to send.",
            u.tx_packets,
        ),
        Family::one(
            "vpcd_underlay_tx_bytes_total",
            c,
            "Bytes of the datagrams handed to the underlay socket, as sent.",
            u.tx_bytes,
        ),
    ]
}

/// The text exposition of `families`, every sample labelled with `host`.
pub fn render(host: &str, families: &[Family]) -> String {
    let mut out = String::new();
    for f in families {
        let kind = match f.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {kind}", f.name);
        for (labels, value) in &f.samples {
            let _ = write!(out, "{}{{host=\"{}\"", f.name, escape(host));
            for (k, v) in labels {
                let _ = write!(out, ",{k}=\"{}\"", escape(v));
            }
            let _ = writeln!(out, "}} {value}");
        }
    }
    out
}

/// A label value as the format wants it: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` on `addr` from a thread of its own: each scrape calls `text`.
/// Anything else gets a 404; a client that sends nothing within 2 s is dropped.
pub fn serve(
    addr: SocketAddr,
    text: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("vpcd-metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = answer(stream, &*text);
            }
        })?;
    Ok(bound)
}

fn answer(mut stream: TcpStream, text: &dyn Fn() -> String) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    // A request line longer than 8 KiB is cut there (and answered 404).
    BufReader::new(Read::take(&stream, 8192)).read_line(&mut line)?;
    let (status, body) = match line.split_whitespace().collect::<Vec<_>>()[..] {
        ["GET", "/metrics", ..] => ("200 OK", text()),
        _ => ("404 Not Found", "only GET /metrics is served\n".to_string()),
    };
    write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_name(n: &str) -> bool {
        let mut c = n.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
    }

    #[test]
    fn label_values_are_escaped_and_names_are_valid() {
        let mut f = Family::new("vpcd_drops_total", Kind::Counter, "Drops.");
        f.samples.push((
            vec![
                ("reason", "SgIngress".into()),
                ("rule", "[a\"b]\\:x\ny".into()),
            ],
            3,
        ));
        let text = render("host-a", &[f]);
        assert!(text.contains(
            "vpcd_drops_total{host=\"host-a\",reason=\"SgIngress\",rule=\"[a\\\"b]\\\\:x\\ny\"} 3\n"
        ));
        assert!(
            text.starts_with("# HELP vpcd_drops_total Drops.\n# TYPE vpcd_drops_total counter\n")
        );
    }

    #[test]
    fn every_family_of_a_topology_has_a_valid_name_and_host() {
        let t = Topology::parse(
            "[[host]]\nname = \"h1\"\naddress = \"192.0.2.1\"\n",
            "t.toml",
        )
        .unwrap();
        let c = Counters::new(0);
        let s = Snapshot {
            topology: &t,
            host: t.host_named("h1").unwrap(),
            counters: &c,
            conntrack: ConntrackStats::default(),
            connections: 0,
        };
        let fams = families(&s);
        assert!(fams.iter().all(|f| valid_name(f.name)));
        let text = render("h1", &fams);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.contains("{host=\"h1\""), "{line}");
        }
        // Every reason appears once without a rule when nothing was dropped.
        let reasons = text
            .lines()
            .filter(|l| l.starts_with("vpcd_drops_total{"))
            .count();
        assert_eq!(reasons, DropReason::ALL.len());
    }
}
