//! The lab: a whole region on one machine, made of network namespaces.
//!
//! ```text
//!   vpcd-LAB-ul: bridge br0 ──veth── vpcd-LAB-host-a: ul0 192.0.2.1, `vpcd run --host host-a`
//!                           └─veth── vpcd-LAB-host-b: ul0 192.0.2.2, `vpcd run --host host-b`
//!   one namespace per instance (its `netns`), holding the TUN device its host's vpcd opens
//! ```
//!
//! State lives in `/run/vpcd-lab/LAB/`: the topology in force, a journal of everything
//! created (written *before* each creation, so that `down` can undo a half-finished `up`),
//! the daemons' logs and statistics. `down` also sweeps anything named `vpcd-LAB-*` and kills
//! any process whose command line points into the lab's directory, so it works after a crash.

mod check;

pub use check::{CheckReport, check};

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::io::netns::{self, Netlink};
use crate::topology::Topology;

/// The topology `vpcd lab up` and `vpcd lab demo` use when given none.
pub const DEFAULT_TOPOLOGY: &str = include_str!("../../../../examples/lab.toml");
/// Where labs keep their state.
pub const LAB_DIR: &str = "/run/vpcd-lab";

/// A lab, by name.
#[derive(Debug, Clone)]
pub struct Lab {
    /// Its name (also the prefix of its namespaces).
    pub name: String,
}

impl Lab {
    /// The lab called `name`; names are short words (they prefix namespace names).
    pub fn new(name: &str) -> Result<Lab> {
        // No '-': it separates the lab's name from the rest in namespace names.
        if name.is_empty()
            || name.len() > 32
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            bail!("lab name \"{name}\": use 1-32 characters of a-z A-Z 0-9 _");
        }
        Ok(Lab {
            name: name.to_string(),
        })
    }

    /// Its state directory.
    pub fn dir(&self) -> PathBuf {
        Path::new(LAB_DIR).join(&self.name)
    }

    fn prefix(&self) -> String {
        format!("vpcd-{}-", self.name)
    }

    /// The namespace holding the underlay bridge.
    pub fn underlay_ns(&self) -> String {
        format!("{}ul", self.prefix())
    }

    /// The namespace of a host.
    pub fn host_ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix())
    }

    /// The topology file in force.
    pub fn topology_path(&self) -> PathBuf {
        self.dir().join("topology.toml")
    }

    /// The topology in force.
    pub fn topology(&self) -> Result<Topology> {
        let path = self.topology_path();
        if !path.exists() {
            bail!("lab \"{}\" is not up (no {})", self.name, path.display());
        }
        Ok(crate::files::load_topology(&path)?)
    }

    /// A host's statistics file.
    pub fn stats_path(&self, host: &str) -> PathBuf {
        self.dir().join(format!("{host}.stats"))
    }

    /// A host's log file.
    pub fn log_path(&self, host: &str) -> PathBuf {
        self.dir().join(format!("{host}.log"))
    }

    fn journal(&self) -> Result<File> {
        Ok(OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join("journal"))?)
    }

    fn note(&self, line: &str) -> Result<()> {
        let mut j = self.journal()?;
        writeln!(j, "{line}")?;
        j.sync_data()?;
        Ok(())
    }

    fn journaled(&self, kind: &str) -> Vec<String> {
        fs::read_to_string(self.dir().join("journal"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix(kind).map(|r| r.trim().to_string()))
            .collect()
    }

    fn add_netns(&self, name: &str) -> Result<()> {
        if netns::exists(name) {
            bail!(
                "network namespace {name} already exists: pick other netns names, or remove it (ip netns del {name})"
            );
        }
        self.note(&format!("netns {name}"))?;
        netns::add(name)?;
        Netlink::open_in(Some(name))?.link_up("lo")?;
        Ok(())
    }

    /// Builds the lab from `topology_text` and starts one daemon per host. On failure,
    /// everything made so far is removed.
    pub fn up(
        &self,
        topology_text: &str,
        source: &str,
        workers: Option<usize>,
        log: &mut dyn FnMut(&str),
    ) -> Result<()> {
        let topo = Topology::parse(topology_text, source)?;
        if topo.internet.as_ref().is_some_and(|i| i.netns.is_none()) {
            bail!(
                "{source}: [internet] has no netns: the lab puts the internet in a namespace of its own"
            );
        }
        for i in &topo.instances {
            if i.netns.is_none() {
                bail!(
                    "{source}: instance \"{}\" has no netns: the lab puts every instance in a namespace of its own",
                    i.name
                );
            }
        }
        if self.dir().exists() {
            bail!(
                "lab \"{}\" is already up ({} exists): run `vpcd lab down{}` first",
                self.name,
                self.dir().display(),
                self.flag()
            );
        }
        fs::create_dir_all(self.dir())?;
        let r = self.build(&topo, topology_text, workers, log);
        if r.is_err() {
            log("failed: removing what was made");
            let _ = self.down(&mut |_| {});
        }
        r
    }

    fn flag(&self) -> String {
        if self.name == "lab" {
            String::new()
        } else {
            format!(" --name {}", self.name)
        }
    }

    fn build(
        &self,
        topo: &Topology,
        text: &str,
        workers: Option<usize>,
        log: &mut dyn FnMut(&str),
    ) -> Result<()> {
        fs::write(self.topology_path(), text)?;
        // A new lab is a new region: the provider's allocations start from scratch, recorded
        // beside the lab's copy of the topology (the daemons refuse a topology their lock
        // does not cover).
        let lock = crate::topology::lock_path(&self.topology_path());
        fs::write(&lock, topo.allocations.render("topology.toml"))?;
        let ul = self.underlay_ns();
        log(&format!("underlay: namespace {ul}, bridge br0"));
        self.add_netns(&ul)?;
        let bridge = Netlink::open_in(Some(&ul))?;
        bridge.add_bridge("br0")?;
        bridge.link_up("br0")?;
        for (n, h) in topo.hosts.iter().enumerate() {
            let ns = self.host_ns(&h.name);
            log(&format!(
                "host {}: namespace {ns}, {} on ul0",
                h.name, h.address
            ));
            self.add_netns(&ns)?;
            let port = format!("p{n}");
            bridge.add_veth_pair("ul0", Some(&ns), &port, None)?;
            bridge.set_master(&port, "br0")?;
            bridge.link_up(&port)?;
            let host = Netlink::open_in(Some(&ns))?;
            host.add_address("ul0", h.address, 32)?;
            host.link_up("ul0")?;
            for other in topo.hosts.iter().filter(|o| o.name != h.name) {
                host.add_route(other.address, 32, "ul0")?;
            }
        }
        for i in &topo.instances {
            let ns = i.netns.as_deref().unwrap_or_default();
            self.add_netns(ns)?;
        }
        if let Some(ns) = topo.internet.as_ref().and_then(|i| i.netns.as_deref()) {
            self.add_netns(ns)?;
            log(&format!(
                "internet: namespace {ns}, reached through host {}",
                topo.host(topo.internet.as_ref().unwrap().gateway).name
            ));
        }
        log(&format!("instances: {} namespaces", topo.instances.len()));
        // Every host's daemon runs on this one machine: they share its cores.
        let workers = workers.unwrap_or_else(|| lab_workers(topo.hosts.len()));
        for h in &topo.hosts {
            let ns = self.host_ns(&h.name);
            let logf = File::create(self.log_path(&h.name))?;
            // This very executable, even if a rebuild replaced the file meanwhile.
            // It shows as `vpcd` (argv[0]; the daemon names its process so too), for ps
            // and pidof, not as `exe`.
            let mut cmd = Command::new("/proc/self/exe");
            cmd.arg0("vpcd")
                .args(["run", "--netns", &ns, "--topology"])
                .arg(self.topology_path())
                .args(["--host", &h.name, "--stats"])
                .arg(self.stats_path(&h.name))
                .stdin(Stdio::null())
                .stdout(logf.try_clone()?)
                .stderr(logf);
            cmd.args(["--workers", &workers.to_string()]);
            let child = cmd.spawn().context("starting vpcd run")?;
            self.note(&format!("pid {} {}", h.name, child.id()))?;
            log(&format!(
                "host {}: vpcd run started (pid {}, log {})",
                h.name,
                child.id(),
                self.log_path(&h.name).display()
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for h in &topo.hosts {
            while !self.stats_path(&h.name).exists() {
                if Instant::now() > deadline || !self.daemon_alive(&h.name) {
                    let tail = fs::read_to_string(self.log_path(&h.name)).unwrap_or_default();
                    bail!(
                        "vpcd for host {} did not start; its log says:\n{}",
                        h.name,
                        tail.trim_end()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        log("all hosts running");
        Ok(())
    }

    /// The pid of a host's daemon, if it is alive.
    pub fn daemon_pid(&self, host: &str) -> Option<u32> {
        self.journaled("pid")
            .iter()
            .filter_map(|l| {
                let (h, pid) = l.split_once(' ')?;
                (h == host).then(|| pid.trim().parse().ok())?
            })
            .next_back()
    }

    fn daemon_alive(&self, host: &str) -> bool {
        self.daemon_pid(host)
            .is_some_and(|p| is_ours(p, &self.dir()))
    }

    /// Every daemon's pid, by host.
    pub fn daemons(&self) -> Vec<(String, u32)> {
        self.journaled("pid")
            .iter()
            .filter_map(|l| {
                let (h, pid) = l.split_once(' ')?;
                Some((h.to_string(), pid.trim().parse().ok()?))
            })
            .collect()
    }

    /// Removes everything the lab made; idempotent, and works after a crash or a
    /// half-finished `up`.
    pub fn down(&self, log: &mut dyn FnMut(&str)) -> Result<()> {
        let dir = self.dir();
        // 1. Daemons: the journal's, and any process pointing into the lab's directory.
        let mut pids: Vec<u32> = self.daemons().into_iter().map(|(_, p)| p).collect();
        pids.extend(processes_using(&dir));
        pids.sort_unstable();
        pids.dedup();
        let pids: Vec<u32> = pids.into_iter().filter(|&p| is_ours(p, &dir)).collect();
        for &p in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|&p| is_ours(p, &dir)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for &p in pids.iter().filter(|&&p| is_ours(p, &dir)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if !pids.is_empty() {
            log(&format!("stopped {} vpcd process(es)", pids.len()));
        }
        // 2. Namespaces: the journal's, and any named vpcd-LAB-*.
        let mut spaces = self.journaled("netns");
        if let Ok(entries) = fs::read_dir(netns::NETNS_DIR) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&self.prefix()) {
                    spaces.push(n);
                }
            }
        }
        spaces.sort();
        spaces.dedup();
        let mut removed = 0;
        for ns in spaces.iter().filter(|n| netns::exists(n)) {
            match netns::del(ns) {
                Ok(()) => removed += 1,
                Err(e) => log(&format!("warning: {e}")),
            }
        }
        if removed > 0 {
            log(&format!("removed {removed} namespace(s)"));
        }
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }

    /// The namespace of an instance, a host (`host-a`), `underlay`, or `internet`.
    pub fn namespace_of(&self, target: &str) -> Result<String> {
        let t = self.topology()?;
        if let Some(id) = t.instance_named(target) {
            return Ok(t.instance(id).netns.clone().unwrap_or_default());
        }
        if t.host_named(target).is_some() {
            return Ok(self.host_ns(target));
        }
        match target {
            "underlay" => Ok(self.underlay_ns()),
            "internet" => match t.internet.as_ref().and_then(|i| i.netns.clone()) {
                Some(ns) => Ok(ns),
                None => bail!("lab \"{}\" has no internet", self.name),
            },
            _ => bail!(
                "\"{target}\" is neither an instance nor a host of lab \"{}\"",
                self.name
            ),
        }
    }

    /// Runs `cmd` inside the namespace of `target`, returning its exit status.
    pub fn exec(&self, target: &str, cmd: &[String]) -> Result<std::process::ExitStatus> {
        let ns = self.namespace_of(target)?;
        if cmd.is_empty() {
            bail!("no command given: vpcd lab exec {target} -- CMD...");
        }
        Ok(Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(cmd)
            .status()?)
    }

    /// Sends SIGUSR1 to every daemon and waits until each has rewritten its statistics.
    pub fn refresh_stats(&self) {
        let before: Vec<(String, u64)> = self
            .daemons()
            .into_iter()
            .map(|(h, _)| {
                let seq = self.read_stats(&h).get("seq").copied().unwrap_or(0);
                (h, seq)
            })
            .collect();
        for (_, pid) in self.daemons() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGUSR1,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for (h, seq) in before {
            while self.read_stats(&h).get("seq").copied().unwrap_or(0) <= seq
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// A host's statistics.
    pub fn read_stats(&self, host: &str) -> std::collections::BTreeMap<String, u64> {
        crate::daemon::parse_stats(&fs::read_to_string(self.stats_path(host)).unwrap_or_default())
    }
}

/// True when `pid` is alive and its command line mentions `dir` (a pid reused by another
/// program is never signalled).
fn is_ours(pid: u32, dir: &Path) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            c.contains(&format!("{}/", dir.display()))
        })
        .unwrap_or(false)
}

fn processes_using(dir: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| p != std::process::id() && is_ours(p, dir))
        .collect()
}

/// Workers per daemon in a lab: the machine's cores shared among its hosts' daemons (at least
/// one each, at most [`crate::daemon::default_workers`]). More workers than cores only adds
/// hand-offs between threads that take turns on a core: on 2 cores with 2 hosts, 1 worker per
/// daemon moved 7.5 Gbit/s of GRE-in-UDP where 2 moved 5.7 (`scripts/bench-e2e.sh`).
pub fn lab_workers(hosts: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / hosts.max(1)).clamp(1, crate::daemon::default_workers())
}
