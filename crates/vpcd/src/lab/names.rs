//! The lab's namespaces: every one carries the lab's prefix, so that two labs (of the same
//! topology, or `lab demo` beside a running lab) never meet.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};

use super::Lab;
use crate::topology::Topology;

/// `text` with every `netns` (the instances' and the internet's) prefixed with `prefix`: the
/// topology the lab's daemons read. A name that already starts with the prefix is kept, so
/// the rewrite can be applied twice (and a test may name a lab's namespaces itself).
/// Comments are lost; everything else means what it meant.
pub fn prefixed_topology(text: &str, source: &str, prefix: &str) -> Result<String> {
    let mut doc: toml::Table = text
        .parse()
        .with_context(|| format!("{source}: not TOML"))?;
    if let Some(toml::Value::Array(instances)) = doc.get_mut("instance") {
        for i in instances.iter_mut().filter_map(toml::Value::as_table_mut) {
            prefix_netns(i, prefix);
        }
    }
    if let Some(toml::Value::Table(internet)) = doc.get_mut("internet") {
        prefix_netns(internet, prefix);
    }
    let body = toml::to_string(&doc).with_context(|| format!("{source}: rewriting"))?;
    Ok(format!(
        "# {source}, as the lab runs it: every netns prefixed with {prefix}\n\n{body}"
    ))
}

fn prefix_netns(t: &mut toml::Table, prefix: &str) {
    if let Some(toml::Value::String(ns)) = t.get_mut("netns")
        && !ns.starts_with(prefix)
    {
        *ns = format!("{prefix}{ns}");
    }
}

impl Lab {
    /// Refuses what the lab cannot build from `t` (its namespaces already prefixed): nothing
    /// to run, an instance or the internet without a namespace, or one namespace for two
    /// things.
    pub(crate) fn validate(&self, t: &Topology, source: &str) -> Result<()> {
        if t.hosts.is_empty() || t.instances.is_empty() {
            bail!(
                "{source}: an empty topology ({} hosts, {} instances): a lab needs at least one host and one instance",
                t.hosts.len(),
                t.instances.len()
            );
        }
        if t.internet.as_ref().is_some_and(|i| i.netns.is_none()) {
            bail!(
                "{source}: [internet] has no netns: the lab puts the internet in a namespace of its own"
            );
        }
        if let Some(i) = t.instances.iter().find(|i| i.netns.is_none()) {
            bail!(
                "{source}: instance \"{}\" has no netns: the lab puts every instance in a namespace of its own",
                i.name
            );
        }
        let mut users: BTreeMap<String, String> = BTreeMap::new();
        for (ns, user) in self.namespaces(t) {
            if let Some(first) = users.insert(ns.clone(), user.clone()) {
                bail!(
                    "{source}: {first} and {user} would share the namespace {ns}: give them other netns names"
                );
            }
        }
        Ok(())
    }

    /// Every namespace the lab makes for `t`, with what it is for.
    pub(crate) fn namespaces(&self, t: &Topology) -> Vec<(String, String)> {
        let mut all = vec![(self.underlay_ns(), "the underlay".to_string())];
        for h in &t.hosts {
            all.push((self.host_ns(&h.name), format!("host \"{}\"", h.name)));
        }
        for i in &t.instances {
            let ns = i.netns.clone().unwrap_or_default();
            all.push((ns, format!("instance \"{}\"", i.name)));
        }
        if let Some(ns) = t.internet.as_ref().and_then(|i| i.netns.clone()) {
            all.push((ns, "the internet".to_string()));
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default topology, prefixed: the same region, every namespace renamed and nothing
    /// else; prefixing twice changes nothing more.
    #[test]
    fn prefixing_renames_the_namespaces_only() {
        let text = super::super::DEFAULT_TOPOLOGY;
        let plain = Topology::parse(text, "lab.toml").unwrap();
        let once = prefixed_topology(text, "lab.toml", "vpcd-x-").unwrap();
        let twice = prefixed_topology(&once, "lab.toml", "vpcd-x-").unwrap();
        assert_eq!(once, twice);
        let p = Topology::parse(&once, "lab.toml").unwrap();
        assert_eq!(p.instances.len(), plain.instances.len());
        for (a, b) in plain.instances.iter().zip(&p.instances) {
            assert_eq!((&a.name, a.ip, a.eip), (&b.name, b.ip, b.eip));
            assert_eq!(
                b.netns.as_deref(),
                Some(format!("vpcd-x-{}", a.netns.as_deref().unwrap()).as_str())
            );
        }
        let inet = p.internet.as_ref().unwrap();
        assert_eq!(inet.netns.as_deref(), Some("vpcd-x-internet"));
        assert_eq!(p.expects.len(), plain.expects.len());
        assert_eq!(p.security_groups.len(), plain.security_groups.len());
        // The rules are the same but for the lines they are on.
        let lineless = |d: String| {
            d.split("line: ")
                .enumerate()
                .map(|(k, part)| {
                    if k == 0 {
                        part
                    } else {
                        part.trim_start_matches(|c: char| c.is_ascii_digit())
                    }
                })
                .collect::<String>()
        };
        assert_eq!(
            lineless(format!("{:?}", p.security_groups)),
            lineless(format!("{:?}", plain.security_groups))
        );
        assert_eq!(
            lineless(format!("{:?}", p.acls)),
            lineless(format!("{:?}", plain.acls))
        );
        assert_eq!(format!("{:?}", p.vpcs), format!("{:?}", plain.vpcs));
        assert_eq!(
            lineless(format!("{:?}", p.expects)),
            lineless(format!("{:?}", plain.expects))
        );
    }

    /// An instance whose netns would be a host's namespace is refused, naming both.
    #[test]
    fn one_namespace_for_two_things_is_refused() {
        let lab = Lab::new("x").unwrap();
        let text =
            super::super::DEFAULT_TOPOLOGY.replace("netns = \"bob-db\"", "netns = \"host-b\"");
        let t =
            Topology::parse(&prefixed_topology(&text, "f", &lab.prefix()).unwrap(), "f").unwrap();
        let e = lab.validate(&t, "f").unwrap_err().to_string();
        assert!(e.contains("host \"host-b\" and instance \"bob-db\""), "{e}");
        let ok = Topology::parse(
            &prefixed_topology(super::super::DEFAULT_TOPOLOGY, "f", &lab.prefix()).unwrap(),
            "f",
        )
        .unwrap();
        lab.validate(&ok, "f").unwrap();
        let empty = Topology::parse("", "empty.toml").unwrap();
        let e = lab.validate(&empty, "empty.toml").unwrap_err().to_string();
        assert!(e.contains("empty topology"), "{e}");
    }
}
