//! GRO for TUN writes: consecutive TCP segments of one flow become one super-packet, written
//! with a virtio-net header (TSO, checksum left to the kernel) and gathered by `writev`, so the
//! payloads are never copied in userspace. Consecutive UDP datagrams of one flow, of one size
//! (the last may be shorter), become one UDP GSO super-packet the same way (USO, as
//! wireguard-go's udpGROTable does; Linux 6.2 or later): one write for a train of small
//! datagrams, which the instance's kernel cuts back into the same datagrams.
//!
//! The rules follow the kernel's own TCP GRO (tcp_gro_receive): same addresses and ports, same
//! acknowledgement number, window and options, contiguous sequence numbers, only ACK (and PSH
//! on the last segment), every segment but the last of the first one's size, an IPv4 header
//! without options and not a fragment, and the same TOS, TTL and DF.

use super::gso::{F_NEEDS_CSUM, VNET_HDR_LEN, VnetHdr, gso_type};
use super::ipv4::{self, proto};

/// At most this many segments per super-packet.
pub const MAX_SEGMENTS: usize = 64;
/// The largest header block: virtio-net header, IPv4 without options, TCP with options.
pub const MAX_HEADER: usize = VNET_HDR_LEN + 20 + 60;

/// A TCP segment as GRO sees it.
#[derive(Debug, Clone, Copy)]
struct Seg {
    tcp_len: usize,
    seq: u32,
    payload: usize,
    psh: bool,
}

const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const FIN: u8 = 0x01;

/// IPv4 without options, whole, not a fragment, carrying a whole TCP header: its length
/// and flags.
fn tcp_shape(p: &[u8]) -> Option<(usize, u8)> {
    if p.len() < 40 || p[0] != 0x45 || p[9] != proto::TCP {
        return None;
    }
    if u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0
        || usize::from(u16::from_be_bytes([p[2], p[3]])) != p.len()
    {
        return None;
    }
    let tcp_len = usize::from(p[32] >> 4) * 4;
    (tcp_len >= 20 && 20 + tcp_len <= p.len()).then_some((tcp_len, p[33]))
}

/// A segment that may be coalesced: [`tcp_shape`], only ACK (and PSH), some payload.
fn seg(p: &[u8]) -> Option<Seg> {
    let (tcp_len, flags) = tcp_shape(p)?;
    if flags & !PSH != ACK {
        return None;
    }
    let payload = p.len() - 20 - tcp_len;
    (payload > 0).then(|| Seg {
        tcp_len,
        seq: u32::from_be_bytes([p[24], p[25], p[26], p[27]]),
        payload,
        psh: flags & PSH != 0,
    })
}

/// Whether `next` continues the run that starts with `first` and ends with `prev`.
fn follows(first: &[u8], f: &Seg, prev: &Seg, next: &[u8], n: &Seg, total: usize) -> bool {
    !prev.psh
        && prev.payload == f.payload
        && n.payload <= f.payload
        && n.tcp_len == f.tcp_len
        && n.seq == prev.seq.wrapping_add(prev.payload as u32)
        && total + n.payload <= 65_535
        // TOS, DF, TTL, protocol, addresses.
        && first[1] == next[1]
        && first[6] & 0x40 == next[6] & 0x40
        && first[8] == next[8]
        && first[12..20] == next[12..20]
        // Ports, then acknowledgement, data offset and flags but PSH, window; options.
        && first[20..24] == next[20..24]
        && first[28..33] == next[28..33]
        && first[34..36] == next[34..36]
        && first[40..20 + f.tcp_len] == next[40..20 + n.tcp_len]
}

/// Splits `pkts` (IPv4 packets, in write order) into runs that coalesce: each run is
/// `(start, count)`; a run of one is written as it is.
pub fn plan(pkts: &[&[u8]], runs: &mut Vec<(usize, usize)>) {
    runs.clear();
    let mut i = 0;
    while i < pkts.len() {
        let count = tcp_run(&pkts[i..]).max(udp_run(&pkts[i..]));
        runs.push((i, count));
        i += count;
    }
}

/// How many of `pkts` coalesce as TCP segments from the first (1 when none does).
fn tcp_run(pkts: &[&[u8]]) -> usize {
    let Some(f) = seg(pkts[0]) else {
        return 1;
    };
    let (mut count, mut prev) = (1, f);
    let mut total = 20 + f.tcp_len + f.payload;
    while count < MAX_SEGMENTS.min(pkts.len()) {
        let next = pkts[count];
        match seg(next) {
            Some(n) if follows(pkts[0], &f, &prev, next, &n, total) => {
                total += n.payload;
                prev = n;
                count += 1;
            }
            _ => break,
        }
    }
    count
}

/// A UDP datagram that may be coalesced: IPv4 without options, whole, not a fragment, its
/// UDP length right, some payload. Its payload length.
fn datagram(p: &[u8]) -> Option<usize> {
    if p.len() < 29 || p[0] != 0x45 || p[9] != proto::UDP {
        return None;
    }
    let frag = u16::from_be_bytes([p[6], p[7]]) & 0x3fff;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let udp_len = usize::from(u16::from_be_bytes([p[24], p[25]]));
    (frag == 0 && total == p.len() && udp_len == p.len() - 20).then_some(p.len() - 28)
}

/// How many of `pkts` coalesce as UDP datagrams from the first (1 when none does): the same
/// TOS, DF, TTL, addresses and ports, every datagram but the last of the first one's size.
fn udp_run(pkts: &[&[u8]]) -> usize {
    let Some(size) = datagram(pkts[0]) else {
        return 1;
    };
    let first = pkts[0];
    let (mut count, mut prev, mut total) = (1, size, 28 + size);
    while count < MAX_SEGMENTS.min(pkts.len()) {
        let next = pkts[count];
        match datagram(next) {
            Some(n)
                if prev == size
                    && n <= size
                    && total + n <= 65_535
                    && first[1] == next[1]
                    && first[6] & 0x40 == next[6] & 0x40
                    && first[8] == next[8]
                    && first[12..24] == next[12..24] =>
            {
                total += n;
                prev = n;
                count += 1;
            }
            _ => break,
        }
    }
    count
}

/// Whether `p`, longer than `mtu`, is a TCP segment that the instance's kernel can take as a
/// super-packet cut at `mtu` (as [`super_header`] writes it): several segments in one, as
/// the underlay's kernel GRO merges them or a jumbo underlay carries them. IPv4 without
/// options, not a fragment, whole, TCP with ACK and nothing but PSH and FIN besides (the
/// last of a stream's segments carries them; the kernel's cut keeps them on its last), its
/// headers shorter than `mtu`.
pub fn is_super_segment(p: &[u8], mtu: usize) -> bool {
    p.len() > mtu
        && tcp_shape(p)
            .is_some_and(|(tcp_len, flags)| flags & !(PSH | FIN) == ACK && 20 + tcp_len < mtu)
}

/// Whether a run of `run` must be written with a GSO header: more than one segment, or one
/// longer than `mtu`.
pub fn needs_gso(run: &[&[u8]], mtu: usize) -> bool {
    run.len() > 1 || run.first().is_some_and(|p| is_super_segment(p, mtu))
}

/// Writes into `out` the virtio-net header and the IPv4 + TCP headers of the super-packet made
/// of `run` (segments as `plan` found them: at least two, or one that [`is_super_segment`]),
/// and returns their length. The payloads follow, gathered from the segments. The kernel
/// cuts it at `mtu` at most (a segment of the run may be larger: a super-segment).
pub fn super_header(run: &[&[u8]], mtu: usize, out: &mut [u8]) -> usize {
    if run[0][9] == proto::UDP {
        return udp_super_header(run, out);
    }
    let first = run[0];
    let tcp_len = usize::from(first[32] >> 4) * 4;
    let headers = 20 + tcp_len;
    let payload: usize = run.iter().map(|p| p.len() - headers).sum();
    let total = headers + payload;
    VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: gso_type::TCPV4,
        hdr_len: headers as u16,
        gso_size: (first.len() - headers).min(mtu.saturating_sub(headers).max(1)) as u16,
        csum_start: 20,
        csum_offset: 16,
    }
    .write(out);
    let h = &mut out[VNET_HDR_LEN..VNET_HDR_LEN + headers];
    h.copy_from_slice(&first[..headers]);
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[10..12].fill(0);
    let c = ipv4::checksum(&h[..20]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    if run.last().is_some_and(|p| p[33] & PSH != 0) {
        h[33] |= PSH;
    }
    // CHECKSUM_PARTIAL: the field holds the pseudo-header sum, not complemented.
    let pseudo = etherparse::checksum::Sum16BitWords::new()
        .add_slice(&h[12..20])
        .add_2bytes([0, proto::TCP])
        .add_2bytes(((tcp_len + payload) as u16).to_be_bytes())
        .ones_complement()
        .to_be();
    h[36..38].copy_from_slice(&(!pseudo).to_be_bytes());
    VNET_HDR_LEN + headers
}

/// [`super_header`] for a run of UDP datagrams (at least two): a UDP GSO super-packet cut
/// at the first datagram's size, so the instance's kernel gives back the same datagrams.
fn udp_super_header(run: &[&[u8]], out: &mut [u8]) -> usize {
    let first = run[0];
    let payload: usize = run.iter().map(|p| p.len() - 28).sum();
    VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: gso_type::UDP_L4,
        hdr_len: 28,
        gso_size: (first.len() - 28) as u16,
        csum_start: 20,
        csum_offset: 6,
    }
    .write(out);
    let h = &mut out[VNET_HDR_LEN..VNET_HDR_LEN + 28];
    h.copy_from_slice(&first[..28]);
    h[2..4].copy_from_slice(&((28 + payload) as u16).to_be_bytes());
    h[10..12].fill(0);
    let c = ipv4::checksum(&h[..20]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let udp_len = (8 + payload) as u16;
    h[24..26].copy_from_slice(&udp_len.to_be_bytes());
    let pseudo = etherparse::checksum::Sum16BitWords::new()
        .add_slice(&h[12..20])
        .add_2bytes([0, proto::UDP])
        .add_2bytes(udp_len.to_be_bytes())
        .ones_complement()
        .to_be();
    h[26..28].copy_from_slice(&(!pseudo).to_be_bytes());
    VNET_HDR_LEN + 28
}

/// The offset of the payload in a segment of a run.
pub fn payload_offset(seg: &[u8]) -> usize {
    if seg[9] == proto::UDP {
        return 28;
    }
    20 + usize::from(seg[32] >> 4) * 4
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::gso::VnetHdr;
    use crate::wire::gso::tests::cut_segments;

    /// A stream of `n` segments of `mss` bytes, as a TSO super-packet cut by vpcd's own
    /// segmenter: GRO must put it back together.
    fn stream(n: usize, mss: usize, psh_last: bool) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut t = ipv4::tests::tcp(40000, 80, ACK | if psh_last { PSH } else { 0 });
        t[4..8].copy_from_slice(&7000u32.to_be_bytes());
        t[8..12].copy_from_slice(&99u32.to_be_bytes());
        t[14..16].copy_from_slice(&500u16.to_be_bytes());
        t.extend((0..n * mss).map(|i| (i % 251) as u8));
        let big = ipv4::tests::packet([10, 0, 1, 10], [10, 0, 2, 20], proto::TCP, &t);
        let hdr = VnetHdr {
            gso_type: gso_type::TCPV4,
            gso_size: mss as u16,
            ..Default::default()
        };
        let segs = cut_segments(&big, &hdr).unwrap();
        (big, segs)
    }

    #[test]
    fn a_cut_stream_coalesces_back_into_the_original() {
        let (big, segs) = stream(5, 1000, true);
        let views: Vec<&[u8]> = segs.iter().map(|s| &s[..]).collect();
        let mut runs = Vec::new();
        plan(&views, &mut runs);
        assert_eq!(runs, vec![(0, 5)]);
        let mut hdr = [0u8; MAX_HEADER];
        let n = super_header(&views, 1500, &mut hdr);
        let mut rebuilt = hdr[VNET_HDR_LEN..n].to_vec();
        for s in &views {
            rebuilt.extend_from_slice(&s[payload_offset(s)..]);
        }
        // Everything but the TCP checksum (partial) and the IP id matches the original.
        assert_eq!(rebuilt.len(), big.len());
        assert_eq!(&rebuilt[..4], &big[..4]);
        assert_eq!(&rebuilt[12..36], &big[12..36]);
        assert_eq!(&rebuilt[40..], &big[40..]);
        assert_eq!(ipv4::checksum(&rebuilt[..20]), 0);
        let v = VnetHdr::parse(&hdr).unwrap();
        assert_eq!(
            (v.gso_type, v.gso_size, v.csum_start, v.csum_offset),
            (gso_type::TCPV4, 1000, 20, 16)
        );
        // Finishing the partial checksum gives the right one.
        crate::wire::gso::finish_checksum(&mut rebuilt, 20, 16).unwrap();
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&rebuilt).unwrap();
        let tcp = etherparse::TcpHeaderSlice::from_slice(&rebuilt[20..]).unwrap();
        assert_eq!(
            tcp.checksum(),
            tcp.calc_checksum_ipv4(&ip, &rebuilt[40..]).unwrap()
        );
    }

    #[test]
    fn runs_break_where_the_kernel_would() {
        let (_, segs) = stream(4, 1000, false);
        let mut runs = Vec::new();
        let check = |pkts: Vec<Vec<u8>>, want: Vec<(usize, usize)>, what: &str| {
            let views: Vec<&[u8]> = pkts.iter().map(|s| &s[..]).collect();
            let mut runs = Vec::new();
            plan(&views, &mut runs);
            assert_eq!(runs, want, "{what}");
        };
        // A gap in the sequence.
        check(
            vec![segs[0].clone(), segs[2].clone(), segs[3].clone()],
            vec![(0, 1), (1, 2)],
            "gap",
        );
        // PSH ends a run.
        let mut psh = segs.clone();
        psh[1][33] |= PSH;
        check(psh, vec![(0, 2), (2, 2)], "psh");
        // Another acknowledgement number.
        let mut ack = segs.clone();
        ack[2][31] ^= 1;
        ack[3][31] ^= 1;
        check(ack, vec![(0, 2), (2, 2)], "ack");
        // A FIN never coalesces.
        let mut fin = segs.clone();
        fin[1][33] |= 0x01;
        check(fin, vec![(0, 1), (1, 1), (2, 2)], "fin");
        // Another flow in between.
        let other = stream(1, 1000, false).1[0].clone();
        let mut o = other.clone();
        o[20] ^= 1; // another source port
        check(
            vec![segs[0].clone(), o, segs[1].clone()],
            vec![(0, 1), (1, 1), (2, 1)],
            "interleaved",
        );
        // Not TCP, or no payload.
        let udp = ipv4::tests::packet([10, 0, 1, 10], [10, 0, 2, 20], proto::UDP, &[0; 8]);
        let bare_ack = ipv4::tests::packet(
            [10, 0, 1, 10],
            [10, 0, 2, 20],
            proto::TCP,
            &ipv4::tests::tcp(1, 2, ACK),
        );
        check(
            vec![udp.clone(), udp, bare_ack.clone(), bare_ack],
            vec![(0, 1), (1, 1), (2, 1), (3, 1)],
            "others",
        );
        plan(&[], &mut runs);
        assert!(runs.is_empty());
    }

    /// Super-segments (a jumbo underlay's, or the underlay kernel's GRO: several segments in
    /// one, longer than the instance MTU) coalesce too, and the kernel is told to cut them at
    /// the instance MTU, not at their own size; one alone is written as a super-packet.
    #[test]
    fn super_segments_are_cut_at_the_instance_mtu() {
        let (big, supers) = stream(3, 8000, true);
        let views: Vec<&[u8]> = supers.iter().map(|s| &s[..]).collect();
        assert!(views.iter().all(|s| is_super_segment(s, 1476)));
        assert!(!is_super_segment(views[0], 8040), "fits that MTU");
        let mut runs = Vec::new();
        plan(&views, &mut runs);
        assert_eq!(runs, vec![(0, 3)]);
        let mut hdr = [0u8; MAX_HEADER];
        let n = super_header(&views, 1476, &mut hdr);
        let v = VnetHdr::parse(&hdr).unwrap();
        assert_eq!(
            (v.gso_type, v.gso_size, v.hdr_len),
            (gso_type::TCPV4, 1436, 40)
        );
        let total: usize = n - VNET_HDR_LEN + views.iter().map(|s| s.len() - 40).sum::<usize>();
        assert_eq!(total, big.len());
        // One alone: a super-packet of its own; one that fits is written plain.
        assert!(needs_gso(&views[..1], 1476));
        let n = super_header(&views[..1], 1476, &mut hdr);
        let v = VnetHdr::parse(&hdr).unwrap();
        assert_eq!(v.gso_size, 1436);
        assert_eq!(u16::from_be_bytes([hdr[n - 38], hdr[n - 37]]), 8040);
        let (_, small) = stream(1, 1000, false);
        assert!(!needs_gso(&[&small[0][..]], 1476));
        // The last of a stream, with FIN, is one too; a SYN or a RST never.
        let mut fin = supers[2].clone();
        fin[33] |= FIN;
        assert!(is_super_segment(&fin, 1476));
        for flag in [0x02, 0x04] {
            let mut other = supers[0].clone();
            other[33] |= flag;
            assert!(!is_super_segment(&other, 1476), "flag {flag:#x}");
        }
        // Not TCP, or a fragment: never a super-segment.
        let udp = ipv4::tests::packet([10, 0, 1, 10], [10, 0, 2, 20], proto::UDP, &[0; 3000]);
        assert!(!is_super_segment(&udp, 1476));
        let mut frag = supers[0].clone();
        frag[6] |= 0x20;
        assert!(!is_super_segment(&frag, 1476));
    }

    /// A UDP datagram of `payload` bytes from 10.0.1.10:5000 to 10.0.2.20:53, its checksum
    /// filled in.
    fn datagram_of(payload: &[u8], sport: u16) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&53u16.to_be_bytes());
        u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(payload);
        let mut p = ipv4::tests::packet([10, 0, 1, 10], [10, 0, 2, 20], proto::UDP, &u);
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&p)
            .unwrap()
            .to_header();
        let udp = etherparse::UdpHeaderSlice::from_slice(&p[20..])
            .unwrap()
            .to_header();
        let c = udp.calc_checksum_ipv4(&ip, payload).unwrap();
        p[26..28].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// A train of small datagrams of one flow is one write, which the kernel's cut (vpcd's
    /// own segmenter stands in for it) turns back into the very datagrams, checksums and all;
    /// another size in the middle, or another flow, ends the run.
    #[test]
    fn udp_datagrams_coalesce_and_cut_back_into_themselves() {
        let dgrams: Vec<Vec<u8>> = (0..5u8)
            .map(|i| datagram_of(&[i; 64][..if i == 4 { 20 } else { 64 }], 5000))
            .collect();
        let views: Vec<&[u8]> = dgrams.iter().map(|d| &d[..]).collect();
        let mut runs = Vec::new();
        plan(&views, &mut runs);
        assert_eq!(runs, vec![(0, 5)]);
        let mut hdr = [0u8; MAX_HEADER];
        let n = super_header(&views, 1500, &mut hdr);
        let v = VnetHdr::parse(&hdr).unwrap();
        assert_eq!(
            (
                v.gso_type,
                v.gso_size,
                v.hdr_len,
                v.csum_start,
                v.csum_offset
            ),
            (gso_type::UDP_L4, 64, 28, 20, 6)
        );
        let mut big = hdr[VNET_HDR_LEN..n].to_vec();
        for d in &views {
            big.extend_from_slice(&d[payload_offset(d)..]);
        }
        let back = cut_segments(&big, &v).unwrap();
        assert_eq!(back.len(), 5);
        for (i, (b, d)) in back.iter().zip(&dgrams).enumerate() {
            // All but the IPv4 identification (and so its checksum) as sent.
            assert_eq!(b.len(), d.len(), "datagram {i}");
            assert_eq!((&b[..4], &b[12..]), (&d[..4], &d[12..]), "datagram {i}");
        }
        let check = |pkts: Vec<Vec<u8>>, want: Vec<(usize, usize)>, what: &str| {
            let views: Vec<&[u8]> = pkts.iter().map(|s| &s[..]).collect();
            let mut runs = Vec::new();
            plan(&views, &mut runs);
            assert_eq!(runs, want, "{what}");
        };
        let mut sizes = dgrams.clone();
        sizes[2] = datagram_of(&[2; 30], 5000);
        check(sizes, vec![(0, 3), (3, 2)], "a shorter one ends a run");
        let mut flows = dgrams.clone();
        flows[1] = datagram_of(&[1; 64], 5001);
        check(flows, vec![(0, 1), (1, 1), (2, 3)], "another flow");
    }

    #[test]
    fn runs_stop_at_64k_and_64_segments() {
        let (_, segs) = stream(50, 1400, false);
        let views: Vec<&[u8]> = segs.iter().map(|s| &s[..]).collect();
        let mut runs = Vec::new();
        plan(&views, &mut runs);
        assert!(runs.iter().all(|&(_, n)| n * 1400 + 40 <= 65_535));
        assert_eq!(runs.iter().map(|r| r.1).sum::<usize>(), 50);
        assert_eq!(runs[0].1, (65_535 - 40) / 1400);
        let (_, small) = stream(100, 100, false);
        let views: Vec<&[u8]> = small.iter().map(|s| &s[..]).collect();
        plan(&views, &mut runs);
        assert_eq!(runs[0].1, MAX_SEGMENTS);
    }
}
