//! `lab up` and `lab down`: namespaces, the underlay, the daemons, and their removal.

use std::fs;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{Lab, is_ours, lab_workers, processes_using};
use crate::io::netns::{self, Netlink};
use crate::topology::Topology;

impl Lab {
    fn add_netns(&self, name: &str) -> Result<()> {
        if netns::exists(name) {
            // Every name carries this lab's prefix: only an earlier lab of this name made it.
            bail!(
                "network namespace {name} already exists, left by an earlier lab \"{}\": `{}` removes it",
                self.name,
                self.cmd("down")
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
        self.up_with(topology_text, source, workers, false, log)
    }

    /// [`Lab::up`]; with `store`, the lab runs an etcd in its underlay namespace, applies the
    /// topology to it and its daemons follow it (`vpcd run --store`; see `lab::store`).
    pub fn up_with(
        &self,
        topology_text: &str,
        source: &str,
        workers: Option<usize>,
        store: bool,
        log: &mut dyn FnMut(&str),
    ) -> Result<()> {
        Topology::parse(topology_text, source)?;
        let text = super::prefixed_topology(topology_text, source, &self.prefix())?;
        let topo = Topology::parse(&text, source)?;
        self.validate(&topo, source)?;
        if self.dir().exists() {
            bail!(
                "lab \"{}\" is already up ({} exists): run `{}` first",
                self.name,
                self.dir().display(),
                self.cmd("down")
            );
        }
        fs::create_dir_all(self.dir())?;
        let r = self.build(&topo, &text, workers, store, log);
        if r.is_err() {
            log("failed: removing what was made");
            let _ = self.down(&mut |_| {});
        }
        r
    }

    fn build(
        &self,
        topo: &Topology,
        text: &str,
        workers: Option<usize>,
        store: bool,
        log: &mut dyn FnMut(&str),
    ) -> Result<()> {
        fs::write(self.topology_path(), text)?;
        // A new lab is a new region: the provider's allocations start from scratch, recorded
        // beside the lab's copy of the topology (the daemons refuse a topology their lock
        // does not cover).
        let lock = crate::topology::lock_path(&self.topology_path());
        fs::write(&lock, topo.allocations.render("topology.toml"))?;
        self.build_underlay(topo, log)?;
        for i in &topo.instances {
            self.add_netns(i.netns.as_deref().unwrap_or_default())?;
        }
        log(&format!(
            "instances: {} namespaces {}*",
            topo.instances.len(),
            self.prefix()
        ));
        if let Some(inet) = &topo.internet {
            let ns = inet.netns.as_deref().unwrap_or_default();
            self.add_netns(ns)?;
            log(&format!(
                "internet: namespace {ns}, reached through host {}",
                topo.host(inet.gateway).name
            ));
        }
        if store {
            self.start_store(topo, log)?;
            self.apply_to_store(log)?;
        }
        // Every host's daemon runs on this one machine: they share its cores.
        let workers = workers.unwrap_or_else(|| lab_workers(topo.hosts.len()));
        self.note(&format!("workers {workers}"))?;
        let mut started = Vec::new();
        for h in &topo.hosts {
            started.push(self.start_daemon(&h.name, workers, store, log)?);
        }
        for (h, child) in topo.hosts.iter().zip(&mut started) {
            self.wait_started(&h.name, child)?;
        }
        log("all hosts running");
        Ok(())
    }

    /// The bridge in its namespace, and each host's namespace with a veth on it; every
    /// underlay link has the topology's underlay MTU.
    fn build_underlay(&self, topo: &Topology, log: &mut dyn FnMut(&str)) -> Result<()> {
        let ul = self.underlay_ns();
        log(&format!("underlay: namespace {ul}, bridge br0"));
        self.add_netns(&ul)?;
        // A switch, not a firewall: with br_netfilter loaded, the host's iptables would see
        // every bridged frame (best effort: the knobs exist only then).
        netns::within(Some(&ul), || {
            for k in ["iptables", "ip6tables", "arptables"] {
                let _ = fs::write(format!("/proc/sys/net/bridge/bridge-nf-call-{k}"), "0");
            }
            Ok(())
        })?;
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
            bridge.set_mtu(&port, topo.underlay.mtu)?;
            bridge.link_up(&port)?;
            let host = Netlink::open_in(Some(&ns))?;
            host.set_mtu("ul0", topo.underlay.mtu)?;
            host.add_address("ul0", h.address, 32)?;
            host.link_up("ul0")?;
            for other in topo.hosts.iter().filter(|o| o.name != h.name) {
                host.add_route(other.address, 32, "ul0")?;
            }
        }
        Ok(())
    }

    /// `vpcd lab restart HOST`: stops the host's daemon if it runs (SIGTERM, SIGKILL after
    /// 5 s; only the pid [`Lab::verified_pid`] gives), then starts it again as `up` did: the
    /// same command line (a store lab's daemon reads its state from the store), its log
    /// appended to. Returns the new daemon's pid once it forwards (its statistics exist).
    pub fn restart(&self, host: &str, log: &mut dyn FnMut(&str)) -> Result<u32> {
        let topo = self.topology()?;
        if topo.host_named(host).is_none() {
            let hosts: Vec<&str> = topo.hosts.iter().map(|h| h.name.as_str()).collect();
            bail!(
                "lab \"{}\" has no host \"{host}\"; its hosts: {}",
                self.name,
                hosts.join(", ")
            );
        }
        if let Some(pid) = self.verified_pid(host) {
            stop_pid(pid, |p| self.verified_pid(host) == Some(p))?;
            log(&format!("host {host}: vpcd (pid {pid}) stopped"));
        }
        // The old statistics would say the new daemon runs before it does.
        let _ = fs::remove_file(self.stats_path(host));
        let workers = self
            .journaled("workers")
            .last()
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| lab_workers(topo.hosts.len()));
        let mut child = self.start_daemon(host, workers, self.follows_store(), log)?;
        self.wait_started(host, &mut child)?;
        self.daemon_pid(host)
            .context("the restarted daemon's pid is not in the journal")
    }

    /// True for a lab made by `lab up --store` (the journal records its store).
    pub fn follows_store(&self) -> bool {
        !self.journaled("store ").is_empty()
    }

    /// Starts `vpcd run` for `host` in its namespace; its pid goes to the journal. The child
    /// is returned so that [`Lab::wait_started`] can tell how it ended if it does not start
    /// (dropping it neither waits nor signals: the daemon outlives `lab up`).
    fn start_daemon(
        &self,
        host: &str,
        workers: usize,
        store: bool,
        log: &mut dyn FnMut(&str),
    ) -> Result<Child> {
        // Appended to: a restarted daemon's log follows its predecessor's.
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(host))?;
        let source = if store {
            ["--store".to_string(), self.store_url()]
        } else {
            [
                "--topology".to_string(),
                self.topology_path().display().to_string(),
            ]
        };
        // This very executable, even if a rebuild replaced the file meanwhile. It shows as
        // `vpcd` (argv[0]; the daemon names its process so too), for ps and pidof, not as
        // `exe`.
        let child = Command::new("/proc/self/exe")
            .arg0("vpcd")
            .args(["run", "--netns", &self.host_ns(host)])
            .args(source)
            .args(["--host", host, "--stats"])
            .arg(self.stats_path(host))
            .args(["--workers", &workers.to_string()])
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("starting vpcd run")?;
        self.note(&format!("pid {host} {}", child.id()))?;
        log(&format!(
            "host {host}: vpcd run started (pid {}, log {})",
            child.id(),
            self.log_path(host).display()
        ));
        Ok(child)
    }

    /// Waits until `host`'s daemon has written its statistics (it is forwarding then); fails
    /// saying how it ended (its exit status, or still running after 15 s) and its log.
    fn wait_started(&self, host: &str, child: &mut Child) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.stats_path(host).exists() {
            let ended = match child.try_wait() {
                Ok(Some(status)) => format!("ended ({status})"),
                Ok(None) if Instant::now() > deadline => "still starting after 15 s".into(),
                Ok(None) => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => format!("cannot be waited for ({e})"),
            };
            let tail = fs::read_to_string(self.log_path(host)).unwrap_or_default();
            bail!(
                "vpcd for host {host} did not start: {ended}; its log says:\n{}",
                tail.trim_end()
            );
        }
        Ok(())
    }

    /// Removes everything the lab made; idempotent, and works after a crash or a
    /// half-finished `up`. Fails, saying which, when a process or namespace stays.
    pub fn down(&self, log: &mut dyn FnMut(&str)) -> Result<()> {
        let stopped = self.stop_processes()?;
        if stopped > 0 {
            log(&format!("stopped {stopped} vpcd process(es)"));
        }
        let removed = self.remove_namespaces()?;
        if removed > 0 {
            log(&format!("removed {removed} namespace(s)"));
        }
        let dir = self.dir();
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }

    /// Stops the journal's daemons and any process pointing into the lab's directory
    /// (SIGTERM, SIGKILL after 5 s); returns how many stopped.
    fn stop_processes(&self) -> Result<usize> {
        let dir = self.dir();
        let mut pids: Vec<u32> = self.daemons().into_iter().map(|(_, p)| p).collect();
        pids.extend(processes_using(&dir));
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|&p| is_ours(p, &dir));
        let signal = |pids: &[u32], s: Signal| -> Result<()> {
            for &p in pids {
                match kill(Pid::from_raw(p as i32), s) {
                    // Gone meanwhile: stopped.
                    Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                    Err(e) => bail!("cannot stop process {p} ({s}): {e}"),
                }
            }
            Ok(())
        };
        signal(&pids, Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|&p| is_ours(p, &dir)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let left: Vec<u32> = pids.iter().copied().filter(|&p| is_ours(p, &dir)).collect();
        let _ = signal(&left, Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(2);
        while left.iter().any(|&p| is_ours(p, &dir)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(p) = left.iter().find(|&&p| is_ours(p, &dir)) {
            bail!("process {p} survived SIGKILL");
        }
        Ok(pids.len())
    }

    /// Removes the journal's namespaces and any named `vpcd-LAB-*`; returns how many.
    fn remove_namespaces(&self) -> Result<usize> {
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
        let (mut removed, mut failed) = (0, Vec::new());
        for ns in spaces.iter().filter(|n| netns::exists(n)) {
            match netns::del(ns) {
                Ok(()) => removed += 1,
                Err(e) => failed.push(format!("{ns}: {e}")),
            }
        }
        if !failed.is_empty() {
            bail!("namespaces left: {}", failed.join("; "));
        }
        Ok(removed)
    }
}

/// Stops process `pid` (SIGTERM, SIGKILL after 5 s) while `ours(pid)` says it is the process
/// meant (a pid reused meanwhile is never signalled); fails when it survives SIGKILL.
fn stop_pid(pid: u32, ours: impl Fn(u32) -> bool) -> Result<()> {
    for (signal, wait) in [(Signal::SIGTERM, 5000), (Signal::SIGKILL, 2000)] {
        if !ours(pid) {
            return Ok(());
        }
        match kill(Pid::from_raw(pid as i32), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => bail!("cannot stop process {pid} ({signal}): {e}"),
        }
        let deadline = Instant::now() + Duration::from_millis(wait);
        while ours(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if ours(pid) {
        bail!("process {pid} survived SIGKILL");
    }
    Ok(())
}
