//! The region's desired state cut into items, each in a scope, and each host's share of the
//! scopes (docs/control-plane.md, keyspace v2). Pure: text in, keys and values out; the
//! store I/O is in `store`.
//!
//! - An **item** is one top-level table of the topology file (`[[vpc]]`, `[[instance]]`,
//!   `[underlay]`, ...), its text as written: the file is cut at its top-level headers, and
//!   the cut is checked (each piece parses alone, and together they parse as the whole file).
//! - Its **scope** is what it belongs to: `region` (underlay, settings, basic pool, internet,
//!   hosts), `vpc:NAME` (a VPC with its subnets, route tables, ACLs, instances, peerings and
//!   interconnects), `basic:TENANT` (a tenant's instances in the basic network, with their
//!   allocations), `sg:NAME` (a security group), `doc` (comments before the first item and
//!   `[[expect]]`s: for people and the lab, read by no host).
//! - A host's **share** ([`shares`]) is the scopes it compiles: `region`, its instances'
//!   scopes, everything those reach (peering, interconnect: whole components), the security
//!   groups their instances use and those groups' `sg:` sources; the internet gateway also
//!   every scope with an Elastic IP.

pub mod generated;
mod share;

use std::collections::{BTreeMap, BTreeSet};

use vpcd_core::topology::Allocations;

pub use share::shares;

/// The prefix of every key of this layout.
pub const PREFIX: &str = "/vpcd/v2/";
/// Written by every apply (its `mod_revision` is the compare of the next apply's
/// transaction); its value lists the scopes the apply changed.
pub const GENERATION_KEY: &str = "/vpcd/v2/generation";
/// The prefix of the items: `/vpcd/v2/item/SCOPE/KIND/ID`.
pub const ITEM_PREFIX: &str = "/vpcd/v2/item/";
/// The prefix of each scope's mark: `/vpcd/v2/mark/SCOPE`, rewritten by an apply that changes
/// the scope. A host watches the marks of its share, not the items.
pub const MARK_PREFIX: &str = "/vpcd/v2/mark/";
/// The prefix of each host's share: `/vpcd/v2/share/HOST`, its scopes one per line.
pub const SHARE_PREFIX: &str = "/vpcd/v2/share/";
/// The prefix of what each daemon reports: `/vpcd/v2/applied/HOST`, the revision it applied.
pub const APPLIED_PREFIX: &str = "/vpcd/v2/applied/";
/// The scope of the items every host reads.
pub const REGION: &str = "region";
/// The scope that no host reads.
pub const DOC: &str = "doc";

/// One item of the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Its scope (`region`, `vpc:NAME`, `basic:TENANT`, `sg:NAME`, `doc`).
    pub scope: String,
    /// `KIND/ID` (`instance/web-1`, `underlay`, `interconnect/c1>vpc-a`, `expect/3`).
    pub id: String,
    /// Its text as written (an allocation: its lock file entry).
    pub text: String,
    /// What it ties its scope to.
    pub links: Links,
}

/// What an item ties its scope to, for [`shares`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Links {
    /// An instance's host.
    pub host: Option<String>,
    /// An instance with an Elastic IP.
    pub eip: bool,
    /// Security groups: an instance's, or an `sg:` source of a group's rules.
    pub groups: Vec<String>,
    /// Other scopes this one reaches (a peering's other VPC, an interconnect's two sides).
    pub scopes: Vec<String>,
    /// `[internet]`: the gateway host.
    pub gateway: Option<String>,
}

impl Item {
    /// The item's key in the store.
    pub fn key(&self) -> String {
        format!("{}{}", scope_prefix(&self.scope), self.id)
    }
}

/// A name as one path segment of a key (`/` and `%` escaped).
pub fn escape(name: &str) -> String {
    name.replace('%', "%25").replace('/', "%2F")
}

/// The name of an escaped path segment.
pub fn unescape(segment: &str) -> String {
    segment.replace("%2F", "/").replace("%25", "%")
}

/// The key of a scope's mark.
pub fn mark_key(scope: &str) -> String {
    format!("{MARK_PREFIX}{}", escape(scope))
}

/// The key of a host's share.
pub fn share_key(host: &str) -> String {
    format!("{SHARE_PREFIX}{}", escape(host))
}

/// The key where a host's daemon reports the revision it applied.
pub fn applied_key(host: &str) -> String {
    format!("{APPLIED_PREFIX}{}", escape(host))
}

/// The prefix of a scope's items.
pub fn scope_prefix(scope: &str) -> String {
    format!("{ITEM_PREFIX}{}/", escape(scope))
}

/// The items of a valid topology `text` and its allocations (each an item of its
/// instance's scope). Errs when the text cannot be cut at its top-level headers.
pub fn items(text: &str, allocations: &Allocations) -> Result<Vec<Item>, String> {
    let pieces = cut(text)?;
    let parsed: Vec<(String, toml::Table)> = pieces
        .iter()
        .map(|(kind, t)| {
            Ok((
                kind.clone(),
                toml::from_str(t).map_err(|e| cut_error(kind, e))?,
            ))
        })
        .collect::<Result<_, String>>()?;
    check_cut(text, &parsed)?;
    let places = Places::of(&parsed);
    let mut out = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for ((kind, table), (_, text)) in parsed.iter().zip(&pieces) {
        let n = seen.entry(kind.clone()).or_default();
        *n += 1;
        let (scope, id, links) = places.place(kind, table, *n - 1);
        out.push(Item {
            scope,
            id,
            text: text.clone(),
            links,
        });
    }
    out.extend(allocation_items(allocations, &places));
    Ok(out)
}

fn cut_error(kind: &str, e: impl std::fmt::Display) -> String {
    format!("the topology cannot be cut into items at [{kind}]: {e}")
}

/// The file cut before each top-level header: `(kind, text)`; the text before the first
/// header is kind `preamble`. The comments right above a header (after the previous item's
/// last value) go with the item they introduce.
fn cut(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = vec![("preamble".into(), String::new())];
    for line in text.split_inclusive('\n') {
        if let Some(kind) = header(line) {
            let above = out
                .last_mut()
                .map(|(_, t)| take_comments(t))
                .unwrap_or_default();
            out.push((kind.to_string(), above));
        }
        if let Some(last) = out.last_mut() {
            last.1.push_str(line);
        }
    }
    if out[0].1.trim().is_empty() {
        out.remove(0);
    }
    Ok(out)
}

/// Takes the comment lines at the end of `text` (blank lines before them stay).
fn take_comments(text: &mut String) -> String {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let keep = lines
        .iter()
        .rposition(|l| !l.trim_start().starts_with('#'))
        .map_or(0, |i| i + 1);
    let at: usize = lines[..keep].iter().map(|l| l.len()).sum();
    text.split_off(at)
}

/// The kind of a top-level header line (`[[vpc]]`, `[underlay]`); `None` for any other line,
/// a sub-table's header (`[[route_table.routes]]`) included.
fn header(line: &str) -> Option<&str> {
    let l = line.trim();
    let l = l.split_once('#').map_or(l, |(h, _)| h).trim_end();
    let inner = l
        .strip_prefix("[[")
        .and_then(|s| s.strip_suffix("]]"))
        .or_else(|| l.strip_prefix('[').and_then(|s| s.strip_suffix(']')))?
        .trim();
    let bare = !inner.is_empty()
        && inner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    bare.then_some(inner)
}

/// The cut is right when the pieces, parsed alone, make the whole file's table.
fn check_cut(text: &str, parsed: &[(String, toml::Table)]) -> Result<(), String> {
    let whole: toml::Table = toml::from_str(text).map_err(|e| cut_error("file", e))?;
    let mut joined = toml::Table::new();
    for (_, t) in parsed {
        for (k, v) in t {
            match (joined.get_mut(k), v) {
                (Some(toml::Value::Array(a)), toml::Value::Array(b)) => a.extend(b.clone()),
                (None, v) => {
                    joined.insert(k.clone(), v.clone());
                }
                _ => return Err(cut_error(k, "a table defined in two places")),
            }
        }
    }
    if joined != whole {
        return Err(cut_error("file", "the pieces do not make the file"));
    }
    Ok(())
}

/// Where instances and subnets live, for the scopes of the items that name them.
struct Places {
    /// Subnet name → its VPC.
    subnet_vpc: BTreeMap<String, String>,
    /// Instance name → its scope.
    instance: BTreeMap<String, String>,
    /// Load balancer name → its scope.
    lb: BTreeMap<String, String>,
}

fn field<'a>(t: &'a toml::Table, name: &str) -> Option<&'a str> {
    t.get(name).and_then(|v| v.as_str())
}

/// The one entry of a piece (`[[kind]]` pieces hold one array entry; `[kind]` one table).
fn entry<'a>(kind: &str, t: &'a toml::Table) -> Option<&'a toml::Table> {
    match t.get(kind)? {
        toml::Value::Array(a) => a.first()?.as_table(),
        v => v.as_table(),
    }
}

impl Places {
    fn of(parsed: &[(String, toml::Table)]) -> Places {
        let entries = |kind: &'static str| {
            parsed
                .iter()
                .filter(move |(k, _)| k == kind)
                .filter_map(move |(k, t)| entry(k, t))
        };
        let subnet_vpc: BTreeMap<String, String> = entries("subnet")
            .filter_map(|s| Some((field(s, "name")?.into(), field(s, "vpc")?.into())))
            .collect();
        let mut p = Places {
            subnet_vpc,
            instance: BTreeMap::new(),
            lb: BTreeMap::new(),
        };
        for (n, (k, t)) in parsed
            .iter()
            .enumerate()
            .filter(|(_, (k, _))| k == "load_balancer")
        {
            let (scope, _, _) = p.place(k, t, n);
            if let Some(name) = entry(k, t).and_then(|e| field(e, "name")) {
                p.lb.insert(name.into(), scope);
            }
        }
        for i in entries("instance") {
            if let Some(name) = field(i, "name") {
                let scope = p.instance_scope(i);
                p.instance.insert(name.into(), scope);
            }
        }
        p
    }

    /// An instance's scope: its subnet's VPC, else the basic network of its tenant.
    fn instance_scope(&self, i: &toml::Table) -> String {
        match (field(i, "subnet"), field(i, "network")) {
            (Some(s), _) => format!("vpc:{}", self.subnet_vpc.get(s).map_or(s, |v| v)),
            (None, Some(n)) if n != "basic" => format!("vpc:{n}"),
            _ => format!("basic:{}", field(i, "tenant").unwrap_or("")),
        }
    }

    /// An item's scope, id and links; `n`: its index among the items of its kind.
    fn place(&self, kind: &str, t: &toml::Table, n: usize) -> (String, String, Links) {
        let e = entry(kind, t);
        let get = |name: &str| e.and_then(|e| field(e, name));
        let name = get("name").map(escape);
        let id = match (kind, &name) {
            ("interconnect", _) => format!(
                "interconnect/{}>{}",
                escape(get("instance").unwrap_or("")),
                escape(get("vpc").unwrap_or(""))
            ),
            // Zero-padded, so that key order is file order.
            ("expect" | "preamble", _) | (_, None) if is_array(kind, t) => {
                format!("{kind}/{n:06}")
            }
            (_, Some(name)) => format!("{kind}/{name}"),
            (_, None) => kind.to_string(),
        };
        let mut links = Links::default();
        let scope = match kind {
            "vpc" => format!("vpc:{}", get("name").unwrap_or("")),
            "subnet" | "route_table" | "acl" => format!("vpc:{}", get("vpc").unwrap_or("")),
            "security_group" => {
                links.groups = e.map(sg_sources).unwrap_or_default();
                format!("sg:{}", get("name").unwrap_or(""))
            }
            "instance" => {
                let e = e.cloned().unwrap_or_default();
                links.host = field(&e, "host").map(String::from);
                links.eip = field(&e, "eip").is_some();
                links.groups = strings(e.get("security_groups"));
                self.instance_scope(&e)
            }
            "peering" => {
                let vpcs = strings(e.and_then(|e| e.get("vpcs")));
                links.scopes = vpcs.iter().map(|v| format!("vpc:{v}")).collect();
                links
                    .scopes
                    .first()
                    .cloned()
                    .unwrap_or_else(|| REGION.into())
            }
            "interconnect" => {
                let instance = get("instance").unwrap_or("");
                let side = self.instance.get(instance).cloned();
                links.scopes = side.into_iter().collect();
                format!("vpc:{}", get("vpc").unwrap_or(""))
            }
            "internet" => {
                links.gateway = get("gateway").map(String::from);
                REGION.into()
            }
            "load_balancer" => {
                links.eip = get("eip").is_some();
                match (get("vpc"), get("network")) {
                    (Some(v), _) => format!("vpc:{v}"),
                    (None, Some("basic")) => format!("basic:{}", get("tenant").unwrap_or("")),
                    _ => REGION.into(),
                }
            }
            "expect" | "preamble" => DOC.into(),
            _ => REGION.into(),
        };
        (scope, id, links)
    }
}

fn is_array(kind: &str, t: &toml::Table) -> bool {
    matches!(t.get(kind), Some(toml::Value::Array(_))) || kind == "preamble"
}

fn strings(v: Option<&toml::Value>) -> Vec<String> {
    v.and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The groups a security group's rules name as `sg:NAME` sources or destinations.
fn sg_sources(sg: &toml::Table) -> Vec<String> {
    let mut out = BTreeSet::new();
    for (list, field_name) in [("ingress", "source"), ("egress", "destination")] {
        let rules = sg.get(list).and_then(|v| v.as_array());
        for r in rules.into_iter().flatten() {
            let peer = r.get(field_name).and_then(|v| v.as_str());
            if let Some(g) = peer.and_then(|p| p.strip_prefix("sg:")) {
                out.insert(g.to_string());
            }
        }
    }
    out.into_iter().collect()
}

/// Each allocation as an item of its instance's scope (of `doc` when the instance is gone:
/// kept, never handed out again, read by no host).
fn allocation_items<'a>(
    allocations: &'a Allocations,
    places: &'a Places,
) -> impl Iterator<Item = Item> + 'a {
    let basic = allocations.basic.iter().map(move |(name, a)| {
        let one = Allocations {
            basic: BTreeMap::from([(name.clone(), *a)]),
            ..Allocations::default()
        };
        let scope = places.instance.get(name).cloned();
        allocation_item(
            &one,
            "[[basic]]",
            scope,
            format!("allocation/{}", escape(name)),
        )
    });
    let vips = allocations.vip.iter().map(move |(name, a)| {
        let one = Allocations {
            vip: BTreeMap::from([(name.clone(), *a)]),
            ..Allocations::default()
        };
        let scope = places.lb.get(name).cloned();
        allocation_item(
            &one,
            "[[vip]]",
            scope,
            format!("allocation/vip/{}", escape(name)),
        )
    });
    basic.chain(vips)
}

/// The item of one allocation (`one` holds only it): its lock-file entry from `table` on, in
/// `scope` (`doc` when its owner is gone).
fn allocation_item(one: &Allocations, table: &str, scope: Option<String>, id: String) -> Item {
    let text = one.render("");
    let entry = text.find(table).map_or("", |at| &text[at..]);
    Item {
        scope: scope.unwrap_or(DOC.into()),
        id,
        text: entry.to_string(),
        links: Links::default(),
    }
}

/// The topology text and the allocations (the lock file's text) that items make, read from
/// the store as `(key, value)`: the pieces in key order, so a file and the items it was cut
/// into compile to the same region.
pub fn assemble<'a>(items: impl IntoIterator<Item = (&'a str, &'a str)>) -> (String, String) {
    let (mut topology, mut allocations) = (String::new(), String::new());
    allocations.push_str("# The provider's allocations, as the store holds them.\n");
    let mut sorted: Vec<(&str, &str)> = items.into_iter().collect();
    sorted.sort_by_key(|(k, _)| kind_order(k));
    for (key, value) in sorted {
        let out = if key.contains("/allocation/") {
            &mut allocations
        } else {
            &mut topology
        };
        out.push_str(value);
        if !value.ends_with('\n') {
            out.push('\n');
        }
    }
    (topology, allocations)
}

/// Items in the order a file would have them: the preamble first, then by kind, then by key.
fn kind_order(key: &str) -> (usize, &str) {
    const ORDER: [&str; 16] = [
        "preamble",
        "underlay",
        "conntrack",
        "limits",
        "host",
        "basic",
        "internet",
        "vpc",
        "subnet",
        "route_table",
        "acl",
        "security_group",
        "instance",
        "peering",
        "interconnect",
        "load_balancer",
    ];
    let rest = key.strip_prefix(ITEM_PREFIX).unwrap_or(key);
    let kind = rest.split('/').nth(1).unwrap_or("");
    let at = ORDER.iter().position(|k| *k == kind).unwrap_or(ORDER.len());
    (at, key)
}

/// The keys and values an apply stores for `items`: every item, and each host's share.
pub fn desired_keys(items: &[Item]) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> =
        items.iter().map(|i| (i.key(), i.text.clone())).collect();
    for (host, scopes) in shares(items) {
        let list: Vec<&str> = scopes.iter().map(String::as_str).collect();
        out.insert(share_key(&host), list.join("\n"));
    }
    out
}

/// What an apply writes: the keys to put and to delete, and the scopes whose marks it
/// rewrites (every scope with a put or deleted item).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Writes {
    /// Keys to put, with their values.
    pub puts: Vec<(String, String)>,
    /// Keys to delete.
    pub deletes: Vec<String>,
    /// The scopes the change touches (their marks are rewritten).
    pub scopes: BTreeSet<String>,
}

impl Writes {
    /// Nothing to write: the store holds this state.
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty()
    }
}

/// The writes that turn `current` (the store's items and shares) into `desired`.
pub fn writes(current: &BTreeMap<String, String>, desired: &BTreeMap<String, String>) -> Writes {
    let mut w = Writes::default();
    for (k, v) in desired {
        if current.get(k) != Some(v) {
            w.puts.push((k.clone(), v.clone()));
        }
    }
    w.deletes = current
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .cloned()
        .collect();
    let touched = w.puts.iter().map(|(k, _)| k).chain(&w.deletes);
    w.scopes = touched.filter_map(|k| scope_of_key(k)).collect();
    w
}

/// The scope of an item's key, `None` for other keys.
pub fn scope_of_key(key: &str) -> Option<String> {
    let rest = key.strip_prefix(ITEM_PREFIX)?;
    rest.split('/').next().map(unescape)
}

#[cfg(test)]
mod tests;
