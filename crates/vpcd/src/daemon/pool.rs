//! Recycled packet buffers, shared by the readers (which take) and the workers (which give
//! back). Buffers are allocated zeroed, so their pages are only committed once written.

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::wire::PacketBuf;
use crate::wire::buf::DEFAULT_CAPACITY;

/// Buffers kept for reuse at most; beyond that they are freed.
pub const POOL_SIZE: usize = 2048;

/// A pool of buffers.
#[derive(Clone)]
pub struct Pool {
    give: Sender<PacketBuf>,
    take: Receiver<PacketBuf>,
}

impl Pool {
    /// An empty pool.
    pub fn new() -> Pool {
        let (give, take) = bounded(POOL_SIZE);
        Pool { give, take }
    }

    /// A buffer: a recycled one, or a new one.
    pub fn take(&self) -> PacketBuf {
        self.take
            .try_recv()
            .unwrap_or_else(|_| PacketBuf::new(DEFAULT_CAPACITY))
    }

    /// Gives a buffer back.
    pub fn put(&self, buf: PacketBuf) {
        let _ = self.give.try_send(buf);
    }
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new()
    }
}
