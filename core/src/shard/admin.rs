//! What an operator asks a shard (the HTTP endpoint's `/metrics`, admin API and live view), and
//! the answers: a [`AdminQuery`] in, an [`AdminReply`] out, one call ([`Shard::admin`]).
//!
//! The HTTP side asks every shard and merges the answers; a shard answers for what it owns
//! only (its connections and sessions, its part of the retained messages). Nothing here is on
//! a packet's path except [`LiveTaps::is_empty`], one branch per routed message.
//!
//! Bounds: a page is at most [`PAGE_MAX`] items; listing scans the shard's sessions (one pass,
//! O(sessions), on the shard: an operator's request, not a device's); at most [`TAPS_MAX`] live
//! taps per shard, each keeping at most [`TAP_SAMPLES_MAX`] samples and taking at most
//! [`TAP_RATE_PER_SEC`] messages a second (the rest are counted as `skipped`); a tap nobody
//! polled for [`TAP_IDLE_MS`] is removed.

use super::*;

/// Items in one page of a listing, at most.
pub const PAGE_MAX: usize = 1000;
/// Live taps one shard keeps at once.
pub const TAPS_MAX: usize = 8;
/// Samples a tap keeps until polled; older ones make room.
pub const TAP_SAMPLES_MAX: usize = 100;
/// Messages a tap samples per second on one shard.
pub const TAP_RATE_PER_SEC: u32 = 20;
/// A tap not polled for this long is removed (its viewer went away).
pub const TAP_IDLE_MS: u64 = 10_000;
/// Payload bytes a sample keeps.
pub const SAMPLE_PAYLOAD_MAX: usize = 1024;

/// A question for one shard.
#[derive(Debug, Clone)]
pub enum AdminQuery {
    /// Counters, per-mapping figures, spill state: what `/metrics` sums.
    Snapshot,
    /// Connected clients whose id contains `search`, ids after `after`, sorted, ≤ `limit`.
    Clients {
        search: String,
        after: String,
        limit: usize,
    },
    /// Sessions (connected or not) hosted here, as for `Clients`.
    Sessions {
        search: String,
        after: String,
        limit: usize,
    },
    /// One session and its connection, if hosted here.
    Client {
        client_id: String,
    },
    /// Closes the client's connection (MQTT 5: DISCONNECT 0x98 administrative action).
    Disconnect {
        client_id: String,
    },
    /// Subscriptions, all or those with exactly `filter`, sorted by (client, filter), after
    /// the cursor `after` = (client id, filter) only.
    Subscriptions {
        filter: Option<String>,
        after: (String, String),
        limit: usize,
    },
    /// Retained messages matching `filter`, at most `limit`.
    Retained {
        filter: String,
        limit: usize,
    },
    /// Removes the retained message of `topic` (and from the store).
    DeleteRetained {
        topic: String,
    },
    /// Starts (or renews) live tap `tap` on `filter`.
    LiveWatch {
        tap: u64,
        filter: String,
    },
    /// The samples tap `tap` gathered since the last take.
    LiveTake {
        tap: u64,
    },
    LiveStop {
        tap: u64,
    },
}

/// One shard's answer.
#[derive(Debug)]
pub enum AdminReply {
    Snapshot(Box<Snapshot>),
    Clients(Page<ClientInfo>),
    Client(Option<ClientInfo>),
    Subscriptions(Page<SubscriptionInfo>),
    Retained(Vec<RetainedInfo>),
    /// Disconnect / DeleteRetained: whether this shard had it.
    Done(bool),
    Live(LiveBatch),
    /// The query was refused (a bound, a malformed filter): the message says which.
    Refused(String),
}

/// Items sorted by key, and how many matched on this shard in all.
#[derive(Debug, Default)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: usize,
}

#[derive(Debug, Default)]
pub struct Snapshot {
    pub shard: ShardId,
    pub stats: Stats,
    /// Connections open here (any state).
    pub connections: u64,
    pub uptime_ms: u64,
    /// `(mapping, cluster, counters)` of MQTT → Kafka pairs that carried records.
    pub mappings: Vec<(String, String, MappingStats)>,
    pub inbound: Vec<(String, InboundCounters)>,
    /// Spill log: records waiting, bytes on disk, records replayed.
    pub spill: Option<(u64, u64, u64)>,
    pub kafka_pending: u64,
    pub spilling: bool,
    pub live_taps: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub client_id: String,
    pub shard: ShardId,
    pub connected: bool,
    /// "3.1.1" or "5"; empty when offline.
    pub protocol: &'static str,
    pub keep_alive_secs: u64,
    pub username: Option<String>,
    pub listener: u16,
    /// Filter and QoS of each subscription (details only; listings leave it empty).
    pub subscriptions: Vec<(String, u8)>,
    pub subscription_count: usize,
    pub inflight: usize,
    pub queued: usize,
    pub session_expiry_secs: u32,
    /// In a cluster, a connected client's claim: "confirmed" once this node read it back from
    /// Kafka, "unconfirmed" before (see `cluster_claims`).
    pub cluster_claim: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionInfo {
    pub client_id: String,
    pub filter: String,
    pub qos: u8,
    pub shard: ShardId,
}

#[derive(Debug, Clone)]
pub struct RetainedInfo {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub shard: ShardId,
}

/// What a live tap saw since it was last polled.
#[derive(Debug, Default)]
pub struct LiveBatch {
    pub samples: Vec<LiveSample>,
    /// Matching messages not sampled (over the rate or the buffer).
    pub skipped: u64,
    /// The tap exists here (false: expired or never started; the poller starts it again).
    pub known: bool,
}

/// One message the tap saw, and the Kafka records it became.
#[derive(Debug, Clone)]
pub struct LiveSample {
    pub wall_ms: i64,
    pub topic: String,
    /// At most [`SAMPLE_PAYLOAD_MAX`] bytes.
    pub payload: Bytes,
    pub payload_len: usize,
    pub qos: u8,
    pub retain: bool,
    pub client_id: String,
    pub shard: ShardId,
    pub records: Vec<LiveRecord>,
}

#[derive(Debug, Clone)]
pub struct LiveRecord {
    pub mapping: String,
    pub cluster: String,
    pub topic: String,
    pub key: Option<Bytes>,
    /// The mapping's fixed partition; `None`: the producer places it by key.
    pub partition: Option<i32>,
    pub headers: Vec<(String, Bytes)>,
}

struct Tap {
    id: u64,
    filter: String,
    polled_ms: u64,
    samples: VecDeque<LiveSample>,
    skipped: u64,
    /// Start of the current one-second window, and samples taken in it.
    window_ms: u64,
    in_window: u32,
}

/// The live taps of one shard.
#[derive(Default)]
pub(super) struct LiveTaps {
    taps: Vec<Tap>,
}

impl LiveTaps {
    pub(super) fn is_empty(&self) -> bool {
        self.taps.is_empty()
    }

    fn len(&self) -> usize {
        self.taps.len()
    }

    /// Taps whose filter matches `topic` and that may take one more sample now.
    fn wanting(&mut self, topic: &str, now_ms: u64) -> Vec<usize> {
        let mut want = Vec::new();
        for (i, t) in self.taps.iter_mut().enumerate() {
            if !topic::matches(&t.filter, topic) {
                continue;
            }
            if now_ms.saturating_sub(t.window_ms) >= 1000 {
                t.window_ms = now_ms;
                t.in_window = 0;
            }
            if t.in_window >= TAP_RATE_PER_SEC {
                t.skipped += 1;
                continue;
            }
            t.in_window += 1;
            want.push(i);
        }
        want
    }

    fn expire(&mut self, now_ms: u64) {
        self.taps.retain(|t| now_ms.saturating_sub(t.polled_ms) < TAP_IDLE_MS);
    }
}

fn matches_page(id: &str, search: &str, after: &str) -> bool {
    id > after && (search.is_empty() || id.contains(search))
}

/// Keeps the `limit` smallest by key, sorted: O(n) selection, then sorting only the page (no
/// per-item work for what the page does not show).
fn smallest<T>(items: &mut Vec<T>, limit: usize, order: impl Fn(&T, &T) -> std::cmp::Ordering) {
    if items.len() > limit && limit > 0 {
        items.select_nth_unstable_by(limit - 1, &order);
    }
    items.truncate(limit);
    items.sort_unstable_by(order);
}

impl Shard {
    /// Answers an operator's question (see the module doc). Effects (a close, a store change)
    /// go to [`Shard::drain_effects`] as usual.
    pub fn admin(&mut self, q: AdminQuery, now_ms: u64) -> AdminReply {
        let limit_ok = |limit: usize| limit <= PAGE_MAX;
        match q {
            AdminQuery::Snapshot => AdminReply::Snapshot(Box::new(self.snapshot(now_ms))),
            AdminQuery::Clients { limit, .. }
            | AdminQuery::Sessions { limit, .. }
            | AdminQuery::Subscriptions { limit, .. }
            | AdminQuery::Retained { limit, .. }
                if !limit_ok(limit) =>
            {
                AdminReply::Refused(format!("limit {limit} is above the page maximum {PAGE_MAX}"))
            }
            AdminQuery::Clients { search, after, limit } => {
                AdminReply::Clients(self.session_page(true, &search, &after, limit))
            }
            AdminQuery::Sessions { search, after, limit } => {
                AdminReply::Clients(self.session_page(false, &search, &after, limit))
            }
            AdminQuery::Client { client_id } => {
                AdminReply::Client(self.sessions.get(client_id.as_str()).map(|s| self.client_info(s, true)))
            }
            AdminQuery::Disconnect { client_id } => {
                let conn = self.sessions.get(client_id.as_str()).and_then(|s| s.conn);
                match conn {
                    Some(conn) => {
                        self.close_why(
                            conn,
                            Some(reason::ADMINISTRATIVE_ACTION),
                            Some("disconnected by an operator"),
                            now_ms,
                        );
                        AdminReply::Done(true)
                    }
                    None => AdminReply::Done(false),
                }
            }
            AdminQuery::Subscriptions { filter, after, limit } => {
                if let Some(f) = &filter {
                    if !topic::valid_filter(f, &self.topic_limits) {
                        return AdminReply::Refused(format!("`{f}` is not a valid topic filter"));
                    }
                }
                let mut hits: Vec<(&str, &str, u8)> = Vec::new();
                for s in self.sessions.values() {
                    if *s.client_id < *after.0.as_str() {
                        continue;
                    }
                    let same_client = *s.client_id == *after.0.as_str();
                    for (f, sub) in &s.subs {
                        if same_client && *f <= after.1 {
                            continue;
                        }
                        if filter.as_ref().is_none_or(|want| want == f) {
                            hits.push((&s.client_id, f, sub.opts.qos));
                        }
                    }
                }
                let total = hits.len();
                smallest(&mut hits, limit, |a, b| (a.0, a.1).cmp(&(b.0, b.1)));
                let items = hits
                    .into_iter()
                    .map(|(c, f, qos)| SubscriptionInfo {
                        client_id: c.to_string(),
                        filter: f.to_string(),
                        qos,
                        shard: self.id,
                    })
                    .collect();
                AdminReply::Subscriptions(Page { items, total })
            }
            AdminQuery::Retained { filter, limit } => {
                if !topic::valid_filter(&filter, &self.topic_limits) {
                    return AdminReply::Refused(format!("`{filter}` is not a valid topic filter"));
                }
                let mut items = Vec::new();
                // One pass over the matching part of the tree; `limit` bounds what is kept.
                self.retained.lookup(&filter, None, usize::MAX, |m| {
                    if items.len() < limit {
                        items.push(RetainedInfo {
                            topic: m.topic.clone(),
                            payload: m.payload.clone(),
                            qos: m.qos,
                            shard: self.id,
                        });
                    }
                });
                AdminReply::Retained(items)
            }
            AdminQuery::DeleteRetained { topic } => {
                if !topic::valid_topic_name(&topic, &self.topic_limits) {
                    return AdminReply::Refused(format!("`{topic}` is not a valid topic name"));
                }
                let removed = self.retained.remove(&topic).is_some();
                if removed && !topic.starts_with("$SYS") {
                    self.effects.retained.push((topic, None));
                }
                AdminReply::Done(removed)
            }
            AdminQuery::LiveWatch { tap, filter } => {
                if !topic::valid_filter(&filter, &self.topic_limits) {
                    return AdminReply::Refused(format!("`{filter}` is not a valid topic filter"));
                }
                self.taps.expire(now_ms);
                if let Some(t) = self.taps.taps.iter_mut().find(|t| t.id == tap) {
                    t.filter = filter;
                    t.polled_ms = now_ms;
                    return AdminReply::Done(true);
                }
                if self.taps.len() >= TAPS_MAX {
                    return AdminReply::Refused(format!("{TAPS_MAX} live views are open already"));
                }
                self.taps.taps.push(Tap {
                    id: tap,
                    filter,
                    polled_ms: now_ms,
                    samples: VecDeque::new(),
                    skipped: 0,
                    window_ms: now_ms,
                    in_window: 0,
                });
                AdminReply::Done(true)
            }
            AdminQuery::LiveTake { tap } => {
                self.taps.expire(now_ms);
                let Some(t) = self.taps.taps.iter_mut().find(|t| t.id == tap) else {
                    return AdminReply::Live(LiveBatch::default());
                };
                t.polled_ms = now_ms;
                AdminReply::Live(LiveBatch {
                    samples: t.samples.drain(..).collect(),
                    skipped: std::mem::take(&mut t.skipped),
                    known: true,
                })
            }
            AdminQuery::LiveStop { tap } => {
                let before = self.taps.len();
                self.taps.taps.retain(|t| t.id != tap);
                AdminReply::Done(self.taps.len() < before)
            }
        }
    }

    /// One page of the sessions hosted here (`connected_only`: those with a connection).
    fn session_page(&self, connected_only: bool, search: &str, after: &str, limit: usize) -> Page<ClientInfo> {
        let mut hits: Vec<&Session> = self
            .sessions
            .values()
            .filter(|s| (!connected_only || s.conn.is_some()) && matches_page(&s.client_id, search, after))
            .collect();
        let total = hits.len();
        smallest(&mut hits, limit, |a, b| a.client_id.cmp(&b.client_id));
        Page { items: hits.into_iter().map(|s| self.client_info(s, false)).collect(), total }
    }

    fn snapshot(&self, now_ms: u64) -> Snapshot {
        Snapshot {
            shard: self.id,
            stats: self.stats(),
            connections: self.conns.len() as u64,
            uptime_ms: now_ms.saturating_sub(self.started_ms),
            mappings: self.outbox.mapping_stats().map(|(m, c, s)| (m.to_string(), c.to_string(), *s)).collect(),
            inbound: self.inbound.counters().map(|(m, c)| (m.to_string(), *c)).collect(),
            spill: self.spill_stats,
            kafka_pending: self.outbox.pending() as u64,
            spilling: self.outbox.spilling(),
            live_taps: self.taps.len() as u64,
        }
    }

    fn client_info(&self, s: &Session, details: bool) -> ClientInfo {
        let conn = s.conn.and_then(|c| self.conns.get(&c));
        let mut subscriptions = Vec::new();
        if details {
            subscriptions = s.subs.iter().map(|(f, sub)| (f.clone(), sub.opts.qos)).collect();
            subscriptions.sort();
        }
        ClientInfo {
            client_id: s.client_id.to_string(),
            shard: self.id,
            connected: conn.is_some(),
            protocol: match conn {
                Some(c) if c.is_v5() => "5",
                Some(_) => "3.1.1",
                None => "",
            },
            keep_alive_secs: conn.map_or(0, |c| c.keep_alive_ms / 1000),
            username: conn.and_then(|c| c.auth.as_ref()?.user.as_deref().map(str::to_string)),
            listener: conn.map_or(0, |c| c.listener),
            subscriptions,
            inflight: s.inflight.len(),
            queued: s.queue.len(),
            session_expiry_secs: s.expiry_secs,
            subscription_count: s.subs.len(),
            cluster_claim: s.conn.and_then(|c| self.claim_state(c)),
        }
    }

    /// The live view: `msg`, published on this shard, for the taps that want a sample of it.
    /// Called only when some tap exists.
    pub(super) fn tap(&mut self, msg: &Msg, now_ms: u64) {
        let want = self.taps.wanting(&msg.topic, now_ms);
        if want.is_empty() {
            return;
        }
        let mut kafka = Vec::new();
        self.outbox.router().route(msg, self.wall_offset_ms + now_ms as i64, &mut kafka);
        let router = self.outbox.router();
        let records: Vec<LiveRecord> = kafka
            .iter()
            .map(|r| {
                let mut headers = Vec::new();
                r.for_each_header(|k, v| headers.push((k.to_string(), Bytes::copy_from_slice(v))));
                LiveRecord {
                    mapping: router.mapping_name(r.mapping).to_string(),
                    cluster: router.clusters().get(usize::from(r.cluster)).cloned().unwrap_or_default(),
                    topic: r.topic.to_string(),
                    key: r.key().map(Bytes::copy_from_slice),
                    partition: r.partition(),
                    headers,
                }
            })
            .collect();
        let sample = LiveSample {
            wall_ms: self.wall_offset_ms + now_ms as i64,
            topic: msg.topic.clone(),
            payload: msg.payload.slice(..msg.payload.len().min(SAMPLE_PAYLOAD_MAX)),
            payload_len: msg.payload.len(),
            qos: msg.qos,
            retain: msg.retain,
            client_id: crate::inbound::origin_name(&msg.origin).into_owned(),
            shard: self.id,
            records,
        };
        for i in want {
            let t = &mut self.taps.taps[i];
            if t.samples.len() >= TAP_SAMPLES_MAX {
                t.samples.pop_front();
                t.skipped += 1;
            }
            t.samples.push_back(sample.clone());
        }
    }
}
