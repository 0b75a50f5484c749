//! GRO for TUN writes: consecutive TCP segments of one flow become one super-packet, written
//! with a virtio-net header (TSO, checksum left to the kernel) and gathered by `writev`, so the
//! payloads are never copied in userspace.
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

/// A segment that may be coalesced: IPv4 without options, whole, TCP with only ACK (and
/// PSH), some payload.
fn seg(p: &[u8]) -> Option<Seg> {
    if p.len() < 40 || p[0] != 0x45 || p[9] != proto::TCP {
        return None;
    }
    if u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0
        || usize::from(u16::from_be_bytes([p[2], p[3]])) != p.len()
    {
        return None;
    }
    let tcp_len = usize::from(p[32] >> 4) * 4;
    let flags = p[33];
    if tcp_len < 20 || 20 + tcp_len > p.len() || flags & !PSH != ACK {
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
        let mut count = 1;
        if let Some(f) = seg(pkts[i]) {
            let mut prev = f;
            let mut total = 20 + f.tcp_len + f.payload;
            while count < MAX_SEGMENTS && i + count < pkts.len() {
                let next = pkts[i + count];
                match seg(next) {
                    Some(n) if follows(pkts[i], &f, &prev, next, &n, total) => {
                        total += n.payload;
                        prev = n;
                        count += 1;
                    }
                    _ => break,
                }
            }
        }
        runs.push((i, count));
        i += count;
    }
}

/// Writes into `out` the virtio-net header and the IPv4 + TCP headers of the super-packet made
/// of `run` (at least two segments, as `plan` found them), and returns their length. The
/// payloads follow, gathered from the segments.
pub fn super_header(run: &[&[u8]], out: &mut [u8]) -> usize {
    let first = run[0];
    let tcp_len = usize::from(first[32] >> 4) * 4;
    let headers = 20 + tcp_len;
    let payload: usize = run.iter().map(|p| p.len() - headers).sum();
    let total = headers + payload;
    VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: gso_type::TCPV4,
        hdr_len: headers as u16,
        gso_size: (first.len() - headers) as u16,
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

/// The offset of the payload in a segment of a run.
pub fn payload_offset(seg: &[u8]) -> usize {
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
        let n = super_header(&views, &mut hdr);
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
