//! Handler glue for back-pressure ([`drain_waiters`](super::drain_waiters)): a session that
//! drained to a quarter releases what waited for it; the tick lets publishers go after
//! `max_backpressure_ms`.

use super::*;

impl Shard {
    /// Room for `id`'s queue to move: pump it, and once it is down to a quarter, let go of what
    /// waited for it to drain.
    pub(super) fn pump_and_release(&mut self, id: &ClientId, now_ms: u64) {
        if let Some(key) = self.sessions.key_of(&**id) {
            self.pump_and_release_at(id, key, now_ms);
        }
    }

    /// [`Shard::pump_and_release`] of `id`'s session, at `key` (found in this handler).
    pub(super) fn pump_and_release_at(&mut self, id: &ClientId, key: SessionKey, now_ms: u64) {
        self.pump_at(key, now_ms);
        self.feed_retained(id, now_ms);
        if !self.drain.is_idle()
            && self.sessions.get(id).is_some_and(|s| s.queue.len() * 4 <= self.limits.max_queued_messages)
        {
            self.release_drain_waiters(id);
        }
    }

    /// A session's queue drained (or it went offline): acknowledgements and receipt answers held
    /// for it go on, and publishers wait for it again should it fill up again.
    pub(super) fn release_drain_waiters(&mut self, id: &ClientId) {
        let waiters = self.drain.drained(id);
        self.release_waiters(waiters);
    }

    pub(super) fn release_waiters(&mut self, waiters: Vec<DrainWaiter>) {
        let mut acks = Vec::new();
        for w in waiters {
            match w {
                DrainWaiter::Ack(conn, seq) => acks.push((conn, seq)),
                DrainWaiter::Receipt(h) | DrainWaiter::Feed(h) => {
                    if let Some(held) = self.receipts.drained(h) {
                        self.answer_receipt_now(held.receipt, held.more, held.stored);
                    }
                }
            }
        }
        self.release_acks(acks);
    }

    /// Back-pressure is bounded in time: publishers held for `max_backpressure_ms` by one
    /// session's queue stop waiting for it, and do not wait for it again until it drained. One
    /// subscriber that never acknowledges (or never reads) slows publishers once, briefly; it
    /// never stops them. (Kafka → MQTT slices keep waiting: the feed has its own bound.)
    pub(super) fn stop_waiting_for_slow_subscribers(&mut self, now_ms: u64) {
        let bound = self.limits.max_backpressure_ms;
        for let_go in self.drain.expire(now_ms, bound) {
            if let_go.newly_slow {
                self.stats.slow_subscribers += 1;
                if self.stats.slow_subscribers == 1 {
                    self.effects.warnings.push(format!(
                        "shard {}: client `{}` held publishers back for {bound} ms; they no longer wait for it until its queue drains, and its queue drops by queue_full_policy meanwhile (further ones are counted in $SYS/broker/shard/{}/clients/slow)",
                        self.id, let_go.id, self.id
                    ));
                }
            }
            self.release_waiters(let_go.waiters);
        }
    }
}
