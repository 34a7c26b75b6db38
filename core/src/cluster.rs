//! A cluster of sluice nodes that share routing and retained messages through Kafka.
//!
//! Every deployment of sluice already has a replicated, ordered log: Kafka. The cluster is built
//! on it and on nothing of our own (no consensus, no gossip):
//! - **Messages between nodes** go through one internal topic, `<prefix>.messages`: every
//!   message a device publishes on a node (not `$SYS`, not what came from Kafka or from another
//!   node) becomes a record there, keyed by the publisher's client id (so one publisher's
//!   messages stay in one partition, in order), with the MQTT headers the bridge writes anyway
//!   (topic, QoS, retain, client id, MQTT 5 properties) and [`NODE_HEADER`] naming the node.
//!   Every node reads every partition and routes the records other nodes wrote to its own
//!   subscribers as if they were published there, at the QoS they were published with. The
//!   publisher's PUBACK waits for Kafka like any bridged record: an acknowledged message is in
//!   Kafka, so a node that restarts replays what it missed for its persistent sessions from its
//!   stored consumer positions. Both directions reuse the bridge's machinery (the shard's own
//!   producers, the spill log, the Kafka → MQTT feed's flow control): the cluster is two
//!   internal mappings ([`ClusterConfig::forward_mapping`], [`ClusterConfig::inbound_mapping`]).
//!   A message that a user mapping already takes, as it is, into the cluster's Kafka is not
//!   written twice: that mapping's record carries it ([`carrier_destination`]: it gets the node
//!   header) and every node reads that topic too ([`ClusterConfig::message_topics`]).
//! - **Retained messages** are also written to the compacted `<prefix>.retained` (key: the MQTT
//!   topic; an empty payload deletes). Each node reads it from the beginning once (then from its
//!   stored position) and only *stores* what it reads there — live subscribers got the message
//!   through `.messages` — so a node that joins later has every retained message.
//! - **Membership**: each node writes a [`Heartbeat`] to `<prefix>.nodes` every `heartbeat_ms`
//!   (and a last one saying it leaves, at a clean stop); [`Members`] turns what a node reads
//!   there into who is alive, and declares a node dead once nothing was heard from it for
//!   `dead_after_ms`.
//!
//! Invariants: a record a node wrote is never routed again by that node (the `.messages`
//! consumer skips its own [`NODE_HEADER`], and records without one: no node wrote them); a
//! message reaches the other nodes through one record (`.messages`' or one carrier's); what
//! came from Kafka or another node is never forwarded (no loops between nodes, or between the
//! cluster and the bridge's mappings); [`Members`] keeps at most [`MEMBERS_MAX`] nodes.
//!
//! Sans-I/O like the rest of the core: the Kafka side (`sluice-kafka`) produces and consumes,
//! time comes in as `now_ms`.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::bridge::{Destination, Internal, KeySource, MappingConfig, TopicTemplate};
use crate::inbound::{InboundInternal, InboundMappingConfig, PayloadSource, StartAt};

/// The Kafka header that names the node a cluster record was written by.
pub const NODE_HEADER: &str = "sluice.node";
/// The Kafka header of a cluster record that carries the MQTT 5 user properties, encoded by
/// [`encode_user_properties`].
pub const USER_PROPERTIES_HEADER: &str = "sluice.user_properties";
/// Names of the internal mappings (user mappings may not start with `$`).
pub const FORWARD_MAPPING: &str = "$cluster";
pub const RETAINED_MAPPING: &str = "$cluster-retained";
pub const CLAIMS_MAPPING: &str = "$cluster-sessions";
/// The topic of the messages a shard makes of its claims (see [`Claim`]): a `$` topic, so no
/// `#` filter (the forward mapping's, a device's) matches it, and never delivered.
pub const CLAIM_TOPIC: &str = "$sluice/claims";
/// The header of a `.sessions` record that holds its [`Claim`] (JSON). The record itself is the
/// client's will (value, MQTT headers) when the claim says it has one.
pub const CLAIM_HEADER: &str = "sluice.claim";
/// The header of a cluster message with an MQTT 5 message expiry: the seconds it had left when
/// it was written.
pub const EXPIRY_HEADER: &str = "mqtt.message_expiry";
/// Nodes [`Members`] keeps, at most; heartbeats of further nodes are ignored and counted.
pub const MEMBERS_MAX: usize = 1024;
/// Longest node id and cluster name: they become Kafka topic names and header values.
pub const NAME_MAX: usize = 64;

fn default_name() -> String {
    "sluice".into()
}
fn default_kafka() -> String {
    "default".into()
}
fn default_heartbeat_ms() -> u64 {
    1000
}
fn default_dead_after_ms() -> u64 {
    10_000
}
fn default_partitions() -> i32 {
    16
}

/// `[cluster]`: this node's place in a cluster of sluice nodes.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Nodes with the same name (and Kafka) form one cluster.
    #[serde(default = "default_name")]
    pub name: String,
    /// Unique in the cluster; letters, digits, `.`, `_`, `-`.
    pub node_id: String,
    /// The `[kafka.clusters.NAME]` the internal topics live in.
    #[serde(default = "default_kafka")]
    pub kafka: String,
    /// Internal topics are `<prefix>.messages`, `.retained`, `.nodes`; `_sluice.<name>` unless set.
    #[serde(default)]
    pub topic_prefix: Option<String>,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// A node not heard from for this long is dead to the others.
    #[serde(default = "default_dead_after_ms")]
    pub dead_after_ms: u64,
    /// Partitions of `<prefix>.messages` when sluice creates it.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// A shard that has not read its own lease back from Kafka for `dead_after_ms` closes its
    /// clients (0x89) and refuses new ones until it does: two nodes never both serve one client
    /// id for longer than that, even when one is cut off from Kafka. `false`: it keeps them
    /// (available, but a device that reconnects elsewhere meanwhile is served twice).
    #[serde(default = "default_true")]
    pub fence: bool,
    /// When this node started (ms since the epoch), set at start, not in the file: in every
    /// heartbeat and claim, so the others tell this run's claims from a previous run's.
    #[serde(skip)]
    pub incarnation: u64,
}

fn default_true() -> bool {
    true
}

/// Why a `[cluster]` table is wrong: the key and the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cluster.{key}: {problem}")]
pub struct ClusterConfigError {
    pub key: &'static str,
    pub problem: String,
}

/// An internal topic as sluice creates it when it is missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InternalTopic {
    pub name: String,
    pub partitions: i32,
    /// Topic configs (`cleanup.policy`, `retention.ms`).
    pub configs: Vec<(&'static str, String)>,
}

/// Kafka's legal topic-name characters.
fn name_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= NAME_MAX && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl ClusterConfig {
    pub fn prefix(&self) -> String {
        self.topic_prefix.clone().unwrap_or_else(|| format!("_sluice.{}", self.name))
    }

    pub fn messages_topic(&self) -> String {
        format!("{}.messages", self.prefix())
    }
    pub fn retained_topic(&self) -> String {
        format!("{}.retained", self.prefix())
    }
    pub fn nodes_topic(&self) -> String {
        format!("{}.nodes", self.prefix())
    }
    pub fn sessions_topic(&self) -> String {
        format!("{}.sessions", self.prefix())
    }

    /// Every internal topic with the cleanup policy it needs: messages are a stream (kept a day,
    /// the replay window of a node that was down), retained messages and heartbeats are tables
    /// (compacted: the last record per key is what counts).
    pub fn internal_topics(&self) -> Vec<InternalTopic> {
        vec![
            InternalTopic {
                name: self.messages_topic(),
                partitions: self.partitions,
                configs: vec![("cleanup.policy", "delete".into()), ("retention.ms", "86400000".into())],
            },
            InternalTopic {
                name: self.retained_topic(),
                partitions: self.partitions,
                configs: vec![("cleanup.policy", "compact".into())],
            },
            InternalTopic {
                name: self.sessions_topic(),
                partitions: self.partitions,
                configs: vec![("cleanup.policy", "compact".into())],
            },
            InternalTopic {
                name: self.nodes_topic(),
                partitions: 1,
                configs: vec![("cleanup.policy", "compact".into())],
            },
        ]
    }

    /// The Kafka topics the other nodes read this node's messages from: `.messages`, then the
    /// topic of each user mapping that carries the messages it takes ([`carrier_destination`]),
    /// each once.
    pub fn message_topics(&self, mappings: &[MappingConfig]) -> Vec<String> {
        let mut topics = vec![self.messages_topic()];
        let internal: Vec<String> = self.internal_topics().into_iter().map(|t| t.name).collect();
        for m in mappings {
            let Some(d) = carrier_destination(m, &self.kafka) else { continue };
            let Some(topic) = m.destinations[d].topic.fixed_topic() else { continue };
            if !topics.iter().any(|t| t == topic) && !internal.iter().any(|t| t == topic) {
                topics.push(topic.to_string());
            }
        }
        topics
    }

    /// Checks what the types cannot; `clusters` are the configured Kafka clusters.
    pub fn validate(&self, clusters: &[String]) -> Result<(), ClusterConfigError> {
        let err = |key, problem: &str| Err(ClusterConfigError { key, problem: problem.into() });
        if !name_ok(&self.node_id) {
            return err("node_id", "must be 1 to 64 letters, digits, `.`, `_` or `-`");
        }
        if !name_ok(&self.name) {
            return err("name", "must be 1 to 64 letters, digits, `.`, `_` or `-`");
        }
        if let Some(p) = &self.topic_prefix {
            if !name_ok(p) {
                return err("topic_prefix", "must be 1 to 64 letters, digits, `.`, `_` or `-` (a Kafka topic name)");
            }
        }
        if !clusters.contains(&self.kafka) {
            return Err(ClusterConfigError {
                key: "kafka",
                problem: format!("`{}` is not a [kafka.clusters.NAME] table (have {clusters:?})", self.kafka),
            });
        }
        if self.heartbeat_ms == 0 {
            return err("heartbeat_ms", "must be at least 1");
        }
        if self.dead_after_ms < 2 * self.heartbeat_ms {
            return err("dead_after_ms", "must be at least twice heartbeat_ms (one lost heartbeat is not a death)");
        }
        if self.partitions < 1 {
            return err("partitions", "must be at least 1");
        }
        Ok(())
    }

    /// The MQTT → Kafka side: every device message into `.messages`, keyed by publisher, but
    /// those a user mapping into one of `topics` carries ([`ClusterConfig::message_topics`]).
    pub fn forward_mapping(&self, topics: &[String]) -> MappingConfig {
        let mut m = MappingConfig::new(
            FORWARD_MAPPING.into(),
            vec!["#".into()],
            vec![self.destination(self.messages_topic())],
            KeySource::ClientId,
        );
        let carriers = topics.iter().filter(|t| **t != self.messages_topic()).cloned().collect();
        m.internal = Some(Internal::ClusterMessages { node: Bytes::from(self.node_id.clone()), carriers });
        m
    }

    /// Retained messages into the compacted `.retained`, keyed by topic.
    pub fn retained_mapping(&self) -> MappingConfig {
        let mut m = MappingConfig::new(
            RETAINED_MAPPING.into(),
            vec!["#".into()],
            vec![self.destination(self.retained_topic())],
            KeySource::Topic,
        );
        m.internal = Some(Internal::ClusterRetained { node: Bytes::from(self.node_id.clone()) });
        m
    }

    /// Claims of client ids into `.sessions`, keyed by client id (one partition per client id:
    /// every node reads one client's claims in one order).
    pub fn claims_mapping(&self) -> MappingConfig {
        let mut m = MappingConfig::new(
            CLAIMS_MAPPING.into(),
            vec![CLAIM_TOPIC.into()],
            vec![self.destination(self.sessions_topic())],
            KeySource::ClientId,
        );
        m.internal = Some(Internal::ClusterClaims {
            node: self.node_id.as_str().into(),
            confirm_ms: self.dead_after_ms,
            lease_ms: Some(self.heartbeat_ms),
            incarnation: self.incarnation,
            fence: self.fence,
        });
        m
    }

    /// Every node's claims, from the end (claims before a node started concern no connection
    /// of it).
    pub fn claims_inbound_mapping(&self) -> InboundMappingConfig {
        self.inbound(CLAIMS_MAPPING, self.sessions_topic(), StartAt::Latest, InboundInternal::ClusterClaims)
    }

    fn destination(&self, topic: String) -> Destination {
        // A prefix of topic-name characters has no `{`: the template is the fixed topic.
        let topic = TopicTemplate::parse(&topic).unwrap_or_else(|_| TopicTemplate::fixed(&topic));
        Destination { cluster: self.kafka.clone(), topic, partition: None }
    }

    /// The Kafka → MQTT side: other nodes' messages from `topics` (`.messages` and the
    /// carriers', [`ClusterConfig::message_topics`]), from the end (a new node has no sessions
    /// that missed anything; a restarted one resumes at its stored position).
    pub fn inbound_mapping(&self, topics: Vec<String>) -> InboundMappingConfig {
        let mut m = self.inbound(
            FORWARD_MAPPING,
            self.messages_topic(),
            StartAt::Latest,
            InboundInternal::ClusterMessages { node: self.node_id.as_str().into() },
        );
        if !topics.is_empty() {
            m.kafka_topics = topics;
        }
        m
    }

    /// Retained messages from `.retained`, from the beginning: stored, not delivered.
    pub fn retained_inbound_mapping(&self) -> InboundMappingConfig {
        self.inbound(RETAINED_MAPPING, self.retained_topic(), StartAt::Earliest, InboundInternal::ClusterRetained)
    }

    fn inbound(&self, name: &str, topic: String, start: StartAt, internal: InboundInternal) -> InboundMappingConfig {
        InboundMappingConfig {
            name: name.into(),
            cluster: self.kafka.clone(),
            kafka_topics: vec![topic],
            kafka_topic_pattern: None,
            mqtt_topics: vec!["${header.mqtt.topic}".into()],
            payload: PayloadSource::Value,
            qos: 0,
            retain: false,
            start,
            schema: None,
            registry: None,
            mode: None,
            subject: None,
            internal: Some(internal),
        }
    }
}

/// The destination of a user mapping whose records the other nodes can read back as the
/// messages they were, so that the messages it takes are not also written to `.messages`: the
/// mapping keeps the message as it is (MQTT headers on, no schema, no dead-letter topic: a
/// refused record would reach no node) and the destination is in the cluster's Kafka (`kafka`),
/// one fixed topic, placed by a key that is the same for every message of one MQTT topic or in
/// one fixed partition, so one publisher's messages on one topic stay in one partition, in
/// order (what MQTT orders). The first such destination of the mapping; `None` when it has none.
pub fn carrier_destination(m: &MappingConfig, kafka: &str) -> Option<usize> {
    let faithful = m.internal.is_none()
        && m.headers
        && m.schema.is_none()
        && m.registry.is_none()
        && m.mode.is_none()
        && m.dead_letter.is_none();
    if !faithful {
        return None;
    }
    m.destinations.iter().position(|d| {
        d.cluster == kafka && d.topic.fixed_topic().is_some() && (d.partition.is_some() || m.key != KeySource::None)
    })
}

/// Whether a user property keeps its own header in a carrier's record (see
/// [`carrier_destination`]): not under a name the other nodes read as the message's topic, QoS,
/// properties or node (they read the user properties from [`USER_PROPERTIES_HEADER`]).
pub fn carrier_header_allowed(name: &str) -> bool {
    !(name.starts_with("mqtt.") || name.starts_with("sluice.") || name == "content-type")
}

/// User properties as one header value: for each, name and value as MQTT strings (a 2-byte
/// big-endian length, then the bytes), in order.
pub fn encode_user_properties(users: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(users.iter().map(|(k, v)| 4 + k.len() + v.len()).sum());
    for (k, v) in users {
        for s in [k, v] {
            let b = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
            out.extend_from_slice(&(b.len() as u16).to_be_bytes());
            out.extend_from_slice(b);
        }
    }
    out
}

/// Inverse of [`encode_user_properties`]; `None` when the bytes are not such a list.
pub fn decode_user_properties(mut b: &[u8]) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let take = |b: &mut &[u8]| -> Option<String> {
        let n = usize::from(u16::from_be_bytes([*b.first()?, *b.get(1)?]));
        let s = std::str::from_utf8(b.get(2..2 + n)?).ok()?.to_string();
        *b = &b[2 + n..];
        Some(s)
    };
    while !b.is_empty() {
        let k = take(&mut b)?;
        let v = take(&mut b)?;
        out.push((k, v));
    }
    Some(out)
}

/// "This node serves this client id now": written by the shard that answered a CONNECT with
/// CONNACK, read by every node in the order of the client id's partition. A node that reads
/// another node's claim for a client it serves, *after* it read its own claim for that
/// connection, closes it (0x8E) and ends its session there: the later claim wins, and every
/// node agrees which one is later. A claim read before the node's own is older and ignored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claim {
    pub node: String,
    pub client: String,
    /// Shard and connection on `node`: whose claim it is when `node` reads it back.
    pub shard: usize,
    pub conn: u64,
    /// The new connection starts clean (a will with a delay is then not held back for it).
    pub clean: bool,
    #[serde(default)]
    pub kind: ClaimKind,
    /// The record carries the client's will (topic, QoS, retain, properties in the MQTT
    /// headers, the payload as the value): the others publish it if this node dies.
    #[serde(default)]
    pub will: bool,
    /// For a handover: whose claim it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<HandoverTo>,
    /// For [`ClaimKind::Share`]: the node has members of the group.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub active: bool,
    /// For an active [`ClaimKind::Share`]: how many members of the group the node has (its
    /// weight in [`share_node`]; 0, as an older node writes it: counted as one).
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub members: u32,
    /// The incarnation of `node` that made the claim (see [`ClusterConfig::incarnation`]): a
    /// claim of an earlier one is of a connection that is gone.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub inc: u64,
    /// With a will: its delay and the session's expiry (seconds). Should `node` die, the will
    /// goes out after the shorter of the two, unless the client connects again before.
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub will_delay: u32,
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub expiry: u32,
    /// A [`ClaimKind::Release`] written by a survivor (this node id) about a dead node's will:
    /// the survivor whose release is read first publishes the will, so it goes out once even
    /// when survivors disagree on who should. Also the survivor of a [`ClaimKind::WillSent`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// With `by`: the incarnation of `by` that wrote the record. Only that incarnation
    /// publishes the will; a later one (`by` restarted) reads its release as another node's.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub by_inc: u64,
    /// A connection with clean start off whose CONNACK waits for the session: the node this
    /// node believes holds it. That node answers with a [`ClaimKind::Handover`], empty when it
    /// has no session to give.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// For a [`ClaimKind::Lease`]: how old (ms) the oldest message at QoS 1/2 still queued or in
    /// flight for a persistent session on the shard is ([`LOW_UNKNOWN`]: one of unknown age, restored
    /// from disk or handed over); `None`: there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low: Option<u64>,
    /// For a [`ClaimKind::Lease`]: the shard's committed positions in the topics its node reads
    /// messages of other nodes from (`.messages` and carriers': topic, partition, next offset),
    /// and how many shards its node has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pos: Offsets,
    #[serde(default, skip_serializing_if = "is_zero_usize")]
    pub shards: usize,
    /// For an inactive [`ClaimKind::Share`]: when (Unix ms, the writer's clock) its node's last
    /// member of the group left; for a [`ClaimKind::Session`]: when it was written. 0: not said
    /// (an older node, or a node declared gone).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub at_ms: u64,
    /// For a [`ClaimKind::Lease`]: its shard has read one of its own leases back (its readers
    /// of the sessions topic are in place), so the other nodes' Share records reach it now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reading: bool,
}

fn is_zero_usize(v: &usize) -> bool {
    *v == 0
}

/// Offsets per partition of the message topics (topic, partition, next offset): a node's floor.
pub type Offsets = Vec<(String, i32, i64)>;

/// [`Claim::low`] of a shard holding a message whose age it does not know.
pub const LOW_UNKNOWN: u64 = u64::MAX;

fn is_zero(v: &u64) -> bool {
    *v == 0
}
fn is_zero32(v: &u32) -> bool {
    *v == 0
}

impl Claim {
    /// How long after its connection is lost the will of this claim goes out, in ms.
    pub fn will_after_ms(&self) -> u64 {
        u64::from(self.will_delay.min(self.expiry)) * 1000
    }
}

/// What a `.sessions` record says.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClaimKind {
    /// A connection of the client was accepted here (the takeover rule applies).
    #[default]
    Connect,
    /// The client's connection here ended and its will went out or is gone: nothing of it is
    /// left for the others to publish should this node die. Never takes a client over.
    Release,
    /// The client's persistent session, for the node and connection in `to` that took it over
    /// (the record's value: the session's stored form, subscriptions, in-flight and queued
    /// messages). Never takes a client over.
    Handover,
    /// A shard's lease (`client`: `lease/NODE/SHARD`), written every `heartbeat_ms`: a shard
    /// that reads its own back knows it reaches Kafka (see `ClusterConfig::fence`).
    Lease,
    /// This node has members of the shared-subscription group `client` (its share key,
    /// `group/filter`) from now on (`active`, as many as `members`; written again when that
    /// number changes, at most once a `heartbeat_ms`), or none any more: the nodes with members
    /// of a group pick, by the message's hash weighted by their members, the one of them that
    /// delivers it ([`share_node`]).
    Share,
    /// `client`'s persistent session lives on `node` from now on, with the subscriptions of
    /// the record's value (its stored form without messages), or ended there (`active` false
    /// and no value): what a survivor needs to rebuild it should `node` die (see
    /// [`adopt_session`]). Keyed apart from the client's claims ([`session_record_key`]) so
    /// that compaction keeps both.
    Session,
    /// The survivor `by` (incarnation `by_inc`) published the will of `client` that it released
    /// (the will `node`, incarnation `inc`, held): nobody publishes it again. Until this is read
    /// the will stays released by `by`; should `by` die, restart or leave first, another
    /// survivor releases and publishes it (so a will is lost only with every survivor).
    WillSent,
}

/// The `.sessions` record key of `client`'s [`ClaimKind::Session`] records.
pub fn session_record_key(client: &str) -> String {
    format!("{client}\u{1}session")
}

/// Of the nodes that have members of a shared-subscription group (`nodes`: each with its
/// number of members, sorted by node, this node among them), the one that delivers a message on
/// `topic` with `payload`: a hash of both (at most [`SHARE_HASH_PAYLOAD`] bytes of the payload,
/// and its length) mapped into the range of the summed member counts, each node owning a part
/// as large as its count. The same answer on every node that has the same counts, so each
/// message reaches the group once; a node's share of the messages is its share of the members,
/// and even one busy topic's messages spread over the nodes. A node with no members is never
/// picked; `None` when no node has any.
pub fn share_node<'a>(nodes: &[(&'a str, u32)], topic: &str, payload: &[u8]) -> Option<&'a str> {
    share_pick(share_hash(topic, payload), nodes.iter().copied())
}

/// The hash [`share_node`] picks by, of `topic` and `payload`.
pub fn share_hash(topic: &str, payload: &[u8]) -> u64 {
    // FNV-1a (stable across nodes and releases), then a finalizer: FNV's low bits depend only
    // on the low bits of the bytes, and the mapping below reads the high ones.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let len = (payload.len() as u64).to_le_bytes();
    let head = &payload[..payload.len().min(SHARE_HASH_PAYLOAD)];
    for b in topic.as_bytes().iter().chain(&[0xff]).chain(&len).chain(head) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// [`share_node`] for hash `h` ([`share_hash`]) over `nodes` (sorted by node, as there), read
/// twice: views a node builds on the fly pick without a vector per message.
pub fn share_pick<'a>(h: u64, nodes: impl Iterator<Item = (&'a str, u32)> + Clone) -> Option<&'a str> {
    let total: u64 = nodes.clone().map(|(_, n)| u64::from(n)).sum();
    if total == 0 {
        return None;
    }
    // h scaled into [0, total) by its high bits: no modulo bias.
    let mut at = ((u128::from(h) * u128::from(total)) >> 64) as u64;
    for (node, n) in nodes {
        if at < u64::from(n) {
            return Some(node);
        }
        at -= u64::from(n);
    }
    None
}

/// Payload bytes [`share_node`] hashes, at most: the pick stays cheap for large messages.
pub const SHARE_HASH_PAYLOAD: usize = 64;

/// Where a [`ClaimKind::Handover`] goes: the claim it answers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandoverTo {
    pub node: String,
    pub shard: usize,
    pub conn: u64,
}

/// A handed-over session larger than this goes without its queued and in-flight messages
/// (counted): a Kafka record must stay under the broker's `message.max.bytes` (1 MB by default).
pub const HANDOVER_MAX_BYTES: usize = 900 << 10;

impl Claim {
    /// A claim of `kind` by shard `shard` of `node` about `client`, nothing else set.
    pub fn new(node: &str, client: &str, shard: usize, kind: ClaimKind) -> Claim {
        Claim {
            node: node.to_string(),
            client: client.to_string(),
            shard,
            conn: 0,
            clean: false,
            kind,
            will: false,
            to: None,
            active: false,
            members: 0,
            inc: 0,
            will_delay: 0,
            expiry: 0,
            by: None,
            by_inc: 0,
            from: None,
            low: None,
            pos: Vec::new(),
            shards: 0,
            at_ms: 0,
            reading: false,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
    pub fn decode(b: &[u8]) -> Option<Claim> {
        serde_json::from_slice(b).ok()
    }
}

/// What a node writes to `<prefix>.nodes` (as JSON, keyed by node id).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Heartbeat {
    pub node: String,
    /// When the node started (ms since the epoch): a new value is a restart.
    pub incarnation: u64,
    /// Heartbeats sent by this incarnation, from 0.
    pub seq: u64,
    /// False in the last heartbeat of a node that stops cleanly.
    pub alive: bool,
    /// The node's MQTT listeners, for operators.
    #[serde(default)]
    pub listeners: Vec<String>,
    /// Where a survivor replays the message topics from to rebuild this node's persistent
    /// sessions should it die: per partition, an offset below which nothing is still queued or
    /// in flight for any of them (see `sluice-kafka`'s membership). `None`, or a partition not
    /// named: from the earliest record kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<Offsets>,
    /// The topics of the user mappings that carry this node's messages to the others
    /// ([`ClusterConfig::message_topics`] without `.messages`): a survivor replays them too, and
    /// a node that does not read one of them says so.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub carriers: Vec<String>,
}

impl Heartbeat {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
    pub fn decode(b: &[u8]) -> Option<Heartbeat> {
        serde_json::from_slice(b).ok()
    }
}

/// A node as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Member {
    pub node: String,
    pub incarnation: u64,
    pub state: MemberState,
    /// Milliseconds since something was heard from it (as of the last [`Members::tick`]).
    pub silent_ms: u64,
    pub listeners: Vec<String>,
    /// Its last heartbeat's [`Heartbeat::floor`] and [`Heartbeat::carriers`].
    #[serde(skip)]
    pub floor: Option<Offsets>,
    #[serde(skip)]
    pub carriers: Vec<String>,
    #[serde(skip)]
    last_seen_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Alive,
    /// Stopped cleanly.
    Left,
    /// Not heard from for `dead_after_ms`.
    Dead,
}

impl MemberState {
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Left => "left",
            MemberState::Dead => "dead",
        }
    }
}

/// A change [`Members`] reports once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberChange {
    Joined(String),
    Restarted(String),
    Left(String),
    Dead(String),
}

/// Membership from heartbeats: who is alive, who left, who died (see the module doc).
#[derive(Clone, Debug)]
pub struct Members {
    me: String,
    dead_after_ms: u64,
    nodes: BTreeMap<String, Member>,
    /// Since when this node's own heartbeats have been read back without a gap of
    /// `dead_after_ms / 2`: only a node that hears itself can tell that another fell silent
    /// (during a Kafka outage every node is silent to every other, and none is dead).
    healthy_since_ms: Option<u64>,
    /// Heartbeats of nodes beyond [`MEMBERS_MAX`].
    pub ignored: u64,
}

impl Members {
    pub fn new(me: &str, dead_after_ms: u64) -> Members {
        Members { me: me.into(), dead_after_ms, nodes: BTreeMap::new(), healthy_since_ms: None, ignored: 0 }
    }

    /// A heartbeat read from Kafka, written `age_ms` ago by its sender's clock (records of nodes
    /// long gone, read at start, arrive old and do not make those nodes alive).
    pub fn on_heartbeat(&mut self, hb: Heartbeat, age_ms: u64, now_ms: u64) -> Option<MemberChange> {
        let seen = now_ms.saturating_sub(age_ms);
        let fresh = age_ms < self.dead_after_ms;
        let state = match (hb.alive, fresh) {
            (false, _) => MemberState::Left,
            (true, true) => MemberState::Alive,
            (true, false) => MemberState::Dead,
        };
        if !self.nodes.contains_key(&hb.node) && self.nodes.len() >= MEMBERS_MAX {
            self.ignored += 1;
            return None;
        }
        let node = hb.node.clone();
        let m = self.nodes.entry(node.clone()).or_insert_with(|| Member {
            node: node.clone(),
            incarnation: hb.incarnation,
            state: MemberState::Dead,
            silent_ms: 0,
            listeners: Vec::new(),
            floor: None,
            carriers: Vec::new(),
            last_seen_ms: 0,
        });
        if hb.incarnation < m.incarnation || seen < m.last_seen_ms {
            return None; // an older record than one already read
        }
        let was = (m.state, m.incarnation);
        m.incarnation = hb.incarnation;
        m.last_seen_ms = seen;
        m.silent_ms = age_ms;
        m.listeners = hb.listeners;
        m.floor = hb.floor;
        m.carriers = hb.carriers;
        m.state = state;
        match (was, state) {
            ((MemberState::Alive, inc), MemberState::Alive) if inc != hb.incarnation => {
                Some(MemberChange::Restarted(node))
            }
            ((MemberState::Alive, _), MemberState::Alive) => None,
            (_, MemberState::Alive) => Some(MemberChange::Joined(node)),
            ((MemberState::Alive, _), MemberState::Left) => Some(MemberChange::Left(node)),
            _ => None,
        }
    }

    /// Declares dead every alive node not heard from for `dead_after_ms` — provided this node
    /// heard its own heartbeats all along for at least that long (see `healthy_since_ms`).
    pub fn tick(&mut self, now_ms: u64) -> Vec<MemberChange> {
        let mut out = Vec::new();
        let own_fresh = self.nodes.get(&self.me).is_some_and(|m| {
            m.state == MemberState::Alive && now_ms.saturating_sub(m.last_seen_ms) < self.dead_after_ms / 2
        });
        self.healthy_since_ms = match (own_fresh, self.healthy_since_ms) {
            (false, _) => None,
            (true, None) => Some(now_ms),
            (true, since) => since,
        };
        if self.healthy_since_ms.is_none_or(|since| now_ms - since < self.dead_after_ms) {
            for m in self.nodes.values_mut() {
                m.silent_ms = now_ms.saturating_sub(m.last_seen_ms);
            }
            return out;
        }
        for m in self.nodes.values_mut() {
            m.silent_ms = now_ms.saturating_sub(m.last_seen_ms);
            if m.state == MemberState::Alive && m.silent_ms >= self.dead_after_ms && m.node != self.me {
                m.state = MemberState::Dead;
                out.push(MemberChange::Dead(m.node.clone()));
            }
        }
        out
    }

    pub fn members(&self) -> Vec<Member> {
        self.nodes.values().cloned().collect()
    }

    /// This node's id.
    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn alive(&self) -> impl Iterator<Item = &str> {
        self.nodes.values().filter(|m| m.state == MemberState::Alive).map(|m| m.node.as_str())
    }

    /// Whether this node has heard itself for `dead_after_ms` (only then does it tell that
    /// others are gone, see `healthy_since_ms`), as of the last [`Members::tick`].
    pub fn settled(&self, now_ms: u64) -> bool {
        self.healthy_since_ms.is_some_and(|since| now_ms - since >= self.dead_after_ms)
    }

    /// Whether the connection behind a will that incarnation `inc` of `owner` holds is gone:
    /// `owner` is dead, or alive as a later incarnation (it restarted, whatever its silence).
    pub fn connection_gone(&self, owner: &str, inc: u64) -> bool {
        self.nodes.get(owner).is_some_and(|m| match m.state {
            MemberState::Dead => true,
            MemberState::Alive => inc != 0 && m.incarnation > inc,
            MemberState::Left => false,
        })
    }

    /// `node` as last heard, if it was.
    pub fn get(&self, node: &str) -> Option<&Member> {
        self.nodes.get(node)
    }

    /// Whether this node is the one to publish `owner`'s lost wills: the alive node with the
    /// lowest id other than `owner`, or `owner` itself when it is alone (restarted). Views may
    /// differ for a while; the log decides between two that both try (`Claim::by`).
    pub fn publishes_for(&self, owner: &str) -> bool {
        match self.alive().filter(|n| *n != owner).min() {
            Some(n) => n == self.me,
            None => owner == self.me,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ClusterConfig {
        ClusterConfig {
            name: "prod".into(),
            node_id: "n1".into(),
            kafka: "default".into(),
            topic_prefix: None,
            heartbeat_ms: 1000,
            dead_after_ms: 5000,
            partitions: 8,
            fence: true,
            incarnation: 0,
        }
    }

    fn hb(node: &str, inc: u64, alive: bool) -> Heartbeat {
        Heartbeat {
            node: node.into(),
            incarnation: inc,
            seq: 0,
            alive,
            listeners: vec![],
            floor: None,
            carriers: vec![],
        }
    }

    #[test]
    fn topics_and_mappings_follow_the_prefix() {
        let c = cfg();
        assert_eq!(c.messages_topic(), "_sluice.prod.messages");
        let t = c.internal_topics();
        assert_eq!(t.len(), 4);
        assert!(t.iter().any(|t| t.name == "_sluice.prod.sessions" && t.configs[0].1 == "compact"));
        assert!(t.iter().any(|t| t.name == "_sluice.prod.nodes" && t.partitions == 1));
        assert!(t.iter().any(|t| t.name == "_sluice.prod.retained" && t.configs[0].1 == "compact"));
        let f = c.forward_mapping(&[]);
        assert_eq!(f.destinations[0].topic.fixed_topic(), Some("_sluice.prod.messages"));
        assert_eq!(f.key, KeySource::ClientId);
        let i = c.inbound_mapping(c.message_topics(&[]));
        assert_eq!(i.kafka_topics, vec!["_sluice.prod.messages".to_string()]);
        assert!(matches!(i.internal, Some(InboundInternal::ClusterMessages { ref node }) if &**node == "n1"));
        let r = c.retained_inbound_mapping();
        assert_eq!(r.start, StartAt::Earliest);
    }

    #[test]
    fn validation_names_the_key() {
        let names = vec!["default".to_string()];
        assert!(cfg().validate(&names).is_ok());
        let mut c = cfg();
        c.node_id = "a b".into();
        assert_eq!(c.validate(&names).unwrap_err().key, "node_id");
        let mut c = cfg();
        c.kafka = "other".into();
        let e = c.validate(&names).unwrap_err();
        assert_eq!(e.key, "kafka");
        assert!(e.to_string().contains("`other`"), "{e}");
        let mut c = cfg();
        c.dead_after_ms = 1500;
        assert_eq!(c.validate(&names).unwrap_err().key, "dead_after_ms");
        let mut c = cfg();
        c.topic_prefix = Some("x/y".into());
        assert_eq!(c.validate(&names).unwrap_err().key, "topic_prefix");
    }

    #[test]
    fn user_properties_round_trip_in_order_with_repeats_and_garbage_is_refused() {
        let u = vec![("a".to_string(), "1".to_string()), ("a".into(), "2".into()), ("".into(), "é".into())];
        assert_eq!(decode_user_properties(&encode_user_properties(&u)), Some(u));
        assert_eq!(decode_user_properties(&[]), Some(vec![]));
        assert_eq!(decode_user_properties(&[0, 5, b'a']), None);
        assert_eq!(decode_user_properties(&[0, 1, b'a']), None, "a name without a value");
        assert_eq!(decode_user_properties(&[0, 1, 0xff, 0, 0]), None, "not UTF-8");
    }

    #[test]
    fn one_node_of_a_shared_group_delivers_each_message_and_every_node_agrees_which() {
        assert_eq!(share_node(&[], "a", b""), None);
        assert_eq!(share_node(&[("n1", 1)], "a", b"x"), Some("n1"));
        assert_eq!(share_node(&[("n1", 0), ("n2", 0)], "a", b"x"), None, "nobody has members");
        let nodes = [("n1", 1), ("n2", 1), ("n3", 1)];
        for many_topics in [true, false] {
            let mut counts = [0; 3];
            for i in 0..3000 {
                let (t, p) = if many_topics {
                    (format!("fleet/car-{i}/speed"), "55".to_string())
                } else {
                    ("orders".to_string(), format!("{{\"order\":{i}}}"))
                };
                let n = share_node(&nodes, &t, p.as_bytes()).unwrap();
                assert_eq!(share_node(&nodes, &t, p.as_bytes()), Some(n), "the same answer every time");
                counts[nodes.iter().position(|x| x.0 == n).unwrap()] += 1;
            }
            assert!(counts.iter().all(|c| *c > 800), "spread over the nodes: {counts:?}");
        }
    }

    #[test]
    fn a_nodes_share_of_a_groups_messages_follows_its_members_and_a_node_without_any_gets_none() {
        // Messages as devices send them: one busy topic, many topics, short payloads that
        // differ only in their low bits (FNV alone spreads those badly over a power of two).
        let cases: [&dyn Fn(usize) -> (String, String); 3] = [
            &|i| ("orders".into(), format!("{{\"order\":{i}}}")),
            &|i| (format!("fleet/car-{i}/speed"), "55".into()),
            &|i| ("work".into(), format!("x{i}")),
        ];
        for case in cases {
            let weighted = [("n1", 1), ("n2", 3), ("n3", 0)];
            let mut counts = [0usize; 3];
            for i in 0..4000 {
                let (t, p) = case(i);
                let n = share_node(&weighted, &t, p.as_bytes()).unwrap();
                assert_eq!(share_node(&weighted, &t, p.as_bytes()), Some(n), "the same answer every time");
                counts[weighted.iter().position(|x| x.0 == n).unwrap()] += 1;
            }
            assert_eq!(counts[2], 0, "a node without members is never picked");
            // 1:3 of 4000: 1000 expected for n1; a fair hash stays within a few standard
            // deviations (27 here).
            assert!((850..=1150).contains(&counts[0]), "n1 gets about a quarter: {counts:?}");
            assert_eq!(counts[0] + counts[1], 4000);
        }
        // Another node of the same counts picks the same: the answer depends on the list only.
        let a = [("a", 2), ("b", 5), ("c", 1)];
        let b: Vec<(&str, u32)> = ["a", "b", "c"].into_iter().zip([2, 5, 1]).collect();
        let picks: Vec<_> = (0..200).map(|i| share_node(&a, "t", format!("{i}").as_bytes())).collect();
        let again: Vec<_> = (0..200).map(|i| share_node(&b, "t", format!("{i}").as_bytes())).collect();
        assert_eq!(picks, again);
    }

    #[test]
    fn heartbeats_round_trip_and_garbage_is_none() {
        let h = Heartbeat {
            node: "n2".into(),
            incarnation: 7,
            seq: 3,
            alive: true,
            listeners: vec!["a:1".into()],
            floor: Some(vec![("t".into(), 0, 5)]),
            carriers: vec!["telemetry".into()],
        };
        assert_eq!(Heartbeat::decode(&h.encode()), Some(h));
        assert_eq!(Heartbeat::decode(b"\xff{"), None);
    }

    /// This node's own heartbeat, read back at `at`.
    fn me_at(m: &mut Members, at: u64) {
        m.on_heartbeat(hb("n1", 1, true), 0, at);
    }

    #[test]
    fn a_node_joins_dies_when_silent_and_comes_back_as_a_restart() {
        let mut m = Members::new("n1", 5000);
        for t in (0..=7000).step_by(500) {
            me_at(&mut m, t);
            m.tick(t.min(6999));
        }
        assert_eq!(m.on_heartbeat(hb("n2", 1, true), 0, 1000), Some(MemberChange::Joined("n2".into())));
        assert_eq!(m.on_heartbeat(hb("n2", 1, true), 0, 2000), None);
        assert!(m.tick(6999).is_empty());
        assert_eq!(m.tick(7000), vec![MemberChange::Dead("n2".into())]);
        me_at(&mut m, 9000);
        assert!(m.tick(9000).is_empty(), "reported once");
        assert_eq!(m.on_heartbeat(hb("n2", 2, true), 0, 9000), Some(MemberChange::Joined("n2".into())));
        assert_eq!(m.on_heartbeat(hb("n2", 3, true), 0, 9100), Some(MemberChange::Restarted("n2".into())));
        assert_eq!(m.on_heartbeat(hb("n2", 2, true), 0, 9200), None, "an older incarnation is ignored");
        assert_eq!(m.on_heartbeat(hb("n2", 3, false), 0, 9300), Some(MemberChange::Left("n2".into())));
        for t in (9500..=100_000).step_by(500) {
            me_at(&mut m, t);
        }
        assert!(m.tick(100_000).is_empty(), "a node that left does not die");
        assert!(!m.alive().any(|n| n == "n2"));
    }

    #[test]
    fn nobody_is_declared_dead_by_a_node_that_does_not_hear_itself() {
        let mut m = Members::new("n1", 5000);
        for t in (0..=10_000).step_by(500) {
            me_at(&mut m, t);
            assert!(m.tick(t).is_empty());
        }
        m.on_heartbeat(hb("n2", 1, true), 0, 10_000);
        // Kafka pauses at 10 s: neither n1 nor n2 is heard of until 30 s.
        for t in (10_500..30_000).step_by(500) {
            assert!(m.tick(t).is_empty(), "n2 declared dead at {t} while n1 hears nothing either");
        }
        // Kafka is back: n1 hears itself first, n2 a little later; n2 is not declared dead.
        me_at(&mut m, 30_000);
        assert!(m.tick(30_000).is_empty());
        m.on_heartbeat(hb("n2", 1, true), 0, 30_200);
        me_at(&mut m, 30_500);
        assert!(m.tick(30_500).is_empty());
        // A node that stays silent once n1 has heard itself for dead_after_ms dies.
        for t in (31_000..=36_000).step_by(500) {
            me_at(&mut m, t);
            let changes = m.tick(t);
            if t < 35_500 {
                assert!(changes.is_empty(), "{t}: {changes:?}");
            } else if !changes.is_empty() {
                assert_eq!(changes, vec![MemberChange::Dead("n2".into())]);
                return;
            }
        }
        panic!("n2 never died");
    }

    #[test]
    fn old_heartbeats_read_at_start_do_not_make_a_node_alive() {
        let mut m = Members::new("n1", 5000);
        assert_eq!(m.on_heartbeat(hb("gone", 1, true), 60_000, 100_000), None);
        assert_eq!(m.members()[0].state, MemberState::Dead);
        assert_eq!(m.on_heartbeat(hb("n3", 1, true), 100, 100_000), Some(MemberChange::Joined("n3".into())));
    }

    #[test]
    fn members_are_bounded() {
        let mut m = Members::new("n1", 5000);
        for i in 0..MEMBERS_MAX + 5 {
            m.on_heartbeat(hb(&format!("n{i}"), 1, true), 0, 10);
        }
        assert_eq!(m.members().len(), MEMBERS_MAX);
        assert_eq!(m.ignored, 5);
    }
}

#[cfg(test)]
mod round_trip {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::bridge::{KafkaRecord, Router};
    use crate::inbound::{Inbound, InboundRecord, FROM_NODE, RETAINED_SYNC};
    use crate::message::Message;
    use crate::packet::Properties;

    fn node(id: &str) -> ClusterConfig {
        ClusterConfig {
            name: "t".into(),
            node_id: id.into(),
            kafka: "k".into(),
            topic_prefix: None,
            heartbeat_ms: 1000,
            dead_after_ms: 5000,
            partitions: 4,
            fence: true,
            incarnation: 0,
        }
    }

    /// What another node's consumer hands its shard for `r`, with its headers as Kafka keeps
    /// them (in order; rskafka gives at most one per name: the last).
    fn consumed(r: &KafkaRecord, mapping: u16) -> InboundRecord {
        let mut headers: Vec<(String, Bytes)> = Vec::new();
        r.for_each_header(|k, v| {
            headers.retain(|(name, _)| name != k);
            headers.push((k.to_string(), Bytes::copy_from_slice(v)));
        });
        InboundRecord {
            mapping,
            topic: r.topic.clone(),
            partition: 0,
            offset: 0,
            key: r.key().map(Bytes::copy_from_slice),
            value: Some(r.value.clone()),
            headers,
        }
    }

    fn message(topic: &str, qos: u8, retain: bool, users: &[(&str, &str)]) -> Arc<Message> {
        let p = Properties {
            content_type: Some("text/plain".into()),
            correlation_data: Some(Bytes::from_static(b"\0c")),
            user_properties: users.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        };
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"88"),
            qos,
            retain,
            properties: p.boxed(),
            expiry_at_ms: None,
            origin: "car-1".into(),
        })
    }

    fn setup(me: &str) -> (Router, Inbound) {
        let c = node(me);
        let k = vec!["k".to_string()];
        let router = Router::new(&[c.forward_mapping(&[]), c.retained_mapping()], &k).unwrap();
        let inbound = Inbound::new(&[c.inbound_mapping(vec![]), c.retained_inbound_mapping()], &k).unwrap();
        (router, inbound)
    }

    #[test]
    fn a_message_crosses_to_another_node_as_it_was_published_and_not_back_to_its_own() {
        let (router_1, inbound_1) = setup("n1");
        let (_, inbound_2) = setup("n2");
        let users = [("a", "1"), ("a", "2"), ("mqtt.topic", "secret/x"), (NODE_HEADER, "n2")];
        let msg = message("fleet/car-1/speed", 2, false, &users);
        let mut out = Vec::new();
        router_1.route(&msg, 1, &mut out);
        assert_eq!(out.len(), 1, "not retained: only the message topic");
        assert_eq!(&*out[0].topic, "_sluice.t.messages");
        assert_eq!(out[0].key(), Some(&b"car-1"[..]), "keyed by publisher");
        let got = inbound_2.transform(&consumed(&out[0], 0), 0).unwrap();
        assert_eq!(got.len(), 1);
        let m = &got[0];
        assert_eq!((m.topic.as_str(), m.qos, m.retain, &*m.origin), ("fleet/car-1/speed", 2, false, FROM_NODE));
        assert_eq!(m.properties(), msg.properties(), "properties, user properties in order and repeated");
        assert!(inbound_1.transform(&consumed(&out[0], 0), 0).unwrap().is_empty(), "a node skips its own");
    }

    /// A node with user mappings `user` before the cluster's own, as `Config` puts them.
    fn setup_with(me: &str, user: &[MappingConfig]) -> (Router, Inbound) {
        let c = node(me);
        let k = vec!["k".to_string(), "other".to_string()];
        let topics = c.message_topics(user);
        let mut mappings = user.to_vec();
        mappings.extend([c.forward_mapping(&topics), c.retained_mapping()]);
        let router = Router::new(&mappings, &k).unwrap();
        let inbound = Inbound::new(&[c.inbound_mapping(topics), c.retained_inbound_mapping()], &k).unwrap();
        (router, inbound)
    }

    fn user_mapping(name: &str, filter: &str, cluster: &str, topic: &str, key: KeySource) -> MappingConfig {
        let d = Destination { cluster: cluster.into(), topic: TopicTemplate::parse(topic).unwrap(), partition: None };
        MappingConfig::new(name.into(), vec![filter.into()], vec![d], key)
    }

    #[test]
    fn a_user_mapping_into_the_clusters_kafka_carries_its_messages_and_messages_gets_none() {
        let telemetry = user_mapping("t", "fleet/#", "k", "telemetry", KeySource::Level(1));
        let (router_1, inbound_1) = setup_with("n1", std::slice::from_ref(&telemetry));
        let (_, inbound_2) = setup_with("n2", std::slice::from_ref(&telemetry));
        assert!(router_1.is_carrier(0));
        let users = [("a", "1"), ("a", "2"), ("mqtt.topic", "secret/x"), (NODE_HEADER, "n9"), ("trace", "t1")];
        let msg = message("fleet/car-1/speed", 1, false, &users);
        let mut out = Vec::new();
        router_1.route(&msg, 1, &mut out);
        assert_eq!(out.len(), 1, "the user's record only: {out:?}");
        assert_eq!((&*out[0].topic, out[0].key()), ("telemetry", Some(&b"car-1"[..])));
        let r = consumed(&out[0], 0);
        let header = |name: &str| r.headers.iter().find(|(k, _)| k == name).map(|(_, v)| &v[..]);
        assert_eq!(header("mqtt.topic"), Some(&b"fleet/car-1/speed"[..]), "a user property does not replace it");
        assert_eq!(header(NODE_HEADER), Some(&b"n1"[..]));
        assert_eq!(
            (header("trace"), header("a")),
            (Some(&b"t1"[..]), Some(&b"2"[..])),
            "the user's consumers see them"
        );
        let got = inbound_2.transform(&r, 0).unwrap();
        assert_eq!(got.len(), 1, "read back by the other node");
        assert_eq!((got[0].topic.as_str(), got[0].qos, &*got[0].origin), ("fleet/car-1/speed", 1, FROM_NODE));
        assert_eq!(got[0].properties(), msg.properties(), "user properties in order and repeated");
        assert!(inbound_1.transform(&r, 0).unwrap().is_empty(), "a node skips its own");
        // Another producer's record in the user's topic is no node's message.
        let foreign = InboundRecord { headers: vec![("mqtt.topic".into(), Bytes::from_static(b"fleet/x"))], ..r };
        assert!(inbound_2.transform(&foreign, 0).unwrap().is_empty());
        // A message the mapping does not take goes to `.messages`.
        out.clear();
        router_1.route(&message("home/lamp", 1, false, &[]), 1, &mut out);
        assert_eq!(out.iter().map(|r| &*r.topic).collect::<Vec<_>>(), ["_sluice.t.messages"]);
    }

    #[test]
    fn a_mapping_that_changes_reorders_or_leaves_the_clusters_kafka_carries_nothing() {
        let mut schema = user_mapping("s", "fleet/#", "k", "telemetry", KeySource::Topic);
        schema.schema = Some("speed".into());
        let mut no_headers = user_mapping("h", "fleet/#", "k", "telemetry", KeySource::Topic);
        no_headers.headers = false;
        let mut dead_letter = user_mapping("d", "fleet/#", "k", "telemetry", KeySource::Topic);
        dead_letter.dead_letter = Some(crate::bridge::DeadLetter { cluster: "k".into(), topic: "dl".into() });
        for m in [
            user_mapping("n", "fleet/#", "k", "telemetry", KeySource::None),
            user_mapping("o", "fleet/#", "other", "telemetry", KeySource::Topic),
            user_mapping("l", "fleet/#", "k", "fleet-{1}", KeySource::Topic),
            user_mapping("i", "fleet/#", "k", "_sluice.t.messages", KeySource::Topic),
            schema,
            no_headers,
            dead_letter,
        ] {
            let (router, _) = setup_with("n1", std::slice::from_ref(&m));
            assert!(!router.is_carrier(0), "{}", m.name);
            let mut out = Vec::new();
            router.route(&message("fleet/car-1/speed", 1, false, &[]), 1, &mut out);
            let to_nodes = out.iter().filter(|r| r.node().is_some()).map(|r| &*r.topic).collect::<Vec<_>>();
            assert_eq!(to_nodes, ["_sluice.t.messages"], "{}", m.name);
        }
        // A level the topic lacks: no key, so `.messages` takes it.
        let deep = user_mapping("deep", "fleet/#", "k", "telemetry", KeySource::Level(5));
        let (router, _) = setup_with("n1", &[deep]);
        let mut out = Vec::new();
        router.route(&message("fleet/car-1/speed", 1, false, &[]), 1, &mut out);
        let to_nodes = out.iter().filter(|r| r.node().is_some()).map(|r| &*r.topic).collect::<Vec<_>>();
        assert_eq!(to_nodes, ["_sluice.t.messages"]);
        // Two carriers: the first carries, the second's record is a plain one.
        let a = user_mapping("a", "fleet/#", "k", "telemetry", KeySource::Topic);
        let b = user_mapping("b", "fleet/+/speed", "k", "speeds", KeySource::Topic);
        assert_eq!(node("n1").message_topics(&[a.clone(), b.clone()]), ["_sluice.t.messages", "telemetry", "speeds"]);
        let (router, _) = setup_with("n1", &[a, b]);
        out.clear();
        router.route(&message("fleet/car-1/speed", 1, false, &[]), 1, &mut out);
        let to_nodes = out.iter().filter(|r| r.node().is_some()).map(|r| &*r.topic).collect::<Vec<_>>();
        assert_eq!((out.len(), to_nodes), (2, vec!["telemetry"]));
    }

    #[test]
    fn a_message_expiry_crosses_as_the_seconds_it_had_left() {
        let (router, _) = setup("n1");
        let (_, inbound_2) = setup("n2");
        let mut m = Arc::try_unwrap(message("fleet/car-1/speed", 1, false, &[])).unwrap();
        m.expiry_at_ms = Some(31_000);
        let mut out = Vec::new();
        router.route(&Arc::new(m), 1_000, &mut out);
        let got = inbound_2.transform(&consumed(&out[0], 0), 5_000).unwrap();
        assert_eq!(got[0].expiry_at_ms, Some(35_000), "30 s left when written, from when it was read");
    }

    #[test]
    fn a_retained_message_also_goes_to_the_retained_table_and_is_stored_there_not_delivered() {
        let (router, _) = setup("n1");
        let (_, inbound_2) = setup("n2");
        let mut out = Vec::new();
        router.route(&message("state/car-1", 1, true, &[]), 1, &mut out);
        assert_eq!(out.len(), 2);
        let table = out.iter().find(|r| &*r.topic == "_sluice.t.retained").unwrap();
        assert_eq!(table.key(), Some(&b"state/car-1"[..]), "compacted by MQTT topic");
        let got = inbound_2.transform(&consumed(table, 1), 0).unwrap();
        assert_eq!((got[0].retain, &*got[0].origin), (true, RETAINED_SYNC));
        // Its own records count too: a restarted node reads the table like any other.
        let (_, inbound_1) = setup("n1");
        assert_eq!(inbound_1.transform(&consumed(table, 1), 0).unwrap().len(), 1);
    }

    #[test]
    fn a_cluster_record_with_broken_headers_is_skipped_not_delivered_elsewhere() {
        let (_, inbound) = setup("n2");
        let mut r = InboundRecord {
            mapping: 0,
            topic: "_sluice.t.messages".into(),
            partition: 0,
            offset: 0,
            key: None,
            value: Some(Bytes::from_static(b"x")),
            headers: vec![("mqtt.qos".into(), Bytes::from_static(b"1"))],
        };
        assert!(inbound.transform(&r, 0).is_err(), "no topic");
        r.headers.push(("mqtt.topic".into(), Bytes::from_static(b"a/+")));
        assert!(inbound.transform(&r, 0).is_err(), "a filter is not a topic");
        r.headers[1].1 = Bytes::from_static(b"a/b");
        r.headers[0].1 = Bytes::from_static(b"7");
        assert!(inbound.transform(&r, 0).is_err(), "QoS 7");
    }
}
