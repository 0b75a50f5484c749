//! The underlay sockets: raw IP protocol 47 for `gre`, UDP port 4754 for `gre-udp`.
//!
//! Batches everywhere: `recvmmsg`/`sendmmsg` move up to [`BATCH`] packets per system call, and
//! GRE-in-UDP sends the segments of a super-packet in one `sendmsg` with UDP GSO
//! (`UDP_SEGMENT`) and receives trains of datagrams with UDP GRO (quinn-udp sets the socket
//! options and parses the control messages). Raw sockets have neither, so raw GRE relies on
//! batching alone.
//!
//! No kernel GRE module is needed: a raw socket for protocol 47 receives GRE whole, outer IPv4
//! header included. Sending goes through a separate `IPPROTO_RAW` socket (vpcd writes the
//! outer header itself, IP_HDRINCL implied), which receives nothing, so that only one socket
//! gets a copy of each incoming GRE packet. GRE-in-UDP senders are bound to ports of their
//! own (the source ports), which anyone may send to; a socket filter gives them no receive
//! path.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrIn, recvmmsg, sendmmsg, sendmsg,
};
use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, SockAddr, SockFilter, Socket, Type};

use crate::topology::Transport;
use crate::wire::PacketBuf;
use crate::wire::buf::HEADROOM;
use crate::wire::gre::UDP_PORT;
use crate::wire::gso::Cut;

/// Packets per batch (recvmmsg, sendmmsg, handoff between threads).
pub const BATCH: usize = 64;
/// GRE-in-UDP senders per worker: the flow hash picks one, and its port is the flow's UDP
/// source port (RFC 8086 §3.2.1 entropy).
pub const UDP_SOURCES: usize = 4;
/// Socket buffer sizes asked for.
const SOCKET_BUFFER: usize = 8 << 20;
/// The most a single UDP datagram train may carry (65535 minus IPv4 and UDP headers).
const MAX_UDP_GSO_BYTES: usize = 65_507;
/// The most segments one UDP GSO send may carry.
const MAX_UDP_GSO_SEGMENTS: usize = 64;

/// One received underlay packet, or a train of them: its bytes, and who sent it.
pub struct Received {
    /// The bytes: a whole IPv4 packet (`gre`) or a UDP payload (`gre-udp`); for a GRO train,
    /// datagrams of `stride` bytes back to back (the last may be shorter).
    pub buf: PacketBuf,
    /// The sender's underlay address.
    pub from: Ipv4Addr,
    /// 0 for a single packet; the datagram size of a GRO train.
    pub stride: usize,
}

enum RxKind {
    Raw(Socket),
    Udp(Socket, UdpSocketState),
}

/// The receiving side.
pub struct UnderlayRx {
    kind: RxKind,
    headers: MultiHeaders<SockaddrIn>,
    spare: Vec<PacketBuf>,
}

fn raw_socket(protocol: i32) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(protocol)))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

fn buffers(s: &Socket) {
    // Best effort: the kernel caps them at rmem_max/wmem_max.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
}

impl UnderlayRx {
    /// Opens the receiving socket of `transport` on `local`.
    pub fn open(transport: Transport, local: Ipv4Addr) -> io::Result<UnderlayRx> {
        let kind = match transport {
            Transport::Gre => {
                let s = raw_socket(47)?;
                s.bind(&SockAddr::from(SocketAddrV4::new(local, 0)))
                    .map_err(|e| bind_error(e, local, "raw GRE socket"))?;
                buffers(&s);
                RxKind::Raw(s)
            }
            Transport::GreUdp => {
                let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                s.set_reuse_address(true)?;
                // Every worker has its own receiving socket on the port; the kernel spreads
                // the senders' flows (their source ports) over them.
                s.set_reuse_port(true)?;
                s.bind(&SockAddr::from(SocketAddrV4::new(local, UDP_PORT)))
                    .map_err(|e| bind_error(e, local, &format!("UDP port {UDP_PORT}")))?;
                buffers(&s);
                let state = UdpSocketState::new(UdpSockRef::from(&s))?;
                RxKind::Udp(s, state)
            }
        };
        Ok(UnderlayRx {
            kind,
            headers: MultiHeaders::preallocate(BATCH, None),
            spare: Vec::new(),
        })
    }

    fn socket(&self) -> &Socket {
        match &self.kind {
            RxKind::Raw(s) | RxKind::Udp(s, _) => s,
        }
    }

    /// The socket, to wait on it with others.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket().as_fd()
    }

    /// Receives what is waiting, up to a batch, into `out`. `take` supplies empty buffers.
    pub fn recv(
        &mut self,
        take: &mut impl FnMut() -> PacketBuf,
        out: &mut Vec<Received>,
    ) -> io::Result<()> {
        match &self.kind {
            RxKind::Raw(s) => {
                while self.spare.len() < BATCH {
                    self.spare.push(take());
                }
                recv_raw(s, &mut self.headers, &mut self.spare, out)
            }
            RxKind::Udp(s, state) => {
                while self.spare.len() < TRAINS {
                    self.spare.push(take());
                }
                recv_udp(s, state, &mut self.spare, out)
            }
        }
    }
}

/// GRO trains received per call on GRE-in-UDP.
const TRAINS: usize = 8;

/// A batch from the raw GRE socket (`recvmmsg`) into the `spare` buffers, which it takes.
fn recv_raw(
    s: &Socket,
    headers: &mut MultiHeaders<SockaddrIn>,
    spare: &mut Vec<PacketBuf>,
    out: &mut Vec<Received>,
) -> io::Result<()> {
    let got: Vec<(usize, Option<Ipv4Addr>)> = {
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = spare
            .iter_mut()
            .map(|b| [IoSliceMut::new(b.read_area(HEADROOM))])
            .collect();
        match recvmmsg(
            s.as_raw_fd(),
            headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(results) => results
                .map(|m| (m.bytes, m.address.map(|a: SockaddrIn| a.ip())))
                .collect(),
            Err(nix::errno::Errno::EAGAIN) => Vec::new(),
            Err(e) => return Err(e.into()),
        }
    };
    let n = got.len();
    for (mut buf, (len, from)) in spare.drain(..n).zip(got) {
        buf.set_filled(HEADROOM, len);
        // The outer header names the sender too; the pipeline checks it.
        out.push(Received {
            buf,
            from: from.unwrap_or(Ipv4Addr::UNSPECIFIED),
            stride: 0,
        });
    }
    Ok(())
}

/// Up to [`TRAINS`] datagrams or GRO trains from a GRE-in-UDP socket, each landing whole in
/// one of the `spare` buffers (no copy here), which it takes.
fn recv_udp(
    s: &Socket,
    state: &UdpSocketState,
    spare: &mut Vec<PacketBuf>,
    out: &mut Vec<Received>,
) -> io::Result<()> {
    let mut metas = [RecvMeta::default(); TRAINS];
    let n = {
        let mut iovs: Vec<IoSliceMut<'_>> = spare
            .iter_mut()
            .take(TRAINS)
            .map(|b| IoSliceMut::new(b.read_area(HEADROOM)))
            .collect();
        match state.recv(UdpSockRef::from(s), &mut iovs, &mut metas) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        }
    };
    for (mut buf, meta) in spare.drain(..n).zip(metas) {
        let from = match meta.addr {
            SocketAddr::V4(a) => *a.ip(),
            SocketAddr::V6(a) => a.ip().to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
        };
        buf.set_filled(HEADROOM, meta.len);
        let stride = if meta.stride < meta.len {
            meta.stride
        } else {
            0
        };
        out.push(Received { buf, from, stride });
    }
    Ok(())
}

enum TxKind {
    Raw(Socket),
    Udp(Vec<(Socket, UdpSocketState)>),
}

/// The sending side (one per worker).
pub struct UnderlayTx {
    kind: TxKind,
    headers: MultiHeaders<SockaddrIn>,
}

impl UnderlayTx {
    /// Opens the sending sockets of `transport` from `local`.
    pub fn open(transport: Transport, local: Ipv4Addr) -> io::Result<UnderlayTx> {
        let kind = match transport {
            Transport::Gre => {
                let s = raw_socket(libc_ipproto_raw())?;
                s.set_header_included_v4(true)?;
                buffers(&s);
                TxKind::Raw(s)
            }
            Transport::GreUdp => {
                let mut pool = Vec::with_capacity(UDP_SOURCES);
                for _ in 0..UDP_SOURCES {
                    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                    // Before the bind, so that nothing is ever queued on it.
                    receive_nothing(&s)?;
                    bind_ephemeral(&s, local)?;
                    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
                    let state = UdpSocketState::new(UdpSockRef::from(&s))?;
                    pool.push((s, state));
                }
                TxKind::Udp(pool)
            }
        };
        Ok(UnderlayTx {
            kind,
            headers: MultiHeaders::preallocate(BATCH, None),
        })
    }

    /// Sends a batch of datagrams: (bytes, receiving host, flow hash). Returns how many the
    /// kernel refused (an unreachable host, a full buffer that stayed full): every datagram
    /// is tried, one refused never stalls the batch behind it.
    pub fn send(&mut self, msgs: &[(&[u8], Ipv4Addr, u32)]) -> usize {
        match &self.kind {
            TxKind::Raw(s) => send_mmsg(s, &mut self.headers, msgs, 0),
            TxKind::Udp(pool) => {
                let mut failed = 0;
                for (i, (s, _)) in pool.iter().enumerate() {
                    let mine: Vec<(&[u8], Ipv4Addr, u32)> = msgs
                        .iter()
                        .filter(|m| m.2 as usize % pool.len() == i)
                        .copied()
                        .collect();
                    if !mine.is_empty() {
                        failed += send_mmsg(s, &mut self.headers, &mine, UDP_PORT);
                    }
                }
                failed
            }
        }
    }
}

/// A super-packet cut for sending: segment `i` is `heads[i * head_stride..][..head_len]`
/// followed by `pkt[cut.payload(i)]`.
#[derive(Clone, Copy)]
pub struct CutFrames<'a> {
    /// The super-packet.
    pub pkt: &'a [u8],
    /// How it is cut.
    pub cut: &'a Cut,
    /// Each segment's outer and inner headers.
    pub heads: &'a [u8],
    /// Distance between two segments' headers in `heads`.
    pub head_stride: usize,
    /// Length of each segment's headers.
    pub head_len: usize,
}

impl UnderlayTx {
    /// Sends a super-packet cut into segments without copying their payloads: segment `i`
    /// is `heads[i]` (outer headers and the segment's own IPv4 and transport headers, all
    /// `head_len` bytes at `head_stride` intervals) followed by `pkt[cut.payload(i)]`.
    /// GRE-in-UDP: UDP GSO with one iovec pair per segment; raw GRE: one message per segment.
    /// Returns how many segments the kernel refused.
    pub fn send_cut(&mut self, c: &CutFrames<'_>, to: Ipv4Addr, hash: u32) -> usize {
        match &self.kind {
            TxKind::Raw(s) => send_cut_raw(s, &mut self.headers, c, to),
            TxKind::Udp(pool) => {
                let (s, state) = &pool[hash as usize % pool.len()];
                send_cut_udp(s, state, c, to)
            }
        }
    }
}

impl CutFrames<'_> {
    /// Segment `i`: its headers, then its payload.
    fn segment(&self, i: usize) -> [IoSlice<'_>; 2] {
        let at = i * self.head_stride;
        [
            IoSlice::new(&self.heads[at..at + self.head_len]),
            IoSlice::new(&self.pkt[self.cut.payload(i)]),
        ]
    }
}

/// [`UnderlayTx::send_cut`] on the raw socket: `sendmmsg`, a batch at a time; a segment the
/// kernel refuses is counted and skipped.
fn send_cut_raw(
    s: &Socket,
    headers: &mut MultiHeaders<SockaddrIn>,
    c: &CutFrames<'_>,
    to: Ipv4Addr,
) -> usize {
    let (mut first, mut failed) = (0, 0);
    while first < c.cut.count {
        let last = (first + BATCH).min(c.cut.count);
        let iovs: Vec<[IoSlice<'_>; 2]> = (first..last).map(|i| c.segment(i)).collect();
        let addrs: Vec<Option<SockaddrIn>> = (first..last)
            .map(|_| Some(SockaddrIn::from(SocketAddrV4::new(to, 0))))
            .collect();
        match sendmmsg(
            s.as_raw_fd(),
            headers,
            iovs.iter(),
            &addrs,
            [],
            MsgFlags::empty(),
        ) {
            Ok(r) => first += r.count().max(1),
            Err(nix::errno::Errno::EAGAIN) if wait_writable(s).is_ok() => {}
            Err(_) => {
                first += 1;
                failed += 1;
            }
        }
    }
    failed
}

/// [`UnderlayTx::send_cut`] on a GRE-in-UDP socket: UDP GSO, at most 64 segments and 65,507
/// bytes per `sendmsg`. A send the kernel refuses ends the super-packet: it and the segments
/// after it are counted.
fn send_cut_udp(s: &Socket, state: &UdpSocketState, c: &CutFrames<'_>, to: Ipv4Addr) -> usize {
    let stride = c.head_len + c.cut.mss;
    let per_send = (MAX_UDP_GSO_BYTES / stride)
        .clamp(1, MAX_UDP_GSO_SEGMENTS)
        .min(state.max_gso_segments().max(1));
    let dst = SockaddrIn::from(SocketAddrV4::new(to, UDP_PORT));
    let mut first = 0;
    while first < c.cut.count {
        let last = (first + per_send).min(c.cut.count);
        let iovs: Vec<IoSlice<'_>> = (first..last).flat_map(|i| c.segment(i)).collect();
        let size = stride as u16;
        let gso = [ControlMessage::UdpGsoSegments(&size)];
        let cmsgs: &[ControlMessage<'_>] = if last - first > 1 { &gso } else { &[] };
        match sendmsg(s.as_raw_fd(), &iovs, cmsgs, MsgFlags::empty(), Some(&dst)) {
            Ok(_) => first = last,
            Err(nix::errno::Errno::EAGAIN) if wait_writable(s).is_ok() => {}
            Err(_) => return c.cut.count - first,
        }
    }
    0
}

/// A classic BPF program of one instruction, `ret #0`: keep 0 bytes of every packet, that is,
/// drop it.
const DROP_ALL: [SockFilter; 1] = [SockFilter::new(BPF_RET | BPF_K, 0, 0, 0)];
/// BPF_RET | BPF_K (linux/bpf_common.h): return the constant `k`.
const BPF_RET: u16 = 0x06;
const BPF_K: u16 = 0x00;

/// Gives a sending socket no receive path. A GRE-in-UDP sender is bound to a port (its
/// source port) that anyone on the underlay can send to, and nothing ever reads it: without
/// this, datagrams sent there would queue in the socket up to its receive buffer, memory held
/// for nothing. The filter drops them before they are queued (the kernel counts them in the
/// socket's `drops`); the receive buffer is the smallest the kernel allows as well, so that
/// were the filter ever missing, a datagram or two could wait there, not megabytes.
fn receive_nothing(s: &Socket) -> io::Result<()> {
    s.attach_filter(&DROP_ALL)?;
    // The kernel raises 0 to its minimum (SOCK_MIN_RCVBUF).
    s.set_recv_buffer_size(0)
}

/// Binds a GRE-in-UDP sender to a port of the range RFC 8086 §3.2.1 asks for (49152-65535),
/// picked at random among the free ones.
fn bind_ephemeral(s: &Socket, local: Ipv4Addr) -> io::Result<()> {
    use std::hash::BuildHasher;
    let start = foldhash::fast::RandomState::default().hash_one(std::process::id()) as u16;
    for n in 0..16_384u16 {
        let port = 49_152 + (start.wrapping_add(n) & 0x3fff);
        match s.bind(&SockAddr::from(SocketAddrV4::new(local, port))) {
            Ok(()) => return Ok(()),
            // No port will do: the address is not ours.
            Err(e) if e.raw_os_error() == Some(EADDRNOTAVAIL) => {
                return Err(bind_error(e, local, "GRE-in-UDP sender"));
            }
            Err(_) => {}
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no free UDP port in 49152-65535",
    ))
}

/// Fails, saying so, when `local` is not an address of this machine (of the current
/// thread's network namespace): checked the way the underlay's sockets will be bound, so an
/// address the kernel accepts otherwise (AnyIP routes, `ip_nonlocal_bind`) passes too.
pub fn check_local(local: Ipv4Addr) -> io::Result<()> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.bind(&SockAddr::from(SocketAddrV4::new(local, 0)))
        .map_err(|e| bind_error(e, local, "UDP socket"))
}

/// EADDRNOTAVAIL: binding to an address that no interface of the namespace has.
const EADDRNOTAVAIL: i32 = nix::errno::Errno::EADDRNOTAVAIL as i32;

/// A bind's error as a sentence: an address that is not this machine's says so (the
/// kernel's own words, "Cannot assign requested address", name neither the address nor the
/// reason).
fn bind_error(e: io::Error, local: Ipv4Addr, what: &str) -> io::Error {
    if e.raw_os_error() == Some(EADDRNOTAVAIL) {
        io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!("{local} is not an address of this machine"),
        )
    } else {
        io::Error::new(e.kind(), format!("{what} on {local}: {e}"))
    }
}

/// IPPROTO_RAW: a send-only raw socket whose packets carry their own IPv4 header.
const fn libc_ipproto_raw() -> i32 {
    255
}

/// Sends `msgs` with `sendmmsg`, a batch at a time, to `port` of each one's host (0 for the
/// raw socket); returns how many the kernel refused.
fn send_mmsg(
    s: &Socket,
    headers: &mut MultiHeaders<SockaddrIn>,
    msgs: &[(&[u8], Ipv4Addr, u32)],
    port: u16,
) -> usize {
    let (mut done, mut failed) = (0, 0);
    while done < msgs.len() {
        let batch = &msgs[done..(done + BATCH).min(msgs.len())];
        let iovs: Vec<[IoSlice<'_>; 1]> = batch.iter().map(|m| [IoSlice::new(m.0)]).collect();
        let addrs: Vec<Option<SockaddrIn>> = batch
            .iter()
            .map(|m| Some(SockaddrIn::from(SocketAddrV4::new(m.1, port))))
            .collect();
        match sendmmsg(
            s.as_raw_fd(),
            headers,
            iovs.iter(),
            &addrs,
            [],
            MsgFlags::empty(),
        ) {
            Ok(results) => done += results.count().max(1),
            Err(nix::errno::Errno::EAGAIN) if wait_writable(s).is_ok() => {}
            // An unreachable or oversized datagram must not stall the batch behind it.
            Err(_) => {
                done += 1;
                failed += 1;
            }
        }
    }
    failed
}

fn wait_writable(s: &impl AsFd) -> io::Result<()> {
    let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::from(100u16)) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::{Duration, Instant};

    use super::*;

    /// The `rx_queue` (bytes waiting) and `drops` columns of /proc/net/udp for the socket
    /// bound to 127.0.0.1:`port` in this network namespace.
    fn queue_and_drops(port: u16) -> Option<(u64, u64)> {
        let table = std::fs::read_to_string("/proc/net/udp").ok()?;
        // Addresses are in host byte order: 127.0.0.1 reads 0100007F on little-endian.
        let local = format!("{:08X}:{port:04X}", u32::from(Ipv4Addr::LOCALHOST).to_be());
        table.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(1) != Some(&local.as_str()) {
                return None;
            }
            let (_, rx) = f.get(4)?.split_once(':')?;
            let rx = u64::from_str_radix(rx, 16).ok()?;
            let drops = f.get(12)?.parse().ok()?;
            Some((rx, drops))
        })
    }

    /// A host started where its underlay address is not configured is told so, by every
    /// socket that binds to it, for both transports (not "no free UDP port", not "Cannot
    /// assign requested address").
    #[test]
    fn an_address_of_another_machine_is_named() {
        use crate::io::netns;
        let root = std::fs::read_to_string("/proc/self/status")
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")));
        if !root {
            eprintln!(
                "\n!!!!!!!! SKIPPED `an_address_of_another_machine_is_named`: needs root !!!!!!!!\n"
            );
            return;
        }
        let ns = "vpcd-ut-underlay";
        if netns::exists(ns) {
            netns::del(ns).unwrap();
        }
        netns::add(ns).unwrap();
        // Up, as every machine's: in a namespace that never had an address (so no local
        // routing table yet) Linux lets a socket bind to any address.
        netns::Netlink::open_in(Some(ns))
            .and_then(|nl| nl.link_up("lo"))
            .unwrap();
        let addr = Ipv4Addr::new(192, 0, 2, 1);
        let errors = netns::within(Some(ns), || {
            Ok([
                check_local(addr).err(),
                UnderlayTx::open(Transport::GreUdp, addr).err(),
                UnderlayRx::open(Transport::GreUdp, addr).err(),
                UnderlayRx::open(Transport::Gre, addr).err(),
            ])
        });
        netns::del(ns).unwrap();
        for (n, e) in errors.unwrap().into_iter().enumerate() {
            let e = e.unwrap_or_else(|| panic!("socket {n} opened on {addr}"));
            assert_eq!(e.to_string(), "192.0.2.1 is not an address of this machine");
            assert_eq!(e.kind(), io::ErrorKind::AddrNotAvailable);
        }
        // An address that is here passes.
        check_local(Ipv4Addr::LOCALHOST).unwrap();
    }

    /// Datagrams the kernel refuses are counted, one by one, and do not stall those behind
    /// them: in a namespace with nothing but loopback, the underlay has no route to a
    /// documentation address, so every one sent there is refused, while loopback takes its own.
    #[test]
    fn refused_datagrams_are_counted() {
        use crate::io::netns;
        let root = std::fs::read_to_string("/proc/self/status")
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")));
        if !root {
            eprintln!("\n!!!!!!!! SKIPPED `refused_datagrams_are_counted`: needs root !!!!!!!!\n");
            return;
        }
        let ns = format!("vpcd-ut-txerr-{}", std::process::id());
        netns::add(&ns).unwrap();
        let failed = netns::within(Some(&ns), || {
            netns::Netlink::open_in(None)?.link_up("lo")?;
            let lo = Ipv4Addr::LOCALHOST;
            let nowhere = Ipv4Addr::new(203, 0, 113, 1);
            let mut frame = [0u8; 64];
            crate::wire::ipv4::emit_header(&mut frame, lo, lo, 47, 0, 64);
            let msgs: Vec<(&[u8], Ipv4Addr, u32)> = (0..5u32)
                .map(|i| (&frame[..], if i % 2 == 0 { nowhere } else { lo }, i))
                .collect();
            let mut counts = Vec::new();
            for transport in [Transport::GreUdp, Transport::Gre] {
                let mut tx = UnderlayTx::open(transport, lo)?;
                counts.push(tx.send(&msgs));
            }
            Ok(counts)
        });
        netns::del(&ns).unwrap();
        assert_eq!(failed.unwrap(), [3, 3], "refused by (gre-udp, gre)");
    }

    /// Datagrams sent to a GRE-in-UDP sender's port (its flows' source port, reachable from
    /// the whole underlay) are dropped by the kernel, not queued in a socket no one reads.
    #[test]
    fn datagrams_sent_to_a_gre_udp_sender_are_not_queued() {
        let tx = UnderlayTx::open(Transport::GreUdp, Ipv4Addr::LOCALHOST).expect("open");
        let TxKind::Udp(pool) = &tx.kind else {
            panic!("GRE-in-UDP opens UDP senders");
        };
        let peer = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        for (s, _) in pool {
            let port = s.local_addr().unwrap().as_socket().unwrap().port();
            assert!(port >= 49_152, "sender on port {port}");
            let (_, drops_before) = queue_and_drops(port).expect("the sender in /proc/net/udp");
            for _ in 0..3 {
                peer.send_to(b"anyone reading?", (Ipv4Addr::LOCALHOST, port))
                    .unwrap();
            }
            // Loopback delivers within the send, or nearly: wait until the socket has
            // either queued or dropped all three.
            let deadline = Instant::now() + Duration::from_secs(2);
            let (queued, drops) = loop {
                let (q, d) = queue_and_drops(port).unwrap();
                if q > 0 || d >= drops_before + 3 || Instant::now() > deadline {
                    break (q, d - drops_before);
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            assert_eq!(
                (queued, drops),
                (0, 3),
                "port {port}: (bytes queued, datagrams dropped) by the sender's socket"
            );
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 64];
            let got = (&*s).read(&mut buf);
            assert!(
                matches!(&got, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
                "port {port}: a read found {got:?}"
            );
            // Linux's minimum (SOCK_MIN_RCVBUF) is a few KiB, its default 208 KiB.
            let rcvbuf = s.recv_buffer_size().unwrap();
            assert!(
                rcvbuf <= 8192,
                "port {port}: receive buffer of {rcvbuf} bytes"
            );
        }
    }
}
