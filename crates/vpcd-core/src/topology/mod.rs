//! The topology: the TOML file every host reads, its validation with line-accurate errors, and
//! its compiled form with the lookup tables the pipeline uses.

mod compile;
mod error;
pub mod file;
pub mod lock;
mod model;
mod reload;
#[cfg(test)]
mod tests;

pub use error::{LoadError, TopologyError};
pub use lock::{Allocations, BasicAllocation};
pub use model::*;
pub use reload::live_refusals;

use std::path::{Path, PathBuf};

/// The lock file beside a topology file: `lab.toml` → `lab.lock`.
pub fn lock_path(topology: &Path) -> PathBuf {
    topology.with_extension("lock")
}

impl Topology {
    /// Validates topology text; `file` names it in errors. The provider's allocations are
    /// made from scratch (no lock file).
    pub fn parse(text: &str, file: &str) -> Result<Topology, LoadError> {
        Topology::parse_locked(text, file, &Allocations::none())
    }

    /// Validates topology text against the allocations of its lock file: recorded ones are
    /// kept, new ones made ([`Topology::allocations`] holds them all).
    pub fn parse_locked(text: &str, file: &str, lock: &Allocations) -> Result<Topology, LoadError> {
        let mut t = compile::compile(text, file, lock).map_err(LoadError::Invalid)?;
        t.unlocked = t.allocations.changes_since(lock);
        Ok(t)
    }
}
