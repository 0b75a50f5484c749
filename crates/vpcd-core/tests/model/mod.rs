//! A reference model of vpcd's forwarding decision, and the generators that feed it.
//!
//! The model ([`eval::Model`], its policy half in [`policy`]) is written from the
//! specification (docs/semantics.md, Part 2) alone: its own parsers ([`wire`]), its own
//! connection table ([`conntrack`]: nf_conntrack's TCP table written out, the limits with
//! their eviction), linear scans over the topology's public fields, no cache. The decisions
//! the specification leaves open are comments starting with `SPEC:`. The generators draw
//! small topologies ([`topo`]) and packet sequences ([`ops`], with the multi-step [`units`])
//! whose packets are built by [`build`].

#![allow(dead_code)]

pub mod build;
pub mod conntrack;
pub mod eval;
pub mod ops;
pub mod policy;
pub mod topo;
pub mod units;
pub mod wire;
