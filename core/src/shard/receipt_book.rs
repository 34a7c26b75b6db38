//! Receipts: how a shard learns that every shard finished with a message.
//!
//! A publisher's acknowledgement (and a Kafka → MQTT slice's positions) may depend on work on
//! every shard: delivering there, committing a persistent session there, a slow subscriber
//! there draining. The shard that routes such a message opens a receipt under a token and
//! counts the answers it expects ([`ShardMsg::Receipt`](super::ShardMsg::Receipt)); a shard
//! that must delay its answer (a congested session) *holds* it here until the session drained.
//! Kafka → MQTT slices also queue their consumer positions here: a slice's positions move once
//! its receipt and every earlier slice's completed, so a restart replays from the last slice
//! every shard finished.
//!
//! Invariants: a token is answered at most once per expected answer, and a receipt completes
//! exactly once (then its entry is gone, so a late answer does nothing); positions move in
//! slice order; a failed slice holds back every later one until [`ReceiptBook::retry_failed`].

use crate::{HashMap, HashSet};
use std::collections::VecDeque;
use std::sync::Arc;

use super::{ConnId, ShardId};

/// Who waits for a [`ShardMsg::Receipt`](super::ShardMsg::Receipt), and under which token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub from: ShardId,
    pub token: u64,
}

/// A consumed partition: (Kafka → MQTT mapping, topic, partition).
pub(super) type PartitionKey = (u16, Arc<str>, i32);
/// Next offsets a slice moves its partitions to.
pub(super) type PositionMoves = Vec<(PartitionKey, i64)>;

/// What completes when every shard answered a receipt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReceiptFor {
    /// A PUBACK/PUBREC `(conn, ack seq)`.
    Ack(ConnId, u64),
    /// A slice of Kafka records: their positions may move.
    Positions,
}

/// A receipt of this shard's: answers still expected, whether one of them failed, and what
/// completes when all are in.
struct ReceiptWait {
    left: u32,
    failed: bool,
    then: ReceiptFor,
}

/// An answer to another shard's receipt, held until `waiting` congested sessions drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct HeldAnswer {
    pub(super) receipt: Receipt,
    pub(super) more: u32,
    /// The routing also stored something here: the answer then waits for the commit too.
    pub(super) stored: bool,
    waiting: u32,
}

#[derive(Default)]
pub(super) struct ReceiptBook {
    next_token: u64,
    open: HashMap<u64, ReceiptWait>,
    next_held: u64,
    held: HashMap<u64, HeldAnswer>,
    /// Kafka record slices in routing order, with the positions they move.
    batches: VecDeque<(u64, PositionMoves)>,
    done_batches: HashSet<u64>,
    /// Slices whose receipt failed (a store could not commit): positions stop before them.
    failed_batches: Vec<u64>,
}

impl ReceiptBook {
    /// A new token, unique on this shard (`flag` bits are or-ed in: see `FEED_TOKEN`).
    pub(super) fn new_token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// Opens `token`: `answers` are expected, then `then` completes.
    pub(super) fn expect(&mut self, token: u64, answers: u32, then: ReceiptFor) {
        self.open.insert(token, ReceiptWait { left: answers, failed: false, then });
    }

    /// Whether `token` still waits for answers.
    pub(super) fn is_open(&self, token: u64) -> bool {
        self.open.contains_key(&token)
    }

    /// One answer to `token`, announcing `more` answers to come (forwards). Returns what
    /// completes, and whether any answer failed, once the last answer is in.
    pub(super) fn answer(&mut self, token: u64, more: u32, failed: bool) -> Option<(ReceiptFor, bool)> {
        let e = self.open.get_mut(&token)?;
        e.left = (e.left + more).saturating_sub(1);
        e.failed |= failed;
        if e.left > 0 {
            return None;
        }
        self.open.remove(&token).map(|e| (e.then, e.failed))
    }

    /// Holds an answer to `receipt` until `waiting` sessions drained; returns its id.
    pub(super) fn hold(&mut self, receipt: Receipt, more: u32, stored: bool, waiting: u32) -> u64 {
        self.next_held += 1;
        self.held.insert(self.next_held, HeldAnswer { receipt, more, stored, waiting });
        self.next_held
    }

    /// One session a held answer waited for drained: the answer, once none is left.
    pub(super) fn drained(&mut self, held: u64) -> Option<HeldAnswer> {
        let h = self.held.get_mut(&held)?;
        h.waiting = h.waiting.saturating_sub(1);
        if h.waiting > 0 {
            return None;
        }
        self.held.remove(&held)
    }

    /// A held answer goes now, whatever it waited for (the Kafka feed's time bound).
    pub(super) fn release_held(&mut self, held: u64) -> Option<HeldAnswer> {
        self.held.remove(&held)
    }

    pub(super) fn is_held(&self, held: u64) -> bool {
        self.held.contains_key(&held)
    }

    /// A slice of Kafka records routed under `token` moves these positions once it completes.
    pub(super) fn push_batch(&mut self, token: u64, moves: PositionMoves) {
        self.batches.push_back((token, moves));
    }

    /// The slice under `token` completed: the positions that may move now, in order (its own
    /// and later completed ones, once every earlier slice completed).
    pub(super) fn complete_batch(&mut self, token: u64) -> Vec<PositionMoves> {
        self.done_batches.insert(token);
        let mut out = Vec::new();
        while let Some((t, _)) = self.batches.front() {
            if !self.done_batches.remove(t) {
                break;
            }
            if let Some((_, moves)) = self.batches.pop_front() {
                out.push(moves);
            }
        }
        out
    }

    /// The slice under `token` failed: its positions (and later ones) wait for a retry.
    pub(super) fn fail_batch(&mut self, token: u64) {
        self.failed_batches.push(token);
    }

    /// The store works again: failed slices count as complete.
    pub(super) fn retry_failed(&mut self) -> Vec<PositionMoves> {
        let mut out = Vec::new();
        for t in std::mem::take(&mut self.failed_batches) {
            out.extend(self.complete_batch(t));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moves(n: i64) -> PositionMoves {
        vec![((0, Arc::from("t"), 0), n)]
    }

    #[test]
    fn a_receipt_completes_once_when_every_announced_answer_is_in() {
        let mut b = ReceiptBook::default();
        let t = b.new_token();
        b.expect(t, 2, ReceiptFor::Ack(1, 0));
        assert_eq!(b.answer(t, 1, false), None, "one forward announced: two answers still due");
        assert_eq!(b.answer(t, 0, true), None);
        assert_eq!(b.answer(t, 0, false), Some((ReceiptFor::Ack(1, 0), true)), "a failure anywhere is reported");
        assert_eq!(b.answer(t, 0, false), None, "a late answer does nothing");
        assert!(!b.is_open(t));
    }

    #[test]
    fn a_held_answer_goes_when_its_last_session_drained() {
        let mut b = ReceiptBook::default();
        let r = Receipt { from: 1, token: 5 };
        let h = b.hold(r, 2, true, 2);
        assert_eq!(b.drained(h), None);
        let a = b.drained(h).unwrap();
        assert_eq!((a.receipt, a.more, a.stored), (r, 2, true));
        assert!(!b.is_held(h));
        assert_eq!(b.drained(h), None);
    }

    #[test]
    fn positions_move_in_slice_order_and_a_failed_slice_holds_back_later_ones() {
        let mut b = ReceiptBook::default();
        let (t1, t2, t3) = (b.new_token(), b.new_token(), b.new_token());
        for (t, n) in [(t1, 1), (t2, 2), (t3, 3)] {
            b.push_batch(t, moves(n));
        }
        assert!(b.complete_batch(t2).is_empty(), "t1 is not done yet");
        b.fail_batch(t1);
        assert!(b.complete_batch(t3).is_empty());
        assert_eq!(b.retry_failed(), vec![moves(1), moves(2), moves(3)]);
    }
}
