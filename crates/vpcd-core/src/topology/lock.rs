//! The lock file: the provider's allocations, made once and never recomputed.
//!
//! A basic-network instance's address is the provider's choice (docs/semantics.md, 2.10). It
//! is made the first time the instance appears and recorded here, beside the topology, as
//! Cargo.lock sits beside Cargo.toml: later changes (instances that come, go or migrate) never
//! move it, and every host that reads the same record agrees. An instance that moved from the
//! basic network into a VPC stays recorded as migrated, so that it cannot move back.
//!
//! ```toml
//! [[basic]]
//! instance = "alice-classic"
//! address = "10.128.0.37"
//! migrated = true        # only once it has moved into a VPC
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use serde::Deserialize;
use toml::Spanned;

use super::error::TopologyError;

/// One basic-network allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BasicAllocation {
    /// The address, for good.
    pub address: Ipv4Addr,
    /// The instance has moved into a VPC: it may never be a basic instance again, and its
    /// address is never given to another.
    pub migrated: bool,
}

/// Every allocation of a topology, by instance name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocations {
    /// Basic-network addresses.
    pub basic: BTreeMap<String, BasicAllocation>,
    /// The VIPs of load balancers that name none, by load balancer.
    pub vip: BTreeMap<String, Ipv4Addr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LockFile {
    #[serde(default)]
    basic: Vec<Spanned<LockBasic>>,
    #[serde(default)]
    vip: Vec<Spanned<LockVip>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LockVip {
    load_balancer: String,
    address: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LockBasic {
    instance: String,
    address: Spanned<String>,
    #[serde(default)]
    migrated: bool,
}

impl Allocations {
    /// No allocation at all (a topology compiled from scratch).
    pub fn none() -> Allocations {
        Allocations::default()
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.basic.is_empty() && self.vip.is_empty()
    }

    /// Reads a lock file's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Allocations, Vec<TopologyError>> {
        let err = |span: std::ops::Range<usize>, item: String, message: String| {
            let (line, column) = position(text, span.start);
            TopologyError {
                file: file.to_string(),
                line,
                column,
                item,
                message,
            }
        };
        let parsed: LockFile = toml::from_str(text).map_err(|e| {
            vec![err(
                e.span().unwrap_or(0..0),
                String::new(),
                e.message().trim_end().to_string(),
            )]
        })?;
        let mut out = Allocations::default();
        let mut errors = Vec::new();
        let mut owners: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
        for entry in &parsed.basic {
            let b = entry.get_ref();
            let item = format!("basic \"{}\"", b.instance);
            let Ok(address) = b.address.get_ref().parse::<Ipv4Addr>() else {
                let m = format!("address \"{}\" is not an IPv4 address", b.address.get_ref());
                errors.push(err(b.address.span(), item, m));
                continue;
            };
            if let Some(other) = owners.insert(address, b.instance.clone()) {
                let m = format!("address {address} is already instance \"{other}\"'s");
                errors.push(err(b.address.span(), item, m));
                continue;
            }
            let a = BasicAllocation {
                address,
                migrated: b.migrated,
            };
            if out.basic.insert(b.instance.clone(), a).is_some() {
                let m = "the instance is recorded twice".to_string();
                errors.push(err(entry.span(), item, m));
            }
        }
        for entry in &parsed.vip {
            let v = entry.get_ref();
            let item = format!("vip \"{}\"", v.load_balancer);
            match v.address.get_ref().parse::<Ipv4Addr>() {
                Ok(a) if out.vip.insert(v.load_balancer.clone(), a).is_none() => {}
                Ok(_) => errors.push(err(
                    entry.span(),
                    item,
                    "the load balancer is recorded twice".into(),
                )),
                Err(_) => {
                    let m = format!("address \"{}\" is not an IPv4 address", v.address.get_ref());
                    errors.push(err(v.address.span(), item, m));
                }
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }

    /// The lock file's text.
    pub fn render(&self, topology_file: &str) -> String {
        let mut s = format!(
            "# The provider's allocations for {topology_file}, written by `vpcd check` and never\n\
             # rewritten, only added to. Keep this file beside the topology and give every host\n\
             # the same copy.\n"
        );
        for (name, a) in &self.basic {
            let _ = write!(
                s,
                "\n[[basic]]\ninstance = {}\naddress = \"{}\"\n",
                toml_string(name),
                a.address
            );
            if a.migrated {
                s.push_str("migrated = true\n");
            }
        }
        for (name, a) in &self.vip {
            let _ = write!(
                s,
                "\n[[vip]]\nload_balancer = {}\naddress = \"{a}\"\n",
                toml_string(name)
            );
        }
        s
    }

    /// What `self` adds to `before`, one line per allocation, for people.
    pub fn changes_since(&self, before: &Allocations) -> Vec<String> {
        let mut out = Vec::new();
        for (name, a) in &self.basic {
            match before.basic.get(name) {
                None => out.push(format!("basic instance {name}: address {}", a.address)),
                Some(b) if b.migrated != a.migrated => out.push(format!(
                    "instance {name}: moved from the basic network into a VPC (one-way)"
                )),
                Some(_) => {}
            }
        }
        for (name, a) in &self.vip {
            if before.vip.get(name) != Some(a) {
                out.push(format!("load balancer {name}: VIP {a}"));
            }
        }
        out
    }
}

/// A TOML basic string (names are free text).
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_round_trips() {
        let mut a = Allocations::none();
        a.basic.insert(
            "alice \"classic\"".into(),
            BasicAllocation {
                address: Ipv4Addr::new(10, 128, 0, 5),
                migrated: false,
            },
        );
        a.basic.insert(
            "moved".into(),
            BasicAllocation {
                address: Ipv4Addr::new(10, 128, 0, 6),
                migrated: true,
            },
        );
        let text = a.render("lab.toml");
        assert_eq!(Allocations::parse(&text, "lab.lock").unwrap(), a);
        assert!(Allocations::parse("", "lab.lock").unwrap().is_empty());
    }

    #[test]
    fn lock_errors_name_the_file_and_line() {
        let text = "[[basic]]\ninstance = \"a\"\naddress = \"10.128.0.5\"\n\n[[basic]]\ninstance = \"b\"\naddress = \"10.128.0.5\"\n";
        let e = Allocations::parse(text, "lab.lock").unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].file.as_str(), e[0].line), ("lab.lock", 7));
        assert!(e[0].message.contains("already instance \"a\"'s"), "{e:?}");
        let e =
            Allocations::parse("[[basic]]\ninstance = \"a\"\naddress = \"x\"\n", "l").unwrap_err();
        assert!(e[0].message.contains("not an IPv4 address"));
        let e =
            Allocations::parse("[[basic]]\ninstance = \"a\"\nadress = \"x\"\n", "l").unwrap_err();
        assert!(e[0].message.contains("unknown field"), "{e:?}");
    }
}
