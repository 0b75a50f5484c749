//! Subcommands that print for people.
//!
//! Everything they print goes through [`outln!`] and [`errln!`] (or the [`Out`] writer),
//! never `print!`: those panic when the reader has gone (`vpcd check FILE | head`).

use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

/// Writes a line to standard output through [`Out`] (no panic when the reader has gone).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!($crate::cli::Out, $($arg)*);
    }};
}

/// Writes to standard output through [`Out`], without a newline.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!($crate::cli::Out, $($arg)*);
    }};
}

/// Writes a line to standard error through [`ErrOut`] (no panic when the reader has gone).
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!($crate::cli::ErrOut, $($arg)*);
    }};
}

static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
static STDERR_GONE: AtomicBool = AtomicBool::new(false);

/// Writes through `w`; once its reader has gone (EPIPE), everything written is discarded,
/// so that the command still does its work (a lock file written, a lab torn down) and exits
/// with its own status, quietly.
fn write_or_discard(w: &mut dyn io::Write, gone: &AtomicBool, buf: &[u8]) -> io::Result<usize> {
    if gone.load(Ordering::Relaxed) {
        return Ok(buf.len());
    }
    match w.write(buf) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            gone.store(true, Ordering::Relaxed);
            Ok(buf.len())
        }
        r => r,
    }
}

fn flush_or_discard(w: &mut dyn io::Write, gone: &AtomicBool) -> io::Result<()> {
    if gone.load(Ordering::Relaxed) {
        return Ok(());
    }
    match w.flush() {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            gone.store(true, Ordering::Relaxed);
            Ok(())
        }
        r => r,
    }
}

/// Standard output for people: locked for each write, and a reader that went away ends
/// the output, not the program.
pub struct Out;

impl io::Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write_or_discard(&mut io::stdout().lock(), &STDOUT_GONE, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        flush_or_discard(&mut io::stdout().lock(), &STDOUT_GONE)
    }
}

/// Standard error, likewise.
pub struct ErrOut;

impl io::Write for ErrOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write_or_discard(&mut io::stderr().lock(), &STDERR_GONE, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        flush_or_discard(&mut io::stderr().lock(), &STDERR_GONE)
    }
}

use vpcd::Topology;
use vpcd::lab::{DEFAULT_TOPOLOGY, Lab, Needs, ReloadOutcome};
use vpcd::topology::{ExpectSource, ExpectTarget, Network};

/// `vpcd check FILE [--locked] [--full]`: validates, prints a summary (every item with
/// `full`), and records the provider's new allocations in the lock file beside FILE
/// (`--locked`: refuses to, as `cargo --locked`).
pub fn check(file: &Path, locked: bool, full: bool) -> ExitCode {
    match vpcd::files::load_topology(file) {
        Ok(t) => {
            out!("{}", summary(&t, full));
            match write_lock(file, &t, locked) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    errln!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            errln!("{e}");
            let n = e.errors().len();
            if n > 0 {
                errln!("{n} error{}", if n == 1 { "" } else { "s" });
            }
            ExitCode::FAILURE
        }
    }
}

/// `vpcd trace FILE ...`: the trace for people, or (`json`) as a JSON object. Exit 0 for any
/// trace (delivered or dropped: the verdict says), 1 for a topology that does not load, 2
/// for a packet the topology cannot send (an unknown instance, a missing port).
pub fn trace(file: &Path, args: vpcd::trace::TraceArgs, json: bool) -> ExitCode {
    let t = match vpcd::files::load_topology(file) {
        Ok(t) => std::sync::Arc::new(t),
        Err(e) => {
            errln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match vpcd::trace::offline(&t, &args, vpcd::Timestamp::from_millis(0)) {
        Ok(tr) if json => {
            let v = vpcd::trace::json(&t, &tr);
            outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(tr) => {
            out!("{}", vpcd::trace::text(&t, &tr));
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("vpcd trace: {e}");
            ExitCode::from(2)
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
    outln!(
        "{}: recorded {} allocation(s):",
        lock.display(),
        t.unlocked.len()
    );
    for line in &t.unlocked {
        outln!("  {line}");
    }
    Ok(())
}

/// How many items of each list a summary shows (`vpcd check --full`: every one): a topology
/// of any size fits a screen (60 lines at most), and the examples show whole.
const SHOWN_HOSTS: usize = 6;
const SHOWN_VPCS: usize = 6;
/// The subnets are listed under their VPCs while the listed VPCs have at most this many.
const SHOWN_SUBNETS: usize = 12;
const SHOWN_INSTANCES: usize = 8;
const SHOWN_EXPECTS: usize = 16;

/// How many of `n` items to list: all with `full`, otherwise at most `cap`.
fn shown(n: usize, cap: usize, full: bool) -> usize {
    if full { n } else { n.min(cap) }
}

/// The line after a list cut short.
fn more(s: &mut String, indent: &str, left: usize, what: &str) {
    use std::fmt::Write;
    if left > 0 {
        let _ = writeln!(s, "{indent}… {left} more {what} (vpcd check --full)");
    }
}

/// A summary of a valid topology: its settings, the counts of each kind, and the first items
/// of each list, so that it fits a screen whatever the size; with `full`, every item.
pub fn summary(t: &Topology, full: bool) -> String {
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
    summary_hosts(&mut s, t, full);
    summary_vpcs(&mut s, t, full);
    summary_networks(&mut s, t);
    summary_instances(&mut s, t, full);
    summary_policy(&mut s, t);
    summary_balancers(&mut s, t);
    summary_expects(&mut s, t, full);
    s
}

/// Each load balancer: its network, VIP (and Elastic IP), listeners and backends.
fn summary_balancers(s: &mut String, t: &Topology) {
    use std::fmt::Write;
    if t.load_balancers.is_empty() {
        return;
    }
    let _ = writeln!(s, "load balancers ({}):", t.load_balancers.len());
    for lb in &t.load_balancers {
        let network = match &lb.network {
            Network::Vpc { vpc, .. } => t.vpc(*vpc).name.clone(),
            Network::Basic { tenant } => format!("basic ({tenant})"),
        };
        let eip = lb.eip.map(|e| format!(", public {e}")).unwrap_or_default();
        let _ = writeln!(s, "  {:<12} {network:<12} vip {}{eip}", lb.name, lb.vip);
        for l in &lb.listeners {
            let backends: Vec<String> = (l.backends.iter())
                .map(|b| format!("{}:{} w{}", t.instance(b.instance).name, b.port, b.weight))
                .collect();
            let (p, port, sched) = (l.protocol.word(), l.port, l.scheduler.word());
            let _ = writeln!(s, "    {p} {port} {sched}: {}", backends.join(", "));
        }
    }
}

fn summary_hosts(s: &mut String, t: &Topology, full: bool) {
    use std::fmt::Write;
    let _ = writeln!(s, "hosts ({}):", t.hosts.len());
    let n = shown(t.hosts.len(), SHOWN_HOSTS, full);
    for h in &t.hosts[..n] {
        let _ = writeln!(
            s,
            "  {:<12} {:<15} region {}",
            h.name,
            h.address.to_string(),
            h.region
        );
    }
    more(s, "  ", t.hosts.len() - n, "hosts");
}

/// The VPCs with their keys, and their subnets while the listed VPCs have few (otherwise a
/// count on each VPC's line).
fn summary_vpcs(s: &mut String, t: &Topology, full: bool) {
    use std::fmt::Write;
    let _ = writeln!(s, "vpcs ({}):", t.vpcs.len());
    let n = shown(t.vpcs.len(), SHOWN_VPCS, full);
    let subnets_of = |vi: usize| t.subnets.iter().filter(move |sn| sn.vpc.index() == vi);
    let with_subnets =
        full || (0..n).map(|vi| subnets_of(vi).count()).sum::<usize>() <= SHOWN_SUBNETS;
    for (vi, v) in t.vpcs[..n].iter().enumerate() {
        let count = if with_subnets {
            String::new()
        } else {
            let k = subnets_of(vi).count();
            format!(", {k} subnet{}", if k == 1 { "" } else { "s" })
        };
        let _ = writeln!(
            s,
            "  {:<12} tenant {:<10} {:<18} key {}{}{count}",
            v.name,
            v.tenant,
            v.cidr.to_string(),
            v.key,
            if v.key_assigned { " (assigned)" } else { "" }
        );
        if !with_subnets {
            continue;
        }
        for sn in subnets_of(vi) {
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
    more(s, "  ", t.vpcs.len() - n, "vpcs");
}

/// The basic network and the internet.
fn summary_networks(s: &mut String, t: &Topology) {
    use std::fmt::Write;
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
}

fn summary_instances(s: &mut String, t: &Topology, full: bool) {
    use std::fmt::Write;
    if full {
        let _ = writeln!(s, "instances ({}):", t.instances.len());
    } else {
        let _ = writeln!(s, "instances ({}):", instance_counts(t));
    }
    let n = shown(t.instances.len(), SHOWN_INSTANCES, full);
    for (n, i) in t.instances[..n].iter().enumerate() {
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
    more(s, "  ", t.instances.len() - n, "instances");
}

/// Counts of security groups, ACLs, their rules, and peerings.
fn summary_policy(s: &mut String, t: &Topology) {
    use std::fmt::Write;
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
}

fn summary_expects(s: &mut String, t: &Topology, full: bool) {
    use std::fmt::Write;
    let _ = writeln!(s, "expectations: {}", t.expects.len());
    let n = shown(t.expects.len(), SHOWN_EXPECTS, full);
    for e in &t.expects[..n] {
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
    more(s, "  ", t.expects.len() - n, "expectations");
}

/// `10000: 9990 in VPCs, 10 basic; 25 with an Elastic IP; host-a 5000, host-b 5000` (the
/// hosts' shares while they are few).
fn instance_counts(t: &Topology) -> String {
    let total = t.instances.len();
    let basic = t
        .instances
        .iter()
        .filter(|i| matches!(i.network, Network::Basic { .. }))
        .count();
    let eips = t.instances.iter().filter(|i| i.eip.is_some()).count();
    let mut s = format!("{total}: {} in VPCs, {basic} basic", total - basic);
    if eips > 0 {
        s += &format!("; {eips} with an Elastic IP");
    }
    if total > 0 && t.hosts.len() <= SHOWN_HOSTS {
        let per: Vec<String> = t
            .hosts
            .iter()
            .enumerate()
            .map(|(hi, h)| {
                let k = t.instances.iter().filter(|i| i.host.index() == hi).count();
                format!("{} {k}", h.name)
            })
            .collect();
        s += &format!("; {}", per.join(", "));
    }
    s
}

/// `--name LAB`, shared by the lab's subcommands.
#[derive(clap::Args, Debug, Clone)]
pub struct LabName {
    /// Lab name (prefixes every namespace it makes).
    #[arg(long = "name", default_value = vpcd::lab::DEFAULT_NAME)]
    pub name: String,
}

/// A `vpcd lab` subcommand.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum LabCommand {
    /// Build the lab and start one vpcd per host (the embedded default topology without FILE).
    Up {
        /// Topology file.
        file: Option<PathBuf>,
        #[command(flatten)]
        lab: LabName,
        /// Worker threads per daemon (default: the cores shared among the hosts, at least 1).
        #[arg(long)]
        workers: Option<usize>,
        /// Run an etcd in the lab's underlay namespace, apply the topology to it, and have
        /// the daemons follow it (`vpcd run --store`); a build with the feature `store`.
        #[arg(long)]
        store: bool,
    },
    /// Remove everything the lab made (idempotent; works after a crash).
    Down {
        #[command(flatten)]
        lab: LabName,
    },
    /// Run a command in an instance's (or a host's, `underlay`'s, `internet`'s) namespace.
    Exec {
        #[command(flatten)]
        lab: LabName,
        /// An instance, a host, `underlay` or `internet`.
        target: String,
        /// The command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Try every [[expect]] with real traffic; print expected vs observed; exit 1 on any
    /// difference, or when a daemon is not running.
    Check {
        #[command(flatten)]
        lab: LabName,
    },
    /// Show each host's daemon and counters; exit 1 when a daemon is dead or stale.
    Status {
        #[command(flatten)]
        lab: LabName,
    },
    /// Re-read the topology on every host (SIGHUP) and report each host's answer; with FILE,
    /// put FILE in force first. Exit 1 unless every host reloaded. In a store lab (`lab up
    /// --store`): `vpcd apply` FILE (or the lab's topology) to the lab's store and print
    /// apply's answer; a refusal or a lost race exits non-zero.
    Reload {
        /// A new topology for the lab.
        file: Option<PathBuf>,
        #[command(flatten)]
        lab: LabName,
    },
    /// Stop one host's daemon if it runs and start it again as `up` did (a store lab's reads
    /// its state from the store).
    Restart {
        #[command(flatten)]
        lab: LabName,
        /// The host whose daemon to restart.
        host: String,
    },
    /// Ask one of the lab's daemons, as `vpcd ctl` does: status, reload, stats, clear-counters,
    /// trace.
    Ctl {
        #[command(flatten)]
        lab: LabName,
        /// The host whose daemon to ask.
        host: String,
        /// Answer in JSON.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: crate::CtlCommand,
    },
    /// The labs that are up, with the health of each daemon; exit 1 when one is not running.
    List,
    /// up + check + down on the embedded default topology (lab "demo").
    Demo {
        /// Worker threads per daemon (default: the cores shared among the hosts, at least 1).
        #[arg(long)]
        workers: Option<usize>,
    },
}

fn say(line: &str) {
    outln!("[lab] {line}");
}

fn fail(e: anyhow::Error) -> ExitCode {
    errln!("vpcd lab: {e:#}");
    ExitCode::FAILURE
}

fn status_of(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What a subcommand needs before it starts.
fn needs(cmd: &LabCommand) -> (&'static str, Needs) {
    let tun = Needs {
        tun: true,
        ..Needs::default()
    };
    match cmd {
        LabCommand::Up { .. } => ("up", tun),
        LabCommand::Demo { .. } => ("demo", tun),
        LabCommand::Down { .. } => ("down", Needs::default()),
        LabCommand::Exec { .. } => (
            "exec",
            Needs {
                ip: true,
                ..Needs::default()
            },
        ),
        LabCommand::Check { .. } => ("check", Needs::default()),
        LabCommand::Status { .. } => ("status", Needs::default()),
        LabCommand::Reload { .. } => ("reload", Needs::default()),
        LabCommand::Restart { .. } => ("restart", tun),
        LabCommand::List => ("list", Needs::default()),
        LabCommand::Ctl { .. } => ("ctl", Needs::default()),
    }
}

/// `vpcd lab ...`.
pub fn lab(cmd: LabCommand) -> ExitCode {
    let (what, need) = needs(&cmd);
    if let Err(e) = vpcd::lab::preflight(what, need) {
        return fail(e);
    }
    let r = match cmd {
        LabCommand::Up {
            file,
            lab,
            workers,
            store,
        } => Lab::new(&lab.name).and_then(|l| up(&l, file, workers, store)),
        LabCommand::Down { lab } => Lab::new(&lab.name).and_then(|l| down(&l)),
        LabCommand::Exec {
            lab,
            target,
            command,
        } => Lab::new(&lab.name)
            .and_then(|l| l.exec(&target, &command))
            .map(|s| ExitCode::from(s.code().unwrap_or(1).clamp(0, 255) as u8)),
        LabCommand::Check { lab } => Lab::new(&lab.name)
            .and_then(|l| vpcd::lab::check(&l, &mut Out))
            .map(|r| status_of(r.failures() == 0)),
        LabCommand::Status { lab } => Lab::new(&lab.name).and_then(|l| status(&l)),
        LabCommand::Reload { file, lab } => Lab::new(&lab.name).and_then(|l| reload(&l, file)),
        LabCommand::Restart { lab, host } => Lab::new(&lab.name).and_then(|l| {
            let pid = l.restart(&host, &mut say)?;
            say(&format!("host {host}: vpcd running again (pid {pid})"));
            Ok(ExitCode::SUCCESS)
        }),
        LabCommand::List => Ok(list()),
        LabCommand::Demo { workers } => Ok(demo(workers)),
        LabCommand::Ctl {
            lab,
            host,
            json,
            command,
        } => Lab::new(&lab.name).and_then(|l| lab_ctl(&l, &host, json, command)),
    };
    r.unwrap_or_else(fail)
}

/// `vpcd lab ctl HOST CMD`: `vpcd ctl` on the socket of the lab's daemon for HOST.
fn lab_ctl(
    lab: &Lab,
    host: &str,
    json: bool,
    command: crate::CtlCommand,
) -> anyhow::Result<ExitCode> {
    let t = lab.topology()?;
    if t.host_named(host).is_none() {
        let hosts: Vec<&str> = t.hosts.iter().map(|h| h.name.as_str()).collect();
        anyhow::bail!(
            "lab \"{}\" has no host \"{host}\"; its hosts: {}",
            lab.name,
            hosts.join(", ")
        );
    }
    let path = vpcd::control::default_path(&lab.host_ns(host));
    Ok(crate::send(&path, command, json))
}

/// `vpcd lab up`: every hint it prints names the lab.
fn up(
    lab: &Lab,
    file: Option<PathBuf>,
    workers: Option<usize>,
    store: bool,
) -> anyhow::Result<ExitCode> {
    if store && !cfg!(feature = "store") {
        anyhow::bail!("vpcd lab up --store: {}", crate::storecmd::NO_STORE);
    }
    let (text, source) = match &file {
        Some(f) => (
            std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?,
            f.display().to_string(),
        ),
        None => (
            DEFAULT_TOPOLOGY.to_string(),
            "(embedded lab topology)".to_string(),
        ),
    };
    lab.up_with(&text, &source, workers, store, &mut say)?;
    if store {
        say(&format!(
            "the lab follows its store {}: `{}` applies FILE to it (vpcd apply)",
            lab.store_url(),
            lab.cmd("reload FILE")
        ));
    }
    say(&format!(
        "lab \"{}\" is up: `{}`, `{} INSTANCE -- CMD`, `{}`, `{}`",
        lab.name,
        lab.cmd("check"),
        lab.cmd("exec"),
        lab.cmd("status"),
        lab.cmd("down")
    ));
    Ok(ExitCode::SUCCESS)
}

fn down(lab: &Lab) -> anyhow::Result<ExitCode> {
    lab.down(&mut say)?;
    say(&format!("lab \"{}\" is down", lab.name));
    Ok(ExitCode::SUCCESS)
}

/// `vpcd lab status`: each host's daemon, and its counters when it is running (a dead or
/// stale daemon's file holds old ones: not shown).
fn status(lab: &Lab) -> anyhow::Result<ExitCode> {
    let t = lab.topology()?;
    let health = lab.refresh_stats();
    for (h, d) in t.hosts.iter().zip(&health) {
        outln!("== {} ({}) vpcd {d}", h.name, h.address);
        if !d.ok() {
            outln!(
                "  (its last statistics are stale: not shown; its log: {})",
                lab.log_path(&h.name).display()
            );
            continue;
        }
        for (k, v) in lab.read_stats(&h.name) {
            if v > 0 && k != "seq" {
                outln!("  {k:<48} {v}");
            }
        }
    }
    let mut bad = health.iter().filter(|d| !d.ok()).count();
    if lab.follows_store() {
        let o = lab.store_convergence()?;
        outln!("== store {}", lab.store_url());
        out!("{}", String::from_utf8_lossy(&o.stdout));
        errln!("{}", String::from_utf8_lossy(&o.stderr).trim_end());
        bad += usize::from(!o.status.success());
    }
    if bad > 0 {
        errln!(
            "vpcd lab: {bad} of {} daemons not running (or the store not converged): `{}` and `{}` restart the lab",
            health.len(),
            lab.cmd("down"),
            lab.cmd("up")
        );
    }
    Ok(status_of(bad == 0))
}

/// `vpcd lab reload [FILE]` in a store lab: apply's answer, as `vpcd apply` prints it.
fn store_reload(lab: &Lab, file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let new = match &file {
        Some(f) => Some((
            std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?,
            f.display().to_string(),
        )),
        None => None,
    };
    let new = new.as_ref().map(|(t, s)| (t.as_str(), s.as_str()));
    let o = lab.apply_to_lab_store(new, &mut say)?;
    out!("{}", String::from_utf8_lossy(&o.stdout));
    let err = String::from_utf8_lossy(&o.stderr);
    if !err.trim().is_empty() {
        errln!("{}", err.trim_end());
    }
    if !o.status.success() {
        errln!("vpcd lab: the lab's store was not changed");
        return Ok(ExitCode::from(
            o.status.code().unwrap_or(1).clamp(1, 255) as u8
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// `vpcd lab reload [FILE]`: every host's answer, read from its log.
fn reload(lab: &Lab, file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    lab.topology()?;
    if lab.follows_store() {
        return store_reload(lab, file);
    }
    let previous = match &file {
        Some(f) => {
            let text =
                std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            Some(lab.replace_topology(&text, &f.display().to_string())?)
        }
        None => None,
    };
    let results = lab.reload()?;
    let mut reloaded = 0;
    for r in &results {
        match &r.outcome {
            ReloadOutcome::Reloaded => {
                reloaded += 1;
                outln!("{}: reloaded", r.host);
            }
            ReloadOutcome::Refused(why) => {
                outln!("{}: REFUSED, it keeps its running topology:", r.host);
                for l in why.lines() {
                    outln!("  {l}");
                }
            }
            ReloadOutcome::NoAnswer => outln!(
                "{}: NO ANSWER within {} s (see {})",
                r.host,
                vpcd::lab::RELOAD_ANSWER.as_secs(),
                lab.log_path(&r.host).display()
            ),
            ReloadOutcome::NotRunning(s) => outln!("{}: not reloaded, its daemon is {s:?}", r.host),
        }
    }
    if let (Some((text, lock)), 0) = (&previous, reloaded) {
        lab.write_topology(text, lock)?;
        outln!("no host took the new topology: the previous one stays in force");
    }
    outln!("{reloaded} of {} hosts reloaded", results.len());
    Ok(status_of(reloaded == results.len()))
}

/// `vpcd lab list`: every lab that is up and the state of each of its daemons.
fn list() -> ExitCode {
    let labs = Lab::all();
    if labs.is_empty() {
        outln!("no lab is up");
        return ExitCode::SUCCESS;
    }
    let mut all_ok = true;
    for lab in &labs {
        let Ok(t) = lab.topology() else {
            all_ok = false;
            outln!(
                "{}: BROKEN (no topology in {}): `{}` removes it",
                lab.name,
                lab.dir().display(),
                lab.cmd("down")
            );
            continue;
        };
        let health = lab.refresh_stats();
        let ok = health.iter().all(|d| d.ok());
        all_ok &= ok;
        outln!(
            "{}: {} ({} hosts, {} instances, namespaces {}*)",
            lab.name,
            if ok { "up" } else { "UNHEALTHY" },
            t.hosts.len(),
            t.instances.len(),
            lab.prefix()
        );
        for d in &health {
            outln!("  {d}");
        }
    }
    status_of(all_ok)
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
        Ok(t) => out!("{}", summary(&t, false)),
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
    let result = vpcd::lab::check(&lab, &mut Out);
    say("tearing down");
    if let Err(e) = lab.down(&mut say) {
        errln!("vpcd lab: {e:#}");
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A region of 10,000 instances: 20 hosts, 40 VPCs of 250 instances each (one subnet
    /// apiece), 50 basic instances and some Elastic IPs.
    fn big() -> String {
        let mut s = String::from(
            "[underlay]\ntransport = \"gre-udp\"\n\n[basic]\ncidr = \"10.128.0.0/16\"\n\n\
             [internet]\ncidr = \"203.0.113.0/24\"\ngateway = \"h00\"\n\n\
             [[security_group]]\nname = \"sg\"\n\
             egress = [ { action = \"accept\", protocol = \"all\", destination = \"0.0.0.0/0\" } ]\n",
        );
        for h in 0..20 {
            s += &format!(
                "\n[[host]]\nname = \"h{h:02}\"\naddress = \"192.0.2.{}\"\n",
                h + 1
            );
        }
        let mut n = 0;
        for v in 0..40 {
            s += &format!(
                "\n[[vpc]]\nname = \"vpc{v:02}\"\ntenant = \"t{v:02}\"\ncidr = \"10.{v}.0.0/16\"\n\n\
                 [[subnet]]\nname = \"net{v:02}\"\nvpc = \"vpc{v:02}\"\ncidr = \"10.{v}.0.0/20\"\n"
            );
            for k in 0..250 {
                let eip = if n < 40 {
                    format!("eip = \"203.0.113.{}\"\n", n + 10)
                } else {
                    String::new()
                };
                s += &format!(
                    "\n[[instance]]\nname = \"i{n:05}\"\nhost = \"h{:02}\"\nsubnet = \"net{v:02}\"\n\
                     ip = \"10.{v}.{}.{}\"\nsecurity_groups = [\"sg\"]\n{eip}",
                    n % 20,
                    1 + k / 200,
                    10 + k % 200
                );
                n += 1;
            }
        }
        for b in 0..50 {
            s += &format!(
                "\n[[instance]]\nname = \"b{b:02}\"\nnetwork = \"basic\"\ntenant = \"t00\"\n\
                 host = \"h{:02}\"\nsecurity_groups = [\"sg\"]\n",
                b % 20
            );
        }
        for e in 0..30 {
            s += &format!(
                "\n[[expect]]\nfrom = \"i{e:05}\"\nto = \"i{:05}\"\nprotocol = \"icmp\"\nreach = false\n",
                e + 1
            );
        }
        s
    }

    /// The summary of 10,000 instances fits a screen: counts per kind, the first few of each
    /// list and what was left out; `--full` lists every item.
    #[test]
    fn the_summary_of_a_big_region_fits_a_screen() {
        let t = Topology::parse(&big(), "big.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.instances.len(), 10_050);
        let s = summary(&t, false);
        let lines: Vec<&str> = s.lines().collect();
        assert!(lines.len() <= 60, "{} lines:\n{s}", lines.len());
        for want in [
            "hosts (20):",
            "  … 14 more hosts (vpcd check --full)",
            "vpcs (40):",
            "  … 34 more vpcs (vpcd check --full)",
            "instances (10050: 10000 in VPCs, 50 basic; 40 with an Elastic IP):",
            "  … 10042 more instances (vpcd check --full)",
            "expectations: 30",
            "  … 14 more expectations (vpcd check --full)",
        ] {
            assert!(lines.contains(&want), "no line {want:?} in:\n{s}");
        }
        // The VPCs shown with their keys, and their subnets while they are few.
        let vpc00 = lines
            .iter()
            .find(|l| l.starts_with("  vpc00 "))
            .expect("vpc00");
        assert!(vpc00.contains(&format!("key {}", t.vpcs[0].key)), "{vpc00}");
        assert!(
            lines.iter().any(|l| l.starts_with("    subnet net05 ")),
            "{s}"
        );
        assert!(!s.contains("subnet net06"), "{s}");
        let listed = |name: &str| {
            let head = format!("  {name:<12} ");
            lines.iter().any(|l| l.starts_with(&head))
        };
        assert!(listed("i00007") && !listed("i00008"), "{s}");

        let full = summary(&t, true);
        let lines: Vec<&str> = full.lines().collect();
        assert!(!full.contains("more"), "--full leaves nothing out");
        assert!(lines.contains(&"instances (10050):"));
        for i in &t.instances {
            let name = format!("  {:<12} ", i.name);
            assert!(
                lines.iter().any(|l| l.starts_with(&name)),
                "{} missing",
                i.name
            );
        }
        for v in &t.vpcs {
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with(&format!("  {:<12} ", v.name)))
            );
        }
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.starts_with("    subnet "))
                .count(),
            40
        );
        // Header (2), hosts (21), VPCs with a subnet each (41), internet and basic (2),
        // instances (10,051), rules (1), expectations (31).
        assert_eq!(lines.len(), 2 + 21 + 81 + 2 + 10_051 + 1 + 31);
    }

    /// Many subnets are counted on their VPC's line instead of listed.
    #[test]
    fn many_subnets_are_counted() {
        let mut text = String::from("[[host]]\nname = \"h\"\naddress = \"192.0.2.1\"\n");
        for v in 0..3 {
            text +=
                &format!("\n[[vpc]]\nname = \"v{v}\"\ntenant = \"t\"\ncidr = \"10.{v}.0.0/16\"\n");
            for n in 0..5 {
                text += &format!(
                    "\n[[subnet]]\nname = \"s{v}{n}\"\nvpc = \"v{v}\"\ncidr = \"10.{v}.{n}.0/24\"\n"
                );
            }
        }
        let t = Topology::parse(&text, "subnets.toml").unwrap_or_else(|e| panic!("{e}"));
        let short = summary(&t, false);
        assert!(!short.contains("    subnet "), "{short}");
        assert_eq!(
            short.lines().filter(|l| l.ends_with(", 5 subnets")).count(),
            3,
            "{short}"
        );
        let full = summary(&t, true);
        assert_eq!(
            full.lines()
                .filter(|l| l.starts_with("    subnet "))
                .count(),
            15
        );
    }

    /// A small topology shows whole: the summary is the full list, with counts in the
    /// instances' heading.
    #[test]
    fn a_small_topology_shows_whole() {
        let t = Topology::parse(vpcd::lab::DEFAULT_TOPOLOGY, "lab.toml").unwrap();
        let short = summary(&t, false);
        let full = summary(&t, true);
        assert!(!short.contains("more"), "{short}");
        let heading = |s: &str| {
            s.lines()
                .find(|l| l.starts_with("instances ("))
                .unwrap()
                .to_string()
        };
        assert_eq!(
            heading(&full),
            format!("instances ({}):", t.instances.len())
        );
        assert!(heading(&short).starts_with(&format!("instances ({}: ", t.instances.len())));
        assert!(heading(&short).contains("host-a "), "{}", heading(&short));
        let rest = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| !l.starts_with("instances ("))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(rest(&short), rest(&full));
        assert_eq!(
            full.lines()
                .filter(|l| l.starts_with("  ") && l.contains(" -> "))
                .count(),
            t.expects.len()
        );
    }

    /// Once the reader has gone (EPIPE), writes are discarded instead of failing (or, with
    /// `print!`, panicking); other errors still show.
    #[test]
    fn a_reader_that_went_away_ends_the_output_quietly() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        let gone = AtomicBool::new(false);
        assert_eq!(write_or_discard(&mut writer, &gone, b"one\n").unwrap(), 4);
        drop(reader);
        assert_eq!(write_or_discard(&mut writer, &gone, b"two\n").unwrap(), 4);
        assert!(gone.load(Ordering::Relaxed));
        assert_eq!(write_or_discard(&mut writer, &gone, b"three\n").unwrap(), 6);
        flush_or_discard(&mut writer, &gone).unwrap();

        struct Full;
        impl io::Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(28))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let fresh = AtomicBool::new(false);
        assert!(write_or_discard(&mut Full, &fresh, b"x").is_err());
    }
}
