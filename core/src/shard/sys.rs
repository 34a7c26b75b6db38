//! `$SYS/` topics: this shard's counters, shard 0's totals over all shards, and the bridge's
//! per-mapping counters, published as retained QoS 0 messages.

use super::*;

impl Shard {
    /// Tells every other shard this shard's counters: the connection limit and the `$SYS`
    /// totals read them.
    pub(super) fn share_stats(&mut self) {
        let stats = self.stats();
        self.shard_stats[self.id] = stats;
        for shard in 0..self.n_shards {
            if shard != self.id {
                self.effects.to_shards.push((shard, ShardMsg::Stats { from: self.id, stats: Box::new(stats) }));
            }
        }
    }

    pub(super) fn publish_sys(&mut self, now_ms: u64) {
        self.share_stats();
        let stats = self.stats();
        let uptime = (now_ms.saturating_sub(self.started_ms) / 1000).to_string();
        let mut values = vec![(format!("$SYS/broker/shard/{}/uptime", self.id), uptime.clone())];
        let fields = |s: &Stats| {
            [
                ("clients/connected", s.clients_connected),
                ("sessions", s.sessions),
                ("subscriptions/count", s.subscriptions),
                ("retained messages/count", s.retained),
                ("messages/received", s.messages_received),
                ("messages/sent", s.messages_sent),
                ("bytes/received", s.bytes_received),
                ("bytes/sent", s.bytes_sent),
                (
                    "messages/dropped",
                    s.dropped_queue_full + s.dropped_slow_qos0 + s.dropped_too_large + s.dropped_expired,
                ),
                ("clients/slow", s.slow_subscribers),
                ("store/refused", s.store_refusals),
                ("connections/preconnect", s.preconnect_connections),
                ("connections/preconnect_bytes", s.preconnect_bytes),
                ("connections/refused_preconnect", s.refused_preconnect),
                ("connections/connect_timeouts", s.connect_timeouts),
                ("clients/auth_failures", s.auth_failures),
                ("clients/auth_busy", s.auth_busy),
                ("acl/denied", s.acl_denied),
                ("acl/dropped", s.acl_dropped),
            ]
        };
        for (name, v) in fields(&stats) {
            values.push((format!("$SYS/broker/shard/{}/{name}", self.id), v.to_string()));
        }
        if self.id == 0 {
            let mut total = Stats::default();
            for s in &self.shard_stats {
                total += *s;
            }
            values.push(("$SYS/broker/uptime".into(), uptime));
            for (name, v) in fields(&total) {
                values.push((format!("$SYS/broker/{name}"), v.to_string()));
            }
        }
        for (name, cluster, ms) in self.outbox.mapping_stats() {
            let done = ms.records_produced + ms.records_failed + ms.records_invalid;
            let [b1, b10, b100, b1000, bmore] = ms.batch_records;
            for (field, v) in [
                ("messages/received", ms.messages_in),
                ("bytes/received", ms.bytes_in),
                ("records/produced", ms.records_produced),
                ("records/failed", ms.records_failed),
                ("records/invalid", ms.records_invalid),
                ("records/retried", ms.records_retried),
                ("records/spilled", ms.records_spilled),
                ("records/dropped", ms.records_dropped),
                ("latency_us/avg", ms.latency_us_sum.checked_div(done).unwrap_or(0)),
                ("latency_us/max", ms.latency_us_max),
                ("batch_records/1", b1),
                ("batch_records/2-10", b10),
                ("batch_records/11-100", b100),
                ("batch_records/101-1000", b1000),
                ("batch_records/1001+", bmore),
            ] {
                values.push((format!("$SYS/broker/shard/{}/kafka/{name}/{cluster}/{field}", self.id), v.to_string()));
            }
        }
        for (name, c) in self.inbound.counters() {
            for (field, v) in [
                ("records/received", c.records_read),
                ("messages/published", c.messages_published),
                ("records/skipped", c.records_skipped),
            ] {
                values.push((format!("$SYS/broker/shard/{}/kafka_to_mqtt/{name}/{field}", self.id), v.to_string()));
            }
        }
        self.feed_sys(&mut values);
        if let Some((backlog, disk, replayed)) = self.spill_stats {
            values.push((format!("$SYS/broker/shard/{}/spill/records", self.id), backlog.to_string()));
            values.push((format!("$SYS/broker/shard/{}/spill/disk_bytes", self.id), disk.to_string()));
            values.push((format!("$SYS/broker/shard/{}/spill/replayed", self.id), replayed.to_string()));
        }
        if !self.outbox.router().is_empty() {
            values.push((format!("$SYS/broker/shard/{}/kafka/pending", self.id), self.outbox.pending().to_string()));
        }
        let backlog: usize = self.retained_feeds.values().map(|f| f.backlog.len()).sum();
        for (field, v) in [
            ("scans/open", self.retained_scans.open_count() as u64),
            ("scans/waiting", self.retained_scans.waiting_count() as u64),
            ("scans/queued", self.retained_scans.queued_total),
            ("feed/backlog", backlog as u64),
        ] {
            values.push((format!("$SYS/broker/shard/{}/retained messages/{field}", self.id), v.to_string()));
        }
        let origin: ClientId = Arc::from("$SYS");
        for (topic, value) in values {
            let msg = Arc::new(Message {
                topic,
                payload: Bytes::from(value),
                qos: 0,
                retain: true,
                properties: None,
                expiry_at_ms: None,
                origin: origin.clone(),
            });
            self.route(msg, &mut Routing::default(), now_ms);
        }
    }
}
