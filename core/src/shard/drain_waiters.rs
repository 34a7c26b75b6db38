//! Back-pressure: what waits for a congested session's queue to drain, bounded in time.
//!
//! When a QoS 1/2 message pushes a connected session's queue past half full, whoever sent it
//! waits until that queue drained to a quarter: a publisher's acknowledgement here, or an
//! answer to another shard's receipt (so the publisher there waits as it would here). The
//! publisher's in-flight window fills instead of queues overflowing.
//!
//! Waiting is bounded: after `max_backpressure_ms` a session's publishers stop waiting, and the
//! session is *slow* — nobody waits for it again until its queue drained to a quarter or it went
//! offline; its queue follows `queue_full_policy` meanwhile. Kafka → MQTT slices are a waiter
//! kind of their own ([`DrainWaiter::Feed`]): Kafka holds those records, so they keep waiting
//! here and the feed applies its own, longer bound (`kafka_to_mqtt_max_wait_ms`).

use crate::{HashMap, HashSet};

use super::{ClientId, ConnId};

/// What waits for a congested session's queue to drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DrainWaiter {
    /// The acknowledgement number `seq` on a connection of this shard.
    Ack(ConnId, u64),
    /// A held answer to another shard's publisher receipt ([`super::receipt_book`]).
    Receipt(u64),
    /// A held answer to a Kafka → MQTT slice's receipt: not released by the back-pressure bound.
    Feed(u64),
}

/// The waiters of one congested session.
#[derive(Default)]
struct Congestion {
    /// First tick that saw them waiting; they stop waiting `max_backpressure_ms` later.
    since_ms: Option<u64>,
    waiters: Vec<DrainWaiter>,
}

/// A session that held publishers back for the bound, and the waiters let go for it.
pub(super) struct LetGo {
    pub(super) id: ClientId,
    /// It became slow now (not already slow): counted and, the first time, logged.
    pub(super) newly_slow: bool,
    pub(super) waiters: Vec<DrainWaiter>,
}

#[derive(Default)]
pub(super) struct DrainWaiters {
    by_session: HashMap<ClientId, Congestion>,
    slow: HashSet<ClientId>,
}

impl DrainWaiters {
    pub(super) fn wait(&mut self, id: &ClientId, w: DrainWaiter) {
        match self.by_session.get_mut(id) {
            Some(c) => c.waiters.push(w),
            None => {
                self.by_session.insert(id.clone(), Congestion { since_ms: None, waiters: vec![w] });
            }
        }
    }

    /// `id` drained (or went offline): everything that waited for it, and it is no longer slow.
    pub(super) fn drained(&mut self, id: &ClientId) -> Vec<DrainWaiter> {
        if self.is_idle() {
            // The common case, on every acknowledgement: no client id hashed twice for nothing.
            return Vec::new();
        }
        self.slow.remove(id);
        self.by_session.remove(id).map(|c| c.waiters).unwrap_or_default()
    }

    /// Whether nothing waits for any session.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.by_session.is_empty()
    }

    /// Whether nothing waits for any session and no session is slow.
    pub(super) fn is_idle(&self) -> bool {
        self.by_session.is_empty() && self.slow.is_empty()
    }

    /// Whether nobody waits for `id` now: it held publishers back for the bound.
    pub(super) fn is_slow(&self, id: &ClientId) -> bool {
        self.slow.contains(id)
    }

    /// Called every tick: the sessions whose waiters waited `bound_ms`, with the publishers'
    /// waiters let go (slice waiters stay, with a fresh start).
    pub(super) fn expire(&mut self, now_ms: u64, bound_ms: u64) -> Vec<LetGo> {
        let mut out = Vec::new();
        self.by_session.retain(|id, c| {
            match c.since_ms {
                None => c.since_ms = Some(now_ms),
                Some(t) if now_ms.saturating_sub(t) >= bound_ms => {
                    let (feed, publishers): (Vec<_>, Vec<_>) =
                        std::mem::take(&mut c.waiters).into_iter().partition(|w| matches!(w, DrainWaiter::Feed(_)));
                    let newly_slow = self.slow.insert(id.clone());
                    out.push(LetGo { id: id.clone(), newly_slow, waiters: publishers });
                    c.waiters = feed;
                    c.since_ms = None;
                }
                Some(_) => {}
            }
            !c.waiters.is_empty()
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishers_stop_waiting_after_the_bound_and_slice_answers_keep_waiting() {
        let mut d = DrainWaiters::default();
        let id: ClientId = "slow".into();
        d.wait(&id, DrainWaiter::Ack(1, 0));
        d.wait(&id, DrainWaiter::Feed(7));
        d.wait(&id, DrainWaiter::Receipt(8));
        assert!(d.expire(100, 1000).is_empty(), "the first tick starts the clock");
        assert!(d.expire(1099, 1000).is_empty());
        let let_go = d.expire(1100, 1000);
        assert_eq!(let_go.len(), 1);
        assert!(let_go[0].newly_slow);
        assert_eq!(let_go[0].waiters, vec![DrainWaiter::Ack(1, 0), DrainWaiter::Receipt(8)]);
        assert!(d.is_slow(&id));
        assert_eq!(d.drained(&id), vec![DrainWaiter::Feed(7)]);
        assert!(!d.is_slow(&id), "drained: publishers wait for it again");
    }
}
