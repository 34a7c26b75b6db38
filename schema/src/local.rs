//! The local registry: schemas named in the config (`[schemas.NAME]`), read from their files and
//! compiled at start and again on SIGHUP.
//!
//! Every Kafka thread holds its own `Arc` of each compiled schema and checks a generation number
//! (one atomic load per record) to pick up a reload; nothing is locked on the record path. A
//! reload compiles every file first and swaps only the schemas that compiled: one that fails
//! keeps its previous version and is reported with its file and the problem.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::avro::AvroSchema;
use crate::json::ReusedValue;
use crate::PayloadError;

/// The largest payload parsed into a thread's reused value (which keeps the memory of the last
/// one it held: bounded by this); larger ones are parsed afresh by `serde_json`.
pub const REUSED_BYTES_MAX: usize = 64 << 10;

/// `kind = "json-schema" | "avro"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    JsonSchema,
    Avro,
}

/// A compiled local schema.
pub enum Compiled {
    /// JSON Schema, drafts 4 to 2020-12 (the draft from `$schema`, 2020-12 without one).
    Json(jsonschema::Validator),
    Avro(Box<AvroSchema>),
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compiled::Json(_) => f.write_str("Compiled::Json"),
            Compiled::Avro(a) => write!(f, "Compiled::Avro({a:?})"),
        }
    }
}

/// A schema file that cannot be read or does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("schema `{name}` (file {file}): {problem}")]
pub struct CompileError {
    pub name: String,
    pub file: String,
    pub problem: String,
}

impl Compiled {
    /// Compiles schema text of `kind`; the error is the compiler's text.
    pub fn compile(kind: Kind, text: &str) -> Result<Compiled, String> {
        match kind {
            Kind::JsonSchema => {
                let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
                jsonschema::validator_for(&v).map(Compiled::Json).map_err(|e| e.to_string())
            }
            Kind::Avro => AvroSchema::parse(text).map(|a| Compiled::Avro(Box::new(a))),
        }
    }

    /// Reads and compiles `file`.
    pub fn load(name: &str, kind: Kind, file: &str) -> Result<Compiled, CompileError> {
        let err = |problem: String| CompileError { name: name.into(), file: file.into(), problem };
        let text = std::fs::read_to_string(file).map_err(|e| err(e.to_string()))?;
        Compiled::compile(kind, &text).map_err(err)
    }

    /// Checks one payload: JSON text valid under the JSON Schema, or exactly one Avro datum.
    /// Stateless: the JSON is parsed by `serde_json` into a new value.
    pub fn validate(&self, payload: &[u8]) -> Result<(), PayloadError> {
        self.validate_with(payload, None)
    }

    /// [`Self::validate`], parsing JSON into `reuse` (the value of the thread's previous
    /// payload, its strings and maps reused: no allocation when the shape repeats). A payload
    /// that parser does not take, or a larger one than [`REUSED_BYTES_MAX`], is parsed by
    /// `serde_json` (which names what is wrong with invalid JSON).
    pub fn validate_with(&self, payload: &[u8], reuse: Option<&mut ReusedValue>) -> Result<(), PayloadError> {
        match self {
            Compiled::Json(v) => {
                let fresh;
                let reused = reuse.filter(|_| payload.len() <= REUSED_BYTES_MAX).and_then(|r| r.parse(payload).ok());
                let json = match reused {
                    Some(json) => json,
                    None => {
                        fresh = serde_json::from_slice::<serde_json::Value>(payload)
                            .map_err(|e| PayloadError::NotJson(e.to_string()))?;
                        &fresh
                    }
                };
                // The fast check first; errors are collected only for an invalid payload.
                if v.is_valid(json) {
                    return Ok(());
                }
                let first = v.iter_errors(json).next().map(|e| (e.instance_path().to_string(), e.to_string()));
                let (path, message) = first.unwrap_or_default();
                Err(PayloadError::JsonSchema { path, message })
            }
            Compiled::Avro(a) => a.validate_datum(payload),
        }
    }
}

/// One named schema as every thread sees it.
struct Slot {
    kind: Kind,
    file: String,
    current: Mutex<Arc<Compiled>>,
}

/// The local schemas, by name, reloadable.
pub struct LocalSchemas {
    slots: BTreeMap<String, Slot>,
    generation: AtomicU64,
}

impl std::fmt::Debug for LocalSchemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSchemas").field("names", &self.slots.keys().collect::<Vec<_>>()).finish()
    }
}

impl LocalSchemas {
    /// Loads every `(name, kind, file)`; the first that fails is the error (start refuses).
    pub fn load(entries: &[(String, Kind, String)]) -> Result<LocalSchemas, CompileError> {
        let mut slots = BTreeMap::new();
        for (name, kind, file) in entries {
            let c = Compiled::load(name, *kind, file)?;
            slots.insert(name.clone(), Slot { kind: *kind, file: file.clone(), current: Mutex::new(Arc::new(c)) });
        }
        Ok(LocalSchemas { slots, generation: AtomicU64::new(1) })
    }

    /// Compiles every file again; those that compiled replace their schema, the others keep
    /// theirs and are returned. The generation moves when anything was replaced.
    pub fn reload(&self) -> Vec<CompileError> {
        let mut failed = Vec::new();
        let mut replaced = false;
        for (name, slot) in &self.slots {
            match Compiled::load(name, slot.kind, &slot.file) {
                Ok(c) => {
                    *slot.current.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(c);
                    replaced = true;
                }
                Err(e) => failed.push(e),
            }
        }
        if replaced {
            self.generation.fetch_add(1, Ordering::Release);
        }
        failed
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Compiled>> {
        self.slots.get(name).map(|s| s.current.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.keys().map(String::as_str)
    }
}
