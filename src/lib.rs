//! vpcd: a userspace data plane for virtual private clouds.
//!
//! The crate is layered in the order a packet lives it:
//!
//! - [`wire`]: packet views and in-place builders (IPv4, GRE, GRE-in-UDP, ICMP);
//! - [`topology`]: the TOML topology file, its validation and its compiled lookup tables;
//! - [`policy`]: route tables, network ACLs, security groups and connection tracking;
//! - [`pipeline`]: the decision: packet + where it came from + now → deliver, encapsulate or
//!   drop with a reason.
//!
//! Everything above is pure: no I/O, no clock. The Linux backends (TUN devices, the underlay
//! sockets, the daemon and the namespace lab) sit around it.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod daemon;
pub mod io;
pub mod lab;
pub mod pipeline;
pub mod policy;
pub mod reason;
pub mod time;
pub mod topology;
pub mod wire;

pub use pipeline::{Action, Decision, Dropped, Ingress, Pipeline, RuleRef};
pub use reason::DropReason;
pub use time::Timestamp;
pub use topology::Topology;
