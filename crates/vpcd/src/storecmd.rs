//! `vpcd apply` and `vpcd get`: the region's desired state in the store
//! (docs/control-plane.md). Without the `store` feature they say how to build it.

use std::path::Path;
use std::process::ExitCode;

use vpcd::desired::StoreOpts;

/// What a build without the feature says.
pub const NO_STORE: &str = "this vpcd was built without store support: build it with `cargo build --release --features vpcd/store` (needs protoc: apt-get install protobuf-compiler libprotobuf-dev)";

/// Prints `e` (a topology's errors) as `vpcd check` does, with their count.
fn print_load_error(e: &vpcd::topology::LoadError) {
    errln!("{e}");
    let n = e.errors().len();
    if n > 0 {
        errln!("{n} error{}", if n == 1 { "" } else { "s" });
    }
}

/// `vpcd apply FILE --store URL [--dry-run]`.
pub fn apply(file: &Path, store: Option<StoreOpts>, dry_run: bool) -> ExitCode {
    let Some(store) = store else {
        errln!("vpcd apply: say where the store is: --store URL (or VPCD_STORE)");
        return ExitCode::from(2);
    };
    let name = file.display().to_string();
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            errln!("{name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let lock = match vpcd::files::read_lock(&vpcd::topology::lock_path(file)) {
        Ok(l) => l,
        Err(e) => {
            print_load_error(&e);
            return ExitCode::FAILURE;
        }
    };
    // Exactly `vpcd check`'s validation first, so that its errors come without a store.
    if let Err(e) = vpcd::Topology::parse_locked(&text, &name, &lock) {
        print_load_error(&e);
        return ExitCode::FAILURE;
    }
    imp::apply(&text, &name, &lock, &store, dry_run)
}

/// `vpcd get --store URL [--json] [--out FILE]`.
pub fn get(store: Option<StoreOpts>, json: bool, out: Option<&Path>) -> ExitCode {
    let Some(store) = store else {
        errln!("vpcd get: say where the store is: --store URL (or VPCD_STORE)");
        return ExitCode::from(2);
    };
    imp::get(&store, json, out)
}

/// `vpcd get --store URL --hosts [--json]`.
pub fn hosts(store: Option<StoreOpts>, json: bool) -> ExitCode {
    let Some(store) = store else {
        errln!("vpcd get: say where the store is: --store URL (or VPCD_STORE)");
        return ExitCode::from(2);
    };
    imp::hosts(&store, json)
}

#[cfg(not(feature = "store"))]
mod imp {
    use super::*;

    pub fn hosts(_: &StoreOpts, _: bool) -> ExitCode {
        errln!("vpcd get: {NO_STORE}");
        ExitCode::from(2)
    }

    pub fn apply(
        _: &str,
        _: &str,
        _: &vpcd::topology::Allocations,
        _: &StoreOpts,
        _: bool,
    ) -> ExitCode {
        errln!("vpcd apply: {NO_STORE}");
        ExitCode::from(2)
    }

    pub fn get(_: &StoreOpts, _: bool, _: Option<&Path>) -> ExitCode {
        errln!("vpcd get: {NO_STORE}");
        ExitCode::from(2)
    }
}

#[cfg(feature = "store")]
mod imp {
    use super::*;
    use anyhow::Context as _;
    use vpcd::desired::{PlanError, plan};
    use vpcd::store;

    fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }

    pub fn apply(
        text: &str,
        name: &str,
        lock: &vpcd::topology::Allocations,
        o: &StoreOpts,
        dry_run: bool,
    ) -> ExitCode {
        match runtime().map_err(anyhow::Error::from).and_then(|rt| {
            rt.block_on(async {
                let mut c = store::connect(o).await?;
                let read = store::read(&mut c, 0)
                    .await
                    .with_context(|| format!("store {}", o.url))?;
                let p = match plan(text, name, lock, read.stored.as_ref()) {
                    Ok(p) => p,
                    Err(PlanError::Invalid(e)) => {
                        print_load_error(&e);
                        return Ok(ExitCode::FAILURE);
                    }
                    Err(e) => anyhow::bail!("{e}"),
                };
                write(&mut c, &p, dry_run).await
            })
        }) {
            Ok(code) => code,
            Err(e) => {
                errln!("vpcd apply: {e:#}");
                ExitCode::FAILURE
            }
        }
    }

    async fn write(
        c: &mut etcd_client::Client,
        p: &vpcd::desired::Plan,
        dry_run: bool,
    ) -> anyhow::Result<ExitCode> {
        if p.changes.is_empty() {
            outln!(
                "up to date: the store holds this state (revision {})",
                p.base
            );
            return Ok(ExitCode::SUCCESS);
        }
        if dry_run {
            outln!(
                "would change (store at revision {}), nothing written:",
                p.base
            );
        } else {
            let revision = store::write(c, p).await?;
            outln!("applied: revision {revision} (was {}):", p.base);
        }
        for line in &p.changes {
            outln!("  {line}");
        }
        Ok(ExitCode::SUCCESS)
    }

    /// Each host: the revision its daemon applied, the newest change to its share, and
    /// whether it is current; then whether the region has converged. Exit 1 when not.
    pub fn hosts(o: &StoreOpts, json: bool) -> ExitCode {
        let got = runtime().map_err(anyhow::Error::from).and_then(|rt| {
            rt.block_on(async { store::convergence(&store::connect(o).await?).await })
        });
        let (hosts, generation) = match got {
            Ok(g) => g,
            Err(e) => {
                errln!("vpcd get: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        let converged = hosts.iter().all(|h| h.current());
        if json {
            let list: Vec<serde_json::Value> = hosts
                .iter()
                .map(|h| serde_json::json!({"host": h.host, "applied": h.applied, "needs": h.needs, "current": h.current()}))
                .collect();
            let v = serde_json::json!({"generation": generation, "converged": converged, "hosts": list});
            outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else {
            outln!("generation {generation}");
            for h in &hosts {
                let applied = h.applied.map_or("-".to_string(), |a| a.to_string());
                let state = if h.current() { "current" } else { "behind" };
                outln!(
                    "  {:<16} applied {applied:>8}  share changed at {:>8}  {state}",
                    h.host,
                    h.needs
                );
            }
            let n = hosts.iter().filter(|h| h.current()).count();
            outln!(
                "{}: {n} of {} hosts current",
                if converged {
                    "converged"
                } else {
                    "not converged"
                },
                hosts.len()
            );
        }
        if converged {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }

    pub fn get(o: &StoreOpts, json: bool, out: Option<&Path>) -> ExitCode {
        let read = runtime().map_err(anyhow::Error::from).and_then(|rt| {
            rt.block_on(async { store::read(&mut store::connect(o).await?, 0).await })
                .with_context(|| format!("store {}", o.url))
        });
        let stored = match read {
            Ok(r) => match r.stored {
                Some(s) => s,
                None => {
                    errln!("vpcd get: the store holds no state yet: `vpcd apply FILE --store URL`");
                    return ExitCode::FAILURE;
                }
            },
            Err(e) => {
                errln!("vpcd get: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(path) = out {
            return write_files(&stored, path);
        }
        if json {
            let v = serde_json::json!({
                "revision": stored.revision,
                "topology": stored.topology,
                "allocations": stored.allocations,
            });
            outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else {
            out!("{}", with_allocations(&stored));
        }
        ExitCode::SUCCESS
    }

    /// The topology text, then the allocations as comments (the lock file's text), so one
    /// output holds both; `--out FILE` writes them as FILE and its lock file.
    fn with_allocations(s: &vpcd::desired::Stored) -> String {
        let mut text = s.topology.clone();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!(
            "\n# vpcd get: revision {}. The allocations (the lock file beside this file; `vpcd get --out FILE` writes both):\n",
            s.revision
        ));
        for line in s.allocations.lines() {
            text.push_str(&format!("#| {line}\n"));
        }
        text
    }

    fn write_files(s: &vpcd::desired::Stored, path: &Path) -> ExitCode {
        let lock = vpcd::topology::lock_path(path);
        let wrote = std::fs::write(path, &s.topology)
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|()| {
                std::fs::write(&lock, &s.allocations)
                    .map_err(|e| format!("{}: {e}", lock.display()))
            });
        match wrote {
            Ok(()) => {
                outln!(
                    "revision {}: wrote {} and {}",
                    s.revision,
                    path.display(),
                    lock.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                errln!("vpcd get: {e}");
                ExitCode::FAILURE
            }
        }
    }
}
