//! Configuration of payload schemas: `[schemas.NAME]` (the local registry),
//! `[schema_registries.NAME]` (Confluent Schema Registries) and what a mapping does with them.
//!
//! Types and validation only (sans-I/O): the `sluice-schema` crate compiles the files and talks
//! to the registries; the Kafka threads apply the checks. Every error names the key at fault.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `kind` of a local schema.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SchemaKind {
    /// JSON Schema, drafts 4 to 2020-12 (the payload is JSON).
    JsonSchema,
    /// The payload is one Avro datum of the schema.
    Avro,
}

/// One `[schemas.NAME]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    pub kind: SchemaKind,
    pub file: String,
}

/// One `[schema_registries.NAME]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// `http://host:port` or `https://…` (Confluent Cloud).
    pub url: String,
    /// Basic authentication (Confluent Cloud: the API key and secret).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// `[schema_registries.NAME.tls] ca_file = …`: CAs for an https URL (Mozilla's roots otherwise).
    #[serde(default)]
    pub tls: Option<RegistryTls>,
    /// How often a subject's latest version is fetched again (new versions are picked up).
    #[serde(default = "default_refresh_ms")]
    pub refresh_ms: u64,
    /// Bound of one registry call; a payload waiting for a schema fails after it.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryTls {
    pub ca_file: Option<String>,
}

fn default_refresh_ms() -> u64 {
    30_000
}
fn default_timeout_ms() -> u64 {
    5_000
}

/// A mapping's `mode` with a registry.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SchemaMode {
    /// MQTT → Kafka: the payload must already be wire-format Avro of the subject.
    Validate,
    /// MQTT → Kafka: JSON → Avro of the subject's schema, in the wire format.
    Encode,
    /// Kafka → MQTT: wire-format Avro → JSON.
    Decode,
    /// Kafka → MQTT: the bytes as they are.
    Pass,
}

/// What an MQTT 3.1.1 publish that does not validate gets (MQTT 5: PUBACK/PUBREC 0x99).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnInvalid {
    /// Acknowledged; the payload goes to the mapping's dead-letter topic with headers naming the
    /// schema and the error.
    DeadLetter,
    /// Acknowledged, dropped and counted.
    #[default]
    Drop,
    /// The connection is closed without an acknowledgement.
    Disconnect,
}

impl OnInvalid {
    pub fn name(self) -> &'static str {
        match self {
            OnInvalid::DeadLetter => "dead-letter",
            OnInvalid::Drop => "drop",
            OnInvalid::Disconnect => "disconnect",
        }
    }
}

/// A mapping's schema keys (`schema`, `registry`, `mode`, `subject`, `version`), checked against
/// the configured schemas and registries. `outbound`: an `[[mqtt_to_kafka]]` mapping.
pub struct MappingSchemaKeys<'a> {
    pub key: String,
    pub schema: Option<&'a str>,
    pub registry: Option<&'a str>,
    pub mode: Option<SchemaMode>,
    pub subject: Option<&'a str>,
    pub version: Option<u32>,
    pub outbound: bool,
}

/// Checks one mapping's schema keys; the error is (key, problem).
pub fn check_mapping(
    m: &MappingSchemaKeys<'_>,
    schemas: &BTreeMap<String, SchemaConfig>,
    registries: &BTreeMap<String, RegistryConfig>,
) -> Result<(), (String, String)> {
    let err = |k: &str, p: String| Err((format!("{}.{k}", m.key), p));
    if let Some(s) = m.schema {
        if !schemas.contains_key(s) {
            return err("schema", format!("names no `[schemas.{s}]` table"));
        }
        if m.registry.is_some() {
            return err("schema", "a mapping uses a local `schema` or a `registry`, not both".into());
        }
    }
    let allowed: &[SchemaMode] =
        if m.outbound { &[SchemaMode::Validate, SchemaMode::Encode] } else { &[SchemaMode::Decode, SchemaMode::Pass] };
    match (m.registry, m.mode) {
        (Some(r), _) if !registries.contains_key(r) => {
            err("registry", format!("names no `[schema_registries.{r}]` table"))
        }
        (Some(_), None) => err("mode", format!("a mapping with a `registry` needs a mode: {}", modes(allowed))),
        (_, Some(mode)) if !allowed.contains(&mode) => {
            err("mode", format!("{mode:?} is not a mode of this direction: {}", modes(allowed)).to_lowercase())
        }
        (None, Some(SchemaMode::Pass)) => Ok(()),
        (None, Some(_)) => err("registry", "`mode` needs a `registry`".into()),
        _ if m.registry.is_none() && (m.subject.is_some() || m.version.is_some()) => {
            err("subject", "`subject` and `version` need a `registry`".into())
        }
        _ if m.version.is_some() && m.mode != Some(SchemaMode::Encode) => {
            err("version", "a pinned `version` applies to mode = \"encode\" only".into())
        }
        _ => Ok(()),
    }
}

fn modes(m: &[SchemaMode]) -> String {
    m.iter().map(|x| format!("\"{x:?}\"").to_lowercase()).collect::<Vec<_>>().join(" or ")
}

/// Why payloads do not validate or convert, as `sluice_schema::PayloadError::cause` names them:
/// the order in which [`crate::shard::MappingStats::invalid_by_cause`] counts them (anything else
/// counts as the last).
pub const INVALID_CAUSES: [&str; 8] = [
    "not_json",
    "json_schema",
    "does_not_convert",
    "not_avro",
    "not_wire_format",
    "unknown_id",
    "not_in_subject",
    "other",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn keys<'a>(schema: Option<&'a str>, registry: Option<&'a str>, mode: Option<SchemaMode>) -> MappingSchemaKeys<'a> {
        MappingSchemaKeys {
            key: "mqtt_to_kafka[0]".into(),
            schema,
            registry,
            mode,
            subject: None,
            version: None,
            outbound: true,
        }
    }

    #[test]
    fn mapping_keys_are_checked_and_errors_name_the_key() {
        let schemas = BTreeMap::from([("t".to_string(), SchemaConfig { kind: SchemaKind::Avro, file: "f".into() })]);
        let regs = BTreeMap::from([(
            "r".to_string(),
            RegistryConfig {
                url: "http://x".into(),
                username: None,
                password: None,
                tls: None,
                refresh_ms: 1,
                timeout_ms: 1,
            },
        )]);
        let check = |k: MappingSchemaKeys<'_>| check_mapping(&k, &schemas, &regs);
        assert!(check(keys(Some("t"), None, None)).is_ok());
        assert!(check(keys(None, Some("r"), Some(SchemaMode::Encode))).is_ok());
        assert_eq!(
            check(keys(Some("x"), None, None)).unwrap_err(),
            ("mqtt_to_kafka[0].schema".into(), "names no `[schemas.x]` table".into())
        );
        assert_eq!(check(keys(None, Some("q"), Some(SchemaMode::Encode))).unwrap_err().0, "mqtt_to_kafka[0].registry");
        assert_eq!(
            check(keys(None, Some("r"), None)).unwrap_err().1,
            "a mapping with a `registry` needs a mode: \"validate\" or \"encode\""
        );
        assert_eq!(
            check(keys(None, Some("r"), Some(SchemaMode::Decode))).unwrap_err().1,
            "decode is not a mode of this direction: \"validate\" or \"encode\""
        );
        assert_eq!(
            check(keys(Some("t"), Some("r"), Some(SchemaMode::Encode))).unwrap_err().0,
            "mqtt_to_kafka[0].schema"
        );
        let pinned = MappingSchemaKeys { version: Some(2), ..keys(None, Some("r"), Some(SchemaMode::Validate)) };
        assert_eq!(check(pinned).unwrap_err().0, "mqtt_to_kafka[0].version");
    }
}
