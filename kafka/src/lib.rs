//! sluice-kafka: the Kafka side of the bridge, one thread per shard.
//!
//! # Layout
//! - [`start`]: for every shard, a thread of its own (`sluice-kafka-N`, pinned to the shard's
//!   CPU) running a single-threaded tokio runtime, and one [`ShardLink`] between it and the
//!   shard. rskafka is tokio-only while the shards run on glommio, so Kafka I/O cannot run on the
//!   shard's reactor; it runs beside it on the same core instead, with nothing shared between
//!   cores: each shard's thread has its own Kafka clients and connections, its own metadata and
//!   its own batches.
//! - `producer`: the shard's producer: places records on partitions, batches them, sends one
//!   produce request per broker with every ready partition it leads, retries, reports.
//! - `cluster`: a cluster's client (built lazily, rebuilt after failures), partition leaders and
//!   topic auto-creation.
//! - `consumer`: Kafka → MQTT; each shard's thread reads the partitions placed on that shard.
//! - [`health`]: what the Kafka side tells an operator (clusters reachable, missing topics,
//!   dead letters, consumer lag), probed from shard 0's thread, read by the HTTP endpoint.
//!
//! Invariants: records of one partition from one shard are produced in hand-over order (one
//! batch in flight per partition), so MQTT per-topic order survives retries. Every record handed
//! over gets exactly one [`ProduceResult`].

#![warn(rust_2018_idioms, unreachable_pub)]

mod affinity;
pub mod batch;
mod cluster;
mod consumer;
pub mod health;
pub mod membership;
mod producer;
pub mod schemas;
mod tls;

pub use tls::TlsError;

use std::collections::BTreeMap;
use std::sync::Arc;

use sluice_core::bridge::{KafkaRecord, ProduceError, ProduceRequest, ProduceResult};
use sluice_core::config::ClusterConfig;
use sluice_core::inbound::{InboundMappingConfig, InboundRecord, Positions};
use tokio::sync::{mpsc, oneshot};

use crate::cluster::Cluster;

/// Batches of produce requests a shard may have queued towards its Kafka thread before its
/// sends wait (the shard's own pending-record limit usually stops it first).
pub const REQUEST_CHANNEL_BATCHES: usize = 1024;

/// The shard's ends of its link to its Kafka thread.
pub struct ShardLink {
    pub requests: mpsc::Sender<Vec<ProduceRequest>>,
    pub results: mpsc::UnboundedReceiver<Vec<ProduceResult>>,
    /// Records of the Kafka partitions placed on this shard (Kafka → MQTT).
    pub inbound: mpsc::Receiver<Vec<InboundRecord>>,
    /// Records of the cluster's claims placed on this shard: apart from `inbound`, so the
    /// feed's flow control never holds them back.
    pub claims: mpsc::Receiver<Vec<InboundRecord>>,
}

/// Batches of consumed records waiting for a shard before its consumers pause.
pub const INBOUND_CHANNEL_BATCHES: usize = 64;

/// The running Kafka side: one thread per shard.
pub struct KafkaBridge {
    threads: Vec<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>,
    health: Arc<health::KafkaHealth>,
}

impl KafkaBridge {
    /// Clusters' state, missing topics, dead letters and lag, for the HTTP endpoint.
    pub fn health(&self) -> Arc<health::KafkaHealth> {
        self.health.clone()
    }

    /// Stops every shard's Kafka thread, giving each up to `grace` to end its tasks.
    pub fn shutdown(self, grace: std::time::Duration) {
        let deadline = std::time::Instant::now() + grace;
        let mut joins = Vec::new();
        for (stop, join) in self.threads {
            let _ = stop.send(());
            joins.push(join);
        }
        for join in joins {
            // A thread that does not end within the grace is left to the process exit.
            while !join.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if join.is_finished() {
                let _ = join.join();
            }
        }
    }
}

fn thread_name(shard: usize) -> String {
    format!("sluice-kafka-{shard}")
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("cannot start the Kafka thread of shard {shard}: {source}")]
    Runtime { shard: usize, source: std::io::Error },
    #[error("kafka.clusters.{cluster}.tls: {problem}")]
    Tls { cluster: String, problem: TlsError },
    #[error("kafka_to_mqtt mapping {mapping} names cluster {cluster:?}, which is not configured")]
    UnknownCluster { mapping: String, cluster: String },
}

/// Starts the Kafka side for `clusters` (in the order the router numbers them): one thread per
/// shard, shard `i`'s pinned to `cpus[i]` (unpinned where `cpus` has no entry), and returns one
/// link per shard.
pub fn start(
    clusters: &BTreeMap<String, ClusterConfig>,
    outbound: &[sluice_core::bridge::MappingConfig],
    inbound: &[InboundMappingConfig],
    positions: Positions,
    cpus: &[usize],
    schemas: Option<Arc<schemas::SchemaSetup>>,
    node: Option<membership::NodeIdentity>,
) -> Result<(KafkaBridge, Vec<ShardLink>), StartError> {
    let names: Vec<String> = clusters.keys().cloned().collect();
    let mut tls_configs = Vec::new();
    for (name, cfg) in clusters {
        tls_configs.push(match &cfg.tls {
            Some(t) => {
                Some(tls::client_config(t).map_err(|problem| StartError::Tls { cluster: name.clone(), problem })?)
            }
            None => None,
        });
    }
    let mut inbound_clusters = Vec::with_capacity(inbound.len());
    for m in inbound {
        match names.iter().position(|n| *n == m.cluster) {
            Some(c) => inbound_clusters.push(c),
            None => return Err(StartError::UnknownCluster { mapping: m.name.clone(), cluster: m.cluster.clone() }),
        }
    }
    let needed: Vec<bool> = names
        .iter()
        .map(|n| {
            outbound.iter().any(|m| {
                m.destinations.iter().any(|d| d.cluster == *n)
                    || m.dead_letter.as_ref().is_some_and(|d| d.cluster == *n)
            }) || inbound.iter().any(|m| m.cluster == *n)
        })
        .collect();
    let n_shards = cpus.len().max(1);
    let health = Arc::new(health::KafkaHealth::new(&names, &needed, outbound, n_shards));
    let required = health::required_topics(&names, outbound, inbound);
    let positions = Arc::new(positions);
    let mut links = Vec::with_capacity(n_shards);
    let mut threads = Vec::with_capacity(n_shards);
    let mut inbound_rx = Vec::with_capacity(n_shards);
    let mut inbound_tx = Vec::with_capacity(n_shards);
    let (mut claims_rx, mut claims_tx) = (Vec::with_capacity(n_shards), Vec::with_capacity(n_shards));
    for _ in 0..n_shards {
        let (tx, rx) = mpsc::channel(INBOUND_CHANNEL_BATCHES);
        inbound_tx.push(tx);
        inbound_rx.push(rx);
        let (tx, rx) = mpsc::channel(INBOUND_CHANNEL_BATCHES);
        claims_tx.push(tx);
        claims_rx.push(rx);
    }
    for (shard, (in_rx, claims_rx)) in inbound_rx.into_iter().zip(claims_rx).enumerate() {
        let (req_tx, req_rx) = mpsc::channel(REQUEST_CHANNEL_BATCHES);
        let (res_tx, res_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        // Each thread builds its own clients: nothing of a cluster is shared between shards.
        let own: Vec<Arc<Cluster>> = clusters
            .iter()
            .zip(&tls_configs)
            .map(|((name, cfg), tls)| Arc::new(Cluster::new(name.clone(), cfg.clone(), tls.clone())))
            .collect();
        let inbound = inbound.to_vec();
        let inbound_clusters = inbound_clusters.clone();
        let inbound_tx = inbound_tx.clone();
        let claims_tx = claims_tx.clone();
        let positions = positions.clone();
        let cpu = cpus.get(shard).copied();
        // One cache per thread: nothing on the record path is shared between cores.
        let schemas = schemas.clone().map(|s| (s.cache(), s));
        let health = health.clone();
        // Shard 0's thread probes the clusters, with clients of its own (a probe waiting on a
        // paused broker never holds the producer's client).
        let probe = (shard == 0).then(|| {
            let probes: Vec<Arc<Cluster>> = clusters
                .iter()
                .zip(&tls_configs)
                .map(|((name, cfg), tls)| Arc::new(Cluster::new(name.clone(), cfg.clone(), tls.clone())))
                .collect();
            // The cluster's heartbeats and internal topics, on a client of their own too.
            let node = node.clone().and_then(|n| {
                let (cfg, tls) = clusters.get(&n.cfg.kafka).zip(names.iter().position(|c| *c == n.cfg.kafka))?;
                Some((n.clone(), Arc::new(Cluster::new(n.cfg.kafka.clone(), cfg.clone(), tls_configs[tls].clone()))))
            });
            (probes, required.clone(), node)
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| StartError::Runtime { shard, source })?;
        let join = std::thread::Builder::new()
            .name(thread_name(shard))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = affinity::pin_current_thread(cpu) {
                        tracing::warn!(shard, cpu, error = %e, "cannot pin the Kafka thread to the shard's CPU");
                    }
                }
                runtime.block_on(async move {
                    let mut leaving = None;
                    if let Some((probes, required, node)) = probe {
                        tokio::spawn(health::probe(health.clone(), probes, required));
                        if let Some((me, kafka)) = node {
                            tokio::spawn(membership::run(me.clone(), kafka.clone(), health.clone()));
                            leaving = Some((me, kafka));
                        }
                    }
                    for (i, m) in inbound.into_iter().enumerate() {
                        let cluster = own[inbound_clusters[i]].clone();
                        let check = schemas.as_ref().and_then(|(cache, setup)| {
                            Some((setup.inbound_op(i as u16)?.clone(), cache.clone(), setup.clone()))
                        });
                        let h = health.clone();
                        let claims = matches!(m.internal, Some(sluice_core::inbound::InboundInternal::ClusterClaims));
                        let to = if claims { claims_tx.clone() } else { inbound_tx.clone() };
                        consumer::spawn(i as u16, m, cluster, shard, to, positions.clone(), (check, h));
                    }
                    drop(inbound_tx);
                    drop(claims_tx);
                    let stage = schemas.map(|(cache, setup)| schemas::Stage::new(setup, cache, health.clone()));
                    let producer = producer::Producer::new(shard, own, req_rx, res_tx, stage, health);
                    tokio::select! {
                        _ = producer.run() => {}
                        _ = stop_rx => {
                            if let Some((me, kafka)) = leaving {
                                membership::leave(&me, &kafka, std::time::Duration::from_secs(1)).await;
                            }
                        }
                    }
                });
                // Tasks still running (requests in flight, consumers) end here.
                drop(runtime);
            })
            .map_err(|source| StartError::Runtime { shard, source })?;
        threads.push((stop_tx, join));
        links.push(ShardLink { requests: req_tx, results: res_rx, inbound: in_rx, claims: claims_rx });
    }
    Ok((KafkaBridge { threads, health }, links))
}

/// The copy of a refused record for its mapping's dead-letter topic, if it has one: headers
/// `sluice.error` (the cause) and `sluice.topic` (where it was headed). A time-out is not a
/// refusal (Kafka may hold the record), and a record too large keeps only its metadata.
pub(crate) fn dead_letter_copy(r: &KafkaRecord, e: &ProduceError) -> Option<KafkaRecord> {
    if matches!(e, ProduceError::TimedOut) {
        return None;
    }
    let why = [
        ("sluice.error".to_string(), bytes::Bytes::from_static(e.cause().as_bytes())),
        ("sluice.topic".to_string(), bytes::Bytes::copy_from_slice(r.topic.as_bytes())),
    ];
    let mut d = r.dead_letter_copy(why)?;
    if matches!(e, ProduceError::TooLarge) {
        d.value = bytes::Bytes::new();
    }
    Some(d)
}

/// The record rskafka's own producer API would send for `req`: a copy of key, value and every
/// header. The producers no longer use it; the encoding bench in `benches/` compares against it.
pub fn to_record(req: &ProduceRequest) -> rskafka::record::Record {
    use rskafka::chrono::{TimeZone, Utc};
    let r = &req.record;
    rskafka::record::Record {
        key: r.key().map(|k| k.to_vec()),
        value: Some(r.value.to_vec()),
        headers: {
            let mut h = std::collections::BTreeMap::new();
            r.for_each_header(|k, v| {
                h.insert(k.to_owned(), v.to_vec());
            });
            h
        },
        timestamp: Utc.timestamp_millis_opt(r.timestamp_ms).single().unwrap_or_default(),
    }
}
