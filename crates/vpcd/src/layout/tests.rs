use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use vpcd_core::pipeline::trace::{self, Next};
use vpcd_core::topology::Allocations;
use vpcd_core::{Timestamp, Topology};

use super::generated::{Shape, region};
use super::*;
use crate::trace::{TraceArgs, fresh, offline, verdict_line};

const LAB: &str = include_str!("../../../../examples/lab.toml");
const LAB_LOCK: &str = include_str!("../../../../examples/lab.lock");

fn lab() -> (Topology, Vec<Item>) {
    let lock = Allocations::parse(LAB_LOCK, "lab.lock").unwrap();
    let t = Topology::parse_locked(LAB, "lab.toml", &lock).unwrap();
    let items = items(LAB, &t.allocations).unwrap();
    (t, items)
}

/// The topology that the items of `scopes` (all when `None`) make.
fn compile(items: &[Item], scopes: Option<&BTreeSet<String>>) -> Topology {
    let keys: Vec<(String, String)> = items
        .iter()
        .filter(|i| scopes.is_none_or(|s| s.contains(&i.scope)))
        .map(|i| (i.key(), i.text.clone()))
        .collect();
    let (text, lock) = assemble(keys.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let lock = Allocations::parse(&lock, "share.lock").unwrap();
    match Topology::parse_locked(&text, "share.toml", &lock) {
        Ok(t) => t,
        Err(e) => panic!("{e}\n--- text:\n{text}"),
    }
}

#[test]
fn the_lab_cuts_into_items_that_make_the_same_region() {
    let (t, items) = lab();
    let kinds: BTreeSet<&str> = items
        .iter()
        .map(|i| i.id.split('/').next().unwrap())
        .collect();
    for k in [
        "underlay",
        "host",
        "vpc",
        "subnet",
        "acl",
        "security_group",
        "instance",
    ] {
        assert!(kinds.contains(k), "{kinds:?}");
    }
    assert!(items.iter().any(|i| i.id == "allocation/alice-classic"));
    let whole = compile(&items, None);
    assert_eq!(whole.instances.len(), t.instances.len());
    assert_eq!(whole.allocations, t.allocations);
    let text: String = items
        .iter()
        .filter(|i| !i.id.starts_with("allocation/"))
        .map(|i| i.text.as_str())
        .collect();
    assert_eq!(text, LAB, "the pieces, in file order, are the file");
}

#[test]
fn a_cut_that_would_split_a_table_is_refused() {
    let text = "[underlay]\ntransport = \"gre\"\n[[vpc]]\nname = \"a\"\n[underlay]\nmtu = 1500\n";
    assert!(items(text, &Allocations::none()).is_err());
}

#[test]
fn the_lab_shares() {
    let (_, items) = lab();
    let s = shares(&items);
    let a = &s["host-a"];
    let b = &s["host-b"];
    for scope in [
        "region",
        "vpc:vpc-alice",
        "vpc:vpc-bob",
        "basic:alice",
        "sg:sg-web",
        "sg:sg-db",
    ] {
        assert!(a.contains(scope), "host-a {a:?}");
    }
    assert!(!a.contains("doc") && !b.contains("doc"));
    assert!(
        b.contains("vpc:vpc-alice") && b.contains("vpc:vpc-bob"),
        "{b:?}"
    );
}

/// The verdict of `args` when each host decides with its own share's topology.
fn share_verdict(tops: &BTreeMap<String, Arc<Topology>>, host: &str, args: &TraceArgs) -> String {
    let t = tops[host].clone();
    let probe = match args.probe(&t) {
        Ok(p) => p,
        Err(e) => return format!("no probe: {e}"),
    };
    let now = Timestamp::ZERO;
    let first = fresh(&t, probe.host, &probe.packet, probe.from, now);
    let mut last = t;
    let tr = trace::follow(first, |n: &Next| {
        let name = last.host(n.host).name.clone();
        let here = tops[&name].clone();
        let id = here
            .host_named(&name)
            .expect("every share knows every host");
        last = here.clone();
        fresh(&here, id, &n.packet, n.from, now)
    });
    verdict_line(&last, &tr.verdict)
}

/// Every probe from every instance (and the internet) to every instance's addresses,
/// decided with the whole region and with the shares: the same verdict, except a drop for a
/// drop when the destination is outside the sender host's share. Returns how many agreed.
fn shares_decide_as_the_region(text: &str) -> (usize, usize) {
    let full = Topology::parse(text, "region.toml").unwrap();
    let items = items(text, &full.allocations).unwrap();
    let shares = shares(&items);
    let tops: BTreeMap<String, Arc<Topology>> = shares
        .iter()
        .map(|(h, s)| (h.clone(), Arc::new(compile(&items, Some(s)))))
        .collect();
    let scope_of: BTreeMap<&str, &str> = items
        .iter()
        .filter_map(|i| Some((i.id.strip_prefix("instance/")?, i.scope.as_str())))
        .collect();
    let full = Arc::new(full);
    let (mut same, mut outside) = (0, 0);
    let mut froms: Vec<(String, String)> = full
        .instances
        .iter()
        .map(|i| (i.name.clone(), full.host(i.host).name.clone()))
        .collect();
    if let Some(i) = &full.internet {
        froms.push(("internet".into(), full.host(i.gateway).name.clone()));
    }
    for (from, host) in &froms {
        for d in &full.instances {
            let to = if from == "internet" {
                d.eip
            } else {
                Some(d.ip)
            };
            let Some(to) = to else { continue };
            for (protocol, port) in [
                ("tcp", Some(80)),
                ("tcp", Some(5432)),
                ("udp", Some(53)),
                ("icmp", None),
            ] {
                let args = TraceArgs {
                    from: from.clone(),
                    to: to.to_string(),
                    protocol: protocol.into(),
                    port,
                };
                let whole = offline(&full, &args, Timestamp::ZERO)
                    .map(|t| verdict_line(&full, &t.verdict))
                    .unwrap();
                let part = share_verdict(&tops, host, &args);
                if whole == part {
                    same += 1;
                    continue;
                }
                let inside = shares[host].contains(scope_of[d.name.as_str()]);
                assert!(
                    !inside && whole.starts_with("dropped") && part.starts_with("dropped"),
                    "{from} -> {} ({to}) {protocol} {port:?}: region says {whole}, the share of {host} says {part}",
                    d.name
                );
                outside += 1;
            }
        }
    }
    (same, outside)
}

#[test]
fn the_lab_shares_decide_as_the_whole_lab() {
    let (same, outside) = shares_decide_as_the_region(LAB);
    assert!(same > 100, "{same}");
    eprintln!("lab: {same} verdicts the same, {outside} drops outside the share");
}

#[test]
fn a_generated_regions_shares_decide_as_the_whole_region() {
    let text = region(&Shape {
        instances: 110,
        hosts: 20,
        per_vpc: 8,
        per_basic: 3,
    });
    let (same, outside) = shares_decide_as_the_region(&text);
    eprintln!("generated: {same} verdicts the same, {outside} drops outside the share");
    assert!(same > 1000 && outside > 0, "{same} {outside}");
}

#[test]
fn a_generated_region_shares_little() {
    let text = region(&Shape::new(10_000, 100));
    let full = Topology::parse(&text, "r.toml").unwrap();
    let items = items(&text, &full.allocations).unwrap();
    let s = shares(&items);
    let biggest = s
        .iter()
        .filter(|(h, _)| *h != "h0")
        .map(|(_, s)| s.len())
        .max()
        .unwrap();
    let sizes: Vec<usize> = s.values().map(|s| s.len()).collect();
    eprintln!("scopes per share: {sizes:?}");
    assert!(biggest < 150, "a host's share has {biggest} scopes");
}

#[test]
fn writes_touch_only_what_changed() {
    let (t, items) = lab();
    let before = desired_keys(&items);
    let edited = LAB.replace("port = \"5432\"", "port = \"5433\"");
    let after = desired_keys(&super::items(&edited, &t.allocations).unwrap());
    let w = writes(&before, &after);
    assert_eq!(w.puts.len(), 1, "{:?}", w.puts);
    assert_eq!(w.scopes, BTreeSet::from(["sg:sg-db".to_string()]));
    assert!(writes(&before, &before).is_empty());
}
