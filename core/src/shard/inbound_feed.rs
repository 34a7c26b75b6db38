//! Kafka → MQTT feed: consumed records are routed in slices that fit the receivers' room.
//!
//! For messages that come from Kafka, Kafka is the buffer. One fetch may hold thousands of
//! records for one device — far more than its session queue (`max_queued_messages`) takes — so
//! a consumed batch is not routed in one go. The shard keeps it as a *remainder* and routes it
//! slice by slice:
//! - Before each record, every receiver of it on this shard — a session, connected or offline
//!   and persistent, whose subscription gets it at QoS 1/2 — must be under half full; otherwise
//!   the feed waits until those receivers drained to a quarter.
//! - A slice carries at most `max_queued_messages / (2 × shards)` QoS 1/2 messages and one
//!   receipt ([`FEED_TOKEN`] set). Every other shard answers it once it handed the messages on
//!   (and committed what it queued for persistent sessions), and holds its answer while the
//!   slice left one of its receivers at least half full, until that one drained to a quarter.
//!   The next slice starts only when the previous slice's receipt completed.
//! - While a remainder waits the caller takes no new batch from the consumer channel; the channel
//!   fills, the consumers stop fetching, and the records stay in Kafka.
//!
//! Invariant (no drop from Kafka traffic): each shard's feed has at most one slice unanswered,
//! so a receiver that was under half full gets at most `shards × slice` ≤ half a queue more
//! before every feed waits for it. Positions move per slice, through the receipts, as before: a
//! restart replays from the last slice every shard finished.
//!
//! Time bound: a receiver that holds a feed longer than `max_wait_ms` (it never acknowledges,
//! or it is offline) is *skipped* — it holds no feed until its queue drained to a quarter, its
//! queue follows `queue_full_policy` meanwhile (drops counted) — so one stuck device cannot
//! stall every other one. Shared subscriptions are not covered (their members never hold a
//! receipt); MQTT publishers filling the same queues reduce the margin.
//!
//! Sans-I/O like the rest of the shard: time comes in as `now_ms`.

use super::*;

/// Set in the receipt tokens of feed slices, so the shards answering know the receipt is a
/// Kafka slice (held at most `max_wait_ms`) and not a publisher's acknowledgement.
pub(super) const FEED_TOKEN: u64 = 1 << 62;

pub(super) struct InboundFeed {
    /// Records consumed and not yet routed, in order: at most one consumed batch, since the
    /// caller takes no batch while this is not empty.
    remainder: VecDeque<InboundRecord>,
    /// The last slice's receipt, while some shard has not answered it.
    outstanding: Option<u64>,
    /// Receivers here the next record waits for (half full or more), and since when.
    blocked_on: Vec<ClientId>,
    blocked_since_ms: u64,
    /// Receivers here that held a feed longer than `max_wait_ms`: ignored until they drained to
    /// a quarter (or went away).
    skipped: HashSet<ClientId>,
    /// Answers to other shards' slice receipts held here: (held receipt id, since, receivers).
    pub(super) held: Vec<(u64, u64, Vec<ClientId>)>,
    max_wait_ms: u64,
    /// Receivers skipped after `max_wait_ms`, for `$SYS`; the first one is logged.
    pub(super) receivers_skipped: u64,
}

impl InboundFeed {
    pub(super) fn new(max_wait_ms: u64) -> Self {
        InboundFeed {
            remainder: VecDeque::new(),
            outstanding: None,
            blocked_on: Vec::new(),
            blocked_since_ms: 0,
            skipped: HashSet::default(),
            held: Vec::new(),
            max_wait_ms,
            receivers_skipped: 0,
        }
    }
}

impl Shard {
    /// Turns on Kafka → MQTT: records handed to [`Shard::on_kafka_records`] are transformed and
    /// published to MQTT subscribers on every shard. A receiver that does not drain holds the
    /// records back at most `max_wait_ms` (then it is skipped: see the module doc).
    pub fn with_inbound(mut self, inbound: Inbound, mappings: usize, max_wait_ms: u64) -> Self {
        self.inbound = InboundState::new(inbound, mappings);
        self.feed = InboundFeed::new(max_wait_ms);
        self
    }

    /// Records read from Kafka: each becomes MQTT messages (or is skipped, counted, and logged
    /// once per mapping and cause) routed like a publish from a client, as far as the receivers
    /// have room; the rest waits ([`Shard::kafka_records_waiting`]).
    pub fn on_kafka_records(&mut self, records: impl IntoIterator<Item = InboundRecord>, now_ms: u64) {
        self.feed.remainder.extend(records);
        self.feed_kafka_records(now_ms);
    }

    /// Records of the cluster's claims (`InboundInternal::ClusterClaims`), on a channel of their
    /// own: handled at once, never behind the feed's flow control (a takeover, a handover or a
    /// lease must not wait for a slow device's queue), their positions moved at once (a claim is
    /// not a delivery: nothing of it waits for a store).
    pub fn on_claim_records(&mut self, records: impl IntoIterator<Item = InboundRecord>, now_ms: u64) {
        let mut moves: PositionMoves = Vec::new();
        for r in records {
            let transformed = self.inbound.transform(&r, now_ms);
            self.inbound.count(r.mapping, transformed.as_ref().map(Vec::len).map_err(|s| *s));
            for m in transformed.into_iter().flatten() {
                self.route(Arc::new(m), &mut Routing::default(), now_ms);
            }
            let key = (r.mapping, r.topic.clone(), r.partition);
            match moves.iter_mut().find(|(k, _)| *k == key) {
                Some(m) => m.1 = r.offset + 1,
                None => moves.push((key, r.offset + 1)),
            }
        }
        self.inbound.move_positions(vec![moves]);
        self.run_local(now_ms);
    }

    /// Records of an earlier batch wait for room: take no new batch (the consumer then pauses)
    /// and call [`Shard::feed_kafka_records`] again soon (acknowledgements, drained output and
    /// other shards' answers make room).
    pub fn kafka_records_waiting(&self) -> bool {
        !self.feed.remainder.is_empty()
    }

    /// Routes waiting records as far as the receivers have room. Returns whether any moved.
    pub fn feed_kafka_records(&mut self, now_ms: u64) -> bool {
        self.expire_feed_holds(now_ms);
        let mut moved = false;
        while !self.feed.remainder.is_empty() {
            if self.feed.outstanding.is_some_and(|t| self.receipts.is_open(t)) {
                break;
            }
            self.feed.outstanding = None;
            if !self.feed_unblocked(now_ms) || !self.route_slice(now_ms) {
                break;
            }
            moved = true;
        }
        self.run_local(now_ms);
        moved
    }

    /// Whether the receivers the feed waited for drained (or waited too long and are skipped).
    fn feed_unblocked(&mut self, now_ms: u64) -> bool {
        self.trim_skipped();
        let q = self.limits.max_queued_messages;
        let mut blocked = std::mem::take(&mut self.feed.blocked_on);
        blocked.retain(|id| {
            !self.feed.skipped.contains(id) && self.sessions.get(id).is_some_and(|s| s.queue.len() * 4 > q)
        });
        if blocked.is_empty() {
            return true;
        }
        if now_ms.saturating_sub(self.feed.blocked_since_ms) >= self.feed.max_wait_ms {
            self.skip_receivers(&blocked);
            return true;
        }
        self.feed.blocked_on = blocked;
        false
    }

    /// Routes records from the remainder as one slice under one receipt, until the slice is full
    /// or a record's receivers here have no room. Returns false when not even one record could go.
    fn route_slice(&mut self, now_ms: u64) -> bool {
        let max_messages = (self.limits.max_queued_messages / (2 * self.n_shards)).max(1);
        let mut token = None;
        let mut expected = 0;
        let mut sent = 0;
        let mut moves: PositionMoves = Vec::new();
        while sent < max_messages {
            let Some(r) = self.feed.remainder.front() else { break };
            let transformed = self.inbound.transform(r, now_ms);
            if let Ok(msgs) = &transformed {
                let blockers = self.feed_congested(msgs.iter());
                if !blockers.is_empty() {
                    self.feed.blocked_on = blockers;
                    self.feed.blocked_since_ms = now_ms;
                    break;
                }
            }
            let Some(r) = self.feed.remainder.pop_front() else { break };
            // One receipt per slice: its positions move once every shard handed its messages to
            // the subscribers there and stored what it queued for persistent sessions.
            let token = *token.get_or_insert_with(|| self.new_receipt() | FEED_TOKEN);
            let key = (r.mapping, r.topic.clone(), r.partition);
            match moves.iter_mut().find(|(k, _)| *k == key) {
                Some(m) => m.1 = r.offset + 1,
                None => moves.push((key, r.offset + 1)),
            }
            let first_skip = self.inbound.count(r.mapping, transformed.as_ref().map(Vec::len).map_err(|s| *s));
            match transformed {
                Ok(msgs) => {
                    for m in msgs {
                        self.stats.messages_received += 1;
                        sent += usize::from(m.qos > 0);
                        let mut routing = Routing::under(Receipt { from: self.id, token });
                        expected += self.route_with_receipt(Arc::new(m), &mut routing, now_ms).1;
                    }
                }
                Err(skip) => {
                    if first_skip {
                        let name = self.inbound.mapping_name(r.mapping).to_string();
                        self.effects.warnings.push(format!(
                            "kafka_to_mqtt `{name}`: skipped a record of {}/{} at offset {}: {}; further ones are counted in $SYS/broker/shard/{}/kafka_to_mqtt/{name}/records/skipped",
                            r.topic, r.partition, r.offset, skip.cause(), self.id
                        ));
                    }
                }
            }
            // Receivers here were checked before the record: the congestion the routings noted
            // is for publishers, and goes with them.
        }
        let Some(token) = token else { return false };
        self.receipts.push_batch(token, moves);
        if expected == 0 {
            let moves = self.receipts.complete_batch(token);
            self.inbound.move_positions(moves);
        } else {
            self.receipts.expect(token, expected, ReceiptFor::Positions);
            self.feed.outstanding = Some(token);
        }
        true
    }

    /// Receivers here of `msgs` whose queue is half full or more (skipped ones aside): QoS 1/2
    /// subscriptions of sessions connected or offline (an offline session here is persistent).
    fn feed_congested<'a>(&self, msgs: impl Iterator<Item = &'a Message>) -> Vec<ClientId> {
        let q = self.limits.max_queued_messages;
        let mut out: Vec<ClientId> = Vec::new();
        for m in msgs.filter(|m| m.qos > 0) {
            self.trie.for_each_match(&m.topic, |id, sub| {
                if sub.opts.qos == 0 || (sub.opts.no_local && *id == m.origin) {
                    return;
                }
                let full = self.sessions.get(id).is_some_and(|s| s.queue.len() * 2 >= q);
                if full && !self.feed.skipped.contains(id) && !out.contains(id) {
                    out.push(id.clone());
                }
            });
        }
        out
    }

    /// Answers another shard's slice receipt for `msg`, routed here: held while it left a
    /// receiver here half full or more (until it drained to a quarter, at most `max_wait_ms`).
    pub(super) fn answer_feed_receipt(&mut self, r: Receipt, mut routing: Routing, msg: &Message, now_ms: u64) {
        self.trim_skipped();
        routing.congested = self.feed_congested(std::iter::once(msg));
        let receivers = routing.congested.clone();
        if let Some(held) = self.answer_receipt(r, routing) {
            self.feed.held.push((held, now_ms, receivers));
        }
    }

    /// Held slice answers go once none of their receivers holds them any more: drained to a
    /// quarter (normally released at once by `release_drain_waiters`), gone from this shard (a
    /// session that moves away while offline leaves its drain waiters behind), or skipped — which
    /// is what receivers holding an answer longer than `max_wait_ms` become.
    pub(super) fn expire_feed_holds(&mut self, now_ms: u64) {
        if self.feed.held.is_empty() {
            return;
        }
        let receipts = &self.receipts;
        self.feed.held.retain(|(h, _, _)| receipts.is_held(*h));
        let max_wait_ms = self.feed.max_wait_ms;
        let late: Vec<ClientId> = self
            .feed
            .held
            .iter()
            .filter(|(_, since, _)| now_ms.saturating_sub(*since) >= max_wait_ms)
            .flat_map(|(_, _, ids)| ids.iter().cloned())
            .filter(|id| self.sessions.contains_key(id))
            .collect();
        self.skip_receivers(&late);
        let q = self.limits.max_queued_messages;
        let (skipped, sessions) = (&self.feed.skipped, &self.sessions);
        let holds = |id: &ClientId| !skipped.contains(id) && sessions.get(id).is_some_and(|s| s.queue.len() * 4 > q);
        let (keep, free): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.feed.held).into_iter().partition(|(_, _, ids)| ids.iter().any(holds));
        self.feed.held = keep;
        for (h, _, _) in free {
            // A drain waiter for `h` may stay behind; `release_drain_waiters` skips it.
            if let Some(held) = self.receipts.release_held(h) {
                self.answer_receipt_now(held.receipt, held.more, held.stored);
            }
        }
    }

    fn skip_receivers(&mut self, ids: &[ClientId]) {
        for id in ids {
            if !self.feed.skipped.insert(id.clone()) {
                continue;
            }
            self.feed.receivers_skipped += 1;
            if self.feed.receivers_skipped == 1 {
                self.effects.warnings.push(format!(
                    "kafka_to_mqtt: session `{id}` took no messages for {} ms; Kafka records no longer wait for it until its queue drained (meanwhile it follows queue_full_policy); further ones are counted in $SYS/broker/shard/{}/kafka_to_mqtt/receivers_skipped",
                    self.feed.max_wait_ms, self.id
                ));
            }
        }
    }

    /// Skipped receivers that drained to a quarter (or went away) count again.
    fn trim_skipped(&mut self) {
        if self.feed.skipped.is_empty() {
            return;
        }
        let q = self.limits.max_queued_messages;
        let sessions = &self.sessions;
        self.feed.skipped.retain(|id| sessions.get(id).is_some_and(|s| s.queue.len() * 4 > q));
    }

    /// The feed's `$SYS` values: records waiting for room, receivers skipped after `max_wait_ms`.
    pub(super) fn feed_sys(&self, values: &mut Vec<(String, String)>) {
        if self.inbound.is_empty() {
            return;
        }
        let id = self.id;
        values.push((
            format!("$SYS/broker/shard/{id}/kafka_to_mqtt/records_waiting"),
            self.feed.remainder.len().to_string(),
        ));
        values.push((
            format!("$SYS/broker/shard/{id}/kafka_to_mqtt/receivers_skipped"),
            self.feed.receivers_skipped.to_string(),
        ));
    }
}
