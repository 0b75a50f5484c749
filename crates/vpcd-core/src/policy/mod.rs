//! Policy: route tables, network ACLs, security groups and connection tracking.
//!
//! Pure functions and data: no I/O, and the current time is always an argument.

pub mod balance;
pub mod conntrack;
pub mod route;
pub mod rules;
