//! Whether the lab's daemons are alive and answering, and reloading them.
//!
//! A daemon rewrites its statistics file on SIGUSR1, its `seq` one higher: one that is alive
//! and rewrites it within [`ANSWER`] is running; alive but silent, it is stale (stopped, or
//! stuck); gone, it is dead. Only a pid verified as the lab's daemon of that host is signalled.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::Lab;

/// How long a daemon has to rewrite its statistics after SIGUSR1.
pub const ANSWER: Duration = Duration::from_secs(3);
/// How long a daemon has to log the outcome of a reload (SIGHUP).
pub const RELOAD_ANSWER: Duration = Duration::from_secs(10);

/// A daemon's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonState {
    /// Alive, and it rewrote its statistics when asked.
    Running,
    /// Alive, but it did not rewrite its statistics within [`ANSWER`].
    Stale,
    /// No process of the lab's for that host.
    Dead,
    /// Alive, and no statistics file yet: still starting, not signalled (before its
    /// handlers are installed, SIGUSR1 would end it).
    Starting,
}

/// A host's daemon and its state.
#[derive(Debug, Clone)]
pub struct DaemonHealth {
    /// The host.
    pub host: String,
    /// The daemon's pid (the journal's, when it is dead).
    pub pid: Option<u32>,
    /// Its state.
    pub state: DaemonState,
}

impl DaemonHealth {
    /// Running.
    pub fn ok(&self) -> bool {
        self.state == DaemonState::Running
    }
}

impl fmt::Display for DaemonHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pid = self
            .pid
            .map_or("no pid".to_string(), |p| format!("pid {p}"));
        match self.state {
            DaemonState::Running => write!(f, "{}: running ({pid})", self.host),
            DaemonState::Stale => write!(
                f,
                "{}: STALE ({pid} is alive but did not rewrite its statistics within {} s)",
                self.host,
                ANSWER.as_secs()
            ),
            DaemonState::Dead => write!(f, "{}: DEAD ({pid} is gone)", self.host),
            DaemonState::Starting => write!(
                f,
                "{}: STARTING ({pid} has written no statistics yet)",
                self.host
            ),
        }
    }
}

/// What a host's daemon said to a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// `topology reloaded`.
    Reloaded,
    /// `reload refused`, and why.
    Refused(String),
    /// Nothing logged within [`RELOAD_ANSWER`].
    NoAnswer,
    /// Not running: not signalled.
    NotRunning(DaemonState),
}

/// A host's reload.
#[derive(Debug, Clone)]
pub struct ReloadResult {
    /// The host.
    pub host: String,
    /// What its daemon said.
    pub outcome: ReloadOutcome,
}

impl Lab {
    fn seq(&self, host: &str) -> u64 {
        self.read_stats(host).get("seq").copied().unwrap_or(0)
    }

    /// Asks every host's daemon to rewrite its statistics (SIGUSR1) and waits until each
    /// has, at most [`ANSWER`]: the state of each. The hosts are those of the topology in
    /// force (none when the lab is not up).
    pub fn refresh_stats(&self) -> Vec<DaemonHealth> {
        let hosts: Vec<String> = match self.topology() {
            Ok(t) => t.hosts.iter().map(|h| h.name.clone()).collect(),
            Err(_) => Vec::new(),
        };
        let asked: Vec<(String, Option<u32>, u64, bool)> = hosts
            .into_iter()
            .map(|h| {
                let seq = self.seq(&h);
                let pid = self.verified_pid(&h);
                // The statistics file is written from the control loop, whose signal
                // handlers are installed: before it exists, SIGUSR1 would end the daemon.
                let started = self.stats_path(&h).exists();
                if let Some(p) = pid.filter(|_| started) {
                    let _ = kill(Pid::from_raw(p as i32), Signal::SIGUSR1);
                }
                (h, pid, seq, started)
            })
            .collect();
        let deadline = Instant::now() + ANSWER;
        asked
            .into_iter()
            .map(|(host, pid, seq, started)| {
                let state = match pid {
                    None => DaemonState::Dead,
                    Some(_) if !started => DaemonState::Starting,
                    Some(_) => {
                        while self.seq(&host) <= seq && Instant::now() < deadline {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        if self.seq(&host) > seq {
                            DaemonState::Running
                        } else {
                            DaemonState::Stale
                        }
                    }
                };
                let pid = pid.or_else(|| self.daemon_pid(&host));
                DaemonHealth { host, pid, state }
            })
            .collect()
    }

    /// Every daemon's state, or an error that names each one not running and says what to
    /// do: what a lab command that needs them all runs first.
    pub fn require_running(&self) -> Result<Vec<DaemonHealth>> {
        self.topology()?;
        let health = self.refresh_stats();
        let bad: Vec<String> = health
            .iter()
            .filter(|h| !h.ok())
            .map(|h| h.to_string())
            .collect();
        if !bad.is_empty() {
            bail!(
                "lab \"{}\": {}; nothing it shows would be true: see the logs in {}, then `{}` and `{}`",
                self.name,
                bad.join("; "),
                self.dir().display(),
                self.cmd("down"),
                self.cmd("up")
            );
        }
        Ok(health)
    }

    /// Puts `text` (a new topology, as given) in force: prefixed, checked as `lab up` checks
    /// it, with the lab's allocations kept. Returns the previous topology and lock texts.
    pub fn replace_topology(&self, text: &str, source: &str) -> Result<(String, String)> {
        crate::topology::Topology::parse(text, source)?;
        let text = super::prefixed_topology(text, source, &self.prefix())?;
        let path = self.topology_path();
        let lock_path = crate::topology::lock_path(&path);
        let lock = crate::files::read_lock(&lock_path)?;
        let t = crate::topology::Topology::parse_locked(&text, source, &lock)?;
        self.validate(&t, source)?;
        let old = (
            std::fs::read_to_string(&path).context("the topology in force")?,
            std::fs::read_to_string(&lock_path).unwrap_or_default(),
        );
        self.write_topology(&text, &t.allocations.render("topology.toml"))?;
        Ok(old)
    }

    /// Writes the topology in force and its lock, each replaced whole (rename).
    pub fn write_topology(&self, text: &str, lock: &str) -> Result<()> {
        let path = self.topology_path();
        let lock_path = crate::topology::lock_path(&path);
        for (p, body) in [(&lock_path, lock), (&path, text)] {
            let tmp = p.with_extension("new");
            std::fs::write(&tmp, body)?;
            std::fs::rename(&tmp, p)?;
        }
        Ok(())
    }

    /// Sends SIGHUP to every running daemon and reads each one's answer from its log: the
    /// line `topology reloaded`, or `reload refused` and the reasons after it.
    pub fn reload(&self) -> Result<Vec<ReloadResult>> {
        let health = self.refresh_stats();
        let mut asked = Vec::new();
        for h in &health {
            let offset = std::fs::metadata(self.log_path(&h.host)).map_or(0, |m| m.len());
            let pid = h.pid.filter(|_| h.ok());
            if let Some(p) = pid {
                kill(Pid::from_raw(p as i32), Signal::SIGHUP)
                    .with_context(|| format!("SIGHUP to {}'s vpcd (pid {p})", h.host))?;
            }
            asked.push((h.clone(), offset));
        }
        let deadline = Instant::now() + RELOAD_ANSWER;
        Ok(asked
            .into_iter()
            .map(|(h, offset)| {
                let outcome = if h.ok() {
                    self.reload_answer(&h.host, offset, deadline)
                } else {
                    ReloadOutcome::NotRunning(h.state)
                };
                ReloadResult {
                    host: h.host,
                    outcome,
                }
            })
            .collect())
    }

    /// The outcome of a reload in `host`'s log after byte `offset`, waiting until `deadline`.
    fn reload_answer(&self, host: &str, offset: u64, deadline: Instant) -> ReloadOutcome {
        loop {
            let log = std::fs::read(self.log_path(host)).unwrap_or_default();
            let new = String::from_utf8_lossy(log.get(offset as usize..).unwrap_or_default());
            if let Some(o) = reload_outcome(&new) {
                return o;
            }
            if Instant::now() > deadline {
                return ReloadOutcome::NoAnswer;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The daemon's answer to a reload in the log text it wrote since: the first `topology
/// reloaded` or `reload refused, ...:` and the lines that follow it up to the next record
/// (a record starts with its timestamp, `2026-...`).
fn reload_outcome(log: &str) -> Option<ReloadOutcome> {
    let mut lines = log.lines();
    while let Some(l) = lines.next() {
        if l.contains("topology reloaded") {
            return Some(ReloadOutcome::Reloaded);
        }
        if l.contains("reload refused") {
            let is_record =
                |l: &str| l.len() > 4 && l.as_bytes()[..4].iter().all(u8::is_ascii_digit);
            let why: Vec<&str> = lines.take_while(|l| !is_record(l)).collect();
            return Some(ReloadOutcome::Refused(why.join("\n").trim().to_string()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_to_a_reload_is_read_from_the_log() {
        let ok = "2026-12-01T10:00:00.000000Z  INFO vpcd::daemon: topology reloaded\n";
        assert_eq!(reload_outcome(ok), Some(ReloadOutcome::Reloaded));
        let refused = "2026-12-01T10:00:00.000000Z ERROR vpcd::daemon: reload refused, the running topology stays:\n\
                       f.toml:3:1: no such host\nsecond reason\n\
                       2026-12-01T10:00:01.000000Z  INFO vpcd::daemon: other\n";
        assert_eq!(
            reload_outcome(refused),
            Some(ReloadOutcome::Refused(
                "f.toml:3:1: no such host\nsecond reason".into()
            ))
        );
        assert_eq!(reload_outcome("2026-12-01T10:00:00Z INFO starting\n"), None);
    }
}
