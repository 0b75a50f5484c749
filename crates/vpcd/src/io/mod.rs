//! The Linux edge: network namespaces, TUN devices and the underlay sockets.
//!
//! Everything that makes a system call lives here (and in `daemon/` and `lab/`, which use it);
//! none of it decides anything about a packet. The crates do the unsafe work: tun-rs (TUN
//! with virtio-net offloads), nix (setns, unshare, mount, poll, recvmmsg/sendmmsg), rtnetlink
//! (links, addresses and routes over netlink: no `ip` process), socket2 and quinn-udp (UDP
//! GSO/GRO), so vpcd itself has no `unsafe` block.

pub mod netns;
pub mod tun;
pub mod underlay;
