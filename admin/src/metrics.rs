//! `/metrics` in the Prometheus text format (version 0.0.4), rendered from every shard's
//! [`Snapshot`] and the Kafka side's health at scrape time.
//!
//! Names follow Prometheus' conventions: `sluice_` prefix, counters end in `_total`, base units
//! (`_seconds`, `_bytes`), one `# HELP` and `# TYPE` per family. Figures that show an
//! imbalance between cores carry a `shard` label; the rest are summed over shards.

use std::collections::BTreeMap;
use std::fmt::Write;

use sluice_core::shard::{MappingStats, Snapshot, Stats, FAILURE_CAUSES, LATENCY_BUCKETS_US, SKIP_CAUSES};

use crate::server::State;

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(val));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {v}");
    }

    /// A family with one unlabelled sample.
    fn one(&mut self, name: &str, kind: &str, help: &str, v: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], v);
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub(crate) fn render(state: &State, snaps: &[Snapshot]) -> String {
    let mut o = Out(String::with_capacity(16 << 10));
    let mut total = Stats::default();
    for s in snaps {
        total += s.stats;
    }
    let shard_ids: Vec<String> = snaps.iter().map(|s| s.shard.to_string()).collect();
    let per_shard = |o: &mut Out, name: &str, kind: &str, help: &str, f: &dyn Fn(&Snapshot) -> u64| {
        o.family(name, kind, help);
        for (s, id) in snaps.iter().zip(&shard_ids) {
            o.sample(name, &[("shard", id)], f(s));
        }
    };
    per_shard(&mut o, "sluice_connections", "gauge", "Open connections (any state), per shard.", &|s| s.connections);
    per_shard(&mut o, "sluice_clients_connected", "gauge", "Clients past CONNECT, per shard.", &|s| {
        s.stats.clients_connected
    });
    o.one("sluice_sessions", "gauge", "Sessions hosted (connected or not).", total.sessions);
    o.one("sluice_subscriptions", "gauge", "Subscriptions in the shards' tries.", total.subscriptions);
    o.one("sluice_retained_messages", "gauge", "Retained messages stored.", total.retained);
    for (name, help, get) in [
        (
            "sluice_messages_received_total",
            "PUBLISH packets received from clients, by QoS and shard.",
            (|s: &Stats| s.received_by_qos) as fn(&Stats) -> [u64; 3],
        ),
        ("sluice_messages_sent_total", "PUBLISH packets written to clients, by QoS and shard.", |s: &Stats| {
            s.sent_by_qos
        }),
    ] {
        o.family(name, "counter", help);
        for (s, id) in snaps.iter().zip(&shard_ids) {
            for (q, v) in get(&s.stats).iter().enumerate() {
                o.sample(name, &[("shard", id), ("qos", &q.to_string())], v);
            }
        }
    }
    per_shard(&mut o, "sluice_received_bytes_total", "counter", "Bytes read from clients, per shard.", &|s| {
        s.stats.bytes_received
    });
    per_shard(&mut o, "sluice_sent_bytes_total", "counter", "Bytes written to clients, per shard.", &|s| {
        s.stats.bytes_sent
    });
    o.family("sluice_messages_dropped_total", "counter", "Deliveries dropped, by cause.");
    for (cause, v) in [
        ("queue_full", total.dropped_queue_full),
        ("output_buffer_full", total.dropped_slow_qos0),
        ("expired", total.dropped_expired),
        ("too_large", total.dropped_too_large),
    ] {
        o.sample("sluice_messages_dropped_total", &[("cause", cause)], v);
    }
    for (name, help, v) in [
        ("sluice_auth_failures_total", "CONNECTs refused for their credentials.", total.auth_failures),
        ("sluice_auth_busy_total", "CONNECTs refused because too many password checks were running.", total.auth_busy),
        ("sluice_acl_denied_total", "PUBLISHes, SUBSCRIBE filters and wills the ACL refused.", total.acl_denied),
        ("sluice_acl_dropped_total", "Deliveries the ACL did not let a client read.", total.acl_dropped),
        ("sluice_malformed_packets_total", "Connections closed for a malformed or over-size packet.", total.malformed),
        (
            "sluice_connect_timeouts_total",
            "Connections closed for not completing CONNECT in time.",
            total.connect_timeouts,
        ),
        (
            "sluice_preconnect_refused_total",
            "Connections closed before CONNECT by the pre-CONNECT bounds.",
            total.refused_preconnect,
        ),
        (
            "sluice_slow_subscribers_total",
            "Times a subscriber held publishers back for max_backpressure_ms.",
            total.slow_subscribers,
        ),
        (
            "sluice_store_refusals_total",
            "Acknowledgements refused because a store could not commit.",
            total.store_refusals,
        ),
        (
            "sluice_orphaned_packets_total",
            "Packets on a connection no longer holding its session.",
            total.orphaned_packets,
        ),
    ] {
        o.one(name, "counter", help, v);
    }
    o.one(
        "sluice_preconnect_buffer_bytes",
        "gauge",
        "Bytes held by connections before CONNECT.",
        total.preconnect_bytes,
    );
    o.one("sluice_uptime_seconds", "gauge", "Seconds since start.", snaps.first().map_or(0, |s| s.uptime_ms / 1000));
    o.one(
        "sluice_http_refused_connections_total",
        "counter",
        "HTTP connections closed at accept (over the bound).",
        state.refused_connections.load(std::sync::atomic::Ordering::Relaxed),
    );

    // MQTT → Kafka, per (mapping, cluster), summed over shards.
    let mut pairs: BTreeMap<(String, String), MappingStats> = BTreeMap::new();
    for s in snaps {
        for (m, c, st) in &s.mappings {
            *pairs.entry((m.clone(), c.clone())).or_default() += st;
        }
    }
    type Field = fn(&MappingStats) -> u64;
    let fields: [(&str, &str, Field); 6] = [
        ("sluice_kafka_messages_total", "MQTT messages routed to the mapping.", |m| m.messages_in),
        ("sluice_kafka_bytes_total", "Payload bytes routed to the mapping.", |m| m.bytes_in),
        ("sluice_kafka_records_produced_total", "Records Kafka acknowledged.", |m| m.records_produced),
        ("sluice_kafka_records_retried_total", "Produce attempts beyond the first, over records.", |m| {
            m.records_retried
        }),
        ("sluice_kafka_records_spilled_total", "Records that timed out and went to the spill log.", |m| {
            m.records_spilled
        }),
        ("sluice_kafka_records_dropped_total", "QoS 0 records dropped by qos0_when_backlogged.", |m| m.records_dropped),
    ];
    for (name, help, get) in fields {
        o.family(name, "counter", help);
        for ((m, c), st) in &pairs {
            o.sample(name, &[("mapping", m), ("cluster", c)], get(st));
        }
    }
    o.family("sluice_kafka_records_failed_total", "counter", "Records that failed, by cause.");
    for ((m, c), st) in &pairs {
        for (cause, v) in FAILURE_CAUSES.iter().zip(st.failed_by_cause) {
            let cause = cause.replace(' ', "_");
            o.sample("sluice_kafka_records_failed_total", &[("mapping", m), ("cluster", c), ("cause", &cause)], v);
        }
    }
    o.family(
        "sluice_kafka_records_invalid_total",
        "counter",
        "Payloads that did not validate against, or convert to, the mapping's schema, by cause.",
    );
    for ((m, c), st) in &pairs {
        for (cause, v) in sluice_core::schemas::INVALID_CAUSES.iter().zip(st.invalid_by_cause) {
            o.sample("sluice_kafka_records_invalid_total", &[("mapping", m), ("cluster", c), ("cause", cause)], v);
        }
    }
    let name = "sluice_kafka_ack_latency_seconds";
    o.family(name, "histogram", "From hand-over to the producers (right after PUBLISH) to Kafka's answer.");
    for ((m, c), st) in &pairs {
        let mut cumulative = 0;
        for (i, count) in st.latency_buckets.iter().enumerate() {
            cumulative += count;
            let le = LATENCY_BUCKETS_US.get(i).map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            o.sample(&format!("{name}_bucket"), &[("mapping", m), ("cluster", c), ("le", &le)], cumulative);
        }
        o.sample(&format!("{name}_sum"), &[("mapping", m), ("cluster", c)], st.latency_us_sum as f64 / 1e6);
        o.sample(&format!("{name}_count"), &[("mapping", m), ("cluster", c)], cumulative);
    }
    o.family("sluice_kafka_records_in_flight", "gauge", "Records routed whose Kafka answer the shards wait for.");
    for ((m, c), st) in &pairs {
        o.sample("sluice_kafka_records_in_flight", &[("mapping", m), ("cluster", c)], st.in_flight);
    }
    per_shard(
        &mut o,
        "sluice_kafka_pending_records",
        "gauge",
        "Records counted against max_pending_records_per_shard, per shard.",
        &|s| s.kafka_pending,
    );
    if let Some(k) = &state.sources.kafka {
        o.family(
            "sluice_kafka_records_dead_lettered_total",
            "counter",
            "Records sent to the mapping's dead-letter topic.",
        );
        for (m, v) in k.dead_lettered() {
            o.sample("sluice_kafka_records_dead_lettered_total", &[("mapping", &m)], v);
        }
    }

    // Spill log, per shard.
    if snaps.iter().any(|s| s.spill.is_some()) {
        per_shard(
            &mut o,
            "sluice_spill_backlog_records",
            "gauge",
            "Records in the spill log waiting for Kafka.",
            &|s| s.spill.map_or(0, |x| x.0),
        );
        per_shard(&mut o, "sluice_spill_disk_bytes", "gauge", "Bytes the spill log's segments take on disk.", &|s| {
            s.spill.map_or(0, |x| x.1)
        });
        per_shard(
            &mut o,
            "sluice_spill_replayed_records_total",
            "counter",
            "Records read back from the spill log.",
            &|s| s.spill.map_or(0, |x| x.2),
        );
        per_shard(
            &mut o,
            "sluice_spilling",
            "gauge",
            "1 while QoS 1/2 records go to the spill log (Kafka outage).",
            &|s| u64::from(s.spilling),
        );
    }

    // Kafka → MQTT, per mapping.
    let mut inbound: BTreeMap<String, sluice_core::shard::InboundCounters> = BTreeMap::new();
    for s in snaps {
        for (m, c) in &s.inbound {
            let e = inbound.entry(m.clone()).or_default();
            e.records_read += c.records_read;
            e.messages_published += c.messages_published;
            for (a, b) in e.skipped_by_cause.iter_mut().zip(c.skipped_by_cause) {
                *a += b;
            }
        }
    }
    if !inbound.is_empty() {
        o.family("sluice_kafka_to_mqtt_records_read_total", "counter", "Kafka records consumed.");
        for (m, c) in &inbound {
            o.sample("sluice_kafka_to_mqtt_records_read_total", &[("mapping", m)], c.records_read);
        }
        o.family("sluice_kafka_to_mqtt_messages_published_total", "counter", "MQTT messages made from Kafka records.");
        for (m, c) in &inbound {
            o.sample("sluice_kafka_to_mqtt_messages_published_total", &[("mapping", m)], c.messages_published);
        }
        o.family("sluice_kafka_to_mqtt_records_skipped_total", "counter", "Kafka records skipped, by cause.");
        for (m, c) in &inbound {
            for (cause, v) in SKIP_CAUSES.iter().zip(c.skipped_by_cause) {
                o.sample("sluice_kafka_to_mqtt_records_skipped_total", &[("mapping", m), ("cause", cause)], v);
            }
        }
    }
    if let Some(k) = &state.sources.kafka {
        let lag = k.lag();
        if !lag.is_empty() {
            o.family(
                "sluice_kafka_to_mqtt_lag_records",
                "gauge",
                "Records behind the partition's end (high watermark).",
            );
            for ((m, t, p), l) in &lag {
                o.sample(
                    "sluice_kafka_to_mqtt_lag_records",
                    &[("mapping", m), ("topic", t), ("partition", &p.to_string())],
                    l.lag(),
                );
            }
        }
        let sc = &k.schemas;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        o.one(
            "sluice_schema_registry_waits_total",
            "counter",
            "MQTT → Kafka records that waited for a schema from the registry.",
            load(&sc.waited),
        );
        o.one("sluice_schema_registry_waiting", "gauge", "Records waiting for the registry now.", load(&sc.waiting));
        o.one(
            "sluice_schema_registry_wait_refused_total",
            "counter",
            "Records refused because 10,000 already waited for the registry on their Kafka thread.",
            load(&sc.wait_refused),
        );
        o.one(
            "sluice_kafka_to_mqtt_schema_skipped_total",
            "counter",
            "Kafka → MQTT records skipped: they did not validate or decode.",
            load(&sc.inbound_skipped),
        );
        o.one(
            "sluice_kafka_to_mqtt_registry_failures_total",
            "counter",
            "Kafka → MQTT batches stopped because the registry could not answer (read again later).",
            load(&sc.inbound_registry_failures),
        );
        if let Some(view) = k.cluster() {
            o.family("sluice_cluster_nodes", "gauge", "Nodes of this node's cluster by state, as its heartbeats say.");
            for state in ["alive", "left", "dead"] {
                let n = view.members.iter().filter(|m| m.state.name() == state).count();
                o.sample("sluice_cluster_nodes", &[("cluster", &view.name), ("state", state)], n);
            }
            o.family(
                "sluice_cluster_wills_published_total",
                "counter",
                "Wills of connections lost with their node that this node published.",
            );
            o.sample("sluice_cluster_wills_published_total", &[("cluster", &view.name)], view.wills_published);
            o.family(
                "sluice_cluster_wills_released_again_total",
                "counter",
                "Wills released again because the survivor publishing them went before it said it sent them.",
            );
            o.sample(
                "sluice_cluster_wills_released_again_total",
                &[("cluster", &view.name)],
                view.wills_released_again,
            );
            o.family(
                "sluice_cluster_sessions_adopted_total",
                "counter",
                "Persistent sessions of dead nodes rebuilt here from the log for a client that reconnected.",
            );
            o.sample("sluice_cluster_sessions_adopted_total", &[("cluster", &view.name)], view.sessions_adopted);
            o.family(
                "sluice_cluster_adoptions_incomplete_total",
                "counter",
                "Of those, replays of the log that failed or ran out of time (sent with what they had read).",
            );
            o.sample(
                "sluice_cluster_adoptions_incomplete_total",
                &[("cluster", &view.name)],
                view.adoptions_incomplete,
            );
            o.family(
                "sluice_cluster_table_refused_total",
                "counter",
                "Entries the membership's tables did not keep because they were full, by table.",
            );
            for (table, n) in [
                ("wills", view.wills_refused),
                ("sessions", view.sessions_refused),
                ("shares", view.shares_refused),
                ("adoptions", view.adoptions_refused),
                ("ends", view.ends_refused),
            ] {
                o.sample("sluice_cluster_table_refused_total", &[("cluster", &view.name), ("table", table)], n);
            }
            o.family(
                "sluice_cluster_adopted_messages_total",
                "counter",
                "Messages queued for adopted sessions from the log, by outcome (left_out: beyond one record's bound).",
            );
            for (outcome, n) in [("queued", view.adopted_messages), ("left_out", view.adopted_left_out)] {
                o.sample("sluice_cluster_adopted_messages_total", &[("cluster", &view.name), ("outcome", outcome)], n);
            }
            let c = &total.cluster;
            o.family(
                "sluice_cluster_session_events_total",
                "counter",
                "Client ids and sessions moving between cluster nodes, by event.",
            );
            for (event, v) in [
                ("taken_over", c.taken_over),
                ("unconfirmed_closed", c.unconfirmed_closed),
                ("fenced_closed", c.fenced_closed),
                ("handed_over", c.handed_over),
                ("taken_over_in", c.taken_over_in),
                ("handover_truncated", c.handover_truncated),
                ("handover_timeout", c.handover_timeouts),
                ("handover_gap", c.handover_gap_lost),
                ("remote_session_refused", c.remote_sessions_refused),
                ("share_refused", c.shares_refused),
                ("state_record", c.state_records),
                ("state_coalesced", c.state_coalesced),
                ("state_flushed_early", c.state_flushed_early),
                ("state_failed", c.state_failed),
                ("state_stale", c.state_stale),
                ("share_redelivered", c.share_redelivered),
            ] {
                o.sample("sluice_cluster_session_events_total", &[("event", event)], v);
            }
            o.one(
                "sluice_cluster_remote_sessions",
                "gauge",
                "Client ids whose persistent session another node holds, as this node knows.",
                c.remote_sessions,
            );
            o.one(
                "sluice_cluster_session_records_in_flight",
                "gauge",
                "Persistent sessions whose Session record is on its way to Kafka (their changes meanwhile wait for its answer).",
                c.session_records_in_flight,
            );
        }
        let clusters = k.clusters();
        o.family("sluice_kafka_cluster_up", "gauge", "1 when the cluster answered the last probe.");
        for c in &clusters {
            o.sample("sluice_kafka_cluster_up", &[("cluster", &c.name)], u64::from(c.connected));
        }
        o.family("sluice_kafka_cluster_probe_failures_total", "counter", "Probes of the cluster that failed.");
        for c in &clusters {
            o.sample("sluice_kafka_cluster_probe_failures_total", &[("cluster", &c.name)], c.probe_failures);
        }
        o.family(
            "sluice_kafka_cluster_last_error_info",
            "gauge",
            "The cluster's last error, as a label (1 when there is one).",
        );
        for c in &clusters {
            if let Some(e) = &c.last_error {
                o.sample("sluice_kafka_cluster_last_error_info", &[("cluster", &c.name), ("error", e)], 1);
            }
        }
        let produce = k.produce_totals();
        for (name, help, value) in [
            (
                "sluice_kafka_produce_requests_total",
                "Produce requests sent (each carries at most one batch per partition of one broker, up to 1 MiB of records).",
                (|t| t.requests) as fn(&sluice_kafka::health::ProduceTotals) -> u64,
            ),
            ("sluice_kafka_produce_batches_total", "Record batches sent in produce requests.", |t| t.batches),
            (
                "sluice_kafka_produce_batch_records_total",
                "Records in the batches sent (a retried batch counts again).",
                |t| t.records,
            ),
            ("sluice_kafka_produce_batch_bytes_total", "Bytes of the batches sent, as encoded.", |t| t.bytes),
        ] {
            o.family(name, "counter", help);
            for (c, t) in &produce {
                o.sample(name, &[("cluster", c)], value(t));
            }
        }
        o.family("sluice_kafka_topic_missing", "gauge", "1 per topic a mapping names that the cluster lacks.");
        for c in &clusters {
            for (m, t) in &c.missing_topics {
                o.sample("sluice_kafka_topic_missing", &[("cluster", &c.name), ("mapping", m), ("topic", t)], 1);
            }
        }
        for (m, t, _) in k.inbound_missing() {
            o.sample("sluice_kafka_topic_missing", &[("cluster", ""), ("mapping", &m), ("topic", &t)], 1);
        }
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_as_the_text_format_says() {
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        let mut o = Out(String::new());
        o.sample("x_total", &[("error", "no \"answer\"\n")], 1);
        assert_eq!(o.0, "x_total{error=\"no \\\"answer\\\"\\n\"} 1\n");
    }
}
