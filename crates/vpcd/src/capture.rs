//! Packet capture to pcapng (`vpcd ctl capture`), through the pcap-file crate.
//!
//! Packets are written as raw IPv4 (link type 101, as a TUN device has none), one interface
//! block per capture point, nanosecond timestamps since the Unix epoch, the direction in the
//! packet's flags (in: received by the port, out: sent by it), and for dropped packets the
//! drop reason and rule as the packet's comment (`drop: SgIngress by sg-web:ingress#3 on
//! host-a`), which tshark shows as `frame.comment`.

use std::borrow::Cow;
use std::io::Write;
use std::time::Duration;

use pcap_file::DataLink;
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};

/// Which way a packet went through the capture point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Into vpcd from the port (an instance sent it; it came from the underlay).
    In,
    /// Out of vpcd to the port.
    Out,
}

/// A pcapng file being written.
pub struct PcapNg<W: Write> {
    writer: PcapNgWriter<W>,
    written: u64,
}

impl<W: Write> PcapNg<W> {
    /// Starts a file with one interface block per name in `points` (interface ids follow
    /// their order).
    pub fn new(out: W, points: &[&str]) -> std::io::Result<PcapNg<W>> {
        let mut writer = PcapNgWriter::new(out).map_err(std::io::Error::other)?;
        for name in points {
            let idb = InterfaceDescriptionBlock {
                linktype: DataLink::RAW,
                snaplen: 0,
                options: vec![
                    InterfaceDescriptionOption::IfName(Cow::Owned(name.to_string())),
                    // Timestamps in nanoseconds (10^-9).
                    InterfaceDescriptionOption::IfTsResol(9),
                ],
            };
            writer
                .write_pcapng_block(idb)
                .map_err(std::io::Error::other)?;
        }
        Ok(PcapNg { writer, written: 0 })
    }

    /// Writes one packet seen at capture point `point` at `when` (since the Unix epoch).
    pub fn packet(
        &mut self,
        point: u32,
        when: Duration,
        dir: Direction,
        bytes: &[u8],
        comment: Option<&str>,
    ) -> std::io::Result<()> {
        // EPB flags, bits 0-1: 01 inbound, 10 outbound.
        let flags = match dir {
            Direction::In => 0b01,
            Direction::Out => 0b10,
        };
        let mut options = vec![EnhancedPacketOption::Flags(flags)];
        if let Some(c) = comment {
            options.push(EnhancedPacketOption::Comment(Cow::Borrowed(c)));
        }
        let epb = EnhancedPacketBlock {
            interface_id: point,
            timestamp: when,
            original_len: bytes.len() as u32,
            data: Cow::Borrowed(bytes),
            options,
        };
        self.writer
            .write_pcapng_block(epb)
            .map_err(std::io::Error::other)?;
        self.written += 1;
        Ok(())
    }

    /// Packets written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Flushes and returns the writer.
    pub fn finish(self) -> std::io::Result<W> {
        let mut w = self.writer.into_inner();
        w.flush()?;
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ICMP echo request 10.0.1.10 -> 10.0.1.20 (checksums valid).
    fn echo() -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 28, 0, 1, 0, 0, 64, 1, 0, 0, 10, 0, 1, 10, 10, 0, 1, 20, 8, 0, 0, 0, 0, 7,
            0, 1,
        ];
        let sum = |b: &[u8]| {
            let mut s: u32 = b
                .chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
                .sum();
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            !(s as u16)
        };
        let h = sum(&p[..20]);
        p[10..12].copy_from_slice(&h.to_be_bytes());
        let i = sum(&p[20..]);
        p[22..24].copy_from_slice(&i.to_be_bytes());
        p
    }

    #[test]
    fn tshark_reads_the_packets_their_direction_and_a_drops_comment() {
        // The referee: without it the test fails (apt-get install tshark).
        let tshark = which("tshark").expect("tshark is needed: apt-get install tshark");
        let path = std::env::temp_dir().join(format!("vpcd-capture-{}.pcapng", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let mut f = PcapNg::new(file, &["web-1", "drops"]).unwrap();
        let t = Duration::from_secs(1_700_000_000);
        f.packet(0, t, Direction::In, &echo(), None).unwrap();
        f.packet(
            1,
            t + Duration::from_millis(1),
            Direction::In,
            &echo(),
            Some("drop: SgIngress by sg-web:ingress#no-match on host-a"),
        )
        .unwrap();
        f.finish().unwrap();
        let out = std::process::Command::new(tshark)
            .args([
                "-r",
                path.to_str().unwrap(),
                "-T",
                "fields",
                "-E",
                "separator=|",
            ])
            .args(["-e", "frame.interface_name", "-e", "ip.src", "-e", "ip.dst"])
            .args(["-e", "icmp.type", "-e", "frame.comment"])
            .output()
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(
            rows,
            [
                "web-1|10.0.1.10|10.0.1.20|8|",
                "drops|10.0.1.10|10.0.1.20|8|drop: SgIngress by sg-web:ingress#no-match on host-a"
            ],
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn which(tool: &str) -> Result<std::path::PathBuf, ()> {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
            .ok_or(())
    }
}
