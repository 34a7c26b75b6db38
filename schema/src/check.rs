//! What a mapping does with each payload, over one thread's cache of registry schemas.
//!
//! [`Cache::outbound`] (MQTT → Kafka) and [`Cache::inbound`] (Kafka → MQTT) never block: a
//! schema the cache does not hold is an [`Outcome::Wait`] naming the [`Need`]; the caller fetches
//! it with [`fetch`] off its record path (a blocking pool), hands the answer to
//! [`Cache::store`], and tries the payload again.
//!
//! # Invariants
//! - A schema once fetched keeps working through a registry outage: a failed fetch never
//!   replaces a known entry (it only moves its refresh time on).
//! - A subject's entry older than its registry's `refresh_ms` is fetched again in the background
//!   ([`Cache::take_refreshes`]) while the cached one keeps serving: a new version is picked up
//!   without a restart and without a wait.
//! - Bounded: at most [`IDS_MAX`] ids (and as many id → subjects answers) are remembered, at most
//!   [`FETCHES_MAX`] fetches run at once per thread; a payload that needs one more fails at once
//!   ([`RegistryError::Busy`]). A failed fetch is not tried again for [`RETRY_AFTER`] (an id the
//!   registry does not know: for `refresh_ms`), so a flood of bad ids cannot flood the registry.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::avro::AvroSchema;
use crate::json::ReusedValue;
use crate::local::{Compiled, LocalSchemas};
use crate::registry::{RegistryClient, RegistryError, SubjectVersion};
use crate::{wire, PayloadError};

/// Registry ids remembered per thread (and id → subjects answers).
pub const IDS_MAX: usize = 10_000;
/// Registry fetches running at once per thread.
pub const FETCHES_MAX: usize = 16;
/// How long a failed fetch (registry unreachable, an error answer) is not tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What an MQTT → Kafka mapping does with a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// Validate against the local schema of this name.
    Local(Arc<str>),
    /// The payload must be wire-format Avro with an id registered under `subject`.
    Validate { registry: usize, subject: Arc<str> },
    /// JSON → Avro of `subject`'s schema (latest, or `version`), written in the wire format.
    Encode { registry: usize, subject: Arc<str>, version: Option<u32> },
}

/// What a Kafka → MQTT mapping does with a record's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Local(String),
    /// Wire-format Avro → JSON; read with `subject`'s latest schema (Avro resolution) if given,
    /// else with the writer's.
    Decode {
        registry: usize,
        subject: Option<String>,
    },
}

/// A schema the cache does not hold yet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Need {
    Id { registry: usize, id: u32 },
    SubjectsOf { registry: usize, id: u32 },
    Subject { registry: usize, subject: String, version: Option<u32> },
}

/// A fetch's answer, for [`Cache::store`].
#[derive(Debug, Clone)]
pub enum Fetched {
    Schema(Arc<AvroSchema>),
    Subjects(Vec<String>),
    Version(SubjectVersion),
}

/// What to do with one payload.
#[derive(Debug)]
pub enum Outcome {
    /// Valid; send as it is.
    Pass,
    /// Valid; send these bytes instead (encoded or decoded).
    Replace(Vec<u8>),
    /// Does not validate or convert: `schema` names what it was checked against.
    Invalid { schema: String, error: PayloadError },
    /// Needs a schema not fetched yet.
    Wait(Need),
    /// The registry cannot answer (unreachable, busy, an error): a bridge error, not the
    /// payload's fault.
    Failed(RegistryError),
}

/// The registries and local schemas every thread shares (read-only but for reloads).
#[derive(Debug)]
pub struct Schemas {
    pub local: Arc<LocalSchemas>,
    /// Each registry's client and refresh interval.
    pub registries: Vec<(RegistryClient, Duration)>,
}

enum Entry<T> {
    Known(T, Instant),
    Failed(RegistryError, Instant),
}

/// One thread's cache and fetch bookkeeping.
pub struct Cache {
    schemas: Arc<Schemas>,
    local_generation: u64,
    local: HashMap<String, Arc<Compiled>>,
    ids: HashMap<(usize, u32), Entry<Arc<AvroSchema>>>,
    subjects_of: HashMap<(usize, u32), Entry<Vec<String>>>,
    /// By (registry, pinned version) then subject: looked up by `&str`, no key built per record.
    subjects: HashMap<(usize, Option<u32>), HashMap<String, Entry<SubjectVersion>>>,
    fetching: HashSet<Need>,
    refresh: Vec<Need>,
    /// The last JSON payload validated, reused by the next parse (bounded by
    /// [`crate::local::REUSED_BYTES_MAX`]).
    reuse: ReusedValue,
}

/// Fetches `need` (blocking; bounded by the registry's time-out).
pub fn fetch(schemas: &Schemas, need: &Need) -> Result<Fetched, RegistryError> {
    let client = |r: usize| &schemas.registries[r].0;
    match need {
        Need::Id { registry, id } => client(*registry).schema_by_id(*id).map(Fetched::Schema),
        Need::SubjectsOf { registry, id } => {
            client(*registry).subjects_of_id(*id).map(|v| Fetched::Subjects(v.into_iter().map(|(s, _)| s).collect()))
        }
        Need::Subject { registry, subject, version } => {
            client(*registry).subject_version(subject, *version).map(Fetched::Version)
        }
    }
}

impl Cache {
    pub fn new(schemas: Arc<Schemas>) -> Cache {
        Cache {
            schemas,
            local_generation: 0,
            local: HashMap::new(),
            ids: HashMap::new(),
            subjects_of: HashMap::new(),
            subjects: HashMap::new(),
            fetching: HashSet::new(),
            refresh: Vec::new(),
            reuse: ReusedValue::default(),
        }
    }

    pub fn schemas(&self) -> &Arc<Schemas> {
        &self.schemas
    }

    fn registry_name(&self, r: usize) -> &str {
        self.schemas.registries.get(r).map_or("?", |(c, _)| c.name())
    }

    fn refresh_of(&self, r: usize) -> Duration {
        self.schemas.registries.get(r).map_or(Duration::from_secs(30), |(_, d)| *d)
    }

    fn local(&mut self, name: &str) -> Option<Arc<Compiled>> {
        let g = self.schemas.local.generation();
        if g != self.local_generation {
            self.local.clear();
            self.local_generation = g;
        }
        if let Some(c) = self.local.get(name) {
            return Some(c.clone());
        }
        let c = self.schemas.local.get(name)?;
        self.local.insert(name.to_string(), c.clone());
        Some(c)
    }

    fn check_local(&mut self, name: &str, payload: &[u8]) -> Outcome {
        let Some(c) = self.local(name) else {
            return Outcome::Invalid {
                schema: name.into(),
                error: PayloadError::Avro(format!("no local schema `{name}`")),
            };
        };
        match c.validate_with(payload, Some(&mut self.reuse)) {
            Ok(()) => Outcome::Pass,
            Err(error) => Outcome::Invalid { schema: name.into(), error },
        }
    }

    /// A fetch may start for `need` (none running for it and room for one more): marks it running.
    pub fn begin_fetch(&mut self, need: &Need) -> bool {
        if self.fetching.contains(need) || self.fetching.len() >= FETCHES_MAX {
            return false;
        }
        self.fetching.insert(need.clone());
        true
    }

    /// Stale subjects to fetch again in the background (each once).
    pub fn take_refreshes(&mut self) -> Vec<Need> {
        std::mem::take(&mut self.refresh)
    }

    /// A fetch's answer. An error never replaces what is known.
    pub fn store(&mut self, need: Need, r: Result<Fetched, RegistryError>, now: Instant) {
        self.fetching.remove(&need);
        fn put<K: std::hash::Hash + Eq + Clone, T>(
            map: &mut HashMap<K, Entry<T>>,
            k: K,
            r: Result<T, RegistryError>,
            now: Instant,
            max: usize,
        ) {
            match (r, map.get_mut(&k)) {
                (Err(_), Some(Entry::Known(_, at))) => *at = now,
                (r, _) => {
                    if map.len() >= max && !map.contains_key(&k) {
                        // Full: forget one, so a hostile stream of ids cannot grow it.
                        if let Some(victim) = map.keys().next().cloned() {
                            map.remove(&victim);
                        }
                    }
                    let e = match r {
                        Ok(v) => Entry::Known(v, now),
                        Err(e) => Entry::Failed(e, now),
                    };
                    map.insert(k, e);
                }
            }
        }
        match need {
            Need::Id { registry, id } => {
                let r = r.and_then(|f| match f {
                    Fetched::Schema(s) => Ok(s),
                    _ => Err(self.mismatch(registry)),
                });
                put(&mut self.ids, (registry, id), r, now, IDS_MAX);
            }
            Need::SubjectsOf { registry, id } => {
                let r = r.and_then(|f| match f {
                    Fetched::Subjects(s) => Ok(s),
                    _ => Err(self.mismatch(registry)),
                });
                put(&mut self.subjects_of, (registry, id), r, now, IDS_MAX);
            }
            Need::Subject { registry, subject, version } => {
                let r = r.and_then(|f| match f {
                    Fetched::Version(v) => Ok(v),
                    _ => Err(self.mismatch(registry)),
                });
                if let Ok(v) = &r {
                    // The subject's schema is also the schema of its id.
                    put(&mut self.ids, (registry, v.id), Ok(v.schema.clone()), now, IDS_MAX);
                }
                put(self.subjects.entry((registry, version)).or_default(), subject, r, now, usize::MAX);
            }
        }
    }

    fn mismatch(&self, registry: usize) -> RegistryError {
        RegistryError::BadAnswer {
            registry: self.registry_name(registry).into(),
            what: "fetch".into(),
            problem: "answer of another kind".into(),
        }
    }

    /// A known value, or what to do instead. `refresh`: fetch a stale known value again in the
    /// background.
    fn lookup<'a, Q: std::hash::Hash + Eq + ?Sized, K: std::hash::Hash + Eq + std::borrow::Borrow<Q>, T>(
        map: &'a HashMap<K, Entry<T>>,
        key: &Q,
        need: impl FnOnce() -> Need,
        fetching: &HashSet<Need>,
        refresh: Option<(&mut Vec<Need>, Duration)>,
        retry_missing: Duration,
        now: Instant,
    ) -> Result<&'a T, Lookup> {
        match map.get(key) {
            Some(Entry::Known(v, at)) => {
                if let Some((list, every)) = refresh {
                    if now.duration_since(*at) >= every {
                        let n = need();
                        if !fetching.contains(&n) && !list.contains(&n) {
                            list.push(n);
                        }
                    }
                }
                Ok(v)
            }
            Some(Entry::Failed(e, at)) => {
                let wait = if matches!(e, RegistryError::NotFound { .. }) { retry_missing } else { RETRY_AFTER };
                if now.duration_since(*at) < wait {
                    Err(Lookup::Failed(e.clone()))
                } else {
                    Err(Lookup::Fetch(need()))
                }
            }
            None => Err(Lookup::Fetch(need())),
        }
    }

    fn wait(&self, need: Need) -> Outcome {
        if self.fetching.contains(&need) || self.fetching.len() < FETCHES_MAX {
            Outcome::Wait(need)
        } else {
            let registry = match &need {
                Need::Id { registry, .. } | Need::SubjectsOf { registry, .. } | Need::Subject { registry, .. } => {
                    *registry
                }
            };
            Outcome::Failed(RegistryError::Busy { registry: self.registry_name(registry).into(), max: FETCHES_MAX })
        }
    }

    /// The writer schema of wire-format `payload`, or the outcome instead.
    fn writer(&mut self, registry: usize, id: u32, schema: &str, now: Instant) -> Result<Arc<AvroSchema>, Outcome> {
        let retry = self.refresh_of(registry);
        let need = || Need::Id { registry, id };
        match Self::lookup(&self.ids, &(registry, id), need, &self.fetching, None, retry, now) {
            Ok(s) => Ok(s.clone()),
            Err(Lookup::Fetch(n)) => Err(self.wait(n)),
            Err(Lookup::Failed(RegistryError::NotFound { .. })) => Err(Outcome::Invalid {
                schema: schema.into(),
                error: PayloadError::UnknownId { registry: self.registry_name(registry).into(), id },
            }),
            Err(Lookup::Failed(e)) => Err(Outcome::Failed(e)),
        }
    }

    fn subject(
        &mut self,
        registry: usize,
        subject: &str,
        version: Option<u32>,
        now: Instant,
    ) -> Result<SubjectVersion, Outcome> {
        let every = self.refresh_of(registry);
        let need = || Need::Subject { registry, subject: subject.to_string(), version };
        // A pinned version does not change: only `latest` is refreshed.
        let refresh = version.is_none().then_some((&mut self.refresh, every));
        let Some(map) = self.subjects.get(&(registry, version)) else {
            return Err(self.wait(need()));
        };
        match Self::lookup(map, subject, need, &self.fetching, refresh, RETRY_AFTER, now) {
            Ok(v) => Ok(v.clone()),
            Err(Lookup::Fetch(n)) => Err(self.wait(n)),
            Err(Lookup::Failed(e)) => Err(Outcome::Failed(e)),
        }
    }

    fn subject_label(&self, registry: usize, subject: &str) -> String {
        format!("subject `{subject}` (registry `{}`)", self.registry_name(registry))
    }

    /// MQTT → Kafka: what to do with one payload.
    pub fn outbound(&mut self, op: &Outbound, payload: &[u8], now: Instant) -> Outcome {
        match op {
            Outbound::Local(name) => self.check_local(name, payload),
            Outbound::Validate { registry, subject } => {
                let (registry, label) = (*registry, self.subject_label(*registry, subject));
                let (id, datum) = match wire::split(payload) {
                    Ok(x) => x,
                    Err(error) => return Outcome::Invalid { schema: label, error },
                };
                let retry = self.refresh_of(registry);
                let need = || Need::SubjectsOf { registry, id };
                match Self::lookup(&self.subjects_of, &(registry, id), need, &self.fetching, None, retry, now) {
                    Ok(subjects) if subjects.iter().any(|s| **s == **subject) => {}
                    Ok(_) | Err(Lookup::Failed(RegistryError::NotFound { .. })) => {
                        return Outcome::Invalid {
                            schema: label,
                            error: PayloadError::NotInSubject { id, subject: subject.to_string() },
                        }
                    }
                    Err(Lookup::Fetch(n)) => return self.wait(n),
                    Err(Lookup::Failed(e)) => return Outcome::Failed(e),
                }
                let writer = match self.writer(registry, id, &label, now) {
                    Ok(w) => w,
                    Err(o) => return o,
                };
                match writer.validate_datum(datum) {
                    Ok(()) => Outcome::Pass,
                    Err(error) => Outcome::Invalid { schema: label, error },
                }
            }
            Outbound::Encode { registry, subject, version } => {
                let label = self.subject_label(*registry, subject);
                let v = match self.subject(*registry, subject, *version, now) {
                    Ok(v) => v,
                    Err(o) => return o,
                };
                // Avro is about half the JSON's size: one allocation, no copy.
                let mut out = Vec::with_capacity(wire::HEADER_BYTES + payload.len());
                wire::write_header(v.id, &mut out);
                match v.schema.encode_json_bytes(payload, &mut out) {
                    Ok(()) => Outcome::Replace(out),
                    Err(error) => Outcome::Invalid { schema: label, error },
                }
            }
        }
    }

    /// Kafka → MQTT: what to do with one record's value.
    pub fn inbound(&mut self, op: &Inbound, payload: &[u8], now: Instant) -> Outcome {
        match op {
            Inbound::Local(name) => self.check_local(name, payload),
            Inbound::Decode { registry, subject } => {
                let registry = *registry;
                let label = match subject {
                    Some(s) => self.subject_label(registry, s),
                    None => format!("registry `{}`", self.registry_name(registry)),
                };
                let (id, datum) = match wire::split(payload) {
                    Ok(x) => x,
                    Err(error) => return Outcome::Invalid { schema: label, error },
                };
                let writer = match self.writer(registry, id, &label, now) {
                    Ok(w) => w,
                    Err(o) => return o,
                };
                let reader = match subject {
                    Some(s) => match self.subject(registry, s, None, now) {
                        Ok(v) => Some(v.schema),
                        Err(o) => return o,
                    },
                    None => None,
                };
                match writer.decode_to_json(datum, reader.as_deref()) {
                    Ok(json) => Outcome::Replace(json),
                    Err(error) => Outcome::Invalid { schema: label, error },
                }
            }
        }
    }
}

enum Lookup {
    Fetch(Need),
    Failed(RegistryError),
}
