//! vpcd-core: the pure core of vpcd, a userspace data plane for virtual private clouds.
//!
//! Layered in the order a packet lives it:
//!
//! - [`ids`]: the typed ids of the topology's hosts, VPCs, subnets, instances...;
//! - [`wire`]: packet views and in-place builders (IPv4, GRE, GRE-in-UDP, ICMP);
//! - [`topology`]: the TOML topology text, its validation and its compiled lookup tables;
//! - [`policy`]: route tables, network ACLs, security groups and connection tracking;
//! - [`pipeline`]: the decision: packet + where it came from + now → deliver, encapsulate or
//!   drop with a reason.
//!
//! Nothing here makes a system call: no files, sockets, threads or clocks (time and seeds are
//! passed in), and no `unsafe`. The compiler checks it: this crate depends on no system crate
//! and forbids unsafe code. The Linux edge is the `vpcd` crate.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod ids;
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
