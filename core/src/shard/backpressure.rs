use super::*;

impl Shard {
    /// Room for `id`'s queue to move: pump it, and once it is down to a quarter, let go of what
    /// waited for it to drain.
    pub(super) fn pump_and_release(&mut self, id: &ClientId, now_ms: u64) {
        self.pump(id, now_ms);
        self.feed_retained(id, now_ms);
        if self.sessions.get(id).is_some_and(|s| s.queue.len() * 4 <= self.limits.max_queued_messages) {
            self.slow.remove(id);
            self.release_drain_waiters(id);
        }
    }

    /// A session's queue drained (or it went offline): acknowledgements and receipt answers held
    /// for it go on.
    pub(super) fn release_drain_waiters(&mut self, id: &ClientId) {
        let Some(congestion) = self.drain_waiters.remove(id) else { return };
        self.release_waiters(congestion.waiters);
    }

    pub(super) fn release_waiters(&mut self, waiters: Vec<DrainWaiter>) {
        let mut acks = Vec::new();
        for w in waiters {
            match w {
                DrainWaiter::Ack(conn, seq) => acks.push((conn, seq)),
                DrainWaiter::Receipt(h) => {
                    let Some(held) = self.held_receipts.get_mut(&h) else { continue };
                    held.waiting -= 1;
                    if held.waiting == 0 {
                        if let Some(held) = self.held_receipts.remove(&h) {
                            self.answer_receipt_now(held.receipt, held.more, held.stored);
                        }
                    }
                }
            }
        }
        self.release_acks(acks);
    }

    /// Back-pressure is bounded in time: publishers held for `max_backpressure_ms` by one
    /// session's queue stop waiting for it, and do not wait for it again until it drained. One
    /// subscriber that never acknowledges (or never reads) slows publishers once, briefly; it
    /// never stops them.
    pub(super) fn stop_waiting_for_slow_subscribers(&mut self, now_ms: u64) {
        let bound = self.limits.max_backpressure_ms;
        let mut stuck = Vec::new();
        for (id, c) in &mut self.drain_waiters {
            match c.since_ms {
                None => c.since_ms = Some(now_ms),
                Some(t) if now_ms.saturating_sub(t) >= bound => stuck.push(id.clone()),
                Some(_) => {}
            }
        }
        for id in stuck {
            let newly = self.slow.insert(id.clone());
            if newly {
                self.stats.slow_subscribers += 1;
            }
            if newly && self.stats.slow_subscribers == 1 {
                self.effects.warnings.push(format!(
                    "shard {}: client `{id}` held publishers back for {bound} ms; they no longer wait for it until its queue drains, and its queue drops by queue_full_policy meanwhile (further ones are counted in $SYS/broker/shard/{}/clients/slow)",
                    self.id, self.id
                ));
            }
            // Publishers go on. Kafka → MQTT slices keep waiting: Kafka holds those records,
            // and the feed has its own, longer bound (`kafka_to_mqtt_max_wait_ms`).
            let Some(c) = self.drain_waiters.get_mut(&id) else { continue };
            let held = &self.held_receipts;
            let is_feed = |w: &DrainWaiter| match w {
                DrainWaiter::Receipt(h) => held.get(h).is_some_and(|r| r.receipt.token & FEED_TOKEN != 0),
                DrainWaiter::Ack(..) => false,
            };
            let (feed, publishers): (Vec<_>, Vec<_>) = std::mem::take(&mut c.waiters).into_iter().partition(is_feed);
            if feed.is_empty() {
                self.drain_waiters.remove(&id);
            } else {
                c.waiters = feed;
                c.since_ms = None;
            }
            self.release_waiters(publishers);
        }
    }
}
