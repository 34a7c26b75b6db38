//! Kafka → MQTT consumers: one task per (mapping, topic, partition), no consumer group.
//!
//! Every broker node must see every record (MQTT fan-out is per node), so each node reads all
//! partitions itself. Partitions are spread over shards, and each shard's Kafka thread reads
//! only the partitions placed on its shard (every thread finds the topic's partitions on its
//! own, so no thread waits for another). A consumer hands its records to its shard over a
//! bounded channel, so a shard that cannot keep up slows its consumers down instead of
//! buffering without bound.

use std::sync::Arc;
use std::time::Duration;

use rskafka::client::partition::{OffsetAt, PartitionClient};
use sluice_core::inbound::{InboundMappingConfig, InboundRecord, Positions, StartAt};
use tokio::sync::mpsc;

use crate::cluster::Cluster;
use crate::health::{KafkaHealth, PartitionLag};
use crate::schemas::{lock, spawn_fetch, SchemaSetup};
use sluice_schema::check::{Cache, Inbound, Outcome};

/// A mapping's record check: the operation, the thread's cache, the schemas.
pub(crate) type Check = (Inbound, Arc<std::sync::Mutex<Cache>>, Arc<SchemaSetup>);

/// A Kafka → MQTT topic that stays missing is logged again after this long.
const MISSING_TOPIC_LOG_EVERY: Duration = Duration::from_secs(60);

/// Bytes one fetch may return, and how long it waits for records (tansu holds a fetch for the
/// whole wait even when records are there, so the wait is short: it bounds delivery latency).
const FETCH_BYTES: i32 = 1 << 20;
const FETCH_WAIT_MS: i32 = 20;

/// Starts, on the calling shard's Kafka thread, the consumers of one mapping for the partitions
/// placed on `shard`; `shards[i]` receives the records of the partitions placed on shard i.
pub(crate) fn spawn(
    mapping: u16,
    cfg: InboundMappingConfig,
    cluster: Arc<Cluster>,
    shard: usize,
    shards: Vec<mpsc::Sender<Vec<InboundRecord>>>,
    positions: Arc<Positions>,
    // The records' schema check, if the mapping has one, and where lag and state are reported.
    (check, health): (Option<Check>, Arc<KafkaHealth>),
) {
    let start_topic = {
        let (cluster, name, start) = (cluster.clone(), cfg.name.clone(), cfg.start);
        let health = health.clone();
        move |topic: String| {
            let (cluster, shards, positions, name) = (cluster.clone(), shards.clone(), positions.clone(), name.clone());
            let check = check.clone();
            let health = health.clone();
            tokio::spawn(async move {
                let topic: Arc<str> = topic.into();
                // Retried every second; logged at the first failure, then at most once per
                // MISSING_TOPIC_LOG_EVERY (the state is on /readyz and the dashboard meanwhile).
                let mut last_log: Option<std::time::Instant> = None;
                let partitions = loop {
                    match cluster.partitions(&topic, std::time::Instant::now() + cluster.request_timeout()).await {
                        Ok(n) => break n,
                        Err(e) => {
                            if e == sluice_core::bridge::ProduceError::UnknownTopic {
                                health.set_inbound_missing(&name, &topic, true);
                            }
                            if last_log.is_none_or(|t| t.elapsed() >= MISSING_TOPIC_LOG_EVERY) {
                                last_log = Some(std::time::Instant::now());
                                tracing::warn!(cluster = %cluster.name, mapping = %name, %topic, error = %e, "kafka_to_mqtt: topic not available; retrying every second, logged again in {} s if still so", MISSING_TOPIC_LOG_EVERY.as_secs());
                            }
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                };
                health.set_inbound_missing(&name, &topic, false);
                if last_log.is_some() {
                    tracing::info!(cluster = %cluster.name, mapping = %name, %topic, "kafka_to_mqtt: topic available; consuming it");
                }
                let spread = topic.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(usize::from(b)));
                for p in (0..partitions).filter(|p| (spread + *p as usize) % shards.len() == shard) {
                    let stored = positions.get(&(name.clone(), topic.to_string(), p)).copied();
                    tokio::spawn(consume(
                        (mapping, name.clone().into(), health.clone()),
                        cluster.clone(),
                        (topic.clone(), p),
                        start,
                        stored,
                        shards[shard].clone(),
                        check.clone().map(|c| (c, name.clone())),
                    ));
                }
            });
        }
    };
    for topic in &cfg.kafka_topics {
        start_topic(topic.clone());
    }
    let Some(pattern) = cfg.kafka_topic_pattern.as_deref() else { return };
    let Ok(re) = sluice_core::inbound::topic_pattern(pattern) else { return };
    // Topics matching the pattern, now and later: the cluster's topic list is read again every
    // metadata_max_age_ms, and each new match gets its consumers.
    let mut started: std::collections::HashSet<String> = cfg.kafka_topics.iter().cloned().collect();
    let every = Duration::from_millis(cluster.config().metadata_max_age_ms.max(1000));
    tokio::spawn(async move {
        loop {
            let listed = match cluster.client().await {
                Ok(c) => {
                    tokio::time::timeout(cluster.request_timeout(), c.list_topics()).await.ok().and_then(|r| r.ok())
                }
                Err(_) => None,
            };
            match listed {
                Some(topics) => {
                    for t in topics {
                        if re.is_match(&t.name) && started.insert(t.name.clone()) {
                            tracing::info!(mapping = %cfg.name, topic = %t.name, "kafka_to_mqtt: topic matches the pattern; consuming it");
                            start_topic(t.name);
                        }
                    }
                }
                None => {
                    tracing::warn!(mapping = %cfg.name, "kafka_to_mqtt: cannot list topics for kafka_topic_pattern; retrying")
                }
            }
            tokio::time::sleep(every).await;
        }
    });
}

/// `(mapping, name, health)`: the mapping's index and name, and where its lag is reported.
async fn consume(
    (mapping, name, health): (u16, Arc<str>, Arc<KafkaHealth>),
    cluster: Arc<Cluster>,
    (topic, partition): (Arc<str>, i32),
    start: StartAt,
    stored: Option<i64>,
    to_shard: mpsc::Sender<Vec<InboundRecord>>,
    check: Option<(Check, String)>,
) {
    // Causes of skipped records already logged (once per mapping, topic and cause).
    let mut logged = std::collections::HashSet::new();
    let mut client: Option<PartitionClient> = None;
    // A stored position resumes exactly where the last run's delivery got to.
    let mut offset: Option<i64> = stored;
    let mut start_offset = stored;
    let mut backoff = Duration::from_millis(100);
    loop {
        let step = async {
            if client.is_none() {
                client = Some(cluster.partition_client(&topic, partition).await?);
            }
            let pc = client.as_ref().unwrap();
            let from = match offset {
                Some(o) => o,
                None => {
                    let at = match start {
                        StartAt::Earliest => OffsetAt::Earliest,
                        StartAt::Latest => OffsetAt::Latest,
                    };
                    let o = pc.get_offset(at).await?;
                    offset = Some(o);
                    start_offset.get_or_insert(o);
                    o
                }
            };
            let fetch = pc.fetch_records(from, 1..FETCH_BYTES, FETCH_WAIT_MS);
            match tokio::time::timeout(cluster.request_timeout() + Duration::from_millis(FETCH_WAIT_MS as u64), fetch)
                .await
            {
                Ok(r) => r,
                Err(_) => Err(rskafka::client::error::Error::Timeout),
            }
        }
        .await;
        match step {
            Ok((records, high_watermark)) => {
                backoff = Duration::from_millis(100);
                let mut next = records.last().map_or(offset.unwrap_or(0), |last| last.offset + 1);
                let start_offset = start_offset.unwrap_or(0);
                health.record_lag(
                    &name,
                    &topic,
                    partition,
                    PartitionLag { next_offset: next, high_watermark, start_offset },
                );
                if records.is_empty() {
                    continue;
                }
                let mut batch: Vec<InboundRecord> = records
                    .into_iter()
                    .filter(|r| r.offset >= offset.unwrap_or(0))
                    .map(|r| InboundRecord {
                        mapping,
                        topic: topic.clone(),
                        partition,
                        offset: r.offset,
                        key: r.record.key.map(bytes::Bytes::from),
                        value: r.record.value.map(bytes::Bytes::from),
                        headers: r.record.headers.into_iter().map(|(k, v)| (k, bytes::Bytes::from(v))).collect(),
                    })
                    .collect();
                if let Some(((op, cache, setup), name)) = &check {
                    if let Some(stop) = apply(op, cache, setup, &mut batch, (name, &topic, &health), &mut logged).await
                    {
                        // The registry cannot answer: this record and the rest are fetched
                        // again later (Kafka keeps them).
                        next = stop;
                        backoff = Duration::from_secs(1);
                    }
                }
                offset = Some(next);
                if !batch.is_empty() && to_shard.send(batch).await.is_err() {
                    return; // shutting down
                }
                if backoff > Duration::from_millis(100) {
                    tokio::time::sleep(backoff).await;
                }
            }
            Err(e) => {
                tracing::debug!(cluster = %cluster.name, %topic, partition, error = %e, "kafka_to_mqtt: fetch failed; retrying");
                client = None;
                if crate::cluster::is_connection_error(&e) {
                    cluster.reset().await;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Checks (and decodes) every record's value in place. A record that does not validate or
/// decode is skipped (logged once per cause); a record whose schema the registry cannot give
/// ends the batch there: its offset is returned, to be fetched again.
async fn apply(
    op: &Inbound,
    cache: &Arc<std::sync::Mutex<Cache>>,
    setup: &SchemaSetup,
    batch: &mut Vec<InboundRecord>,
    (mapping, topic, health): (&str, &str, &KafkaHealth),
    logged: &mut std::collections::HashSet<String>,
) -> Option<i64> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut kept = Vec::with_capacity(batch.len());
    let mut stop = None;
    'records: for mut r in batch.drain(..) {
        let Some(value) = r.value.clone() else {
            kept.push(r);
            continue;
        };
        // At most a few fetches per record (writer schema, then the reader's subject).
        for _ in 0..4 {
            let outcome = lock(cache).inbound(op, &value, std::time::Instant::now());
            match outcome {
                Outcome::Pass => {}
                Outcome::Replace(json) => r.value = Some(bytes::Bytes::from(json)),
                Outcome::Invalid { schema, error } => {
                    health.schemas.inbound_skipped.fetch_add(1, Relaxed);
                    let cause = format!("{schema}: {error}");
                    if logged.len() < 64 && logged.insert(cause.clone()) {
                        tracing::warn!(
                            mapping,
                            topic,
                            offset = r.offset,
                            "kafka_to_mqtt: record skipped, {cause}; further ones like it are skipped silently"
                        );
                    }
                    continue 'records;
                }
                Outcome::Wait(need) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    if lock(cache).begin_fetch(&need) {
                        spawn_fetch(setup_schemas(setup), need, move |need, result| {
                            let _ = tx.send((need, result));
                        });
                        if let Ok((need, result)) = rx.await {
                            lock(cache).store(need, result, std::time::Instant::now());
                        }
                    } else {
                        // Another consumer of this thread fetches it: look again shortly.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    continue;
                }
                Outcome::Failed(e) => {
                    health.schemas.inbound_registry_failures.fetch_add(1, Relaxed);
                    tracing::warn!(mapping, topic, offset = r.offset, error = %e, "kafka_to_mqtt: schema registry cannot answer; the record is read again later");
                    stop = Some(r.offset);
                    break 'records;
                }
            }
            kept.push(r);
            continue 'records;
        }
        stop = Some(r.offset);
        break;
    }
    *batch = kept;
    // Subjects due for a refresh (a new version): fetched in the background, the cached ones
    // serve meanwhile. The producer of this thread does the same for its records.
    let due: Vec<_> = {
        let mut c = lock(cache);
        c.take_refreshes().into_iter().filter(|n| c.begin_fetch(n)).collect()
    };
    for need in due {
        let cache = cache.clone();
        spawn_fetch(setup_schemas(setup), need, move |need, result| {
            lock(&cache).store(need, result, std::time::Instant::now());
        });
    }
    stop
}

fn setup_schemas(setup: &SchemaSetup) -> Arc<sluice_schema::check::Schemas> {
    setup.schemas()
}
