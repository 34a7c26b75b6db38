//! sluice-schema: payload schemas for the Kafka bridge.
//!
//! # Layout
//! - [`local`]: the local registry, `[schemas.NAME]` files (JSON Schema drafts 4 to 2020-12,
//!   Avro) compiled at start and on SIGHUP; a failed compile keeps the previous schema.
//! - [`avro`]: a compiled Avro schema; JSON → Avro binary, Avro binary → JSON (with Avro's
//!   resolution from a writer to a reader schema).
//! - [`json`]: a strict JSON reader for the fast paths (Avro written while reading; a parse that
//!   reuses the previous payload's value); what it does not take goes to `serde_json`.
//! - [`wire`]: the Confluent wire format (magic 0, 4-byte big-endian schema id, datum).
//! - [`registry`]: a Confluent Schema Registry client (blocking HTTP with a time-out).
//! - [`check`]: what one mapping does with a payload (validate, encode, decode) over a cache of
//!   registry schemas by id and by subject; a schema it does not hold yet is a [`check::Need`]
//!   for the caller to fetch off the record path, never a wait inside it.
//!
//! Nothing here knows MQTT, Kafka or shards; it performs no I/O but in [`registry`] and in
//! [`local`]'s file loads. No input panics: every failure is a [`PayloadError`] naming the first
//! problem.

pub mod avro;
pub mod check;
pub mod json;
pub mod local;
pub mod registry;
pub mod wire;

pub use avro::AvroSchema;

/// Why a payload does not validate or convert: the first problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    #[error("not JSON: {0}")]
    NotJson(String),
    /// JSON Schema: the instance path (`/pos/lat`, empty for the root) and the message.
    #[error("{message} (at `{path}`)")]
    JsonSchema { path: String, message: String },
    /// JSON that does not fit the Avro schema: the JSON path and the problem.
    #[error("{path}: {problem}")]
    Convert { path: String, problem: String },
    /// Bytes that are not a datum of the Avro schema (truncated, trailing bytes, bad values).
    #[error("not an Avro datum of the schema: {0}")]
    Avro(String),
    #[error("not the Confluent wire format: {0}")]
    NotWireFormat(String),
    #[error("schema id {id} is unknown to registry `{registry}`")]
    UnknownId { registry: String, id: u32 },
    #[error("schema id {id} is not a version of subject `{subject}`")]
    NotInSubject { id: u32, subject: String },
}

impl PayloadError {
    /// The kind of failure, one of `sluice_core::schemas::INVALID_CAUSES` (counted by it).
    pub fn cause(&self) -> &'static str {
        match self {
            PayloadError::NotJson(_) => "not_json",
            PayloadError::JsonSchema { .. } => "json_schema",
            PayloadError::Convert { .. } => "does_not_convert",
            PayloadError::Avro(_) => "not_avro",
            PayloadError::NotWireFormat(_) => "not_wire_format",
            PayloadError::UnknownId { .. } => "unknown_id",
            PayloadError::NotInSubject { .. } => "not_in_subject",
        }
    }
}

#[cfg(test)]
mod tests;
