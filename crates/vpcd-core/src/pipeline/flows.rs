//! The connection table as operators see it (`vpcd ctl flows`): a listing of every tracked
//! connection with its counters and cached verdicts, and a flush (as `conntrack -F`).

use hashbrown::HashMap;

use super::decide::zone_of;
use super::{Decision, Pipeline, State};
use crate::policy::conntrack::{Conn, ConnRef, Owner};
use crate::time::Timestamp;
use crate::topology::InstanceId;

/// One tracked connection (one local side of it), as `vpcd ctl flows` lists it.
#[derive(Debug, Clone, Copy)]
pub struct FlowEntry {
    /// The local instance whose side it is (`None` only for a port no instance of this host
    /// has any more).
    pub instance: Option<InstanceId>,
    /// The entry: its ends, state, times and per-direction packets and bytes.
    pub conn: Conn,
    /// Milliseconds since it was created.
    pub age_ms: u64,
    /// Milliseconds it has left without more traffic.
    pub left_ms: u64,
    /// The decisions the flow cache holds for its packets, by direction (original, reply):
    /// what the next such packet gets without the full path.
    pub verdicts: [Option<Decision>; 2],
}

impl Pipeline {
    /// Every live connection at `now`, of one local `instance` or of all. Reads only: the
    /// tables stay as they are (an expired entry is left out, not removed).
    pub fn flows(&self, now: Timestamp, instance: Option<InstanceId>) -> Vec<FlowEntry> {
        let ports = self.ports();
        let verdicts = self.verdicts();
        self.state
            .conntrack
            .iter_refs()
            .filter(|(_, c)| !c.expired(now))
            .map(|(r, c)| FlowEntry {
                instance: ports.get(&c.key.port).copied(),
                conn: *c,
                age_ms: c.age_ms(now),
                left_ms: c.left_ms(now),
                verdicts: verdicts.get(&r).copied().unwrap_or_default(),
            })
            .filter(|f| instance.is_none() || f.instance == instance)
            .collect()
    }

    /// Removes every connection of one local `instance`, or all of them, and the cached
    /// decisions that relied on them, so that their next packets are judged again by the
    /// rules (as `conntrack -F`). Returns how many connections went.
    pub fn flush_flows(&mut self, instance: Option<InstanceId>) -> usize {
        let ports = self.ports();
        let State {
            conntrack, flows, ..
        } = &mut self.state;
        let n = conntrack
            .remove_if(|c| instance.is_none() || ports.get(&c.key.port).copied() == instance);
        flows.forget(|h| {
            h.conns
                .iter()
                .flatten()
                .any(|r| conntrack.get(*r).is_none())
        });
        n
    }

    /// The ports of this host's instances.
    fn ports(&self) -> HashMap<Owner, InstanceId> {
        let topo = &self.topo;
        topo.instances_on(self.view.host)
            .map(|id| {
                let i = topo.instance(id);
                let port = Owner {
                    zone: zone_of(topo, i),
                    addr: i.ip,
                };
                (port, id)
            })
            .collect()
    }

    /// The cached decisions of this generation, by the connection they update and the
    /// direction of their packets in it.
    fn verdicts(&self) -> HashMap<ConnRef, [Option<Decision>; 2]> {
        let ct = &self.state.conntrack;
        let mut out: HashMap<ConnRef, [Option<Decision>; 2]> = HashMap::new();
        for hit in self.state.flows.hits(self.view.generation) {
            let sides = hit.conns.iter().zip([hit.egress_src, hit.ingress_src]);
            for (r, src) in sides.filter_map(|(r, s)| Some(((*r)?, s))) {
                if let Some(c) = ct.get(r) {
                    out.entry(r).or_default()[c.direction(&src) as usize] = Some(hit.decision);
                }
            }
        }
        out
    }
}
