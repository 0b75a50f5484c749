//! Topology and lock files on disk; the core parses text ([`Topology::parse_locked`]).

use std::path::Path;

use vpcd_core::Topology;
use vpcd_core::topology::{Allocations, LoadError, lock_path};

/// Reads a lock file; a missing one holds nothing.
pub fn read_lock(path: &Path) -> Result<Allocations, LoadError> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Allocations::parse(&text, &file).map_err(LoadError::Invalid),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Allocations::none()),
        Err(source) => Err(LoadError::Io { file, source }),
    }
}

/// Reads and validates a topology file with the lock file beside it
/// ([`Topology::unlocked`] lists what the lock does not record yet).
pub fn load_topology(path: &Path) -> Result<Topology, LoadError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        file: file.clone(),
        source,
    })?;
    let lock = read_lock(&lock_path(path))?;
    Topology::parse_locked(&text, &file, &lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_HOST: &str = "[[host]]\nname = \"h1\"\naddress = \"192.0.2.1\"\n";

    #[test]
    fn load_reads_the_file_or_names_it() {
        let missing = Path::new("/nonexistent/vpcd/topology.toml");
        let err = load_topology(missing).unwrap_err();
        assert!(matches!(err, LoadError::Io { .. }));
        assert!(err.errors().is_empty());
        assert!(
            err.to_string()
                .starts_with("/nonexistent/vpcd/topology.toml: ")
        );

        let path =
            std::env::temp_dir().join(format!("vpcd-topology-test-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            format!("{ONE_HOST}[[host]]\nname = \"h1\"\naddress = \"192.0.2.2\"\n"),
        )
        .unwrap();
        let err = load_topology(&path).unwrap_err();
        std::fs::write(&path, ONE_HOST).unwrap();
        let ok = load_topology(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(err.errors()[0].file, path.display().to_string());
        assert_eq!(ok.unwrap().file, path.display().to_string());
    }
}
