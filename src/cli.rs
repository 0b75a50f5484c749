//! Subcommands that print for people.

use std::path::Path;
use std::process::ExitCode;

use vpcd::Topology;
use vpcd::topology::{ExpectTarget, Network};

/// `vpcd check FILE`.
pub fn check(file: &Path) -> ExitCode {
    match Topology::load(file) {
        Ok(t) => {
            print!("{}", summary(&t));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            let n = e.errors().len();
            if n > 0 {
                eprintln!("{n} error{}", if n == 1 { "" } else { "s" });
            }
            ExitCode::FAILURE
        }
    }
}

/// A one-screen summary of a valid topology.
pub fn summary(t: &Topology) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let u = &t.underlay;
    let _ = writeln!(
        s,
        "{}: valid\nunderlay: {}, mtu {} (instance mtu {}){}",
        t.file,
        u.transport.word(),
        u.mtu,
        u.instance_mtu(),
        if u.checksum { ", GRE checksums" } else { "" }
    );
    let _ = writeln!(s, "hosts ({}):", t.hosts.len());
    for h in &t.hosts {
        let _ = writeln!(
            s,
            "  {:<12} {:<15} region {}",
            h.name,
            h.address.to_string(),
            h.region
        );
    }
    let _ = writeln!(s, "vpcs ({}):", t.vpcs.len());
    for (vi, v) in t.vpcs.iter().enumerate() {
        let _ = writeln!(
            s,
            "  {:<12} tenant {:<10} {:<18} key {}{}",
            v.name,
            v.tenant,
            v.cidr.to_string(),
            v.key,
            if v.key_assigned { " (assigned)" } else { "" }
        );
        for sn in t.subnets.iter().filter(|sn| sn.vpc.index() == vi) {
            let rt = &t.route_tables[sn.route_table.index()];
            let acl = sn
                .acl
                .map_or("none".to_string(), |a| t.acls[a.index()].name.clone());
            let _ = writeln!(
                s,
                "    subnet {:<10} {:<18} routes {} ({}), acl {}",
                sn.name,
                sn.cidr.to_string(),
                rt.name,
                rt.routes.as_slice().len(),
                acl
            );
        }
    }
    let _ = writeln!(s, "instances ({}):", t.instances.len());
    for i in &t.instances {
        let Network::Vpc { vpc, subnet } = &i.network;
        let groups: Vec<&str> = i
            .security_groups
            .iter()
            .map(|g| t.security_groups[g.index()].name.as_str())
            .collect();
        let _ = writeln!(
            s,
            "  {:<12} {:<15} {}/{} on {}, groups [{}]",
            i.name,
            i.ip.to_string(),
            t.vpc(*vpc).name,
            t.subnet(*subnet).name,
            t.host(i.host).name,
            groups.join(", ")
        );
    }
    let rules: usize = t
        .security_groups
        .iter()
        .map(|g| g.ingress.len() + g.egress.len())
        .sum();
    let acl_rules: usize = t
        .acls
        .iter()
        .map(|a| a.ingress.len() + a.egress.len())
        .sum();
    let _ = writeln!(
        s,
        "security groups: {} ({} rules); network ACLs: {} ({} rules); peerings: {}",
        t.security_groups.len(),
        rules,
        t.acls.len(),
        acl_rules,
        t.peerings.len()
    );
    let _ = writeln!(s, "expectations: {}", t.expects.len());
    for e in &t.expects {
        let to = match &e.to {
            ExpectTarget::Instance(id) => t.instance(*id).name.clone(),
            ExpectTarget::Address(a) => a.to_string(),
        };
        let port = e.port.map(|p| format!(":{p}")).unwrap_or_default();
        let _ = writeln!(
            s,
            "  {} -> {} {}{} {}",
            t.instance(e.from).name,
            to,
            e.protocol.word(),
            port,
            if e.reach { "reaches" } else { "blocked" }
        );
    }
    s
}
