//! The topology: the TOML file every host reads, its validation with line-accurate errors, and
//! its compiled form with the lookup tables the pipeline uses.

mod compile;
mod error;
pub mod file;
mod model;
#[cfg(test)]
mod tests;

pub use error::{LoadError, TopologyError};
pub use model::*;

use std::path::Path;

impl Topology {
    /// Reads and validates a topology file.
    pub fn load(path: &Path) -> Result<Topology, LoadError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            file: file.clone(),
            source,
        })?;
        Topology::parse(&text, &file)
    }

    /// Validates topology text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Topology, LoadError> {
        compile::compile(text, file).map_err(LoadError::Invalid)
    }
}
