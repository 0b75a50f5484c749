//! Packet formats: checked views over borrowed bytes and in-place builders.
//!
//! Nothing here allocates per packet or reads a clock.

pub mod buf;
pub mod csum;
pub mod gre;
pub mod gro;
pub mod gso;
pub mod icmp;
pub mod ipv4;
pub mod nat;

pub use buf::{HEADROOM, PacketBuf};
