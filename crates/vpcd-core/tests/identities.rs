//! Identities that never renumber (docs/semantics.md 2.3 and 2.10), on random histories of a
//! topology: VPCs come, go and take explicit keys (some equal to another name's derived key),
//! basic instances come, go and migrate in a pool of 13 addresses, and each generation is
//! compiled with the lock the previous one left.
//!
//! Properties, for every generation:
//! - it compiles, or it is refused for a reason the history explains: a key collision that
//!   names both VPCs, a full pool, or a migration back (one-way);
//! - a VPC keeps its key, and a basic instance its address, for as long as it exists;
//! - no address is given twice, not even one of an instance that left or migrated;
//! - a host that starts fresh with the same file and lock computes exactly the same.
//!
//! `VPCD_ID_CASES` sets the number of histories (default 2,000).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use vpcd_core::Topology;
use vpcd_core::topology::{Allocations, LoadError};

const VPCS: [&str; 5] = ["va", "vb", "vc", "vd", "ve"];
const BASIC: [&str; 12] = [
    "b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9", "b10", "b11",
];

/// A VPC's explicit key, fixed for the whole history.
#[derive(Debug, Clone, Copy)]
enum KeyChoice {
    Derived,
    /// The derived key of another name of the pool.
    LikeDerived(usize),
    Fixed(u32),
}

/// One generation: which VPCs exist, which basic instances exist, which of them migrated.
#[derive(Debug, Clone)]
struct Generation {
    vpcs: Vec<bool>,
    basic: Vec<bool>,
    migrated: Vec<bool>,
}

fn derived(name: &str) -> u32 {
    let h = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    (1 << 24) | (h & 0x00ff_ffff)
}

fn key_of(choices: &[KeyChoice], v: usize) -> u32 {
    match choices[v] {
        KeyChoice::Derived => derived(VPCS[v]),
        KeyChoice::LikeDerived(o) => derived(VPCS[o]),
        KeyChoice::Fixed(k) => k,
    }
}

fn text(choices: &[KeyChoice], g: &Generation) -> String {
    let mut t = String::from(
        "[[host]]\nname = \"h1\"\naddress = \"192.0.2.1\"\n\n[basic]\ncidr = \"10.128.0.0/28\"\n\n\
         [[security_group]]\nname = \"sg\"\ningress = []\negress = []\n\n",
    );
    for (v, name) in VPCS.iter().enumerate() {
        // The first VPC always exists: migrated instances land in it.
        if !(v == 0 || g.vpcs[v]) {
            continue;
        }
        t.push_str(&format!(
            "[[vpc]]\nname = \"{name}\"\ntenant = \"t{v}\"\ncidr = \"10.{v}.0.0/16\"\n"
        ));
        if !matches!(choices[v], KeyChoice::Derived) {
            t.push_str(&format!("key = {}\n", key_of(choices, v)));
        }
        t.push_str(&format!(
            "\n[[subnet]]\nname = \"{name}s\"\nvpc = \"{name}\"\ncidr = \"10.{v}.1.0/24\"\n\n"
        ));
    }
    for (i, name) in BASIC.iter().enumerate() {
        if !g.basic[i] {
            continue;
        }
        if g.migrated[i] {
            t.push_str(&format!(
                "[[instance]]\nname = \"{name}\"\nhost = \"h1\"\nsubnet = \"vas\"\nip = \"10.0.1.{}\"\nsecurity_groups = [\"sg\"]\n\n",
                10 + i
            ));
        } else {
            t.push_str(&format!(
                "[[instance]]\nname = \"{name}\"\nhost = \"h1\"\nnetwork = \"basic\"\ntenant = \"acme\"\nsecurity_groups = [\"sg\"]\n\n"
            ));
        }
    }
    t
}

fn key_choice() -> impl Strategy<Value = KeyChoice> {
    prop_oneof![
        4 => Just(KeyChoice::Derived),
        1 => (0..VPCS.len()).prop_map(KeyChoice::LikeDerived),
        1 => (1u32..4).prop_map(|k| KeyChoice::Fixed(k * 100)),
    ]
}

fn generation() -> impl Strategy<Value = Generation> {
    (
        proptest::collection::vec(proptest::bool::weighted(0.7), VPCS.len()),
        proptest::collection::vec(proptest::bool::weighted(0.6), BASIC.len()),
        proptest::collection::vec(proptest::bool::weighted(0.15), BASIC.len()),
    )
        .prop_map(|(vpcs, basic, migrated)| Generation {
            vpcs,
            basic,
            migrated,
        })
}

fn history() -> impl Strategy<Value = (Vec<KeyChoice>, Vec<Generation>)> {
    (
        proptest::collection::vec(key_choice(), VPCS.len()),
        proptest::collection::vec(generation(), 1..8),
    )
}

/// What the history so far has fixed.
#[derive(Default)]
struct Seen {
    keys: BTreeMap<String, u32>,
    /// Basic addresses ever given, by instance; migrated ones stay reserved.
    addresses: BTreeMap<String, Ipv4Addr>,
    migrated: BTreeSet<String>,
}

fn errors(e: &LoadError) -> String {
    e.errors()
        .iter()
        .map(|x| format!("{}: {}", x.item, x.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The refusal of a generation, checked against what explains it.
fn refused(choices: &[KeyChoice], g: &Generation, seen: &Seen, e: &LoadError) {
    let why = errors(e);
    let present: Vec<usize> = (0..VPCS.len()).filter(|&v| v == 0 || g.vpcs[v]).collect();
    let collision = present.iter().find_map(|&a| {
        present
            .iter()
            .find(|&&b| a < b && key_of(choices, a) == key_of(choices, b))
            .map(|&b| (a, b))
    });
    let back =
        (0..BASIC.len()).any(|i| g.basic[i] && !g.migrated[i] && seen.migrated.contains(BASIC[i]));
    if let Some((a, b)) = collision {
        for v in [a, b] {
            let named = format!("vpc \"{}\"", VPCS[v]);
            assert!(why.contains(&named), "collision without {named}: {why}");
        }
        return;
    }
    assert!(
        back || why.contains("full") || why.contains("pool"),
        "refused for no reason the history explains: {why}"
    );
    if back {
        assert!(why.contains("one-way"), "{why}");
    }
}

/// Every property of one compiled generation; updates `seen`.
fn accepted(t: &Topology, text: &str, g: &Generation, seen: &mut Seen) {
    for v in &t.vpcs {
        let old = seen.keys.insert(v.name.clone(), v.key);
        assert!(
            old.is_none_or(|k| k == v.key),
            "vpc {} moved from key {old:?} to {}",
            v.name,
            v.key
        );
    }
    let mut given = BTreeSet::new();
    for (i, name) in BASIC.iter().enumerate() {
        if !g.basic[i] {
            continue;
        }
        if g.migrated[i] {
            seen.migrated.insert(name.to_string());
            continue;
        }
        let ip = t.instance(t.instance_named(name).unwrap()).ip;
        assert!(given.insert(ip), "{ip} given twice");
        if let Some(&old) = seen.addresses.get(*name) {
            assert_eq!(old, ip, "basic instance {name} renumbered");
        }
        let thief = seen.addresses.iter().find(|(n, a)| **a == ip && *n != name);
        assert!(thief.is_none(), "{name} took {thief:?}'s address");
        seen.addresses.insert(name.to_string(), ip);
    }
    // A host that starts fresh, with this file and the lock it leaves, agrees.
    let lock = Allocations::parse(&t.allocations.render("lab.toml"), "lab.lock").unwrap();
    assert_eq!(lock, t.allocations, "the lock round-trips");
    let fresh = Topology::parse_locked(text, "lab.toml", &lock).expect("the lock compiles");
    assert!(fresh.unlocked.is_empty(), "{:?}", fresh.unlocked);
    for (a, b) in t.instances.iter().zip(&fresh.instances) {
        assert_eq!((&a.name, a.ip), (&b.name, b.ip), "a fresh host differs");
    }
    for (a, b) in t.vpcs.iter().zip(&fresh.vpcs) {
        assert_eq!((&a.name, a.key), (&b.name, b.key), "a fresh host differs");
    }
}

fn run(choices: &[KeyChoice], gens: &[Generation]) -> (usize, usize) {
    let mut seen = Seen::default();
    let mut lock = Allocations::none();
    let (mut ok, mut no) = (0, 0);
    for g in gens {
        let text = text(choices, g);
        match Topology::parse_locked(&text, "lab.toml", &lock) {
            Ok(t) => {
                accepted(&t, &text, g, &mut seen);
                lock = t.allocations.clone();
                ok += 1;
            }
            Err(e) => {
                refused(choices, g, &seen, &e);
                no += 1;
            }
        }
    }
    (ok, no)
}

#[test]
fn keys_and_basic_addresses_never_renumber() {
    let cases = std::env::var("VPCD_ID_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x6964_656e),
        ..Config::default()
    });
    let counts = std::cell::Cell::new((0usize, 0usize));
    runner
        .run(&history(), |(choices, gens)| {
            let (ok, no) = run(&choices, &gens);
            let (a, b) = counts.get();
            counts.set((a + ok, b + no));
            Ok(())
        })
        .unwrap();
    let (ok, no) = counts.get();
    println!("{cases} histories: {ok} generations compiled and checked, {no} refused as explained");
    let cases = cases as usize;
    assert!(
        ok > cases && no > cases / 20,
        "both outcomes reached: {ok}, {no}"
    );
}
