//! Handler glue for receipts ([`receipt_book`](super::receipt_book)): answers arriving,
//! answering other shards (at once, or held while a session here is congested), and what a
//! completed receipt releases (an acknowledgement, or Kafka positions).

use super::*;

impl Shard {
    /// An answer to one of this shard's receipts.
    pub(super) fn on_receipt(&mut self, token: u64, more: u32, failed: bool) {
        let Some((then, failed)) = self.receipts.answer(token, more, failed) else { return };
        match then {
            ReceiptFor::Ack(conn, seq) => {
                if failed {
                    // Not durable, so not acknowledged: MQTT 5 hears 0x97, 3.1.1 nothing (it
                    // publishes again after reconnecting).
                    self.stats.store_refusals += 1;
                    self.set_ack_code(conn, seq, reason::QUOTA_EXCEEDED);
                }
                self.release_acks(vec![(conn, seq)])
            }
            ReceiptFor::Positions if failed => self.receipts.fail_batch(token),
            ReceiptFor::Positions => {
                let moves = self.receipts.complete_batch(token);
                self.inbound.move_positions(moves);
            }
        }
    }

    /// Answers `r` for what this shard just routed under it (`routing`): at once, or — when
    /// that made sessions here congested — once they drained, so that the publisher's
    /// acknowledgement on its own shard waits for a slow subscriber on this one as it would on
    /// its own. Returns the held answer's id when it is held.
    pub(super) fn answer_receipt(&mut self, r: Receipt, routing: Routing) -> Option<u64> {
        let Routing { forwards: more, stored, congested, .. } = routing;
        if congested.is_empty() {
            self.answer_receipt_now(r, more, stored);
            return None;
        }
        let h = self.receipts.hold(r, more, stored, congested.len() as u32);
        let waiter = if r.token & FEED_TOKEN != 0 { DrainWaiter::Feed(h) } else { DrainWaiter::Receipt(h) };
        for id in &congested {
            self.drain.wait(id, waiter);
        }
        Some(h)
    }

    pub(super) fn answer_receipt_now(&mut self, r: Receipt, more: u32, stored: bool) {
        if stored {
            self.commits.wait_receipt(r, more);
            self.effects.sessions_urgent = true;
        } else if r.from == self.id {
            self.on_receipt(r.token, more, false);
        } else {
            self.send_to_shard(r.from, ShardMsg::Receipt { token: r.token, more, failed: false });
        }
    }
}
