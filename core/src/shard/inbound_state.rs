//! Kafka → MQTT state besides the feed: the mappings that turn records into MQTT messages,
//! their counters, and the consumer positions this shard has finished.
//!
//! Positions move only through [`ReceiptBook`](super::receipt_book::ReceiptBook) slices: a
//! partition's next offset here is past a record only once every shard handed that record's
//! messages on and committed what it queued for persistent sessions. The caller stores them
//! ([`Shard::take_positions`](super::Shard::take_positions)); a restart consumes from there.

use crate::{HashMap, HashSet};

use crate::inbound::{Inbound, InboundRecord, Positions, Skip};
use crate::message::Message;

use super::receipt_book::{PartitionKey, PositionMoves};

/// Per Kafka → MQTT mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundCounters {
    pub records_read: u64,
    pub messages_published: u64,
    pub records_skipped: u64,
    /// `records_skipped` by cause, in the order of [`SKIP_CAUSES`].
    pub skipped_by_cause: [u64; 5],
}

/// Short names of the skip causes, in the order `skipped_by_cause` counts them (label values
/// on `/metrics`).
pub const SKIP_CAUSES: [&str; 5] = ["missing_key", "not_json", "missing_field", "not_utf8", "invalid_topic"];

fn skip_index(s: Skip) -> usize {
    match s {
        Skip::MissingKey => 0,
        Skip::NotJson => 1,
        Skip::MissingField => 2,
        Skip::NotUtf8 => 3,
        Skip::InvalidTopic => 4,
    }
}

#[derive(Default)]
pub(super) struct InboundState {
    mappings: Inbound,
    counters: Vec<InboundCounters>,
    logged_skips: HashSet<(u16, Skip)>,
    /// Next offset per consumed partition; names are looked up only when stored.
    positions: HashMap<PartitionKey, i64>,
    /// The positions moved since the caller last took them.
    moved: bool,
}

impl InboundState {
    pub(super) fn new(mappings: Inbound, count: usize) -> Self {
        InboundState { mappings, counters: vec![InboundCounters::default(); count], ..InboundState::default() }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    /// The configured name of `mapping` (`?` for an index no mapping has: records carry the
    /// index their consumer was started with, always one of ours).
    pub(super) fn mapping_name(&self, mapping: u16) -> &str {
        if usize::from(mapping) < self.counters.len() {
            self.mappings.mapping_name(mapping)
        } else {
            "?"
        }
    }

    /// The MQTT messages `r` becomes, or why it is skipped (not counted yet: see [`Self::count`]).
    pub(super) fn transform(&self, r: &InboundRecord, now_ms: u64) -> Result<Vec<Message>, Skip> {
        self.mappings.transform(r, now_ms)
    }

    /// A record of `mapping` went: it became `Ok(messages)`, or was skipped. Returns whether it
    /// is the first skip of this cause for the mapping (to be logged).
    pub(super) fn count(&mut self, mapping: u16, outcome: Result<usize, Skip>) -> bool {
        let c = self.counters.get_mut(usize::from(mapping));
        match outcome {
            Ok(n) => {
                if let Some(c) = c {
                    c.records_read += 1;
                    c.messages_published += n as u64;
                }
                false
            }
            Err(skip) => {
                if let Some(c) = c {
                    c.records_read += 1;
                    c.records_skipped += 1;
                    c.skipped_by_cause[skip_index(skip)] += 1;
                }
                self.logged_skips.insert((mapping, skip))
            }
        }
    }

    /// Completed slices: their partitions' next offsets.
    pub(super) fn move_positions(&mut self, slices: Vec<PositionMoves>) {
        for moves in slices {
            for (key, next) in moves {
                self.positions.insert(key, next);
            }
            self.moved = true;
        }
    }

    /// The positions, if they moved since the last call.
    pub(super) fn take_positions(&mut self) -> Option<Positions> {
        if !std::mem::take(&mut self.moved) {
            return None;
        }
        Some(
            self.positions
                .iter()
                .map(|((m, t, p), off)| ((self.mapping_name(*m).to_string(), t.to_string(), *p), *off))
                .collect(),
        )
    }

    /// The committed positions of the partitions of `mapping` this shard consumes.
    pub(super) fn positions_of(&self, mapping: &str) -> crate::cluster::Offsets {
        let mut out: crate::cluster::Offsets = self
            .positions
            .iter()
            .filter(|((m, _, _), _)| self.mapping_name(*m) == mapping)
            .map(|((_, t, p), off)| (t.to_string(), *p, *off))
            .collect();
        out.sort_unstable();
        out
    }

    /// `(mapping name, counters)` per mapping.
    pub(super) fn counters(&self) -> impl Iterator<Item = (&str, &InboundCounters)> {
        self.counters.iter().enumerate().map(|(i, c)| (self.mapping_name(i as u16), c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn positions_are_handed_out_once_per_move_and_counters_follow_the_records() {
        let mut s = InboundState::default();
        assert_eq!(s.take_positions(), None);
        let key: PartitionKey = (0, Arc::from("t"), 3);
        s.move_positions(vec![vec![(key.clone(), 5)], vec![(key, 9)]]);
        let p = s.take_positions().expect("moved");
        assert_eq!(p.into_iter().collect::<Vec<_>>(), vec![(("?".into(), "t".into(), 3), 9)], "the later slice wins");
        assert_eq!(s.take_positions(), None, "taken");
        let mut s = InboundState { counters: vec![InboundCounters::default()], ..InboundState::default() };
        assert!(!s.count(0, Ok(2)));
        assert!(s.count(0, Err(Skip::NotJson)), "the first skip of a cause is logged");
        assert!(!s.count(0, Err(Skip::NotJson)));
        assert_eq!(
            s.counters[0],
            InboundCounters {
                records_read: 3,
                messages_published: 2,
                records_skipped: 2,
                skipped_by_cause: [0, 2, 0, 0, 0]
            }
        );
    }
}
