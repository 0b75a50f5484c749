//! The Linux edge: network namespaces, TUN devices and the underlay sockets.
//!
//! Everything that makes a system call lives here (and in `daemon/` and `lab/`, which use it);
//! none of it decides anything about a packet. The crates do the unsafe work: tun-rs (TUN
//! with virtio-net offloads), nix (setns, poll, recvmmsg/sendmmsg), socket2 and quinn-udp (UDP
//! GSO/GRO), so vpcd itself has no `unsafe` block.

pub mod netns;
pub mod tun;
pub mod underlay;

use std::os::fd::AsFd;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Waits until `fd` is readable, at most `timeout` (capped at a minute). An interrupted wait
/// counts as a timeout.
pub fn wait_readable(fd: &impl AsFd, timeout: Duration) -> std::io::Result<bool> {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let ms = PollTimeout::from(timeout.as_millis().min(60_000) as u16);
    match poll(&mut fds, ms) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
