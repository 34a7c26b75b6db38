use super::*;

impl Shard {
    /// Outcomes of records handed to Kafka.
    pub fn on_produce_results(&mut self, results: impl IntoIterator<Item = ProduceResult>, now_ms: u64) {
        let mut touched = Vec::new();
        for r in results {
            let meta = self.kafka_inflight_mapping.remove(&r.id);
            let RecordMeta { mapping, cluster, durable, qos0 } =
                meta.unwrap_or(RecordMeta { mapping: 0, cluster: 0, durable: false, qos0: false });
            if !durable {
                self.kafka_pending = self.kafka_pending.saturating_sub(1);
            }
            if qos0 {
                self.kafka_pending_qos0 = self.kafka_pending_qos0.saturating_sub(1);
            }
            let copy = self.kafka_copies.remove(&r.id);
            if let (Err(ProduceError::TimedOut), Some(record)) = (&r.outcome, copy) {
                // Kafka is down or hanging: the record goes to the spill log, the publisher
                // hears back once it is on disk, and Kafka gets it on replay.
                if !self.spilling {
                    self.spilling = true;
                    self.effects.warnings.push(format!(
                        "shard {}: Kafka timed out; QoS 1/2 records go to the spill log until Kafka takes them again",
                        self.id
                    ));
                }
                self.kafka_inflight_mapping.insert(r.id, RecordMeta { mapping, cluster, durable: true, qos0: false });
                self.mapping_stats.entry((mapping, cluster)).or_default().records_spilled += 1;
                self.effects.produce.push(ProduceRequest { id: r.id, record, durable: true });
                continue;
            }
            let ms = self.mapping_stats.entry((mapping, cluster)).or_default();
            ms.records_retried += u64::from(r.attempts.saturating_sub(1));
            ms.latency_us_sum += r.latency_us;
            ms.latency_us_max = ms.latency_us_max.max(r.latency_us);
            let bucket = match r.batch_records {
                0..=1 => 0,
                2..=10 => 1,
                11..=100 => 2,
                101..=1000 => 3,
                _ => 4,
            };
            ms.batch_records[bucket] += 1;
            match &r.outcome {
                Ok(()) => ms.records_produced += 1,
                Err(e) => {
                    ms.records_failed += 1;
                    if self.logged_failures.insert((mapping, e.cause())) {
                        let name = self.router.mapping_name(mapping).to_string();
                        self.effects.warnings.push(format!(
                            "Kafka refused records of mapping `{name}`: {} ({e:?}); further failures of this kind are counted in $SYS/broker/shard/{}/kafka/{name}/.../records/failed",
                            e.cause(),
                            self.id
                        ));
                    }
                }
            }
            // A durable record's publisher heard back when it reached the spill log.
            if !durable {
                self.resolve_waiter(r.id, &r.outcome, &mut touched);
            }
        }
        if self.kafka_copies.is_empty() && !self.held_produce.is_empty() {
            self.effects.produce.append(&mut self.held_produce);
        }
        while self.kafka_pending < self.max_pending_records {
            let Some(req) = self.qos0_waiting.pop_front() else { break };
            self.kafka_pending += 1;
            self.kafka_pending_qos0 += 1;
            self.effects.produce.push(req);
        }
        touched.dedup();
        for conn in touched {
            self.flush_acks(conn);
        }
        self.run_local(now_ms);
    }

    /// Whether QoS 1/2 records go to the spill log because Kafka timed out (`kafka-ack`).
    pub fn kafka_spilling(&self) -> bool {
        self.spilling
    }

    /// The spill log drained after an outage: QoS 1/2 records go straight to Kafka again.
    pub fn end_spilling(&mut self) {
        // Records that may still time out and go to the log must not be overtaken.
        if self.spilling && self.held_produce.is_empty() && self.kafka_copies.is_empty() {
            self.spilling = false;
            self.effects.warnings.push(format!("shard {}: spill log drained; records go straight to Kafka", self.id));
        }
    }

    /// Unix time in ms at `now_ms == 0`, for what is stored on disk (expiry survives restarts).
    pub fn set_wall_offset(&mut self, wall_offset_ms: i64) {
        self.wall_offset_ms = wall_offset_ms;
    }

    /// `local-durable` records that stay on disk behind a backlog: the net layer replays them to
    /// Kafka itself, so this state machine stops counting them as pending.
    pub fn on_spilled(&mut self, ids: &[u64]) {
        for id in ids {
            self.kafka_inflight_mapping.remove(id);
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
            self.resolve_waiter(*id, &outcome, &mut touched);
        }
        touched.dedup();
        for conn in touched {
            self.flush_acks(conn);
        }
        self.run_local(now_ms);
    }

    /// Whether so many records wait for Kafka that this shard should stop reading publishers.
    pub fn kafka_backlogged(&self) -> bool {
        let pending = match self.qos0_policy {
            Qos0Policy::BackPressure => self.kafka_pending,
            // QoS 0 records have their own bound: they never stop the shard reading.
            _ => self.kafka_pending - self.kafka_pending_qos0,
        };
        pending + self.held_produce.len() >= self.max_pending_records
    }

    /// Records handed to Kafka and not yet answered.
    pub fn kafka_pending(&self) -> usize {
        self.kafka_pending
    }
}
