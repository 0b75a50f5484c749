//! Fragments: the later fragments of a datagram follow its first fragment's decision.
//!
//! Only the first fragment carries ports, so only it can be matched by port rules. vpcd
//! remembers the decision taken for an admitted first fragment, keyed by the datagram
//! (zone, source, destination, protocol, IP identification), and applies it to the later
//! fragments. A later fragment with no remembered decision (its first fragment was dropped,
//! not seen yet, or expired) is dropped: no fragment ever bypasses a port rule. Entries live
//! 30 s, as Linux's ipfrag_time, and the table is bounded (oldest out first).

use std::collections::VecDeque;

use hashbrown::HashMap;

use super::Decision;
use super::flow::FlowKey;
use crate::time::Timestamp;

/// How long a first fragment's decision is remembered (ms).
pub const FRAGMENT_TIMEOUT_MS: u64 = 30_000;
/// Datagrams remembered at most.
pub const FRAGMENT_TABLE_SIZE: usize = 4096;

/// A datagram: its flow's key, ports left out (later fragments have none), and its IP
/// identification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct DatagramKey {
    flow: FlowKey,
    ident: u16,
}

impl DatagramKey {
    fn new(flow: &FlowKey, ident: u16) -> Self {
        DatagramKey {
            flow: FlowKey {
                sport: 0,
                dport: 0,
                icmp_type: 0,
                icmp_code: 0,
                ..*flow
            },
            ident,
        }
    }
}

/// Decisions of admitted first fragments, with the topology generation they were taken in.
#[derive(Debug, Clone)]
pub struct FragTable {
    map: HashMap<DatagramKey, (Decision, u64, Timestamp), foldhash::fast::FixedState>,
    order: VecDeque<DatagramKey>,
}

impl FragTable {
    /// An empty table, its hash seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        FragTable {
            map: HashMap::with_hasher(foldhash::fast::FixedState::with_seed(seed ^ 0x6672_6167)),
            order: VecDeque::new(),
        }
    }
}

impl FragTable {
    /// Remembers the decision of a first fragment.
    pub fn admit(
        &mut self,
        flow: &FlowKey,
        ident: u16,
        generation: u64,
        d: Decision,
        now: Timestamp,
    ) {
        let key = DatagramKey::new(flow, ident);
        if self.map.insert(key, (d, generation, now)).is_none() {
            self.order.push_back(key);
        }
        while self.map.len() > FRAGMENT_TABLE_SIZE {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        if self.order.len() > 2 * FRAGMENT_TABLE_SIZE {
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
    }

    /// The decision for a later fragment, if its first fragment was admitted recently, in
    /// this topology generation (a decision names instances of the topology it was taken in).
    pub fn follow(
        &mut self,
        flow: &FlowKey,
        ident: u16,
        generation: u64,
        now: Timestamp,
    ) -> Option<Decision> {
        let key = DatagramKey::new(flow, ident);
        let (d, taken_in, at) = *self.map.get(&key)?;
        if taken_in != generation || now.millis().saturating_sub(at.millis()) > FRAGMENT_TIMEOUT_MS
        {
            self.map.remove(&key);
            return None;
        }
        Some(d)
    }
}
