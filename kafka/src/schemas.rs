//! Payload schemas on the Kafka thread: what each mapping checks, and the producer's stage that
//! validates or encodes a record before it is batched.
//!
//! The checks run here, beside the shard on its own CPU, never on the shard's reactor. A schema
//! the thread's cache lacks is fetched on tokio's blocking pool (bounded by the registry's
//! `timeout_ms`); meanwhile the mapping's records wait here, in order (a later record of the
//! mapping never overtakes one that waits), at most [`PARKED_MAX`] per thread. A record that
//! does not validate gets a [`ProduceError::Invalid`] result naming the schema and the first
//! error (and, with `on_invalid = "dead-letter"`, a copy for the dead-letter topic with
//! `sluice.schema` and `sluice.error` headers); one whose schema the registry cannot give in time
//! fails like any other bridge error.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_core::bridge::{KafkaRecord, MappingConfig, ProduceError, ProduceRequest};
use sluice_core::inbound::InboundMappingConfig;
use sluice_core::schemas::{OnInvalid, RegistryConfig, SchemaConfig, SchemaKind, SchemaMode};
use sluice_schema::check::{self, Cache, Fetched, Inbound, Need, Outbound, Outcome, Schemas};
use sluice_schema::local::{CompileError, Kind, LocalSchemas};
use sluice_schema::registry::{RegistryClient, RegistryError, RegistrySettings};

/// Records of one thread waiting for a registry fetch; beyond, a record fails at once.
pub const PARKED_MAX: usize = 10_000;

/// What an MQTT → Kafka mapping checks.
#[derive(Debug, Clone)]
enum OutOp {
    Local(Arc<str>),
    Validate { registry: usize, subject: Option<Arc<str>> },
    Encode { registry: usize, subject: Option<Arc<str>>, version: Option<u32> },
}

/// Every mapping's checks and the shared schemas; one per process, cloned into each thread.
#[derive(Debug)]
pub struct SchemaSetup {
    schemas: Arc<Schemas>,
    /// By `[[mqtt_to_kafka]]` index: the check and the mapping's `on_invalid`.
    outbound: Vec<Option<(OutOp, OnInvalid)>>,
    /// By `[[kafka_to_mqtt]]` index.
    inbound: Vec<Option<Inbound>>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaSetupError {
    #[error("{0}")]
    Compile(#[from] CompileError),
    #[error("schema_registries.{name}: {error}")]
    Registry { name: String, error: RegistryError },
}

impl SchemaSetup {
    /// Compiles the local schemas and builds the registry clients; `None` when no mapping uses
    /// a schema.
    pub fn build(
        schemas: &BTreeMap<String, SchemaConfig>,
        registries: &BTreeMap<String, RegistryConfig>,
        outbound: &[MappingConfig],
        inbound: &[InboundMappingConfig],
    ) -> Result<Option<Arc<SchemaSetup>>, SchemaSetupError> {
        let used = outbound.iter().any(|m| m.schema.is_some() || m.registry.is_some())
            || inbound.iter().any(|m| m.schema.is_some() || m.registry.is_some());
        if !used && schemas.is_empty() {
            return Ok(None);
        }
        let entries: Vec<(String, Kind, String)> = schemas
            .iter()
            .map(|(n, s)| {
                let kind = match s.kind {
                    SchemaKind::JsonSchema => Kind::JsonSchema,
                    SchemaKind::Avro => Kind::Avro,
                };
                (n.clone(), kind, s.file.clone())
            })
            .collect();
        let local = Arc::new(LocalSchemas::load(&entries)?);
        let names: Vec<&String> = registries.keys().collect();
        let mut clients = Vec::new();
        for (name, r) in registries {
            let settings = RegistrySettings {
                url: r.url.clone(),
                username: r.username.clone(),
                password: r.password.clone(),
                ca_file: r.tls.as_ref().and_then(|t| t.ca_file.clone()),
                timeout_ms: r.timeout_ms,
            };
            let client = RegistryClient::new(name, &settings)
                .map_err(|error| SchemaSetupError::Registry { name: name.clone(), error })?;
            clients.push((client, Duration::from_millis(r.refresh_ms)));
        }
        let index = |r: &Option<String>| r.as_ref().and_then(|r| names.iter().position(|n| *n == r));
        let outbound = outbound
            .iter()
            .map(|m| {
                let op = match (&m.schema, index(&m.registry), m.mode) {
                    (Some(s), _, _) => OutOp::Local(Arc::from(s.as_str())),
                    (None, Some(registry), Some(SchemaMode::Validate)) => {
                        OutOp::Validate { registry, subject: m.subject.as_deref().map(Arc::from) }
                    }
                    (None, Some(registry), Some(SchemaMode::Encode)) => {
                        OutOp::Encode { registry, subject: m.subject.as_deref().map(Arc::from), version: m.version }
                    }
                    _ => return None,
                };
                Some((op, m.on_invalid))
            })
            .collect();
        let inbound = inbound
            .iter()
            .map(|m| match (&m.schema, index(&m.registry), m.mode) {
                (Some(s), _, _) => Some(Inbound::Local(s.clone())),
                (None, Some(registry), Some(SchemaMode::Decode)) => {
                    Some(Inbound::Decode { registry, subject: m.subject.clone() })
                }
                _ => None,
            })
            .collect();
        Ok(Some(Arc::new(SchemaSetup { schemas: Arc::new(Schemas { local, registries: clients }), outbound, inbound })))
    }

    /// SIGHUP: compiles the local schema files again (see [`LocalSchemas::reload`]).
    pub fn reload(&self) -> Vec<CompileError> {
        self.schemas.local.reload()
    }

    pub(crate) fn schemas(&self) -> Arc<Schemas> {
        self.schemas.clone()
    }

    pub(crate) fn inbound_op(&self, mapping: u16) -> Option<&Inbound> {
        self.inbound.get(usize::from(mapping)).and_then(Option::as_ref)
    }

    /// A thread's cache over these schemas.
    pub(crate) fn cache(&self) -> Arc<Mutex<Cache>> {
        Arc::new(Mutex::new(Cache::new(self.schemas.clone())))
    }
}

/// Fetches `need` on the blocking pool and hands the answer to `done`.
pub(crate) fn spawn_fetch<F>(schemas: Arc<Schemas>, need: Need, done: F)
where
    F: FnOnce(Need, Result<Fetched, RegistryError>) + Send + 'static,
{
    tokio::spawn(async move {
        let n = need.clone();
        let r = tokio::task::spawn_blocking(move || check::fetch(&schemas, &n)).await;
        let r = r.unwrap_or_else(|e| {
            Err(RegistryError::Unreachable { registry: "?".into(), url: String::new(), error: e.to_string() })
        });
        match &r {
            Ok(_) => tracing::debug!(?need, "schema registry fetch answered"),
            Err(e) => tracing::debug!(?need, error = %e, "schema registry fetch failed"),
        }
        done(need, r);
    });
}

pub(crate) fn lock(c: &Mutex<Cache>) -> std::sync::MutexGuard<'_, Cache> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the producer does with a record after its check.
pub(crate) enum Checked {
    /// Go on (the value may have been replaced by its encoding).
    Go(ProduceRequest),
    /// Parked until a fetch answers.
    Parked,
    /// Answered: the record's id, the result to report and a dead-letter copy to send, if any.
    Done(u64, ProduceError, Option<ProduceRequest>),
}

/// The producer's schema stage.
pub(crate) struct Stage {
    setup: Arc<SchemaSetup>,
    cache: Arc<Mutex<Cache>>,
    /// Records waiting for a fetch, per mapping, in hand-over order.
    parked: HashMap<u16, VecDeque<ProduceRequest>>,
    parked_total: usize,
    counters: Arc<crate::health::KafkaHealth>,
    /// The default subject (`<topic>-value`) of the last topic seen: built once per topic, not
    /// per record.
    last_subject: Option<(Arc<str>, Arc<str>)>,
}

impl Stage {
    pub(crate) fn new(
        setup: Arc<SchemaSetup>,
        cache: Arc<Mutex<Cache>>,
        counters: Arc<crate::health::KafkaHealth>,
    ) -> Stage {
        Stage { setup, cache, parked: HashMap::new(), parked_total: 0, counters, last_subject: None }
    }

    pub(crate) fn schemas(&self) -> Arc<Schemas> {
        self.setup.schemas.clone()
    }

    /// Whether records of `mapping` are checked here. Records replayed from the spill log
    /// (no source message) were checked before they were spilled.
    pub(crate) fn checks(&self, r: &KafkaRecord) -> bool {
        r.source().is_some() && self.setup.outbound.get(usize::from(r.mapping)).is_some_and(Option::is_some)
    }

    /// Checks a record from the shard; `fetch` starts a registry fetch.
    pub(crate) fn check(&mut self, req: ProduceRequest, fetch: &mut impl FnMut(Need)) -> Checked {
        let mapping = req.record.mapping;
        if self.parked.get(&mapping).is_some_and(|q| !q.is_empty()) {
            // Behind the mapping's waiting records: order within a mapping holds.
            return self.park(req);
        }
        self.check_now(req, fetch)
    }

    fn park(&mut self, req: ProduceRequest) -> Checked {
        let c = &self.counters.schemas;
        if self.parked_total >= PARKED_MAX {
            c.wait_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let e = ProduceError::Other(format!("{PARKED_MAX} records already wait for a schema registry"));
            return Checked::Done(req.id, e, None);
        }
        c.waited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        c.waiting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.parked_total += 1;
        self.parked.entry(req.record.mapping).or_default().push_back(req);
        Checked::Parked
    }

    fn check_now(&mut self, mut req: ProduceRequest, fetch: &mut impl FnMut(Need)) -> Checked {
        let Some((op, policy)) = self.setup.outbound.get(usize::from(req.record.mapping)).and_then(Option::as_ref)
        else {
            return Checked::Go(req);
        };
        let policy = *policy;
        let last = &mut self.last_subject;
        let mut subject = |s: &Option<Arc<str>>, topic: &Arc<str>| match s {
            Some(s) => s.clone(),
            None => match last {
                Some((t, subject)) if Arc::ptr_eq(t, topic) || **t == **topic => subject.clone(),
                _ => {
                    let subject: Arc<str> = Arc::from(format!("{topic}-value"));
                    *last = Some((topic.clone(), subject.clone()));
                    subject
                }
            },
        };
        let op = match op {
            OutOp::Local(name) => Outbound::Local(name.clone()),
            OutOp::Validate { registry, subject: s } => {
                Outbound::Validate { registry: *registry, subject: subject(s, &req.record.topic) }
            }
            OutOp::Encode { registry, subject: s, version } => {
                Outbound::Encode { registry: *registry, subject: subject(s, &req.record.topic), version: *version }
            }
        };
        let outcome = lock(&self.cache).outbound(&op, &req.record.value, Instant::now());
        match outcome {
            Outcome::Pass => Checked::Go(req),
            Outcome::Replace(bytes) => {
                req.record.value = Bytes::from(bytes);
                Checked::Go(req)
            }
            Outcome::Invalid { schema, error } => {
                let cause = error.cause();
                let error = error.to_string();
                let copy = (policy == OnInvalid::DeadLetter).then(|| dead_letter(&req, &schema, &error)).flatten();
                Checked::Done(
                    req.id,
                    ProduceError::Invalid { reason: format!("{schema}: {error}"), policy, cause },
                    copy,
                )
            }
            Outcome::Wait(need) => {
                if lock(&self.cache).begin_fetch(&need) {
                    fetch(need);
                }
                self.park(req)
            }
            Outcome::Failed(e) => Checked::Done(req.id, ProduceError::Other(e.to_string()), None),
        }
    }

    /// A fetch answered: stores it and checks the parked records again, each mapping's in
    /// order until one waits again. Returns the records' outcomes.
    pub(crate) fn on_fetched(
        &mut self,
        need: Need,
        r: Result<Fetched, RegistryError>,
        fetch: &mut impl FnMut(Need),
    ) -> Vec<Checked> {
        lock(&self.cache).store(need, r, Instant::now());
        let mut out = Vec::new();
        let mappings: Vec<u16> = self.parked.keys().copied().collect();
        for m in mappings {
            while let Some(req) = self.parked.get_mut(&m).and_then(VecDeque::pop_front) {
                self.parked_total -= 1;
                self.counters.schemas.waiting.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                match self.check_now(req, fetch) {
                    Checked::Parked => {
                        // check_now parked it at the back: put it back in front.
                        if let Some(q) = self.parked.get_mut(&m) {
                            if let Some(req) = q.pop_back() {
                                q.push_front(req);
                            }
                        }
                        break;
                    }
                    other => out.push(other),
                }
            }
            if self.parked.get(&m).is_some_and(VecDeque::is_empty) {
                self.parked.remove(&m);
            }
        }
        out
    }

    /// Stale subjects to fetch again in the background.
    pub(crate) fn refreshes(&self) -> Vec<Need> {
        let mut c = lock(&self.cache);
        c.take_refreshes().into_iter().filter(|n| c.begin_fetch(n)).collect()
    }

    pub(crate) fn parked(&self) -> usize {
        self.parked_total
    }
}

/// The copy of an invalid record for its mapping's dead-letter topic: the payload as it came,
/// with headers naming the schema, the error and where it was headed.
fn dead_letter(req: &ProduceRequest, schema: &str, error: &str) -> Option<ProduceRequest> {
    let r = &req.record;
    let d = r.dead_letter_copy([
        ("sluice.schema".to_string(), Bytes::copy_from_slice(schema.as_bytes())),
        ("sluice.error".to_string(), Bytes::copy_from_slice(error.as_bytes())),
        ("sluice.topic".to_string(), Bytes::copy_from_slice(r.topic.as_bytes())),
    ])?;
    Some(ProduceRequest { id: req.id, record: d, durable: false })
}

#[cfg(test)]
mod cause_names {
    /// Every cause the schema crate gives is one the core counts by name (else it would count
    /// as "other").
    #[test]
    fn every_payload_error_cause_is_an_invalid_cause() {
        use sluice_schema::PayloadError as E;
        let all = [
            E::NotJson(String::new()),
            E::JsonSchema { path: String::new(), message: String::new() },
            E::Convert { path: String::new(), problem: String::new() },
            E::Avro(String::new()),
            E::NotWireFormat(String::new()),
            E::UnknownId { registry: String::new(), id: 0 },
            E::NotInSubject { id: 0, subject: String::new() },
        ];
        for e in all {
            assert!(sluice_core::schemas::INVALID_CAUSES.contains(&e.cause()), "{}", e.cause());
        }
    }
}
