//! MQTT → Kafka mapping: which MQTT messages become which Kafka records.
//!
//! Sans-I/O like the rest of `sluice-core`: a [`Router`] turns one MQTT [`Message`] into zero or
//! more [`KafkaRecord`]s (several mappings or several destinations: multicast), choosing the Kafka
//! topic, key and headers. The `sluice-kafka` crate produces them; results come back to the shard
//! as [`ProduceResult`]s, which decide the PUBACK/PUBREC of QoS 1/2 publishes.
//!
//! Partitioning is Kafka's default: murmur2 of the key, so Java and librdkafka (`murmur2_random`)
//! consumers and Kafka Streams agree on placement; it lives here so it is unit-tested against
//! Kafka's own test vectors.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use crate::bytes_reader::{ByteReader, ReadError};
use crate::message::Msg;
use crate::topic::{self, TopicLimits, Trie};

/// Where the record key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// The MQTT topic (default): same topic → same partition, so per-topic order holds.
    Topic,
    ClientId,
    /// One level of the MQTT topic, 0-based (`fleet/eu/car-1` level 2 is `car-1`).
    Level(usize),
    None,
}

impl<'de> Deserialize<'de> for KeySource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        KeySource::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A `key` that is none of the key sources.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{given}` is not topic, client-id, none or level:N")]
pub struct KeySourceError {
    pub given: String,
}

impl KeySource {
    pub fn parse(s: &str) -> Result<KeySource, KeySourceError> {
        match s {
            "topic" => Ok(KeySource::Topic),
            "client-id" => Ok(KeySource::ClientId),
            "none" => Ok(KeySource::None),
            _ => match s.strip_prefix("level:").and_then(|n| n.parse().ok()) {
                Some(n) => Ok(KeySource::Level(n)),
                None => Err(KeySourceError { given: s.to_string() }),
            },
        }
    }
}

/// A Kafka topic name, fixed or built from MQTT topic levels: `iot-{1}` takes level 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<TemplatePart>,
    /// The topic of a template without levels, shared by every record routed to it.
    fixed: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TemplatePart {
    Text(String),
    Level(usize),
}

/// Why a Kafka topic template does not parse: the template, and the byte offset of the `{`
/// that is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicTemplateError {
    #[error("`{template}`: unclosed `{{` at byte {at}")]
    Unclosed { template: String, at: usize },
    #[error("`{template}`: `{{{field}}}` at byte {at} is not a topic level number")]
    NotALevel { template: String, field: String, at: usize },
    #[error("empty Kafka topic")]
    Empty,
}

impl TopicTemplate {
    pub fn parse(s: &str) -> Result<TopicTemplate, TopicTemplateError> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Text(rest[..open].to_string()));
            }
            let at = s.len() - rest.len() + open;
            let close =
                rest[open..].find('}').ok_or_else(|| TopicTemplateError::Unclosed { template: s.to_string(), at })?
                    + open;
            let field = &rest[open + 1..close];
            let n = field.parse().map_err(|_| TopicTemplateError::NotALevel {
                template: s.to_string(),
                field: field.to_string(),
                at,
            })?;
            parts.push(TemplatePart::Level(n));
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Text(rest.to_string()));
        }
        if parts.is_empty() {
            return Err(TopicTemplateError::Empty);
        }
        let fixed = match parts.as_slice() {
            [TemplatePart::Text(t)] => Some(Arc::from(t.as_str())),
            _ => None,
        };
        Ok(TopicTemplate { parts, fixed })
    }

    /// A template that is exactly `topic` (no levels, whatever characters it has).
    pub fn fixed(topic: &str) -> TopicTemplate {
        TopicTemplate { parts: vec![TemplatePart::Text(topic.to_string())], fixed: Some(Arc::from(topic)) }
    }

    /// The topic when the template has no `{N}` levels (every record goes there).
    pub fn fixed_topic(&self) -> Option<&str> {
        self.fixed.as_deref()
    }

    /// [`TopicTemplate::render`] as a shared string: a fixed topic costs no allocation.
    pub fn render_shared(&self, mqtt_topic: &str) -> Option<Arc<str>> {
        match &self.fixed {
            Some(t) => Some(t.clone()),
            None => self.render(mqtt_topic).map(Arc::from),
        }
    }

    /// The Kafka topic for an MQTT topic; `None` when a referenced level does not exist or the
    /// result is not a legal Kafka topic name.
    pub fn render(&self, mqtt_topic: &str) -> Option<String> {
        if let [TemplatePart::Text(t)] = self.parts.as_slice() {
            return Some(t.clone());
        }
        let mut out = String::new();
        for p in &self.parts {
            match p {
                TemplatePart::Text(t) => out.push_str(t),
                TemplatePart::Level(n) => out.push_str(mqtt_topic.split('/').nth(*n)?),
            }
        }
        let legal = !out.is_empty()
            && out.len() <= 249
            && out.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        legal.then_some(out)
    }
}

impl<'de> Deserialize<'de> for TopicTemplate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TopicTemplate::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Name of a `[kafka.clusters.NAME]` table.
    pub cluster: String,
    pub topic: TopicTemplate,
    /// Always this partition, instead of placing by key (murmur2) or sticky for keyless records.
    #[serde(default)]
    pub partition: Option<i32>,
}

/// One `[[mqtt_to_kafka]]` table.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    pub name: String,
    /// MQTT topic filters (wildcards allowed).
    pub filters: Vec<String>,
    pub destinations: Vec<Destination>,
    #[serde(default = "default_key")]
    pub key: KeySource,
    /// Carry MQTT metadata (topic, QoS, retain, client id, MQTT 5 properties) as Kafka headers.
    #[serde(default = "default_true")]
    pub headers: bool,
    /// Where records Kafka refuses (too large, unknown topic, not authorized…) go instead, with
    /// `sluice.error` and `sluice.topic` headers saying why and where they were headed.
    #[serde(default)]
    pub dead_letter: Option<DeadLetter>,
    /// A local schema (`[schemas.NAME]`) every payload must validate against.
    #[serde(default)]
    pub schema: Option<String>,
    /// A `[schema_registries.NAME]` table; with `mode` validate or encode.
    #[serde(default)]
    pub registry: Option<String>,
    #[serde(default)]
    pub mode: Option<crate::schemas::SchemaMode>,
    /// The registry subject; Confluent's default `<kafka topic>-value` when absent.
    #[serde(default)]
    pub subject: Option<String>,
    /// `encode` with this version of the subject instead of the latest.
    #[serde(default)]
    pub version: Option<u32>,
    /// What an MQTT 3.1.1 publisher of a payload that does not validate gets.
    #[serde(default)]
    pub on_invalid: crate::schemas::OnInvalid,
    /// Set by sluice for its own mappings (the cluster's), never from a file.
    #[serde(skip)]
    pub internal: Option<Internal>,
}

/// What an internal mapping does beyond a configured one (see `crate::cluster`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Internal {
    /// Every message, with a header naming this node, but those a user mapping into one of
    /// `carriers` (topics) takes: that mapping's record carries the node header instead (see
    /// `crate::cluster::carrier_destination`).
    ClusterMessages { node: Bytes, carriers: Vec<String> },
    /// Retained messages only (deletions included), with a header naming this node.
    ClusterRetained { node: Bytes },
    /// This node's claims of client ids (see `crate::cluster::Claim`); a connection whose claim
    /// is not read back within `confirm_ms` is closed.
    ClusterClaims { node: Arc<str>, confirm_ms: u64, lease_ms: Option<u64>, incarnation: u64, fence: bool },
}

/// This node as its claims name it: id, incarnation, and how long a claim may stay unread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimsNode {
    pub node: Arc<str>,
    pub incarnation: u64,
    pub confirm_ms: u64,
    /// A shard that has not read its lease back for `confirm_ms` closes its clients
    /// (`ClusterConfig::fence`).
    pub fence: bool,
}

impl MappingConfig {
    /// A mapping with what the file's defaults give every key not named here (headers on, no
    /// dead letters, no schema): the `--map` flag's and tests' mappings.
    pub fn new(name: String, filters: Vec<String>, destinations: Vec<Destination>, key: KeySource) -> MappingConfig {
        MappingConfig {
            name,
            filters,
            destinations,
            key,
            headers: default_true(),
            dead_letter: None,
            schema: None,
            registry: None,
            mode: None,
            subject: None,
            version: None,
            on_invalid: Default::default(),
            internal: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeadLetter {
    pub cluster: String,
    pub topic: String,
}

fn default_key() -> KeySource {
    KeySource::Topic
}
fn default_true() -> bool {
    true
}

/// Where a record's key bytes are: in its source message (so routing a message allocates
/// nothing for its key), or in the record's own parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKey {
    None,
    /// The record's own bytes ([`KafkaRecord::with_key`]).
    Own,
    /// The source message's topic.
    Topic,
    /// Bytes `start..end` of the source message's topic (one level of it; an MQTT topic is at
    /// most 65,535 bytes).
    Level {
        start: u16,
        end: u16,
    },
    /// The source message's publisher.
    ClientId,
}

/// What every record of one mapping destination shares, behind one `Arc` per destination:
/// routing a record clones a pointer instead of carrying these fields in every record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordRoute {
    /// An explicit partition from the mapping; placement by key otherwise.
    pub partition: Option<i32>,
    /// The cluster node that wrote the record, as header [`crate::cluster::NODE_HEADER`] after
    /// the MQTT ones (cluster mappings only).
    pub node: Option<Bytes>,
    /// (cluster, topic) for the record if Kafka refuses it.
    pub dead_letter: Option<(u16, Arc<str>)>,
    /// A user mapping's record that also carries its message to the cluster's other nodes
    /// (`node` set): its user properties keep their own headers too, but for names the nodes
    /// read (`crate::cluster::carrier_header_allowed`).
    pub carrier: bool,
}

/// What only some records have (spill-log replay, claims, expiry, dead-letter causes): boxed,
/// so the usual record does not carry it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct OwnParts {
    /// The key of a [`RecordKey::Own`] record.
    key: Option<Bytes>,
    /// Headers after the MQTT ones.
    headers: Vec<(String, Bytes)>,
}

/// A record for Kafka, before partitioning.
///
/// A routed record refers to its MQTT message (`source`) for its key and its MQTT headers
/// instead of copying them: they are read where the record is encoded, on the Kafka thread, and
/// nothing per record is allocated on the shard or freed on the other thread but the record
/// itself. Records replayed from the spill log carry their key and headers as bytes.
///
/// Small on purpose (a test holds it to 96 bytes): records are moved by value from the shard's
/// router through the outbox to the Kafka thread's partition queues, several moves each, so
/// what a mapping's records share is behind one `Arc` ([`RecordRoute`]) and what few records
/// have is boxed.
#[derive(Clone, Debug)]
pub struct KafkaRecord {
    /// Index of the cluster in [`Router::clusters`].
    pub cluster: u16,
    /// Index of the mapping, for per-mapping metrics and logs.
    pub mapping: u16,
    pub topic: Arc<str>,
    pub value: Bytes,
    pub timestamp_ms: i64,
    key: RecordKey,
    /// Headers `mqtt.topic`, `mqtt.qos`, `mqtt.retain`, `mqtt.client_id`, the MQTT 5 properties
    /// and user properties of `source` come first (see [`KafkaRecord::for_each_header`]).
    mqtt_headers: bool,
    /// The MQTT message this record was routed from.
    source: Option<Msg>,
    route: Option<Arc<RecordRoute>>,
    own: Option<Box<OwnParts>>,
}

impl PartialEq for KafkaRecord {
    /// Equal records have the same bytes for Kafka and go to the same place.
    fn eq(&self, o: &Self) -> bool {
        let headers = |r: &KafkaRecord| {
            let mut h = Vec::new();
            r.for_each_header(|k, v| h.push((k.to_owned(), v.to_vec())));
            h
        };
        (self.cluster, self.mapping, &self.topic, self.key(), &self.value, self.timestamp_ms)
            == (o.cluster, o.mapping, &o.topic, o.key(), &o.value, o.timestamp_ms)
            && (self.dead_letter(), self.partition()) == (o.dead_letter(), o.partition())
            && headers(self) == headers(o)
    }
}

/// Why bytes from the spill log are not a [`KafkaRecord`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordDecodeError {
    #[error("spill record: unknown format version {0}")]
    UnknownFormat(u8),
    /// Short or not UTF-8 where a name should be. Its text is part of this one's (no `source()`,
    /// so a chain printer does not repeat it).
    #[error("spill record: {0}")]
    Read(ReadError),
}

impl From<ReadError> for RecordDecodeError {
    fn from(e: ReadError) -> Self {
        RecordDecodeError::Read(e)
    }
}

impl KafkaRecord {
    /// The spill-log form: self-describing (cluster and topic by name), so a record written by
    /// one configuration replays under another.
    pub fn encode(&self, cluster_name: &str, out: &mut Vec<u8>) {
        fn put(out: &mut Vec<u8>, b: &[u8]) {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        out.push(1); // format version
        put(out, cluster_name.as_bytes());
        put(out, self.topic.as_bytes());
        match self.key() {
            Some(k) => {
                out.push(1);
                put(out, k);
            }
            None => out.push(0),
        }
        put(out, &self.value);
        out.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        out.extend_from_slice(&(self.header_count() as u32).to_le_bytes());
        self.for_each_header(|k, v| {
            put(out, k.as_bytes());
            put(out, v);
        });
    }

    /// Inverse of [`KafkaRecord::encode`]: the cluster name and the record (cluster index 0, no
    /// mapping or dead letter: the caller fills them in).
    pub fn decode(b: &[u8]) -> Result<(String, KafkaRecord), RecordDecodeError> {
        let mut r = ByteReader::new(b);
        match r.u8()? {
            1 => {}
            v => return Err(RecordDecodeError::UnknownFormat(v)),
        }
        let cluster = r.str_u32_le()?;
        let topic: Arc<str> = r.str_u32_le()?.into();
        let key = match r.u8()? {
            0 => None,
            _ => Some(Bytes::copy_from_slice(r.bytes_u32_le()?)),
        };
        let value = Bytes::copy_from_slice(r.bytes_u32_le()?);
        let timestamp_ms = r.i64_le()?;
        let n = r.u32_le()? as usize;
        let mut headers = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            headers.push((r.str_u32_le()?, Bytes::copy_from_slice(r.bytes_u32_le()?)));
        }
        let mut r = KafkaRecord::new(0, topic, value, timestamp_ms);
        if let Some(k) = key {
            r = r.with_key(k);
        }
        if !headers.is_empty() {
            r.own_parts().headers = headers;
        }
        Ok((cluster, r))
    }

    /// Key, value and header bytes: what counts towards batch and record limits.
    pub fn size(&self) -> usize {
        let mut n = self.key().map_or(0, <[u8]>::len) + self.value.len();
        if let (true, Some(m), None, None) = (self.mqtt_headers, &self.source, self.node(), &self.own) {
            if m.properties.is_none() {
                // Nearly every routed record: a message without properties, so the four standard
                // headers and nothing else (what `for_each_header` would walk: it was 4 % of the
                // Kafka thread's samples, once per record on top of the encoder's walk).
                const NAMES: usize =
                    "mqtt.topic".len() + "mqtt.qos".len() + "mqtt.retain".len() + "mqtt.client_id".len();
                let retain = if m.retain { "true".len() } else { "false".len() };
                return n + NAMES + m.topic.len() + 1 + retain + m.origin.len();
            }
        }
        self.for_each_header(|k, v| n += k.len() + v.len());
        n
    }

    /// A record of its own: no source message, no key, no headers, mapping 0.
    pub fn new(cluster: u16, topic: Arc<str>, value: Bytes, timestamp_ms: i64) -> KafkaRecord {
        KafkaRecord {
            cluster,
            mapping: 0,
            topic,
            value,
            timestamp_ms,
            key: RecordKey::None,
            mqtt_headers: false,
            source: None,
            route: None,
            own: None,
        }
    }

    /// The record routed from `msg`: its key read from the message as `key` says, and with
    /// `mqtt_headers` the message's MQTT headers first.
    pub fn with_source(mut self, msg: Msg, key: RecordKey, mqtt_headers: bool) -> KafkaRecord {
        self.source = Some(msg);
        self.key = key;
        self.mqtt_headers = mqtt_headers;
        self
    }

    /// The record with `key` as its key bytes.
    pub fn with_key(mut self, key: Bytes) -> KafkaRecord {
        self.own_parts().key = Some(key);
        self.key = RecordKey::Own;
        self
    }

    /// The record with what its mapping destination's records share.
    pub fn with_route(mut self, route: Arc<RecordRoute>) -> KafkaRecord {
        self.route = Some(route);
        self
    }

    /// Adds a header after the others.
    pub fn push_header(&mut self, name: impl Into<String>, value: Bytes) {
        self.own_parts().headers.push((name.into(), value));
    }

    fn own_parts(&mut self) -> &mut OwnParts {
        self.own.get_or_insert_with(Default::default)
    }

    /// The MQTT message this record was routed from (none for spill-log replays).
    pub fn source(&self) -> Option<&Msg> {
        self.source.as_ref()
    }

    /// Takes the source message out of a record that is done with (acknowledged by Kafka and
    /// about to be dropped): the Kafka thread hands it back to the shard in the record's
    /// [`ProduceResult`] (see [`ProduceResult::source`]). What is left of a routed record frees
    /// nothing where it is dropped (its topic, route and value are shared with the router and
    /// the message; spill-log replays and dead-letter copies own boxed parts). Without its
    /// source, the record has no key or MQTT headers from it any more.
    pub fn take_source(&mut self) -> Option<Msg> {
        self.source.take()
    }

    /// An explicit partition from the mapping; placement by key otherwise.
    pub fn partition(&self) -> Option<i32> {
        self.route.as_ref().and_then(|r| r.partition)
    }

    /// The cluster node that wrote the record (cluster mappings only).
    pub fn node(&self) -> Option<&Bytes> {
        self.route.as_ref().and_then(|r| r.node.as_ref())
    }

    /// (cluster, topic) for the record if Kafka refuses it.
    pub fn dead_letter(&self) -> Option<(u16, &Arc<str>)> {
        self.route.as_ref().and_then(|r| r.dead_letter.as_ref()).map(|(c, t)| (*c, t))
    }

    /// The headers after the MQTT ones (spill-log replay, claims, dead-letter causes).
    pub fn headers(&self) -> &[(String, Bytes)] {
        self.own.as_ref().map_or(&[], |o| &o.headers)
    }

    /// The copy of this record for its dead-letter topic, if its mapping has one: `headers`
    /// added after its own, no dead letter of its own (a refused copy is not copied again).
    pub fn dead_letter_copy(&self, headers: impl IntoIterator<Item = (String, Bytes)>) -> Option<KafkaRecord> {
        let (cluster, topic) = self.dead_letter()?;
        let mut d = self.clone();
        d.cluster = cluster;
        d.topic = topic.clone();
        if let Some(route) = &self.route {
            d.route = Some(Arc::new(RecordRoute { dead_letter: None, ..(**route).clone() }));
        }
        d.own_parts().headers.extend(headers);
        Some(d)
    }

    /// The key's bytes.
    pub fn key(&self) -> Option<&[u8]> {
        match (self.key, &self.source) {
            (RecordKey::None, _) => None,
            (RecordKey::Own, _) => self.own.as_ref().and_then(|o| o.key.as_deref()),
            (RecordKey::Topic, Some(m)) => Some(m.topic.as_bytes()),
            (RecordKey::Level { start, end }, Some(m)) => m.topic.as_bytes().get(usize::from(start)..usize::from(end)),
            (RecordKey::ClientId, Some(m)) => Some(m.origin.as_bytes()),
            (_, None) => None,
        }
    }

    pub fn header_count(&self) -> usize {
        let mut n = 0;
        self.for_each_header(|_, _| n += 1);
        n
    }

    /// Every header in order, names unique: the MQTT ones of `source` (if `mqtt_headers`), then
    /// `headers`. An MQTT 5 user property passes through under its own name and wins over a
    /// header of the same name; of repeated user properties the last one counts.
    ///
    /// A cluster record (`node` set) is read back by the other nodes (`crate::inbound`): the
    /// MQTT headers always (no user property overrides them: a device must not choose the topic
    /// another node delivers to), [`crate::cluster::NODE_HEADER`], and the user properties in
    /// one header, [`crate::cluster::USER_PROPERTIES_HEADER`], in order and repeats included
    /// (Kafka clients, rskafka among them, may keep one header per name).
    pub fn for_each_header(&self, mut f: impl FnMut(&str, &[u8])) {
        if let (true, Some(m)) = (self.mqtt_headers, &self.source) {
            let p = m.properties();
            let users = &p.user_properties;
            let node = self.node();
            let cluster = node.is_some();
            let overridden = |name: &str| !cluster && users.iter().any(|(k, _)| k == name);
            let mut std_header = |name: &str, v: &[u8]| {
                if !overridden(name) {
                    f(name, v)
                }
            };
            std_header("mqtt.topic", m.topic.as_bytes());
            std_header("mqtt.qos", QOS_TEXT.get(usize::from(m.qos)).copied().unwrap_or(b"?"));
            std_header("mqtt.retain", if m.retain { b"true" } else { b"false" });
            std_header("mqtt.client_id", m.origin.as_bytes());
            if let Some(ct) = &p.content_type {
                std_header("content-type", ct.as_bytes());
            }
            if let Some(rt) = &p.response_topic {
                std_header("mqtt.response_topic", rt.as_bytes());
            }
            if let Some(cd) = &p.correlation_data {
                std_header("mqtt.correlation_data", cd);
            }
            if let Some(pf) = p.payload_format_indicator {
                std_header("mqtt.payload_format", if pf == 0 { b"0" } else { b"1" });
            }
            if let Some(node) = node {
                f(crate::cluster::NODE_HEADER, node);
                if !users.is_empty() {
                    f(crate::cluster::USER_PROPERTIES_HEADER, &crate::cluster::encode_user_properties(users));
                }
                if self.route.as_ref().is_some_and(|r| r.carrier) {
                    for (i, (k, v)) in users.iter().enumerate() {
                        let last = !users[i + 1..].iter().any(|(later, _)| later == k);
                        if last && crate::cluster::carrier_header_allowed(k) {
                            f(k, v.as_bytes());
                        }
                    }
                }
            } else {
                for (i, (k, v)) in users.iter().enumerate() {
                    if !users[i + 1..].iter().any(|(later, _)| later == k) {
                        f(k, v.as_bytes());
                    }
                }
            }
        } else if let Some(node) = self.node() {
            f(crate::cluster::NODE_HEADER, node);
        }
        for (k, v) in self.headers() {
            f(k, v);
        }
    }
}

const QOS_TEXT: [&[u8]; 3] = [b"0", b"1", b"2"];

/// A record handed to the producers, with the shard-local id its result will carry.
#[derive(Clone, Debug)]
pub struct ProduceRequest {
    pub id: u64,
    pub record: KafkaRecord,
    /// `local-durable` delivery: the record is in the shard's spill log, so the producers retry it
    /// until Kafka takes it (no delivery time-out), and its publisher was acknowledged already.
    pub durable: bool,
}

/// When a QoS 1/2 publish that feeds Kafka is acknowledged to the device.
///
/// `--delivery` takes the same names as the file (clap's `ValueEnum` and serde both kebab-case
/// the variants; a test in the binary checks they agree).
#[derive(Clone, Copy, Debug, Default, serde::Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// After Kafka acknowledged every record of the message.
    #[default]
    KafkaAck,
    /// After the records are in the shard's spill log on disk (group commit); Kafka later, with
    /// replay after outages and crashes.
    LocalDurable,
}

/// Why Kafka did not take a record. The texts are [`ProduceError::cause`]'s (the `$SYS` and log
/// wording), with the detail of [`ProduceError::Other`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProduceError {
    #[error("record too large")]
    TooLarge,
    #[error("unknown topic")]
    UnknownTopic,
    #[error("not authorized")]
    NotAuthorized,
    /// Retries ran out (Kafka down, hanging, or no leader) within the delivery time-out.
    #[error("timed out")]
    TimedOut,
    /// `local-durable`: the shard's spill log is at its disk limit (or the disk is full).
    #[error("spill log full")]
    SpillFull,
    #[error("other error: {0}")]
    Other(String),
    /// The payload does not validate against, or convert to, its mapping's schema: `reason`
    /// names the schema and the first error; `policy` is the mapping's `on_invalid`.
    #[error("invalid payload: {reason}")]
    Invalid { reason: String, policy: crate::schemas::OnInvalid, cause: &'static str },
}

impl ProduceError {
    /// The MQTT 5 PUBACK/PUBREC reason code telling the publisher what happened.
    pub fn reason_code(&self) -> u8 {
        use crate::packet::reason;
        match self {
            // PUBACK has no "packet too large"; 0x97 (quota exceeded) is the closest allowed code.
            ProduceError::TooLarge => reason::QUOTA_EXCEEDED,
            ProduceError::UnknownTopic => reason::TOPIC_NAME_INVALID,
            ProduceError::NotAuthorized => reason::NOT_AUTHORIZED,
            ProduceError::TimedOut => reason::UNSPECIFIED_ERROR,
            ProduceError::SpillFull => reason::QUOTA_EXCEEDED,
            ProduceError::Other(_) => reason::IMPLEMENTATION_SPECIFIC,
            ProduceError::Invalid { .. } => reason::PAYLOAD_FORMAT_INVALID,
        }
    }

    pub fn cause(&self) -> &'static str {
        match self {
            ProduceError::TooLarge => "record too large",
            ProduceError::UnknownTopic => "unknown topic",
            ProduceError::NotAuthorized => "not authorized",
            ProduceError::TimedOut => "timed out",
            ProduceError::SpillFull => "spill log full",
            ProduceError::Other(_) => "other error",
            ProduceError::Invalid { .. } => "invalid payload",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ProduceResult {
    pub id: u64,
    pub outcome: Result<(), ProduceError>,
    /// Produce requests it took (1 = no retry).
    pub attempts: u32,
    /// Records in the batch it travelled in.
    pub batch_records: u32,
    /// From hand-over to the producers until Kafka's answer.
    pub latency_us: u64,
    /// A record that timed out, handed back: the shard may put it in its spill log instead of
    /// failing it (`spill_on_timeout`), so it keeps no copy of each record in flight for that.
    pub timed_out: Option<Box<KafkaRecord>>,
    /// The message an acknowledged record was routed from, handed back so that its last
    /// reference is usually dropped on the shard that allocated it: the message, its topic and
    /// often its payload buffer were freed on the Kafka thread, and a free from another thread
    /// takes mimalloc's slower, atomic path (5–10 % of the Kafka thread's samples). Nothing
    /// reads it; a result without it is as valid.
    pub source: Option<Msg>,
}

impl ProduceResult {
    /// A record that failed before it was sent.
    pub fn failed(id: u64, e: ProduceError) -> Self {
        ProduceResult {
            id,
            outcome: Err(e),
            attempts: 0,
            batch_records: 0,
            latency_us: 0,
            timed_out: None,
            source: None,
        }
    }
}

struct Mapping {
    name: String,
    /// (cluster, topic, what its records share).
    destinations: Vec<(u16, TopicTemplate, Option<Arc<RecordRoute>>)>,
    key: KeySource,
    headers: bool,
    /// The node header of a cluster mapping.
    node: Option<Bytes>,
    /// Only retained messages (the cluster's retained table).
    retained_only: bool,
    /// A user mapping that carries the messages it takes to the cluster's other nodes: which
    /// destination, and the route its records take then (the node header on).
    carrier: Option<(usize, Arc<RecordRoute>)>,
}

/// Why the `[[mqtt_to_kafka]]` mappings do not make a [`Router`]; each names its mapping.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouterError {
    #[error("mapping `{mapping}`: no filters")]
    NoFilters { mapping: String },
    #[error("mapping `{mapping}`: no destinations")]
    NoDestinations { mapping: String },
    #[error("mapping `{mapping}`: `{filter}` is not a valid MQTT topic filter")]
    InvalidFilter { mapping: String, filter: String },
    #[error("mapping `{mapping}`: unknown cluster `{cluster}`")]
    UnknownCluster { mapping: String, cluster: String },
    #[error("mapping `{mapping}`: partition must be 0 or more, not {partition}")]
    NegativePartition { mapping: String, partition: i32 },
    #[error("mapping `{mapping}`: dead_letter names unknown cluster `{cluster}`")]
    UnknownDeadLetterCluster { mapping: String, cluster: String },
}

/// Matches MQTT topics against the mappings' filters.
#[derive(Default)]
pub struct Router {
    lease_ms: Option<u64>,
    /// Unix time in ms at the shard's `now_ms == 0`: a message's expiry (shard time) as seconds
    /// left at `now_ms` (Unix time) for cluster records.
    wall_offset_ms: i64,
    claims: Option<ClaimsNode>,
    claims_mapping: u16,
    /// The cluster's `.messages` mapping: left out for a message a carrier took.
    forward: Option<u16>,
    trie: Trie<u16, ()>,
    mappings: Vec<Mapping>,
    clusters: Vec<String>,
}

impl Router {
    /// Builds the router; every destination's cluster must be in `clusters`.
    pub fn new(mappings: &[MappingConfig], clusters: &[String]) -> Result<Router, RouterError> {
        let mut r = Router { clusters: clusters.to_vec(), ..Default::default() };
        let lim = TopicLimits::default();
        for (i, m) in mappings.iter().enumerate() {
            if m.filters.is_empty() {
                return Err(RouterError::NoFilters { mapping: m.name.clone() });
            }
            if m.destinations.is_empty() {
                return Err(RouterError::NoDestinations { mapping: m.name.clone() });
            }
            let claims = matches!(m.internal, Some(Internal::ClusterClaims { .. }));
            for f in &m.filters {
                if !topic::valid_filter(f, &lim) {
                    return Err(RouterError::InvalidFilter { mapping: m.name.clone(), filter: f.clone() });
                }
                // Claims are made by the shard (`Router::route_claim`), never matched: a device
                // publishing to the claim topic must not forge one.
                if !claims {
                    r.trie.insert(f, i as u16, ());
                }
            }
            let mut destinations = Vec::new();
            for d in &m.destinations {
                let c = clusters.iter().position(|c| *c == d.cluster).ok_or_else(|| RouterError::UnknownCluster {
                    mapping: m.name.clone(),
                    cluster: d.cluster.clone(),
                })?;
                if let Some(partition) = d.partition.filter(|p| *p < 0) {
                    return Err(RouterError::NegativePartition { mapping: m.name.clone(), partition });
                }
                destinations.push((c as u16, d.topic.clone(), d.partition));
            }
            let dead_letter = match &m.dead_letter {
                None => None,
                Some(d) => {
                    let c = clusters.iter().position(|c| *c == d.cluster).ok_or_else(|| {
                        RouterError::UnknownDeadLetterCluster { mapping: m.name.clone(), cluster: d.cluster.clone() }
                    })?;
                    Some((c as u16, Arc::from(d.topic.as_str())))
                }
            };
            if let Some(Internal::ClusterClaims { node, confirm_ms, lease_ms, incarnation, fence }) = &m.internal {
                let (incarnation, confirm_ms, fence) = (*incarnation, *confirm_ms, *fence);
                r.claims = Some(ClaimsNode { node: node.clone(), incarnation, confirm_ms, fence });
                r.lease_ms = *lease_ms;
                r.claims_mapping = i as u16;
            }
            let node = match &m.internal {
                Some(Internal::ClusterMessages { node, .. } | Internal::ClusterRetained { node }) => Some(node.clone()),
                Some(Internal::ClusterClaims { node, .. }) => Some(Bytes::from(node.to_string())),
                None => None,
            };
            // Nothing shared (the usual mapping): no pointer to follow per record.
            let destinations = destinations
                .into_iter()
                .map(|(c, topic, partition)| {
                    let route =
                        RecordRoute { partition, node: node.clone(), dead_letter: dead_letter.clone(), carrier: false };
                    (c, topic, (route != RecordRoute::default()).then(|| Arc::new(route)))
                })
                .collect();
            r.mappings.push(Mapping {
                name: m.name.clone(),
                destinations,
                key: m.key.clone(),
                headers: m.headers,
                node,
                retained_only: matches!(m.internal, Some(Internal::ClusterRetained { .. })),
                carrier: None,
            });
        }
        r.mark_carriers(mappings);
        Ok(r)
    }

    /// Finds the user mappings that carry their messages to the other nodes (their destination
    /// topic is one the cluster's inbound side reads: `Internal::ClusterMessages::carriers`).
    fn mark_carriers(&mut self, mappings: &[MappingConfig]) {
        let Some((fi, node, carriers, kafka)) = mappings.iter().enumerate().find_map(|(i, m)| match &m.internal {
            Some(Internal::ClusterMessages { node, carriers }) => {
                Some((i, node.clone(), carriers, m.destinations.first()?.cluster.clone()))
            }
            _ => None,
        }) else {
            return;
        };
        self.forward = Some(fi as u16);
        for (i, m) in mappings.iter().enumerate() {
            let Some(d) = crate::cluster::carrier_destination(m, &kafka) else { continue };
            let Some(topic) = m.destinations[d].topic.fixed_topic() else { continue };
            if !carriers.iter().any(|c| c == topic) {
                continue;
            }
            let plain = self.mappings[i].destinations[d].2.as_deref().cloned().unwrap_or_default();
            let route = RecordRoute { node: Some(node.clone()), carrier: true, ..plain };
            self.mappings[i].carrier = Some((d, Arc::new(route)));
        }
    }

    /// Whether mapping `mapping`'s records carry the messages it takes to the cluster's other
    /// nodes (`crate::cluster::carrier_destination`).
    pub fn is_carrier(&self, mapping: u16) -> bool {
        self.mappings.get(usize::from(mapping)).is_some_and(|m| m.carrier.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    pub fn mapping_count(&self) -> usize {
        self.mappings.len()
    }

    pub fn mapping_name(&self, i: u16) -> &str {
        &self.mappings[usize::from(i)].name
    }

    pub fn clusters(&self) -> &[String] {
        &self.clusters
    }

    pub fn set_wall_offset(&mut self, wall_offset_ms: i64) {
        self.wall_offset_ms = wall_offset_ms;
    }

    /// The node of the cluster's claims mapping, if there is one.
    pub fn cluster_claims(&self) -> Option<ClaimsNode> {
        self.claims.clone()
    }

    /// How often a shard writes its lease (`ClusterConfig::heartbeat_ms`).
    pub fn cluster_lease_ms(&self) -> Option<u64> {
        self.lease_ms
    }

    /// The records for one MQTT message, one per (matching mapping, destination). A mapping that
    /// matches through several of its filters produces its records once.
    pub fn route(&self, msg: &Msg, now_ms: i64, out: &mut Vec<KafkaRecord>) {
        if self.mappings.is_empty() {
            return;
        }
        // Mappings matched, without an allocation for the usual few.
        let mut hit = smallvec::SmallVec::<[u16; 8]>::new();
        self.trie.for_each_match(&msg.topic, |m, _| {
            if !hit.contains(m) {
                hit.push(*m);
            }
        });
        hit.sort_unstable();
        let forwarded = self.forward.is_some_and(|f| hit.contains(&f));
        self.records_of(&hit, msg, forwarded, now_ms, out);
    }

    /// The record of a claim the shard made, when there is a claims mapping: `msg` is the
    /// client's will (or an empty message on the claim topic), its origin the client id, and
    /// `claim` the [`crate::cluster::Claim`] for header [`crate::cluster::CLAIM_HEADER`].
    pub fn route_claim(&self, msg: &Msg, claim: Bytes, now_ms: i64, out: &mut Vec<KafkaRecord>) {
        if self.claims.is_some() {
            let from = out.len();
            self.records_of(&[self.claims_mapping], msg, false, now_ms, out);
            for r in &mut out[from..] {
                r.push_header(crate::cluster::CLAIM_HEADER, claim.clone());
            }
        }
    }

    /// `forwarded`: the message goes to the cluster's other nodes (the `.messages` mapping is in
    /// `hit`, which is sorted: the user mappings come first). The first carrier's record that
    /// has a key (or a fixed partition) carries it, and `.messages` gets none.
    fn records_of(&self, hit: &[u16], msg: &Msg, forwarded: bool, now_ms: i64, out: &mut Vec<KafkaRecord>) {
        let mut carried = !forwarded;
        for &mi in hit {
            if carried && forwarded && Some(mi) == self.forward {
                continue;
            }
            let m = &self.mappings[usize::from(mi)];
            if m.retained_only && !msg.retain {
                continue;
            }
            let key = match &m.key {
                KeySource::Topic => RecordKey::Topic,
                KeySource::ClientId => RecordKey::ClientId,
                KeySource::Level(n) => match level_range(&msg.topic, *n) {
                    Some((start, end)) => RecordKey::Level { start, end },
                    None => RecordKey::None,
                },
                KeySource::None => RecordKey::None,
            };
            for (di, (cluster, template, route)) in m.destinations.iter().enumerate() {
                // A template referring to a level the topic lacks yields no record for it.
                let Some(topic) = template.render_shared(&msg.topic) else { continue };
                let mut r = KafkaRecord::new(*cluster, topic, msg.payload.clone(), now_ms).with_source(
                    msg.clone(),
                    key,
                    m.headers,
                );
                r.mapping = mi;
                r.route = route.clone();
                let mut to_nodes = m.node.is_some();
                if let Some((cd, carrying)) = &m.carrier {
                    // Keyless (a level the topic lacks): sticky placement would not keep the
                    // topic's order, so `.messages` takes this one.
                    if !carried && *cd == di && (key != RecordKey::None || carrying.partition.is_some()) {
                        r.route = Some(carrying.clone());
                        (carried, to_nodes) = (true, true);
                    }
                }
                // Another node must drop the message when it expires here: the seconds left.
                if let (true, Some(at)) = (to_nodes, msg.expiry_at_ms) {
                    let left = (at as i64 + self.wall_offset_ms - now_ms).max(1000) as u64;
                    r.push_header(crate::cluster::EXPIRY_HEADER, Bytes::from(left.div_ceil(1000).to_string()));
                }
                out.push(r);
            }
        }
    }
}

/// Byte range of level `n` (0-based) of `topic`; `None` past its levels or past 64 KiB (no
/// MQTT topic is that long).
fn level_range(topic: &str, n: usize) -> Option<(u16, u16)> {
    let mut start = 0usize;
    for (i, level) in topic.split('/').enumerate() {
        if i == n {
            return Some((u16::try_from(start).ok()?, u16::try_from(start + level.len()).ok()?));
        }
        start += level.len() + 1;
    }
    None
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`), as a signed 32-bit value.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    match tail.len() {
        3 => {
            h ^= u32::from(tail[2]) << 16;
            h ^= u32::from(tail[1]) << 8;
            h ^= u32::from(tail[0]);
            h = h.wrapping_mul(M);
        }
        2 => {
            h ^= u32::from(tail[1]) << 8;
            h ^= u32::from(tail[0]);
            h = h.wrapping_mul(M);
        }
        1 => {
            h ^= u32::from(tail[0]);
            h = h.wrapping_mul(M);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner picks for `key` among `partitions`.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    ((murmur2(key) as u32 & 0x7fff_ffff) % partitions as u32) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Properties;

    #[test]
    fn murmur2_matches_kafka_test_vectors() {
        // From Apache Kafka's UtilsTest.testMurmur2.
        for (s, want) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(s.as_bytes()), want, "{s}");
        }
    }

    fn msg(topic: &str) -> Msg {
        Arc::new(crate::message::Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"v"),
            qos: 1,
            retain: false,
            properties: Properties {
                user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
                content_type: Some("text/plain".into()),
                ..Default::default()
            }
            .boxed(),
            expiry_at_ms: None,
            origin: "dev-1".into(),
        })
    }

    #[test]
    fn a_records_size_counts_what_its_headers_walk_gives() {
        for (retain, qos, properties) in [(false, 0, None), (true, 2, None), (false, 1, msg("t").properties.clone())] {
            let m = Arc::new(crate::message::Message {
                topic: "a/topic".into(),
                payload: Bytes::from_static(b"payload"),
                qos,
                retain,
                properties,
                expiry_at_ms: None,
                origin: "client-7".into(),
            });
            let r = KafkaRecord::new(0, "k".into(), m.payload.clone(), 0).with_source(m, RecordKey::Topic, true);
            let mut walked = r.key().map_or(0, <[u8]>::len) + r.value.len();
            r.for_each_header(|k, v| walked += k.len() + v.len());
            assert_eq!(r.size(), walked, "retain {retain} qos {qos}");
        }
    }

    fn mapping(name: &str, filters: &[&str], dests: &[(&str, &str)], key: &str) -> MappingConfig {
        MappingConfig::new(
            name.into(),
            filters.iter().map(|f| f.to_string()).collect(),
            dests
                .iter()
                .map(|(c, t)| Destination {
                    cluster: c.to_string(),
                    topic: TopicTemplate::parse(t).unwrap(),
                    partition: None,
                })
                .collect(),
            KeySource::parse(key).unwrap(),
        )
    }

    #[test]
    fn routes_firehose_templates_keys_and_multicast() {
        let clusters = vec!["a".to_string(), "b".to_string()];
        let r = Router::new(
            &[
                mapping("fire", &["fleet/#", "fleet/+/+/+/speed"], &[("a", "firehose")], "topic"),
                mapping("per-region", &["fleet/+/#"], &[("a", "fleet-{1}"), ("b", "copy")], "level:3"),
                mapping("other", &["other/#"], &[("a", "x")], "none"),
            ],
            &clusters,
        )
        .unwrap();
        let mut out = Vec::new();
        r.route(&msg("fleet/eu/group-3/car-1045107/speed"), 7, &mut out);
        let got: Vec<(u16, &str, Option<&[u8]>)> = out.iter().map(|r| (r.cluster, &*r.topic, r.key())).collect();
        assert_eq!(
            got,
            vec![
                (0, "firehose", Some(&b"fleet/eu/group-3/car-1045107/speed"[..])),
                (0, "fleet-eu", Some(&b"car-1045107"[..])),
                (1, "copy", Some(&b"car-1045107"[..])),
            ]
        );
        let mut h: Vec<(String, Vec<u8>)> = Vec::new();
        out[0].for_each_header(|k, v| h.push((k.into(), v.into())));
        let h: Vec<(&str, &[u8])> = h.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
        assert_eq!(
            h,
            [
                ("mqtt.topic", &b"fleet/eu/group-3/car-1045107/speed"[..]),
                ("mqtt.qos", b"1"),
                ("mqtt.retain", b"false"),
                ("mqtt.client_id", b"dev-1"),
                ("content-type", b"text/plain"),
                ("a", b"2"),
            ],
            "a repeated user property keeps its last value"
        );
        assert_eq!(
            out[0].size(),
            out[0].key().unwrap().len() + 1 + h.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        );
        assert_eq!(out[0].timestamp_ms, 7);
        out.clear();
        r.route(&msg("nowhere"), 0, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn config_errors() {
        let c = vec!["a".to_string()];
        let e = Router::new(&[mapping("m", &["x/#/y"], &[("a", "t")], "topic")], &c).err().unwrap();
        assert_eq!(e, RouterError::InvalidFilter { mapping: "m".into(), filter: "x/#/y".into() });
        assert_eq!(e.to_string(), "mapping `m`: `x/#/y` is not a valid MQTT topic filter");
        let e = Router::new(&[mapping("m", &["x"], &[("zz", "t")], "topic")], &c).err().unwrap();
        assert_eq!(e.to_string(), "mapping `m`: unknown cluster `zz`");
        let e = TopicTemplate::parse("a-{x}").unwrap_err();
        assert_eq!(e.to_string(), "`a-{x}`: `{x}` at byte 2 is not a topic level number");
        let e = TopicTemplate::parse("a-{1}-{2").unwrap_err();
        assert_eq!(e, TopicTemplateError::Unclosed { template: "a-{1}-{2".into(), at: 6 });
        assert_eq!(e.to_string(), "`a-{1}-{2`: unclosed `{` at byte 6");
        let e = KeySource::parse("level:x").unwrap_err();
        assert_eq!(e.to_string(), "`level:x` is not topic, client-id, none or level:N");
        let e: Box<dyn std::error::Error> = Box::new(ProduceError::Other("broker said no".into()));
        assert_eq!(e.to_string(), "other error: broker said no");
        let t = TopicTemplate::parse("t-{5}").unwrap();
        assert_eq!(t.render("a/b"), None);
        let t = TopicTemplate::parse("t-{0}").unwrap();
        assert_eq!(t.render("bad topic/b"), None, "space is not legal in a Kafka topic");
    }

    #[test]
    fn spill_form_round_trips() {
        let mut r =
            KafkaRecord::new(3, "t".into(), Bytes::from_static(b"\x00\xffv"), -5).with_key(Bytes::from_static(b"k"));
        r.mapping = 1;
        r.push_header("a", Bytes::from_static(b"1"));
        let mut b = Vec::new();
        r.encode("main", &mut b);
        let (c, back) = KafkaRecord::decode(&b).unwrap();
        assert_eq!(c, "main");
        r.cluster = 0;
        r.mapping = 0;
        assert_eq!(back, r);
        assert!(KafkaRecord::decode(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn a_record_stays_small_because_it_is_moved_by_value_several_times() {
        assert!(std::mem::size_of::<KafkaRecord>() <= 96, "{}", std::mem::size_of::<KafkaRecord>());
        assert!(std::mem::size_of::<ProduceRequest>() <= 112, "{}", std::mem::size_of::<ProduceRequest>());
    }

    #[test]
    fn a_dead_letter_copy_keeps_the_record_and_adds_why() {
        let clusters = vec!["a".to_string(), "b".to_string()];
        let mut m = mapping("m", &["t/#"], &[("a", "k")], "topic");
        m.destinations[0].partition = Some(2);
        m.dead_letter = Some(DeadLetter { cluster: "b".into(), topic: "dlq".into() });
        let r = Router::new(&[m], &clusters).unwrap();
        let mut out = Vec::new();
        r.route(&msg("t/1"), 7, &mut out);
        assert_eq!((out[0].partition(), out[0].dead_letter()), (Some(2), Some((1, &Arc::from("dlq")))));
        let d = out[0].dead_letter_copy([("why".to_string(), Bytes::from_static(b"no"))]).unwrap();
        assert_eq!((d.cluster, &*d.topic, d.partition(), d.dead_letter()), (1, "dlq", Some(2), None));
        assert_eq!(d.key(), Some(&b"t/1"[..]));
        assert_eq!(d.headers(), &[("why".to_string(), Bytes::from_static(b"no"))]);
        assert!(d.dead_letter_copy([]).is_none(), "a copy is not copied again");
    }

    #[test]
    fn partitions_spread_by_key() {
        assert_eq!(partition_for_key(b"21", 3), ((-973_932_308i32 as u32 & 0x7fff_ffff) % 3) as i32);
        let hits: std::collections::HashSet<i32> =
            (0..100).map(|i| partition_for_key(format!("k{i}").as_bytes(), 4)).collect();
        assert_eq!(hits.len(), 4);
    }
}
