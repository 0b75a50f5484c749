//! A packet buffer with headroom: encapsulation prepends headers in place, decapsulation only
//! moves the start offset. The payload never moves.

/// Bytes kept free in front of a packet read from an instance: outer IPv4 (20) + UDP (8) +
/// GRE with checksum and key (12) = 40, rounded up, plus room for a virtio-net header (12).
pub const HEADROOM: usize = 64;

/// The largest packet a buffer holds by default: a TUN super-packet of 64 KiB.
pub const DEFAULT_CAPACITY: usize = 65536;

/// A packet stored at `storage[start..end]`, with `start` bytes of headroom before it.
#[derive(Clone)]
pub struct PacketBuf {
    storage: Box<[u8]>,
    start: usize,
    end: usize,
}

/// Not enough headroom left to prepend a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("packet buffer has {available} bytes of headroom, {needed} needed")]
pub struct NoHeadroom {
    /// Bytes that were asked for.
    pub needed: usize,
    /// Bytes that were free.
    pub available: usize,
}

impl PacketBuf {
    /// An empty buffer holding up to `capacity` packet bytes after [`HEADROOM`].
    pub fn new(capacity: usize) -> Self {
        PacketBuf {
            storage: vec![0u8; HEADROOM + capacity].into_boxed_slice(),
            start: HEADROOM,
            end: HEADROOM,
        }
    }

    /// A buffer holding a copy of `packet` after the standard headroom (tests, the lab).
    pub fn from_packet(packet: &[u8]) -> Self {
        let mut b = PacketBuf::new(packet.len());
        b.storage[HEADROOM..HEADROOM + packet.len()].copy_from_slice(packet);
        b.end = HEADROOM + packet.len();
        b
    }

    /// The packet bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.end]
    }

    /// The packet bytes, writable.
    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.end]
    }

    /// Packet length.
    #[inline]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// True when the buffer holds no packet bytes.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Free bytes in front of the packet.
    #[inline]
    pub fn headroom(&self) -> usize {
        self.start
    }

    /// Offset of the packet's first byte within the storage.
    #[inline]
    pub fn start(&self) -> usize {
        self.start
    }

    /// Grows the packet by `n` bytes at the front and returns them (to be written by the
    /// caller). The existing bytes stay where they are.
    #[inline]
    pub fn push_front(&mut self, n: usize) -> Result<&mut [u8], NoHeadroom> {
        if n > self.start {
            return Err(NoHeadroom {
                needed: n,
                available: self.start,
            });
        }
        self.start -= n;
        Ok(&mut self.storage[self.start..self.start + n])
    }

    /// Removes `n` bytes from the front (decapsulation). `n` is clamped to the packet length.
    #[inline]
    pub fn pull_front(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }

    /// Shortens the packet to `len` bytes; longer lengths are ignored.
    #[inline]
    pub fn truncate(&mut self, len: usize) {
        if len < self.len() {
            self.end = self.start + len;
        }
    }

    /// The whole storage for a read that places the packet at `offset` (usually
    /// [`HEADROOM`]); follow with [`PacketBuf::set_filled`].
    #[inline]
    pub fn read_area(&mut self, offset: usize) -> &mut [u8] {
        let offset = offset.min(self.storage.len());
        &mut self.storage[offset..]
    }

    /// Declares that a read placed `len` bytes at `offset`.
    #[inline]
    pub fn set_filled(&mut self, offset: usize, len: usize) {
        let offset = offset.min(self.storage.len());
        self.start = offset;
        self.end = (offset + len).min(self.storage.len());
    }

    /// Sets the packet length to `len`, filling new bytes with `value`; clamped to the
    /// storage.
    pub fn resize(&mut self, len: usize, value: u8) {
        let end = (self.start + len).min(self.storage.len());
        if end > self.end {
            self.storage[self.end..end].fill(value);
        }
        self.end = end;
    }

    /// Appends bytes at the end, as many as the storage has room for.
    pub fn extend_from_slice(&mut self, src: &[u8]) {
        let n = src.len().min(self.storage.len() - self.end);
        self.storage[self.end..self.end + n].copy_from_slice(&src[..n]);
        self.end += n;
    }
}

impl std::fmt::Debug for PacketBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketBuf")
            .field("start", &self.start)
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_and_pull_move_only_the_offset() {
        let mut b = PacketBuf::from_packet(&[1, 2, 3, 4]);
        let payload_addr = b.as_slice().as_ptr();
        b.push_front(8).unwrap().fill(0xee);
        assert_eq!(b.len(), 12);
        assert_eq!(&b.as_slice()[8..], &[1, 2, 3, 4]);
        assert_eq!(b.as_slice()[8..].as_ptr(), payload_addr);
        b.pull_front(8);
        assert_eq!(b.as_slice(), &[1, 2, 3, 4]);
        assert_eq!(b.as_slice().as_ptr(), payload_addr);
    }

    #[test]
    fn push_beyond_headroom_is_refused() {
        let mut b = PacketBuf::from_packet(&[0; 10]);
        let err = b.push_front(HEADROOM + 1).unwrap_err();
        assert_eq!(err.available, HEADROOM);
        assert_eq!(b.len(), 10);
    }

    #[test]
    fn pull_and_truncate_clamp() {
        let mut b = PacketBuf::from_packet(&[0; 10]);
        b.truncate(50);
        assert_eq!(b.len(), 10);
        b.pull_front(50);
        assert!(b.is_empty());
    }
}
