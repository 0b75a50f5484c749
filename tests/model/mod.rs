//! A reference model of vpcd's forwarding decision, and the generators that feed it.
//!
//! The model ([`eval::Model`]) is written from the specification alone: its own parsers
//! ([`wire`]), its own connection table ([`conntrack`]), linear scans over the topology's public
//! fields, no cache. The generators draw small topologies ([`topo`]) and packet sequences
//! ([`ops`]) whose packets are built by [`build`].

#![allow(dead_code)]

pub mod build;
pub mod conntrack;
pub mod eval;
pub mod ops;
pub mod topo;
pub mod wire;
