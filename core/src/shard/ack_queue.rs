//! The acknowledgements one connection owes its client, in PUBLISH order.
//!
//! MQTT requires PUBACK/PUBREC in the order the PUBLISHes arrived. An acknowledgement may wait
//! for several things (Kafka records, congested queues, a receipt, a store commit); each
//! waiter names it by its sequence number, and whichever finishes first, only the front of the
//! queue leaves. A failure anywhere makes the acknowledgement report the first failure's code.
//!
//! Invariants: sequence numbers grow by one per PUBLISH and are never reused on a connection,
//! so a stale waiter (its acknowledgement already gone) finds nothing and does nothing; an
//! acknowledgement leaves only when it waits for nothing and every earlier one has left.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::packet::reason;

/// An acknowledgement not yet sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PendingAck {
    pub(super) pid: u16,
    pub(super) qos: u8,
    /// Things it still waits for.
    waiting: u32,
    /// First failure's reason code, or success.
    pub(super) code: u8,
    /// The first failure's reason string (MQTT 5), if it has one.
    pub(super) reason: Option<Arc<str>>,
}

#[derive(Debug, Default)]
pub(super) struct AckQueue {
    acks: VecDeque<PendingAck>,
    /// Sequence number of the front acknowledgement.
    front_seq: u64,
}

impl AckQueue {
    /// Queues the acknowledgement of `pid` waiting for `waiting` things; returns its number.
    pub(super) fn push(&mut self, pid: u16, qos: u8, waiting: u32) -> u64 {
        let seq = self.front_seq + self.acks.len() as u64;
        self.acks.push_back(PendingAck { pid, qos, waiting, code: reason::SUCCESS, reason: None });
        seq
    }

    /// An acknowledgement that waits for nothing, with none queued before it, leaves at once
    /// (what [`AckQueue::push`] then [`AckQueue::pop_ready`] would do): uses up its number and
    /// returns true; false (nothing changed) when others are queued.
    pub(super) fn pass_through(&mut self) -> bool {
        if !self.acks.is_empty() {
            return false;
        }
        self.front_seq += 1;
        true
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut PendingAck> {
        let i = seq.checked_sub(self.front_seq)?;
        self.acks.get_mut(usize::try_from(i).ok()?)
    }

    /// One thing `seq` waited for happened; `failure` is its reason code if it failed. Returns
    /// whether `seq` was still queued.
    pub(super) fn done(&mut self, seq: u64, failure: Option<u8>) -> bool {
        let Some(a) = self.get_mut(seq) else { return false };
        a.waiting = a.waiting.saturating_sub(1);
        if let Some(code) = failure {
            if a.code == reason::SUCCESS {
                a.code = code;
            }
        }
        true
    }

    /// [`AckQueue::done`] with a failure that has a reason string.
    pub(super) fn done_with_reason(&mut self, seq: u64, code: u8, why: &str) -> bool {
        let Some(a) = self.get_mut(seq) else { return false };
        a.waiting = a.waiting.saturating_sub(1);
        if a.code == reason::SUCCESS {
            a.code = code;
            a.reason = Some(Arc::from(why));
        }
        true
    }

    /// `seq` will report `code` unless it already reports a failure (it still waits as before).
    pub(super) fn fail(&mut self, seq: u64, code: u8) {
        if let Some(a) = self.get_mut(seq) {
            if a.code == reason::SUCCESS {
                a.code = code;
            }
        }
    }

    /// The front acknowledgement, if it waits for nothing: it leaves the queue.
    pub(super) fn pop_ready(&mut self) -> Option<PendingAck> {
        if self.acks.front()?.waiting > 0 {
            return None;
        }
        self.front_seq += 1;
        self.acks.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(q: &mut AckQueue) -> Vec<(u16, u8)> {
        std::iter::from_fn(|| q.pop_ready()).map(|a| (a.pid, a.code)).collect()
    }

    #[test]
    fn acknowledgements_leave_in_publish_order_whatever_order_their_waits_end_in() {
        let mut q = AckQueue::default();
        let a = q.push(1, 1, 2);
        let b = q.push(2, 1, 1);
        let c = q.push(3, 2, 0);
        assert!(q.done(b, None));
        assert_eq!(ready(&mut q), vec![], "1 still waits, so 2 and 3 wait behind it");
        assert!(q.done(a, None));
        assert_eq!(ready(&mut q), vec![]);
        assert!(q.done(a, None));
        assert_eq!(ready(&mut q), vec![(1, 0), (2, 0), (3, 0)]);
        let _ = c;
    }

    #[test]
    fn the_first_failure_is_what_the_acknowledgement_reports() {
        let mut q = AckQueue::default();
        let a = q.push(1, 1, 2);
        q.done(a, Some(reason::QUOTA_EXCEEDED));
        q.done(a, Some(reason::UNSPECIFIED_ERROR));
        assert_eq!(ready(&mut q), vec![(1, reason::QUOTA_EXCEEDED)]);
        let b = q.push(2, 1, 1);
        q.fail(b, reason::UNSPECIFIED_ERROR);
        assert_eq!(ready(&mut q), vec![], "a failure noted ahead still waits");
        q.done(b, None);
        assert_eq!(ready(&mut q), vec![(2, reason::UNSPECIFIED_ERROR)]);
    }

    #[test]
    fn an_acknowledgement_passes_through_only_an_empty_queue_and_uses_up_its_number() {
        let mut q = AckQueue::default();
        assert!(q.pass_through());
        let first = q.push(1, 1, 1);
        assert_eq!(first, 1, "the number passed through is used up");
        assert!(!q.pass_through(), "behind one that waits, it queues");
        assert!(q.done(first, None));
        assert_eq!(ready(&mut q), [(1, reason::SUCCESS)]);
        assert!(q.pass_through());
        assert_eq!(q.push(3, 1, 0), 3);
    }

    #[test]
    fn a_stale_waiter_finds_nothing() {
        let mut q = AckQueue::default();
        let a = q.push(1, 1, 0);
        assert_eq!(ready(&mut q).len(), 1);
        assert!(!q.done(a, Some(reason::UNSPECIFIED_ERROR)));
        let b = q.push(2, 1, 1);
        assert_ne!(a, b, "numbers are not reused");
        assert!(!q.done(b + 5, None));
    }
}
