//! What a lab command needs, checked before it does anything: root, and the tools it runs.

use std::path::Path;

use anyhow::{Result, bail};

/// What a command needs besides root.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs {
    /// `ip` (iproute2), which `lab exec` runs (`ip netns exec`).
    pub ip: bool,
    /// /dev/net/tun, which the daemons open.
    pub tun: bool,
}

/// The effective uid (from /proc: nix's `user` feature is not enabled).
fn effective_uid() -> Option<u32> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let uids = s.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

fn on_path(exe: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':').filter(|d| !d.is_empty()).any(|d| {
        std::fs::metadata(Path::new(d).join(exe))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Refuses to start `vpcd lab WHAT` without root or what `needs` lists, saying what to do.
pub fn preflight(what: &str, needs: Needs) -> Result<()> {
    if effective_uid() != Some(0) {
        bail!(
            "`vpcd lab {what}` must run as root: the lab makes network namespaces, veths and TUN devices and signals its daemons; run it with sudo (sudo vpcd lab {what} ...)"
        );
    }
    if needs.ip && !on_path("ip") {
        bail!(
            "`vpcd lab {what}` runs `ip netns exec`, and ip is not on PATH: install iproute2 (apt-get install iproute2)"
        );
    }
    if needs.tun && !Path::new("/dev/net/tun").exists() {
        bail!("no /dev/net/tun: the daemons open TUN devices; load the tun module (modprobe tun)");
    }
    Ok(())
}
