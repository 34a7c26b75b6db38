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
//!    latest claim of each client id whose record carries a will). A will's connection is gone
//!    when its node is dead or alive as a later incarnation; then the alive node with the lowest
//!    id other than the owner waits out the will's delay (capped by the session expiry; a new
//!    claim of the client cancels it) and writes a release naming itself. The node whose
//!    release is read first publishes the will — into `<prefix>.messages` as the owner's record
//!    (every node, itself included, delivers it; a retained one into `.retained` too) — so a
//!    will goes out once even when survivors disagree on who is lowest.
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

/// A will another node holds for a client of its, as its claim carried it.
struct WillEntry {
    node: String,
    /// The incarnation of `node` that holds it (0: not said).
    inc: u64,
    /// How long after the connection is lost it goes out (the will delay, at most the session's
    /// expiry).
    after_ms: u64,
    record: Record,
    /// When this node writes its release (and publishes the will if that release is read
    /// first); `None`: the connection is not known to be gone, or another node publishes.
    due_ms: Option<u64>,
}

/// The latest will of each client id, by the node that holds it (see the module doc).
#[derive(Default)]
struct Wills {
    by_client: HashMap<String, WillEntry>,
    refused: u64,
    /// Per node, the shared-subscription groups it said it has members of (≤ [`WILLS_MAX`] in
    /// all): when it dies, the survivor says it has none any more.
    shares: HashMap<String, std::collections::HashSet<String>>,
    /// Wills whose release by this node was read first: this node publishes them.
    won: Vec<(String, Record)>,
}

/// A due will whose release was written but not read back is released again after this long.
const RELEASE_RETRY_MS: u64 = 5_000;

impl Wills {
    fn apply(&mut self, me: &str, claim: Claim, record: Record) {
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
                let after_ms = claim.will_after_ms();
                let entry = WillEntry { node: claim.node, inc: claim.inc, after_ms, record, due_ms: None };
                self.by_client.insert(claim.client, entry);
            }
            // A new connection of the client, anywhere: the will of the old one is gone (a
            // client that connects again before its will's delay cancels it).
            (ClaimKind::Connect, false) => {
                self.by_client.remove(&claim.client);
            }
            (ClaimKind::Handover | ClaimKind::Lease, _) => {}
            // A release of the will by the incarnation that held it (not an older one's, read
            // after a newer claim), or by a survivor: the first survivor's release read wins.
            (ClaimKind::Release, _) => {
                let held = self
                    .by_client
                    .get(&claim.client)
                    .is_some_and(|e| e.node == claim.node && (claim.inc == 0 || claim.inc == e.inc));
                if held {
                    if let Some(e) = self.by_client.remove(&claim.client) {
                        if claim.by.as_deref() == Some(me) {
                            self.won.push((claim.client, e.record));
                        }
                    }
                }
            }
        }
    }

    fn take_shares(&mut self, node: &str) -> Vec<String> {
        self.shares.remove(node).map(|k| k.into_iter().collect()).unwrap_or_default()
    }

    /// The wills this node should release now (client, owner, owner's incarnation): of
    /// connections that are gone (their node dead or restarted) whose delay is over, when this
    /// node is the one to publish them. A connection seen alive again is not due any more.
    fn due(&mut self, members: &Members, now_ms: u64) -> Vec<(String, String, u64)> {
        let mut out = Vec::new();
        for (client, e) in &mut self.by_client {
            if !(members.connection_gone(&e.node, e.inc) && members.publishes_for(&e.node)) {
                e.due_ms = None;
                continue;
            }
            let due = *e.due_ms.get_or_insert(now_ms + e.after_ms);
            if due <= now_ms {
                out.push((client.clone(), e.node.clone(), e.inc));
                e.due_ms = Some(now_ms + RELEASE_RETRY_MS);
            }
        }
        out
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
        let incarnation = if cfg.incarnation == 0 { wall_ms() } else { cfg.incarnation };
        NodeIdentity { cfg, incarnation, listeners }
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
        let (kafka, wills, topic, me) = (kafka.clone(), wills.clone(), topic.clone(), me.clone());
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
                                w.apply(&me.cfg.node_id, claim, r.record);
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
    let timestamp = Utc.timestamp_millis_opt(wall_ms() as i64).single().unwrap_or_default();
    let records = keys
        .into_iter()
        .map(|key| Record {
            key: Some(format!("{key}\u{1}{gone}").into_bytes()),
            value: None,
            headers: [(CLAIM_HEADER.to_string(), Claim::new(gone, &key, 0, ClaimKind::Share).encode())].into(),
            timestamp,
        })
        .collect();
    produce_keyed(kafka, &me.cfg.sessions_topic(), records).await;
}

/// Releases the wills that are due (see [`Wills::due`]) in `.sessions`, each as this node's
/// (`Claim::by`): whichever survivor's release of a will is read first publishes it.
async fn release_due(me: &NodeIdentity, kafka: &Cluster, wills: &Mutex<Wills>, members: &Members, now_ms: u64) {
    let due = match wills.lock() {
        Ok(mut w) => w.due(members, now_ms),
        Err(_) => return,
    };
    if due.is_empty() {
        return;
    }
    let timestamp = Utc.timestamp_millis_opt(wall_ms() as i64).single().unwrap_or_default();
    let records = due.into_iter().map(|(client, owner, inc)| {
        let release =
            Claim { inc, by: Some(me.cfg.node_id.clone()), ..Claim::new(&owner, &client, 0, ClaimKind::Release) };
        Record {
            key: Some(client.into_bytes()),
            value: None,
            headers: [(CLAIM_HEADER.to_string(), release.encode())].into(),
            timestamp,
        }
    });
    let n = records.len();
    produce_keyed(kafka, &me.cfg.sessions_topic(), records.collect()).await;
    tracing::debug!(wills = n, "cluster: released wills of lost connections");
}

/// Publishes the wills this node's release won (see [`Wills::won`]) into `.messages` as their
/// node's records (every node delivers them, this one included), retained ones into
/// `.retained` too.
async fn publish_won(me: &NodeIdentity, kafka: &Cluster, wills: &Mutex<Wills>) {
    let won = match wills.lock() {
        Ok(mut w) => std::mem::take(&mut w.won),
        Err(_) => return,
    };
    if won.is_empty() {
        return;
    }
    let timestamp = Utc.timestamp_millis_opt(wall_ms() as i64).single().unwrap_or_default();
    let (mut messages, mut retained) = (Vec::new(), Vec::new());
    for (client, mut record) in won {
        record.headers.remove(CLAIM_HEADER);
        record.timestamp = timestamp;
        record.key = Some(client.into_bytes());
        if record.headers.get("mqtt.retain").is_some_and(|v| v == b"true") {
            let mut r = record.clone();
            r.key = record.headers.get("mqtt.topic").cloned();
            retained.push(r);
        }
        messages.push(record);
    }
    let n = messages.len();
    produce_keyed(kafka, &me.cfg.messages_topic(), messages).await;
    produce_keyed(kafka, &me.cfg.retained_topic(), retained).await;
    tracing::info!(wills = n, "cluster: published the wills of connections lost with their node");
}

/// Produces `records` into `topic`, each into its key's partition, one request per partition;
/// failures are logged (all bounded by ten seconds).
async fn produce_keyed(kafka: &Cluster, topic: &str, records: Vec<Record>) {
    if records.is_empty() {
        return;
    }
    let sent = tokio::time::timeout(Duration::from_secs(10), async {
        let n = kafka.partitions(topic, Instant::now() + Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
        let mut by_partition: HashMap<i32, Vec<Record>> = HashMap::new();
        for r in records {
            let p = r.key.as_deref().map_or(0, |k| sluice_core::bridge::partition_for_key(k, n));
            by_partition.entry(p).or_default().push(r);
        }
        for (p, records) in by_partition {
            let pc = kafka.partition_client(topic, p).await.map_err(|e| e.to_string())?;
            pc.produce(records, Compression::NoCompression).await.map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(())
    })
    .await;
    match sent {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(%topic, "cluster: producing to an internal topic failed: {e}"),
        Err(_) => tracing::warn!(%topic, "cluster: producing to an internal topic timed out"),
    }
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
                    clear_shares(me, dead, kafka, wills).await;
                }
            }
        }
        if members.settled(now_ms()) {
            release_due(me, kafka, wills, &members, now_ms()).await;
        }
        publish_won(me, kafka, wills).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::cluster::Heartbeat;

    fn hb(node: &str, inc: u64) -> Heartbeat {
        Heartbeat { node: node.into(), incarnation: inc, seq: 0, alive: true, listeners: vec![] }
    }

    fn record() -> Record {
        Record {
            key: None,
            value: Some(b"lost".to_vec()),
            headers: [("mqtt.topic".to_string(), b"wills/x".to_vec())].into(),
            timestamp: Utc.timestamp_millis_opt(0).single().unwrap_or_default(),
        }
    }

    fn connect(node: &str, client: &str, inc: u64, will_delay: u32, expiry: u32) -> Claim {
        Claim { will: true, inc, will_delay, expiry, ..Claim::new(node, client, 0, ClaimKind::Connect) }
    }

    fn release_by(owner: &str, client: &str, inc: u64, by: &str) -> Claim {
        Claim { inc, by: Some(by.into()), ..Claim::new(owner, client, 0, ClaimKind::Release) }
    }

    /// n1 (this node) and n2 alive for long enough that n1 has heard itself (settled).
    fn members() -> (Members, u64) {
        let mut m = Members::new("n1", 1000);
        for now in (0..=2000).step_by(100) {
            m.on_heartbeat(hb("n1", 1), 0, now);
            m.on_heartbeat(hb("n2", 1), 0, now);
            m.tick(now);
        }
        assert!(m.settled(2000));
        (m, 2000)
    }

    #[test]
    fn a_restarted_nodes_older_wills_are_due_at_once_and_its_newer_ones_never() {
        let (mut m, now) = members();
        let mut w = Wills::default();
        w.apply("n1", connect("n2", "old", 1, 0, 0), record());
        assert!(w.due(&m, now).is_empty(), "n2 alive as the incarnation that holds it");
        m.on_heartbeat(hb("n2", 2), 0, now + 10);
        w.apply("n1", connect("n2", "new", 2, 0, 0), record());
        assert_eq!(w.due(&m, now + 10), vec![("old".to_string(), "n2".to_string(), 1)]);
        assert!(w.due(&m, now + 20).is_empty(), "released once, then again only after the retry time");
        assert_eq!(w.due(&m, now + 10 + RELEASE_RETRY_MS).len(), 1);
    }

    #[test]
    fn the_first_survivors_release_read_publishes_the_will_and_a_later_one_nothing() {
        let mut w = Wills::default();
        w.apply("n1", connect("n3", "c", 7, 0, 0), record());
        w.apply("n1", release_by("n3", "c", 7, "n2"), record());
        w.apply("n1", release_by("n3", "c", 7, "n1"), record());
        assert!(w.won.is_empty(), "n2's release came first: n2 publishes");
        w.apply("n1", connect("n3", "d", 7, 0, 0), record());
        w.apply("n1", release_by("n3", "d", 7, "n1"), record());
        w.apply("n1", release_by("n3", "d", 7, "n2"), record());
        assert_eq!(w.won.len(), 1);
        assert_eq!(w.won[0].0, "d");
    }

    #[test]
    fn a_will_waits_out_its_delay_capped_by_the_session_expiry_and_a_reconnect_cancels_it() {
        let (mut m, now) = members();
        let mut w = Wills::default();
        w.apply("n1", connect("n2", "slow", 1, 30, 3600), record());
        w.apply("n1", connect("n2", "short-session", 1, 30, 2), record());
        w.apply("n1", connect("n2", "back", 1, 30, 3600), record());
        m.on_heartbeat(hb("n2", 2), 0, now);
        assert!(w.due(&m, now).is_empty());
        assert_eq!(w.due(&m, now + 2000), vec![("short-session".to_string(), "n2".to_string(), 1)]);
        w.apply("n1", release_by("n2", "short-session", 1, "n1"), record());
        assert_eq!(w.won.len(), 1, "read back: this node publishes it");
        // The client connects again (anywhere, without a will) before the delay is out.
        w.apply("n1", Claim::new("n1", "back", 0, ClaimKind::Connect), record());
        let mut due: Vec<String> = w.due(&m, now + 30_000).into_iter().map(|d| d.0).collect();
        due.sort();
        assert_eq!(due, vec!["slow".to_string()]);
    }

    #[test]
    fn only_the_lowest_surviving_node_releases_and_a_release_by_an_older_incarnation_is_ignored() {
        let (mut m, now) = members();
        m.on_heartbeat(hb("n0", 1), 0, now);
        m.on_heartbeat(hb("n2", 2), 0, now);
        let mut w = Wills::default();
        w.apply("n1", connect("n2", "c", 1, 0, 0), record());
        assert!(w.due(&m, now).is_empty(), "n0 publishes, not n1");
        // n2's own release, but of a newer incarnation than the will's: not this will's.
        w.apply("n1", Claim { inc: 2, ..Claim::new("n2", "c", 0, ClaimKind::Release) }, record());
        assert!(w.by_client.contains_key("c"));
    }
}
