//! The null forwarder: vpcd's own I/O path with no decision in it, for benchmarks only.
//!
//! It opens what `vpcd run` opens for a host (the local instance's TUN device with the same
//! address, MTU and queue length; the underlay sockets of the topology's transport) and moves
//! packets the way a daemon's worker does (`poll`, batched TUN reads, super-packets cut and
//! sent with their payloads where they lie, `sendmmsg`, `recvmmsg` or UDP GRO trains, TCP
//! segments coalesced into one gathered TUN write), but decides nothing: every packet of the
//! local instance goes to the one other host of the topology in GRE with the VPC's key, and
//! every GRE packet from the underlay is stripped and written to the local instance. No route
//! table, ACL, security group, connection tracking or flow cache; one thread; packet
//! counts (sent, written, refused), printed at the end.
//!
//! Why: the difference between it and `vpcd run` on the same lab is what the decision costs;
//! what it moves itself is the ceiling of the design (TUN plus userspace sockets) on the
//! machine.
//!
//! It takes the arguments the lab gives `vpcd run`, for a topology of two hosts with one VPC
//! instance each (`--stats` and `--workers` are accepted and ignored). By hand:
//!
//! ```sh
//! cargo build --release --example null-forwarder
//! vpcd lab up bench.toml --name LAB        # then stop each host's vpcd by its pid
//!                                          # (`pid HOST PID` in /run/vpcd-lab/LAB/journal)
//! target/release/examples/null-forwarder --netns vpcd-LAB-HOST \
//!     --topology /run/vpcd-lab/LAB/topology.toml --host HOST &   # for each host
//! ```
//!
//! `scripts/bench-e2e.sh` has a `null` row made so. SIGTERM or SIGINT stops it; its devices
//! go when their descriptor closes (so even after SIGKILL).

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vpcd::daemon::Pool;
use vpcd::io::netns;
use vpcd::io::tun::{Tun, TunConfig};
use vpcd::io::underlay::{self, BATCH, CutFrames, Received, UnderlayRx, UnderlayTx};
use vpcd::topology::{Channel, Topology, Transport};
use vpcd::wire::gre::{self, Encap};
use vpcd::wire::gso::{self, Cut, F_NEEDS_CSUM, VnetHdr};
use vpcd::wire::{PacketBuf, ipv4};

/// The command line, as the lab writes it for `vpcd run`.
struct Args {
    netns: Option<String>,
    topology: PathBuf,
    host: String,
}

fn args() -> Result<Args> {
    let (mut netns, mut topology, mut host) = (None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--netns" => netns = Some(value()?),
            "--topology" => topology = Some(PathBuf::from(value()?)),
            "--host" => host = Some(value()?),
            "--stats" | "--workers" => {
                value()?;
            }
            other => bail!(
                "unknown argument {other}; usage: null-forwarder [--netns NS] --topology FILE --host NAME"
            ),
        }
    }
    Ok(Args {
        netns,
        topology: topology.ok_or_else(|| anyhow!("--topology FILE is needed"))?,
        host: host.ok_or_else(|| anyhow!("--host NAME is needed"))?,
    })
}

/// What the topology says this host does: its one instance's device, its address, the other
/// host's, and the encapsulation between them.
struct Plan {
    device: TunConfig,
    transport: Transport,
    local: Ipv4Addr,
    peer: Ipv4Addr,
    encap: Encap,
}

fn plan(t: &Topology, name: &str) -> Result<Plan> {
    let host = t
        .host_named(name)
        .ok_or_else(|| anyhow!("{}: no host named \"{name}\"", t.file))?;
    let mine: Vec<_> = t.instances_on(host).collect();
    let [id] = mine[..] else {
        bail!(
            "host {name} has {} instances; the null forwarder takes one",
            mine.len()
        );
    };
    let others: Vec<_> = (0..t.hosts.len()).filter(|&i| i != host.index()).collect();
    let [other] = others[..] else {
        bail!("{} hosts; the null forwarder takes two", t.hosts.len());
    };
    let inst = t.instance(id);
    let vpc = inst
        .vpc()
        .ok_or_else(|| anyhow!("instance {} is in no VPC", inst.name))?;
    let (local, peer) = (t.host(host).address, t.hosts[other].address);
    let transport = t.underlay.transport;
    let encap = Encap {
        outer: (transport == Transport::Gre).then_some((local, peer)),
        key: t.key_of(Channel::Vpc(vpc)),
        checksum: t.underlay.checksum,
    };
    let device = vpcd::daemon::instance_device(t, id);
    Ok(Plan {
        device,
        transport,
        local,
        peer,
        encap,
    })
}

/// A namespace this process made for its instance, removed when it goes.
struct MadeNetns(Option<String>);

impl Drop for MadeNetns {
    fn drop(&mut self) {
        if let Some(ns) = self.0.take()
            && let Err(e) = netns::del(&ns)
        {
            eprintln!("null-forwarder: removing namespace {ns}: {e}");
        }
    }
}

/// Makes the instance's namespace if it is missing, as `vpcd run` does.
fn make_netns(ns: Option<&str>) -> Result<MadeNetns> {
    match ns {
        Some(ns) if !netns::exists(ns) => {
            netns::add(ns).with_context(|| format!("creating namespace {ns}"))?;
            let made = MadeNetns(Some(ns.to_string()));
            netns::Netlink::open_in(Some(ns))?.link_up("lo")?;
            Ok(made)
        }
        _ => Ok(MadeNetns(None)),
    }
}

/// The one loop, and what it keeps between rounds.
struct Forwarder {
    tun: Tun,
    rx: UnderlayRx,
    tx: UnderlayTx,
    outer_ip: bool,
    /// The instance MTU, at which the kernel cuts what is written whole.
    mtu: usize,
    /// The underlay MTU less the encapsulation: how much one underlay packet carries.
    room: usize,
    peer: Ipv4Addr,
    encap: Encap,
    pool: Pool,
    received: Vec<Received>,
    /// Encapsulated packets to send, with their flow hash (the UDP source port's pick).
    transmits: Vec<(PacketBuf, u32)>,
    heads: Vec<u8>,
    held: Vec<PacketBuf>,
    /// Inner packets to write: `held[buf][start..end]`.
    pieces: Vec<(usize, usize, usize)>,
    runs: Vec<(usize, usize)>,
    to_underlay: u64,
    to_device: u64,
    /// Of those, the packets the kernel refused (a send or write that failed).
    refused: u64,
}

impl Forwarder {
    /// Waits until something is ready: (a stop signal, the underlay socket, the device).
    fn wait(&self, signals: &SignalFd) -> nix::Result<(bool, bool, bool)> {
        let mut fds = [
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.rx.fd(), PollFlags::POLLIN),
            PollFd::new(self.tun.fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
        let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        Ok((ready(&fds[0]), ready(&fds[1]), ready(&fds[2])))
    }

    /// Forwards until SIGTERM or SIGINT.
    fn run(&mut self, signals: &SignalFd) -> Result<()> {
        loop {
            let (stop, rx_ready, device_ready) = self.wait(signals)?;
            if stop {
                return Ok(());
            }
            if rx_ready {
                self.read_underlay();
            }
            if device_ready {
                self.read_device();
            }
        }
    }

    /// Reads up to a batch from the device: super-packets are cut and sent at once, packets
    /// encapsulated and sent together at the end.
    fn read_device(&mut self) {
        for _ in 0..BATCH {
            let mut buf = self.pool.take();
            match self.tun.read(&mut buf) {
                Ok(Some(vnet)) if vnet.is_gso() => {
                    self.send_cut(buf.as_slice(), &vnet);
                    self.pool.put(buf);
                }
                Ok(Some(vnet)) => self.encapsulate(buf, &vnet),
                Ok(None) => {
                    self.pool.put(buf);
                    break;
                }
                Err(e) => {
                    self.pool.put(buf);
                    eprintln!("null-forwarder: device read: {e}");
                    break;
                }
            }
        }
        self.flush_underlay();
    }

    fn encapsulate(&mut self, mut buf: PacketBuf, vnet: &VnetHdr) {
        if vnet.flags & F_NEEDS_CSUM != 0 {
            let _ = gso::finish_checksum(
                buf.as_mut_slice(),
                usize::from(vnet.csum_start),
                usize::from(vnet.csum_offset),
            );
        }
        let hash = ipv4::flow_hash(buf.as_slice(), 0);
        match self.encap.prepend(&mut buf) {
            Ok(()) => self.transmits.push((buf, hash)),
            Err(_) => self.pool.put(buf),
        }
    }

    fn flush_underlay(&mut self) {
        if self.transmits.is_empty() {
            return;
        }
        let msgs: Vec<(&[u8], Ipv4Addr, u32)> = self
            .transmits
            .iter()
            .map(|(b, h)| (b.as_slice(), self.peer, *h))
            .collect();
        self.refused += self.tx.send(&msgs) as u64;
        self.to_underlay += msgs.len() as u64;
        for (b, _) in self.transmits.drain(..) {
            self.pool.put(b);
        }
    }

    /// Cuts a super-packet into segments, the encapsulation in front of each, and sends them
    /// with their payloads gathered where they lie.
    fn send_cut(&mut self, pkt: &[u8], vnet: &VnetHdr) {
        // A virtio-net header that disagrees with the packet: counted as refused.
        let Ok(cut) = Cut::new(pkt, vnet) else {
            self.refused += 1;
            return;
        };
        let cut = cut.widened(self.room);
        let (head_stride, head_len) = gre::segment_heads(pkt, &cut, &self.encap, &mut self.heads);
        let frames = CutFrames {
            pkt,
            cut: &cut,
            heads: &self.heads,
            head_stride,
            head_len,
        };
        let hash = ipv4::flow_hash(pkt, 0);
        self.refused += self.tx.send_cut(&frames, self.peer, hash) as u64;
        self.to_underlay += cut.count as u64;
    }

    /// Receives a batch from the underlay and writes the inner packets to the device.
    fn read_underlay(&mut self) {
        let pool = &self.pool;
        if let Err(e) = self.rx.recv(&mut || pool.take(), &mut self.received) {
            eprintln!("null-forwarder: underlay receive: {e}");
        }
        for r in self.received.drain(..) {
            let len = r.buf.len();
            let stride = if r.stride == 0 { len } else { r.stride };
            for at in (0..len).step_by(stride.max(1)) {
                let end = (at + stride).min(len);
                let inner = gre::peek_inner(&r.buf.as_slice()[at..end], self.outer_ip);
                if !inner.is_empty() {
                    self.pieces.push((self.held.len(), end - inner.len(), end));
                }
            }
            self.held.push(r.buf);
        }
        self.write_device();
        self.pieces.clear();
        for b in self.held.drain(..) {
            self.pool.put(b);
        }
    }

    /// Writes the pieces to the device, consecutive TCP segments of a flow coalesced into
    /// one super-packet (headers rebuilt, payloads gathered).
    fn write_device(&mut self) {
        let held = &self.held;
        let pkts: Vec<&[u8]> = self
            .pieces
            .iter()
            .map(|&(b, start, end)| &held[b].as_slice()[start..end])
            .collect();
        self.refused += self.tun.write_runs(&pkts, self.mtu, &mut self.runs);
        self.to_device += pkts.len() as u64;
    }
}

/// SIGTERM and SIGINT, blocked and read from a descriptor the loop polls.
fn stop_signals() -> Result<SignalFd> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block().context("blocking SIGTERM and SIGINT")?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).context("signalfd")
}

fn main() -> Result<()> {
    vpcd::daemon::close_inherited_descriptors()?;
    let args = args()?;
    let signals = stop_signals()?;
    if let Some(ns) = &args.netns {
        netns::enter_for_good(ns)?;
    }
    let t = vpcd::files::load_topology(&args.topology)?;
    if !t.unlocked.is_empty() {
        bail!(
            "{}: the lock file does not record {}",
            t.file,
            t.unlocked.join("; ")
        );
    }
    let p = plan(&t, &args.host)?;
    let _lock = vpcd::daemon::lock(&args.host)?;
    underlay::check_local(p.local).context("underlay")?;
    let _made = make_netns(p.device.netns.as_deref())?;
    let name = p.device.name.clone();
    let tun = Tun::open(p.device).with_context(|| format!("instance {name}"))?;
    let mut f = Forwarder {
        tun,
        rx: UnderlayRx::open(p.transport, p.local).context("underlay, receiving")?,
        tx: UnderlayTx::open(p.transport, p.local).context("underlay, sending")?,
        outer_ip: p.transport == Transport::Gre,
        mtu: usize::from(t.underlay.instance_mtu()),
        room: usize::from(t.underlay.room()),
        peer: p.peer,
        encap: p.encap,
        pool: Pool::new(),
        received: Vec::with_capacity(BATCH),
        transmits: Vec::with_capacity(BATCH),
        heads: Vec::new(),
        held: Vec::new(),
        pieces: Vec::new(),
        runs: Vec::new(),
        to_underlay: 0,
        to_device: 0,
        refused: 0,
    };
    let (transport, key) = (p.transport.word(), p.encap.key);
    eprintln!(
        "null-forwarder: host {} ({}), {transport} to {}, key {key:?}, instance {name}: running",
        args.host, p.local, p.peer
    );
    let result = f.run(&signals);
    eprintln!(
        "null-forwarder: stopping; {} packets to the underlay, {} to {name}, {} of them refused",
        f.to_underlay, f.to_device, f.refused
    );
    result
}
