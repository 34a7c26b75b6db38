//! A session's in-flight window: what was sent to the client and waits for its PUBACK, PUBREC
//! or PUBCOMP, keyed by packet id, without a tree or a hash per message.
//!
//! Packet ids are handed out in increasing order (wrapping at 65,535, skipping ids still in
//! flight: [`Session::alloc_pid`](super::Session::alloc_pid)) and clients acknowledge in about
//! that order, so the ids in flight at once are nearly contiguous: each lives in slot
//! `id % slots.len()` of a power-of-two array, and an insert, a lookup and a removal are an
//! index. When an id finds its slot taken by another one (an old id that was never
//! acknowledged, say) the array doubles if it is more than half full, up to [`MAX_SLOTS`],
//! and otherwise the id goes to a small ordered map beside it.
//!
//! Invariants: an id is in at most one place, its own slot or `others` (an id in `others` is
//! looked up there too); `slots.len()` is 0 or a power of two ≤ [`MAX_SLOTS`]; `in_slots`
//! counts the occupied slots. A session that never had a message in flight allocates nothing;
//! the array, once grown, stays until the session goes (at most about twice the largest window
//! it had: 128 slots, 6 KiB, for the default `max_inflight` of 64).

use std::collections::BTreeMap;

use super::Inflight;

/// Slots of a window's first allocation.
const MIN_SLOTS: usize = 8;
/// One slot per packet id: a window this large has no collisions.
const MAX_SLOTS: usize = 1 << 16;

#[derive(Debug, Default)]
pub(crate) struct InflightWindow {
    slots: Vec<Option<(u16, Inflight)>>,
    in_slots: usize,
    others: BTreeMap<u16, Inflight>,
}

impl InflightWindow {
    pub(crate) fn len(&self) -> usize {
        self.in_slots + self.others.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slot(&self, pid: u16) -> usize {
        usize::from(pid) & (self.slots.len() - 1)
    }

    pub(crate) fn get(&self, pid: u16) -> Option<&Inflight> {
        if !self.slots.is_empty() {
            if let Some((p, v)) = &self.slots[self.slot(pid)] {
                if *p == pid {
                    return Some(v);
                }
            }
        }
        if self.others.is_empty() {
            return None;
        }
        self.others.get(&pid)
    }

    pub(crate) fn contains(&self, pid: u16) -> bool {
        self.get(pid).is_some()
    }

    /// Puts `v` under `pid`; returns what was there.
    pub(crate) fn insert(&mut self, pid: u16, v: Inflight) -> Option<Inflight> {
        if !self.others.is_empty() {
            if let Some(old) = self.others.get_mut(&pid) {
                return Some(std::mem::replace(old, v));
            }
        }
        if self.slots.is_empty() {
            self.resize(MIN_SLOTS);
        }
        loop {
            let at = self.slot(pid);
            let (len, cap) = (self.len(), self.slots.len());
            match &mut self.slots[at] {
                Some((p, old)) if *p == pid => return Some(std::mem::replace(old, v)),
                Some(_) if cap < MAX_SLOTS && (len + 1) * 2 > cap => {
                    self.resize(cap * 2);
                }
                Some(_) => return self.others.insert(pid, v),
                slot @ None => {
                    *slot = Some((pid, v));
                    self.in_slots += 1;
                    return None;
                }
            }
        }
    }

    pub(crate) fn remove(&mut self, pid: u16) -> Option<Inflight> {
        if !self.slots.is_empty() {
            let at = self.slot(pid);
            if matches!(&self.slots[at], Some((p, _)) if *p == pid) {
                self.in_slots -= 1;
                return self.slots[at].take().map(|(_, v)| v);
            }
        }
        if self.others.is_empty() {
            return None;
        }
        self.others.remove(&pid)
    }

    /// Everything in flight, in no particular order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Inflight> {
        self.slots.iter().flatten().map(|(_, v)| v).chain(self.others.values())
    }

    /// Everything in flight, in packet id order (as the session's encoding and a redelivery
    /// after reconnecting have always listed it).
    pub(crate) fn sorted(&self) -> Vec<(u16, &Inflight)> {
        let mut all: Vec<(u16, &Inflight)> = self.slots.iter().flatten().map(|(p, v)| (*p, v)).collect();
        all.extend(self.others.iter().map(|(p, v)| (*p, v)));
        all.sort_unstable_by_key(|(p, _)| *p);
        all
    }

    /// Re-places every entry into `n` slots (those that collide there go to `others`).
    fn resize(&mut self, n: usize) {
        let old = std::mem::take(&mut self.slots);
        let others = std::mem::take(&mut self.others);
        self.slots.resize_with(n, || None);
        self.in_slots = 0;
        for (pid, v) in old.into_iter().flatten().chain(others) {
            let at = self.slot(pid);
            if self.slots[at].is_none() {
                self.slots[at] = Some((pid, v));
                self.in_slots += 1;
            } else {
                self.others.insert(pid, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(w: &InflightWindow) -> Vec<u16> {
        w.sorted().into_iter().map(|(p, _)| p).collect()
    }

    #[test]
    fn behaves_as_an_ordered_map_of_packet_ids() {
        let mut w = InflightWindow::default();
        let mut model = BTreeMap::new();
        // Sequential ids through the wrap, acknowledged mostly in order, with a few stuck ones
        // (1, 9, 17: they collide with later ids) and a window of up to 40.
        let mut next: u16 = 1;
        let mut seed = 7u32;
        for step in 0..200_000u32 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let r = seed >> 16;
            if model.len() < 40 && !r.is_multiple_of(3) {
                while model.contains_key(&next) {
                    next = next.checked_add(1).unwrap_or(1);
                }
                assert_eq!(w.insert(next, Inflight::Release).is_some(), model.insert(next, ()).is_some());
                next = next.checked_add(1).unwrap_or(1);
            } else if let Some(&first) = model.keys().find(|p| ![1u16, 9, 17].contains(p) || step > 190_000) {
                // The oldest, or now and then one further in (out of order).
                let pid = if r.is_multiple_of(5) { *model.keys().last().unwrap() } else { first };
                assert!(w.remove(pid).is_some());
                model.remove(&pid);
            }
            assert_eq!(w.len(), model.len());
            if step.is_multiple_of(997) {
                assert_eq!(ids(&w), model.keys().copied().collect::<Vec<_>>());
            }
        }
        for p in [0u16, 2, 65535] {
            assert_eq!(w.contains(p), model.contains_key(&p));
        }
        assert!(w.slots.len() <= 128, "the array stays near twice the window: {}", w.slots.len());
    }

    #[test]
    fn an_id_stays_where_it_is_and_replacing_returns_the_old_value() {
        let mut w = InflightWindow::default();
        assert!(w.slots.is_empty(), "nothing allocated before the first message");
        // 3 and 11 share a slot of 8; with the array under half full, 11 goes beside it.
        assert!(w.insert(3, Inflight::Release).is_none());
        assert!(w.insert(11, Inflight::Release).is_none());
        assert_eq!((w.slots.len(), w.others.len()), (8, 1));
        assert!(w.remove(3).is_some());
        // 11 is replaced where it is, not put a second time into the now free slot.
        assert!(w.insert(11, Inflight::Release).is_some());
        assert_eq!(w.len(), 1);
        assert!(w.remove(11).is_some() && w.remove(11).is_none() && w.is_empty());
    }
}
