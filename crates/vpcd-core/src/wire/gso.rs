//! Offloads: the virtio-net header a TUN device with IFF_VNET_HDR puts in front of every
//! packet, completing partial checksums, and segmenting TCP/UDP super-packets.
//!
//! With offloads on, one read from a TUN device can return a 64 KB TCP "super-packet" (the
//! kernel's TSO/GSO left undone): vpcd decides once for it, then either hands it verbatim to a
//! local TUN device (that kernel segments or delivers it whole) or cuts it here into
//! MTU-sized segments for the underlay, each with its own headers and checksums. Even small
//! packets may arrive with a partial checksum (CHECKSUM_PARTIAL): the field holds only the
//! pseudo-header sum and must be finished before the packet leaves the host.
//!
//! The segmenter is vpcd's own: tun-rs has one, but it is not part of its documented API, and
//! vpcd's [`Cut`] copies no payload: it writes each segment's headers where the sender wants
//! them (after room for the outer headers) and says where the segment's payload lies in the
//! super-packet, for a gathered send.

use super::ipv4::{self, proto};

/// Size of `struct virtio_net_hdr` (no `num_buffers`: tun-rs does not set TUNSETVNETHDRSZ).
pub const VNET_HDR_LEN: usize = 10;

/// `flags`: the checksum at `csum_start + csum_offset` must be completed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum has been verified.
pub const F_DATA_VALID: u8 = 2;

/// `gso_type` values.
pub mod gso_type {
    /// Not a GSO packet.
    pub const NONE: u8 = 0;
    /// TCP over IPv4.
    pub const TCPV4: u8 = 1;
    /// UDP segmentation (USO).
    pub const UDP_L4: u8 = 5;
    /// The ECN bit, or-ed with the type.
    pub const ECN: u8 = 0x80;
}

/// The virtio-net header (fields in the host's byte order: little-endian on x86 and arm).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    /// `F_NEEDS_CSUM`, `F_DATA_VALID`.
    pub flags: u8,
    /// One of [`gso_type`].
    pub gso_type: u8,
    /// Length of the headers (not trusted: recomputed where needed).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the checksummed part starts (the transport header).
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads the header at the start of `b`.
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `out`.
    pub fn write(&self, out: &mut [u8]) {
        let out = &mut out[..VNET_HDR_LEN];
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    /// True for a super-packet to be segmented.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !gso_type::ECN != gso_type::NONE
    }
}

/// Why a super-packet could not be segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    /// The header and the packet disagree (type, offsets, lengths).
    #[error("virtio-net header does not match the packet")]
    Inconsistent,
}

/// Completes a partial checksum in place: the field at `start + offset` holds the
/// pseudo-header sum; the sum over `pkt[start..]` replaces it.
pub fn finish_checksum(pkt: &mut [u8], start: usize, offset: usize) -> Result<(), GsoError> {
    let field = start.checked_add(offset).ok_or(GsoError::Inconsistent)?;
    if field + 2 > pkt.len() {
        return Err(GsoError::Inconsistent);
    }
    // The field's current value (the pseudo-header sum, not complemented) takes part.
    let mut c = ipv4::checksum(&pkt[start..]);
    if c == 0 && offset == 6 {
        // UDP transmits a computed zero as all ones (RFC 768).
        c = 0xffff;
    }
    pkt[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// How a super-packet is cut: `count` segments, each with `headers` bytes of IPv4 and
/// transport header and up to `mss` bytes of payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// Number of segments.
    pub count: usize,
    /// IPv4 + transport header length.
    pub headers: usize,
    /// Payload bytes per segment (the last may have fewer).
    pub mss: usize,
    ip_len: usize,
    len: usize,
    protocol: u8,
    ident: u16,
    seq: u32,
}

impl Cut {
    /// The cut of `pkt` described by `hdr`.
    pub fn new(pkt: &[u8], hdr: &VnetHdr) -> Result<Cut, GsoError> {
        let (ip_len, headers) = header_lengths(pkt, hdr)?;
        let protocol = pkt[9];
        let mss = usize::from(hdr.gso_size);
        let seq = if protocol == proto::TCP {
            u32::from_be_bytes([
                pkt[ip_len + 4],
                pkt[ip_len + 5],
                pkt[ip_len + 6],
                pkt[ip_len + 7],
            ])
        } else {
            0
        };
        Ok(Cut {
            count: (pkt.len() - headers).div_ceil(mss).max(1),
            headers,
            mss,
            ip_len,
            len: pkt.len(),
            protocol,
            ident: u16::from_be_bytes([pkt[4], pkt[5]]),
            seq,
        })
    }

    /// The same TCP super-packet cut into fewer, larger segments: as many of the instance's
    /// segments in each as fit `room` bytes (the underlay MTU less the encapsulation), so a
    /// jumbo underlay carries several per packet. The receiver writes such a super-segment to
    /// its instance with a GSO header, which its kernel cuts at the instance MTU. UDP keeps
    /// its cut: there, each segment is a datagram of its own.
    pub fn widened(mut self, room: usize) -> Cut {
        if self.protocol != proto::TCP || room <= self.headers + self.mss {
            return self;
        }
        self.mss *= (room - self.headers) / self.mss;
        self.count = (self.len - self.headers).div_ceil(self.mss).max(1);
        self
    }

    /// Where segment `i`'s payload lies in the super-packet.
    pub fn payload(&self, i: usize) -> std::ops::Range<usize> {
        let start = (self.headers + i * self.mss).min(self.len);
        start..(start + self.mss).min(self.len)
    }

    /// Writes segment `i`'s headers (`self.headers` bytes) into `h`: the super-packet's,
    /// with total length, identification + i, TCP sequence and flags (FIN/PSH on the last
    /// segment only, CWR on the first only) or UDP length, and both checksums, the transport
    /// one computed over `chunk`, the segment's payload, where it lies.
    pub fn write_header(&self, pkt: &[u8], i: usize, chunk: &[u8], h: &mut [u8]) {
        let ip_len = self.ip_len;
        h.copy_from_slice(&pkt[..self.headers]);
        let total = (self.headers + chunk.len()) as u16;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[4..6].copy_from_slice(&self.ident.wrapping_add(i as u16).to_be_bytes());
        h[10..12].fill(0);
        let c = ipv4::checksum(&h[..ip_len]);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let l4 = &mut h[ip_len..];
        let check_at = if self.protocol == proto::TCP {
            l4[4..8].copy_from_slice(&self.seq.wrapping_add((i * self.mss) as u32).to_be_bytes());
            const FIN_PSH: u8 = 0x09;
            const CWR: u8 = 0x80;
            if i + 1 != self.count {
                l4[13] &= !FIN_PSH;
            }
            if i != 0 {
                l4[13] &= !CWR;
            }
            16
        } else {
            l4[4..6].copy_from_slice(&((8 + chunk.len()) as u16).to_be_bytes());
            6
        };
        l4[check_at..check_at + 2].fill(0);
        let c = crate::wire::csum::Sum::new()
            .add_bytes(&h[12..20])
            .add2([0, self.protocol])
            .add2(((self.headers - ip_len + chunk.len()) as u16).to_be_bytes())
            .add_bytes(&h[ip_len..])
            .add_bytes(chunk)
            .checksum();
        let c = if self.protocol == proto::UDP && c == 0 {
            0xffff
        } else {
            c
        };
        h[ip_len + check_at..ip_len + check_at + 2].copy_from_slice(&c.to_be_bytes());
    }
}

/// (IPv4 header length, IPv4 + transport header length), checked against the header.
fn header_lengths(pkt: &[u8], hdr: &VnetHdr) -> Result<(usize, usize), GsoError> {
    let ip = pkt.first().ok_or(GsoError::Inconsistent)?;
    if ip >> 4 != 4 || pkt.len() < ipv4::HEADER_LEN {
        return Err(GsoError::Inconsistent);
    }
    let ip_len = usize::from(ip & 0x0f) * 4;
    let l4_len = match (hdr.gso_type & !gso_type::ECN, pkt[9]) {
        (gso_type::TCPV4, proto::TCP) => {
            usize::from(pkt.get(ip_len + 12).ok_or(GsoError::Inconsistent)? >> 4) * 4
        }
        (gso_type::UDP_L4, proto::UDP) => 8,
        _ => return Err(GsoError::Inconsistent),
    };
    let headers = ip_len + l4_len;
    if ip_len < ipv4::HEADER_LEN || l4_len < 8 || hdr.gso_size == 0 || pkt.len() < headers {
        return Err(GsoError::Inconsistent);
    }
    Ok((ip_len, headers))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use etherparse::{Ipv4HeaderSlice, TcpHeaderSlice, UdpHeaderSlice};

    fn super_tcp(payload: usize, flags: u8) -> Vec<u8> {
        let mut t = ipv4::tests::tcp(40000, 80, flags);
        t[4..8].copy_from_slice(&1000u32.to_be_bytes());
        t.extend((0..payload).map(|i| i as u8));
        let mut p = ipv4::tests::packet([10, 0, 1, 10], [10, 0, 2, 20], proto::TCP, &t);
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[10..12].fill(0);
        let c = ipv4::checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn verify_tcp(seg: &[u8]) -> (u32, u8, usize) {
        let ip = Ipv4HeaderSlice::from_slice(seg).unwrap();
        assert_eq!(ip.total_len() as usize, seg.len());
        assert_eq!(ipv4::checksum(&seg[..20]), 0);
        let tcp = TcpHeaderSlice::from_slice(&seg[20..]).unwrap();
        let want = tcp.calc_checksum_ipv4(&ip, &seg[40..]).unwrap();
        assert_eq!(tcp.checksum(), want, "TCP checksum");
        (tcp.sequence_number(), seg[33], seg.len() - 40)
    }

    #[test]
    fn vnet_header_round_trips() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: gso_type::TCPV4,
            hdr_len: 52,
            gso_size: 1448,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut b = [0u8; 10];
        h.write(&mut b);
        assert_eq!(b, [1, 1, 52, 0, 0xa8, 5, 20, 0, 16, 0]);
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert!(h.is_gso());
        assert!(VnetHdr::parse(&b[..9]).is_none());
    }

    /// Cuts `pkt` as the worker does: each segment's headers written by [`Cut::write_header`]
    /// followed by its payload, [`Cut::payload`] of the super-packet.
    pub(crate) fn cut_segments(pkt: &[u8], hdr: &VnetHdr) -> Result<Vec<Vec<u8>>, GsoError> {
        let cut = Cut::new(pkt, hdr)?;
        let segments = (0..cut.count).map(|i| {
            let chunk = &pkt[cut.payload(i)];
            let mut seg = vec![0u8; cut.headers];
            cut.write_header(pkt, i, chunk, &mut seg);
            seg.extend_from_slice(chunk);
            seg
        });
        Ok(segments.collect())
    }

    #[test]
    fn tcp_super_packet_is_cut_with_sequence_flags_and_checksums() {
        let pkt = super_tcp(3000, 0x18 | 0x01 | 0x80); // PSH ACK FIN CWR
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: gso_type::TCPV4,
            hdr_len: 40,
            gso_size: 1400,
            csum_start: 20,
            csum_offset: 16,
        };
        let cut = Cut::new(&pkt, &hdr).unwrap();
        assert_eq!((cut.count, cut.headers, cut.mss), (3, 40, 1400));
        let segs = cut_segments(&pkt, &hdr).unwrap();
        let lens: Vec<usize> = segs.iter().map(Vec::len).collect();
        assert_eq!(lens, [40 + 1400, 40 + 1400, 40 + 200]);
        let mut payload = Vec::new();
        for (i, seg) in segs.iter().enumerate() {
            let (seq, flags, n) = verify_tcp(seg);
            assert_eq!(seq, 1000 + 1400 * i as u32);
            assert_eq!(u16::from_be_bytes([seg[4], seg[5]]), 0x1234 + i as u16);
            assert_eq!(flags & 0x80 != 0, i == 0, "CWR only on the first");
            assert_eq!(flags & 0x09 != 0, i == 2, "FIN and PSH only on the last");
            assert_eq!(flags & 0x10, 0x10);
            payload.extend_from_slice(&seg[40..40 + n]);
        }
        assert_eq!(payload, pkt[40..]);
    }

    /// On a jumbo underlay a TCP super-packet is cut into as many whole instance segments per
    /// underlay packet as fit, each a valid TCP segment of its own; with no room for two, and
    /// for UDP, the cut stays.
    #[test]
    fn a_widened_cut_fills_the_underlay_with_whole_segments() {
        let pkt = super_tcp(20_000, 0x18);
        let hdr = VnetHdr {
            gso_type: gso_type::TCPV4,
            gso_size: 1400,
            ..Default::default()
        };
        let cut = Cut::new(&pkt, &hdr).unwrap();
        assert_eq!(cut.widened(1500), cut, "no room for two");
        let wide = cut.widened(9000 - 28);
        assert_eq!((wide.count, wide.mss), (3, 6 * 1400));
        let mut payload = Vec::new();
        for i in 0..wide.count {
            let chunk = &pkt[wide.payload(i)];
            let mut seg = vec![0u8; wide.headers];
            wide.write_header(&pkt, i, chunk, &mut seg);
            seg.extend_from_slice(chunk);
            assert!(seg.len() <= 9000 - 28, "segment {i}: {} bytes", seg.len());
            let (seq, flags, n) = verify_tcp(&seg);
            assert_eq!(seq, 1000 + 8400 * i as u32);
            assert_eq!(
                flags & 0x08 != 0,
                i + 1 == wide.count,
                "PSH only on the last"
            );
            payload.extend_from_slice(&seg[40..40 + n]);
        }
        assert_eq!(payload, pkt[40..]);
        let mut udp = vec![0u8; 8 + 3000];
        udp[..2].copy_from_slice(&5000u16.to_be_bytes());
        udp[2..4].copy_from_slice(&53u16.to_be_bytes());
        udp[4..6].copy_from_slice(&3008u16.to_be_bytes());
        let udp_pkt = ipv4::tests::packet([10, 0, 1, 10], [10, 0, 2, 20], proto::UDP, &udp);
        let uhdr = VnetHdr {
            gso_type: gso_type::UDP_L4,
            gso_size: 1000,
            ..Default::default()
        };
        let ucut = Cut::new(&udp_pkt, &uhdr).unwrap();
        assert_eq!(ucut.widened(9000), ucut, "UDP datagrams keep their size");
    }

    #[test]
    fn headers_are_written_after_the_room_left_for_outer_headers() {
        let pkt = super_tcp(3000, 0x10);
        let hdr = VnetHdr {
            gso_type: gso_type::TCPV4,
            gso_size: 1000,
            ..Default::default()
        };
        let cut = Cut::new(&pkt, &hdr).unwrap();
        let want = cut_segments(&pkt, &hdr).unwrap();
        // As the worker lays them out: outer-header room, then the segment's headers.
        let mut heads = vec![0xeeu8; 8 + cut.headers];
        for (i, seg) in want.iter().enumerate() {
            let chunk = &pkt[cut.payload(i)];
            cut.write_header(&pkt, i, chunk, &mut heads[8..]);
            assert_eq!(
                &heads[..8],
                &[0xee; 8],
                "the outer headers' room is left alone"
            );
            assert_eq!(&heads[8..], &seg[..cut.headers]);
        }
    }

    #[test]
    fn udp_super_packet_gets_one_datagram_per_segment() {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&5000u16.to_be_bytes());
        u[2..4].copy_from_slice(&53u16.to_be_bytes());
        u.extend(std::iter::repeat_n(7u8, 2500));
        let pkt = ipv4::tests::packet([10, 0, 1, 10], [10, 0, 2, 20], proto::UDP, &u);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: gso_type::UDP_L4,
            hdr_len: 28,
            gso_size: 1000,
            csum_start: 20,
            csum_offset: 6,
        };
        let segs = cut_segments(&pkt, &hdr).unwrap();
        let lens: Vec<usize> = segs.iter().map(Vec::len).collect();
        assert_eq!(lens, [1028, 1028, 528]);
        for seg in &segs {
            let ip = Ipv4HeaderSlice::from_slice(seg).unwrap();
            assert_eq!(ip.total_len() as usize, seg.len());
            let udp = UdpHeaderSlice::from_slice(&seg[20..]).unwrap();
            assert_eq!(udp.length() as usize, seg.len() - 20);
            assert_eq!(
                udp.checksum(),
                udp.to_header()
                    .calc_checksum_ipv4(&ip.to_header(), &seg[28..])
                    .unwrap()
            );
        }
    }

    #[test]
    fn inconsistent_headers_are_refused() {
        let pkt = super_tcp(3000, 0x10);
        let udp_hdr = VnetHdr {
            gso_type: gso_type::UDP_L4,
            gso_size: 1000,
            ..Default::default()
        };
        assert_eq!(Cut::new(&pkt, &udp_hdr), Err(GsoError::Inconsistent));
        let zero = VnetHdr {
            gso_type: gso_type::TCPV4,
            gso_size: 0,
            ..Default::default()
        };
        assert_eq!(Cut::new(&pkt, &zero), Err(GsoError::Inconsistent));
        let tcp = VnetHdr {
            gso_type: gso_type::TCPV4,
            gso_size: 1000,
            ..Default::default()
        };
        assert_eq!(Cut::new(&[0x45], &tcp), Err(GsoError::Inconsistent));
        assert_eq!(Cut::new(&pkt[..30], &tcp), Err(GsoError::Inconsistent));
        assert_eq!(Cut::new(&pkt, &tcp).map(|c| c.count), Ok(3));
    }

    #[test]
    fn partial_checksum_is_finished() {
        let mut pkt = super_tcp(100, 0x10);
        // What the kernel hands over: the pseudo-header sum, not complemented.
        let pseudo = etherparse::checksum::Sum16BitWords::new()
            .add_slice(&pkt[12..20])
            .add_2bytes([0, proto::TCP])
            .add_2bytes(120u16.to_be_bytes())
            .ones_complement()
            .to_be();
        pkt[36..38].copy_from_slice(&(!pseudo).to_be_bytes());
        finish_checksum(&mut pkt, 20, 16).unwrap();
        verify_tcp(&pkt);
        assert_eq!(
            finish_checksum(&mut pkt, 20, 200),
            Err(GsoError::Inconsistent)
        );
    }
}
