//! vpcd's GRE against byte vectors made by an independent encoder (scapy; see
//! tests/data/gre/README.md): what we emit must equal them byte for byte, what we receive must
//! decapsulate to the same inner packet, and every hostile vector must be dropped for its
//! named reason.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use vpcd_core::wire::{PacketBuf, gre, ipv4};
use vpcd_core::{Decision, DropReason, Ingress, Pipeline, Timestamp, Topology};

#[derive(Deserialize)]
struct Manifest {
    vector: Vec<Vector>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Vector {
    name: String,
    framing: String,
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    expect: String,
    key: Option<u32>,
    inner_offset: Option<usize>,
    inner_len: Option<usize>,
    drop: Option<String>,
    note: String,
}

fn data() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/gre"))
}

fn vectors() -> Vec<(Vector, Vec<u8>)> {
    let text = std::fs::read_to_string(data().join("vectors.toml")).unwrap();
    let m: Manifest = toml::from_str(&text).unwrap();
    m.vector
        .into_iter()
        .map(|v| {
            let hex = std::fs::read_to_string(data().join(format!("{}.hex", v.name))).unwrap();
            let hex: String = hex.split_whitespace().collect();
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            (v, bytes)
        })
        .collect()
}

/// The receiver of every vector: host 192.0.2.1, with the destination instance 10.0.2.20;
/// the sender, 192.0.2.2, hosts 10.0.1.10. VPC key 1001.
const RECEIVER: &str = r#"
[[host]]
name = "rx"
address = "192.0.2.1"
[[host]]
name = "tx"
address = "192.0.2.2"
[[vpc]]
name = "v"
tenant = "t"
cidr = "10.0.0.0/16"
key = 1001
[[subnet]]
name = "s1"
vpc = "v"
cidr = "10.0.1.0/24"
[[subnet]]
name = "s2"
vpc = "v"
cidr = "10.0.2.0/24"
[[security_group]]
name = "open"
ingress = [ { action = "accept", protocol = "all", source = "0.0.0.0/0" } ]
egress = [ { action = "accept", protocol = "all", destination = "0.0.0.0/0" } ]
[[instance]]
name = "sender"
host = "tx"
subnet = "s1"
ip = "10.0.1.10"
security_groups = ["open"]
[[instance]]
name = "receiver"
host = "rx"
subnet = "s2"
ip = "10.0.2.20"
security_groups = ["open"]
"#;

fn ingress(v: &Vector) -> Ingress {
    match v.framing.as_str() {
        "ip" => Ingress::UnderlayIp,
        "udp" => Ingress::UnderlayUdp { from: v.outer_src },
        other => panic!("framing {other}"),
    }
}

#[test]
fn manifest_covers_every_reason_it_names() {
    let all = vectors();
    assert!(all.len() >= 29);
    for (v, _) in &all {
        if let Some(name) = &v.drop {
            assert!(
                DropReason::from_name(name).is_some(),
                "{}: unknown reason {name}",
                v.name
            );
        }
    }
}

#[test]
fn decap_vectors_parse_to_the_inner_packet() {
    for (v, bytes) in vectors().iter().filter(|(v, _)| v.expect == "decap") {
        let gre_at = match v.framing.as_str() {
            "ip" => {
                let o = ipv4::parse_outer(bytes).unwrap_or_else(|r| panic!("{}: {r}", v.name));
                assert_eq!((o.src, o.dst), (v.outer_src, v.outer_dst), "{}", v.name);
                o.header_len
            }
            _ => 0,
        };
        let g = gre::parse(&bytes[gre_at..]).unwrap_or_else(|r| panic!("{}: {r}", v.name));
        assert_eq!(g.key, v.key, "{}", v.name);
        assert_eq!(gre_at + g.len, v.inner_offset.unwrap(), "{}", v.name);
        let inner = &bytes[gre_at + g.len..];
        assert_eq!(inner.len(), v.inner_len.unwrap(), "{}", v.name);
        ipv4::parse(inner).unwrap_or_else(|r| panic!("{}: inner {r}", v.name));
    }
}

#[test]
fn we_emit_what_scapy_emits() {
    // The vectors vpcd itself would produce: key (and checksum) but no sequence number, and
    // no reserved bits.
    let mut checked = 0;
    for (v, bytes) in vectors().iter().filter(|(v, _)| v.expect == "decap") {
        let inner = &bytes[v.inner_offset.unwrap()..];
        let gre_at = if v.framing == "ip" { 20 } else { 0 };
        let g = gre::parse(&bytes[gre_at..]).unwrap();
        let flags = u16::from_be_bytes([bytes[gre_at], bytes[gre_at + 1]]);
        if g.sequence.is_some() || flags & 0x03f8 != 0 {
            continue;
        }
        let mut buf = PacketBuf::from_packet(inner);
        let key = g.key;
        match v.framing.as_str() {
            "ip" => {
                gre::encapsulate_ip(&mut buf, v.outer_src, v.outer_dst, key, g.checksum_present)
                    .unwrap()
            }
            _ => gre::push_header(&mut buf, key, g.checksum_present).unwrap(),
        }
        assert_eq!(
            buf.as_slice(),
            &bytes[..],
            "{}: our bytes differ from scapy's",
            v.name
        );
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} vectors compared");
}

#[test]
fn the_pipeline_delivers_decap_vectors_and_drops_hostile_ones_for_their_reason() {
    let t = Arc::new(Topology::parse(RECEIVER, "receiver.toml").unwrap());
    let receiver = t.instance_named("receiver").unwrap();
    let mut checked = 0;
    for (v, bytes) in vectors() {
        let mut p = Pipeline::new(t.clone(), t.host_named("rx").unwrap());
        let d = p.decide(&bytes, ingress(&v), Timestamp::ZERO);
        match (v.expect.as_str(), v.key) {
            ("decap", Some(1001)) => assert_eq!(
                d,
                Decision::Deliver {
                    to: receiver,
                    strip: v.inner_offset.unwrap() as u16,
                    nat: vpcd_core::pipeline::Nat::NONE,
                },
                "{}",
                v.name
            ),
            ("decap", _) => assert!(
                matches!(d, Decision::Drop(x) if x.reason == DropReason::GreUnknownKey),
                "{}: {d:?}",
                v.name
            ),
            ("drop", _) => {
                let want = DropReason::from_name(v.drop.as_deref().unwrap()).unwrap();
                match d {
                    Decision::Drop(x) => assert_eq!(x.reason, want, "{}", v.name),
                    other => panic!("{}: expected {want}, got {other:?}", v.name),
                }
            }
            (other, _) => panic!("{}: expect = {other}", v.name),
        }
        assert_eq!(
            p.counters().total_drops(),
            u64::from(matches!(d, Decision::Drop(_))),
            "{}",
            v.name
        );
        checked += 1;
    }
    assert!(checked >= 29);
}
