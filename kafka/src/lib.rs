//! sluice-kafka: the producers behind the MQTT → Kafka bridge.
//!
//! # Layout
//! - [`start`]: builds one tokio runtime for all Kafka I/O and returns one [`ShardLink`] per
//!   shard. rskafka is tokio-only while the shards run on glommio, so Kafka I/O lives on its own
//!   small runtime; ownership stays per shard all the same: each shard has its own task here, its
//!   own partition workers and its own batches — nothing on the produce path is shared between
//!   shards except the rskafka connection pool of a cluster.
//! - `cluster`: a cluster's connection (built lazily, rebuilt after failures), its metadata
//!   cache and topic auto-creation.
//! - `worker`: one task per (shard, topic, partition): lingers for a batch, produces it, retries
//!   with backoff until the delivery time-out, and reports every record's outcome in order.
//!
//! Invariants: records of one partition from one shard are produced in hand-over order, one
//! request in flight at a time, so MQTT per-topic order survives retries. Every record handed over
//! gets exactly one [`ProduceResult`].

#![warn(rust_2018_idioms, unreachable_pub)]

pub mod batch;
mod cluster;
mod consumer;
mod tls;
mod worker;

pub use tls::TlsError;
pub use worker::to_record;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::bridge::{partition_for_key, KafkaRecord, ProduceError, ProduceRequest, ProduceResult};
use sluice_core::config::ClusterConfig;
use sluice_core::inbound::{InboundMappingConfig, InboundRecord, Positions};
use tokio::sync::mpsc;

use crate::cluster::Cluster;
use crate::worker::{Item, WorkerKey};

/// Batches of produce requests a shard may have queued towards its Kafka task before its sends
/// wait (the shard's own pending-record limit usually stops it first).
pub const REQUEST_CHANNEL_BATCHES: usize = 1024;

/// The shard's ends of its link to the Kafka runtime.
pub struct ShardLink {
    pub requests: mpsc::Sender<Vec<ProduceRequest>>,
    pub results: mpsc::UnboundedReceiver<Vec<ProduceResult>>,
    /// Records of the Kafka partitions placed on this shard (Kafka → MQTT).
    pub inbound: mpsc::Receiver<Vec<InboundRecord>>,
}

/// Batches of consumed records waiting for a shard before its consumers pause.
pub const INBOUND_CHANNEL_BATCHES: usize = 64;

/// The running Kafka side; dropping it stops the runtime.
pub struct KafkaBridge {
    runtime: tokio::runtime::Runtime,
}

impl KafkaBridge {
    /// Stops the producers, giving in-flight requests up to `grace` to finish.
    pub fn shutdown(self, grace: std::time::Duration) {
        self.runtime.shutdown_timeout(grace);
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("cannot start the Kafka runtime: {0}")]
    Runtime(std::io::Error),
    #[error("kafka.clusters.{cluster}.tls: {problem}")]
    Tls { cluster: String, problem: TlsError },
}

/// Starts the producers for `clusters` (in the order the router numbers them) and returns one
/// link per shard.
pub fn start(
    clusters: &BTreeMap<String, ClusterConfig>,
    inbound: &[InboundMappingConfig],
    positions: Positions,
    n_shards: usize,
) -> Result<(KafkaBridge, Vec<ShardLink>), StartError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sluice-kafka")
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let names: Vec<String> = clusters.keys().cloned().collect();
    let mut built = Vec::new();
    for (name, cfg) in clusters {
        let tls = match &cfg.tls {
            Some(t) => {
                Some(tls::client_config(t).map_err(|problem| StartError::Tls { cluster: name.clone(), problem })?)
            }
            None => None,
        };
        built.push(Arc::new(Cluster::new(name.clone(), cfg.clone(), tls)));
    }
    let clusters: Arc<[Arc<Cluster>]> = built.into();
    let mut links = Vec::with_capacity(n_shards);
    let mut inbound_tx = Vec::with_capacity(n_shards);
    for shard in 0..n_shards {
        let (req_tx, req_rx) = mpsc::channel(REQUEST_CHANNEL_BATCHES);
        let (res_tx, res_rx) = mpsc::unbounded_channel();
        let (in_tx, in_rx) = mpsc::channel(INBOUND_CHANNEL_BATCHES);
        runtime.spawn(shard_task(shard, clusters.clone(), req_rx, res_tx));
        links.push(ShardLink { requests: req_tx, results: res_rx, inbound: in_rx });
        inbound_tx.push(in_tx);
    }
    let positions = Arc::new(positions);
    for (i, m) in inbound.iter().enumerate() {
        let c = names.iter().position(|n| *n == m.cluster).expect("validated: kafka_to_mqtt names a known cluster");
        let _guard = runtime.enter();
        consumer::spawn(i as u16, m.clone(), clusters[c].clone(), inbound_tx.clone(), positions.clone());
    }
    Ok((KafkaBridge { runtime }, links))
}

/// The copy of a refused record for its mapping's dead-letter topic, if it has one: headers
/// `sluice.error` (the cause) and `sluice.topic` (where it was headed). A time-out is not a
/// refusal (Kafka may hold the record), and a record too large keeps only its metadata.
pub(crate) fn dead_letter_copy(r: &KafkaRecord, e: &ProduceError) -> Option<KafkaRecord> {
    let (cluster, topic) = r.dead_letter.clone()?;
    if matches!(e, ProduceError::TimedOut) {
        return None;
    }
    let mut d = r.clone();
    if matches!(e, ProduceError::TooLarge) {
        d.value = bytes::Bytes::new();
    }
    d.headers.push(("sluice.error".into(), bytes::Bytes::from_static(e.cause().as_bytes())));
    d.headers.push(("sluice.topic".into(), bytes::Bytes::copy_from_slice(r.topic.as_bytes())));
    d.cluster = cluster;
    d.topic = topic;
    d.dead_letter = None;
    Some(d)
}

/// One shard's producer: places each record on a partition and hands it to that partition's
/// worker, in hand-over order.
async fn shard_task(
    shard: usize,
    clusters: Arc<[Arc<Cluster>]>,
    mut requests: mpsc::Receiver<Vec<ProduceRequest>>,
    results: mpsc::UnboundedSender<Vec<ProduceResult>>,
) {
    let mut workers: HashMap<WorkerKey, mpsc::UnboundedSender<Item>> = HashMap::new();
    // Records Kafka refused come back here to go to their mapping's dead-letter topic.
    let (dl_tx, mut dl_rx) = mpsc::unbounded_channel::<ProduceRequest>();
    // Keyless records stick to one partition per topic for a batch's worth, then move on
    // (Kafka's sticky partitioner): big batches without a hot partition.
    let mut sticky: HashMap<(u16, Arc<str>), (i32, usize)> = HashMap::new();
    loop {
        let (batch, report) = tokio::select! {
            biased;
            Some(dl) = dl_rx.recv() => (vec![dl], false),
            b = requests.recv() => match b {
                Some(b) => (b, true),
                None => return,
            },
        };
        for req in batch {
            let cluster = &clusters[usize::from(req.record.cluster)];
            if req.record.size() > cluster.config().max_record_bytes {
                if report {
                    let _ = results.send(vec![ProduceResult::failed(req.id, ProduceError::TooLarge)]);
                }
                if let (Some(record), true) = (dead_letter_copy(&req.record, &ProduceError::TooLarge), report) {
                    let _ = dl_tx.send(ProduceRequest { id: req.id, record, durable: false });
                }
                continue;
            }
            let enqueued = Instant::now();
            // A durable record is safe in the spill log and its publisher was answered: it is
            // retried until Kafka takes it (a year stands in for "no deadline").
            let timeout = if req.durable { Duration::from_secs(365 * 24 * 3600) } else { cluster.delivery_timeout() };
            let deadline = enqueued + timeout;
            let partitions = match cluster.partitions(&req.record.topic, deadline).await {
                Ok(n) => n,
                Err(e) => {
                    if report {
                        if let Some(record) = dead_letter_copy(&req.record, &e) {
                            let _ = dl_tx.send(ProduceRequest { id: req.id, record, durable: false });
                        }
                        let _ = results.send(vec![ProduceResult::failed(req.id, e)]);
                    }
                    continue;
                }
            };
            let partition = match (&req.record.key, req.record.partition) {
                (_, Some(p)) if p < partitions => p,
                (_, Some(p)) => {
                    if report {
                        let _ = results.send(vec![ProduceResult::failed(
                            req.id,
                            ProduceError::Other(format!("partition {p} does not exist ({partitions} partitions)")),
                        )]);
                    }
                    continue;
                }
                (Some(k), None) => partition_for_key(k, partitions),
                (None, None) => {
                    let e = sticky
                        .entry((req.record.cluster, req.record.topic.clone()))
                        .or_insert((shard as i32 % partitions, 0));
                    e.1 += req.record.size();
                    if e.1 >= cluster.config().batch_bytes {
                        *e = ((e.0 + 1) % partitions, 0);
                    }
                    e.0 % partitions
                }
            };
            let key = WorkerKey { cluster: req.record.cluster, topic: req.record.topic.clone(), partition };
            let tx = workers.entry(key.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(worker::run(cluster.clone(), key, rx, results.clone(), dl_tx.clone()));
                tx
            });
            if let Err(e) = tx.send(Item { req, report, deadline, enqueued }) {
                if report {
                    let _ = results.send(vec![ProduceResult::failed(
                        e.0.req.id,
                        ProduceError::Other("partition worker stopped".into()),
                    )]);
                }
            }
        }
    }
}
