//! Subcommands that print for people.

use std::path::Path;
use std::process::ExitCode;

use std::path::PathBuf;

use vpcd::Topology;
use vpcd::lab::{DEFAULT_TOPOLOGY, Lab};
use vpcd::topology::{ExpectSource, ExpectTarget, Network};

/// `vpcd check FILE [--locked]`: validates, prints a summary, and records the provider's new
/// allocations in the lock file beside FILE (`--locked`: refuses to, as `cargo --locked`).
pub fn check(file: &Path, locked: bool) -> ExitCode {
    match Topology::load(file) {
        Ok(t) => {
            print!("{}", summary(&t));
            match write_lock(file, &t, locked) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e:#}");
                    ExitCode::FAILURE
                }
            }
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

/// Writes the allocations `t` made that its lock file does not record yet; with `locked`, an
/// out-of-date lock is an error instead.
pub fn write_lock(file: &Path, t: &Topology, locked: bool) -> anyhow::Result<()> {
    if t.unlocked.is_empty() {
        return Ok(());
    }
    let lock = vpcd::topology::lock_path(file);
    if locked {
        anyhow::bail!(
            "{}: out of date ({}); run `vpcd check {}` to record them",
            lock.display(),
            t.unlocked.join("; "),
            file.display()
        );
    }
    let name = file
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    std::fs::write(&lock, t.allocations.render(&name))
        .map_err(|e| anyhow::anyhow!("{}: {e}", lock.display()))?;
    println!(
        "{}: recorded {} allocation(s):",
        lock.display(),
        t.unlocked.len()
    );
    for line in &t.unlocked {
        println!("  {line}");
    }
    Ok(())
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
    if let Some(b) = &t.basic {
        let _ = writeln!(
            s,
            "basic network: pool {} (addresses allocated by the provider)",
            b.cidr
        );
    }
    if let Some(i) = &t.internet {
        let _ = writeln!(
            s,
            "internet: {} through host {} (its side: {}{})",
            i.cidr,
            t.host(i.gateway).name,
            i.client,
            i.netns
                .as_ref()
                .map(|n| format!(", netns {n}"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(s, "instances ({}):", t.instances.len());
    for (n, i) in t.instances.iter().enumerate() {
        let groups: Vec<&str> = i
            .security_groups
            .iter()
            .map(|g| t.security_groups[g.index()].name.as_str())
            .collect();
        let place = match &i.network {
            Network::Vpc { vpc, subnet } => {
                format!("{}/{}", t.vpc(*vpc).name, t.subnet(*subnet).name)
            }
            Network::Basic { tenant } => {
                let link = t
                    .linked_vpc(vpcd::topology::InstanceId(n as u32))
                    .map(|v| format!(", linked to {}", t.vpc(v).name))
                    .unwrap_or_default();
                format!("basic ({tenant}{link})")
            }
        };
        let eip = i.eip.map(|e| format!(", eip {e}")).unwrap_or_default();
        let _ = writeln!(
            s,
            "  {:<12} {:<15} {} on {}{}, groups [{}]",
            i.name,
            i.ip.to_string(),
            place,
            t.host(i.host).name,
            eip,
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
            match e.from {
                ExpectSource::Instance(id) => t.instance(id).name.as_str(),
                ExpectSource::Internet => "internet",
            },
            to,
            e.protocol.word(),
            port,
            if e.reach { "reaches" } else { "blocked" }
        );
    }
    s
}

/// A `vpcd lab` subcommand.
pub enum LabCmd {
    /// `lab up`.
    Up {
        file: Option<PathBuf>,
        name: String,
        workers: Option<usize>,
    },
    /// `lab down`.
    Down { name: String },
    /// `lab exec`.
    Exec {
        name: String,
        target: String,
        command: Vec<String>,
    },
    /// `lab check`.
    Check { name: String },
    /// `lab status`.
    Status { name: String },
    /// `lab demo`.
    Demo { workers: Option<usize> },
}

fn say(line: &str) {
    println!("[lab] {line}");
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("vpcd lab: {e:#}");
    ExitCode::FAILURE
}

/// `vpcd lab ...`.
pub fn lab(cmd: LabCmd) -> ExitCode {
    match cmd {
        LabCmd::Up {
            file,
            name,
            workers,
        } => {
            let lab = match Lab::new(&name) {
                Ok(l) => l,
                Err(e) => return fail(e),
            };
            let (text, source) = match &file {
                Some(f) => match std::fs::read_to_string(f) {
                    Ok(t) => (t, f.display().to_string()),
                    Err(e) => return fail(anyhow::anyhow!("{}: {e}", f.display())),
                },
                None => (
                    DEFAULT_TOPOLOGY.to_string(),
                    "(embedded lab topology)".to_string(),
                ),
            };
            match lab.up(&text, &source, workers, &mut say) {
                Ok(()) => {
                    say(&format!(
                        "lab \"{name}\" is up: `vpcd lab check`, `vpcd lab exec INSTANCE -- CMD`, `vpcd lab down`"
                    ));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        LabCmd::Down { name } => match Lab::new(&name).and_then(|l| l.down(&mut say)) {
            Ok(()) => {
                say(&format!("lab \"{name}\" is down"));
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        LabCmd::Exec {
            name,
            target,
            command,
        } => match Lab::new(&name).and_then(|l| l.exec(&target, &command)) {
            Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8),
            Err(e) => fail(e),
        },
        LabCmd::Check { name } => {
            let lab = match Lab::new(&name) {
                Ok(l) => l,
                Err(e) => return fail(e),
            };
            match vpcd::lab::check(&lab, &mut std::io::stdout()) {
                Ok(r) if r.failures() == 0 => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(e) => fail(e),
            }
        }
        LabCmd::Status { name } => {
            let lab = match Lab::new(&name) {
                Ok(l) => l,
                Err(e) => return fail(e),
            };
            let t = match lab.topology() {
                Ok(t) => t,
                Err(e) => return fail(e),
            };
            lab.refresh_stats();
            for h in &t.hosts {
                println!("== {} ({})", h.name, h.address);
                for (k, v) in lab.read_stats(&h.name) {
                    if v > 0 && k != "seq" {
                        println!("  {k:<48} {v}");
                    }
                }
            }
            ExitCode::SUCCESS
        }
        LabCmd::Demo { workers } => demo(workers),
    }
}

/// `vpcd lab demo`: up, check, down, on the embedded topology.
fn demo(workers: Option<usize>) -> ExitCode {
    let lab = match Lab::new("demo") {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    say(
        "vpcd lab demo: two hosts, two tenants with the same 10.0.0.0/16 and the same instance addresses",
    );
    match Topology::parse(DEFAULT_TOPOLOGY, "lab.toml") {
        Ok(t) => print!("{}", summary(&t)),
        Err(e) => return fail(e.into()),
    }
    if lab.dir().exists() {
        say("a previous demo was left behind: removing it");
        let _ = lab.down(&mut say);
    }
    if let Err(e) = lab.up(
        DEFAULT_TOPOLOGY,
        "(embedded lab topology)",
        workers,
        &mut say,
    ) {
        return fail(e);
    }
    say("checking every expectation with real traffic (ping, TCP, UDP):");
    let result = vpcd::lab::check(&lab, &mut std::io::stdout());
    say("tearing down");
    if let Err(e) = lab.down(&mut say) {
        eprintln!("vpcd lab: {e:#}");
    }
    match result {
        Ok(r) if r.failures() == 0 => {
            say("demo passed: every expectation holds");
            ExitCode::SUCCESS
        }
        Ok(r) => {
            say(&format!(
                "demo FAILED: {} expectation(s) do not hold",
                r.failures()
            ));
            ExitCode::FAILURE
        }
        Err(e) => fail(e),
    }
}
