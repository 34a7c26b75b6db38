//! The broker state one core owns, as a sans-I/O state machine.
//!
//! A [`Shard`] holds the connections its core accepted, the sessions hosted there, a trie of those
//! sessions' subscriptions, and the hash-partition of retained messages, session directory entries
//! and shared-subscription groups that this shard owns. It never blocks, never locks and never
//! touches a socket: the caller feeds it bytes ([`Shard::on_bytes`]), lost connections, ticks and
//! [`ShardMsg`]s from other shards, then drains [`Shard::take_output`] (bytes per connection) and
//! [`Shard::drain_effects`] (connections to close, messages for other shards).
//!
//! How the shards cooperate, all by message passing:
//! - Publish: matched against the local trie, and sent as one [`ShardMsg::Publish`] to every other
//!   shard, which matches its own trie. One FIFO channel per pair of shards keeps per-publisher order.
//! - Retained messages: stored by the shard that owns `hash(topic)`, in a [`RetainedTree`]; a new
//!   subscription asks every shard ([`ShardMsg::RetainedQuery`]), which answers in slices on
//!   credit, fed into the session after its SUBACK as room allows (`crate::retained_feed`).
//! - Sessions: the shard owning `hash(client_id)` keeps the directory entry "which shard hosts this
//!   session". A CONNECT claims the id there; the directory evicts the previous host, which closes
//!   the old connection (0x8E) and ships the session over ([`ShardMsg::Transfer`]).
//! - Shared subscriptions: the shard owning `hash(group/filter)` keeps the member list and picks
//!   one member per message, round-robin, wherever the member's shard is.
//!
//! Invariants: every queue has a bound from [`Limits`]; a session is hosted by at most one shard;
//! a session's subscriptions are in the trie of exactly the shard hosting it.

use crate::{HashMap, HashSet};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::bridge::{ProduceError, ProduceRequest, ProduceResult};
use crate::config::{Limits, QueueFullPolicy};
use crate::inbound::{self, Inbound, InboundRecord, Positions};
pub use crate::message::{expiry_left_secs, ClientId, ConnId, Message, Msg, ShardId};
use crate::packet::{
    self, reason, ConnAck, Connect, Disconnect, Packet, Properties, PubResp, Publish, PublishRef, SubAck, SubOptions,
    Subscribe, UnsubAck, Unsubscribe, Version, Will,
};
use crate::preconnect::{Admission, Preconnect};
use crate::retained::RetainedTree;
use crate::retained_feed::{Feed, LiveSet, RetainedFilter, Scans};
use crate::session::{Delivery, Inflight, Sub};
pub use crate::session::{Session, StoredMessage};
use crate::topic::{self, TopicLimits, Trie};

mod access;
mod ack_queue;
mod acks;
mod admin;
mod backpressure;
mod cluster_claims;
mod commits;
mod conn;
mod connect;
mod connection;
mod deliver;
mod directory;
mod drain_waiters;
mod id_map;
mod inbound_feed;
mod inbound_state;
mod input;
mod kafka_results;
mod outbox;
mod persistence;
mod publish;
mod receipt_book;
mod receipts;
mod retained_delivery;
mod routing;
mod session_records;
mod sessions;
mod shard_msg;
mod share_groups;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
mod stats;
mod subscribe;
mod sys;
mod timers;
mod transfer;
use access::{Access, ConnAuth, Credentials, Decision};
pub use access::{AccessRules, VerifyJob};
use ack_queue::AckQueue;
use admin::LiveTaps;
pub use admin::{
    AdminQuery, AdminReply, ClientInfo, LiveBatch, LiveRecord, LiveSample, Page, RetainedInfo, Snapshot,
    SubscriptionInfo, PAGE_MAX, SAMPLE_PAYLOAD_MAX, TAPS_MAX, TAP_IDLE_MS, TAP_RATE_PER_SEC, TAP_SAMPLES_MAX,
};
use cluster_claims::ClusterClaims;
use commits::SessionCommits;
use conn::{Conn, ConnState, Detach, PendingSub, OUT_HINT_MAX};
use deliver::member_busy;
use directory::{Claim, ClaimGo, Directory};
use drain_waiters::{DrainWaiter, DrainWaiters};
use inbound_feed::{InboundFeed, FEED_TOKEN};
use inbound_state::InboundState;
pub use inbound_state::{InboundCounters, SKIP_CAUSES};
use input::{held_in, held_key};
use outbox::KafkaOutbox;
pub use outbox::{BridgeOptions, MappingStats, FAILURE_CAUSES, LATENCY_BUCKETS_US};
pub use receipt_book::Receipt;
use receipt_book::{PositionMoves, ReceiptBook, ReceiptFor};
use routing::Routing;
use sessions::{SessionKey, Sessions};
pub use shard_msg::ShardMsg;
pub use share_groups::ShareMember;
use share_groups::{share_key, ShareGroups};
pub use stats::{ClusterStats, Stats};

/// What the caller must do besides writing bytes.
#[derive(Debug, Default)]
pub struct Effects {
    /// Connections whose output buffer has bytes to write.
    pub dirty: Vec<ConnId>,
    /// Connections whose input waits here (more than [`HELD_INPUT_MAX`]): stop reading them
    /// until they appear in `resume_reading`, so TCP flow control reaches the client.
    pub pause_reading: Vec<ConnId>,
    pub resume_reading: Vec<ConnId>,
    /// Connections to close once their output is flushed.
    pub close: Vec<ConnId>,
    /// Messages for other shards, in send order.
    pub to_shards: Vec<(ShardId, ShardMsg)>,
    /// Records for the Kafka producers, in publish order.
    pub produce: Vec<ProduceRequest>,
    /// Things an operator should read in the log (each says what and where, once per cause).
    pub warnings: Vec<String>,
    /// Retained messages this shard stored (`Some`) or cleared (`None`), in order, for the
    /// caller to persist (`$SYS/` topics excluded).
    pub retained: Vec<(String, Option<Msg>)>,
    /// An acknowledgement waits for the session store: commit now rather than at the next tick.
    pub sessions_urgent: bool,
    /// Retained scans wait for a turn: call [`Shard::run_retained`] (in turns of their own).
    pub retained_work: bool,
    /// Password checks too slow for the shard (argon2id): run each off the reactor and report
    /// with [`Shard::on_verified`].
    pub verify: Vec<VerifyJob>,
}

pub struct Shard {
    id: ShardId,
    n_shards: usize,
    limits: Limits,
    topic_limits: TopicLimits,
    /// Boxed: the tables hold pointers, so their spare capacity costs 8 bytes a slot, not a
    /// whole connection or session (most of a million devices are idle; this is their memory).
    conns: HashMap<ConnId, Box<Conn>>,
    /// The connections in `ConnState::AwaitConnect`: deadline, buffer budget, per-address cap.
    preconnect: Preconnect,
    /// By client id, each in a slot whose key the per-message paths carry (`sessions.rs`).
    sessions: Sessions,
    trie: Trie<ClientId, Sub>,
    /// Scratch for [`Shard::route_here`]: the subscriptions one message matched.
    route_matches: Vec<(ClientId, u8, bool, Option<u32>)>,
    retained: RetainedTree,
    /// Scans of `retained` for subscribers anywhere, run in slices on credit.
    retained_scans: Scans,
    /// Sessions here receiving retained messages for new subscriptions.
    retained_feeds: HashMap<ClientId, Feed>,
    next_retained_scan: u64,
    directory: Directory,
    shared: ShareGroups,
    effects: Effects,
    local: VecDeque<ShardMsg>,
    stats: Stats,
    shard_stats: Vec<Stats>,
    /// Connections open on all shards, as last reported; the max_connections check uses it.
    started_ms: u64,
    next_assigned: u64,
    last_sys_ms: u64,
    last_stats_ms: u64,
    last_keepalive_scan_ms: u64,
    /// Unix time in ms at `now_ms == 0`, for Kafka record timestamps.
    wall_offset_ms: i64,
    /// Authentication rules, the cache of checks, the back-off of failing addresses.
    access: Access,
    /// MQTT → Kafka: records in flight, their waiters, QoS 0 policy, outage spilling.
    outbox: KafkaOutbox,
    spill_stats: Option<(u64, u64, u64)>,
    /// Kafka → MQTT mappings, their counters and the consumer positions finished here.
    inbound: InboundState,
    /// Consumed records not routed yet, routed in slices that fit the receivers' room.
    feed: InboundFeed,
    /// Persistent sessions changed, and what waits for the store to commit them.
    commits: SessionCommits,
    /// Receipts this shard opened, answers it holds for others, and Kafka slices' positions.
    receipts: ReceiptBook,
    /// What waits for congested sessions here to drain (back-pressure).
    drain: DrainWaiters,
    /// The live view's taps: samples of messages published here (rate-bounded).
    taps: LiveTaps,
    /// Cluster takeover: this node's claims of client ids, and other nodes' (cluster only).
    claims: ClusterClaims,
}

/// A change to one persistent session, for the caller's session store.
#[derive(Debug)]
pub enum SessionChange {
    Put { client_id: ClientId, generation: u64, bytes: Vec<u8> },
    Delete { client_id: ClientId },
}

/// Input held for a blocked connection beyond which the network layer stops reading it.
pub const HELD_INPUT_MAX: usize = 256 << 10;
/// Bytes of packets deferred for a 3.1.1 client waiting for QoS 2 room (see `Conn::deferred`).
const DEFERRED_BYTES_MAX: usize = 1 << 20;

/// How often shards exchange their counters.
const STATS_SHARE_INTERVAL_MS: u64 = 1000;

fn shard_of(key: &str, n: usize) -> ShardId {
    // FNV-1a: stable across processes and releases, unlike std's RandomState.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    (h % n as u64) as usize
}

/// What a deferred packet counts against [`DEFERRED_BYTES_MAX`].
fn deferred_size(p: &Packet) -> usize {
    match p {
        // What the packet holds plus what its place in the queue costs.
        Packet::Publish(pb) => pb.payload.len() + pb.topic.len() + 128,
        _ => 128,
    }
}

/// Which shard owns the directory entry of `client_id` among `n` shards.
pub fn directory_shard(client_id: &str, n: usize) -> ShardId {
    shard_of(client_id, n)
}

impl Shard {
    pub fn new(id: ShardId, n_shards: usize, limits: Limits, now_ms: u64) -> Self {
        let topic_limits = TopicLimits { max_levels: limits.max_topic_levels, max_len: limits.max_topic_length };
        let preconnect = Preconnect::new(
            limits.connect_timeout_ms,
            limits.max_preconnect_buffer_bytes_per_shard,
            limits.max_preconnect_per_address,
        );
        Shard {
            id,
            n_shards,
            limits,
            topic_limits,
            conns: HashMap::default(),
            preconnect,
            sessions: Sessions::default(),
            route_matches: Vec::new(),
            trie: Trie::default(),
            retained: RetainedTree::default(),
            retained_scans: Scans::default(),
            retained_feeds: HashMap::default(),
            next_retained_scan: 0,
            directory: Directory::default(),
            shared: ShareGroups::default(),
            effects: Effects::default(),
            local: VecDeque::new(),
            stats: Stats::default(),
            shard_stats: vec![Stats::default(); n_shards],
            started_ms: now_ms,
            next_assigned: 0,
            last_sys_ms: now_ms,
            last_stats_ms: now_ms,
            last_keepalive_scan_ms: now_ms,
            wall_offset_ms: 0,
            access: Access::new(),
            outbox: KafkaOutbox::default(),
            spill_stats: None,
            inbound: InboundState::default(),
            feed: InboundFeed::new(crate::config::DEFAULT_KAFKA_TO_MQTT_MAX_WAIT_MS),
            commits: SessionCommits::default(),
            receipts: ReceiptBook::default(),
            drain: DrainWaiters::default(),
            taps: LiveTaps::default(),
            claims: ClusterClaims::default(),
        }
    }

    /// Turns on the MQTT → Kafka bridge: messages matching `options.router` become produce
    /// requests in [`Effects::produce`], and QoS 1/2 acknowledgements wait for Kafka (or the
    /// spill log), as [`BridgeOptions`] say.
    pub fn with_bridge(mut self, options: BridgeOptions) -> Self {
        self.claims = ClusterClaims::new(options.router.cluster_claims(), options.router.cluster_lease_ms());
        self.outbox = KafkaOutbox::new(options);
        self.outbox.set_wall_offset(self.wall_offset_ms);
        self
    }

    /// Authentication and authorization from now on (at start, and on every reload): `rules`
    /// shared by every shard, a cache of `cache_entries` successful password checks for
    /// `cache_ttl_ms`. Connected clients keep who they are; their ACL follows the new rules from
    /// their next packet.
    pub fn set_access(&mut self, rules: Arc<AccessRules>, cache_entries: usize, cache_ttl_ms: u64) {
        self.access.set_rules(rules, cache_entries, cache_ttl_ms);
    }

    /// As [`Shard::set_access`], for the connections of `listener` only (its own
    /// `[listeners.auth]`): these rules replace the global ones there, at CONNECT, on every
    /// packet and every delivery.
    pub fn set_listener_access(
        &mut self,
        listener: u16,
        rules: Arc<AccessRules>,
        cache_entries: usize,
        cache_ttl_ms: u64,
    ) {
        self.access.set_listener_rules(listener, rules, cache_entries, cache_ttl_ms);
    }

    pub fn id(&self) -> ShardId {
        self.id
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats;
        s.sessions = self.sessions.len() as u64;
        s.subscriptions = self.trie.len() as u64;
        s.retained = self.retained.len() as u64;
        s.preconnect_connections = self.preconnect.len() as u64;
        s.preconnect_bytes = self.preconnect.buffered() as u64;
        s.cluster = self.claims.stats();
        s
    }

    /// Bytes that partial CONNECTs held at their peak since the last call beyond what they hold
    /// now: the caller may ask its allocator to hand freed memory back to the operating system.
    pub fn take_preconnect_released(&mut self) -> usize {
        self.preconnect.take_released()
    }

    /// Connections open on this shard (accepted, any state).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether one more socket may be accepted: open sockets on this shard plus connected clients
    /// on the others, as last reported, stay below `max_connections`.
    pub fn may_accept(&self) -> bool {
        self.others_connected() + self.conns.len() < self.limits.max_connections
    }

    /// Whether one more client may complete CONNECT, counting connected clients on all shards.
    pub(super) fn may_connect(&self) -> bool {
        self.others_connected() + (self.stats.clients_connected as usize) < self.limits.max_connections
    }

    pub(super) fn others_connected(&self) -> usize {
        let others: u64 =
            self.shard_stats.iter().enumerate().filter(|(i, _)| *i != self.id).map(|(_, s)| s.clients_connected).sum();
        others as usize
    }

    pub fn drain_effects(&mut self) -> Effects {
        std::mem::take(&mut self.effects)
    }

    /// An emptied `Effects::produce` vector back, so the next records reuse its allocation.
    pub fn recycle_produce_buffer(&mut self, mut v: Vec<ProduceRequest>) {
        v.clear();
        if self.effects.produce.is_empty() && self.effects.produce.capacity() < v.capacity() {
            self.effects.produce = v;
        }
    }

    /// Messages from another shard.
    pub fn on_shard_msgs(&mut self, msgs: impl IntoIterator<Item = ShardMsg>, now_ms: u64) {
        for m in msgs {
            self.handle_shard_msg(m, now_ms);
        }
        self.run_local(now_ms);
    }

    /// Periodic work: keep-alive, delayed wills, session expiry, `$SYS`. Call every ~100 ms.
    pub fn tick(&mut self, now_ms: u64, sys_interval_ms: u64) {
        self.stop_waiting_for_slow_subscribers(now_ms);
        if now_ms.saturating_sub(self.last_keepalive_scan_ms) >= 500 {
            self.last_keepalive_scan_ms = now_ms;
            self.close_silent_connections(now_ms);
            self.close_connect_late(now_ms);
            self.expire_wills_and_sessions(now_ms);
            self.close_unconfirmed(now_ms);
        }
        self.renew_lease(now_ms);
        self.send_delayed_refusals(now_ms);
        self.expire_feed_holds(now_ms);
        if now_ms.saturating_sub(self.last_stats_ms) >= STATS_SHARE_INTERVAL_MS {
            self.last_stats_ms = now_ms;
            self.share_stats();
        }
        if sys_interval_ms > 0 && now_ms.saturating_sub(self.last_sys_ms) >= sys_interval_ms {
            self.last_sys_ms = now_ms;
            self.publish_sys(now_ms);
        }
        self.run_local(now_ms);
    }

    /// Clean shutdown: close every connection without publishing wills; sessions stay as they are.
    pub fn shutdown(&mut self, now_ms: u64) {
        // In a cluster: the records that wait for the next lease go now (there is none).
        self.flush_records(now_ms);
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.conns.get_mut(&id) {
                c.will = None;
            }
            self.close(id, Some(reason::SERVER_SHUTTING_DOWN), now_ms);
        }
    }

    pub(super) fn send_to_shard(&mut self, to: ShardId, msg: ShardMsg) {
        if to == self.id {
            self.local.push_back(msg);
        } else {
            self.effects.to_shards.push((to, msg));
        }
    }

    pub(super) fn run_local(&mut self, now_ms: u64) {
        while let Some(m) = self.local.pop_front() {
            self.handle_shard_msg(m, now_ms);
        }
    }

    pub(super) fn handle_shard_msg(&mut self, m: ShardMsg, now_ms: u64) {
        match m {
            ShardMsg::Publish(msg) => self.route_here(&msg, &mut Routing::default(), now_ms),
            ShardMsg::PublishReceipt { msg, receipt } => {
                let mut routing = Routing::under(receipt);
                self.route_here(&msg, &mut routing, now_ms);
                if receipt.token & FEED_TOKEN != 0 {
                    self.answer_feed_receipt(receipt, routing, &msg, now_ms);
                } else {
                    self.answer_receipt(receipt, routing);
                }
            }
            ShardMsg::Receipt { token, more, failed } => self.on_receipt(token, more, failed),
            ShardMsg::Claim { client_id, host, conn, clean_start } => {
                self.on_claim(client_id, Claim { host, conn, clean_start })
            }
            ShardMsg::Settled { client_id, host, hosting } => self.on_settled(client_id, host, hosting),
            ShardMsg::Evict { client_id, to, conn, clean_start } => {
                self.on_evict(client_id, to, conn, clean_start, now_ms)
            }
            ShardMsg::Transfer { client_id, conn, session, remote } => {
                self.on_transfer(client_id, conn, session, remote, now_ms)
            }
            // While a claim is under way its claimer reports the outcome (`Settled`); a release
            // from before it must not clear the entry the claim just made.
            ShardMsg::Release { client_id, host } => self.directory.released(&client_id, host),
            ShardMsg::RetainedQuery { from, scan, client_id, filters } => {
                self.retained_scans.query(from, scan, client_id, filters);
                self.effects.retained_work = true;
            }
            ShardMsg::RetainedMore { from, scan } => {
                self.retained_scans.more(from, scan);
                self.effects.retained_work |= self.retained_scans.has_work();
            }
            ShardMsg::RetainedCancel { from, scan } => {
                self.retained_scans.cancel(from, scan);
                self.effects.retained_work |= self.retained_scans.has_work();
            }
            ShardMsg::RetainedReply { from, scan, client_id, msgs, done } => {
                let Some(feed) = self.retained_feeds.get_mut(&client_id) else { return };
                if feed.on_reply(from, scan, msgs, done) {
                    self.feed_retained(&client_id, now_ms);
                }
            }
            ShardMsg::ShareJoined { conn } => self.subscribe_step_done(conn, true, now_ms),
            ShardMsg::ShareJoin { key, member, ack } => {
                if let Some(conn) = ack {
                    self.send_to_shard(member.shard, ShardMsg::ShareJoined { conn });
                }
                let had = self.shared.has_members(&key);
                self.shared.join(&key, member);
                self.share_members_changed(&key, had, now_ms);
            }
            ShardMsg::ShareLeave { key, client_id } => {
                let had = self.shared.has_members(&key);
                self.shared.leave(&key, &client_id);
                self.share_members_changed(&key, had, now_ms);
            }
            ShardMsg::ShareBusy { key, client_id, busy } => self.shared.set_busy(&key, &client_id, busy),
            ShardMsg::ShareDeliver { client_id, msg, opts, sub_id, receipt } => {
                // Nobody here waits on this copy's congestion: the receipt answers what it stored.
                let mut routing = Routing::default();
                self.deliver_shared(&client_id, msg, opts, sub_id, &mut routing, now_ms);
                self.report_share_load(&client_id);
                if let Some(r) = receipt {
                    self.answer_receipt(r, routing);
                }
            }
            ShardMsg::Stats { from, stats } => {
                if let Some(s) = self.shard_stats.get_mut(from) {
                    *s = *stats;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
