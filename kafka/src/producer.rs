//! One shard's producer: every record the shard hands over, placed on a partition, batched per
//! partition and sent in produce requests that each carry the ready partitions of one Kafka
//! broker (up to [`REQUEST_BATCHES_BYTES`]), with the outcome of each record reported back in
//! order.
//!
//! It is one task on the shard's own Kafka thread and owns all its state — topic metadata
//! (partition leaders), per-partition queues, one connection per broker — so the record path
//! takes no lock and shares nothing with other shards. Requests, connections and metadata
//! fetches run as tasks that report back as [`Event`]s; only this loop changes state.
//!
//! # Invariants
//! - A partition has at most one batch in flight, and a failed batch goes back to the head of
//!   its queue: records of one partition reach Kafka in hand-over order (MQTT per-topic order)
//!   without idempotent sequence numbers. Several partitions' batches share a request, and up to
//!   `max_requests_in_flight` requests per broker may be outstanding.
//! - Every record handed over gets exactly one [`ProduceResult`]: acknowledged, refused (with
//!   its dead-letter copy, if its mapping has one), or timed out at its deadline.
//! - Everything is bounded: a request carries at most [`REQUEST_BATCHES_BYTES`] of batches (or
//!   one batch, when that alone is larger), a
//!   batch at most `batch_bytes`; the shard bounds the records it hands over (so the queues and
//!   the records waiting for metadata); a topic is kept only while Kafka knows it (one whose
//!   metadata fails is forgotten, its records failed); the events come from the tasks this loop
//!   started, at most one per request, connection attempt and metadata fetch.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rskafka::client::error::Error as ClientError;
use rskafka::client::raw::{BrokerLink, ProduceAcks, TopicBatches};
use sluice_core::bridge::{partition_for_key, KafkaRecord, ProduceError, ProduceRequest, ProduceResult};
// foldhash, not SipHash: the topic map is looked up once per record (SipHash was 2.4 % of the
// Kafka thread's samples at 100 B QoS 1).
use sluice_core::config::Compression;
use sluice_core::HashMap;
use tokio::sync::mpsc;

use crate::batch::{BatchEncoder, Producer as ProducerIds};
use crate::cluster::{classify_protocol, is_connection_error, retryable_protocol, Cluster, RETRY_BACKOFF_MAX};
use crate::dead_letter_copy;
use crate::schemas::{spawn_fetch, Checked, Stage};
use sluice_schema::check::{Fetched, Need};
use sluice_schema::registry::RegistryError;

/// Most bytes of batches one produce request carries (counted as records' sizes, before
/// encoding), unless its first batch alone is larger; librdkafka's `message.max.bytes`
/// (1,000,000 by default) bounds its requests alike. The ready partitions beyond go in the
/// broker's next request: at once while `max_requests_in_flight` allows, else when an answer
/// frees a slot. With 16 MiB, requests at 1 KiB QoS 0 carried 2.5 MiB (three partitions' 850 KB
/// batches) and Kafka (tansu) spent 2.1–2.6 µs of CPU per record on them, against 1.8–1.9 µs
/// at this bound, with 9–41 % more records/s (BENCHMARKS.md, session 16).
pub(crate) const REQUEST_BATCHES_BYTES: usize = 1 << 20;

/// How often queued records are checked against their deadlines while their partition cannot
/// send (no leader, no connection, backing off).
const EXPIRY_SCAN: Duration = Duration::from_millis(100);
/// Hand-overs from the shard taken into one turn beyond the one that woke it.
const MAX_HANDOVERS_PER_TURN: usize = 64;

/// A topic's partition, as requests name it.
type PartRef = (Arc<str>, i32);

/// A record on its way, with what its outcome needs.
pub(crate) struct Item {
    req: ProduceRequest,
    /// False for dead-letter copies: their outcome is not the publisher's business.
    report: bool,
    /// When the record fails if Kafka has not acknowledged it.
    deadline: Instant,
    enqueued: Instant,
    /// `req.record.size()`, worked out once.
    size: usize,
    /// Nobody waits for it (see [`lingers`]): it may wait `linger_ms` for more even when its
    /// broker has nothing in flight.
    lingers: bool,
}

impl Item {
    fn new(req: ProduceRequest, report: bool, deadline: Instant, enqueued: Instant) -> Item {
        let size = req.record.size();
        let lingers = lingers(&req.record);
        Item { req, report, deadline, enqueued, size, lingers }
    }
}

/// Whether nobody waits for `record`: a QoS 0 MQTT message's, not a cluster claim's. Such a
/// record waits up to `linger_ms` for others even to an idle broker, like librdkafka's; a
/// QoS 1/2 record (its publisher's acknowledgement waits) or a claim (a CONNACK, a lease) goes
/// at once. Sending every record as soon as the broker was idle made requests small: at
/// 1 KiB QoS 0 Kafka (tansu) spent 4.5 µs of CPU per record on them against 3.5 µs with the
/// linger (BENCHMARKS.md, session 15).
fn lingers(record: &KafkaRecord) -> bool {
    // A claim carries its header (a will's claim is the will itself, on the will's topic).
    record.source().is_some_and(|m| m.qos == 0)
        && !record.headers().iter().any(|(k, _)| k == sluice_core::cluster::CLAIM_HEADER)
}

/// What the tasks this loop starts report back.
pub(crate) enum Event {
    Metadata {
        cluster: u16,
        topic: Arc<str>,
        leaders: Result<Vec<i32>, ProduceError>,
    },
    Connected {
        cluster: u16,
        broker: i32,
        link: Result<Option<BrokerLink>, ClientError>,
    },
    Produced {
        cluster: u16,
        broker: i32,
        parts: Vec<PartRef>,
        result: Result<ProduceAcks, ClientError>,
    },
    /// A schema registry fetch answered.
    Schema {
        need: Need,
        result: Result<Fetched, RegistryError>,
    },
}

/// One partition's records: the batch in flight (if any) first, then the records waiting.
///
/// The batch in flight is the first `sent` records of `records` rather than a vector of its
/// own: a record is moved once, into the queue, and out of it with its answer (moving each
/// 160-byte `Item` from the queue into a batch was a share of the Kafka thread's memmove, 20 %
/// of its samples at 100 B QoS 0).
///
/// Invariants: `sent > 0` exactly while a batch of this partition is in flight (a retry sends
/// the same records again); `queued_bytes` is the size of the records after the first `sent`,
/// `urgent` the number of them that do not linger.
#[derive(Default)]
struct PartitionQueue {
    leader: i32,
    records: VecDeque<Item>,
    queued_bytes: usize,
    sent: usize,
    /// Back-off after a failed attempt: nothing is sent before this.
    retry_at: Option<Instant>,
    /// Attempts of the head batch so far (reported with its results).
    attempts: u32,
    /// Records still to be sent one per batch, after a batch refused as too large.
    solo: usize,
    /// Waiting records (after the first `sent`) that do not linger: the partition is due as
    /// soon as its broker is idle.
    urgent: usize,
    /// In the producer's `active` list.
    listed: bool,
}

impl PartitionQueue {
    fn in_flight(&self) -> bool {
        self.sent > 0
    }

    /// Records that wait, not in flight.
    fn has_queued(&self) -> bool {
        self.records.len() > self.sent
    }

    /// The first record that waits.
    fn first_queued(&self) -> Option<&Item> {
        self.records.get(self.sent)
    }

    fn push(&mut self, item: Item) {
        self.queued_bytes += item.size;
        self.urgent += usize::from(!item.lingers);
        self.records.push_back(item);
    }

    /// Makes the records at the head, up to `batch_bytes` (at least one; one only while `solo`),
    /// the batch in flight; returns their bytes. Nothing may be in flight.
    fn take_batch(&mut self, batch_bytes: usize) -> usize {
        debug_assert_eq!(self.sent, 0, "a partition has one batch in flight at most");
        let mut bytes = 0usize;
        for i in &self.records {
            if self.sent > 0 && (bytes + i.size > batch_bytes || self.solo > 0) {
                break;
            }
            bytes += i.size;
            self.urgent -= usize::from(!i.lingers);
            self.sent += 1;
        }
        self.queued_bytes -= bytes;
        bytes
    }

    /// About what [`PartitionQueue::take_batch`] would take now: its bytes.
    fn next_batch_bytes(&self, batch_bytes: usize) -> usize {
        let first = self.first_queued().map_or(0, |i| i.size);
        if self.solo > 0 {
            first
        } else {
            self.queued_bytes.min(batch_bytes).max(first)
        }
    }

    /// The records of the batch in flight.
    fn sent_records(&self) -> impl Iterator<Item = &KafkaRecord> {
        self.records.range(..self.sent).map(|i| &i.req.record)
    }

    /// Takes the batch in flight out of the queue (answered, failed or to be retried).
    fn take_sent(&mut self) -> std::collections::vec_deque::Drain<'_, Item> {
        let n = std::mem::take(&mut self.sent);
        self.records.drain(..n)
    }

    /// The batch in flight waits again at the head of the queue, in order.
    fn requeue_sent(&mut self) {
        let n = std::mem::take(&mut self.sent);
        self.queued_bytes += self.records.range(..n).map(|i| i.size).sum::<usize>();
        self.urgent += self.records.range(..n).filter(|i| !i.lingers).count();
    }

    /// Records `records` (taken with [`PartitionQueue::take_sent`]) go back to the head of the
    /// queue, in order. Nothing may be in flight.
    fn requeue(&mut self, records: Vec<Item>) {
        debug_assert_eq!(self.sent, 0);
        for i in records.into_iter().rev() {
            self.queued_bytes += i.size;
            self.urgent += usize::from(!i.lingers);
            self.records.push_front(i);
        }
    }

    /// Takes out the waiting records (not the batch in flight) whose deadline is `now` or
    /// earlier, keeping the others in order.
    fn take_expired(&mut self, now: Instant, expired: &mut Vec<Item>) {
        let mut kept = VecDeque::with_capacity(self.records.len());
        for (n, i) in self.records.drain(..).enumerate() {
            if n >= self.sent && i.deadline <= now {
                self.queued_bytes -= i.size;
                self.urgent -= usize::from(!i.lingers);
                expired.push(i);
            } else {
                kept.push_back(i);
            }
        }
        self.records = kept;
    }
}

struct TopicState {
    /// None until the first metadata answer.
    parts: Option<Vec<PartitionQueue>>,
    /// Records that came before the first metadata answer, in order.
    waiting: Vec<Item>,
    fetching: bool,
    fetched: Instant,
    /// Keyless records stick to one partition per topic for a batch's worth, then move on
    /// (Kafka's sticky partitioner): big batches without a hot partition.
    sticky: (i32, usize),
}

#[derive(Default)]
struct BrokerState {
    link: Option<BrokerLink>,
    connecting: bool,
    in_flight: usize,
    /// Quota throttling or back-off after a connection failure.
    hold_until: Option<Instant>,
    failures: u32,
}

impl BrokerState {
    /// Whether no request can go to this broker before an event or the end of its hold: it is
    /// held (throttled, backing off), its window of `max_in_flight` requests is full (an answer
    /// frees it), or its connection is being made. `send` refuses such a broker, and
    /// `next_wake` sets no wake-up for its partitions (their hold's end is a wake-up of its own).
    fn blocked(&self, max_in_flight: usize, now: Instant) -> bool {
        self.hold_until.is_some_and(|h| h > now)
            || self.in_flight >= max_in_flight
            || (self.link.is_none() && self.connecting)
    }
}

struct ClusterState {
    cluster: Arc<Cluster>,
    topics: HashMap<Arc<str>, TopicState>,
    brokers: HashMap<i32, BrokerState>,
}

pub(crate) struct Producer {
    shard: usize,
    clusters: Vec<ClusterState>,
    /// Partitions with queued records: (cluster, topic, partition).
    active: Vec<(u16, Arc<str>, i32)>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    requests: mpsc::Receiver<Vec<ProduceRequest>>,
    results: mpsc::UnboundedSender<Vec<ProduceResult>>,
    /// Results gathered in this turn, sent as one batch.
    out: Vec<ProduceResult>,
    /// Dead-letter copies to place next.
    dead_letters: VecDeque<ProduceRequest>,
    last_expiry_scan: Instant,
    encoder: BatchEncoder,
    /// Where a request's batches are encoded; each batch is split off as its own `Bytes`.
    buf: BytesMut,
    /// Payload schemas: records of mappings with a schema are checked (or encoded) here first.
    stage: Option<Stage>,
    /// Dead-lettered records are counted there, per mapping.
    health: Arc<crate::health::KafkaHealth>,
}

impl Producer {
    pub(crate) fn new(
        shard: usize,
        clusters: Vec<Arc<Cluster>>,
        requests: mpsc::Receiver<Vec<ProduceRequest>>,
        results: mpsc::UnboundedSender<Vec<ProduceResult>>,
        stage: Option<Stage>,
        health: Arc<crate::health::KafkaHealth>,
    ) -> Producer {
        let (events_tx, events) = mpsc::unbounded_channel();
        Producer {
            shard,
            clusters: clusters
                .into_iter()
                .map(|cluster| ClusterState { cluster, topics: HashMap::default(), brokers: HashMap::default() })
                .collect(),
            active: Vec::new(),
            events_tx,
            events,
            requests,
            results,
            out: Vec::new(),
            dead_letters: VecDeque::new(),
            last_expiry_scan: Instant::now(),
            encoder: BatchEncoder::new(),
            buf: BytesMut::new(),
            stage,
            health,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut open = true;
        loop {
            let wake = self.next_wake();
            tokio::select! {
                biased;
                Some(ev) = self.events.recv() => {
                    self.on_event(ev);
                    // Take every event that is ready before sending anything.
                    while let Ok(ev) = self.events.try_recv() {
                        self.on_event(ev);
                    }
                }
                batch = self.requests.recv(), if open => match batch {
                    Some(batch) => self.accept_handover(batch, Instant::now()),
                    None => open = false,
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            let now = Instant::now();
            if open {
                // Every hand-over already waiting goes into this turn's flush: a turn (a flush,
                // the next wake, clock reads) per hand-over of a few records, or a turn for
                // Kafka's answers and another for the records that came meanwhile, costs more
                // than the records. Bounded, so answers are not kept waiting behind a flood.
                for _ in 0..MAX_HANDOVERS_PER_TURN {
                    let Ok(batch) = self.requests.try_recv() else { break };
                    self.accept_handover(batch, now);
                }
            }
            while let Some(req) = self.dead_letters.pop_front() {
                // Dead-letter copies take the same path, under their own cluster's limits.
                self.accept(req, false, now);
            }
            if now.duration_since(self.last_expiry_scan) >= EXPIRY_SCAN {
                self.last_expiry_scan = now;
                self.expire(now);
            }
            if let Some(stage) = &self.stage {
                // Subjects whose latest version is due for a refresh (the cached one serves).
                for need in stage.refreshes() {
                    let events = self.events_tx.clone();
                    spawn_fetch(stage.schemas(), need, move |need, result| {
                        let _ = events.send(Event::Schema { need, result });
                    });
                }
            }
            self.flush(now);
            if !self.out.is_empty() {
                // The next turn's results are likely about as many: room for them, so the vector
                // does not regrow by doubling (copying every result) each turn.
                let room = self.out.len();
                if self.results.send(std::mem::replace(&mut self.out, Vec::with_capacity(room))).is_err() {
                    return;
                }
            }
            if !open && self.active.is_empty() && self.nothing_in_flight() {
                return;
            }
        }
    }

    fn nothing_in_flight(&self) -> bool {
        self.clusters.iter().all(|c| c.brokers.values().all(|b| b.in_flight == 0))
            && self.clusters.iter().all(|c| c.topics.values().all(|t| t.waiting.is_empty()))
            && self.stage.as_ref().is_none_or(|s| s.parked() == 0)
    }

    /// A record from the shard (`report`), or a dead-letter copy of one (its outcome is nobody's
    /// business). A record of a mapping with a schema is checked first.
    /// One hand-over from the shard: its records, in order, each reported back.
    fn accept_handover(&mut self, batch: Vec<ProduceRequest>, now: Instant) {
        for req in batch {
            self.accept(req, true, now);
        }
    }

    fn accept(&mut self, req: ProduceRequest, report: bool, now: Instant) {
        let checked = match &mut self.stage {
            Some(stage) if report && stage.checks(&req.record) => {
                let (events, schemas) = (self.events_tx.clone(), stage.schemas());
                let mut fetch = |need| {
                    let events = events.clone();
                    spawn_fetch(schemas.clone(), need, move |need, result| {
                        let _ = events.send(Event::Schema { need, result });
                    });
                };
                stage.check(req, &mut fetch)
            }
            // Straight on: not wrapped in a `Checked` only to be unwrapped (a move per record).
            _ => return self.accept_checked(req, report, now),
        };
        self.after_check(checked, report, now);
    }

    fn after_check(&mut self, checked: Checked, report: bool, now: Instant) {
        match checked {
            Checked::Go(req) => self.accept_checked(req, report, now),
            Checked::Parked => {}
            Checked::Done(id, e, copy) => {
                if let Some(copy) = copy {
                    self.dead_letters.push_back(copy);
                }
                self.out.push(ProduceResult::failed(id, e));
            }
        }
    }

    fn on_schema(&mut self, need: Need, result: Result<Fetched, RegistryError>) {
        let Some(stage) = &mut self.stage else { return };
        let (events, schemas) = (self.events_tx.clone(), stage.schemas());
        let mut fetch = |need| {
            let events = events.clone();
            spawn_fetch(schemas.clone(), need, move |need, result| {
                let _ = events.send(Event::Schema { need, result });
            });
        };
        let outcomes = stage.on_fetched(need, result, &mut fetch);
        let now = Instant::now();
        for c in outcomes {
            self.after_check(c, true, now);
        }
    }

    fn accept_checked(&mut self, req: ProduceRequest, report: bool, now: Instant) {
        let Some(c) = self.clusters.get(usize::from(req.record.cluster)) else {
            if report {
                self.out.push(ProduceResult::failed(req.id, ProduceError::Other("unknown cluster".into())));
            }
            return;
        };
        // A durable record is safe in the spill log and its publisher was answered: it is
        // retried until Kafka takes it (a year stands in for "no deadline").
        let timeout = if req.durable { Duration::from_secs(365 * 24 * 3600) } else { c.cluster.delivery_timeout() };
        let item = Item::new(req, report, now + timeout, now);
        if item.size > c.cluster.config().max_record_bytes {
            self.fail(item, ProduceError::TooLarge);
            return;
        }
        self.place(item, now);
    }

    /// Puts a record on its partition's queue, or with its topic's records waiting for metadata.
    fn place(&mut self, item: Item, now: Instant) {
        let cluster = item.req.record.cluster;
        let Some(c) = self.clusters.get_mut(usize::from(cluster)) else { return };
        let batch_bytes = c.cluster.config().batch_bytes;
        let max_age = Duration::from_millis(c.cluster.config().metadata_max_age_ms);
        let topic = match c.topics.get_mut(&*item.req.record.topic) {
            Some(t) => t,
            // A new topic: its name is cloned once, not per record.
            None => c.topics.entry(item.req.record.topic.clone()).or_insert(TopicState {
                parts: None,
                waiting: Vec::new(),
                fetching: false,
                fetched: now,
                sticky: (self.shard as i32, 0),
            }),
        };
        let Some(parts) = topic.parts.as_mut() else {
            let name = item.req.record.topic.clone();
            topic.waiting.push(item);
            if !topic.fetching {
                topic.fetching = true;
                let deadline = topic.waiting.iter().map(|i| i.deadline).min().unwrap_or_else(Instant::now);
                spawn_metadata(&self.events_tx, c.cluster.clone(), cluster, name, deadline);
            }
            return;
        };
        if now.duration_since(topic.fetched) >= max_age && !topic.fetching {
            // Refreshed in the background; the cached leaders serve meanwhile.
            topic.fetching = true;
            let deadline = now + c.cluster.request_timeout();
            spawn_metadata(&self.events_tx, c.cluster.clone(), cluster, item.req.record.topic.clone(), deadline);
        }
        let n = parts.len() as i32;
        let partition = match (item.req.record.key(), item.req.record.partition()) {
            (_, Some(p)) if (0..n).contains(&p) => p,
            (_, Some(p)) => {
                let e = ProduceError::Other(format!("partition {p} does not exist ({n} partitions)"));
                self.fail(item, e);
                return;
            }
            (Some(k), None) => partition_for_key(k, n),
            (None, None) => {
                let s = &mut topic.sticky;
                s.0 %= n;
                s.1 += item.size;
                if s.1 >= batch_bytes {
                    *s = ((s.0 + 1) % n, 0);
                }
                s.0
            }
        };
        let q = &mut parts[partition as usize];
        q.push(item);
        if !q.listed {
            q.listed = true;
            let name = q.records.back().map(|i| i.req.record.topic.clone());
            if let Some(name) = name {
                self.active.push((cluster, name, partition));
            }
        }
    }

    fn fail(&mut self, item: Item, e: ProduceError) {
        if item.report {
            if let Some(record) = dead_letter_copy(&item.req.record, &e) {
                self.health.count_dead_letter(item.req.record.mapping);
                self.dead_letters.push_back(ProduceRequest { id: item.req.id, record, durable: false });
            }
            let latency_us = item.enqueued.elapsed().as_micros() as u64;
            // A record that timed out goes back to the shard, which may spill it.
            let timed_out = matches!(e, ProduceError::TimedOut).then(|| Box::new(item.req.record));
            self.out.push(ProduceResult {
                id: item.req.id,
                outcome: Err(e),
                attempts: 0,
                batch_records: 0,
                latency_us,
                timed_out,
                source: None,
            });
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Metadata { cluster, topic, leaders } => self.on_metadata(cluster, topic, leaders),
            Event::Connected { cluster, broker, link } => {
                let Some(c) = self.clusters.get_mut(usize::from(cluster)) else { return };
                let b = c.brokers.entry(broker).or_default();
                b.connecting = false;
                match link {
                    Ok(Some(link)) => {
                        b.link = Some(link);
                        b.failures = 0;
                        b.hold_until = None;
                    }
                    other => {
                        b.failures += 1;
                        let backoff = backoff(b.failures);
                        b.hold_until = Some(Instant::now() + backoff);
                        match other {
                            Err(e) => {
                                if b.failures == 1 || b.failures.is_multiple_of(10) {
                                    tracing::warn!(cluster = %c.cluster.name, broker, error = %e, attempts = b.failures,
                                        "cannot connect to Kafka broker; retrying");
                                }
                                if is_connection_error(&e) {
                                    let cl = c.cluster.clone();
                                    tokio::spawn(async move { cl.reset().await });
                                }
                            }
                            _ => {
                                tracing::debug!(cluster = %c.cluster.name, broker, "broker unknown to the client; refreshing metadata")
                            }
                        }
                        // The leaders may have moved: ask again.
                        self.refresh_topics_led_by(cluster, broker);
                    }
                }
            }
            Event::Produced { cluster, broker, parts, result } => self.on_produced(cluster, broker, parts, result),
            Event::Schema { need, result } => self.on_schema(need, result),
        }
    }

    fn on_metadata(&mut self, cluster: u16, topic: Arc<str>, leaders: Result<Vec<i32>, ProduceError>) {
        let Some(c) = self.clusters.get_mut(usize::from(cluster)) else { return };
        let Some(t) = c.topics.get_mut(&topic) else { return };
        t.fetching = false;
        match leaders {
            Ok(leaders) => {
                t.fetched = Instant::now();
                let parts = t.parts.get_or_insert_with(Vec::new);
                if leaders.len() > parts.len() {
                    parts.resize_with(leaders.len(), PartitionQueue::default);
                }
                for (q, l) in parts.iter_mut().zip(&leaders) {
                    q.leader = *l;
                }
                let waiting = std::mem::take(&mut t.waiting);
                let now = Instant::now();
                for item in waiting {
                    self.place(item, now);
                }
            }
            Err(e) => {
                if t.parts.is_some() {
                    // A stale map is better than failing while Kafka is briefly away; ask
                    // again in a second.
                    let max_age = Duration::from_millis(c.cluster.config().metadata_max_age_ms);
                    t.fetched =
                        Instant::now().checked_sub(max_age.saturating_sub(Duration::from_secs(1))).unwrap_or(t.fetched);
                    return;
                }
                let waiting = std::mem::take(&mut t.waiting);
                let retry_others = matches!(e, ProduceError::TimedOut);
                let now = Instant::now();
                let (expired, kept): (Vec<Item>, Vec<Item>) =
                    waiting.into_iter().partition(|i| !retry_others || i.deadline <= now);
                if kept.is_empty() {
                    c.topics.remove(&topic);
                } else {
                    // Durable records wait for the topic however long it takes.
                    t.waiting = kept;
                    t.fetching = true;
                    let deadline = t.waiting.iter().map(|i| i.deadline).min().unwrap_or(now);
                    spawn_metadata(&self.events_tx, c.cluster.clone(), cluster, topic, deadline);
                }
                for item in expired {
                    self.fail(item, e.clone());
                }
            }
        }
    }

    fn refresh_topics_led_by(&mut self, cluster: u16, broker: i32) {
        let Some(c) = self.clusters.get_mut(usize::from(cluster)) else { return };
        let deadline = Instant::now() + c.cluster.request_timeout();
        for (name, t) in c.topics.iter_mut() {
            let led = t.parts.as_ref().is_some_and(|p| p.iter().any(|q| q.leader == broker || q.leader < 0));
            if led && !t.fetching {
                t.fetching = true;
                spawn_metadata(&self.events_tx, c.cluster.clone(), cluster, name.clone(), deadline);
            }
        }
    }

    fn on_produced(
        &mut self,
        cluster: u16,
        broker: i32,
        parts: Vec<PartRef>,
        result: Result<ProduceAcks, ClientError>,
    ) {
        let now = Instant::now();
        let Some(c) = self.clusters.get_mut(usize::from(cluster)) else { return };
        let b = c.brokers.entry(broker).or_default();
        b.in_flight = b.in_flight.saturating_sub(1);
        let acks = match result {
            Ok(acks) => {
                if acks.throttle_ms > 0 {
                    b.hold_until = Some(now + Duration::from_millis(acks.throttle_ms as u64));
                }
                acks.partitions
            }
            Err(e) => {
                // The whole request failed: its connection is suspect, its partitions retry.
                if is_connection_error(&e) {
                    b.link = None;
                    let cl = c.cluster.clone();
                    tokio::spawn(async move { cl.reset().await });
                }
                let name = c.cluster.name.clone();
                for (topic, p) in &parts {
                    self.retry_partition(cluster, topic, *p, &e.to_string(), &name, now);
                }
                self.refresh_topics_led_by(cluster, broker);
                return;
            }
        };
        let name = c.cluster.name.clone();
        let mut refresh = false;
        for (topic, p) in parts {
            let ack = acks.iter().find(|a| a.partition == p && *a.topic == *topic);
            match ack.map(|a| a.error) {
                Some(None) => self.succeed(cluster, &topic, p),
                None => self.retry_partition(cluster, &topic, p, "no answer for the partition", &name, now),
                Some(Some(e)) => match classify_protocol(e) {
                    Some(ProduceError::TooLarge) => self.split_or_fail(cluster, &topic, p),
                    _ if retryable_protocol(e) => {
                        refresh = true;
                        self.retry_partition(cluster, &topic, p, &format!("{e:?}"), &name, now);
                    }
                    fatal => {
                        let err = fatal.unwrap_or_else(|| ProduceError::Other(format!("{e:?}")));
                        tracing::debug!(cluster = %name, %topic, partition = p, error = ?e, "Kafka refused a batch");
                        self.fail_sent(cluster, &topic, p, err);
                    }
                },
            }
        }
        if refresh {
            self.refresh_topics_led_by(cluster, broker);
        }
    }

    fn queue(&mut self, cluster: u16, topic: &str, p: i32) -> Option<&mut PartitionQueue> {
        queue_of(&mut self.clusters, cluster, topic, p)
    }

    fn succeed(&mut self, cluster: u16, topic: &str, p: i32) {
        let Some(q) = queue_of(&mut self.clusters, cluster, topic, p) else { return };
        q.retry_at = None;
        let attempts = std::mem::take(&mut q.attempts);
        q.solo = q.solo.saturating_sub(q.sent);
        let n = q.sent as u32;
        let now = Instant::now();
        // Read in place and dropped in place: moving each 160-byte `Item` out of the queue to
        // read it was 0.9 % of the Kafka thread's samples at 100 B QoS 0.
        let sent = q.sent;
        for i in q.records.range_mut(..sent) {
            if i.report {
                self.out.push(ProduceResult {
                    id: i.req.id,
                    outcome: Ok(()),
                    attempts,
                    batch_records: n,
                    latency_us: now.saturating_duration_since(i.enqueued).as_micros() as u64,
                    timed_out: None,
                    // The message goes back to its shard to be freed there.
                    source: i.req.record.take_source(),
                });
            }
        }
        drop(q.take_sent());
    }

    fn fail_sent(&mut self, cluster: u16, topic: &str, p: i32, e: ProduceError) {
        let Some(q) = self.queue(cluster, topic, p) else { return };
        q.retry_at = None;
        q.attempts = 0;
        q.solo = q.solo.saturating_sub(q.sent);
        let sent: Vec<Item> = q.take_sent().collect();
        for i in sent {
            self.fail(i, e.clone());
        }
    }

    /// A batch refused as too large: its records go again one per batch, so only the ones that
    /// really are too large fail.
    fn split_or_fail(&mut self, cluster: u16, topic: &str, p: i32) {
        let Some(q) = self.queue(cluster, topic, p) else { return };
        if q.sent <= 1 {
            self.fail_sent(cluster, topic, p, ProduceError::TooLarge);
            return;
        }
        q.solo = q.sent;
        q.requeue_sent();
    }

    /// Puts a failed batch back at the head of its queue, to go again after a back-off; records
    /// whose deadline has passed fail as timed out.
    fn retry_partition(&mut self, cluster: u16, topic: &str, p: i32, why: &str, cluster_name: &str, now: Instant) {
        let Some(q) = self.queue(cluster, topic, p) else { return };
        let attempt = q.attempts;
        if attempt == 1 || attempt.is_multiple_of(10) {
            tracing::warn!(cluster = %cluster_name, %topic, partition = p, attempt, error = %why,
                "produce failed; retrying until the delivery time-out");
        }
        let wait = backoff(attempt);
        q.retry_at = Some(now + wait);
        let (expired, kept): (Vec<Item>, Vec<Item>) = q.take_sent().partition(|i| i.deadline <= now + wait);
        q.requeue(kept);
        if q.records.is_empty() {
            q.attempts = 0;
            q.retry_at = None;
        }
        for i in expired {
            self.fail(i, ProduceError::TimedOut);
        }
    }

    /// Fails queued records whose deadline has passed on partitions that cannot send now.
    fn expire(&mut self, now: Instant) {
        let mut expired = Vec::new();
        for c in &mut self.clusters {
            for t in c.topics.values_mut() {
                let Some(parts) = t.parts.as_mut() else { continue };
                for q in parts.iter_mut().filter(|q| q.has_queued()) {
                    let blocked = q.leader < 0
                        || q.retry_at.is_some_and(|r| r > now)
                        || c.brokers.get(&q.leader).is_none_or(|b| b.link.is_none());
                    if !blocked && q.first_queued().is_none_or(|i| i.deadline > now) {
                        continue;
                    }
                    q.take_expired(now, &mut expired);
                }
            }
        }
        for i in expired {
            self.fail(i, ProduceError::TimedOut);
        }
    }

    /// When the loop must wake up without an event: the earliest linger end or back-off end.
    ///
    /// A partition that only an event or its broker's hold can let go — its broker is
    /// [`BrokerState::blocked`], its leader is unknown (metadata) — sets no wake-up:
    /// its linger long over, it woke the loop at once, every turn, while the broker's requests
    /// were out (measured: at 1 KiB QoS 0, 8 partitions each filling a request and 5 requests in
    /// flight, the Kafka thread spun on the 3 partitions left).
    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut wake = now + EXPIRY_SCAN;
        for (cluster, topic, p) in &self.active {
            let Some(c) = self.clusters.get(usize::from(*cluster)) else { continue };
            let linger = Duration::from_millis(c.cluster.config().linger_ms);
            let Some(q) = c.topics.get(&**topic).and_then(|t| t.parts.as_ref()).and_then(|p2| p2.get(*p as usize))
            else {
                continue;
            };
            if q.in_flight() || !q.has_queued() || q.leader < 0 {
                continue;
            }
            let max_in_flight = c.cluster.config().max_requests_in_flight.max(1);
            if c.brokers.get(&q.leader).is_some_and(|b| b.blocked(max_in_flight, now)) {
                continue;
            }
            if let Some(r) = q.retry_at {
                wake = wake.min(r);
            } else if let Some(first) = q.first_queued() {
                wake = wake.min(first.enqueued + linger);
            }
        }
        for c in &self.clusters {
            for b in c.brokers.values() {
                if let Some(h) = b.hold_until {
                    if h > now {
                        wake = wake.min(h);
                    }
                }
            }
        }
        wake
    }

    /// Sends, per broker, requests with a batch of every partition of it that is ready (its
    /// linger is over or its batch is full, nothing of it is in flight, it is not backing off),
    /// as many as its window allows.
    ///
    /// Partitions just sent move to the back of `active`, so the ones that waited come first
    /// when the window has room again: with full batches going one per request, a
    /// fixed order would give every free slot to the same few partitions of a busy broker.
    fn flush(&mut self, now: Instant) {
        // (cluster, broker) → ready partitions, in `active`'s order.
        let mut ready: Vec<((u16, i32), Vec<PartRef>)> = Vec::new();
        let mut still_active = Vec::with_capacity(self.active.len());
        for (cluster, topic, p) in std::mem::take(&mut self.active) {
            let Some(c) = self.clusters.get_mut(usize::from(cluster)) else { continue };
            let cfg = c.cluster.config();
            let linger = Duration::from_millis(cfg.linger_ms);
            let batch_bytes = cfg.batch_bytes;
            let Some(q) =
                c.topics.get_mut(&*topic).and_then(|t| t.parts.as_mut()).and_then(|ps| ps.get_mut(p as usize))
            else {
                continue;
            };
            if !q.has_queued() && !q.in_flight() {
                q.listed = false;
                continue;
            }
            // A broker with nothing in flight gets the records at once; while a request is out,
            // records gather for up to `linger_ms` (Nagle's rule per broker): a lone QoS 1
            // publish waits for one round trip, not for the linger, and a busy broker still gets
            // full batches.
            let broker_idle = c.brokers.get(&q.leader).is_none_or(|b| b.in_flight == 0);
            let due = (broker_idle && q.urgent > 0)
                || q.queued_bytes >= batch_bytes
                || q.solo > 0
                || q.retry_at.is_some()
                || q.first_queued().is_some_and(|i| i.enqueued + linger <= now);
            let sendable = !q.in_flight() && q.has_queued() && q.retry_at.is_none_or(|r| r <= now) && q.leader >= 0;
            if due && sendable {
                let key = (cluster, q.leader);
                match ready.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.push((topic.clone(), p)),
                    None => ready.push((key, vec![(topic.clone(), p)])),
                }
            }
            still_active.push((cluster, topic, p));
        }
        self.active = still_active;
        let mut sent = false;
        for ((cluster, broker), parts) in ready {
            let mut parts = VecDeque::from(parts);
            // As many requests as the broker's window allows; what is left goes next turn.
            while !parts.is_empty() && self.send(cluster, broker, &mut parts, now) {
                sent = true;
            }
        }
        if sent {
            self.in_flight_to_the_back();
        }
    }

    /// Moves the partitions with a batch in flight behind the others in `active`, each part in
    /// its order.
    fn in_flight_to_the_back(&mut self) {
        let clusters = &self.clusters;
        let (mut waiting, out): (Vec<_>, Vec<_>) = self
            .active
            .drain(..)
            .partition(|(c, t, p)| !queue_ref(clusters, *c, t, *p).is_some_and(PartitionQueue::in_flight));
        waiting.extend(out);
        self.active = waiting;
    }

    /// Sends one request to `broker` with the batches of `parts` from the front, up to
    /// [`REQUEST_BATCHES_BYTES`], taking them out of `parts`. Returns whether a request went.
    fn send(&mut self, cluster: u16, broker: i32, parts: &mut VecDeque<PartRef>, now: Instant) -> bool {
        let Some(c) = self.clusters.get_mut(usize::from(cluster)) else { return false };
        let max_in_flight = c.cluster.config().max_requests_in_flight.max(1);
        let b = c.brokers.entry(broker).or_default();
        if b.blocked(max_in_flight, now) {
            return false;
        }
        let Some(link) = b.link.clone() else {
            // Not connecting (`blocked` above): start it.
            b.connecting = true;
            let (tx, cl) = (self.events_tx.clone(), c.cluster.clone());
            tokio::spawn(async move {
                let link = match cl.client().await {
                    Ok(client) => {
                        match tokio::time::timeout(cl.request_timeout(), client.connect_broker(broker)).await {
                            Ok(r) => r,
                            Err(_) => Err(ClientError::Timeout),
                        }
                    }
                    Err(e) => Err(e),
                };
                let _ = tx.send(Event::Connected { cluster, broker, link });
            });
            return false;
        };
        b.in_flight += 1;
        let batch_bytes = c.cluster.config().batch_bytes;
        let compression = c.cluster.config().compression;
        let timeout = c.cluster.request_timeout();
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let mut topics: Vec<TopicBatches> = Vec::new();
        let mut sent_parts = Vec::with_capacity(parts.len());
        let mut request_bytes = 0usize;
        let (mut records, mut encoded_bytes) = (0u64, 0u64);
        let mut unencodable = Vec::new();
        while let Some((topic, p)) = parts.pop_front() {
            let Some(q) =
                c.topics.get_mut(&*topic).and_then(|t| t.parts.as_mut()).and_then(|ps| ps.get_mut(p as usize))
            else {
                continue;
            };
            if !fits(request_bytes, q.next_batch_bytes(batch_bytes)) {
                // For the next request.
                parts.push_front((topic, p));
                break;
            }
            if q.in_flight() || !q.has_queued() {
                continue;
            }
            // Take records up to a full batch (at least one; one only after a too-large batch).
            let bytes = q.take_batch(batch_bytes);
            if compression == Compression::None {
                // Room for the whole batch: `split` below leaves the buffer only what the last
                // batch did not use, and growing it mid-batch copies what is written so far.
                self.buf.reserve(crate::batch::size_hint(q.sent, bytes));
            }
            if let Err(e) = self.encoder.encode(q.sent_records(), compression, ProducerIds::NONE, &mut self.buf) {
                // A record no Kafka batch can hold (a field past 2 GiB, a timestamp out of range).
                tracing::warn!(cluster = %c.cluster.name, %topic, partition = p, error = %e, "cannot encode a record batch");
                unencodable.extend(q.take_sent().map(|i| (i, e.to_string())));
                continue;
            }
            // `split` keeps the buffer's spare capacity for the next batch.
            let encoded: Bytes = self.buf.split().freeze();
            records += q.sent as u64;
            encoded_bytes += encoded.len() as u64;
            q.retry_at = None;
            q.attempts += 1;
            request_bytes += bytes;
            match topics.iter_mut().find(|t| *t.topic == *topic) {
                Some(t) => t.partitions.push((p, encoded)),
                None => topics.push(TopicBatches { topic: topic.to_string(), partitions: vec![(p, encoded)] }),
            }
            sent_parts.push((topic, p));
        }
        for (i, why) in unencodable {
            self.fail(i, ProduceError::Other(why));
        }
        let Some(b) = self.clusters.get_mut(usize::from(cluster)).and_then(|c| c.brokers.get_mut(&broker)) else {
            return false;
        };
        if sent_parts.is_empty() {
            b.in_flight -= 1;
            return false;
        }
        if let Some(counters) = self.health.produce_counters(self.shard, usize::from(cluster)) {
            counters.count(sent_parts.len() as u64, records, encoded_bytes);
        }
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let result = match tokio::time::timeout(timeout, link.produce(-1, timeout_ms, topics)).await {
                Ok(r) => r,
                Err(_) => Err(ClientError::Timeout),
            };
            let _ = tx.send(Event::Produced { cluster, broker, parts: sent_parts, result });
        });
        true
    }
}

/// Whether a batch of about `batch` bytes joins a request that carries `request_bytes` so far:
/// up to [`REQUEST_BATCHES_BYTES`], and always as a request's first.
fn fits(request_bytes: usize, batch: usize) -> bool {
    request_bytes == 0 || request_bytes + batch <= REQUEST_BATCHES_BYTES
}

fn queue_ref<'a>(clusters: &'a [ClusterState], cluster: u16, topic: &str, p: i32) -> Option<&'a PartitionQueue> {
    clusters.get(usize::from(cluster))?.topics.get(topic)?.parts.as_ref()?.get(usize::try_from(p).ok()?)
}

fn queue_of<'a>(clusters: &'a mut [ClusterState], cluster: u16, topic: &str, p: i32) -> Option<&'a mut PartitionQueue> {
    clusters.get_mut(usize::from(cluster))?.topics.get_mut(topic)?.parts.as_mut()?.get_mut(usize::try_from(p).ok()?)
}

/// 50 ms doubling to [`RETRY_BACKOFF_MAX`].
fn backoff(attempt: u32) -> Duration {
    let ms = 50u64.saturating_mul(1 << attempt.saturating_sub(1).min(10));
    Duration::from_millis(ms).min(RETRY_BACKOFF_MAX)
}

fn spawn_metadata(
    tx: &mpsc::UnboundedSender<Event>,
    cl: Arc<Cluster>,
    cluster: u16,
    topic: Arc<str>,
    deadline: Instant,
) {
    let tx = tx.clone();
    tokio::spawn(async move {
        let leaders = cl.leaders(&topic, deadline).await;
        if let Err(e) = &leaders {
            tracing::debug!(cluster = %cl.name, %topic, error = %e, "no partition leaders for the topic");
        }
        let _ = tx.send(Event::Metadata { cluster, topic, leaders });
    });
}

#[cfg(test)]
mod queue_tests {
    //! The partition queue's batch in flight (the head of its records) and what the producer
    //! hands back with each answer, without a Kafka: records are placed through `accept`, a
    //! batch is taken as `send` takes it, and the answers are applied as `on_produced` does.

    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use sluice_core::bridge::{KafkaRecord, ProduceError, ProduceRequest, ProduceResult, RecordKey};
    use sluice_core::config::ClusterConfig;
    use sluice_core::message::{Message, Msg};
    use tokio::sync::mpsc;

    use super::{PartitionQueue, Producer, TopicState};
    use crate::cluster::Cluster;

    const TOPIC: &str = "t";

    /// A producer of one cluster whose topic `t` has one partition led by broker 0.
    fn producer() -> Producer {
        let cfg = ClusterConfig { delivery_timeout_ms: 1_000, ..ClusterConfig::default() };
        let cluster = Arc::new(Cluster::new("k".into(), cfg, None));
        let (_, requests) = mpsc::channel(1);
        let (results, _) = mpsc::unbounded_channel();
        let health = Arc::new(crate::health::KafkaHealth::new(&["k".into()], &[true], &[], 1));
        let mut p = Producer::new(0, vec![cluster], requests, results, None, health);
        let topic = TopicState {
            parts: Some(vec![PartitionQueue::default()]),
            waiting: Vec::new(),
            fetching: false,
            fetched: Instant::now(),
            sticky: (0, 0),
        };
        p.clusters[0].topics.insert(TOPIC.into(), topic);
        p
    }

    fn msg(n: usize) -> Msg {
        Arc::new(Message {
            topic: format!("perf/{n}"),
            payload: Bytes::from(vec![b'x'; 10]),
            qos: 1,
            retain: false,
            properties: None,
            expiry_at_ms: None,
            origin: "c1".into(),
        })
    }

    /// Places records `ids` (each routed from its own message), returning the messages.
    fn place(p: &mut Producer, ids: std::ops::Range<u64>, now: Instant) -> Vec<Msg> {
        ids.map(|id| {
            let m = msg(id as usize);
            let record =
                KafkaRecord::new(0, TOPIC.into(), m.payload.clone(), 0).with_source(m.clone(), RecordKey::None, true);
            p.accept(ProduceRequest { id, record, durable: false }, true, now);
            m
        })
        .collect()
    }

    fn queue(p: &mut Producer) -> &mut PartitionQueue {
        p.queue(0, TOPIC, 0).expect("partition 0")
    }

    fn ids(q: &PartitionQueue) -> Vec<u64> {
        q.records.iter().map(|i| i.req.id).collect()
    }

    fn results(p: &mut Producer) -> Vec<ProduceResult> {
        std::mem::take(&mut p.out)
    }

    /// Places record `id`, routed from a message on `topic` at `qos` (a cluster claim's when
    /// `claim`).
    fn place_one(p: &mut Producer, id: u64, topic: &str, qos: u8, claim: bool, now: Instant) {
        let m = Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"x"),
            qos,
            retain: false,
            properties: None,
            expiry_at_ms: None,
            origin: "c1".into(),
        });
        let mut record = KafkaRecord::new(0, TOPIC.into(), m.payload.clone(), 0).with_source(m, RecordKey::None, true);
        if claim {
            record.push_header(sluice_core::cluster::CLAIM_HEADER, Bytes::from_static(b"{}"));
        }
        p.accept(ProduceRequest { id, record, durable: false }, true, now);
    }

    #[test]
    fn partitions_just_sent_go_behind_those_that_waited() {
        let mut p = producer();
        let parts = p.clusters[0].topics.get_mut(TOPIC).and_then(|t| t.parts.as_mut()).unwrap();
        parts.extend((0..3).map(|_| PartitionQueue::default()));
        p.active = (0..4).map(|i| (0, Arc::<str>::from(TOPIC), i)).collect();
        for i in [0, 2] {
            // A batch of one record in flight (the count is what tells).
            p.queue(0, TOPIC, i).unwrap().sent = 1;
        }
        let order = |p: &Producer| p.active.iter().map(|e| e.2).collect::<Vec<_>>();
        p.in_flight_to_the_back();
        assert_eq!(order(&p), [1, 3, 0, 2], "those waiting first, each part in its order");
        p.in_flight_to_the_back();
        assert_eq!(order(&p), [1, 3, 0, 2], "stable");
    }

    #[test]
    fn a_request_carries_batches_up_to_its_bound_and_a_larger_batch_alone() {
        use super::{fits, REQUEST_BATCHES_BYTES as MAX};
        // Ready partitions' batches, in order, split into requests as `send` splits them.
        let split = |batches: &[usize]| {
            let mut requests: Vec<Vec<usize>> = Vec::new();
            let mut bytes = 0;
            for &b in batches {
                if requests.is_empty() || !fits(bytes, b) {
                    requests.push(Vec::new());
                    bytes = 0;
                }
                requests.last_mut().unwrap().push(b);
                bytes += b;
            }
            requests
        };
        let (big, half, third) = (MAX * 2, MAX / 2, MAX / 3);
        assert_eq!(split(&[half, half, third]), vec![vec![half, half], vec![third]]);
        assert_eq!(split(&[third, big, 1]), vec![vec![third], vec![big], vec![1]], "a larger batch goes alone");
        assert_eq!(split(&[1; 4]), vec![vec![1; 4]], "small batches share one request");
    }

    #[test]
    fn only_records_somebody_waits_for_make_a_partition_due_when_its_broker_is_idle() {
        let mut p = producer();
        let now = Instant::now();
        place_one(&mut p, 0, "perf/0", 0, false, now);
        place_one(&mut p, 1, "perf/1", 0, false, now);
        assert_eq!(queue(&mut p).urgent, 0, "QoS 0 messages' records linger");
        place_one(&mut p, 2, "perf/2", 1, false, now);
        place_one(&mut p, 3, "will/of/c1", 0, true, now);
        let q = queue(&mut p);
        assert_eq!((q.records.len(), q.urgent), (4, 2), "a QoS 1 record and a claim (a QoS 0 will's) do not");
        q.take_batch(usize::MAX);
        assert_eq!(q.urgent, 0, "in flight is not waiting");
        q.requeue_sent();
        assert_eq!(q.urgent, 2, "back at the head");
        let mut expired = Vec::new();
        q.take_expired(now + Duration::from_secs(3600), &mut expired);
        assert_eq!((expired.len(), q.urgent), (4, 0));
    }

    #[test]
    fn a_batch_is_the_head_of_its_queue_up_to_batch_bytes_and_at_least_one_record() {
        let mut p = producer();
        let now = Instant::now();
        place(&mut p, 0..5, now);
        let q = queue(&mut p);
        let size = q.records[0].size;
        assert_eq!(q.queued_bytes, 5 * size);
        // What a request counts the next batch as, before taking it: never less than it takes.
        assert_eq!(q.next_batch_bytes(2 * size + size / 2), 2 * size + size / 2);
        assert_eq!(q.next_batch_bytes(usize::MAX), 5 * size);
        assert_eq!(q.next_batch_bytes(1), size, "a record larger than the batch goes whole");
        q.solo = 1;
        assert_eq!(q.next_batch_bytes(usize::MAX), size, "one record per batch after a too-large one");
        q.solo = 0;
        assert_eq!(q.take_batch(2 * size + size / 2), 2 * size);
        assert_eq!((q.sent, q.queued_bytes, q.first_queued().map(|i| i.req.id)), (2, 3 * size, Some(2)));
        assert!(q.in_flight() && q.has_queued());
        let sent: Vec<u64> = q.records.range(..q.sent).map(|i| i.req.id).collect();
        assert_eq!(sent, [0, 1]);
        assert_eq!(q.sent_records().count(), 2);
        // A record larger than the batch still goes, alone.
        q.requeue_sent();
        assert_eq!((q.sent, q.queued_bytes), (0, 5 * size));
        assert_eq!(q.take_batch(1), size);
        assert_eq!(q.sent, 1);
    }

    #[test]
    fn an_acknowledged_batch_answers_in_order_and_hands_each_message_back() {
        let mut p = producer();
        let now = Instant::now();
        let msgs = place(&mut p, 0..3, now);
        let q = queue(&mut p);
        q.take_batch(usize::MAX);
        q.attempts = 1; // as `send` counts it
        p.succeed(0, TOPIC, 0);
        let got = results(&mut p);
        assert_eq!(got.iter().map(|r| r.id).collect::<Vec<_>>(), [0, 1, 2]);
        for (r, m) in got.iter().zip(&msgs) {
            assert_eq!((r.outcome.clone(), r.batch_records, r.attempts), (Ok(()), 3, 1));
            let back = r.source.as_ref().expect("the message handed back");
            assert!(Arc::ptr_eq(back, m));
        }
        // The Kafka thread kept no reference: the shard's drop of the results frees the messages.
        drop(got);
        assert!(msgs.iter().all(|m| Arc::strong_count(m) == 1));
        let q = queue(&mut p);
        assert!(!q.in_flight() && !q.has_queued() && q.records.is_empty());
        assert_eq!(q.queued_bytes, 0);
    }

    #[test]
    fn a_failed_batch_waits_again_before_the_records_behind_it_and_expired_ones_time_out() {
        let mut p = producer();
        let early = Instant::now();
        place(&mut p, 0..2, early);
        let late = early + Duration::from_millis(900);
        place(&mut p, 2..4, late);
        let q = queue(&mut p);
        q.take_batch(usize::MAX);
        q.attempts = 1;
        // More records came while the batch was out.
        let msgs = place(&mut p, 4..5, late);
        // 950 ms after the first records: their deadline (1 s) passes within the 50 ms back-off.
        p.retry_partition(0, TOPIC, 0, "broken", "k", early + Duration::from_millis(950));
        let got = results(&mut p);
        assert_eq!(
            got.iter().map(|r| (r.id, r.outcome.clone())).collect::<Vec<_>>(),
            [(0, Err(ProduceError::TimedOut)), (1, Err(ProduceError::TimedOut))]
        );
        // A timed-out record goes back whole (the shard may spill it), not as its message.
        assert!(got.iter().all(|r| r.timed_out.is_some() && r.source.is_none()));
        let q = queue(&mut p);
        assert_eq!(ids(q), [2, 3, 4]);
        let size = q.records[0].size;
        assert_eq!((q.sent, q.queued_bytes), (0, 3 * size));
        assert!(q.retry_at.is_some());
        drop(msgs);
    }

    #[test]
    fn the_expiry_scan_leaves_the_batch_in_flight_alone() {
        let mut p = producer();
        let now = Instant::now();
        place(&mut p, 0..4, now);
        let q = queue(&mut p);
        q.take_batch(2 * q.records[0].size);
        // No broker link: the partition is blocked, so its waiting records expire.
        p.expire(now + Duration::from_secs(2));
        let got = results(&mut p);
        assert_eq!(got.iter().map(|r| r.id).collect::<Vec<_>>(), [2, 3]);
        let q = queue(&mut p);
        assert_eq!((ids(q), q.sent, q.queued_bytes), (vec![0, 1], 2, 0));
        // Its answer still finds it.
        p.succeed(0, TOPIC, 0);
        assert_eq!(results(&mut p).iter().map(|r| r.id).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn a_batch_refused_as_too_large_goes_again_one_record_per_batch() {
        let mut p = producer();
        place(&mut p, 0..3, Instant::now());
        let q = queue(&mut p);
        q.take_batch(usize::MAX);
        p.split_or_fail(0, TOPIC, 0);
        let q = queue(&mut p);
        assert_eq!((q.sent, q.solo), (0, 3));
        assert_eq!(q.take_batch(usize::MAX), q.records[0].size);
        assert_eq!(q.sent, 1);
        p.succeed(0, TOPIC, 0);
        assert_eq!(results(&mut p).iter().map(|r| r.id).collect::<Vec<_>>(), [0]);
        let q = queue(&mut p);
        assert_eq!((ids(q), q.solo), (vec![1, 2], 2));
        // A single record refused as too large fails.
        q.take_batch(usize::MAX);
        p.split_or_fail(0, TOPIC, 0);
        let got = results(&mut p);
        assert_eq!(
            got.iter().map(|r| (r.id, r.outcome.clone())).collect::<Vec<_>>(),
            [(1, Err(ProduceError::TooLarge))]
        );
        assert_eq!(ids(queue(&mut p)), [2]);
    }
}

#[cfg(test)]
mod tests {
    use std::io::IoSlice;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use rskafka::client::raw::{produce_body_for_tests, write_spliced, TopicBatches};
    use tokio::io::AsyncWrite;

    /// A socket that takes at most `max` bytes per call and counts its calls.
    struct Socket {
        got: Vec<u8>,
        max: usize,
        writes: usize,
    }

    impl Socket {
        fn take(&mut self, bufs: &[IoSlice<'_>]) -> usize {
            self.writes += 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.max - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
                if n == self.max {
                    break;
                }
            }
            n
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(self.get_mut().take(&[IoSlice::new(buf)])))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(self.get_mut().take(bufs)))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn topics() -> Vec<TopicBatches> {
        vec![
            TopicBatches {
                topic: "a".into(),
                partitions: vec![(0, Bytes::from(vec![1u8; 300])), (3, Bytes::from_static(b"xyz"))],
            },
            TopicBatches { topic: "bb".into(), partitions: vec![(7, Bytes::from(vec![9u8; 70]))] },
        ]
    }

    #[test]
    fn a_produce_request_written_vectored_is_byte_for_byte_the_one_written_whole() {
        for version in 3..=7 {
            assert_eq!(
                produce_body_for_tests(topics(), version, true),
                produce_body_for_tests(topics(), version, false),
                "v{version}"
            );
        }
    }

    fn spliced(max: usize) -> Socket {
        let frame: Vec<u8> = (0..40u8).collect();
        let parts =
            vec![(0, Bytes::from(vec![0xAA; 5])), (10, Bytes::from(vec![0xBB; 100])), (40, Bytes::from_static(b"end"))];
        let mut s = Socket { got: Vec::new(), max, writes: 0 };
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        rt.block_on(write_spliced(&mut s, &frame, &parts)).expect("written");
        let mut want = vec![0xAA; 5];
        want.extend(0..10u8);
        want.extend([0xBB; 100]);
        want.extend(10..40u8);
        want.extend(b"end");
        assert_eq!(s.got, want, "max {max}");
        s
    }

    #[test]
    fn a_frame_and_its_batches_go_to_the_socket_in_one_write() {
        // rskafka wrote the length, then the body copied into one buffer: two writes.
        assert_eq!(spliced(usize::MAX).writes, 1);
    }

    #[test]
    fn a_partial_vectored_write_resumes_where_the_socket_stopped() {
        for max in [1, 3, 7, 64, 147] {
            let s = spliced(max);
            assert_eq!(s.writes, 148usize.div_ceil(max), "max {max}");
        }
    }
}
