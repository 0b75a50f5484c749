//! The fast lane: a packet whose flow is cached reuses its decision (docs/semantics.md 2.8),
//! after its connections are updated by it.

use super::Decision;
use super::decide::Decider;
use super::flow::FlowKey;
use super::trace::{Stage, cache_fields};
use crate::policy::conntrack::Track;
use crate::wire::ipv4::{self, L4};

impl Decider<'_> {
    /// The cached decision for `key`, with the connections behind it updated by this packet's
    /// flags and counted with its `len` bytes; `None` to take the full path (nothing cached,
    /// or a connection is gone).
    #[inline]
    pub fn cached(&mut self, key: &FlowKey, l4: &L4, len: usize) -> Option<Decision> {
        if self.trace.is_some() {
            return self.trace_cache(key);
        }
        let state = &mut *self.state;
        let hit = state.flows.get(key, self.host.generation)?;
        let sides = hit.conns.iter().zip([hit.egress_src, hit.ingress_src]);
        let sides = sides.filter_map(|(r, src)| Some(((*r)?, src)));
        // A packet that reopens an entry, or finds one gone, takes the full path before any
        // entry is updated.
        if !sides
            .clone()
            .all(|(r, src)| state.conntrack.continues(r, &src, l4, self.now))
        {
            return None;
        }
        for (r, src) in sides {
            match state.conntrack.track(r, &src, l4, self.now) {
                Track::Accepted(dir) => state.conntrack.account(r, dir, len),
                Track::Ended => {}
                Track::Invalid(reason) => return Some(Decision::drop(reason)),
                Track::Reopen | Track::Gone => return None,
            }
        }
        state.counters.cache_hits += 1;
        self.receiver = hit.receiver;
        Some(hit.decision)
    }

    /// A trace notes what the cache holds for the flow, then takes the full path. Out of the
    /// fast lane's way: it must stay small enough to inline.
    #[cold]
    #[inline(never)]
    fn trace_cache(&mut self, key: &FlowKey) -> Option<Decision> {
        let hit = self.trace.as_ref()?.cache.peek(key, self.host.generation);
        self.note(Stage::Cache, |t| cache_fields(t, hit.map(|h| h.decision)));
        None
    }

    /// The fast lane of a packet whose flow is cached: the key is read straight from the
    /// bytes ([`ipv4::quick_key`]), after the checks the full parse would make for such a
    /// packet. Everything else the decision depended on (the sender, the source address, the
    /// destination) is in the key. `None`: take the full path.
    #[inline]
    pub fn cached_from_bytes(
        &mut self,
        ingress: u32,
        gre_key: u64,
        pkt: &[u8],
    ) -> Option<Decision> {
        if self.tracing() {
            return None;
        }
        let (fields, l4) = ipv4::quick_key(pkt)?;
        let key = FlowKey::from_fields(ingress, gre_key, fields);
        self.cached(&key, &l4, pkt.len())
    }
}
