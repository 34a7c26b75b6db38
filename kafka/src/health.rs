//! What the Kafka side tells an operator: whether each cluster answers, its last error, which
//! mappings name a topic the cluster does not have, records dead-lettered per mapping, and how
//! far each Kafka → MQTT partition's consumer is behind the partition's end.
//!
//! One [`KafkaHealth`] is shared by the Kafka threads and read by the HTTP endpoint. It is off
//! the shards entirely, and off the per-record path of the Kafka threads too: the probe writes
//! once per probe, a consumer once per fetch, a producer once per dead-lettered record (each
//! an uncontended lock or a relaxed atomic).
//!
//! The probe ([`probe`]) runs on shard 0's Kafka thread with clients of its own: every
//! [`PROBE_INTERVAL`] it lists each cluster's topics within [`PROBE_TIMEOUT`] (so a paused
//! broker shows as unreachable within seconds, whatever `request_timeout_ms` says), and checks
//! every mapping's fixed topics against the list. Each change (reachable ↔ not, a topic found
//! missing) is logged once, in words that say how to fix it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_core::bridge::MappingConfig;
use sluice_core::inbound::InboundMappingConfig;

use crate::cluster::Cluster;

/// How often the probe asks each cluster for its topics.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a probe waits for an answer before the cluster counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Partitions whose lag is kept, at most (the rest are not reported).
pub const LAG_PARTITIONS_MAX: usize = 10_000;
/// Topics whose partition count is kept per cluster (for the live view's placement), at most.
pub const TOPICS_MAX: usize = 10_000;

/// One cluster as the probe last saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub name: String,
    /// Some mapping sends to or reads from it (only those decide readiness).
    pub needed: bool,
    /// The probe has an answer (either way) at least once.
    pub checked: bool,
    pub connected: bool,
    pub last_error: Option<String>,
    /// `(mapping, topic)` a mapping names and the cluster lacks (and will not create).
    pub missing_topics: Vec<(String, String)>,
    /// Probes that failed since start.
    pub probe_failures: u64,
}

/// One Kafka → MQTT partition's consumer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionLag {
    /// Next offset the consumer reads.
    pub next_offset: i64,
    /// The partition's high watermark in the last fetch.
    pub high_watermark: i64,
    /// Where this run's consumer started: no record below it is routed in this run (a
    /// node's floor, `crate::membership`, falls back to it).
    pub start_offset: i64,
}

impl PartitionLag {
    pub fn lag(&self) -> i64 {
        (self.high_watermark - self.next_offset).max(0)
    }
}

/// The cluster as this node sees it (`[cluster]`; see `crate::membership`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterView {
    pub name: String,
    pub node: String,
    /// Every internal topic exists.
    pub topics_ready: bool,
    pub members: Vec<sluice_core::cluster::Member>,
    pub last_error: Option<String>,
    /// This node's floor as its last heartbeat said (see `crate::membership`).
    pub floor: Option<sluice_core::cluster::Offsets>,
    /// Dead nodes' persistent sessions rebuilt here for a client that reconnected, the
    /// messages queued for them from the log, and those left out (a record's bound).
    pub sessions_adopted: u64,
    pub adopted_messages: u64,
    pub adopted_left_out: u64,
    /// Of those, replays that failed or ran out of time (sent with what they had read).
    pub adoptions_incomplete: u64,
    /// This node has heard its own heartbeats for `dead_after_ms`: only now does it declare
    /// other nodes dead and release their wills.
    pub settled: bool,
    /// Wills of other nodes' clients known here now; wills of lost connections this node
    /// published, since start; wills released again because their publisher went before it
    /// said it sent them.
    pub wills_held: u64,
    pub wills_published: u64,
    pub wills_released_again: u64,
    /// Entries of the membership's tables not kept because the table was full (each logged
    /// once): other nodes' wills (`membership::WILLS_MAX`), persistent sessions
    /// (`REGISTRY_MAX`), shared-subscription groups per node (`WILLS_MAX`), and claims of
    /// this node's clients waiting for a dead node's session (`ADOPT_MAX`); and session ends
    /// forgotten before their five minutes (`ENDED_MAX`).
    pub wills_refused: u64,
    pub sessions_refused: u64,
    pub shares_refused: u64,
    pub adoptions_refused: u64,
    pub ends_refused: u64,
}

/// Payload schema work off the shards, summed over the Kafka threads (relaxed atomics, bumped
/// once per record that waits or is refused, never per record checked).
#[derive(Default)]
pub struct SchemaCounters {
    /// MQTT → Kafka records that waited for a schema from the registry, since start.
    pub waited: AtomicU64,
    /// Records waiting for the registry now (a gauge).
    pub waiting: AtomicU64,
    /// Records refused because `schemas::PARKED_MAX` already waited on their thread.
    pub wait_refused: AtomicU64,
    /// Kafka → MQTT records skipped because they did not validate or decode.
    pub inbound_skipped: AtomicU64,
    /// Kafka → MQTT batches stopped because the registry could not answer (read again later).
    pub inbound_registry_failures: AtomicU64,
}

/// One shard's produce requests to one cluster, since start (relaxed atomics bumped once per
/// request, by that shard's Kafka thread only, on a cache line of their own: no two threads
/// write one line). What they say: records per batch and bytes per request, the figures that
/// decide what a produce costs the brokers.
#[derive(Default)]
#[repr(align(64))]
pub struct ProduceCounters {
    pub requests: AtomicU64,
    pub batches: AtomicU64,
    /// Records in those batches (a retried batch counts again).
    pub records: AtomicU64,
    /// Bytes of the encoded batches (after compression).
    pub bytes: AtomicU64,
}

impl ProduceCounters {
    pub(crate) fn count(&self, batches: u64, records: u64, bytes: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.batches.fetch_add(batches, Ordering::Relaxed);
        self.records.fetch_add(records, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// [`ProduceCounters`] of one cluster summed over the shards.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProduceTotals {
    pub requests: u64,
    pub batches: u64,
    pub records: u64,
    pub bytes: u64,
}

/// Shared by the Kafka threads and the HTTP endpoint (see the module doc).
pub struct KafkaHealth {
    pub schemas: SchemaCounters,
    /// `[shard][cluster]`.
    produce: Vec<Vec<ProduceCounters>>,
    cluster: Mutex<Option<ClusterView>>,
    clusters: Mutex<Vec<ClusterState>>,
    /// `(mapping, topic, partition)` → lag.
    lag: Mutex<BTreeMap<(String, String, i32), PartitionLag>>,
    /// Kafka → MQTT mappings whose topic is missing: `(mapping, topic, attempts so far)`.
    inbound_missing: Mutex<Vec<(String, String, u64)>>,
    /// Per MQTT → Kafka mapping (index as the router numbers them).
    dead_lettered: Vec<AtomicU64>,
    mapping_names: Vec<String>,
    /// Per cluster (index), partitions of each topic, as the last probe listed them.
    partitions: Mutex<Vec<std::collections::HashMap<String, i32>>>,
}

impl KafkaHealth {
    pub(crate) fn new(cluster_names: &[String], needed: &[bool], outbound: &[MappingConfig], shards: usize) -> Self {
        let clusters = cluster_names
            .iter()
            .zip(needed)
            .map(|(name, &needed)| ClusterState { name: name.clone(), needed, ..ClusterState::default() })
            .collect();
        KafkaHealth {
            schemas: SchemaCounters::default(),
            produce: (0..shards).map(|_| cluster_names.iter().map(|_| ProduceCounters::default()).collect()).collect(),
            cluster: Mutex::new(None),
            clusters: Mutex::new(clusters),
            lag: Mutex::new(BTreeMap::new()),
            inbound_missing: Mutex::new(Vec::new()),
            dead_lettered: outbound.iter().map(|_| AtomicU64::new(0)).collect(),
            mapping_names: outbound.iter().map(|m| m.name.clone()).collect(),
            partitions: Mutex::new(vec![Default::default(); cluster_names.len()]),
        }
    }

    /// The node's cluster, when it is in one.
    pub fn cluster(&self) -> Option<ClusterView> {
        self.cluster.lock().ok()?.clone()
    }

    pub(crate) fn set_cluster(&self, v: ClusterView) {
        if let Ok(mut c) = self.cluster.lock() {
            *c = Some(v);
        }
    }

    pub(crate) fn update_cluster(&self, f: impl FnOnce(&mut ClusterView)) {
        if let Ok(mut c) = self.cluster.lock() {
            if let Some(v) = c.as_mut() {
                f(v);
            }
        }
    }

    pub(crate) fn cluster_error(&self, e: String) {
        self.update_cluster(|v| v.last_error = Some(e));
    }

    pub fn clusters(&self) -> Vec<ClusterState> {
        self.clusters.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Shard `shard`'s counters for cluster `cluster` (by the router's numbering).
    pub(crate) fn produce_counters(&self, shard: usize, cluster: usize) -> Option<&ProduceCounters> {
        self.produce.get(shard)?.get(cluster)
    }

    /// `(cluster, its produce requests summed over the shards)`, in the router's order.
    pub fn produce_totals(&self) -> Vec<(String, ProduceTotals)> {
        let names = self.clusters().into_iter().map(|c| c.name);
        names
            .enumerate()
            .map(|(i, name)| {
                let mut t = ProduceTotals::default();
                for c in self.produce.iter().filter_map(|s| s.get(i)) {
                    t.requests += c.requests.load(Ordering::Relaxed);
                    t.batches += c.batches.load(Ordering::Relaxed);
                    t.records += c.records.load(Ordering::Relaxed);
                    t.bytes += c.bytes.load(Ordering::Relaxed);
                }
                (name, t)
            })
            .collect()
    }

    /// Every cluster a mapping needs answered the last probe.
    pub fn kafka_ready(&self) -> bool {
        self.clusters().iter().filter(|c| c.needed).all(|c| c.connected)
    }

    /// Per partition of `mapping`'s topics (topic, partition, offset), where this run's
    /// consumer started.
    pub fn start_offsets(&self, mapping: &str) -> sluice_core::cluster::Offsets {
        let Ok(l) = self.lag.lock() else { return Vec::new() };
        l.iter().filter(|((m, _, _), _)| m == mapping).map(|((_, t, p), v)| (t.clone(), *p, v.start_offset)).collect()
    }

    pub fn lag(&self) -> Vec<((String, String, i32), PartitionLag)> {
        self.lag.lock().map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
    }

    /// `(mapping, topic, attempts so far)` of Kafka → MQTT topics not found (yet).
    pub fn inbound_missing(&self) -> Vec<(String, String, u64)> {
        self.inbound_missing.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// `(mapping, records dead-lettered)` per MQTT → Kafka mapping.
    pub fn dead_lettered(&self) -> Vec<(String, u64)> {
        self.mapping_names.iter().cloned().zip(self.dead_lettered.iter().map(|c| c.load(Ordering::Relaxed))).collect()
    }

    /// The partition a keyed record goes to (the producers' murmur2 placement), when the
    /// probe knows the topic; `None` otherwise.
    pub fn partition_for_key(&self, cluster: &str, topic: &str, key: &[u8]) -> Option<i32> {
        let i = self.mapping_cluster_index(cluster)?;
        let n = *self.partitions.lock().ok()?.get(i)?.get(topic)?;
        (n > 0).then(|| sluice_core::bridge::partition_for_key(key, n))
    }

    fn mapping_cluster_index(&self, cluster: &str) -> Option<usize> {
        self.clusters.lock().ok()?.iter().position(|c| c.name == cluster)
    }

    pub(crate) fn count_dead_letter(&self, mapping: u16) {
        if let Some(c) = self.dead_lettered.get(usize::from(mapping)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn record_lag(&self, mapping: &str, topic: &str, partition: i32, lag: PartitionLag) {
        let Ok(mut l) = self.lag.lock() else { return };
        let key = (mapping.to_string(), topic.to_string(), partition);
        if l.len() < LAG_PARTITIONS_MAX || l.contains_key(&key) {
            l.insert(key, lag);
        }
    }

    /// A Kafka → MQTT mapping's topic was missing at one more attempt (`true`), or was found.
    pub(crate) fn set_inbound_missing(&self, mapping: &str, topic: &str, missing: bool) {
        let Ok(mut m) = self.inbound_missing.lock() else { return };
        let at = m.iter().position(|(mm, t, _)| mm == mapping && t == topic);
        match (missing, at) {
            (true, Some(i)) => m[i].2 += 1,
            (true, None) => m.push((mapping.to_string(), topic.to_string(), 1)),
            (false, Some(i)) => {
                m.remove(i);
            }
            (false, None) => {}
        }
    }
}

/// The fixed Kafka topics each cluster must have: `(cluster index, mapping, topic)`.
pub(crate) fn required_topics(
    cluster_names: &[String],
    outbound: &[MappingConfig],
    inbound: &[InboundMappingConfig],
) -> Vec<(usize, String, String)> {
    let index = |name: &str| cluster_names.iter().position(|n| n == name);
    let mut out = Vec::new();
    for m in outbound {
        for d in &m.destinations {
            if let (Some(c), Some(t)) = (index(&d.cluster), d.topic.fixed_topic()) {
                out.push((c, m.name.clone(), t.to_string()));
            }
        }
        if let Some(dl) = &m.dead_letter {
            if let Some(c) = index(&dl.cluster) {
                out.push((c, format!("{} (dead letters)", m.name), dl.topic.clone()));
            }
        }
    }
    for m in inbound {
        if let Some(c) = index(&m.cluster) {
            for t in &m.kafka_topics {
                out.push((c, m.name.clone(), t.clone()));
            }
        }
    }
    out
}

/// Probes every cluster forever (see the module doc). `clusters` are the probe's own clients.
pub(crate) async fn probe(
    health: Arc<KafkaHealth>,
    clusters: Vec<Arc<Cluster>>,
    required: Vec<(usize, String, String)>,
) {
    loop {
        let started = Instant::now();
        for (i, cluster) in clusters.iter().enumerate() {
            let listed = match tokio::time::timeout(PROBE_TIMEOUT, async {
                let client = cluster.client().await?;
                client.list_topics().await
            })
            .await
            {
                Ok(Ok(topics)) => {
                    let counts: std::collections::HashMap<String, i32> =
                        topics.into_iter().take(TOPICS_MAX).map(|t| (t.name, t.partitions.len() as i32)).collect();
                    if let Some(slot) = health.partitions.lock().ok().as_mut().and_then(|p| p.get_mut(i)) {
                        *slot = counts.clone();
                    }
                    Ok(counts)
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {} ms", PROBE_TIMEOUT.as_millis())),
            };
            if listed.is_err() {
                // A broker that stopped answering: the next probe connects afresh.
                cluster.reset().await;
            }
            let auto_create = cluster.config().auto_create_topics;
            let Ok(mut states) = health.clusters.lock() else { return };
            let Some(state) = states.get_mut(i) else { continue };
            let was = state.clone();
            state.checked = true;
            match listed {
                Ok(topics) => {
                    state.connected = true;
                    state.missing_topics = required
                        .iter()
                        .filter(|(c, _, t)| *c == i && !auto_create && !topics.contains_key(t))
                        .map(|(_, m, t)| (m.clone(), t.clone()))
                        .collect();
                }
                Err(e) => {
                    state.connected = false;
                    state.probe_failures += 1;
                    state.last_error = Some(e);
                }
            }
            log_change(&was, state);
        }
        tokio::time::sleep(PROBE_INTERVAL.saturating_sub(started.elapsed())).await;
    }
}

fn log_change(was: &ClusterState, now: &ClusterState) {
    let name = &now.name;
    if now.connected && (!was.connected || !was.checked) {
        tracing::info!(cluster = %name, "Kafka cluster reachable");
    }
    if !now.connected && (was.connected || !was.checked) {
        tracing::warn!(
            cluster = %name,
            error = now.last_error.as_deref().unwrap_or(""),
            "Kafka cluster unreachable; /readyz reports not ready until it answers"
        );
    }
    for (mapping, topic) in &now.missing_topics {
        if !was.missing_topics.contains(&(mapping.clone(), topic.clone())) {
            tracing::error!(
                "mapping `{mapping}` names Kafka topic `{topic}`, which cluster `{name}` does not have: \
                 create it (kafka-topics.sh --create --topic {topic}), or set auto_create_topics = true \
                 in [kafka.clusters.{name}] (--kafka-auto-create for --kafka)"
            );
        }
    }
    for (mapping, topic) in &was.missing_topics {
        if !now.missing_topics.contains(&(mapping.clone(), topic.clone())) {
            tracing::info!(cluster = %name, %mapping, %topic, "Kafka topic now exists");
        }
    }
}
