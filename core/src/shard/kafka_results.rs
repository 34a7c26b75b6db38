//! Answers from the Kafka side — produce results, records that reached the spill log, the spill
//! log draining — applied to the [`KafkaOutbox`](super::outbox::KafkaOutbox) and to the
//! acknowledgements that waited for them.

use super::*;
use outbox::Answered;

impl Shard {
    /// Outcomes of records handed to Kafka.
    pub fn on_produce_results(&mut self, results: impl IntoIterator<Item = ProduceResult>, now_ms: u64) {
        let mut touched = Vec::new();
        for r in results {
            let session_record = self.claims.session_records.waits_for(r.id).then_some((r.id, r.outcome.is_ok()));
            let answered = self.outbox.on_result(r, self.id, &mut self.effects.produce, &mut self.effects.warnings);
            if let Answered::Publisher(ack, outcome) = answered {
                self.resolve_waiter(ack, &outcome, &mut touched);
            }
            // Not when it timed out and went to the spill log instead: answered again from there.
            if let Some((id, stored)) = session_record.filter(|(id, _)| !self.outbox.tracks(*id)) {
                self.session_record_answered(id, stored, now_ms);
            }
        }
        self.outbox.release(&mut self.effects.produce);
        // Sorted first: a batch of answers touches each connection many times, interleaved.
        touched.sort_unstable();
        touched.dedup();
        for conn in touched {
            self.flush_acks(conn);
        }
        self.run_local(now_ms);
    }

    /// Whether QoS 1/2 records go to the spill log because Kafka timed out (`kafka-ack`).
    pub fn kafka_spilling(&self) -> bool {
        self.outbox.spilling()
    }

    /// The spill log drained after an outage: QoS 1/2 records go straight to Kafka again.
    pub fn end_spilling(&mut self) {
        if self.outbox.end_spilling() {
            self.effects.warnings.push(format!("shard {}: spill log drained; records go straight to Kafka", self.id));
        }
    }

    /// Unix time in ms at `now_ms == 0`, for Kafka record timestamps and what is stored on disk
    /// (expiry survives restarts).
    pub fn set_wall_offset(&mut self, wall_offset_ms: i64) {
        self.wall_offset_ms = wall_offset_ms;
        self.outbox.set_wall_offset(wall_offset_ms);
    }

    /// `local-durable` records that stay on disk behind a backlog: the net layer replays them to
    /// Kafka itself, so this state machine stops counting them as pending.
    pub fn on_spilled(&mut self, ids: &[u64], now_ms: u64) {
        for id in ids {
            self.outbox.forget(*id);
            if self.claims.session_records.waits_for(*id) {
                // On disk, and Kafka gets it from there in order: as good as answered.
                self.session_record_answered(*id, true, now_ms);
            }
        }
    }

    /// Counters of the spill log, published under `$SYS/broker/shard/N/spill/`.
    pub fn set_spill_stats(&mut self, backlog: u64, disk_bytes: u64, replayed: u64) {
        self.spill_stats = Some((backlog, disk_bytes, replayed));
    }

    /// `local-durable` records reached the spill log on disk (or could not: a full log). Their
    /// publishers' acknowledgements may go out now.
    pub fn on_durable(&mut self, ids: &[u64], outcome: Result<(), ProduceError>, now_ms: u64) {
        let mut touched = Vec::new();
        for id in ids {
            if let Some(ack) = self.outbox.durable(*id) {
                self.resolve_waiter(ack, &outcome, &mut touched);
            }
            // A failure is answered by `on_produce_results` too.
            if outcome.is_ok() && self.claims.session_records.waits_for(*id) {
                self.session_record_answered(*id, true, now_ms);
            }
        }
        // Sorted first: a batch of answers touches each connection many times, interleaved.
        touched.sort_unstable();
        touched.dedup();
        for conn in touched {
            self.flush_acks(conn);
        }
        self.run_local(now_ms);
    }

    /// Whether so many records wait for Kafka that this shard should stop reading publishers.
    pub fn kafka_backlogged(&self) -> bool {
        self.outbox.backlogged()
    }

    /// Records handed to Kafka and not yet answered.
    pub fn kafka_pending(&self) -> usize {
        self.outbox.pending()
    }
}
