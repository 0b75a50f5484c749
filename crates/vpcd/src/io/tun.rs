//! Instance TUN devices, with virtio-net offloads (TSO/USO super-packets) through tun-rs.
//!
//! tun-rs rather than tun-tap: it opens the device with IFF_VNET_HDR and the TUNSETOFFLOAD
//! flags (so one read can carry a 64 KB TCP super-packet) and supports multi-queue. Writes
//! are gathered (`writev`): a coalesced super-packet (`wire::gro`) is written as its new
//! headers followed by the payloads where they lie.

use std::io::{self, IoSlice};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd};

use tun_rs::{DeviceBuilder, SyncDevice};

use super::netns;
use crate::wire::buf::HEADROOM;
use crate::wire::gso::{VNET_HDR_LEN, VnetHdr};
use crate::wire::{PacketBuf, gro};

/// The virtio-net header of a plain packet (no offload, checksums complete).
pub const PLAIN: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

/// How to set up an instance's device.
#[derive(Debug, Clone)]
pub struct TunConfig {
    /// Device name (the instance's name).
    pub name: String,
    /// Namespace to create it in; `None` for the daemon's own.
    pub netns: Option<String>,
    /// The instance's address.
    pub address: Ipv4Addr,
    /// The subnet's prefix length (the device gets address/prefix).
    pub prefix: u8,
    /// MTU.
    pub mtu: u16,
    /// Transmit queue length (the default 500 drops bursts of super-packets).
    pub txqueuelen: u32,
}

/// An open instance device.
pub struct Tun {
    dev: SyncDevice,
    config: TunConfig,
}

impl Tun {
    /// Creates the device inside its namespace (setns on this thread: the device never
    /// appears in the daemon's namespace), sets address, MTU and queue length, brings it up
    /// and routes everything through it.
    pub fn open(config: TunConfig) -> io::Result<Tun> {
        let ns = config.netns.as_deref();
        let dev = netns::within(ns, || {
            if ns.is_some() {
                // vpcd carries IPv4 only: devices created in an instance's namespace start
                // without IPv6, so the instance never sends router solicitations or MLD that
                // would only be counted as drops. /proc/sys/net belongs to the namespace of
                // the thread that opens it.
                let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
            }
            DeviceBuilder::new()
                .name(&config.name)
                .ipv4(config.address, config.prefix, None)
                .mtu(config.mtu)
                .offload(true)
                .tx_queue_len(config.txqueuelen)
                .build_sync()
                .inspect(|_| {
                    let knob = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", config.name);
                    let _ = std::fs::write(knob, "1");
                })
        })
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "TUN {} in {}: {e}",
                    config.name,
                    ns.unwrap_or("this namespace")
                ),
            )
        })?;
        netns::Netlink::open_in(ns)?.replace_default_route(&config.name)?;
        dev.set_nonblocking(true)?;
        Ok(Tun { dev, config })
    }

    /// The device's configuration.
    pub fn config(&self) -> &TunConfig {
        &self.config
    }

    /// The device's descriptor, to wait on it with others.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.dev.as_fd()
    }

    /// Reads one packet (or super-packet) into `buf`: the virtio-net header lands just before
    /// [`HEADROOM`], the packet at it. `None` when nothing is waiting.
    pub fn read(&self, buf: &mut PacketBuf) -> io::Result<Option<VnetHdr>> {
        let at = HEADROOM - VNET_HDR_LEN;
        match self.dev.recv(buf.read_area(at)) {
            Ok(n) if n >= VNET_HDR_LEN => {
                buf.set_filled(at, n);
                let h = VnetHdr::parse(buf.as_slice()).unwrap_or_default();
                buf.pull_front(VNET_HDR_LEN);
                Ok(Some(h))
            }
            Ok(_) => Ok(Some(VnetHdr::default())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one packet with the given virtio-net header (a super-packet keeps its GSO
    /// header: the instance's kernel takes it whole).
    pub fn write_with(&self, buf: &mut PacketBuf, h: &VnetHdr) -> io::Result<()> {
        match buf.push_front(VNET_HDR_LEN) {
            Ok(front) => h.write(front),
            Err(e) => return Err(io::Error::other(e)),
        }
        let r = self.dev.send(buf.as_slice()).map(|_| ());
        buf.pull_front(VNET_HDR_LEN);
        r
    }

    /// Writes `pkts` (IPv4 packets, in order) to the device, consecutive TCP segments of a
    /// flow coalesced into super-packets ([`gro::plan`]) and a TCP segment longer than `mtu`
    /// (a super-segment) as one, each cut by the kernel at `mtu`; the rest as they are.
    /// Returns how many packets the device refused. `runs` is scratch space.
    pub fn write_runs(&self, pkts: &[&[u8]], mtu: usize, runs: &mut Vec<(usize, usize)>) -> u64 {
        gro::plan(pkts, runs);
        let mut head = [0u8; gro::MAX_HEADER];
        let mut failed = 0;
        for &(first, count) in runs.iter() {
            let run = &pkts[first..first + count];
            let written = if !gro::needs_gso(run, mtu) {
                self.write_gathered(&[IoSlice::new(&PLAIN), IoSlice::new(run[0])])
            } else {
                let n = gro::super_header(run, mtu, &mut head);
                let mut parts = Vec::with_capacity(count + 1);
                parts.push(IoSlice::new(&head[..n]));
                parts.extend(
                    run.iter()
                        .map(|s| IoSlice::new(&s[gro::payload_offset(s)..])),
                );
                self.write_gathered(&parts)
            };
            if written.is_err() {
                failed += count as u64;
            }
        }
        failed
    }

    /// Writes one packet gathered from `parts`: the first starts with the virtio-net header.
    pub fn write_gathered(&self, parts: &[IoSlice<'_>]) -> io::Result<()> {
        nix::sys::uio::writev(self.dev.as_fd(), parts)
            .map(|_| ())
            .map_err(io::Error::from)
    }
}
