//! Packet capture taps (`vpcd ctl capture`): what the workers copy out, and the thread that
//! writes it to a pcapng file ([`crate::capture`]).
//!
//! A capture installs one [`Tap`] in every worker (`Msg::Capture(Some(tap))`) and removes it
//! when it ends (`Msg::Capture(None)`). A worker without a tap pays one branch on an `Option`
//! that is `None` per packet (or per batch) and copies nothing. With a tap, the packets it
//! watches are copied into [`Record`]s and offered to a bounded channel; a full channel (the
//! writer behind) loses the record and counts it, it never makes a worker wait.
//!
//! What each capture point sees:
//! - an instance (or the internet's device): every packet read from its device (direction
//!   in: the instance sent it) and every packet vpcd writes to it (out). A TSO super-packet
//!   read from the device is recorded as read, whole (one record, up to 64 KiB); packets
//!   written are recorded one by one as decided, before consecutive TCP segments are
//!   coalesced into one write (the instance's kernel sees the same bytes, as segments);
//! - `underlay`: every datagram received (in) and sent (out). For `gre` these are the IPv4
//!   packets the raw socket reads and writes; for `gre-udp` the socket deals in UDP payloads,
//!   so each is recorded behind a synthetic IPv4 and UDP header (the two hosts' underlay
//!   addresses, port 4754 both ways, no UDP checksum), which tshark decodes as GRE with
//!   `-d udp.port==4754,gre`. A GRO train is recorded datagram by datagram, and a
//!   super-packet cut for the underlay segment by segment, as they go on the wire;
//! - `drops`: every packet the pipeline (or the worker: no headroom, an instance that left)
//!   drops, as it arrived (direction in), with the reason, the rule and the port it came
//!   from as the packet's comment.

use std::fs::File;
use std::io::BufWriter;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use super::worker::{Lane, Msg};
use crate::capture::{Direction, PcapNg};
use crate::pipeline::{Dropped, Ingress};
use crate::topology::{InstanceId, Topology};
use crate::wire::{gre, ipv4};

/// The name of the point of the capture running on a daemon, if one is: set by the control
/// loop when a capture starts, cleared by its writer when it is over.
pub type Busy = Arc<Mutex<Option<String>>>;

/// Records queued between the workers and the writer, at most (a record holds up to 64 KiB).
pub const QUEUE: usize = 1024;

/// What a capture watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Point {
    /// A local instance's device, by name (its id in the worker's topology, if there).
    Instance {
        /// The instance's name.
        name: String,
        /// Its id in the topology the worker is in (`None`: it left).
        id: Option<InstanceId>,
    },
    /// The internet's device (on the internet gateway).
    Internet,
    /// The underlay socket.
    Underlay,
    /// Every dropped packet.
    Drops,
}

impl Point {
    /// Its name in the file (the interface's name) and in replies.
    pub fn name(&self) -> &str {
        match self {
            Point::Instance { name, .. } => name,
            Point::Internet => "internet",
            Point::Underlay => "underlay",
            Point::Drops => "drops",
        }
    }
}

/// Why and where a recorded packet was dropped.
pub struct DropNote {
    /// The reason and the rule.
    pub dropped: Dropped,
    /// The port it came from.
    pub from: Ingress,
    /// The topology it was decided in (for the rule's and the port's names).
    pub topo: Arc<Topology>,
}

/// One captured packet.
pub struct Record {
    /// When, since the Unix epoch.
    pub at: Duration,
    /// Into vpcd from the port, or out of vpcd to it.
    pub dir: Direction,
    /// The bytes: an IPv4 packet.
    pub bytes: Vec<u8>,
    /// For a drop, what dropped it.
    pub drop: Option<DropNote>,
}

/// A worker's tap: what to copy and where to.
#[derive(Clone)]
pub struct Tap {
    point: Point,
    /// This host's underlay address (the synthetic headers of `gre-udp` datagrams).
    host: Ipv4Addr,
    /// The transport is `gre-udp`: underlay datagrams are UDP payloads.
    udp: bool,
    tx: Sender<Record>,
    lost: Arc<AtomicU64>,
}

impl Tap {
    /// A tap on `point` of the host at underlay address `host`, feeding `tx`; records that do
    /// not fit are counted in `lost`.
    pub fn new(
        point: Point,
        host: Ipv4Addr,
        udp: bool,
        tx: Sender<Record>,
        lost: Arc<AtomicU64>,
    ) -> Tap {
        Tap {
            point,
            host,
            udp,
            tx,
            lost,
        }
    }

    /// Finds the watched instance again in the topology `t` a worker moves to (ids follow
    /// the file's order).
    pub fn follow(&mut self, t: &Topology) {
        if let Point::Instance { name, id } = &mut self.point {
            *id = t.instance_named(name);
        }
    }

    /// The device it watches, as the port packets read from it come from.
    pub fn device(&self) -> Option<Ingress> {
        match self.point {
            Point::Instance { id, .. } => id.map(Ingress::Instance),
            Point::Internet => Some(Ingress::Internet),
            _ => None,
        }
    }

    /// Whether it watches the underlay.
    pub fn underlay(&self) -> bool {
        self.point == Point::Underlay
    }

    /// Whether it watches drops.
    pub fn drops(&self) -> bool {
        self.point == Point::Drops
    }

    /// Records a packet of a device it watches.
    pub fn packet(&self, dir: Direction, bytes: &[u8]) {
        self.offer(dir, &[bytes], None, None);
    }

    /// Records an underlay datagram, made of `parts`, from or to the host at `peer`.
    pub fn datagram(&self, dir: Direction, peer: Ipv4Addr, parts: &[&[u8]]) {
        let ends = match dir {
            Direction::In => (peer, self.host),
            Direction::Out => (self.host, peer),
        };
        self.offer(dir, parts, self.udp.then_some(ends), None);
    }

    /// Records a dropped packet that came from `from`.
    pub fn dropped(&self, bytes: &[u8], from: Ingress, dropped: Dropped, topo: &Arc<Topology>) {
        let wrap = match from {
            Ingress::UnderlayUdp { from } => Some((from, self.host)),
            _ => None,
        };
        let note = DropNote {
            dropped,
            from,
            topo: topo.clone(),
        };
        self.offer(Direction::In, &[bytes], wrap, Some(note));
    }

    /// Copies `parts` (behind a synthetic IPv4 + UDP header from `wrap.0` to `wrap.1`, if
    /// given) into a record and offers it to the writer.
    fn offer(
        &self,
        dir: Direction,
        parts: &[&[u8]],
        wrap: Option<(Ipv4Addr, Ipv4Addr)>,
        drop: Option<DropNote>,
    ) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut bytes = Vec::with_capacity(len + UDP_HEADERS);
        if let Some((src, dst)) = wrap {
            bytes.extend_from_slice(&udp_headers(src, dst, len));
        }
        for p in parts {
            bytes.extend_from_slice(p);
        }
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let record = Record {
            at,
            dir,
            bytes,
            drop,
        };
        if let Err(TrySendError::Full(_)) = self.tx.try_send(record) {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The length of the synthetic IPv4 and UDP headers.
const UDP_HEADERS: usize = ipv4::HEADER_LEN + 8;

/// An IPv4 and a UDP header (port 4754 both ways, no checksum) for a payload of `len` bytes.
fn udp_headers(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> [u8; UDP_HEADERS] {
    let mut h = [0u8; UDP_HEADERS];
    let total = u16::try_from(len + UDP_HEADERS).unwrap_or(u16::MAX);
    ipv4::emit_header(&mut h, src, dst, ipv4::proto::UDP, 0, total);
    let udp = &mut h[ipv4::HEADER_LEN..];
    udp[0..2].copy_from_slice(&gre::UDP_PORT.to_be_bytes());
    udp[2..4].copy_from_slice(&gre::UDP_PORT.to_be_bytes());
    let udp_len = u16::try_from(len + 8).unwrap_or(u16::MAX);
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    h
}

/// A drop's comment: `drop: SgIngress by sg-web:ingress#no-match on host-a, from web-1`.
pub fn comment(note: &DropNote, host: &str) -> String {
    let t = &note.topo;
    let from = match note.from {
        Ingress::Instance(id) => t
            .instances
            .get(id.index())
            .map_or("?".to_string(), |i| i.name.clone()),
        Ingress::Internet => "internet".to_string(),
        Ingress::UnderlayIp => "underlay".to_string(),
        Ingress::UnderlayUdp { from } => format!("underlay {from}"),
    };
    let reason = note.dropped.reason;
    match note.dropped.rule {
        Some(rule) => format!(
            "drop: {} by {} on {host}, from {from}",
            reason.name(),
            super::rule_label(t, reason, rule)
        ),
        None => format!("drop: {} on {host}, from {from}", reason.name()),
    }
}

/// A capture in progress: what its writer thread needs.
pub struct Capture {
    /// What it watches.
    pub point: Point,
    /// The file, opened.
    pub file: File,
    /// Its path, for the reply.
    pub path: PathBuf,
    /// Stop after this many packets.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Duration,
    /// This host's name (in drop comments).
    pub host: String,
}

/// How a capture went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Packets written.
    pub written: u64,
    /// Records lost because the writer was behind.
    pub lost: u64,
    /// How long it ran.
    pub elapsed: Duration,
}

/// Writes the records of `rx` to the capture's file until its count or duration is reached,
/// then removes the workers' taps (`lanes`) and clears `busy`.
pub fn write(
    c: Capture,
    rx: Receiver<Record>,
    lost: &AtomicU64,
    lanes: &[Lane],
    busy: &Busy,
) -> std::io::Result<Outcome> {
    let started = Instant::now();
    let result = write_records(&c, &rx, started);
    for lane in lanes {
        lane.send_blocking(Msg::Capture(None));
    }
    // After the taps: a capture started now comes after their removal in every inbox.
    *busy.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let written = result?;
    Ok(Outcome {
        written,
        lost: lost.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    })
}

/// The writing loop of [`write`]: returns the packets written.
fn write_records(c: &Capture, rx: &Receiver<Record>, started: Instant) -> std::io::Result<u64> {
    let out = BufWriter::new(c.file.try_clone()?);
    let mut file = PcapNg::new(out, &[c.point.name()])?;
    let deadline = started + c.duration;
    let limit = c.count.unwrap_or(u64::MAX);
    while file.written() < limit {
        let wait = deadline.saturating_duration_since(Instant::now());
        let r = match rx.recv_timeout(wait) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        };
        let note = r.drop.as_ref().map(|n| comment(n, &c.host));
        file.packet(0, r.at, r.dir, &r.bytes, note.as_deref())?;
    }
    let written = file.written();
    file.finish()?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The synthetic headers of a `gre-udp` datagram: a valid IPv4 header, UDP 4754 to 4754,
    /// the lengths of the whole.
    #[test]
    fn udp_datagrams_get_valid_headers() {
        let (a, b) = (Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2));
        let h = udp_headers(a, b, 100);
        assert_eq!(ipv4::checksum(&h[..20]), 0);
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), 128);
        assert_eq!(h[9], ipv4::proto::UDP);
        assert_eq!((&h[12..16], &h[16..20]), (&a.octets()[..], &b.octets()[..]));
        assert_eq!(&h[20..24], &[0x12, 0x92, 0x12, 0x92]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 108);
        // Too long for the fields: the largest value, not a wrapped one.
        let h = udp_headers(a, b, 70_000);
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), u16::MAX);
    }

    /// A drop's comment names the reason, the rule (when one decided), the host and the port
    /// the packet came from.
    #[test]
    fn a_drops_comment_says_why_where_and_from_where() {
        use crate::pipeline::RuleRef;
        use crate::reason::DropReason;
        let text = r#"
[[host]]
name = "a"
address = "192.0.2.1"
[[vpc]]
name = "v"
tenant = "t"
cidr = "10.0.0.0/16"
[[subnet]]
name = "s"
vpc = "v"
cidr = "10.0.1.0/24"
[[security_group]]
name = "sg"
[[instance]]
name = "web"
host = "a"
subnet = "s"
ip = "10.0.1.10"
security_groups = ["sg"]
"#;
        let t = Arc::new(Topology::parse(text, "t.toml").unwrap_or_else(|e| panic!("{e}")));
        let web = InstanceId(0);
        let note = |reason, rule, from| DropNote {
            dropped: Dropped { reason, rule },
            from,
            topo: t.clone(),
        };
        let end = Some(RuleRef::SecurityGroupsEnd { instance: web });
        let sg = note(DropReason::SgEgress, end, Ingress::Instance(web));
        assert_eq!(
            comment(&sg, "a"),
            "drop: SgEgress by [sg]:egress#no-match on a, from web"
        );
        let peer = Ipv4Addr::new(192, 0, 2, 9);
        let odd = note(
            DropReason::NoRoute,
            None,
            Ingress::UnderlayUdp { from: peer },
        );
        assert_eq!(
            comment(&odd, "a"),
            "drop: NoRoute on a, from underlay 192.0.2.9"
        );
    }

    /// A full queue loses the record and counts it; a tap never blocks.
    #[test]
    fn a_full_queue_counts_what_it_loses() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let lost = Arc::new(AtomicU64::new(0));
        let tap = Tap::new(
            Point::Underlay,
            Ipv4Addr::new(192, 0, 2, 1),
            true,
            tx,
            lost.clone(),
        );
        let peer = Ipv4Addr::new(192, 0, 2, 2);
        tap.datagram(Direction::Out, peer, &[b"ab", b"cd"]);
        tap.datagram(Direction::In, peer, &[b"ef"]);
        assert_eq!(lost.load(Ordering::Relaxed), 1);
        let r = rx.try_recv().unwrap();
        assert_eq!(r.bytes.len(), UDP_HEADERS + 4);
        assert_eq!(&r.bytes[UDP_HEADERS..], b"abcd");
        assert_eq!(&r.bytes[12..16], &[192, 0, 2, 1], "sent: from this host");
    }
}
