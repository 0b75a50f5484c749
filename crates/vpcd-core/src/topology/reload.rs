//! What a running region cannot change: the identities every host must agree on.
//!
//! Hosts apply a new topology one after another. While they do, a host on the old file and a
//! host on the new one exchange packets, so anything both read from the wire or use to find
//! each other must mean the same on both: the underlay, every host's address, the basic pool,
//! `[internet]`, and every GRE key (docs/semantics.md, 2.9). A change to any of them is refused
//! by every host alike, the same check running everywhere, so that no host applies what the
//! others refuse.

use std::collections::BTreeMap;

use super::Topology;

/// Why `new` cannot replace `old` while running; empty when it can.
pub fn live_refusals(old: &Topology, new: &Topology) -> Vec<String> {
    let mut out = Vec::new();
    if old.underlay != new.underlay {
        out.push(
            "the underlay (transport, mtu, instance_mtu, checksum) cannot change while running"
                .into(),
        );
    }
    hosts(old, new, &mut out);
    if old.basic.map(|b| b.cidr) != new.basic.map(|b| b.cidr) && old.basic.is_some() {
        out.push("the [basic] pool cannot change while running".into());
    }
    if internet(old) != internet(new) {
        out.push("[internet] cannot change while running".into());
    }
    keys(old, new, &mut out);
    out
}

fn hosts(old: &Topology, new: &Topology, out: &mut Vec<String>) {
    for h in &old.hosts {
        if let Some(n) = new.hosts.iter().find(|n| n.name == h.name)
            && n.address != h.address
        {
            out.push(format!(
                "host \"{}\" cannot change its address ({} to {}) while running",
                h.name, h.address, n.address
            ));
        }
        if let Some(n) = new.hosts.iter().find(|n| n.address == h.address)
            && n.name != h.name
        {
            out.push(format!(
                "address {} cannot move from host \"{}\" to host \"{}\" while running",
                h.address, h.name, n.name
            ));
        }
    }
}

fn internet(t: &Topology) -> Option<(ipnet::Ipv4Net, String, Option<String>, std::net::Ipv4Addr)> {
    t.internet.as_ref().map(|i| {
        (
            i.cidr,
            t.host(i.gateway).name.clone(),
            i.netns.clone(),
            i.client,
        )
    })
}

/// A VPC keeps its key, and a key keeps its meaning (the channel it names, by name).
fn keys(old: &Topology, new: &Topology, out: &mut Vec<String>) {
    for v in &old.vpcs {
        if let Some(n) = new.vpcs.iter().find(|n| n.name == v.name)
            && n.key != v.key
        {
            out.push(format!(
                "vpc \"{}\" cannot change its key ({} to {}) while running",
                v.name, v.key, n.key
            ));
        }
    }
    let names = |t: &Topology| -> BTreeMap<u32, String> {
        t.channels().map(|(k, c)| (k, t.channel_name(c))).collect()
    };
    let (before, after) = (names(old), names(new));
    for (key, was) in &before {
        if let Some(now) = after.get(key)
            && now != was
        {
            out.push(format!(
                "key {key} cannot change its meaning ({was} to {now}) while running: remove {was} first, then add {now}"
            ));
        }
    }
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
[[vpc]]
name = "va"
tenant = "alice"
cidr = "10.0.0.0/16"
"#;

    fn t(extra: &str) -> Topology {
        Topology::parse(&format!("{BASE}{extra}"), "t.toml").unwrap()
    }

    #[test]
    fn an_unrelated_change_is_accepted() {
        let vb = "[[vpc]]\nname = \"vb\"\ntenant = \"bob\"\ncidr = \"10.0.0.0/16\"\n";
        assert!(live_refusals(&t(""), &t(vb)).is_empty());
        assert!(live_refusals(&t(vb), &t("")).is_empty());
    }

    #[test]
    fn any_hosts_address_is_refused_everywhere() {
        let moved = Topology::parse(&BASE.replace("192.0.2.2", "192.0.2.9"), "t.toml").unwrap();
        let r = live_refusals(&t(""), &moved);
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(
            r[0].contains("host \"h2\" cannot change its address"),
            "{r:?}"
        );
        let swapped = Topology::parse(
            &BASE
                .replace("\"h1\"", "\"hx\"")
                .replace("\"h2\"", "\"h1\"")
                .replace("\"hx\"", "\"h2\""),
            "t.toml",
        )
        .unwrap();
        assert_eq!(live_refusals(&t(""), &swapped).len(), 4);
    }

    #[test]
    fn a_running_vpcs_key_and_a_keys_meaning_never_change() {
        let keyed = Topology::parse(&format!("{BASE}key = 7\n"), "t.toml").unwrap();
        let r = live_refusals(&t(""), &keyed);
        assert!(
            r.iter()
                .any(|m| m.contains("vpc \"va\" cannot change its key")),
            "{r:?}"
        );
        // va goes and vb takes its key in the same change.
        let va_key = t("").vpcs[0].key;
        let other = Topology::parse(
            &format!(
                "{}[[vpc]]\nname = \"vb\"\ntenant = \"bob\"\ncidr = \"10.0.0.0/16\"\nkey = {va_key}\n",
                BASE.split("[[vpc]]").next().unwrap()
            ),
            "t.toml",
        )
        .unwrap();
        let r = live_refusals(&t(""), &other);
        assert!(
            r.iter().any(|m| m.contains(&format!(
                "key {va_key} cannot change its meaning (vpc:va to vpc:vb)"
            ))),
            "{r:?}"
        );
    }
}
