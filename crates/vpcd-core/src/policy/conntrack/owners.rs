//! Who holds the table's entries: per owner, its count and its entries in two orders
//! (unprotected, protected), and a heap of owners by count, so that a full table finds the
//! heaviest owner and its oldest entry without allocating or scanning (docs/semantics.md,
//! 2.7, "Limits").
//!
//! The entries' lists are intrusive: each entry holds its neighbours' slots, so linking and
//! unlinking cost a few stores. The heap orders owners by count, heaviest first, ties by the
//! smaller owner, so that the choice is the same wherever it is computed.

use hashbrown::HashMap;

use super::Owner;

/// "No slot".
pub(super) const NIL: u32 = u32::MAX;

/// An entry's links in its owner's list.
#[derive(Debug, Clone, Copy)]
pub(super) struct Links {
    pub prev: u32,
    pub next: u32,
    /// Which of its owner's lists holds it.
    pub protected: bool,
}

impl Links {
    pub const NONE: Links = Links {
        prev: NIL,
        next: NIL,
        protected: false,
    };
}

#[derive(Debug, Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
}

#[derive(Debug, Clone)]
struct Slot {
    owner: Owner,
    count: u32,
    lists: [List; 2],
    heap_at: u32,
}

type Hasher = foldhash::fast::FixedState;

/// The owners of a table.
#[derive(Clone)]
pub(super) struct Owners {
    by_owner: HashMap<Owner, u32, Hasher>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    heap: Vec<u32>,
}

impl Owners {
    pub fn new(seed: u64) -> Owners {
        Owners {
            by_owner: HashMap::with_hasher(Hasher::with_seed(seed)),
            slots: Vec::new(),
            free: Vec::new(),
            heap: Vec::new(),
        }
    }

    /// Entries `owner` holds.
    pub fn count(&self, owner: &Owner) -> u32 {
        self.by_owner
            .get(owner)
            .map_or(0, |&s| self.slots[s as usize].count)
    }

    /// The owner holding the most entries (ties: the smallest), with its count.
    pub fn heaviest(&self) -> Option<(Owner, u32)> {
        let s = &self.slots[*self.heap.first()? as usize];
        Some((s.owner, s.count))
    }

    /// The oldest entry of `owner`'s protected or unprotected list.
    pub fn oldest(&self, owner: &Owner, protected: bool) -> Option<u32> {
        let s = &self.slots[*self.by_owner.get(owner)? as usize];
        let head = s.lists[usize::from(protected)].head;
        (head != NIL).then_some(head)
    }

    /// Counts entry `entry` against `owner`, last in its list.
    pub fn add(&mut self, owner: Owner, entry: u32, links: &mut [Links], protected: bool) {
        let slot = match self.by_owner.get(&owner) {
            Some(&s) => s,
            None => self.new_slot(owner),
        };
        self.slots[slot as usize].count += 1;
        self.sift_up(self.slots[slot as usize].heap_at);
        self.link(slot, entry, links, protected);
    }

    /// Forgets entry `entry` of `owner`.
    pub fn remove(&mut self, owner: &Owner, entry: u32, links: &mut [Links]) {
        let Some(&slot) = self.by_owner.get(owner) else {
            return;
        };
        self.unlink(slot, entry, links);
        let s = &mut self.slots[slot as usize];
        s.count -= 1;
        let at = s.heap_at;
        if s.count == 0 {
            self.drop_slot(slot);
        } else {
            self.sift_down(at);
        }
    }

    /// Moves entry `entry` to the end of its owner's other list (it became protected, or
    /// stopped being).
    pub fn relist(&mut self, owner: &Owner, entry: u32, links: &mut [Links], protected: bool) {
        let Some(&slot) = self.by_owner.get(owner) else {
            return;
        };
        self.unlink(slot, entry, links);
        self.link(slot, entry, links, protected);
    }

    fn new_slot(&mut self, owner: Owner) -> u32 {
        let empty = List {
            head: NIL,
            tail: NIL,
        };
        let s = Slot {
            owner,
            count: 0,
            lists: [empty; 2],
            heap_at: self.heap.len() as u32,
        };
        let slot = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = s;
                i
            }
            None => {
                self.slots.push(s);
                (self.slots.len() - 1) as u32
            }
        };
        self.heap.push(slot);
        self.by_owner.insert(owner, slot);
        slot
    }

    fn drop_slot(&mut self, slot: u32) {
        let at = self.slots[slot as usize].heap_at as usize;
        let last = self.heap.len() - 1;
        self.heap.swap(at, last);
        self.slots[self.heap[at] as usize].heap_at = at as u32;
        self.heap.pop();
        if at < self.heap.len() {
            let moved = self.heap[at] as usize;
            self.sift_down(at as u32);
            self.sift_up(self.slots[moved].heap_at);
        }
        let owner = self.slots[slot as usize].owner;
        self.by_owner.remove(&owner);
        self.free.push(slot);
    }

    fn link(&mut self, slot: u32, entry: u32, links: &mut [Links], protected: bool) {
        let list = &mut self.slots[slot as usize].lists[usize::from(protected)];
        links[entry as usize] = Links {
            prev: list.tail,
            next: NIL,
            protected,
        };
        if list.tail == NIL {
            list.head = entry;
        } else {
            links[list.tail as usize].next = entry;
        }
        list.tail = entry;
    }

    fn unlink(&mut self, slot: u32, entry: u32, links: &mut [Links]) {
        let l = links[entry as usize];
        let list = &mut self.slots[slot as usize].lists[usize::from(l.protected)];
        if l.prev == NIL {
            list.head = l.next;
        } else {
            links[l.prev as usize].next = l.next;
        }
        if l.next == NIL {
            list.tail = l.prev;
        } else {
            links[l.next as usize].prev = l.prev;
        }
        links[entry as usize] = Links::NONE;
    }

    /// True when heap position `a` must come before `b`: more entries, or as many and a
    /// smaller owner.
    fn before(&self, a: usize, b: usize) -> bool {
        let (x, y) = (
            &self.slots[self.heap[a] as usize],
            &self.slots[self.heap[b] as usize],
        );
        (x.count, std::cmp::Reverse(x.owner)) > (y.count, std::cmp::Reverse(y.owner))
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.slots[self.heap[a] as usize].heap_at = a as u32;
        self.slots[self.heap[b] as usize].heap_at = b as u32;
    }

    fn sift_up(&mut self, at: u32) {
        let mut i = at as usize;
        while i > 0 {
            let parent = (i - 1) / 2;
            if !self.before(i, parent) {
                break;
            }
            self.swap(i, parent);
            i = parent;
        }
    }

    fn sift_down(&mut self, at: u32) {
        let mut i = at as usize;
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut top = i;
            if l < self.heap.len() && self.before(l, top) {
                top = l;
            }
            if r < self.heap.len() && self.before(r, top) {
                top = r;
            }
            if top == i {
                break;
            }
            self.swap(i, top);
            i = top;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Zone;
    use super::*;
    use std::net::Ipv4Addr;

    fn owner(n: u8) -> Owner {
        Owner {
            zone: Zone(1),
            addr: Ipv4Addr::new(10, 0, 0, n),
        }
    }

    #[test]
    fn the_heaviest_owner_is_on_top_ties_by_the_smaller() {
        let mut o = Owners::new(1);
        let mut links = vec![Links::NONE; 64];
        let mut entry = 0;
        let mut add = |o: &mut Owners, links: &mut Vec<Links>, n: u8| {
            o.add(owner(n), entry, links, false);
            entry += 1;
            entry - 1
        };
        for n in [3, 1, 2, 1, 3] {
            add(&mut o, &mut links, n);
        }
        assert_eq!(
            o.heaviest(),
            Some((owner(1), 2)),
            "1 and 3 hold 2: the smaller wins"
        );
        let e = add(&mut o, &mut links, 3);
        assert_eq!(o.heaviest(), Some((owner(3), 3)));
        o.remove(&owner(3), e, &mut links);
        o.remove(&owner(1), 1, &mut links);
        assert_eq!(o.heaviest(), Some((owner(3), 2)));
        o.remove(&owner(3), 0, &mut links);
        o.remove(&owner(3), 4, &mut links);
        assert_eq!(o.count(&owner(3)), 0);
        assert_eq!(o.heaviest().map(|(_, c)| c), Some(1));
    }

    #[test]
    fn lists_keep_the_order_of_joining() {
        let mut o = Owners::new(1);
        let mut links = vec![Links::NONE; 8];
        for e in 0..4 {
            o.add(owner(1), e, &mut links, false);
        }
        assert_eq!(o.oldest(&owner(1), false), Some(0));
        o.relist(&owner(1), 0, &mut links, true);
        assert_eq!(o.oldest(&owner(1), false), Some(1));
        assert_eq!(o.oldest(&owner(1), true), Some(0));
        o.relist(&owner(1), 0, &mut links, false);
        o.remove(&owner(1), 1, &mut links);
        assert_eq!(o.oldest(&owner(1), false), Some(2), "0 rejoined last");
        o.remove(&owner(1), 2, &mut links);
        o.remove(&owner(1), 3, &mut links);
        assert_eq!(o.oldest(&owner(1), false), Some(0));
        assert_eq!(o.oldest(&owner(1), true), None);
    }
}
