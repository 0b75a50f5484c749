//! The region's desired state as the control plane keeps it (docs/control-plane.md): the
//! topology's items and the provider's allocations, cut into scopes ([`crate::layout`]),
//! written together. What to write, what changes and what is refused are decided here, in
//! pure functions; `store` (feature `store`) only reads and writes the keys.

use std::collections::BTreeMap;

use vpcd_core::Topology;
use vpcd_core::topology::{Allocations, LoadError, live_refusals};

use crate::layout::{self, Writes};

/// Where the store is and how to log in: from flags or the environment, never from the
/// topology.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreOpts {
    /// `http://ADDR:2379`, or `https://...` (TLS with the client's own stack).
    pub url: String,
    /// `--store-user` (or `VPCD_STORE_USER`).
    pub user: Option<String>,
    /// `VPCD_STORE_PASSWORD` (never a flag: a flag shows in `ps`).
    pub password: Option<String>,
    /// `--store-ca`: the CA that signed the store's certificate (PEM).
    pub ca: Option<std::path::PathBuf>,
    /// `--store-cert`: this client's certificate (PEM), with `--store-key`.
    pub cert: Option<std::path::PathBuf>,
    /// `--store-key`: its private key (PEM).
    pub key: Option<std::path::PathBuf>,
}

/// What the store holds (the whole region, or a host's share), as read at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The topology text the items make ([`layout::assemble`]).
    pub topology: String,
    /// The allocations, in the lock file's format.
    pub allocations: String,
    /// The whole region: the generation (the revision of the apply that wrote it). A host's
    /// share: the revision it was read at (every change to the share up to it is in it).
    pub revision: i64,
    /// The items and shares as read, by key (what the next apply compares with).
    pub keys: BTreeMap<String, String>,
}

impl Stored {
    /// The state the stored `keys` make (`revision`: as [`Stored::revision`]).
    pub fn from_keys(keys: BTreeMap<String, String>, revision: i64) -> Stored {
        let items = keys
            .iter()
            .filter(|(k, _)| k.starts_with(layout::ITEM_PREFIX))
            .map(|(k, v)| (k.as_str(), v.as_str()));
        let (topology, allocations) = layout::assemble(items);
        Stored {
            topology,
            allocations,
            revision,
            keys,
        }
    }

    /// The name errors in the stored topology carry.
    pub fn topology_name(&self) -> String {
        format!("store:{}@{}", layout::PREFIX, self.revision)
    }

    /// The stored allocations, parsed.
    pub fn allocations(&self) -> Result<Allocations, LoadError> {
        let name = format!("store:{}allocations@{}", layout::PREFIX, self.revision);
        Allocations::parse(&self.allocations, &name).map_err(LoadError::Invalid)
    }

    /// The stored state validated, as a daemon loads it: a daemon never allocates, so a
    /// state whose allocations miss one is an error.
    pub fn topology(&self) -> anyhow::Result<Topology> {
        let t =
            Topology::parse_locked(&self.topology, &self.topology_name(), &self.allocations()?)?;
        if !t.unlocked.is_empty() {
            anyhow::bail!(
                "{}: the stored allocations do not record {}: `vpcd apply` records them",
                self.topology_name(),
                t.unlocked.join("; ")
            );
        }
        Ok(t)
    }
}

/// Where a daemon's watch of its share resumes: after revision `next - 1`, the state it
/// applied being `last`, over `scopes`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FollowFrom {
    /// The first revision to watch.
    pub next: i64,
    /// The revision of the state applied (not sent again).
    pub last: i64,
    /// The scopes of the share read.
    pub scopes: std::collections::BTreeSet<String>,
    /// The share's items as read (a change re-reads only the scopes it touched).
    pub keys: BTreeMap<String, String>,
}

/// What an apply would write, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The allocations to store (the lock file's text).
    pub allocations: String,
    /// The revision the plan was made from (0: the store was empty); the write succeeds only
    /// if the generation key still has it.
    pub base: i64,
    /// What changes, one line per item (`+ vpc "a"`, `- instance "b"`, `~ host "h1": address`)
    /// and per new allocation; empty when the store already holds this state.
    pub changes: Vec<String>,
    /// The keys to write and delete, and the scopes they touch.
    pub writes: Writes,
}

/// Why an apply cannot go ahead.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The file is invalid (the same errors as `vpcd check`).
    #[error("{0}")]
    Invalid(LoadError),
    /// The stored state does not load (it was written by something else than `vpcd apply`).
    #[error("the stored state is invalid: {0:#}")]
    Stored(anyhow::Error),
    /// The change cannot be made while the region runs (the same as a refused reload).
    #[error("refused, the stored state stays:\n{}", .0.join("\n"))]
    Refused(Vec<String>),
    /// The file cannot be cut into items (a table split over two places).
    #[error("{0}")]
    Cut(String),
}

/// The apply of `text` (named `file` in errors) over `current`. The allocations come from
/// the store, else (a first apply) from `lock`, the file's lock file: recorded ones are
/// kept, only new ones made.
pub fn plan(
    text: &str,
    file: &str,
    lock: &Allocations,
    current: Option<&Stored>,
) -> Result<Plan, PlanError> {
    let base = match current {
        Some(s) => s.allocations().map_err(|e| PlanError::Stored(e.into()))?,
        None => lock.clone(),
    };
    let new = Topology::parse_locked(text, file, &base).map_err(PlanError::Invalid)?;
    let mut changes = Vec::new();
    if let Some(s) = current {
        let old = s.topology().map_err(PlanError::Stored)?;
        let refusals = live_refusals(&old, &new);
        if !refusals.is_empty() {
            return Err(PlanError::Refused(refusals));
        }
        changes = item_changes(&s.topology, text);
    } else {
        changes.push("the store is empty: the whole topology is new".into());
        changes.extend(item_changes("", text));
    }
    changes.extend(new.unlocked.iter().map(|u| format!("+ allocation: {u}")));
    let items = layout::items(text, &new.allocations).map_err(PlanError::Cut)?;
    let empty = BTreeMap::new();
    let writes = layout::writes(
        current.map_or(&empty, |s| &s.keys),
        &layout::desired_keys(&items),
    );
    if changes.is_empty() && !writes.is_empty() {
        changes.push("~ the text only (comments or layout): no item changes".into());
    }
    if writes.is_empty() {
        changes.clear();
    }
    let name = std::path::Path::new(file)
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    Ok(Plan {
        allocations: new.allocations.render(&name),
        base: current.map_or(0, |s| s.revision),
        changes,
        writes,
    })
}

/// The items that differ between two valid topology texts, in file order of the kinds: a
/// `[[kind]]` entry is known by its `name` (else by its whole content), a `[table]` by its
/// header.
pub fn item_changes(old: &str, new: &str) -> Vec<String> {
    let (old, new) = (table(old), table(new));
    let mut keys: Vec<&String> = new.keys().collect();
    keys.extend(old.keys().filter(|k| !new.contains_key(*k)));
    let mut out = Vec::new();
    for k in keys {
        match (old.get(k), new.get(k)) {
            (Some(toml::Value::Array(a)), Some(toml::Value::Array(b))) => {
                entries(k, a, b, &mut out)
            }
            (None, Some(toml::Value::Array(b))) => entries(k, &[], b, &mut out),
            (Some(toml::Value::Array(a)), None) => entries(k, a, &[], &mut out),
            (None, Some(_)) => out.push(format!("+ [{k}]")),
            (Some(_), None) => out.push(format!("- [{k}]")),
            (Some(a), Some(b)) if a != b => {
                out.push(format!("~ [{k}]: {}", fields(a, b).join(", ")));
            }
            _ => {}
        }
    }
    out
}

fn table(text: &str) -> toml::Table {
    toml::from_str(text).unwrap_or_default()
}

/// `[[kind]]` entries added, removed and changed.
fn entries(kind: &str, old: &[toml::Value], new: &[toml::Value], out: &mut Vec<String>) {
    let by_id = |list: &[toml::Value]| -> BTreeMap<String, toml::Value> {
        list.iter().map(|v| (identity(v), v.clone())).collect()
    };
    let (before, after) = (by_id(old), by_id(new));
    for v in new {
        let id = identity(v);
        match before.get(&id) {
            None => out.push(format!("+ {kind} {id}")),
            Some(was) if was != v => {
                out.push(format!("~ {kind} {id}: {}", fields(was, v).join(", ")));
            }
            Some(_) => {}
        }
    }
    for v in old {
        let id = identity(v);
        if !after.contains_key(&id) {
            out.push(format!("- {kind} {id}"));
        }
    }
}

/// An entry's name (quoted), else its content inline.
fn identity(v: &toml::Value) -> String {
    match v.get("name") {
        Some(toml::Value::String(n)) => format!("{n:?}"),
        _ => match v.as_table() {
            Some(t) => format!("{{ {} }}", inline(t)),
            None => v.to_string(),
        },
    }
}

fn inline(t: &toml::Table) -> String {
    let parts: Vec<String> = t.iter().map(|(k, v)| format!("{k} = {v}")).collect();
    parts.join(", ")
}

/// The fields of two tables that differ.
fn fields(a: &toml::Value, b: &toml::Value) -> Vec<String> {
    let (Some(a), Some(b)) = (a.as_table(), b.as_table()) else {
        return vec!["changed".into()];
    };
    let mut names: Vec<&String> = b.keys().collect();
    names.extend(a.keys().filter(|k| !b.contains_key(*k)));
    names
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| k.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[[host]]
name = "h1"
address = "192.0.2.1"
[[host]]
name = "h2"
address = "192.0.2.2"
[basic]
cidr = "10.128.0.0/16"
[[security_group]]
name = "sg"
[[instance]]
name = "old-classic"
host = "h1"
network = "basic"
tenant = "alice"
security_groups = ["sg"]
[[vpc]]
name = "va"
tenant = "alice"
cidr = "10.0.0.0/16"
"#;

    fn stored(text: &str, revision: i64) -> Stored {
        let p = plan(text, "t.toml", &Allocations::none(), None).unwrap();
        Stored::from_keys(p.writes.puts.into_iter().collect(), revision)
    }

    #[test]
    fn a_first_apply_makes_the_allocations_and_lists_every_item() {
        let p = plan(BASE, "t.toml", &Allocations::none(), None).unwrap();
        assert_eq!(p.base, 0);
        assert!(
            p.changes.contains(&"+ host \"h1\"".to_string()),
            "{:?}",
            p.changes
        );
        assert!(p.changes.contains(&"+ vpc \"va\"".to_string()));
        assert!(
            p.changes
                .iter()
                .any(|c| c.starts_with("+ allocation: basic instance old-classic")),
            "{:?}",
            p.changes
        );
        let a = Allocations::parse(&p.allocations, "t.lock").unwrap();
        assert!(a.basic.contains_key("old-classic"));
    }

    #[test]
    fn allocations_never_move_when_another_item_changes() {
        let s = stored(BASE, 5);
        let before = s.allocations().unwrap().basic["old-classic"];
        // A new basic instance, listed first, would take the first free address on a fresh
        // allocation; the recorded one keeps its own.
        let more = BASE.replace(
            "[[instance]]\nname = \"old-classic\"",
            "[[instance]]\nname = \"new-classic\"\nhost = \"h2\"\nnetwork = \"basic\"\ntenant = \"bob\"\nsecurity_groups = [\"sg\"]\n[[instance]]\nname = \"old-classic\"",
        );
        let p = plan(&more, "t.toml", &Allocations::none(), Some(&s)).unwrap();
        let after = Allocations::parse(&p.allocations, "t.lock").unwrap();
        assert_eq!(after.basic["old-classic"], before);
        assert_ne!(after.basic["new-classic"].address, before.address);
        assert_eq!(p.base, 5);
        assert!(
            p.changes
                .contains(&"+ instance \"new-classic\"".to_string()),
            "{:?}",
            p.changes
        );
    }

    #[test]
    fn an_unchanged_apply_changes_nothing() {
        let s = stored(BASE, 3);
        let p = plan(BASE, "t.toml", &Allocations::none(), Some(&s)).unwrap();
        assert!(p.changes.is_empty(), "{:?}", p.changes);
        assert!(p.writes.is_empty(), "{:?}", p.writes);
        let a = |text: &str| Allocations::parse(text, "t.lock").unwrap();
        assert_eq!(a(&p.allocations), a(&s.allocations));
        let commented = format!("# a comment\n{BASE}");
        let p = plan(&commented, "t.toml", &Allocations::none(), Some(&s)).unwrap();
        assert_eq!(
            p.changes,
            vec!["~ the text only (comments or layout): no item changes"]
        );
    }

    #[test]
    fn what_cannot_change_live_is_refused_as_a_reload_is() {
        let s = stored(BASE, 3);
        let moved = BASE.replace("192.0.2.2", "192.0.2.9");
        let Err(PlanError::Refused(r)) = plan(&moved, "t.toml", &Allocations::none(), Some(&s))
        else {
            panic!("not refused");
        };
        let old = s.topology().unwrap();
        let new = Topology::parse(&moved, "t.toml").unwrap();
        assert_eq!(r, live_refusals(&old, &new));
        assert!(
            r[0].contains("host \"h2\" cannot change its address"),
            "{r:?}"
        );
    }

    #[test]
    fn an_invalid_file_gives_the_check_errors() {
        let bad = format!("{BASE}[[vpc]]\nname = \"va\"\ntenant = \"x\"\ncidr = \"10.1.0.0/16\"\n");
        let Err(PlanError::Invalid(e)) = plan(&bad, "t.toml", &Allocations::none(), None) else {
            panic!("accepted");
        };
        let check = Topology::parse(&bad, "t.toml").unwrap_err();
        assert_eq!(e.to_string(), check.to_string());
    }

    #[test]
    fn item_changes_name_the_fields() {
        let changed = BASE.replace("cidr = \"10.0.0.0/16\"", "cidr = \"10.0.0.0/16\"\nkey = 9");
        assert_eq!(
            item_changes(BASE, &changed),
            vec!["~ vpc \"va\": key".to_string()]
        );
        let gone = BASE.replace("[basic]\ncidr = \"10.128.0.0/16\"\n", "");
        assert!(item_changes(BASE, &gone).contains(&"- [basic]".to_string()));
        let peer = "[[peering]]\nvpcs = [\"va\", \"vb\"]\n";
        assert_eq!(
            item_changes("", peer),
            vec!["+ peering { vpcs = [\"va\", \"vb\"] }".to_string()]
        );
    }
}
