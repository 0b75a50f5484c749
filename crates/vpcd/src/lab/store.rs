//! `vpcd lab up --store`: the lab's region follows a store (docs/control-plane.md, "The
//! lab"). The lab runs its own etcd in its underlay namespace, on [`STORE_ADDRESS`] on the
//! bridge (every host namespace routes to it over its underlay link), applies the topology
//! to it with `vpcd apply`, and starts every daemon with `--store`. The etcd's data lives in
//! the lab's directory: `lab down` stops it with the daemons.

use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::Lab;
use crate::io::netns::Netlink;
use crate::topology::Topology;

/// The store's address in a lab's underlay (RFC 2544's benchmarking range: no host of a
/// topology is there, and it exists only inside the lab's namespaces).
pub const STORE_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

impl Lab {
    /// The store's URL, as the lab's hosts reach it.
    pub fn store_url(&self) -> String {
        format!("http://{STORE_ADDRESS}:2379")
    }

    /// The etcd's log.
    pub fn store_log(&self) -> std::path::PathBuf {
        self.dir().join("etcd.log")
    }

    /// The store's address on the bridge, a route to it from every host, and the etcd.
    pub(super) fn start_store(&self, topo: &Topology, log: &mut dyn FnMut(&str)) -> Result<()> {
        if topo.hosts.iter().any(|h| h.address == STORE_ADDRESS) {
            bail!("a host has the lab store's address {STORE_ADDRESS}");
        }
        let ul = self.underlay_ns();
        let bridge = Netlink::open_in(Some(&ul))?;
        bridge.add_address("br0", STORE_ADDRESS, 32)?;
        for h in &topo.hosts {
            bridge.add_route(h.address, 32, "br0")?;
            Netlink::open_in(Some(&self.host_ns(&h.name)))?.add_route(STORE_ADDRESS, 32, "ul0")?;
        }
        let child = Command::new("ip")
            .args(["netns", "exec", &ul])
            .args(self.etcd_args())
            .stdin(Stdio::null())
            .stdout(File::create(self.store_log())?)
            .stderr(File::create(self.store_log())?)
            .spawn()
            .context("starting etcd (Debian: apt-get install etcd-server)")?;
        self.note(&format!("store {}", child.id()))?;
        log(&format!(
            "store: etcd in namespace {ul} at {} (pid {}, log {})",
            self.store_url(),
            child.id(),
            self.store_log().display()
        ));
        Ok(())
    }

    /// etcd's command line (a test restarts it with the same one).
    pub fn etcd_args(&self) -> Vec<String> {
        let client = self.store_url();
        let peer = format!("http://{STORE_ADDRESS}:2380");
        [
            "etcd",
            "--name",
            "lab",
            "--data-dir",
            &self.dir().join("etcd").display().to_string(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("lab={peer}"),
            // One apply is one transaction: a first apply of a large file has one operation
            // per item (etcd's default allows 128).
            "--max-txn-ops",
            "1000000",
            "--max-request-bytes",
            "67108864",
        ]
        .map(String::from)
        .to_vec()
    }

    /// `vpcd ARGS...` (this executable) in the lab's underlay namespace, where the store is.
    /// `vpcd get --hosts` against the lab's store: each host's convergence (`lab status`).
    pub fn store_convergence(&self) -> Result<Output> {
        let url = self.store_url();
        let args = ["get", "--hosts", "--store", url.as_str()];
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        self.vpcd_in_underlay(&args)
    }

    fn vpcd_in_underlay(&self, args: &[&std::ffi::OsStr]) -> Result<Output> {
        let me = std::env::current_exe().context("this executable")?;
        Ok(Command::new("ip")
            .args(["netns", "exec", &self.underlay_ns()])
            .arg(&me)
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    /// `vpcd apply FILE --store URL` from the underlay namespace: apply's own output.
    fn apply_path(&self, file: &Path) -> Result<Output> {
        let url = self.store_url();
        self.vpcd_in_underlay(&[
            "apply".as_ref(),
            file.as_os_str(),
            "--store".as_ref(),
            url.as_ref(),
        ])
    }

    /// `vpcd apply` of the lab's topology from the underlay namespace, retried while etcd
    /// starts (at most 20 s).
    pub(super) fn apply_to_store(&self, log: &mut dyn FnMut(&str)) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let o = self.apply_path(&self.topology_path())?;
            if o.status.success() {
                let first = String::from_utf8_lossy(&o.stdout);
                log(&format!(
                    "store: {}",
                    first.lines().next().unwrap_or("applied")
                ));
                return Ok(());
            }
            if Instant::now() > deadline {
                let etcd = fs::read_to_string(self.store_log()).unwrap_or_default();
                bail!(
                    "vpcd apply to the lab's store failed: {}\netcd's log ends:\n{}",
                    String::from_utf8_lossy(&o.stderr).trim_end(),
                    etcd.lines().rev().take(5).collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `vpcd lab reload [FILE]` in a store lab: `vpcd apply` of `new` (its text and where it
    /// came from; its namespaces prefixed as `up` does) or, without it, of the lab's topology
    /// as it is, against the lab's store from its underlay namespace. Returns apply's output
    /// (a refusal or a lost race: a failure, nothing written). Once applied, the lab's copy of
    /// the topology and its lock become the store's (`vpcd get --out`), so that `lab exec`
    /// and `lab check` know what the hosts run.
    pub fn apply_to_lab_store(
        &self,
        new: Option<(&str, &str)>,
        log: &mut dyn FnMut(&str),
    ) -> Result<Output> {
        let file = match new {
            Some((text, source)) => {
                Topology::parse(text, source)?;
                let text = super::prefixed_topology(text, source, &self.prefix())?;
                self.validate(&Topology::parse(&text, source)?, source)?;
                let file = self
                    .dir()
                    .join(format!("apply-{}.toml", std::process::id()));
                fs::write(&file, text)?;
                Some(file)
            }
            None => None,
        };
        let o = self.apply_path(file.as_deref().unwrap_or(&self.topology_path()));
        if let Some(f) = &file {
            let _ = fs::remove_file(f);
        }
        let o = o?;
        if o.status.success()
            && let Err(e) = self.copy_from_store()
        {
            log(&format!(
                "applied, but the lab's copy of the topology was not updated: {e:#}"
            ));
        }
        Ok(o)
    }

    /// The store's topology and allocations (`vpcd get --out`) as the lab's copy of them.
    fn copy_from_store(&self) -> Result<()> {
        let got = self.dir().join(format!("got-{}.toml", std::process::id()));
        let lock = crate::topology::lock_path(&got);
        let url = self.store_url();
        let o = self.vpcd_in_underlay(&[
            "get".as_ref(),
            "--store".as_ref(),
            url.as_ref(),
            "--out".as_ref(),
            got.as_os_str(),
        ])?;
        let read = || -> Result<(String, String)> {
            if !o.status.success() {
                bail!(
                    "vpcd get: {}",
                    String::from_utf8_lossy(&o.stderr).trim_end()
                );
            }
            Ok((fs::read_to_string(&got)?, fs::read_to_string(&lock)?))
        };
        let r = read();
        let _ = fs::remove_file(&got);
        let _ = fs::remove_file(&lock);
        let (text, lock) = r?;
        self.write_topology(&text, &lock)
    }
}
