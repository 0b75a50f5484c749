//! Route tables: longest-prefix match over a subnet's custom routes.
//!
//! The local route (the VPC CIDR) is not stored here: the pipeline checks it first because it
//! cannot be changed (docs/semantics.md, "Route tables"; route order: 2.6), and validation
//! refuses custom routes inside the VPC CIDR but for subnet routes to an appliance. The match
//! itself is prefix-trie's, so a lookup costs the depth of the trie, not the number of routes.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use prefix_trie::PrefixMap;

use crate::ids::{InstanceId, PeeringId};

/// Where a custom route sends matching traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NextHop {
    /// Drop it.
    Drop,
    /// Out through the instance's Elastic IP.
    Internet,
    /// Deliver it, unchanged, to this instance (an appliance in the same VPC).
    Instance(InstanceId),
    /// Across this peering connection.
    Peering(PeeringId),
}

/// One custom route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Destination block.
    pub destination: Ipv4Net,
    /// Next hop.
    pub next_hop: NextHop,
}

/// A set of routes with a longest-prefix-match index.
#[derive(Clone)]
pub struct Routes {
    routes: Vec<Route>,
    index: PrefixMap<Ipv4Net, u32>,
}

impl Routes {
    /// Indexes `routes` (destinations are unique; validation guarantees it).
    pub fn new(routes: Vec<Route>) -> Routes {
        let mut index = PrefixMap::new();
        for (i, r) in routes.iter().enumerate() {
            index.insert(r.destination.trunc(), i as u32);
        }
        Routes { routes, index }
    }

    /// The routes, as written.
    pub fn as_slice(&self) -> &[Route] {
        &self.routes
    }

    /// The route of index `i`.
    pub fn get(&self, i: usize) -> Option<&Route> {
        self.routes.get(i)
    }

    /// The most specific route containing `dst`, with its index.
    #[inline]
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<(usize, &Route)> {
        let host = Ipv4Net::from(dst);
        let (_, &i) = self.index.get_lpm(&host)?;
        Some((i as usize, &self.routes[i as usize]))
    }
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.routes).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(d: &str, n: NextHop) -> Route {
        Route {
            destination: d.parse().unwrap(),
            next_hop: n,
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let t = Routes::new(vec![
            r("0.0.0.0/0", NextHop::Instance(InstanceId(1))),
            r("10.9.0.0/16", NextHop::Drop),
            r("10.9.8.0/24", NextHop::Peering(PeeringId(0))),
        ]);
        let hop = |a: [u8; 4]| t.lookup(a.into()).map(|(_, r)| r.next_hop);
        assert_eq!(hop([10, 9, 8, 7]), Some(NextHop::Peering(PeeringId(0))));
        assert_eq!(hop([10, 9, 1, 1]), Some(NextHop::Drop));
        assert_eq!(hop([8, 8, 8, 8]), Some(NextHop::Instance(InstanceId(1))));
    }

    #[test]
    fn no_route_is_none() {
        let t = Routes::new(vec![r("10.9.0.0/16", NextHop::Drop)]);
        assert!(t.lookup([10, 8, 0, 1].into()).is_none());
        assert!(Routes::new(vec![]).lookup([1, 1, 1, 1].into()).is_none());
    }
}
