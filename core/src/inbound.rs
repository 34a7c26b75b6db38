//! Kafka → MQTT: which Kafka records become which MQTT messages.
//!
//! Sans-I/O: the `sluice-kafka` consumers hand a shard [`InboundRecord`]s; [`Inbound`] turns each
//! into one or more MQTT messages (a mapping may name several MQTT topics: multicast) by
//! rendering topic templates over the record — `${key}`, `${topic}`, `${partition}`,
//! `${header.NAME}`, `${json./pointer}` — and choosing the payload (the whole value, one JSON
//! field, or the value without some fields). A record that cannot be transformed (no key, value
//! not JSON, field missing) is skipped with its cause, for the caller to count and log once.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use crate::message::Message;
use crate::packet::Properties;
use crate::topic::{self, TopicLimits};

/// A record read from Kafka, as the consumers hand it over.
#[derive(Clone, Debug)]
pub struct InboundRecord {
    /// Index of the `[[kafka_to_mqtt]]` mapping that consumes this topic.
    pub mapping: u16,
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Bytes)>,
}

/// Where a consumer starts when it has no stored position.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    #[default]
    Latest,
    Earliest,
}

/// What the MQTT payload is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PayloadSource {
    /// The record value as it is.
    Value,
    /// One field of a JSON value (JSON pointer, e.g. `/command`), re-serialised (strings raw).
    JsonField(String),
    /// The JSON value with these top-level fields removed.
    JsonWithout(Vec<String>),
}

impl<'de> Deserialize<'de> for PayloadSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PayloadSource::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A `payload` that is none of the payload sources.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadSourceError {
    #[error("`{given}`: a JSON pointer starts with `/`")]
    NotAPointer { given: String },
    #[error("`{given}` is not value, json:/pointer or without:field1,field2")]
    Unknown { given: String },
}

impl PayloadSource {
    pub fn parse(s: &str) -> Result<PayloadSource, PayloadSourceError> {
        if s == "value" {
            return Ok(PayloadSource::Value);
        }
        if let Some(p) = s.strip_prefix("json:") {
            if !p.starts_with('/') {
                return Err(PayloadSourceError::NotAPointer { given: s.to_string() });
            }
            return Ok(PayloadSource::JsonField(p.to_string()));
        }
        if let Some(fields) = s.strip_prefix("without:") {
            return Ok(PayloadSource::JsonWithout(fields.split(',').map(|f| f.trim().to_string()).collect()));
        }
        Err(PayloadSourceError::Unknown { given: s.to_string() })
    }
}

/// One `[[kafka_to_mqtt]]` table.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InboundMappingConfig {
    pub name: String,
    /// Name of a `[kafka.clusters.NAME]` table.
    pub cluster: String,
    #[serde(default)]
    pub kafka_topics: Vec<String>,
    /// A regular expression over whole topic names: every matching topic is consumed,
    /// including ones created later (checked every `metadata_max_age_ms`).
    #[serde(default)]
    pub kafka_topic_pattern: Option<String>,
    /// MQTT topic templates; one message per template (multicast).
    pub mqtt_topics: Vec<String>,
    #[serde(default = "default_payload")]
    pub payload: PayloadSource,
    #[serde(default)]
    pub qos: u8,
    #[serde(default)]
    pub retain: bool,
    #[serde(default)]
    pub start: StartAt,
    /// A local schema (`[schemas.NAME]`) every record's value must validate against; records
    /// that do not are skipped and counted.
    #[serde(default)]
    pub schema: Option<String>,
    /// A `[schema_registries.NAME]` table, with `mode = "decode"` or `"pass"`.
    #[serde(default)]
    pub registry: Option<String>,
    #[serde(default)]
    pub mode: Option<crate::schemas::SchemaMode>,
    /// `decode` reads with this subject's latest schema (Avro resolution from the writer's).
    #[serde(default)]
    pub subject: Option<String>,
    /// Set by sluice for its own mappings (the cluster's), never from a file.
    #[serde(skip)]
    pub internal: Option<InboundInternal>,
}

/// What an internal Kafka → MQTT mapping does instead of its templates (see `crate::cluster`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundInternal {
    /// Records other nodes wrote to the cluster's message topic: each becomes the message it was
    /// (topic, QoS, retain, properties from the headers); records of `node` (this one) are
    /// skipped.
    ClusterMessages { node: Arc<str> },
    /// The cluster's retained table: each record is stored as a retained message (an empty
    /// value deletes), not delivered.
    ClusterRetained,
    /// Claims of client ids by the nodes (`crate::cluster::Claim`), for the shards to act on.
    ClusterClaims,
}

// The origins below start with U+0000, which no MQTT string may hold (the codec refuses it): no
// client id can pass for one of them (a device named `$claim` forging claims, say).

/// [`Message::origin`] of a message from another node: never forwarded again, to Kafka or to
/// the cluster.
pub const FROM_NODE: &str = "\0cluster";
/// [`Message::origin`] of a retained message read from the cluster's retained table: stored on
/// its owner shard, delivered to nobody.
pub const RETAINED_SYNC: &str = "\0retained";
/// [`Message::origin`] of a claim read from the cluster's sessions topic (its payload): acted on
/// by the shard hosting the client, delivered to nobody.
pub const CLAIM: &str = "\0claim";
/// [`Message::origin`] of a message a Kafka → MQTT mapping made.
pub const FROM_KAFKA: &str = "\0kafka";

/// Whether `origin` is one of the internal ones above (never a client id): one byte to look at
/// on the per-message path.
pub fn is_internal(origin: &str) -> bool {
    origin.as_bytes().first() == Some(&0)
}

/// How an origin reads for people (the live view): the internal ones as `$kafka`, `$cluster`…
pub fn origin_name(origin: &str) -> std::borrow::Cow<'_, str> {
    match origin.strip_prefix('\0') {
        Some(internal) => format!("${internal}").into(),
        None => origin.into(),
    }
}

/// `kafka_topic_pattern` as a regex that must match a whole topic name.
pub fn topic_pattern(p: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:{p})$"))
}

fn default_payload() -> PayloadSource {
    PayloadSource::Value
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Key,
    Topic,
    Partition,
    Header(String),
    Json(String),
}

/// An MQTT topic template over a Kafka record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MqttTemplate {
    parts: Vec<Part>,
}

/// Why an MQTT topic template does not parse: the template, and the byte offset of the `${`
/// that is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MqttTemplateError {
    #[error("`{template}`: unclosed `${{` at byte {at}")]
    Unclosed { template: String, at: usize },
    #[error(
        "`{template}`: unknown field `${{{field}}}` at byte {at} (key, topic, partition, header.NAME, json./pointer)"
    )]
    UnknownField { template: String, field: String, at: usize },
}

impl MqttTemplate {
    pub fn parse(s: &str) -> Result<MqttTemplate, MqttTemplateError> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(i) = rest.find("${") {
            if i > 0 {
                parts.push(Part::Text(rest[..i].to_string()));
            }
            let at = s.len() - rest.len() + i;
            let end =
                rest[i..].find('}').ok_or_else(|| MqttTemplateError::Unclosed { template: s.to_string(), at })? + i;
            let name = &rest[i + 2..end];
            parts.push(match name {
                "key" => Part::Key,
                "topic" => Part::Topic,
                "partition" => Part::Partition,
                n if n.starts_with("header.") => Part::Header(n["header.".len()..].to_string()),
                n if n.starts_with("json.") && n["json.".len()..].starts_with('/') => {
                    Part::Json(n["json.".len()..].to_string())
                }
                other => {
                    return Err(MqttTemplateError::UnknownField {
                        template: s.to_string(),
                        field: other.to_string(),
                        at,
                    })
                }
            });
            rest = &rest[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(MqttTemplate { parts })
    }

    fn needs_json(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Json(_)))
    }

    fn render(&self, r: &InboundRecord, json: Option<&serde_json::Value>) -> Result<String, Skip> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Topic => out.push_str(&r.topic),
                Part::Partition => out.push_str(&r.partition.to_string()),
                Part::Key => {
                    let k = r.key.as_ref().ok_or(Skip::MissingKey)?;
                    out.push_str(std::str::from_utf8(k).map_err(|_| Skip::NotUtf8)?);
                }
                Part::Header(h) => {
                    let v = r.headers.iter().rev().find(|(k, _)| k == h).ok_or(Skip::MissingField)?;
                    out.push_str(std::str::from_utf8(&v.1).map_err(|_| Skip::NotUtf8)?);
                }
                Part::Json(ptr) => {
                    let v = json.ok_or(Skip::NotJson)?.pointer(ptr).ok_or(Skip::MissingField)?;
                    match v {
                        serde_json::Value::String(s) => out.push_str(s),
                        serde_json::Value::Number(n) => out.push_str(&n.to_string()),
                        serde_json::Value::Bool(b) => out.push_str(&b.to_string()),
                        _ => return Err(Skip::MissingField),
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Consumer positions: (mapping name, Kafka topic, partition) → next offset to read. Stored
/// per shard as text lines `mapping<TAB>topic<TAB>partition<TAB>offset`; all shards' files
/// together give every partition's position (partitions may move between shards when `--cores`
/// changes).
pub type Positions = std::collections::BTreeMap<(String, String, i32), i64>;

pub fn encode_positions(p: &Positions) -> String {
    let mut out = String::new();
    for ((m, t, part), off) in p {
        out.push_str(&format!("{m}\t{t}\t{part}\t{off}\n"));
    }
    out
}

/// Parses what [`encode_positions`] wrote; malformed lines are ignored (a position lost means
/// starting from the mapping's `start`, never a crash).
pub fn decode_positions(text: &str, into: &mut Positions) {
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if let [m, t, part, off] = f.as_slice() {
            if let (Ok(part), Ok(off)) = (part.parse(), off.parse()) {
                let e = into.entry((m.to_string(), t.to_string(), part)).or_insert(off);
                *e = (*e).max(off);
            }
        }
    }
}

/// Why a record was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Skip {
    MissingKey,
    NotJson,
    MissingField,
    NotUtf8,
    InvalidTopic,
}

impl Skip {
    pub fn cause(&self) -> &'static str {
        match self {
            Skip::MissingKey => "record has no key",
            Skip::NotJson => "value is not JSON",
            Skip::MissingField => "template field absent",
            Skip::NotUtf8 => "key or header is not UTF-8",
            Skip::InvalidTopic => "rendered MQTT topic is invalid",
        }
    }
}

struct Mapping {
    internal: Option<InboundInternal>,
    templates: Vec<MqttTemplate>,
    payload: PayloadSource,
    qos: u8,
    retain: bool,
    needs_json: bool,
}

/// Why the `[[kafka_to_mqtt]]` mappings do not make an [`Inbound`]; each names its mapping.
///
/// A wrapped error's text is part of this one's (no `source()`): callers hand these on as text
/// (config errors, start-up errors), and a chain printer would repeat it.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboundError {
    #[error("kafka_to_mqtt `{mapping}`: unknown cluster `{cluster}`")]
    UnknownCluster { mapping: String, cluster: String },
    #[error("kafka_to_mqtt `{mapping}`: needs kafka_topics (or kafka_topic_pattern) and mqtt_topics")]
    NothingToMap { mapping: String },
    #[error("kafka_to_mqtt `{mapping}`: kafka_topic_pattern: {error}")]
    Pattern { mapping: String, error: regex::Error },
    #[error("kafka_to_mqtt `{mapping}`: qos must be 0, 1 or 2, not {qos}")]
    Qos { mapping: String, qos: u8 },
    #[error("kafka_to_mqtt `{mapping}`: {error}")]
    Template { mapping: String, error: MqttTemplateError },
}

/// The Kafka → MQTT transformations of all mappings.
#[derive(Default)]
pub struct Inbound {
    mappings: Vec<Mapping>,
    names: Vec<String>,
}

impl Inbound {
    pub fn new(cfgs: &[InboundMappingConfig], clusters: &[String]) -> Result<Inbound, InboundError> {
        let mut me = Inbound::default();
        for c in cfgs {
            let mapping = || c.name.clone();
            if !clusters.contains(&c.cluster) {
                return Err(InboundError::UnknownCluster { mapping: mapping(), cluster: c.cluster.clone() });
            }
            if (c.kafka_topics.is_empty() && c.kafka_topic_pattern.is_none()) || c.mqtt_topics.is_empty() {
                return Err(InboundError::NothingToMap { mapping: mapping() });
            }
            if let Some(p) = &c.kafka_topic_pattern {
                topic_pattern(p).map_err(|error| InboundError::Pattern { mapping: mapping(), error })?;
            }
            if c.qos > 2 {
                return Err(InboundError::Qos { mapping: mapping(), qos: c.qos });
            }
            let templates = c
                .mqtt_topics
                .iter()
                .map(|t| MqttTemplate::parse(t).map_err(|error| InboundError::Template { mapping: mapping(), error }))
                .collect::<Result<Vec<_>, _>>()?;
            let needs_json = templates.iter().any(MqttTemplate::needs_json) || c.payload != PayloadSource::Value;
            me.mappings.push(Mapping {
                internal: c.internal.clone(),
                templates,
                payload: c.payload.clone(),
                qos: c.qos,
                retain: c.retain,
                needs_json,
            });
            me.names.push(c.name.clone());
        }
        Ok(me)
    }

    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    pub fn mapping_name(&self, i: u16) -> &str {
        &self.names[usize::from(i)]
    }

    /// The MQTT messages for one record, or why there are none.
    pub fn transform(&self, r: &InboundRecord, now_ms: u64) -> Result<Vec<Message>, Skip> {
        let m = self.mappings.get(usize::from(r.mapping)).ok_or(Skip::MissingField)?;
        if let Some(internal) = &m.internal {
            return cluster_message(internal, r, now_ms).map(|m| m.into_iter().collect());
        }
        let value = r.value.clone().unwrap_or_default();
        let json: Option<serde_json::Value> = if m.needs_json { serde_json::from_slice(&value).ok() } else { None };
        if m.needs_json && json.is_none() {
            return Err(Skip::NotJson);
        }
        let payload = match &m.payload {
            PayloadSource::Value => value,
            PayloadSource::JsonField(ptr) => {
                match json.as_ref().ok_or(Skip::NotJson)?.pointer(ptr).ok_or(Skip::MissingField)? {
                    serde_json::Value::String(s) => Bytes::from(s.clone()),
                    other => Bytes::from(other.to_string()),
                }
            }
            PayloadSource::JsonWithout(fields) => {
                let mut v = json.clone().ok_or(Skip::NotJson)?;
                if let Some(obj) = v.as_object_mut() {
                    for f in fields {
                        obj.remove(f);
                    }
                }
                Bytes::from(v.to_string())
            }
        };
        let mut properties = Properties::default();
        let mut expiry_at_ms = None;
        for (k, v) in &r.headers {
            match k.as_str() {
                "content-type" => properties.content_type = std::str::from_utf8(v).ok().map(str::to_string),
                "mqtt.response_topic" => properties.response_topic = std::str::from_utf8(v).ok().map(str::to_string),
                "mqtt.correlation_data" => properties.correlation_data = Some(v.clone()),
                "mqtt.message_expiry" => {
                    expiry_at_ms =
                        std::str::from_utf8(v).ok().and_then(|s| s.parse::<u64>().ok()).map(|s| now_ms + s * 1000)
                }
                _ => {
                    if let Ok(s) = std::str::from_utf8(v) {
                        properties.user_properties.push((k.clone(), s.to_string()));
                    }
                }
            }
        }
        let properties = properties.boxed();
        let lim = TopicLimits::default();
        let origin: Arc<str> = Arc::from(FROM_KAFKA);
        let mut out = Vec::with_capacity(m.templates.len());
        for t in &m.templates {
            let topic = t.render(r, json.as_ref())?;
            if !topic::valid_topic_name(&topic, &lim) {
                return Err(Skip::InvalidTopic);
            }
            out.push(Message {
                topic,
                payload: payload.clone(),
                qos: m.qos,
                retain: m.retain,
                properties: properties.clone(),
                expiry_at_ms,
                origin: origin.clone(),
            });
        }
        Ok(out)
    }
}

/// The message a cluster record carries (see [`crate::bridge::KafkaRecord::for_each_header`]
/// for the layout), or `None` for this node's own records.
pub(crate) fn cluster_message(
    internal: &InboundInternal,
    r: &InboundRecord,
    now_ms: u64,
) -> Result<Option<Message>, Skip> {
    if *internal == InboundInternal::ClusterClaims {
        // The claim, and after a newline (compact JSON has none) the record's value: a handed
        // over session.
        let claim = r.headers.iter().find(|(k, _)| k == crate::cluster::CLAIM_HEADER).ok_or(Skip::MissingField)?;
        let value = r.value.as_deref().unwrap_or_default();
        let mut payload = Vec::with_capacity(claim.1.len() + 1 + value.len());
        payload.extend_from_slice(&claim.1);
        payload.push(b'\n');
        payload.extend_from_slice(value);
        return Ok(Some(Message {
            topic: crate::cluster::CLAIM_TOPIC.into(),
            payload: payload.into(),
            qos: 0,
            retain: false,
            properties: None,
            expiry_at_ms: None,
            origin: Arc::from(CLAIM),
        }));
    }
    let mut topic = None;
    let (mut qos, mut retain, mut node) = (0u8, false, None);
    let mut properties = Properties::default();
    let mut expiry_at_ms = None;
    for (k, v) in &r.headers {
        let text = || std::str::from_utf8(v).map_err(|_| Skip::NotUtf8);
        match k.as_str() {
            crate::cluster::EXPIRY_HEADER => {
                let secs = text()?.parse::<u32>().map_err(|_| Skip::MissingField)?;
                expiry_at_ms = Some(now_ms + u64::from(secs) * 1000);
            }
            "mqtt.topic" => topic = Some(text()?.to_string()),
            "mqtt.qos" => qos = text()?.parse::<u8>().ok().filter(|q| *q <= 2).ok_or(Skip::MissingField)?,
            "mqtt.retain" => retain = v.as_ref() == b"true",
            "content-type" => properties.content_type = Some(text()?.to_string()),
            "mqtt.response_topic" => properties.response_topic = Some(text()?.to_string()),
            "mqtt.correlation_data" => properties.correlation_data = Some(v.clone()),
            "mqtt.payload_format" => properties.payload_format_indicator = Some(u8::from(v.as_ref() == b"1")),
            crate::cluster::NODE_HEADER => node = Some(v.clone()),
            crate::cluster::USER_PROPERTIES_HEADER => {
                properties.user_properties = crate::cluster::decode_user_properties(v).ok_or(Skip::MissingField)?;
            }
            _ => {}
        }
    }
    let topic = topic.ok_or(Skip::MissingField)?;
    if !topic::valid_topic_name(&topic, &TopicLimits::default()) {
        return Err(Skip::InvalidTopic);
    }
    let origin = match internal {
        InboundInternal::ClusterMessages { node: me } => {
            // This node's own, or not a node's at all: a carrier's topic is a user's topic,
            // which other producers may write to as well.
            if node.is_none() || node.as_deref() == Some(me.as_bytes()) {
                return Ok(None);
            }
            FROM_NODE
        }
        InboundInternal::ClusterRetained => {
            retain = true;
            RETAINED_SYNC
        }
        InboundInternal::ClusterClaims => CLAIM,
    };
    Ok(Some(Message {
        topic,
        payload: r.value.clone().unwrap_or_default(),
        qos,
        retain,
        properties: properties.boxed(),
        expiry_at_ms,
        origin: Arc::from(origin),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(topics: &[&str], payload: &str) -> InboundMappingConfig {
        InboundMappingConfig {
            name: "m".into(),
            cluster: "c".into(),
            kafka_topics: vec!["commands".into()],
            kafka_topic_pattern: None,
            mqtt_topics: topics.iter().map(|t| t.to_string()).collect(),
            payload: PayloadSource::parse(payload).unwrap(),
            qos: 1,
            retain: false,
            start: StartAt::Latest,
            schema: None,
            registry: None,
            mode: None,
            subject: None,
            internal: None,
        }
    }

    fn rec(key: Option<&str>, value: &str, headers: &[(&str, &str)]) -> InboundRecord {
        InboundRecord {
            mapping: 0,
            topic: "commands".into(),
            partition: 2,
            offset: 7,
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            value: Some(Bytes::copy_from_slice(value.as_bytes())),
            headers: headers.iter().map(|(k, v)| (k.to_string(), Bytes::copy_from_slice(v.as_bytes()))).collect(),
        }
    }

    #[test]
    fn templates_payloads_and_headers() {
        let c = vec!["c".to_string()];
        let i = Inbound::new(
            &[cfg(&["devices/${key}/commands", "fleet/${json./region}/${topic}/${partition}"], "json:/cmd")],
            &c,
        )
        .unwrap();
        let r = rec(
            Some("car-1"),
            r#"{"cmd":"reboot","region":"eu"}"#,
            &[("trace", "t1"), ("content-type", "application/json")],
        );
        let ms = i.transform(&r, 0).unwrap();
        assert_eq!(
            ms.iter().map(|m| m.topic.as_str()).collect::<Vec<_>>(),
            ["devices/car-1/commands", "fleet/eu/commands/2"]
        );
        assert_eq!(&ms[0].payload[..], b"reboot");
        assert_eq!(ms[0].qos, 1);
        assert_eq!(ms[0].properties().user_properties, vec![("trace".to_string(), "t1".to_string())]);
        assert_eq!(ms[0].properties().content_type.as_deref(), Some("application/json"));
        let i = Inbound::new(&[cfg(&["x/${header.dev}"], "without:secret")], &c).unwrap();
        let ms = i.transform(&rec(None, r#"{"a":1,"secret":2}"#, &[("dev", "d9")]), 0).unwrap();
        assert_eq!((ms[0].topic.as_str(), &ms[0].payload[..]), ("x/d9", &br#"{"a":1}"#[..]));
    }

    #[test]
    fn positions_round_trip() {
        let mut p = Positions::new();
        p.insert(("m".into(), "t".into(), 3), 42);
        let mut back = Positions::new();
        decode_positions(&(encode_positions(&p) + "garbage\n"), &mut back);
        assert_eq!(back, p);
    }

    #[test]
    fn bad_records_are_skipped_with_a_cause() {
        let c = vec!["c".to_string()];
        let i = Inbound::new(&[cfg(&["devices/${key}/c"], "value")], &c).unwrap();
        assert_eq!(i.transform(&rec(None, "x", &[]), 0).unwrap_err(), Skip::MissingKey);
        assert_eq!(i.transform(&rec(Some("a/+"), "x", &[]), 0).unwrap_err(), Skip::InvalidTopic);
        let i = Inbound::new(&[cfg(&["d/${json./id}"], "value")], &c).unwrap();
        assert_eq!(i.transform(&rec(None, "not json", &[]), 0).unwrap_err(), Skip::NotJson);
        assert_eq!(i.transform(&rec(None, "{}", &[]), 0).unwrap_err(), Skip::MissingField);
        let e = MqttTemplate::parse("a/${key}/${nope}").unwrap_err();
        assert_eq!(
            e,
            MqttTemplateError::UnknownField { template: "a/${key}/${nope}".into(), field: "nope".into(), at: 9 }
        );
        assert!(e.to_string().starts_with("`a/${key}/${nope}`: unknown field `${nope}` at byte 9 (key, topic,"), "{e}");
        let e = MqttTemplate::parse("a/${key").unwrap_err();
        assert_eq!(e.to_string(), "`a/${key`: unclosed `${` at byte 2");
        let e =
            Inbound::new(&[InboundMappingConfig { cluster: "zz".into(), ..cfg(&["a"], "value") }], &c).err().unwrap();
        assert_eq!(e.to_string(), "kafka_to_mqtt `m`: unknown cluster `zz`");
        let e = Inbound::new(&[cfg(&["x/${bad}"], "value")], &c).err().unwrap();
        assert!(e.to_string().starts_with("kafka_to_mqtt `m`: `x/${bad}`: unknown field `${bad}` at byte 2"), "{e}");
        let e = PayloadSource::parse("json:id").unwrap_err();
        assert_eq!(e.to_string(), "`json:id`: a JSON pointer starts with `/`");
    }
}
