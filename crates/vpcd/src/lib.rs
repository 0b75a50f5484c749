//! vpcd: the Linux edge of a userspace data plane for virtual private clouds, around the pure
//! core [`vpcd_core`] (re-exported here, so `vpcd::topology` is `vpcd_core::topology`):
//!
//! - [`io`]: TUN devices, the underlay sockets, netlink and network namespaces;
//! - [`daemon`]: `vpcd run`, its workers, reloads and counters;
//! - [`lab`]: the namespace lab (`vpcd lab`);
//! - [`files`]: reading a topology and its lock file from disk;
//! - [`desired`]: the region's desired state in the store: what an apply writes, changes
//!   and refuses; [`layout`]: the state cut into items, scopes and each host's share;
//!   `store` (feature `store`): its reads, writes and watch on etcd;
//! - [`capture`]: packet capture to pcapng;
//! - [`clock`]: the monotonic clock that stamps packets;
//! - [`control`]: the control socket (`vpcd ctl`);
//! - [`metrics`]: the counters in the Prometheus text format, and their HTTP endpoint;
//! - [`trace`]: `vpcd trace`, a packet followed through every host's decision.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod capture;
pub mod clock;
pub mod control;
pub mod daemon;
pub mod desired;
pub mod files;
pub mod io;
pub mod lab;
pub mod layout;
pub mod metrics;
#[cfg(feature = "store")]
pub mod store;
pub mod trace;

pub use vpcd_core::{Action, Decision, DropReason, Dropped, Ingress, Pipeline, RuleRef};
pub use vpcd_core::{Timestamp, Topology};
pub use vpcd_core::{ids, pipeline, policy, reason, time, topology, wire};
