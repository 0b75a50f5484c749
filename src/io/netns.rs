//! Network namespaces: entering one for the current thread, and the `ip` command.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::process::Command;

use nix::sched::{CloneFlags, setns};

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The path of a named namespace.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// True when `ip netns` knows the namespace.
pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// While alive, the current thread is in another network namespace; dropping it returns the
/// thread to the namespace it came from. setns(2) moves only the calling thread.
pub struct NetnsGuard {
    home: File,
}

impl NetnsGuard {
    /// Moves the current thread into namespace `name`.
    pub fn enter(name: &str) -> io::Result<NetnsGuard> {
        let home = File::open("/proc/thread-self/ns/net")?;
        let target = File::open(path(name))
            .map_err(|e| io::Error::new(e.kind(), format!("network namespace {name}: {e}")))?;
        setns(&target, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        Ok(NetnsGuard { home })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.home, CloneFlags::CLONE_NEWNET) {
            // A thread stranded in another namespace would create devices in the wrong place.
            panic!("cannot return to the original network namespace: {e}");
        }
    }
}

/// Moves the current thread into namespace `name` for good (a daemon started for a lab
/// host, before it spawns any thread: threads inherit it).
pub fn enter_for_good(name: &str) -> io::Result<()> {
    let target = File::open(path(name))
        .map_err(|e| io::Error::new(e.kind(), format!("network namespace {name}: {e}")))?;
    setns(&target, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Runs `f` with the current thread in namespace `name` (or where it is, for `None`).
pub fn within<T>(name: Option<&str>, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let _guard = match name {
        Some(n) => Some(NetnsGuard::enter(n)?),
        None => None,
    };
    f()
}

/// The identity of the current thread's network namespace (`net:[inode]`).
pub fn current_id() -> io::Result<String> {
    Ok(std::fs::read_link("/proc/thread-self/ns/net")?
        .to_string_lossy()
        .into_owned())
}

/// Runs `ip ARGS...`; the error carries ip's own message.
pub fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Runs `ip ARGS...` inside namespace `ns` (`ip -n NS ...`), or here for `None`.
pub fn ip_in(ns: Option<&str>, args: &[&str]) -> io::Result<()> {
    match ns {
        Some(n) => {
            let mut all = vec!["-n", n];
            all.extend_from_slice(args);
            ip(&all)
        }
        None => ip(args),
    }
}
