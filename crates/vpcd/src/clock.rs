//! The monotonic clock of the I/O edge: the one place that turns [`Instant`] into the core's
//! [`Timestamp`].

use std::time::Instant;

use vpcd_core::Timestamp;

/// A monotonic clock for the I/O edge: the one place that turns `std::time::Instant` into
/// [`Timestamp`].
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        MonotonicClock {
            origin: Instant::now(),
        }
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.origin.elapsed().as_millis() as u64)
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}
