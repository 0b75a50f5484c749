//! A change in one tenant's VPC leaves another tenant's cached decisions in place, and what
//! that is worth: the flow cache's hit rate across such a change.
//!
//! Two tenants, each with a VPC of two subnets (one network ACL on both) and an instance in
//! each subnet, one on this host and one on the other; a steady mix of UDP flows from each
//! tenant's local instance to its remote one. The change adds a rule to tenant A's ACL.
//!
//! Print the figures: `cargo test --release -p vpcd-core --test tenants -- --nocapture`.

use std::net::Ipv4Addr;
use std::sync::Arc;

use etherparse::PacketBuilder;
use vpcd_core::topology::HostId;
use vpcd_core::{Decision, Ingress, Pipeline, Timestamp, Topology};

/// The two tenants' topology; `a_rule` is tenant A's ACL's first egress rule, `sg_rule`
/// the first egress rule of the security group both tenants' instances are in.
fn topology(a_rule: &str, sg_rule: &str) -> Arc<Topology> {
    let mut t = format!(
        "[[host]]\nname = \"h0\"\naddress = \"192.0.2.1\"\n\n\
         [[host]]\nname = \"h1\"\naddress = \"192.0.2.2\"\n\n\
         [[security_group]]\nname = \"open\"\n\
         ingress = [ {{ action = \"accept\", protocol = \"all\", source = \"0.0.0.0/0\" }} ]\n\
         egress = [ {sg_rule} {{ action = \"accept\", protocol = \"all\", destination = \"0.0.0.0/0\" }} ]\n\n",
    );
    for (v, key) in [("a", 100), ("b", 200)] {
        let n = if v == "a" { 1 } else { 2 };
        let rule = if v == "a" { a_rule } else { "" };
        t.push_str(&format!(
            "[[vpc]]\nname = \"v{v}\"\ntenant = \"t{v}\"\ncidr = \"10.{n}.0.0/16\"\nkey = {key}\n\n\
             [[acl]]\nname = \"acl{v}\"\nvpc = \"v{v}\"\n\
             ingress = [ {{ action = \"accept\", protocol = \"all\", cidr = \"0.0.0.0/0\" }} ]\n\
             egress = [ {rule} {{ action = \"accept\", protocol = \"all\", cidr = \"0.0.0.0/0\" }} ]\n\n"
        ));
        for (s, host) in [(1, 0), (2, 1)] {
            t.push_str(&format!(
                "[[subnet]]\nname = \"v{v}s{s}\"\nvpc = \"v{v}\"\ncidr = \"10.{n}.{s}.0/24\"\n\
                 acl = \"acl{v}\"\n\n\
                 [[instance]]\nname = \"{v}{s}\"\nhost = \"h{host}\"\nsubnet = \"v{v}s{s}\"\n\
                 ip = \"10.{n}.{s}.10\"\nsecurity_groups = [\"open\"]\n\n"
            ));
        }
    }
    Arc::new(Topology::parse(&t, "tenants.toml").expect("valid topology"))
}

fn old_topology() -> Arc<Topology> {
    topology("", "")
}

/// Tenant A's ACL with a rule in front: ssh out is dropped.
fn new_topology() -> Arc<Topology> {
    let rule = "{ action = \"drop\", protocol = \"tcp\", port = 22, cidr = \"0.0.0.0/0\" },";
    topology(rule, "")
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).udp(sport, 5000);
    let payload = [0u8; 32];
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, &payload).unwrap();
    out
}

/// One packet of every flow of a tenant: `flows` UDP flows from its local instance to its
/// remote one, and the port they come from.
struct Tenant {
    ingress: Ingress,
    packets: Vec<Vec<u8>>,
}

fn tenant(topo: &Topology, name: &str, flows: u16) -> Tenant {
    let id = |n: &str| topo.instance_named(n).unwrap();
    let (local, remote) = (id(&format!("{name}1")), id(&format!("{name}2")));
    let (src, dst) = (topo.instance(local).ip, topo.instance(remote).ip);
    Tenant {
        ingress: Ingress::Instance(local),
        packets: (0..flows).map(|p| udp(src, dst, 10_000 + p)).collect(),
    }
}

/// Sends one packet of every flow of `t`; returns the flow-cache hits among them, checking
/// each decision encapsulates towards the other host.
fn pass(p: &mut Pipeline, t: &Tenant, now: u64) -> u64 {
    let hits = p.counters().cache_hits;
    for pkt in &t.packets {
        let d = p.decide(pkt, t.ingress, Timestamp::from_millis(now));
        assert!(
            matches!(
                d,
                Decision::Encapsulate {
                    host: HostId(1),
                    ..
                }
            ),
            "{d:?}"
        );
    }
    p.counters().cache_hits - hits
}

#[test]
fn a_rule_change_in_one_tenant_keeps_the_other_tenants_decisions() {
    let old = old_topology();
    let mut p = Pipeline::new(old.clone(), HostId(0));
    let (a, b) = (tenant(&old, "a", 50), tenant(&old, "b", 50));
    assert_eq!((pass(&mut p, &a, 0), pass(&mut p, &b, 0)), (0, 0), "cold");
    assert_eq!((pass(&mut p, &a, 1), pass(&mut p, &b, 1)), (50, 50), "warm");
    p.set_topology(new_topology());
    assert_eq!(p.cached_decisions(), 50, "tenant B's entries carried");
    assert_eq!(pass(&mut p, &b, 2), 50, "tenant B's flows still hit");
    assert_eq!(pass(&mut p, &a, 2), 0, "tenant A's flows are decided again");
    assert_eq!(pass(&mut p, &a, 3), 50, "and cached again");
}

#[test]
fn a_change_in_a_group_both_tenants_use_retakes_both() {
    let old = old_topology();
    let mut p = Pipeline::new(old.clone(), HostId(0));
    let (a, b) = (tenant(&old, "a", 50), tenant(&old, "b", 50));
    for now in 0..2 {
        pass(&mut p, &a, now);
        pass(&mut p, &b, now);
    }
    let rule = "{ action = \"drop\", protocol = \"tcp\", port = 22, destination = \"0.0.0.0/0\" },";
    p.set_topology(topology("", rule));
    assert_eq!(p.cached_decisions(), 0);
    assert_eq!((pass(&mut p, &a, 2), pass(&mut p, &b, 2)), (0, 0));
}

/// The hit rate of `passes` passes over both tenants' flows, right after the change to
/// tenant A's ACL, with the cache carried (`carry`) or forgotten (the old behaviour).
fn hit_rate_after_change(carry: bool, passes: u64) -> f64 {
    let old = old_topology();
    let mut p = Pipeline::new(old.clone(), HostId(0));
    let (a, b) = (tenant(&old, "a", 500), tenant(&old, "b", 500));
    for now in 0..3 {
        pass(&mut p, &a, now);
        pass(&mut p, &b, now);
    }
    p.set_topology(new_topology());
    if !carry {
        p.forget_cached_decisions();
    }
    let mut hits = 0;
    for now in 3..3 + passes {
        hits += pass(&mut p, &a, now) + pass(&mut p, &b, now);
    }
    hits as f64 / (passes * 1000) as f64
}

#[test]
fn hit_rate_across_a_change_in_one_tenant() {
    let old = old_topology();
    let mut p = Pipeline::new(old.clone(), HostId(0));
    let (a, b) = (tenant(&old, "a", 500), tenant(&old, "b", 500));
    pass(&mut p, &a, 0);
    pass(&mut p, &b, 0);
    let steady = (pass(&mut p, &a, 1) + pass(&mut p, &b, 1)) as f64 / 1000.0;
    println!("flow-cache hit rate, 500 UDP flows per tenant, one packet each per pass:");
    println!("  before the change (steady): {:.1} %", steady * 100.0);
    for passes in [1, 2, 10] {
        let (flushed, carried) = (
            hit_rate_after_change(false, passes),
            hit_rate_after_change(true, passes),
        );
        println!(
            "  first {passes} pass(es) after a rule change in tenant A's ACL: \
             every entry forgotten {:.1} %, carried {:.1} %",
            flushed * 100.0,
            carried * 100.0
        );
        assert!(carried > flushed);
    }
    assert_eq!(steady, 1.0);
    assert_eq!(hit_rate_after_change(false, 1), 0.0);
    assert_eq!(hit_rate_after_change(true, 1), 0.5);
}
