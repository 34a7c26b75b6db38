//! The cluster's Kafka side that is not a mapping: its internal topics and its membership.
//!
//! Runs on shard 0's Kafka thread, with a client of its own (a heartbeat waiting on a paused
//! broker never holds the producers' client):
//! 1. creates every internal topic that is missing, with its cleanup policy
//!    ([`ClusterConfig::internal_topics`]), retrying each second until Kafka answers;
//! 2. writes this node's [`Heartbeat`] to `<prefix>.nodes` every `heartbeat_ms`;
//! 3. reads `<prefix>.nodes` from its beginning (a compacted table: one record per node) into
//!    [`Members`], declares nodes dead when they fall silent, and logs every change once;
//! 4. at a clean stop ([`leave`]) writes a last heartbeat that says the node left;
//! 5. reads `<prefix>.sessions` from its beginning into the table of wills ([`Wills`]: the
//!    latest claim of each client id whose record carries a will), and when a node dies, the
//!    surviving node with the lowest id publishes the dead node's wills — into
//!    `<prefix>.messages` as the dead node's records (so every node, itself included, delivers
//!    them; retained ones into `.retained` too) — and then releases them in `.sessions`, so a
//!    survivor that takes over later does not publish them again.
//!
//! What it sees is published in [`KafkaHealth`] for the HTTP endpoint (`/api/v1/cluster`,
//! `/metrics`). A Kafka that does not answer is logged at the first failure of each kind and
//! shown there; the node keeps serving its own devices meanwhile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rskafka::chrono::{TimeZone, Utc};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient};
use rskafka::record::Record;
use sluice_core::cluster::{Claim, ClaimKind, ClusterConfig, Heartbeat, MemberChange, Members, CLAIM_HEADER};

use crate::cluster::Cluster;
use crate::health::{ClusterView, KafkaHealth};

/// How long a fetch of `.nodes` waits for new heartbeats.
const FETCH_WAIT_MS: i32 = 200;
/// Wills of other nodes' clients kept, at most; further ones are not kept (counted, logged once).
pub const WILLS_MAX: usize = 100_000;

/// The latest will of each client id, by the node that holds it (see the module doc).
#[derive(Default)]
struct Wills {
    by_client: HashMap<String, (String, Record)>,
    refused: u64,
    /// Per node, the shared-subscription groups it said it has members of (≤ [`WILLS_MAX`] in
    /// all): when it dies, the survivor says it has none any more.
    shares: HashMap<String, std::collections::HashSet<String>>,
}

impl Wills {
    fn apply(&mut self, claim: Claim, record: Record) {
        match (claim.kind, claim.will) {
            (ClaimKind::Share, _) => {
                let keys = self.shares.entry(claim.node).or_default();
                if claim.active {
                    if keys.len() < WILLS_MAX {
                        keys.insert(claim.client);
                    }
                } else {
                    keys.remove(&claim.client);
                }
            }
            (ClaimKind::Connect, true) => {
                if self.by_client.len() >= WILLS_MAX && !self.by_client.contains_key(&claim.client) {
                    if self.refused == 0 {
                        tracing::warn!("cluster: more than {WILLS_MAX} wills; further ones are not kept");
                    }
                    self.refused += 1;
                    return;
                }
                self.by_client.insert(claim.client, (claim.node, record));
            }
            (ClaimKind::Connect, false) => {
                self.by_client.remove(&claim.client);
            }
            // A release by the node that held the will (not an older node's, read after a newer
            // claim).
            (ClaimKind::Handover | ClaimKind::Lease, _) => {}
            (ClaimKind::Release, _) => {
                if self.by_client.get(&claim.client).is_some_and(|(n, _)| *n == claim.node) {
                    self.by_client.remove(&claim.client);
                }
            }
        }
    }

    fn take_shares(&mut self, node: &str) -> Vec<String> {
        self.shares.remove(node).map(|k| k.into_iter().collect()).unwrap_or_default()
    }

    fn take_node(&mut self, node: &str) -> Vec<(String, Record)> {
        let clients: Vec<String> =
            self.by_client.iter().filter(|(_, (n, _))| n == node).map(|(c, _)| c.clone()).collect();
        clients.into_iter().filter_map(|c| self.by_client.remove(&c).map(|(_, r)| (c, r))).collect()
    }
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// This node's identity for its heartbeats.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub cfg: ClusterConfig,
    /// Start time, ms since the epoch.
    pub incarnation: u64,
    pub listeners: Vec<String>,
}

impl NodeIdentity {
    pub fn new(cfg: ClusterConfig, listeners: Vec<String>) -> NodeIdentity {
        NodeIdentity { cfg, incarnation: wall_ms(), listeners }
    }

    fn heartbeat(&self, seq: u64, alive: bool) -> Record {
        let hb = Heartbeat {
            node: self.cfg.node_id.clone(),
            incarnation: self.incarnation,
            seq,
            alive,
            listeners: self.listeners.clone(),
        };
        Record {
            key: Some(self.cfg.node_id.as_bytes().to_vec()),
            value: Some(hb.encode()),
            headers: Default::default(),
            timestamp: Utc.timestamp_millis_opt(wall_ms() as i64).single().unwrap_or_default(),
        }
    }
}

/// Creates the internal topics, then runs heartbeats and the membership reader until the
/// thread stops.
pub(crate) async fn run(me: NodeIdentity, kafka: Arc<Cluster>, health: Arc<KafkaHealth>) {
    let start = Instant::now();
    let now_ms = move || start.elapsed().as_millis() as u64;
    health.set_cluster(ClusterView {
        name: me.cfg.name.clone(),
        node: me.cfg.node_id.clone(),
        ..ClusterView::default()
    });
    ensure_topics(&me.cfg, &kafka, &health).await;
    let topic = me.cfg.nodes_topic();
    let pc = loop {
        match kafka.partition_client(&topic, 0).await {
            Ok(pc) => break Arc::new(pc),
            Err(e) => {
                health.cluster_error(format!("{topic}: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let writer = {
        let (me, pc, health) = (me.clone(), pc.clone(), health.clone());
        tokio::spawn(async move {
            let every = Duration::from_millis(me.cfg.heartbeat_ms);
            let mut failing = false;
            for seq in 0.. {
                let sent = tokio::time::timeout(every.max(Duration::from_secs(1)), async {
                    pc.produce(vec![me.heartbeat(seq, true)], Compression::NoCompression).await
                })
                .await;
                match sent {
                    Ok(Ok(_)) => failing = false,
                    Ok(Err(e)) => fail(&health, &mut failing, format!("heartbeat to {}: {e}", me.cfg.nodes_topic())),
                    Err(_) => fail(&health, &mut failing, format!("heartbeat to {}: timed out", me.cfg.nodes_topic())),
                }
                tokio::time::sleep(every).await;
            }
        })
    };
    let wills = Arc::new(Mutex::new(Wills::default()));
    let sessions = tokio::spawn(read_sessions(me.clone(), kafka.clone(), wills.clone()));
    read(&me, &pc, &health, now_ms, &kafka, &wills).await;
    writer.abort();
    sessions.abort();
}

/// Every partition of `.sessions`, from the beginning, into `wills`.
async fn read_sessions(me: NodeIdentity, kafka: Arc<Cluster>, wills: Arc<Mutex<Wills>>) {
    let topic = me.cfg.sessions_topic();
    let n = loop {
        match kafka.partitions(&topic, Instant::now() + Duration::from_secs(5)).await {
            Ok(n) => break n,
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    };
    for partition in 0..n {
        let (kafka, wills, topic) = (kafka.clone(), wills.clone(), topic.clone());
        tokio::spawn(async move {
            let pc = loop {
                match kafka.partition_client(&topic, partition).await {
                    Ok(pc) => break pc,
                    Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            };
            let mut offset = None;
            loop {
                match tokio::time::timeout(Duration::from_secs(5), fetch_from_start(&pc, &mut offset)).await {
                    Ok(Ok((records, _))) => {
                        let Ok(mut w) = wills.lock() else { return };
                        for r in records {
                            offset = Some(r.offset + 1);
                            let claim = r.record.headers.get(CLAIM_HEADER).and_then(|c| Claim::decode(c));
                            if let Some(claim) = claim {
                                w.apply(claim, r.record);
                            }
                        }
                    }
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        });
    }
}

/// For a node that is gone (dead or left), the survivor with the lowest id says it has no
/// members of any shared-subscription group any more, so that no node leaves a group's messages
/// to it.
async fn clear_shares(me: &NodeIdentity, gone: &str, kafka: &Cluster, wills: &Mutex<Wills>) {
    let keys = match wills.lock() {
        Ok(mut w) => w.take_shares(gone),
        Err(_) => return,
    };
    let topic = me.cfg.sessions_topic();
    for key in keys {
        let claim = Claim::new(gone, &key, 0, ClaimKind::Share);
        let record_key = format!("{key}\u{1}{gone}").into_bytes();
        let r = Record {
            key: Some(record_key.clone()),
            value: None,
            headers: [(CLAIM_HEADER.to_string(), claim.encode())].into(),
            timestamp: Utc.timestamp_millis_opt(wall_ms() as i64).single().unwrap_or_default(),
        };
        let sent = tokio::time::timeout(Duration::from_secs(10), async {
            let n =
                kafka.partitions(&topic, Instant::now() + Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
            let pc = kafka
                .partition_client(&topic, sluice_core::bridge::partition_for_key(&record_key, n))
                .await
                .map_err(|e| e.to_string())?;
            pc.produce(vec![r], Compression::NoCompression).await.map_err(|e| e.to_string())
        })
        .await;
        if !matches!(sent, Ok(Ok(_))) {
            tracing::warn!(node = %gone, group = %key, "cluster: could not clear a gone node's shared subscription");
        }
    }
}

/// The surviving node with the lowest id publishes a dead node's wills (see the module doc).
async fn publish_wills(me: &NodeIdentity, dead: &str, kafka: &Cluster, wills: &Mutex<Wills>) {
    let taken = match wills.lock() {
        Ok(mut w) => w.take_node(dead),
        Err(_) => return,
    };
    if taken.is_empty() {
        return;
    }
    let deadline = || Instant::now() + Duration::from_secs(10);
    let (messages, retained, sessions) = (me.cfg.messages_topic(), me.cfg.retained_topic(), me.cfg.sessions_topic());
    let mut published = 0;
    for (client, mut record) in taken {
        record.headers.remove(CLAIM_HEADER);
        record.timestamp = Utc.timestamp_millis_opt(wall_ms() as i64).single().unwrap_or_default();
        let retain = record.headers.get("mqtt.retain").is_some_and(|v| v == b"true");
        let topic = record.headers.get("mqtt.topic").cloned().unwrap_or_default();
        let release = Claim::new(dead, &client, 0, ClaimKind::Release);
        let release = Record {
            key: Some(client.as_bytes().to_vec()),
            value: None,
            headers: [(CLAIM_HEADER.to_string(), release.encode())].into(),
            timestamp: record.timestamp,
        };
        let mut sends = vec![(messages.clone(), Some(client.as_bytes().to_vec()), record.clone())];
        if retain {
            sends.push((retained.clone(), Some(topic), record.clone()));
        }
        sends.push((sessions.clone(), Some(client.as_bytes().to_vec()), release));
        for (t, key, mut r) in sends {
            r.key = key.clone();
            let ok = async {
                let n = kafka.partitions(&t, deadline()).await.map_err(|e| e.to_string())?;
                let p = key.as_deref().map_or(0, |k| sluice_core::bridge::partition_for_key(k, n));
                let pc = kafka.partition_client(&t, p).await.map_err(|e| e.to_string())?;
                pc.produce(vec![r], Compression::NoCompression).await.map_err(|e| e.to_string())
            };
            match tokio::time::timeout(Duration::from_secs(10), ok).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(%client, topic = %t, "cluster: publishing a dead node's will failed: {e}"),
                Err(_) => tracing::warn!(%client, topic = %t, "cluster: publishing a dead node's will timed out"),
            }
        }
        published += 1;
    }
    tracing::info!(node = %dead, wills = published, "cluster: published the wills of a dead node");
}

/// The next records of a table read from its beginning: `offset` is where the last fetch ended
/// (`None`: the partition's earliest offset, asked first).
async fn fetch_from_start(
    pc: &PartitionClient,
    offset: &mut Option<i64>,
) -> Result<(Vec<rskafka::record::RecordAndOffset>, i64), rskafka::client::error::Error> {
    let from = match *offset {
        Some(o) => o,
        None => pc.get_offset(OffsetAt::Earliest).await?,
    };
    *offset = Some(from);
    pc.fetch_records(from, 1..1 << 20, FETCH_WAIT_MS).await
}

fn fail(health: &KafkaHealth, failing: &mut bool, e: String) {
    if !*failing {
        tracing::warn!("cluster: {e}");
    }
    *failing = true;
    health.cluster_error(e);
}

async fn ensure_topics(cfg: &ClusterConfig, kafka: &Cluster, health: &KafkaHealth) {
    let mut logged = false;
    for t in cfg.internal_topics() {
        loop {
            match kafka.ensure_topic(&t.name, t.partitions, &t.configs).await {
                Ok(()) => break,
                Err(e) => {
                    let e = format!("creating internal topic {}: {e}", t.name);
                    if !logged {
                        tracing::warn!("cluster: {e}; retrying every second");
                        logged = true;
                    }
                    health.cluster_error(e);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    health.update_cluster(|v| v.topics_ready = true);
}

async fn read(
    me: &NodeIdentity,
    pc: &PartitionClient,
    health: &KafkaHealth,
    now_ms: impl Fn() -> u64,
    kafka: &Cluster,
    wills: &Mutex<Wills>,
) {
    let mut members = Members::new(&me.cfg.node_id, me.cfg.dead_after_ms);
    let mut left: Vec<String> = Vec::new();
    let mut offset = None;
    let mut failing = false;
    loop {
        let timeout = Duration::from_millis(me.cfg.heartbeat_ms.max(1000) + FETCH_WAIT_MS as u64);
        match tokio::time::timeout(timeout, fetch_from_start(pc, &mut offset)).await {
            Ok(Ok((records, _))) => {
                failing = false;
                let wall = wall_ms() as i64;
                for r in &records {
                    offset = Some(r.offset + 1);
                    let Some(hb) = r.record.value.as_deref().and_then(Heartbeat::decode) else { continue };
                    let age = (wall - r.record.timestamp.timestamp_millis()).max(0) as u64;
                    if let Some(change) = members.on_heartbeat(hb, age, now_ms()) {
                        log_change(&change);
                        if let MemberChange::Left(gone) = change {
                            left.push(gone);
                        }
                    }
                }
            }
            Ok(Err(e)) => fail(health, &mut failing, format!("reading {}: {e}", me.cfg.nodes_topic())),
            Err(_) => fail(health, &mut failing, format!("reading {}: timed out", me.cfg.nodes_topic())),
        }
        for gone in left.drain(..) {
            let designated = members.alive().filter(|n| *n != gone).chain([me.cfg.node_id.as_str()]).min();
            if designated == Some(me.cfg.node_id.as_str()) {
                clear_shares(me, &gone, kafka, wills).await;
            }
        }
        for change in members.tick(now_ms()) {
            log_change(&change);
            if let MemberChange::Dead(dead) = &change {
                let designated = members.alive().filter(|n| n != dead).chain([me.cfg.node_id.as_str()]).min();
                if designated == Some(me.cfg.node_id.as_str()) {
                    publish_wills(me, dead, kafka, wills).await;
                    clear_shares(me, dead, kafka, wills).await;
                }
            }
        }
        let list = members.members();
        health.update_cluster(|v| {
            v.members = list;
            if !failing {
                v.last_error = None;
            }
        });
        if failing {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn log_change(c: &MemberChange) {
    match c {
        MemberChange::Joined(n) => tracing::info!(node = %n, "cluster: node joined"),
        MemberChange::Restarted(n) => tracing::info!(node = %n, "cluster: node restarted"),
        MemberChange::Left(n) => tracing::info!(node = %n, "cluster: node left"),
        MemberChange::Dead(n) => tracing::warn!(node = %n, "cluster: node is silent past dead_after_ms: dead"),
    }
}

/// The last heartbeat of a clean stop: the others see the node leave at once instead of
/// declaring it dead after `dead_after_ms`. Bounded by `within`.
pub(crate) async fn leave(me: &NodeIdentity, kafka: &Cluster, within: Duration) {
    let topic = me.cfg.nodes_topic();
    let sent = tokio::time::timeout(within, async {
        let pc = kafka.partition_client(&topic, 0).await?;
        pc.produce(vec![me.heartbeat(u64::MAX, false)], Compression::NoCompression).await
    })
    .await;
    match sent {
        Ok(Ok(_)) => tracing::info!(node = %me.cfg.node_id, "cluster: left"),
        Ok(Err(e)) => tracing::warn!("cluster: the leaving heartbeat failed: {e}"),
        Err(_) => tracing::warn!("cluster: the leaving heartbeat timed out"),
    }
}
