//! Values keyed by the shard's record ids, without hashing on the common path.
//!
//! The outbox hands out record ids in increasing order and Kafka answers most of them in about
//! that order, so a window of slots starting at the oldest id still present holds them: an
//! insert of the next id is a push, a removal is an index and a pop of answered slots at the
//! front. An id the window no longer covers (older than its start, or pushed out of a window
//! that grew past its bound — [`MAX_SLOTS`], or what [`IdMap::with_window`] set — behind one
//! record that is not answered) lives in a hash map. The outbox sizes its windows to cover
//! every record it may have in flight, so that under a full backlog (a Kafka slower than the
//! publishers) ids do not go through the hash map.
//!
//! Invariants: every id has at most one value, in the window or in `others`, never both (an
//! id in `others` is looked up there first); the
//! window's front slot, when there is one, is occupied; the window holds at most `max_slots`.

use std::collections::VecDeque;

use crate::HashMap;

/// Most slots the window holds by default (a slot is the size of an `Option<V>`).
pub(super) const MAX_SLOTS: usize = 1 << 16;

/// The largest window [`IdMap::with_window`] makes: 1,048,576 slots.
pub(super) const MAX_WINDOW: usize = 1 << 20;

#[derive(Debug)]
pub(super) struct IdMap<V> {
    /// Id of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<V>>,
    in_slots: usize,
    others: HashMap<u64, V>,
    /// Most slots the window holds.
    max_slots: usize,
}

impl<V> Default for IdMap<V> {
    fn default() -> Self {
        IdMap { base: 0, slots: VecDeque::new(), in_slots: 0, others: HashMap::default(), max_slots: MAX_SLOTS }
    }
}

impl<V> IdMap<V> {
    /// A map whose window covers `ids` consecutive ids (at least [`MAX_SLOTS`], at most
    /// [`MAX_WINDOW`]); the window grows only as far as the ids in it spread.
    pub(super) fn with_window(ids: usize) -> Self {
        IdMap { max_slots: ids.clamp(MAX_SLOTS, MAX_WINDOW), ..IdMap::default() }
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.in_slots == 0 && self.others.is_empty()
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.in_slots + self.others.len()
    }

    pub(super) fn contains_key(&self, id: &u64) -> bool {
        let id = *id;
        if id >= self.base
            && ((id - self.base) as usize) < self.slots.len()
            && self.slots[(id - self.base) as usize].is_some()
        {
            return true;
        }
        !self.others.is_empty() && self.others.contains_key(&id)
    }

    pub(super) fn insert(&mut self, id: u64, v: V) -> Option<V> {
        // An id in the map stays there (the window may have moved back over it).
        if !self.others.is_empty() {
            if let Some(old) = self.others.get_mut(&id) {
                return Some(std::mem::replace(old, v));
            }
        }
        if self.slots.is_empty() {
            self.base = id;
        }
        if id < self.base {
            return self.others.insert(id, v);
        }
        let at = (id - self.base) as usize;
        if at >= self.max_slots {
            // Too far ahead of the oldest id still waiting: the front moves to the map.
            self.spill_front(at + 1 - self.max_slots);
            if id < self.base {
                return self.others.insert(id, v);
            }
        }
        let at = (id - self.base) as usize;
        while self.slots.len() <= at {
            self.slots.push_back(None);
        }
        let old = self.slots[at].replace(v);
        if old.is_none() {
            self.in_slots += 1;
        }
        self.trim();
        old
    }

    pub(super) fn remove(&mut self, id: &u64) -> Option<V> {
        let id = *id;
        if id >= self.base && ((id - self.base) as usize) < self.slots.len() {
            let v = self.slots[(id - self.base) as usize].take();
            if v.is_some() {
                self.in_slots -= 1;
                self.trim();
                return v;
            }
        }
        if self.others.is_empty() {
            return None;
        }
        self.others.remove(&id)
    }

    /// Moves the first `n` slots out of the window: occupied ones into `others`.
    fn spill_front(&mut self, n: usize) {
        for _ in 0..n.min(self.slots.len()) {
            if let Some(Some(v)) = self.slots.pop_front() {
                self.in_slots -= 1;
                self.others.insert(self.base, v);
            }
            self.base += 1;
        }
        self.trim();
    }

    /// Drops answered slots at the front.
    fn trim(&mut self) {
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
        }
        if self.slots.is_empty() {
            self.in_slots = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_ids_stay_in_a_small_window() {
        let mut m = IdMap::default();
        for id in 1..=100u64 {
            assert_eq!(m.insert(id, id * 10), None);
        }
        assert_eq!((m.len(), m.slots.len(), m.others.len()), (100, 100, 0));
        for id in 1..=100u64 {
            assert_eq!(m.remove(&id), Some(id * 10));
            assert_eq!(m.remove(&id), None, "answered once");
        }
        assert!(m.is_empty());
        assert_eq!(m.slots.len(), 0);
    }

    #[test]
    fn one_unanswered_id_does_not_grow_the_window_without_bound() {
        let mut m = IdMap::default();
        m.insert(1, 0u8);
        for id in 2..(3 * MAX_SLOTS as u64) {
            m.insert(id, 1);
            m.remove(&id);
        }
        assert!(m.slots.len() <= MAX_SLOTS);
        assert_eq!(m.len(), 1);
        assert_eq!(m.remove(&1), Some(0), "the old id is still found");
        assert!(m.is_empty());
    }

    #[test]
    fn a_wider_window_keeps_a_backlog_of_ids_out_of_the_hash_map() {
        // 100,000 records in flight (the default `max_pending_records_per_shard`), answered in
        // order: the default window would move the oldest 34,464 to the hash map.
        let mut m = IdMap::with_window(100_000);
        for id in 1..=100_000u64 {
            m.insert(id, ());
        }
        assert_eq!((m.slots.len(), m.others.len()), (100_000, 0));
        assert_eq!(IdMap::<()>::with_window(usize::MAX).max_slots, MAX_WINDOW);
        assert_eq!(IdMap::<()>::with_window(0).max_slots, MAX_SLOTS);
    }

    proptest! {
        /// Against a plain map: any sequence of inserts (mostly increasing, some old ids again)
        /// and removals gives the same answers.
        #[test]
        fn behaves_like_a_hash_map(ops in proptest::collection::vec((0u8..3, 0u64..200_000), 0..400)) {
            let mut m = IdMap::default();
            let mut want = std::collections::HashMap::new();
            let mut next = 0u64;
            for (op, x) in ops {
                match op {
                    0 => { next += 1 + x % 3; prop_assert_eq!(m.insert(next, x), want.insert(next, x)); }
                    1 => { let id = x % (next + 1); prop_assert_eq!(m.insert(id, x), want.insert(id, x)); }
                    _ => { let id = if x % 2 == 0 { x % (next + 1) } else { next.saturating_sub(x % 5) };
                           prop_assert_eq!(m.remove(&id), want.remove(&id)); }
                }
                prop_assert_eq!(m.len(), want.len());
                prop_assert_eq!(m.is_empty(), want.is_empty());
            }
        }
    }
}
