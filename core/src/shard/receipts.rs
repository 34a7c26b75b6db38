use super::*;

impl Shard {
    /// An answer to one of this shard's receipts.
    pub(super) fn on_receipt(&mut self, token: u64, more: u32, failed: bool) {
        let Some(e) = self.receipts.get_mut(&token) else { return };
        e.left = (e.left + more).saturating_sub(1);
        e.failed |= failed;
        if e.left > 0 {
            return;
        }
        let Some(done) = self.receipts.remove(&token) else { return };
        match done.then {
            ReceiptFor::Ack(conn, seq) => {
                if done.failed {
                    // Not durable, so not acknowledged: MQTT 5 hears 0x97, 3.1.1 nothing (it
                    // publishes again after reconnecting).
                    self.stats.store_refusals += 1;
                    self.set_ack_code(conn, seq, reason::QUOTA_EXCEEDED);
                }
                self.release_acks(vec![(conn, seq)])
            }
            ReceiptFor::Positions if done.failed => self.failed_position_batches.push(token),
            ReceiptFor::Positions => self.complete_position_batch(token),
        }
    }

    pub(super) fn complete_position_batch(&mut self, token: u64) {
        self.receipts_done.insert(token);
        while let Some((t, _)) = self.position_batches.front() {
            if !self.receipts_done.remove(t) {
                break;
            }
            let (_, moves) = self.position_batches.pop_front().unwrap();
            for (key, next) in moves {
                self.positions.insert(key, next);
            }
            self.positions_dirty = true;
        }
    }

    /// Answers `r` for what this shard just routed under it: at once, or — when that made
    /// sessions here congested — once they drained, so that the publisher's acknowledgement on
    /// its own shard waits for a slow subscriber on this one as it would on its own.
    pub(super) fn answer_receipt(&mut self, r: Receipt, routing: Routing) {
        let Routing { forwards: more, stored, congested, .. } = routing;
        if congested.is_empty() {
            return self.answer_receipt_now(r, more, stored);
        }
        self.next_held_receipt += 1;
        let h = self.next_held_receipt;
        let waiting = congested.len() as u32;
        self.held_receipts.insert(h, HeldReceipt { receipt: r, more, stored, waiting });
        for id in congested {
            self.drain_waiters.entry(id).or_default().waiters.push(DrainWaiter::Receipt(h));
        }
    }

    pub(super) fn answer_receipt_now(&mut self, r: Receipt, more: u32, stored: bool) {
        if stored {
            self.store_receipts.push((r, more));
            self.effects.sessions_urgent = true;
        } else if r.from == self.id {
            self.on_receipt(r.token, more, false);
        } else {
            self.send_to_shard(r.from, ShardMsg::Receipt { token: r.token, more, failed: false });
        }
    }
}
