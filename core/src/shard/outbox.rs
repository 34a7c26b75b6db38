//! The MQTT → Kafka side of a shard: which messages become Kafka records, and what happens to
//! each record until Kafka (or the spill log) answers for it.
//!
//! A message matching the [`Router`]'s mappings becomes records handed to the caller's
//! producers ([`Effects::produce`](super::Effects::produce)). The outbox counts what is in
//! flight and decides, per record:
//! - **Delivery**: `kafka-ack` records are answered by Kafka; `local-durable` QoS 1/2 records go
//!   to the spill log and are answered when they are on disk (`durable`), Kafka later.
//! - **Back-pressure**: at `max_pending_records` in flight the shard stops reading publishers
//!   ([`KafkaOutbox::backlogged`]); QoS 0 records follow `qos0_when_backlogged` (wait their
//!   turn here, or drop oldest/newest) instead, so they never stop the shard reading.
//! - **Outage spilling** (`kafka-ack` with a spill log): a QoS 1/2 record that times out goes
//!   to the spill log instead of failing (the Kafka side hands a timed-out record back with its
//!   result, so no copy is kept here), the outbox is *spilling* from then on, and records
//!   routed meanwhile wait here behind those still in flight so that order per partition holds
//!   across the switch, until the caller reports the log drained.
//!
//! Invariants: every record id is answered at most once (an unknown id is ignored); `pending`
//! counts exactly the non-durable records handed out and not yet answered; while spilling, no
//! record overtakes one that may still go to the spill log.

use crate::HashSet;
use std::collections::VecDeque;
use std::ops::Range;

use crate::bridge::{Delivery, KafkaRecord, ProduceError, ProduceRequest, ProduceResult, Router};
use crate::config::Qos0Policy;

use super::id_map::IdMap;
use super::{ConnId, Msg};

/// How a shard feeds Kafka: one value, so no setting depends on the order others were set in.
#[derive(Default)]
pub struct BridgeOptions {
    pub router: Router,
    pub delivery: Delivery,
    /// Records in flight at which the shard stops reading publishers (at least 1).
    pub max_pending_records: usize,
    pub qos0_policy: Qos0Policy,
    /// `kafka-ack` only: QoS 1/2 records that time out go to the spill log (the caller has one).
    pub spill_on_timeout: bool,
}

/// Per-mapping counters of the MQTT → Kafka bridge, published under `$SYS/broker/kafka/NAME/`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MappingStats {
    pub messages_in: u64,
    pub bytes_in: u64,
    pub records_produced: u64,
    pub records_failed: u64,
    /// Payloads that did not validate against, or convert to, the mapping's schema (not in
    /// `records_failed`: Kafka never saw them).
    pub records_invalid: u64,
    /// `records_invalid` by cause, in the order of [`crate::schemas::INVALID_CAUSES`].
    pub invalid_by_cause: [u64; crate::schemas::INVALID_CAUSES.len()],
    /// Produce requests beyond the first, summed over records.
    pub records_retried: u64,
    /// QoS 1/2 records that timed out (`kafka-ack`) and went to the spill log instead.
    pub records_spilled: u64,
    /// QoS 0 records dropped by `qos0_when_backlogged`.
    pub records_dropped: u64,
    pub latency_us_sum: u64,
    pub latency_us_max: u64,
    /// Records by the size of the batch they travelled in: 1, ≤10, ≤100, ≤1000, more.
    pub batch_records: [u64; 5],
    /// Answered records by latency (hand-over to the producers → Kafka's answer): count per
    /// bucket of [`LATENCY_BUCKETS_US`], the last one past its end (not cumulative).
    pub latency_buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
    /// `records_failed` by cause, in the order of [`FAILURE_CAUSES`].
    pub failed_by_cause: [u64; FAILURE_CAUSES.len()],
    /// Records routed whose Kafka answer this shard waits for (in the producers, or waiting
    /// here): a gauge. Durable records left on disk behind a backlog are the spill log's.
    pub in_flight: u64,
}

/// Upper bounds of the latency histogram's buckets, in µs (0.5 ms … 30 s): fixed, so shards'
/// histograms add up bucket by bucket.
pub const LATENCY_BUCKETS_US: [u64; 15] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000, 30_000_000,
];

/// The causes of [`ProduceError::cause`], in the order `failed_by_cause` counts them.
pub const FAILURE_CAUSES: [&str; 6] =
    ["record too large", "unknown topic", "not authorized", "timed out", "spill log full", "other error"];

impl std::ops::AddAssign<&MappingStats> for MappingStats {
    fn add_assign(&mut self, o: &MappingStats) {
        self.messages_in += o.messages_in;
        self.bytes_in += o.bytes_in;
        self.records_produced += o.records_produced;
        self.records_failed += o.records_failed;
        self.records_retried += o.records_retried;
        self.records_spilled += o.records_spilled;
        self.records_dropped += o.records_dropped;
        self.in_flight += o.in_flight;
        self.latency_us_sum += o.latency_us_sum;
        self.latency_us_max = self.latency_us_max.max(o.latency_us_max);
        for (a, b) in self.batch_records.iter_mut().zip(o.batch_records) {
            *a += b;
        }
        for (a, b) in self.latency_buckets.iter_mut().zip(o.latency_buckets) {
            *a += b;
        }
        for (a, b) in self.failed_by_cause.iter_mut().zip(o.failed_by_cause) {
            *a += b;
        }
        self.records_invalid += o.records_invalid;
        for (a, b) in self.invalid_by_cause.iter_mut().zip(o.invalid_by_cause) {
            *a += b;
        }
    }
}

/// What the outbox remembers of a record handed out.
#[derive(Clone, Copy)]
struct RecordMeta {
    mapping: u16,
    cluster: u16,
    /// In the spill log: its publisher heard back when it got there.
    durable: bool,
    qos0: bool,
    /// Goes to the spill log if it times out (QoS 1/2, `spill_on_timeout`).
    spillable: bool,
}

/// What a Kafka answer means for the record's publisher.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answered {
    /// The acknowledgement `(conn, seq)` waiting for it may go, with this outcome.
    Publisher((ConnId, u64), Result<(), ProduceError>),
    /// Nothing waits here: a QoS 0 record, a durable one (its publisher heard back when it reached
    /// the spill log), or one that timed out and now goes to the spill log.
    Nobody,
}

pub(super) struct KafkaOutbox {
    router: Router,
    delivery: Delivery,
    max_pending: usize,
    qos0_policy: Qos0Policy,
    spill_on_timeout: bool,
    next_id: u64,
    /// Record id → the acknowledgement waiting for it.
    waiters: IdMap<(ConnId, u64)>,
    /// Record id → what it is, until answered.
    inflight: IdMap<RecordMeta>,
    /// Non-durable records handed out and not answered; QoS 0 ones among them.
    pending: usize,
    pending_qos0: usize,
    /// QoS 0 records waiting for room (drop policies only).
    qos0_waiting: VecDeque<ProduceRequest>,
    spilling: bool,
    /// Spillable records in flight: while there are any, records routed after the switch to
    /// spilling wait (`held`), since one of them may still time out and go to the log first.
    spillable: usize,
    /// Spilling: records waiting for the ones still in flight to be answered first.
    held: Vec<ProduceRequest>,
    /// The router's output for one message, reused (empty between messages).
    routed: Vec<KafkaRecord>,
    /// Per (mapping, cluster).
    /// Per (mapping, cluster), at `mapping * clusters + cluster`; `None` until one carried a
    /// record.
    stats: Vec<Option<MappingStats>>,
    logged_failures: HashSet<(u16, &'static str)>,
}

impl Default for KafkaOutbox {
    fn default() -> Self {
        KafkaOutbox::new(BridgeOptions { max_pending_records: usize::MAX, ..BridgeOptions::default() })
    }
}

impl KafkaOutbox {
    pub(super) fn new(o: BridgeOptions) -> Self {
        // Ids in flight span about `max_pending` (plus QoS 0 records waiting their turn, which
        // `max_pending` also bounds): windows that cover them keep a full backlog off the hash
        // maps (insert and remove there were 8 % of a QoS 0 profile).
        let window = o.max_pending_records.saturating_mul(2);
        KafkaOutbox {
            spill_on_timeout: o.spill_on_timeout && o.delivery == Delivery::KafkaAck,
            router: o.router,
            delivery: o.delivery,
            max_pending: o.max_pending_records.max(1),
            qos0_policy: o.qos0_policy,
            next_id: 0,
            waiters: IdMap::with_window(window),
            inflight: IdMap::with_window(window),
            pending: 0,
            pending_qos0: 0,
            qos0_waiting: VecDeque::new(),
            spilling: false,
            spillable: 0,
            held: Vec::new(),
            routed: Vec::new(),
            stats: Vec::new(),
            logged_failures: HashSet::default(),
        }
    }

    pub(super) fn router(&self) -> &Router {
        &self.router
    }

    pub(super) fn set_wall_offset(&mut self, wall_offset_ms: i64) {
        self.router.set_wall_offset(wall_offset_ms);
    }

    /// Turns `msg` into records for every mapping it matches; what may go now is appended to
    /// `out`. Returns the ids of the records, consecutive (QoS 1/2: the publisher's
    /// acknowledgement waits for them).
    pub(super) fn bridge(&mut self, msg: &Msg, wall_now_ms: i64, out: &mut Vec<ProduceRequest>) -> Range<u64> {
        if self.router.is_empty() {
            return 0..0;
        }
        let mut records = std::mem::take(&mut self.routed);
        self.router.route(msg, wall_now_ms, &mut records);
        let ids = self.hand_out(msg, &mut records, out);
        self.routed = records;
        ids
    }

    /// [`KafkaOutbox::bridge`] for a cluster claim (see `Router::route_claim`).
    pub(super) fn bridge_claim(
        &mut self,
        msg: &Msg,
        claim: bytes::Bytes,
        wall_now_ms: i64,
        out: &mut Vec<ProduceRequest>,
    ) -> Range<u64> {
        let mut records = Vec::new();
        self.router.route_claim(msg, claim, wall_now_ms, &mut records);
        self.hand_out(msg, &mut records, out)
    }

    /// Hands out `records` (left empty), numbered from the next id on.
    fn hand_out(&mut self, msg: &Msg, records: &mut Vec<KafkaRecord>, out: &mut Vec<ProduceRequest>) -> Range<u64> {
        let first = self.next_id + 1;
        for record in records.drain(..) {
            let ms = self.stats_of(record.mapping, record.cluster);
            ms.messages_in += 1;
            ms.bytes_in += msg.payload.len() as u64;
            self.next_id += 1;
            let id = self.next_id;
            let durable = msg.qos > 0 && (self.delivery == Delivery::LocalDurable || self.spilling);
            let qos0 = msg.qos == 0;
            // Goes out now (neither a QoS 0 record that may wait nor a held durable one).
            let spillable = !durable && self.spill_on_timeout && msg.qos > 0;
            let meta = RecordMeta { mapping: record.mapping, cluster: record.cluster, durable, qos0, spillable };
            self.track(id, meta);
            let waits = !self.qos0_waiting.is_empty() || self.pending >= self.max_pending;
            if qos0 && self.qos0_policy != Qos0Policy::BackPressure && waits {
                self.qos0_waiting.push_back(ProduceRequest { id, record, durable });
                if self.qos0_waiting.len() > self.max_pending {
                    let dropped = match self.qos0_policy {
                        Qos0Policy::DropOldest => self.qos0_waiting.pop_front(),
                        _ => self.qos0_waiting.pop_back(),
                    };
                    if let Some(d) = dropped {
                        self.untrack(d.id);
                        self.stats_of(d.record.mapping, d.record.cluster).records_dropped += 1;
                    }
                }
                continue;
            }
            if qos0 {
                self.pending_qos0 += 1;
            }
            if durable && self.delivery == Delivery::KafkaAck && self.spillable > 0 {
                // Spilling after an outage began: behind the records still in flight.
                self.held.push(ProduceRequest { id, record, durable });
                continue;
            }
            // Durable records are bounded by the spill log (disk), not by memory here.
            if !durable {
                self.pending += 1;
                if spillable {
                    self.spillable += 1;
                }
            }
            out.push(ProduceRequest { id, record, durable });
        }
        first..self.next_id + 1
    }

    /// The acknowledgement `(conn, seq)` waits for record `id`.
    pub(super) fn wait(&mut self, id: u64, ack: (ConnId, u64)) {
        self.waiters.insert(id, ack);
    }

    /// Record `id` is in the spill log (`local-durable`), or could not get there: the
    /// acknowledgement waiting for it, if any.
    pub(super) fn durable(&mut self, id: u64) -> Option<(ConnId, u64)> {
        self.waiters.remove(&id)
    }

    /// Kafka answered record `r.id`. Records to hand out now (a spilled copy) go to `out`;
    /// things an operator should read go to `warnings`.
    pub(super) fn on_result(
        &mut self,
        r: ProduceResult,
        shard: usize,
        out: &mut Vec<ProduceRequest>,
        warnings: &mut Vec<String>,
    ) -> Answered {
        let meta = self.untrack(r.id);
        let RecordMeta { mapping, cluster, durable, qos0, spillable } =
            meta.unwrap_or(RecordMeta { mapping: 0, cluster: 0, durable: false, qos0: false, spillable: false });
        if !durable {
            self.pending = self.pending.saturating_sub(1);
        }
        if qos0 {
            self.pending_qos0 = self.pending_qos0.saturating_sub(1);
        }
        if spillable {
            self.spillable -= 1;
        }
        let back = if spillable { r.timed_out } else { None };
        if let (Err(ProduceError::TimedOut), Some(record)) = (&r.outcome, back) {
            // Kafka is down or hanging: the record goes to the spill log, the publisher hears
            // back once it is on disk, and Kafka gets it on replay.
            if !self.spilling {
                self.spilling = true;
                warnings.push(format!(
                    "shard {shard}: Kafka timed out; QoS 1/2 records go to the spill log until Kafka takes them again"
                ));
            }
            self.track(r.id, RecordMeta { mapping, cluster, durable: true, qos0: false, spillable: false });
            self.stats_of(mapping, cluster).records_spilled += 1;
            out.push(ProduceRequest { id: r.id, record: *record, durable: true });
            return Answered::Nobody;
        }
        let ms = self.stats_of(mapping, cluster);
        ms.records_retried += u64::from(r.attempts.saturating_sub(1));
        ms.latency_us_sum += r.latency_us;
        ms.latency_us_max = ms.latency_us_max.max(r.latency_us);
        let slot = LATENCY_BUCKETS_US.partition_point(|b| *b < r.latency_us);
        ms.latency_buckets[slot] += 1;
        let bucket = match r.batch_records {
            0..=1 => 0,
            2..=10 => 1,
            11..=100 => 2,
            101..=1000 => 3,
            _ => 4,
        };
        ms.batch_records[bucket] += 1;
        match &r.outcome {
            Ok(()) => ms.records_produced += 1,
            Err(ProduceError::Invalid { reason, policy, cause }) => {
                ms.records_invalid += 1;
                let causes = &crate::schemas::INVALID_CAUSES;
                let i = causes.iter().position(|c| c == cause).unwrap_or(causes.len() - 1);
                ms.invalid_by_cause[i] += 1;
                if self.logged_failures.insert((mapping, cause)) {
                    let name = self.router.mapping_name(mapping).to_string();
                    warnings.push(format!(
                        "payloads of mapping `{name}` do not validate: {reason} (MQTT 3.1.1 publishers: on_invalid = {}); further ones are counted in $SYS/broker/shard/{shard}/kafka/{name}/.../records/invalid",
                        policy.name(),
                    ));
                }
            }
            Err(e) => {
                ms.records_failed += 1;
                if let Some(i) = FAILURE_CAUSES.iter().position(|c| *c == e.cause()) {
                    ms.failed_by_cause[i] += 1;
                }
                if self.logged_failures.insert((mapping, e.cause())) {
                    let name = self.router.mapping_name(mapping).to_string();
                    warnings.push(format!(
                        "Kafka refused records of mapping `{name}`: {} ({e:?}); further failures of this kind are counted in $SYS/broker/shard/{shard}/kafka/{name}/.../records/failed",
                        e.cause(),
                    ));
                }
            }
        }
        // A durable record's publisher heard back when it reached the spill log.
        if durable {
            return Answered::Nobody;
        }
        match self.waiters.remove(&r.id) {
            Some(ack) => Answered::Publisher(ack, r.outcome),
            None => Answered::Nobody,
        }
    }

    /// After a batch of answers: records that waited (behind in-flight ones while spilling, or
    /// QoS 0 ones for room) go to `out` as far as they may.
    pub(super) fn release(&mut self, out: &mut Vec<ProduceRequest>) {
        if self.spillable == 0 && !self.held.is_empty() {
            out.append(&mut self.held);
        }
        while self.pending < self.max_pending {
            let Some(req) = self.qos0_waiting.pop_front() else { break };
            self.pending += 1;
            self.pending_qos0 += 1;
            out.push(req);
        }
    }

    pub(super) fn spilling(&self) -> bool {
        self.spilling
    }

    /// The spill log drained: returns whether records go straight to Kafka again (not while
    /// records that may still time out and go to the log are in flight: they must not be
    /// overtaken).
    pub(super) fn end_spilling(&mut self) -> bool {
        if self.spilling && self.held.is_empty() && self.spillable == 0 {
            self.spilling = false;
            return true;
        }
        false
    }

    /// `local-durable` records that stay on disk behind a backlog: replayed by the caller, no
    /// longer counted here.
    pub(super) fn forget(&mut self, id: u64) {
        self.untrack(id);
    }

    /// Record `id` is handed out (or waits here) until answered; counted in its pair's
    /// `in_flight`.
    /// Whether record `id` was handed out and is not answered yet (a record that timed out
    /// and went to the spill log instead is, again).
    pub(super) fn tracks(&self, id: u64) -> bool {
        self.inflight.contains_key(&id)
    }

    fn track(&mut self, id: u64, meta: RecordMeta) {
        self.stats_of(meta.mapping, meta.cluster).in_flight += 1;
        if let Some(old) = self.inflight.insert(id, meta) {
            // Not expected (ids are fresh or re-tracked after removal): keep the count exact.
            let ms = self.stats_of(old.mapping, old.cluster);
            ms.in_flight = ms.in_flight.saturating_sub(1);
        }
    }

    fn untrack(&mut self, id: u64) -> Option<RecordMeta> {
        let meta = self.inflight.remove(&id)?;
        let ms = self.stats_of(meta.mapping, meta.cluster);
        ms.in_flight = ms.in_flight.saturating_sub(1);
        Some(meta)
    }

    /// Whether so many records wait for Kafka that the shard should stop reading publishers.
    pub(super) fn backlogged(&self) -> bool {
        let pending = match self.qos0_policy {
            Qos0Policy::BackPressure => self.pending,
            // QoS 0 records have their own bound: they never stop the shard reading.
            _ => self.pending - self.pending_qos0,
        };
        pending + self.held.len() >= self.max_pending
    }

    pub(super) fn pending(&self) -> usize {
        self.pending
    }

    /// `(mapping name, cluster name, counters)` per pair that carried records.
    pub(super) fn mapping_stats(&self) -> impl Iterator<Item = (&str, &str, &MappingStats)> {
        let clusters = self.router.clusters().len().max(1);
        self.stats.iter().enumerate().filter_map(move |(i, s)| {
            let s = s.as_ref()?;
            let (m, c) = ((i / clusters) as u16, i % clusters);
            Some((self.router.mapping_name(m), self.router.clusters().get(c).map_or("", String::as_str), s))
        })
    }

    /// The counters of (mapping, cluster), made on first use.
    fn stats_of(&mut self, mapping: u16, cluster: u16) -> &mut MappingStats {
        let at = usize::from(mapping) * self.router.clusters().len().max(1) + usize::from(cluster);
        if self.stats.len() <= at {
            self.stats.resize_with(at + 1, || None);
        }
        self.stats[at].get_or_insert_with(MappingStats::default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::MappingConfig;
    use crate::message::Message;
    use std::sync::Arc;

    fn outbox(delivery: Delivery, max_pending: usize, qos0_policy: Qos0Policy, spill: bool) -> KafkaOutbox {
        let mapping: MappingConfig =
            toml::from_str("name = \"m\"\nfilters = [\"t/#\"]\ndestinations = [{ cluster = \"c\", topic = \"k\" }]")
                .expect("mapping");
        let router = Router::new(&[mapping], &["c".to_string()]).expect("router");
        KafkaOutbox::new(BridgeOptions {
            router,
            delivery,
            max_pending_records: max_pending,
            qos0_policy,
            spill_on_timeout: spill,
        })
    }

    fn msg(qos: u8) -> Msg {
        Arc::new(Message {
            topic: "t/1".into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos,
            retain: false,
            properties: None,
            expiry_at_ms: None,
            origin: "c1".into(),
        })
    }

    fn result(id: u64, outcome: Result<(), ProduceError>) -> ProduceResult {
        ProduceResult { id, outcome, attempts: 1, batch_records: 1, latency_us: 10, timed_out: None, source: None }
    }

    /// A time-out as the Kafka side reports it: with the record handed back.
    fn timed_out(req: &ProduceRequest) -> ProduceResult {
        ProduceResult { timed_out: Some(Box::new(req.record.clone())), ..result(req.id, Err(ProduceError::TimedOut)) }
    }

    fn stats(o: &KafkaOutbox) -> MappingStats {
        o.mapping_stats().map(|(_, _, s)| *s).next().unwrap_or_default()
    }

    #[test]
    fn in_flight_latency_buckets_and_failure_causes_are_counted_per_mapping() {
        let mut o = outbox(Delivery::KafkaAck, 100, Qos0Policy::BackPressure, true);
        let (mut out, mut warnings) = (Vec::new(), Vec::new());
        let ids: Vec<u64> = (0..3).map(|_| o.bridge(&msg(1), 0, &mut out).start).collect();
        assert_eq!(stats(&o).in_flight, 3);
        let answer = |id, outcome, latency_us| ProduceResult {
            id,
            outcome,
            attempts: 1,
            batch_records: 1,
            latency_us,
            timed_out: None,
            source: None,
        };
        o.on_result(answer(ids[0], Ok(()), 700), 0, &mut out, &mut warnings);
        o.on_result(answer(ids[1], Err(ProduceError::UnknownTopic), 40_000_000), 0, &mut out, &mut warnings);
        // A time-out goes to the spill log: still waiting for Kafka, still in flight.
        let spilled = timed_out(&out[2]);
        o.on_result(spilled, 0, &mut out, &mut warnings);
        let s = stats(&o);
        assert_eq!(s.in_flight, 1);
        assert_eq!(s.latency_buckets[1], 1, "700 µs is in the ≤ 1 ms bucket");
        assert_eq!(s.latency_buckets[LATENCY_BUCKETS_US.len()], 1, "past 30 s: the overflow bucket");
        assert_eq!(s.failed_by_cause[1], 1, "unknown topic");
        assert_eq!(s.failed_by_cause.iter().sum::<u64>(), s.records_failed);
        o.on_result(answer(ids[2], Ok(()), 10), 0, &mut out, &mut warnings);
        assert_eq!(stats(&o).in_flight, 0);
    }

    #[test]
    fn a_timeout_switches_to_spilling_and_later_records_wait_behind_those_in_flight() {
        let mut o = outbox(Delivery::KafkaAck, 100, Qos0Policy::BackPressure, true);
        let (mut out, mut warnings) = (Vec::new(), Vec::new());
        let a = o.bridge(&msg(1), 0, &mut out).start;
        let b = o.bridge(&msg(1), 0, &mut out).start;
        o.wait(a, (1, 0));
        o.wait(b, (1, 1));
        assert_eq!(out.len(), 2);
        let a_timed_out = timed_out(&out[0]);
        out.clear();
        // `a` times out: it goes to the spill log, and nobody is answered yet.
        assert_eq!(o.on_result(a_timed_out, 0, &mut out, &mut warnings), Answered::Nobody);
        assert!(o.spilling());
        assert_eq!((out.len(), out[0].id, out[0].durable), (1, a, true));
        assert_eq!(warnings.len(), 1);
        out.clear();
        // A record routed now is durable and waits behind `b`, still in flight.
        let c = o.bridge(&msg(1), 0, &mut out).start;
        assert!(out.is_empty(), "c must not overtake b");
        assert!(!o.end_spilling(), "b may still time out");
        assert_eq!(o.on_result(result(b, Ok(())), 0, &mut out, &mut warnings), Answered::Publisher((1, 1), Ok(())));
        o.release(&mut out);
        assert_eq!((out.len(), out[0].id, out[0].durable), (1, c, true));
        assert!(o.end_spilling());
        assert!(!o.spilling());
        assert_eq!(o.pending(), 0);
    }

    #[test]
    fn qos0_records_wait_for_room_and_drop_by_policy_without_stopping_the_shard() {
        let mut o = outbox(Delivery::KafkaAck, 2, Qos0Policy::DropOldest, false);
        let (mut out, mut warnings) = (Vec::new(), Vec::new());
        let ids: Vec<u64> = (0..5).map(|_| o.bridge(&msg(0), 0, &mut out).start).collect();
        assert_eq!(out.iter().map(|r| r.id).collect::<Vec<_>>(), ids[..2]);
        assert!(!o.backlogged(), "QoS 0 never stops the shard reading under a drop policy");
        // Room for two waiting, one dropped (the oldest of three waiting).
        let dropped: u64 = o.mapping_stats().map(|(_, _, s)| s.records_dropped).sum();
        assert_eq!(dropped, 1);
        out.clear();
        o.on_result(result(ids[0], Ok(())), 0, &mut out, &mut warnings);
        o.release(&mut out);
        assert_eq!(out.iter().map(|r| r.id).collect::<Vec<_>>(), vec![ids[3]]);
    }

    #[test]
    fn qos1_records_stop_the_shard_at_the_bound_and_an_answer_reaches_its_publisher_once() {
        let mut o = outbox(Delivery::KafkaAck, 2, Qos0Policy::BackPressure, false);
        let (mut out, mut warnings) = (Vec::new(), Vec::new());
        let a = o.bridge(&msg(1), 0, &mut out).start;
        o.wait(a, (3, 7));
        assert!(!o.backlogged());
        o.bridge(&msg(1), 0, &mut out);
        assert!(o.backlogged());
        let e = Err(ProduceError::NotAuthorized);
        assert_eq!(o.on_result(result(a, e.clone()), 0, &mut out, &mut warnings), Answered::Publisher((3, 7), e));
        assert_eq!(warnings.len(), 1, "the first failure of a cause is logged");
        assert_eq!(o.on_result(result(a, Ok(())), 0, &mut out, &mut warnings), Answered::Nobody);
        assert!(!o.backlogged());
    }
}
