//! One partition's producer for one shard: linger, batch, produce, retry, report.
//!
//! One produce request is in flight at a time, and a failed batch is retried before anything
//! queued behind it, so the partition receives records in hand-over order (MQTT per-topic order).
//! A batch Kafka refuses as too large is split and its records sent one by one, so one oversized
//! record does not take its neighbours down with it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rskafka::chrono::{TimeZone, Utc};
use rskafka::client::partition::{Compression as RsCompression, PartitionClient};
use rskafka::record::Record;
use sluice_core::bridge::{ProduceError, ProduceRequest, ProduceResult};
use sluice_core::config::Compression;
use tokio::sync::mpsc;

use crate::cluster::{classify, is_connection_error, retryable, Cluster};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct WorkerKey {
    pub cluster: u16,
    pub topic: Arc<str>,
    pub partition: i32,
}

pub(crate) struct Item {
    pub req: ProduceRequest,
    /// False for dead-letter copies: their outcome is not the publisher's business.
    pub report: bool,
    /// When the record fails if Kafka has not acknowledged it.
    pub deadline: Instant,
    pub enqueued: Instant,
}

fn compression(c: Compression) -> RsCompression {
    match c {
        Compression::None => RsCompression::NoCompression,
        Compression::Gzip => RsCompression::Gzip,
        Compression::Lz4 => RsCompression::Lz4,
        Compression::Snappy => RsCompression::Snappy,
        Compression::Zstd => RsCompression::Zstd,
    }
}

/// The record rskafka sends for `req` (public for the batching bench in `benches/`).
pub fn to_record(req: &ProduceRequest) -> Record {
    let r = &req.record;
    Record {
        key: r.key.as_ref().map(|k| k.to_vec()),
        value: Some(r.value.to_vec()),
        headers: r.headers.iter().map(|(k, v)| (k.clone(), v.to_vec())).collect::<BTreeMap<_, _>>(),
        timestamp: Utc.timestamp_millis_opt(r.timestamp_ms).single().unwrap_or_default(),
    }
}

pub(crate) async fn run(
    cluster: Arc<Cluster>,
    key: WorkerKey,
    mut rx: mpsc::UnboundedReceiver<Item>,
    results: mpsc::UnboundedSender<Vec<ProduceResult>>,
    dead_letters: mpsc::UnboundedSender<ProduceRequest>,
) {
    let linger = Duration::from_millis(cluster.config().linger_ms);
    let batch_bytes = cluster.config().batch_bytes;
    let mut client: Option<PartitionClient> = None;
    let mut next: Option<Item> = None;
    loop {
        let first = match next.take() {
            Some(i) => i,
            None => match rx.recv().await {
                Some(i) => i,
                None => return,
            },
        };
        let mut bytes = first.req.record.size();
        let mut batch = vec![first];
        let linger_until = tokio::time::Instant::now() + linger;
        while bytes < batch_bytes {
            match tokio::time::timeout_at(linger_until, rx.recv()).await {
                Ok(Some(i)) => {
                    if bytes + i.req.record.size() > batch_bytes {
                        next = Some(i);
                        break;
                    }
                    bytes += i.req.record.size();
                    batch.push(i);
                }
                _ => break,
            }
        }
        let (outcomes, attempts) = produce_batch(&cluster, &key, &mut client, &batch).await;
        let n = batch.len() as u32;
        let mut out = Vec::with_capacity(batch.len());
        for (i, outcome) in batch.into_iter().zip(outcomes) {
            if let (Err(e), true) = (&outcome, i.report) {
                if let Some(record) = crate::dead_letter_copy(&i.req.record, e) {
                    let _ = dead_letters.send(ProduceRequest { id: i.req.id, record, durable: false });
                }
            }
            if i.report {
                out.push(ProduceResult {
                    id: i.req.id,
                    outcome,
                    attempts,
                    batch_records: n,
                    latency_us: i.enqueued.elapsed().as_micros() as u64,
                });
            }
        }
        if out.is_empty() {
            continue;
        }
        if results.send(out).is_err() {
            return;
        }
    }
}

/// Produces `batch`, retrying until the earliest deadline in it. Returns one outcome per record
/// and the number of produce requests it took.
async fn produce_batch(
    cluster: &Cluster,
    key: &WorkerKey,
    client: &mut Option<PartitionClient>,
    batch: &[Item],
) -> (Vec<Result<(), ProduceError>>, u32) {
    let deadline = batch.iter().map(|i| i.deadline).min().unwrap();
    let records: Vec<Record> = batch.iter().map(|i| to_record(&i.req)).collect();
    let comp = compression(cluster.config().compression);
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let res = async {
            if client.is_none() {
                *client = Some(cluster.partition_client(&key.topic, key.partition).await?);
            }
            let pc = client.as_ref().unwrap();
            match tokio::time::timeout(cluster.request_timeout(), pc.produce(records.clone(), comp)).await {
                Ok(r) => r.map(|_| ()),
                Err(_) => Err(rskafka::client::error::Error::Timeout),
            }
        }
        .await;
        let err = match res {
            Ok(()) => return (vec![Ok(()); batch.len()], attempt),
            Err(e) => e,
        };
        if let (Some(ProduceError::TooLarge), true) = (classify(&err), batch.len() > 1) {
            // Find out which records are too large, one by one, in order.
            let mut outs = Vec::with_capacity(batch.len());
            let mut attempts = attempt;
            for i in batch {
                let (one, a) = Box::pin(produce_batch(cluster, key, client, std::slice::from_ref(i))).await;
                attempts += a;
                outs.push(one.into_iter().next().unwrap());
            }
            return (outs, attempts);
        }
        if !retryable(&err) {
            let e = classify(&err).unwrap_or_else(|| ProduceError::Other(err.to_string()));
            tracing::debug!(cluster = %cluster.name, topic = %key.topic, partition = key.partition, error = %err, "Kafka refused a batch");
            return (vec![Err(e); batch.len()], attempt);
        }
        if is_connection_error(&err) || matches!(classify(&err), Some(ProduceError::UnknownTopic)) {
            *client = None;
            if is_connection_error(&err) {
                cluster.reset().await;
            }
        }
        if attempt == 1 || attempt.is_multiple_of(10) {
            tracing::warn!(cluster = %cluster.name, topic = %key.topic, partition = key.partition, attempt, error = %err,
                "produce failed; retrying until the delivery time-out");
        }
        let now = Instant::now();
        if now + backoff >= deadline {
            tokio::time::sleep_until(deadline.into()).await;
            return (vec![Err(ProduceError::TimedOut); batch.len()], attempt);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}
