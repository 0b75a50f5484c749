//! Each host's share of the scopes: what it must compile to decide every packet it can see
//! as the whole region would.

use std::collections::{BTreeMap, BTreeSet};

use super::{Item, REGION, unescape};

/// Every host's share, by host name: `region`; the scopes of its instances; every scope
/// those reach through peerings and interconnects, whole components (a route table may name
/// any peering of its VPC, so a VPC compiles only with all its peers); the security groups
/// the instances of those scopes use and, transitively, the groups their rules name as
/// `sg:` sources. The internet gateway relays every Elastic IP, so its share also holds
/// every scope with one (and their components). A host that sends to an Elastic IP outside
/// its share sends it to the internet through the gateway, which hairpins it.
pub fn shares(items: &[Item]) -> BTreeMap<String, BTreeSet<String>> {
    let g = Graph::of(items);
    g.hosts.iter().map(|h| (h.clone(), g.share(h))).collect()
}

/// The scopes, and what leads from one to another.
#[derive(Default)]
struct Graph {
    hosts: Vec<String>,
    gateway: Option<String>,
    on_host: BTreeMap<String, BTreeSet<String>>,
    with_eip: BTreeSet<String>,
    edges: BTreeMap<String, BTreeSet<String>>,
}

impl Graph {
    fn of(items: &[Item]) -> Graph {
        let mut g = Graph::default();
        for i in items {
            if let Some(name) = i.id.strip_prefix("host/") {
                g.hosts.push(unescape(name));
            }
            if let Some(gw) = &i.links.gateway {
                g.gateway = Some(gw.clone());
            }
            if let Some(h) = &i.links.host {
                g.on_host
                    .entry(h.clone())
                    .or_default()
                    .insert(i.scope.clone());
            }
            if i.links.eip {
                g.with_eip.insert(i.scope.clone());
            }
            for group in &i.links.groups {
                g.edge(&i.scope, &format!("sg:{group}"));
            }
            for s in &i.links.scopes {
                g.edge(&i.scope, s);
                g.edge(s, &i.scope);
            }
        }
        g
    }

    fn edge(&mut self, from: &str, to: &str) {
        if from != to {
            self.edges.entry(from.into()).or_default().insert(to.into());
        }
    }

    /// The scopes `host` compiles: its starting scopes and all they lead to.
    fn share(&self, host: &str) -> BTreeSet<String> {
        let mut todo: Vec<String> = vec![REGION.into()];
        todo.extend(self.on_host.get(host).into_iter().flatten().cloned());
        if self.gateway.as_deref() == Some(host) {
            todo.extend(self.with_eip.iter().cloned());
        }
        let mut seen = BTreeSet::new();
        while let Some(s) = todo.pop() {
            if let Some(next) = self.edges.get(&s) {
                todo.extend(next.iter().filter(|n| !seen.contains(*n)).cloned());
            }
            seen.insert(s);
        }
        seen
    }
}
