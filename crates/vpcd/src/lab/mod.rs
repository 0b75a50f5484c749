//! The lab: a whole region on one machine, made of network namespaces.
//!
//! ```text
//!   vpcd-LAB-ul: bridge br0 ──veth── vpcd-LAB-host-a: ul0 192.0.2.1, `vpcd run --host host-a`
//!                           └─veth── vpcd-LAB-host-b: ul0 192.0.2.2, `vpcd run --host host-b`
//!   vpcd-LAB-NETNS: one namespace per instance (its `netns`, prefixed), holding the TUN
//!   device its host's vpcd opens; vpcd-LAB-NETNS of the internet likewise
//! ```
//!
//! Every namespace a lab makes carries its prefix `vpcd-LAB-`, so labs of the same topology
//! run side by side. The daemons read the lab's copy of the topology, in which every `netns`
//! is prefixed ([`names`]); `lab exec` and `lab check` take the instances' names.
//!
//! State lives in `/run/vpcd-lab/LAB/`: the topology in force, a journal of everything
//! created (written *before* each creation, so that `down` can undo a half-finished `up`),
//! the daemons' logs and statistics. `down` also sweeps anything named `vpcd-LAB-*` and kills
//! any process whose command line points into the lab's directory, so it works after a crash.

mod build;
mod check;
mod health;
mod names;
mod preflight;
mod store;

pub use store::STORE_ADDRESS;

pub use check::{CheckReport, Row, check};
pub use health::{ANSWER, DaemonHealth, DaemonState, RELOAD_ANSWER, ReloadOutcome, ReloadResult};
pub use names::prefixed_topology;
pub use preflight::{Needs, preflight};

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

use crate::topology::Topology;

/// The topology `vpcd lab up` and `vpcd lab demo` use when given none.
pub const DEFAULT_TOPOLOGY: &str = include_str!("../../../../examples/lab.toml");
/// Where labs keep their state.
pub const LAB_DIR: &str = "/run/vpcd-lab";
/// The name of the lab when none is given.
pub const DEFAULT_NAME: &str = "lab";

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

    /// Every lab that is up (has a state directory), by name.
    pub fn all() -> Vec<Lab> {
        let Ok(entries) = fs::read_dir(LAB_DIR) else {
            return Vec::new();
        };
        let mut labs: Vec<Lab> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| Lab::new(e.file_name().to_str()?).ok())
            .collect();
        labs.sort_by(|a, b| a.name.cmp(&b.name));
        labs
    }

    /// Its state directory.
    pub fn dir(&self) -> PathBuf {
        Path::new(LAB_DIR).join(&self.name)
    }

    /// `vpcd-LAB-`: the start of every namespace's name the lab makes.
    pub fn prefix(&self) -> String {
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

    /// `vpcd lab WHAT`, with `--name LAB` unless this is the default lab: the command as
    /// a hint prints it.
    pub fn cmd(&self, what: &str) -> String {
        if self.name == DEFAULT_NAME {
            format!("vpcd lab {what}")
        } else {
            format!("vpcd lab {what} --name {}", self.name)
        }
    }

    /// The topology file in force (the daemons read it; its namespaces are prefixed).
    pub fn topology_path(&self) -> PathBuf {
        self.dir().join("topology.toml")
    }

    /// True when the lab is up (its topology in force exists).
    pub fn is_up(&self) -> bool {
        self.topology_path().exists()
    }

    /// The topology in force.
    pub fn topology(&self) -> Result<Topology> {
        let path = self.topology_path();
        if !path.exists() {
            bail!(
                "lab \"{}\" is not up (no {}): `{}` builds it",
                self.name,
                path.display(),
                self.cmd("up")
            );
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

    /// The pid the journal records for a host's daemon, alive or not (see
    /// [`Lab::verified_pid`]).
    pub fn daemon_pid(&self, host: &str) -> Option<u32> {
        self.daemons()
            .into_iter()
            .filter(|(h, _)| h == host)
            .map(|(_, p)| p)
            .next_back()
    }

    /// The pid of a host's daemon when that process is alive and is this lab's daemon of
    /// that host (its command line says so): the only pid the lab signals.
    pub fn verified_pid(&self, host: &str) -> Option<u32> {
        self.daemon_pid(host)
            .filter(|&p| is_daemon_of(p, &self.topology_path(), host))
    }

    /// Every daemon's pid the journal records, by host.
    pub fn daemons(&self) -> Vec<(String, u32)> {
        self.journaled("pid")
            .iter()
            .filter_map(|l| {
                let (h, pid) = l.split_once(' ')?;
                Some((h.to_string(), pid.trim().parse().ok()?))
            })
            .collect()
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
            bail!("no command given: {} {target} -- CMD...", self.cmd("exec"));
        }
        Ok(Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(cmd)
            .status()?)
    }

    /// A host's statistics.
    pub fn read_stats(&self, host: &str) -> std::collections::BTreeMap<String, u64> {
        crate::daemon::parse_stats(&fs::read_to_string(self.stats_path(host)).unwrap_or_default())
    }
}

/// A process's arguments, or none when it is gone (or a zombie, whose command line is empty).
fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (!args.is_empty()).then_some(args)
}

/// True when `pid` is alive and is `vpcd run --topology TOPOLOGY --host HOST`, or (`lab up
/// --store`) `vpcd run --store URL --host HOST --stats` in TOPOLOGY's directory (a pid reused
/// by another program, or a daemon of another lab or host, is never signalled).
fn is_daemon_of(pid: u32, topology: &Path, host: &str) -> bool {
    let Some(args) = cmdline(pid) else {
        return false;
    };
    let after = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    args.get(1).is_some_and(|a| a == "run")
        && after("--host").is_some_and(|h| h == host)
        && (after("--topology").is_some_and(|t| Path::new(t) == topology)
            || after("--store").is_some()
                && after("--stats").is_some_and(|s| Path::new(s).parent() == topology.parent()))
}

/// True when `pid` is alive and its command line mentions `dir` (a pid reused by another
/// program is never signalled).
fn is_ours(pid: u32, dir: &Path) -> bool {
    cmdline(pid).is_some_and(|args| {
        let inside = format!("{}/", dir.display());
        args.iter().any(|a| a.contains(&inside))
    })
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
