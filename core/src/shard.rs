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

use crate::bridge::{Delivery as DeliveryMode, KafkaRecord, ProduceError, ProduceRequest, ProduceResult, Router};
use crate::config::{Limits, Qos0Policy, QueueFullPolicy};
use crate::inbound::{Inbound, InboundRecord, Positions, Skip};
use crate::packet::{
    self, reason, ConnAck, Connect, Disconnect, Packet, Properties, PubResp, Publish, PublishRef, SubAck, SubOptions,
    Subscribe, UnsubAck, Unsubscribe, Version, Will,
};
use crate::preconnect::{Admission, Preconnect};
use crate::retained::RetainedTree;
use crate::retained_feed::{Feed, RetainedFilter, Scans};
use crate::session::{Delivery, Inflight, Sub};
pub use crate::session::{Session, StoredMessage};
use crate::topic::{self, TopicLimits, Trie};

mod inbound_feed;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
use inbound_feed::{InboundFeed, FEED_TOKEN};

pub type ShardId = usize;
/// A connection's id, unique within its shard.
pub type ConnId = u64;
pub type ClientId = Arc<str>;

/// An application message as it travels between shards: immutable, shared.
#[derive(Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Publish properties to forward (no alias, no subscription ids, no expiry: see `expiry_at_ms`);
    /// `None` when there are none — see [`Message::properties`].
    pub properties: Option<Box<Properties>>,
    pub expiry_at_ms: Option<u64>,
    /// Client id of the publisher, for No Local.
    pub origin: ClientId,
}

impl Message {
    pub fn properties(&self) -> &Properties {
        static NONE: Properties = Properties::EMPTY;
        self.properties.as_deref().unwrap_or(&NONE)
    }
}

pub type Msg = Arc<Message>;

/// Work one shard asks of another.
#[derive(Debug)]
pub enum ShardMsg {
    Publish(Msg),
    /// A publish whose sender waits until what it changed here is durable (queued for a
    /// persistent session, or a retained message stored): answer [`ShardMsg::Receipt`] then.
    PublishReceipt {
        msg: Msg,
        receipt: Receipt,
    },
    /// The answer to a receipt: this shard is done, and `more` shards it forwarded the message
    /// to (shared subscriptions) will answer too.
    Receipt {
        token: u64,
        more: u32,
        /// What this shard stored for the message could not be committed (disk full, I/O
        /// error): the acknowledgement waiting for it must refuse instead.
        failed: bool,
    },
    /// To the directory shard: `host` wants the session of `client_id` for connection `conn`.
    Claim {
        client_id: ClientId,
        host: ShardId,
        conn: ConnId,
        clean_start: bool,
    },
    /// To the previous host: close the old connection and send the session to `to`.
    Evict {
        client_id: ClientId,
        to: ShardId,
        conn: ConnId,
        clean_start: bool,
    },
    /// To the new host: the session (if any) for the pending connection `conn`.
    Transfer {
        client_id: ClientId,
        conn: ConnId,
        session: Option<Box<Session>>,
    },
    /// To the directory shard: the session ended on `host`.
    Release {
        client_id: ClientId,
        host: ShardId,
    },
    /// To the directory shard: the claim it answered last for `client_id` is carried out; the
    /// claimer `host` now hosts the session (`hosting`) or, its connection gone, ended it. The
    /// next waiting claim may go ahead.
    Settled {
        client_id: ClientId,
        host: ShardId,
        hosting: bool,
    },
    /// To every shard, for a session's new subscriptions: scan the retained messages matching
    /// `filters` and answer in slices ([`ShardMsg::RetainedReply`]), one per credit.
    RetainedQuery {
        from: ShardId,
        scan: u64,
        client_id: ClientId,
        filters: Vec<String>,
    },
    /// One slice of a scan: messages with the index of the filter they matched. `done`: the
    /// owner `from` has nothing more for this scan.
    RetainedReply {
        from: ShardId,
        scan: u64,
        client_id: ClientId,
        msgs: Vec<(u32, Msg)>,
        done: bool,
    },
    /// To an owner: the subscriber's backlog ran low, send the next slice of `scan`.
    RetainedMore {
        from: ShardId,
        scan: u64,
    },
    /// To an owner: the session went away, drop `scan`.
    RetainedCancel {
        from: ShardId,
        scan: u64,
    },
    /// To the group's owner. With `ack`, the owner answers [`ShardMsg::ShareJoined`] so that the
    /// SUBACK goes out only once the member can receive.
    ShareJoin {
        key: String,
        member: ShareMember,
        ack: Option<ConnId>,
    },
    ShareJoined {
        conn: ConnId,
    },
    ShareLeave {
        key: String,
        client_id: ClientId,
    },
    ShareDeliver {
        client_id: ClientId,
        msg: Msg,
        opts: SubOptions,
        sub_id: Option<u32>,
        receipt: Option<Receipt>,
    },
    /// To shard 0: this shard's counters, for the `$SYS/broker/...` totals.
    Stats {
        from: ShardId,
        stats: Stats,
    },
}

/// A consumed partition: (Kafka → MQTT mapping, topic, partition).
type PartitionKey = (u16, Arc<str>, i32);

/// Who waits for a [`ShardMsg::Receipt`], and under which token.
#[derive(Clone, Copy, Debug)]
pub struct Receipt {
    pub from: ShardId,
    pub token: u64,
}

/// A receipt of this shard's: answers still expected, whether one of them failed, and what
/// completes when all are in.
struct ReceiptWait {
    left: u32,
    failed: bool,
    then: ReceiptFor,
}

/// What completes when every shard answered a receipt.
enum ReceiptFor {
    /// A PUBACK/PUBREC `(conn, ack seq)`.
    Ack(ConnId, u64),
    /// A batch of Kafka records: their positions may move.
    Positions,
}

/// The directory's record of one client id, kept by the shard owning `hash(client_id)`.
///
/// Claims are carried out one at a time: while one is under way (its `Evict` and `Transfer` in
/// flight, `busy`), later claims wait here. So when an `Evict` reaches the previous host, that
/// host has finished its own claim and holds the session (or nothing) — never a session still
/// on its way — and two connections can never both end up holding one client id's session.
#[derive(Debug, Default)]
struct DirEntry {
    /// The shard hosting the session, or about to; `None` once it ended there.
    host: Option<ShardId>,
    busy: bool,
    /// Claims waiting their turn: `(host, conn, clean_start)`. Bounded by the connections that
    /// are between CONNECT and CONNACK.
    waiting: VecDeque<(ShardId, ConnId, bool)>,
}

#[derive(Clone, Debug)]
pub struct ShareMember {
    pub client_id: ClientId,
    pub shard: ShardId,
    pub opts: SubOptions,
    pub sub_id: Option<u32>,
}

/// Counters a shard keeps; published under `$SYS/`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub clients_connected: u64,
    pub sessions: u64,
    pub subscriptions: u64,
    pub retained: u64,
    pub messages_received: u64,
    pub messages_sent: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub dropped_queue_full: u64,
    pub dropped_slow_qos0: u64,
    pub dropped_too_large: u64,
    pub dropped_expired: u64,
    pub malformed: u64,
    /// Packets that arrived on a connection no longer holding its session (closed, 0x8E).
    pub orphaned_packets: u64,
    /// Times a subscriber held publishers back for `max_backpressure_ms` and was let go.
    pub slow_subscribers: u64,
    /// Acknowledgements refused because the session or retained store could not commit.
    pub store_refusals: u64,
    /// Connections that have not completed CONNECT, and the bytes their partial CONNECTs hold.
    pub preconnect_connections: u64,
    pub preconnect_bytes: u64,
    /// Closed before CONNECT: at accept by `max_preconnect_per_address`, or for growing past
    /// `max_preconnect_buffer_bytes_per_shard`. (A CONNECT over `max_connect_packet_bytes` is
    /// refused from its fixed header and counted in `malformed`, like any over-size packet.)
    pub refused_preconnect: u64,
    /// Closed because CONNECT was not complete `connect_timeout_ms` after accept.
    pub connect_timeouts: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        let Stats {
            clients_connected,
            sessions,
            subscriptions,
            retained,
            messages_received,
            messages_sent,
            bytes_received,
            bytes_sent,
            dropped_queue_full,
            dropped_slow_qos0,
            dropped_too_large,
            dropped_expired,
            malformed,
            orphaned_packets,
            slow_subscribers,
            store_refusals,
            preconnect_connections,
            preconnect_bytes,
            refused_preconnect,
            connect_timeouts,
        } = o;
        self.clients_connected += clients_connected;
        self.sessions += sessions;
        self.subscriptions += subscriptions;
        self.retained += retained;
        self.messages_received += messages_received;
        self.messages_sent += messages_sent;
        self.bytes_received += bytes_received;
        self.bytes_sent += bytes_sent;
        self.dropped_queue_full += dropped_queue_full;
        self.dropped_slow_qos0 += dropped_slow_qos0;
        self.dropped_too_large += dropped_too_large;
        self.dropped_expired += dropped_expired;
        self.malformed += malformed;
        self.orphaned_packets += orphaned_packets;
        self.slow_subscribers += slow_subscribers;
        self.store_refusals += store_refusals;
        self.preconnect_connections += preconnect_connections;
        self.preconnect_bytes += preconnect_bytes;
        self.refused_preconnect += refused_preconnect;
        self.connect_timeouts += connect_timeouts;
    }
}

/// Why a connection leaves its session.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Detach {
    /// Closed or lost: the session goes offline here (or ends, with expiry 0).
    Lost,
    /// Taken over by a new connection: the session moves to it.
    Moves,
}

enum ConnState {
    AwaitConnect,
    /// CONNECT accepted, waiting for the directory and the previous host.
    Pending(Box<Connect>),
    Active,
    /// Closing: the last bytes are being flushed; input is ignored.
    Closing,
}

struct Conn {
    state: ConnState,
    version: Option<Version>,
    client_id: Option<ClientId>,
    out: BytesMut,
    keep_alive_ms: u64,
    last_rx_ms: u64,
    client_max_packet: usize,
    client_receive_max: u16,
    client_alias_max: u16,
    /// Topic aliases, both ways (MQTT 5 clients that use them only).
    aliases: Option<Box<Aliases>>,
    will: Option<Box<Will>>,
    assigned_id: bool,
    /// Session expiry asked for in CONNECT (MQTT 5); DISCONNECT may not raise it from 0.
    connect_expiry: u32,
    /// Input that arrived while the connection was blocked (pending CONNECT or SUBSCRIBE),
    /// decoded once it unblocks, so packets are handled strictly in order.
    held: BytesMut,
    /// A SUBSCRIBE waiting for shared-group owners to confirm.
    pending_sub: Option<Box<PendingSub>>,
    /// 3.1.1 has no Receive Maximum: packets that arrived while `max_inflight` QoS 2 messages of
    /// this client await PUBREL wait here, in order, until a PUBREL makes room (acknowledgements
    /// and pings behind them are handled at once). Bounded by [`DEFERRED_BYTES_MAX`]; past it
    /// only acknowledgements and pings are decoded, and once the held input passes
    /// [`HELD_INPUT_MAX`] the connection is no longer read (TCP flow control).
    deferred: VecDeque<Packet>,
    deferred_bytes: usize,
    deferred_full: bool,
    /// The network layer was asked to stop reading this connection.
    reading_paused: bool,
    /// The socket went away while the CONNECT was pending.
    lost: bool,
    /// MQTT 5 Request Problem Information: reason strings allowed on DISCONNECT.
    problem_information: bool,
    /// PUBACK/PUBREC not yet sent, in PUBLISH order; `acks_front_seq` numbers the front one.
    acks: VecDeque<PendingAck>,
    acks_front_seq: u64,
    /// Queued QoS 1/2 messages wait because `out` reached `max_outbound_buffer_bytes`: they move
    /// on when the output has gone out ([`Shard::on_output_drained`]).
    out_full: bool,
}

#[derive(Default)]
struct Aliases {
    inbound: HashMap<u16, String>,
    outbound: HashMap<String, u16>,
}

struct PendingSub {
    acks_left: usize,
    suback: SubAck,
    retained_queries: Vec<(String, SubOptions, Option<u32>)>,
    /// Filters this SUBSCRIBE added (not replaced): taken back if the store cannot commit them.
    added: Vec<String>,
    /// The session store could not commit the subscriptions: the SUBACK refuses them.
    failed: bool,
}

impl Conn {
    fn blocked(&self) -> bool {
        matches!(self.state, ConnState::Pending(_)) || self.pending_sub.is_some() || self.deferred_full
    }

    /// Blocked only by a full deferral queue, and the next packet in `input` is an
    /// acknowledgement or a ping: it may be handled ahead (a PUBREL there is what makes room).
    fn acks_may_pass(&self, input: &[u8]) -> bool {
        let only_deferral = self.deferred_full && self.pending_sub.is_none() && matches!(self.state, ConnState::Active);
        only_deferral && input.first().is_some_and(|b| matches!(b >> 4, 4..=7 | 12))
    }
}

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
}

/// Per-mapping counters of the MQTT → Kafka bridge, published under `$SYS/broker/kafka/NAME/`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MappingStats {
    pub messages_in: u64,
    pub bytes_in: u64,
    pub records_produced: u64,
    pub records_failed: u64,
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
}

/// What waits for a congested session's queue to drain.
enum DrainWaiter {
    /// The acknowledgement number `seq` on a connection of this shard.
    Ack(ConnId, u64),
    /// A held answer to another shard's receipt ([`Shard::held_receipts`]).
    Receipt(u64),
}

/// Publishers waiting for one congested session's queue to drain.
#[derive(Default)]
struct Congestion {
    /// First tick that saw them waiting; they stop waiting `max_backpressure_ms` later.
    since_ms: Option<u64>,
    waiters: Vec<DrainWaiter>,
}

/// An answer to a receipt, held until `waiting` congested sessions drained.
struct HeldReceipt {
    receipt: Receipt,
    more: u32,
    /// The routing also stored something here: the answer then waits for the commit too.
    stored: bool,
    waiting: u32,
}

/// A QoS 1/2 acknowledgement waiting for Kafka or for an earlier one.
struct PendingAck {
    pid: u16,
    qos: u8,
    /// Records of this publish Kafka has not answered yet.
    waiting: u32,
    /// First failure's reason code, or success.
    code: u8,
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
    sessions: HashMap<ClientId, Box<Session>>,
    trie: Trie<ClientId, Sub>,
    /// Scratch for [`Shard::route_here`]: the subscriptions one message matched.
    route_matches: Vec<(ClientId, u8, bool, Option<u32>)>,
    retained: RetainedTree,
    /// Scans of `retained` for subscribers anywhere, run in slices on credit.
    retained_scans: Scans,
    /// Sessions here receiving retained messages for new subscriptions.
    retained_feeds: HashMap<ClientId, Feed>,
    next_retained_scan: u64,
    directory: HashMap<ClientId, DirEntry>,
    shared: Trie<String, ShareGroup>,
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
    router: Router,
    /// Unix time in ms at `now_ms == 0`, for Kafka record timestamps.
    wall_offset_ms: i64,
    next_produce_id: u64,
    /// Record id → the acknowledgement waiting for it.
    kafka_waiters: HashMap<u64, (ConnId, u64)>,
    /// Record id → its mapping, for per-mapping counters.
    kafka_inflight_mapping: HashMap<u64, RecordMeta>,
    delivery: DeliveryMode,
    kafka_pending: usize,
    max_pending_records: usize,
    /// Per (mapping, cluster).
    mapping_stats: HashMap<(u16, u16), MappingStats>,
    logged_failures: HashSet<(u16, &'static str)>,
    spill_stats: Option<(u64, u64, u64)>,
    inbound: Inbound,
    /// Per Kafka → MQTT mapping: records read, MQTT messages published, records skipped.
    inbound_stats: Vec<(u64, u64, u64)>,
    logged_skips: HashSet<(u16, Skip)>,
    /// Consumed records not routed yet, routed in slices that fit the receivers' room.
    feed: InboundFeed,
    /// The connection whose PUBLISH is being routed, and the connected sessions on this shard
    /// whose queues that publish pushed past half full: its acknowledgement waits for them to
    /// drain (back-pressure: the publisher's in-flight window fills instead of queues overflowing).
    publishing: Option<ConnId>,
    congested: Vec<ClientId>,
    /// Session → acknowledgements `(conn, ack seq)` waiting for its queue to drain.
    drain_waiters: HashMap<ClientId, Congestion>,
    /// Sessions that held publishers back for `max_backpressure_ms`: no publisher waits for
    /// them again until their queue drained to a quarter (or they went offline); their queue
    /// follows `queue_full_policy` meanwhile.
    slow: HashSet<ClientId>,
    /// Answers to other shards' receipts held until congested sessions here drain: the
    /// publisher's acknowledgement on its own shard waits for them (back-pressure across shards).
    held_receipts: HashMap<u64, HeldReceipt>,
    next_held_receipt: u64,
    /// Next offset per consumed partition, and whether it moved since the caller last took it.
    /// (mapping, topic, partition) → next offset; names are looked up only when stored.
    positions: HashMap<(u16, Arc<str>, i32), i64>,
    positions_dirty: bool,
    /// The caller stores persistent sessions ([`Shard::with_session_store`]).
    persist_sessions: bool,
    /// Sessions changed since the caller last took the changes.
    dirty_sessions: HashSet<ClientId>,
    /// Acknowledgements `(conn, ack seq)` and SUBSCRIBEs (conn) that wait for the next session
    /// store commit: what they acknowledge must survive a crash.
    store_receipts: Vec<(Receipt, u32)>,
    store_sub_waiters: Vec<ConnId>,
    /// Waiters of changes taken and not yet reported durable, by commit token.
    store_flushing: VecDeque<StoreWaiters>,
    next_store_token: u64,
    /// Set while routing a publish when it changed something stored: queued for a persistent
    /// session at QoS > 0, or a retained message.
    stored_hit: bool,
    /// While routing a publish with a receipt: it, and how many shards it was forwarded to.
    routing_receipt: Option<Receipt>,
    receipt_forwards: u32,
    /// Token → replies still expected, and what completes then.
    receipts: HashMap<u64, ReceiptWait>,
    /// Kafka record batches whose receipt failed (a store could not commit): positions stop
    /// before them until this shard's store commits again.
    failed_position_batches: Vec<u64>,
    next_receipt: u64,
    /// Slices of Kafka records ([`inbound_feed`]) in routing order, with the positions they
    /// move; a slice's positions apply once its receipt and every earlier one completed.
    position_batches: VecDeque<(u64, Vec<(PartitionKey, i64)>)>,
    receipts_done: HashSet<u64>,
    /// `kafka-ack` with a spill log: QoS 1/2 records that time out (Kafka down or hanging) go
    /// to the spill log instead of failing, and records after them follow until it drained.
    outage_spill: bool,
    spilling: bool,
    /// Copies of QoS 1/2 records in flight (with `outage_spill`), to spill if they time out.
    kafka_copies: HashMap<u64, KafkaRecord>,
    /// Spilling: records waiting for the ones still in flight to succeed or reach the spill
    /// log first, so that order per partition holds across the switch.
    held_produce: Vec<ProduceRequest>,
    qos0_policy: Qos0Policy,
    /// QoS 0 records among `kafka_pending`.
    kafka_pending_qos0: usize,
    /// QoS 0 records waiting for room in the Kafka backlog (drop policies only).
    qos0_waiting: VecDeque<ProduceRequest>,
}

/// What the shard remembers of a record handed to Kafka.
#[derive(Clone, Copy)]
struct RecordMeta {
    mapping: u16,
    cluster: u16,
    /// In the spill log: its publisher heard back when it got there.
    durable: bool,
    qos0: bool,
}

/// What waits for one commit of the session store.
struct StoreWaiters {
    token: u64,
    receipts: Vec<(Receipt, u32)>,
    subscribes: Vec<ConnId>,
}

/// A change to one persistent session, for the caller's session store.
#[derive(Debug)]
pub enum SessionChange {
    Put { client_id: ClientId, generation: u64, bytes: Vec<u8> },
    Delete { client_id: ClientId },
}

/// Marks `s` for the session store if it is (or was) persistent.
fn touch(persist: bool, dirty: &mut HashSet<ClientId>, s: &mut Session) {
    if persist && (s.expiry_secs > 0 || s.stored) {
        s.stored = s.expiry_secs > 0;
        dirty.insert(s.client_id.clone());
    }
}

/// Input held for a blocked connection beyond which the network layer stops reading it.
pub const HELD_INPUT_MAX: usize = 256 << 10;
/// Bytes of packets deferred for a 3.1.1 client waiting for QoS 2 room (see `Conn::deferred`).
const DEFERRED_BYTES_MAX: usize = 1 << 20;

/// How often shards exchange their counters.
const STATS_SHARE_INTERVAL_MS: u64 = 1000;

#[derive(Default)]
struct ShareGroup {
    members: Vec<ShareMember>,
    next: usize,
}

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

pub(crate) fn expiry_left_secs(msg: &Message, now_ms: u64) -> Option<Option<u32>> {
    match msg.expiry_at_ms {
        None => Some(None),
        Some(at) if at > now_ms => Some(Some((at - now_ms).div_ceil(1000) as u32)),
        Some(_) => None,
    }
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
            sessions: HashMap::default(),
            route_matches: Vec::new(),
            trie: Trie::default(),
            retained: RetainedTree::default(),
            retained_scans: Scans::default(),
            retained_feeds: HashMap::default(),
            next_retained_scan: 0,
            directory: HashMap::default(),
            shared: Trie::default(),
            effects: Effects::default(),
            local: VecDeque::new(),
            stats: Stats::default(),
            shard_stats: vec![Stats::default(); n_shards],
            started_ms: now_ms,
            next_assigned: 0,
            last_sys_ms: now_ms,
            last_stats_ms: now_ms,
            last_keepalive_scan_ms: now_ms,
            router: Router::default(),
            wall_offset_ms: 0,
            next_produce_id: 0,
            kafka_waiters: HashMap::default(),
            kafka_inflight_mapping: HashMap::default(),
            delivery: DeliveryMode::KafkaAck,
            kafka_pending: 0,
            max_pending_records: usize::MAX,
            mapping_stats: HashMap::default(),
            logged_failures: HashSet::default(),
            spill_stats: None,
            inbound: Inbound::default(),
            inbound_stats: Vec::new(),
            logged_skips: HashSet::default(),
            feed: InboundFeed::new(crate::config::DEFAULT_KAFKA_TO_MQTT_MAX_WAIT_MS),
            publishing: None,
            congested: Vec::new(),
            drain_waiters: HashMap::default(),
            slow: HashSet::default(),
            held_receipts: HashMap::default(),
            next_held_receipt: 0,
            positions: HashMap::default(),
            positions_dirty: false,
            persist_sessions: false,
            dirty_sessions: HashSet::default(),
            store_receipts: Vec::new(),
            store_sub_waiters: Vec::new(),
            store_flushing: VecDeque::new(),
            next_store_token: 0,
            stored_hit: false,
            routing_receipt: None,
            receipt_forwards: 0,
            receipts: HashMap::default(),
            failed_position_batches: Vec::new(),
            next_receipt: 0,
            position_batches: VecDeque::new(),
            receipts_done: HashSet::default(),
            outage_spill: false,
            spilling: false,
            kafka_copies: HashMap::default(),
            held_produce: Vec::new(),
            qos0_policy: Qos0Policy::BackPressure,
            kafka_pending_qos0: 0,
            qos0_waiting: VecDeque::new(),
        }
    }

    /// What QoS 0 records do when `max_pending_records` already wait for Kafka.
    pub fn with_qos0_policy(mut self, policy: Qos0Policy) -> Self {
        self.qos0_policy = policy;
        self
    }

    /// `kafka-ack` with a spill log: QoS 1/2 records that time out go to the spill log (and
    /// the publisher hears back once they are on disk) instead of failing; records after them
    /// follow until the caller reports the log drained ([`Shard::end_spilling`]).
    pub fn with_outage_spill(mut self) -> Self {
        self.outage_spill = self.delivery == DeliveryMode::KafkaAck;
        self
    }

    /// Turns on the MQTT → Kafka bridge: messages matching `router` become produce requests in
    /// [`Effects::produce`], and QoS 1/2 acknowledgements wait for Kafka.
    pub fn with_bridge(
        mut self,
        router: Router,
        delivery: DeliveryMode,
        max_pending_records: usize,
        wall_offset_ms: i64,
    ) -> Self {
        self.delivery = delivery;
        self.router = router;
        self.max_pending_records = max_pending_records.max(1);
        self.wall_offset_ms = wall_offset_ms;
        self
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
    fn may_connect(&self) -> bool {
        self.others_connected() + (self.stats.clients_connected as usize) < self.limits.max_connections
    }

    fn others_connected(&self) -> usize {
        let others: u64 =
            self.shard_stats.iter().enumerate().filter(|(i, _)| *i != self.id).map(|(_, s)| s.clients_connected).sum();
        others as usize
    }

    /// Whether a socket from `peer` may be accepted as far as `max_preconnect_per_address` goes
    /// (check [`Shard::may_accept`] too). A refusal is counted, and logged once per episode.
    pub fn admit_from(&mut self, peer: IpAddr) -> bool {
        match self.preconnect.admit(peer) {
            Admission::Accept => true,
            Admission::Refuse { first } => {
                self.stats.refused_preconnect += 1;
                if first {
                    self.effects.warnings.push(format!(
                        "shard {}: {peer} has {} connections that have not completed CONNECT \
                         (max_preconnect_per_address); refusing more from it until one completes or closes",
                        self.id, self.limits.max_preconnect_per_address
                    ));
                }
                false
            }
        }
    }

    /// A new connection was accepted from `peer` (admitted by [`Shard::admit_from`]).
    pub fn on_open_from(&mut self, conn: ConnId, peer: IpAddr, now_ms: u64) {
        self.open_conn(conn, Some(peer), now_ms);
    }

    /// A new connection was accepted from an address that does not count against
    /// `max_preconnect_per_address`.
    pub fn on_open(&mut self, conn: ConnId, now_ms: u64) {
        self.open_conn(conn, None, now_ms);
    }

    fn open_conn(&mut self, conn: ConnId, peer: Option<IpAddr>, now_ms: u64) {
        self.preconnect.open(conn, peer, now_ms);
        self.conns.insert(
            conn,
            Box::new(Conn {
                state: ConnState::AwaitConnect,
                version: None,
                client_id: None,
                out: BytesMut::new(),
                keep_alive_ms: 0,
                last_rx_ms: now_ms,
                client_max_packet: usize::MAX,
                client_receive_max: u16::MAX,
                client_alias_max: 0,
                aliases: None,
                will: None,
                assigned_id: false,
                connect_expiry: 0,
                held: BytesMut::new(),
                pending_sub: None,
                deferred: VecDeque::new(),
                deferred_bytes: 0,
                deferred_full: false,
                reading_paused: false,
                lost: false,
                problem_information: true,
                acks: VecDeque::new(),
                acks_front_seq: 0,
                out_full: false,
            }),
        );
    }

    /// Bytes arrived on `conn`. Decodes and handles every whole packet in `buf`, leaving a partial
    /// one there for the next call. The caller keeps `buf` only while it is not empty, and grows
    /// it only by what arrives (the pre-CONNECT budget counts its capacity).
    pub fn on_bytes(&mut self, conn: ConnId, buf: &mut BytesMut, now_ms: u64) {
        self.stats.bytes_received += buf.len() as u64;
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if matches!(c.state, ConnState::AwaitConnect) {
            self.decode_all(conn, buf, now_ms);
            self.account_preconnect(conn, buf, now_ms);
        } else if c.blocked() || !c.held.is_empty() {
            c.held.extend_from_slice(buf);
            buf.clear();
            if !c.blocked() || c.acks_may_pass(&c.held) {
                self.resume(conn, now_ms);
            }
        } else {
            self.decode_all(conn, buf, now_ms);
            if let Some(c) = self.conns.get_mut(&conn) {
                if c.blocked() && !buf.is_empty() {
                    c.held.extend_from_slice(buf);
                    buf.clear();
                }
            }
        }
        self.watch_held_input(conn);
        self.run_local(now_ms);
    }

    /// Input held for a blocked connection is bounded: past [`HELD_INPUT_MAX`] the network
    /// layer stops reading it, and reads again once the state machine caught up.
    fn watch_held_input(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let over = c.held.len() >= HELD_INPUT_MAX;
        if over && !c.reading_paused {
            c.reading_paused = true;
            self.effects.pause_reading.push(conn);
        } else if !over && c.reading_paused && !c.blocked() {
            c.reading_paused = false;
            self.effects.resume_reading.push(conn);
        }
    }

    /// After input on a connection that was waiting for its CONNECT: once the CONNECT is decoded
    /// it leaves the pre-CONNECT set; until then the buffer it keeps counts against the shard's
    /// budget, and growing past the budget closes it.
    fn account_preconnect(&mut self, conn: ConnId, buf: &mut BytesMut, now_ms: u64) {
        let Some(c) = self.conns.get(&conn) else { return };
        if !matches!(c.state, ConnState::AwaitConnect) {
            self.preconnect.leave(conn);
            // Input behind the CONNECT while its session is on the way waits in `held`.
            if c.blocked() && !buf.is_empty() {
                let c = self.conns.get_mut(&conn).unwrap();
                c.held.extend_from_slice(buf);
                buf.clear();
            }
            return;
        }
        let held = if buf.is_empty() { 0 } else { buf.capacity() };
        if let Err(over) = self.preconnect.account(conn, held) {
            self.stats.refused_preconnect += 1;
            if over.first {
                self.effects.warnings.push(format!(
                    "shard {}: connections that have not completed CONNECT buffer {} bytes \
                     (max_preconnect_buffer_bytes_per_shard {}); closing those that grow",
                    self.id,
                    self.preconnect.buffered(),
                    self.limits.max_preconnect_buffer_bytes_per_shard
                ));
            }
            buf.clear();
            self.close(conn, None, now_ms);
        }
    }

    /// Handles packets held while the connection was blocked.
    fn resume(&mut self, conn: ConnId, now_ms: u64) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let mut held = std::mem::take(&mut c.held);
        self.decode_all(conn, &mut held, now_ms);
        if let Some(c) = self.conns.get_mut(&conn) {
            held.extend_from_slice(&c.held);
            c.held = if held.is_empty() { BytesMut::new() } else { held };
        }
        self.watch_held_input(conn);
    }

    fn decode_all(&mut self, conn: ConnId, buf: &mut BytesMut, now_ms: u64) {
        loop {
            let Some(c) = self.conns.get_mut(&conn) else { return };
            if matches!(c.state, ConnState::Closing) {
                buf.clear();
                return;
            }
            if c.blocked() && !c.acks_may_pass(buf) {
                return;
            }
            c.last_rx_ms = now_ms;
            let version = c.version;
            let max_size = match version {
                None => self.limits.max_connect_packet_bytes.min(self.limits.max_packet_size),
                Some(_) => self.limits.max_packet_size,
            };
            match packet::decode(buf, version, max_size as usize) {
                Ok(Some(p)) => self.on_packet(conn, p, now_ms),
                Ok(None) => return,
                Err(e) => {
                    self.stats.malformed += 1;
                    if version.is_none() && e.code == reason::UNSUPPORTED_PROTOCOL_VERSION {
                        // Answer in the 3.1.1 form every client version understands.
                        self.conns.get_mut(&conn).unwrap().version = Some(Version::V311);
                        self.send(
                            conn,
                            Packet::ConnAck(ConnAck {
                                session_present: false,
                                code: e.code,
                                properties: Properties::default(),
                            }),
                        );
                        self.close(conn, None, now_ms);
                    } else {
                        self.protocol_close(conn, e.code, e.what, now_ms);
                    }
                    buf.clear();
                    return;
                }
            }
        }
    }

    /// Whether the connection is waiting for its session; the caller should hold further input.
    pub fn is_pending(&self, conn: ConnId) -> bool {
        matches!(self.conns.get(&conn).map(|c| &c.state), Some(ConnState::Pending(_)))
    }

    /// The socket closed or failed without a DISCONNECT (or after we decided to close it).
    pub fn on_lost(&mut self, conn: ConnId, now_ms: u64) {
        self.preconnect.leave(conn);
        match self.conns.get_mut(&conn).map(|c| (&c.state, &mut c.lost)) {
            // The CONNECT was accepted but its session is still on the way: finish it when it
            // arrives, then treat the connection as lost (so its will is published).
            Some((ConnState::Pending(_), lost)) => *lost = true,
            Some((ConnState::Closing, _)) => {
                self.conns.remove(&conn);
            }
            Some(_) => {
                self.detach(conn, Detach::Lost, now_ms);
                self.conns.remove(&conn);
            }
            None => {}
        }
        self.run_local(now_ms);
    }

    /// Takes the bytes waiting to be written to `conn`.
    pub fn take_output(&mut self, conn: ConnId) -> Option<BytesMut> {
        let c = self.conns.get_mut(&conn)?;
        if c.out.is_empty() {
            return None;
        }
        let out = c.out.split();
        // What is left shares the allocation just handed out: keep it only while it is worth
        // reusing, so that an idle connection pins no buffer.
        if c.out.capacity() < 1024 {
            c.out = BytesMut::new();
        }
        Some(out)
    }

    /// Everything handed out for `conn` so far went out (the kernel took it). Messages that waited
    /// for room in its output buffer move on; returns whether there is something to dispatch (new
    /// output, messages for other shards, retained work).
    pub fn on_output_drained(&mut self, conn: ConnId, now_ms: u64) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else { return false };
        if !std::mem::take(&mut c.out_full) {
            return false;
        }
        let Some(id) = c.client_id.clone() else { return false };
        self.pump_and_release(&id, now_ms);
        // Feeding retained messages may have asked an owner (this shard too) for more.
        self.run_local(now_ms);
        let fx = &self.effects;
        self.conns.get(&conn).is_some_and(|c| !c.out.is_empty()) || !fx.to_shards.is_empty() || fx.retained_work
    }

    pub fn drain_effects(&mut self) -> Effects {
        std::mem::take(&mut self.effects)
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
            let expired: Vec<ConnId> = self
                .conns
                .iter()
                .filter(|(_, c)| match c.state {
                    ConnState::Active if c.keep_alive_ms > 0 => {
                        now_ms.saturating_sub(c.last_rx_ms) > c.keep_alive_ms * 3 / 2
                    }
                    _ => false,
                })
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                self.protocol_close(id, reason::KEEP_ALIVE_TIMEOUT, "keep alive timeout", now_ms);
            }
            self.close_connect_late(now_ms);
            let mut wills = Vec::new();
            let mut ended = Vec::new();
            for s in self.sessions.values_mut() {
                if let Some((at, _)) = &s.pending_will {
                    if *at <= now_ms {
                        wills.push((s.client_id.clone(), s.pending_will.take().unwrap().1));
                    }
                }
                if let Some(at) = s.expires_at_ms {
                    if s.conn.is_none() && at <= now_ms {
                        ended.push(s.client_id.clone());
                    }
                }
            }
            for (id, w) in wills {
                self.publish_will(&id, *w, now_ms);
            }
            for id in ended {
                if let Some(s) = self.sessions.remove(&id) {
                    self.end_session(s, now_ms);
                }
            }
        }
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

    /// Closes connections whose CONNECT is not complete `connect_timeout_ms` after accept, however
    /// many bytes they sent meanwhile. Called from the 500 ms scan: a connection is closed between
    /// the deadline and half a second (plus one tick) later.
    fn close_connect_late(&mut self, now_ms: u64) {
        for id in self.preconnect.expired(now_ms) {
            self.stats.connect_timeouts += 1;
            // No DISCONNECT: before CONNACK there is nothing to answer with.
            self.close(id, None, now_ms);
        }
    }

    /// Clean shutdown: close every connection without publishing wills; sessions stay as they are.
    pub fn shutdown(&mut self, now_ms: u64) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.conns.get_mut(&id) {
                c.will = None;
            }
            self.close(id, Some(reason::SERVER_SHUTTING_DOWN), now_ms);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Output helpers
    // -----------------------------------------------------------------------------------------

    fn send_to_shard(&mut self, to: ShardId, msg: ShardMsg) {
        if to == self.id {
            self.local.push_back(msg);
        } else {
            self.effects.to_shards.push((to, msg));
        }
    }

    fn run_local(&mut self, now_ms: u64) {
        while let Some(m) = self.local.pop_front() {
            self.handle_shard_msg(m, now_ms);
        }
    }

    /// Encodes `p` for `conn`. Returns false (and sends nothing) when the client's Maximum Packet
    /// Size would be exceeded.
    fn send(&mut self, conn: ConnId, p: Packet) -> bool {
        match &p {
            Packet::Publish(publish) => self.send_publish(conn, &publish.into()),
            _ => self.send_encoded(conn, |v| packet::encoded_len(&p, v), |v, out| packet::encode(&p, v, out)),
        }
    }

    /// [`Shard::send`] for a delivery, encoded from borrowed parts.
    fn send_publish(&mut self, conn: ConnId, p: &PublishRef) -> bool {
        self.send_encoded(conn, |v| packet::publish_len(p, v), |v, out| packet::encode_publish(p, v, out))
    }

    /// Appends a packet to `conn`'s output unless it is larger than the client accepts.
    fn send_encoded(
        &mut self,
        conn: ConnId,
        len: impl FnOnce(Version) -> usize,
        encode: impl FnOnce(Version, &mut BytesMut) -> usize,
    ) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else { return false };
        let version = c.version.unwrap_or(Version::V311);
        if c.client_max_packet != usize::MAX && len(version) > c.client_max_packet {
            return false;
        }
        let was_empty = c.out.is_empty();
        let n = encode(version, &mut c.out);
        self.stats.bytes_sent += n as u64;
        if was_empty {
            self.effects.dirty.push(conn);
        }
        true
    }

    /// Closes `conn`: for MQTT 5 a DISCONNECT with `code` first. The will is published unless the
    /// client sent DISCONNECT 0x00 (the caller clears it then) or the broker is shutting down.
    fn close(&mut self, conn: ConnId, code: Option<u8>, now_ms: u64) {
        self.close_why(conn, code, None, now_ms)
    }

    /// [`Shard::close`] with a reason string for MQTT 5 clients that did not opt out of problem
    /// information.
    fn close_why(&mut self, conn: ConnId, code: Option<u8>, why: Option<&str>, now_ms: u64) {
        let Some(c) = self.conns.get(&conn) else { return };
        if matches!(c.state, ConnState::Closing) {
            return;
        }
        self.preconnect.leave(conn);
        if let (Some(code), Some(Version::V5), ConnState::Active) = (code, c.version, &c.state) {
            let reason_string = why.filter(|_| c.problem_information).map(str::to_string);
            let properties = Properties { reason_string, ..Default::default() };
            self.send(conn, Packet::Disconnect(Disconnect { code, properties }));
        }
        self.detach(conn, Detach::Lost, now_ms);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = ConnState::Closing;
        }
        self.effects.close.push(conn);
    }

    fn protocol_close(&mut self, conn: ConnId, code: u8, why: &str, now_ms: u64) {
        self.close_why(conn, Some(code), Some(why), now_ms);
    }

    /// Separates a connection from its session: will handling starts here, and for a session
    /// that stays on this shard (`Detach::Lost`) so does its expiry. A session that `Moves` to
    /// another connection's shard keeps living there; a will with a delay waits with it.
    fn detach(&mut self, conn: ConnId, how: Detach, now_ms: u64) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let was_active = matches!(c.state, ConnState::Active);
        let will = c.will.take();
        let client_id = c.client_id.clone();
        c.state = ConnState::Closing;
        if !was_active {
            return;
        }
        self.stats.clients_connected = self.stats.clients_connected.saturating_sub(1);
        let Some(id) = client_id else { return };
        let Some(s) = self.sessions.get_mut(&id) else { return };
        if s.conn != Some(conn) {
            return;
        }
        s.conn = None;
        let expiry = s.expiry_secs;
        // Nobody reads this session's queue now: publishers are not held back for it.
        self.slow.remove(&id);
        self.release_drain_waiters(&id);
        let s = self.sessions.get_mut(&id).unwrap();
        if let Some(w) = will {
            let delay = w.properties.will_delay_interval.unwrap_or(0);
            if delay > 0 && (expiry > 0 || how == Detach::Moves) {
                s.pending_will = Some((now_ms + u64::from(delay.min(expiry)) * 1000, w));
            } else {
                self.publish_will(&id, *w, now_ms);
            }
        }
        if how == Detach::Moves {
            return;
        }
        let s = self.sessions.get_mut(&id).unwrap();
        touch(self.persist_sessions, &mut self.dirty_sessions, s);
        if expiry == 0 {
            let s = self.sessions.remove(&id).unwrap();
            self.end_session(s, now_ms);
        } else if expiry != u32::MAX {
            s.expires_at_ms = Some(now_ms + u64::from(expiry) * 1000);
        }
    }

    /// A session ends for good: its will (if still waiting) goes out, its subscriptions go away.
    fn end_session(&mut self, s: Box<Session>, now_ms: u64) {
        let client_id = s.client_id.clone();
        self.end_session_quietly(s, now_ms);
        let dir = directory_shard(&client_id, self.n_shards);
        self.send_to_shard(dir, ShardMsg::Release { client_id, host: self.id });
    }

    fn drop_subscriptions(&mut self, s: &mut Session) {
        for (filter, _) in s.subs.drain() {
            self.unsubscribe_one(&s.client_id, &filter);
        }
    }

    fn unsubscribe_one(&mut self, client_id: &ClientId, filter: &str) {
        match topic::parse_shared(filter) {
            Some(Ok((group, f))) => {
                let key = format!("{group}/{f}");
                let owner = shard_of(&key, self.n_shards);
                self.send_to_shard(owner, ShardMsg::ShareLeave { key, client_id: client_id.clone() });
            }
            _ => {
                self.trie.remove(filter, client_id);
            }
        }
    }

    fn publish_will(&mut self, client_id: &ClientId, w: Will, now_ms: u64) {
        let mut properties = w.properties;
        properties.will_delay_interval = None;
        let expiry = properties.message_expiry_interval.take();
        let msg = Arc::new(Message {
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            properties: properties.boxed(),
            expiry_at_ms: expiry.map(|e| now_ms + u64::from(e) * 1000),
            origin: client_id.clone(),
        });
        self.route(msg, now_ms);
    }

    // -----------------------------------------------------------------------------------------
    // Packets from clients
    // -----------------------------------------------------------------------------------------

    fn on_packet(&mut self, conn: ConnId, p: Packet, now_ms: u64) {
        let Some(c) = self.conns.get(&conn) else { return };
        // Only a 3.1.1 client with packets already deferred, or sending QoS 2, can need the
        // deferral queue: everything else skips `must_defer`'s lookups.
        let may_defer = c.version == Some(Version::V311)
            && (!c.deferred.is_empty() || matches!(&p, Packet::Publish(pb) if pb.qos == 2));
        if matches!(c.state, ConnState::AwaitConnect) {
            if let Packet::Connect(connect) = p {
                self.on_connect(conn, connect, now_ms);
            } else {
                self.close(conn, None, now_ms);
            }
            return;
        }
        // The rule every handler below rests on: an active connection's session is hosted here
        // and names this connection. Should it ever not hold, the packet closes its own
        // connection instead of panicking the shard.
        if self.holder(conn).is_none() {
            self.stats.orphaned_packets += 1;
            return self.protocol_close(
                conn,
                reason::SESSION_TAKEN_OVER,
                "the session moved to another connection",
                now_ms,
            );
        }
        if may_defer && self.must_defer(conn, &p) {
            return self.defer(conn, p);
        }
        self.handle_packet(conn, p, now_ms);
    }

    /// One packet of an active connection holding its session, in its turn.
    fn handle_packet(&mut self, conn: ConnId, p: Packet, now_ms: u64) {
        match p {
            Packet::Publish(publish) => self.on_publish(conn, publish, now_ms),
            Packet::PubAck(r) => self.on_ack(conn, r.packet_id, false, now_ms),
            Packet::PubRec(r) => {
                if r.code >= 0x80 {
                    // The client refused the message: the exchange ends here.
                    self.on_ack(conn, r.packet_id, false, now_ms);
                } else {
                    self.on_ack(conn, r.packet_id, true, now_ms);
                }
            }
            Packet::PubRel(r) => {
                let Some(id) = self.conns.get(&conn).and_then(|c| c.client_id.clone()) else { return };
                let Some(s) = self.sessions.get_mut(&id) else { return };
                let found = s.incoming_qos2.remove(&r.packet_id);
                touch(self.persist_sessions, &mut self.dirty_sessions, s);
                let code = if found { reason::SUCCESS } else { reason::PACKET_ID_NOT_FOUND };
                self.send(
                    conn,
                    Packet::PubComp(PubResp { packet_id: r.packet_id, code, properties: Properties::default() }),
                );
                if found {
                    self.run_deferred(conn, now_ms);
                }
            }
            Packet::PubComp(r) => self.on_ack(conn, r.packet_id, false, now_ms),
            Packet::Subscribe(s) => self.on_subscribe(conn, s, now_ms),
            Packet::Unsubscribe(u) => self.on_unsubscribe(conn, u),
            Packet::PingReq => {
                self.send(conn, Packet::PingResp);
            }
            Packet::Disconnect(d) => {
                let c = self.conns.get_mut(&conn).unwrap();
                if let Some(e) = d.properties.session_expiry_interval {
                    if c.connect_expiry == 0 && e != 0 {
                        self.protocol_close(conn, reason::PROTOCOL_ERROR, "session expiry raised from 0", now_ms);
                        return;
                    }
                    let e = e.min(self.limits.max_session_expiry_secs);
                    if let Some(id) = c.client_id.clone() {
                        if let Some(s) = self.sessions.get_mut(&id) {
                            s.expiry_secs = e;
                        }
                    }
                }
                let c = self.conns.get_mut(&conn).unwrap();
                if d.code != reason::DISCONNECT_WITH_WILL {
                    c.will = None;
                }
                self.close(conn, None, now_ms);
            }
            Packet::Auth(_) => {
                // No enhanced authentication method is offered, so AUTH is never expected.
                self.protocol_close(conn, reason::PROTOCOL_ERROR, "AUTH without an authentication method", now_ms);
            }
            Packet::Connect(_) => self.protocol_close(conn, reason::PROTOCOL_ERROR, "second CONNECT", now_ms),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                self.protocol_close(conn, reason::PROTOCOL_ERROR, "server-to-client packet from a client", now_ms)
            }
        }
    }

    /// Whether `p` must wait behind QoS 2 messages awaiting PUBREL (3.1.1 clients, see
    /// `Conn::deferred`): it is a new QoS 2 PUBLISH with no room, or anything but an
    /// acknowledgement or a ping while others already wait.
    fn must_defer(&self, conn: ConnId, p: &Packet) -> bool {
        let Some(c) = self.conns.get(&conn) else { return false };
        if c.version != Some(Version::V311) {
            return false;
        }
        if !c.deferred.is_empty() {
            return !matches!(
                p,
                Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) | Packet::PingReq
            );
        }
        matches!(p, Packet::Publish(pb) if pb.qos == 2 && !self.qos2_room(conn, pb.packet_id))
    }

    /// Whether a QoS 2 PUBLISH with `pid` can be taken now: a resend, or room in the window.
    fn qos2_room(&self, conn: ConnId, pid: u16) -> bool {
        let Some(s) = self.conns.get(&conn).and_then(|c| c.client_id.as_ref()).and_then(|id| self.sessions.get(id))
        else {
            return true;
        };
        s.incoming_qos2.contains(&pid) || s.incoming_qos2.len() < usize::from(self.limits.max_inflight)
    }

    fn defer(&mut self, conn: ConnId, p: Packet) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.deferred_bytes += deferred_size(&p);
        c.deferred.push_back(p);
        c.deferred_full = c.deferred_bytes >= DEFERRED_BYTES_MAX;
    }

    /// A PUBREL made room: deferred packets run, in order, while they can.
    fn run_deferred(&mut self, conn: ConnId, now_ms: u64) {
        loop {
            let Some(c) = self.conns.get(&conn) else { return };
            if c.pending_sub.is_some() || !matches!(c.state, ConnState::Active) {
                // A deferred SUBSCRIBE waits for its confirmations; the rest waits behind it.
                return;
            }
            let Some(front) = c.deferred.front() else { break };
            if let Packet::Publish(pb) = front {
                if pb.qos == 2 && !self.qos2_room(conn, pb.packet_id) {
                    break;
                }
            }
            let Some(c) = self.conns.get_mut(&conn) else { return };
            let Some(p) = c.deferred.pop_front() else { break };
            c.deferred_bytes = c.deferred_bytes.saturating_sub(deferred_size(&p));
            let was_full = std::mem::replace(&mut c.deferred_full, false);
            if self.holder(conn).is_none() {
                return;
            }
            self.handle_packet(conn, p, now_ms);
            if was_full {
                // Input held behind the full queue can be decoded again.
                self.resume(conn, now_ms);
            }
        }
    }

    /// The client id of `conn` if it is active and its session is hosted here and names it.
    fn holder(&self, conn: ConnId) -> Option<ClientId> {
        let c = self.conns.get(&conn)?;
        if !matches!(c.state, ConnState::Active) {
            return None;
        }
        let id = c.client_id.as_ref()?;
        (self.sessions.get(id)?.conn == Some(conn)).then(|| id.clone())
    }

    fn session_of(&mut self, conn: ConnId) -> Option<&mut Session> {
        let id = self.conns.get(&conn)?.client_id.clone()?;
        self.sessions.get_mut(&id).map(|s| &mut **s)
    }

    fn on_connect(&mut self, conn: ConnId, mut connect: Box<Connect>, now_ms: u64) {
        let v5 = connect.version.is_v5();
        let c = self.conns.get_mut(&conn).unwrap();
        c.version = Some(connect.version);
        let refuse = |shard: &mut Shard, code: u8| {
            shard.send(
                conn,
                Packet::ConnAck(ConnAck { session_present: false, code, properties: Properties::default() }),
            );
            if let Some(c) = shard.conns.get_mut(&conn) {
                c.will = None;
            }
            shard.close(conn, None, now_ms);
        };
        if connect.properties.authentication_method.is_some() {
            return refuse(self, reason::BAD_AUTHENTICATION_METHOD);
        }
        if connect.client_id.is_empty() {
            if !v5 && !connect.clean_start {
                return refuse(self, reason::CLIENT_IDENTIFIER_NOT_VALID);
            }
            self.next_assigned += 1;
            connect.client_id = format!("sluice-{}-{}-{}", self.id, now_ms, self.next_assigned);
            self.conns.get_mut(&conn).unwrap().assigned_id = true;
        }
        if let Some(w) = &connect.will {
            if !topic::valid_topic_name(&w.topic, &self.topic_limits) {
                return refuse(self, reason::TOPIC_NAME_INVALID);
            }
            if w.properties.payload_format_indicator == Some(1) && std::str::from_utf8(&w.payload).is_err() {
                return refuse(self, reason::PAYLOAD_FORMAT_INVALID);
            }
        }
        if !self.may_connect() {
            return refuse(self, if v5 { reason::QUOTA_EXCEEDED } else { reason::SERVER_UNAVAILABLE });
        }
        let c = self.conns.get_mut(&conn).unwrap();
        let mut ka = u64::from(connect.keep_alive);
        let cap = u64::from(self.limits.max_keep_alive_secs);
        if cap > 0 && (ka == 0 || ka > cap) {
            ka = cap;
        }
        c.keep_alive_ms = ka * 1000;
        c.will = connect.will.take().map(Box::new);
        if v5 {
            let p = &connect.properties;
            c.client_max_packet = p.maximum_packet_size.map_or(usize::MAX, |m| m as usize);
            c.client_receive_max = p.receive_maximum.unwrap_or(u16::MAX);
            c.client_alias_max = p.topic_alias_maximum.unwrap_or(0);
            c.connect_expiry = p.session_expiry_interval.unwrap_or(0);
            c.problem_information = p.request_problem_information != Some(0);
        }
        let client_id: ClientId = connect.client_id.as_str().into();
        c.client_id = Some(client_id.clone());
        let clean_start = connect.clean_start;
        c.state = ConnState::Pending(connect);
        let dir = directory_shard(&client_id, self.n_shards);
        self.send_to_shard(dir, ShardMsg::Claim { client_id, host: self.id, conn, clean_start });
    }

    /// The session for a pending connection arrived (or there is none): finish the CONNECT.
    fn on_transfer(&mut self, client_id: ClientId, conn: ConnId, session: Option<Box<Session>>, now_ms: u64) {
        let pending = match self.conns.get_mut(&conn) {
            Some(c) if matches!(c.state, ConnState::Pending(_)) && c.client_id.as_ref() == Some(&client_id) => {
                match std::mem::replace(&mut c.state, ConnState::Active) {
                    ConnState::Pending(p) => Some(p),
                    _ => unreachable!(),
                }
            }
            _ => None,
        };
        let dir = directory_shard(&client_id, self.n_shards);
        let Some(connect) = pending else {
            // The connection went away while its session was on the way: keep the session here.
            let hosting = match session {
                Some(mut s) if s.expiry_secs > 0 => {
                    s.conn = None;
                    if s.expiry_secs != u32::MAX {
                        s.expires_at_ms = Some(now_ms + u64::from(s.expiry_secs) * 1000);
                    }
                    self.adopt(s);
                    true
                }
                Some(s) => {
                    self.end_session_quietly(s, now_ms);
                    false
                }
                None => false,
            };
            self.send_to_shard(dir, ShardMsg::Settled { client_id, host: self.id, hosting });
            return;
        };
        let v5 = connect.version.is_v5();
        let mut session_present = false;
        let mut session = match session {
            Some(mut old) if !connect.clean_start => {
                session_present = true;
                // A new connection to this session cancels a will still waiting out its delay.
                old.pending_will = None;
                old
            }
            Some(old) => {
                self.end_session_quietly(old, now_ms);
                Box::new(Session::new(client_id.clone()))
            }
            None => Box::new(Session::new(client_id.clone())),
        };
        session.expiry_secs = if v5 {
            connect.properties.session_expiry_interval.unwrap_or(0).min(self.limits.max_session_expiry_secs)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        };
        session.expires_at_ms = None;
        session.conn = Some(conn);
        self.stats.clients_connected += 1;
        let c = self.conns.get(&conn).unwrap();
        let mut props = Properties::default();
        if v5 {
            if c.assigned_id {
                props.assigned_client_identifier = Some(client_id.to_string());
            }
            props.receive_maximum = Some(self.limits.max_inflight);
            props.topic_alias_maximum = Some(self.limits.topic_alias_maximum);
            props.maximum_packet_size = Some(self.limits.max_packet_size);
            props.retain_available = Some(1);
            props.wildcard_subscription_available = Some(1);
            props.subscription_identifier_available = Some(1);
            props.shared_subscription_available = Some(1);
            let asked = connect.properties.session_expiry_interval.unwrap_or(0);
            if asked != session.expiry_secs {
                props.session_expiry_interval = Some(session.expiry_secs);
            }
            if u64::from(connect.keep_alive) * 1000 != c.keep_alive_ms {
                props.server_keep_alive = Some((c.keep_alive_ms / 1000) as u16);
            }
        }
        self.send(conn, Packet::ConnAck(ConnAck { session_present, code: reason::SUCCESS, properties: props }));
        self.adopt(session);
        // Before anything below can end the session (a lost connection sends `Release`).
        self.send_to_shard(dir, ShardMsg::Settled { client_id: client_id.clone(), host: self.id, hosting: true });
        // Redeliver what was in flight, in order, then whatever waited in the queue.
        let s = self.sessions.get_mut(&client_id).unwrap();
        let resend: Vec<(u16, Inflight)> = s.inflight.iter().map(|(k, v)| (*k, v.clone())).collect();
        for (pid, inf) in resend {
            match inf {
                Inflight::Publish(d) => {
                    if !self.write_publish(conn, &d, pid, true, now_ms) {
                        self.sessions.get_mut(&client_id).unwrap().inflight.remove(&pid);
                    }
                }
                Inflight::Release => {
                    self.send(
                        conn,
                        Packet::PubRel(PubResp { packet_id: pid, code: 0, properties: Properties::default() }),
                    );
                }
            }
        }
        self.pump(&client_id, now_ms);
        self.feed_retained(&client_id, now_ms);
        if self.conns.get(&conn).is_some_and(|c| c.lost) {
            self.detach(conn, Detach::Lost, now_ms);
            self.conns.remove(&conn);
            return;
        }
        self.resume(conn, now_ms);
    }

    /// Installs a session on this shard: its subscriptions enter this shard's trie.
    fn adopt(&mut self, mut s: Box<Session>) {
        s.generation += 1;
        touch(self.persist_sessions, &mut self.dirty_sessions, &mut s);
        self.install(s);
    }

    /// Puts a session in this shard's tables: its subscriptions into the trie, its shared ones
    /// to their groups' owners.
    fn install(&mut self, s: Box<Session>) {
        let id = s.client_id.clone();
        if let Some(mut old) = self.sessions.remove(&id) {
            // The directory hands a session over one claim at a time, so this should not happen;
            // should it, the older session's connection goes (0x8E) rather than living on
            // without a session.
            debug_assert!(false, "two sessions of one client id on one shard");
            if let Some(c) = old.conn.take() {
                self.close_why(c, Some(reason::SESSION_TAKEN_OVER), None, 0);
            }
            self.drop_subscriptions(&mut old);
        }
        for (filter, sub) in &s.subs {
            match topic::parse_shared(filter) {
                Some(Ok((group, f))) => {
                    let key = format!("{group}/{f}");
                    let owner = shard_of(&key, self.n_shards);
                    let member =
                        ShareMember { client_id: id.clone(), shard: self.id, opts: sub.opts, sub_id: sub.sub_id };
                    self.send_to_shard(owner, ShardMsg::ShareJoin { key, member, ack: None });
                }
                _ => {
                    self.trie.insert(filter, id.clone(), sub.clone());
                }
            }
        }
        self.sessions.insert(id, s);
    }

    /// A session replaced by a clean start: its will goes out, subscriptions go; the directory
    /// already names the new host, so no Release.
    fn end_session_quietly(&mut self, mut s: Box<Session>, now_ms: u64) {
        self.cancel_retained_feed(&s.client_id);
        touch(self.persist_sessions, &mut self.dirty_sessions, &mut s);
        if let Some((_, w)) = s.pending_will.take() {
            self.publish_will(&s.client_id, *w, now_ms);
        }
        self.drop_subscriptions(&mut s);
    }

    fn on_publish(&mut self, conn: ConnId, mut p: Publish, now_ms: u64) {
        self.stats.messages_received += 1;
        let c = self.conns.get_mut(&conn).unwrap();
        if let Some(alias) = p.properties.topic_alias.take() {
            if alias > self.limits.topic_alias_maximum {
                return self.protocol_close(conn, reason::TOPIC_ALIAS_INVALID, "topic alias above maximum", now_ms);
            }
            if p.topic.is_empty() {
                match c.aliases.as_ref().and_then(|a| a.inbound.get(&alias)) {
                    Some(t) => p.topic = t.clone(),
                    None => return self.protocol_close(conn, reason::PROTOCOL_ERROR, "unknown topic alias", now_ms),
                }
            } else {
                c.aliases.get_or_insert_with(Default::default).inbound.insert(alias, p.topic.clone());
            }
        }
        if !topic::valid_topic_name(&p.topic, &self.topic_limits) {
            return self.protocol_close(conn, reason::TOPIC_NAME_INVALID, "invalid topic name", now_ms);
        }
        let client_id = c.client_id.clone().unwrap();
        if p.properties.payload_format_indicator == Some(1) && std::str::from_utf8(&p.payload).is_err() {
            if p.qos > 0 {
                let r = PubResp {
                    packet_id: p.packet_id,
                    code: reason::PAYLOAD_FORMAT_INVALID,
                    properties: Properties::default(),
                };
                self.send(conn, if p.qos == 1 { Packet::PubAck(r) } else { Packet::PubRec(r) });
            }
            return;
        }
        if p.qos == 2 {
            let s = self.sessions.get_mut(&client_id).unwrap();
            if s.incoming_qos2.contains(&p.packet_id) {
                // A resend of a message we already took: acknowledge again (after any earlier
                // acknowledgement still waiting for Kafka), route nothing.
                self.queue_ack(conn, p.packet_id, 2, &[]);
                return;
            }
            if s.incoming_qos2.len() >= usize::from(self.limits.max_inflight) {
                return self.protocol_close(conn, reason::RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded", now_ms);
            }
            s.incoming_qos2.insert(p.packet_id);
            touch(self.persist_sessions, &mut self.dirty_sessions, s);
        }
        let mut properties = std::mem::take(&mut p.properties);
        properties.subscription_identifiers.clear();
        let expiry = properties.message_expiry_interval.take();
        let (qos, pid) = (p.qos, p.packet_id);
        let msg = Arc::new(Message {
            topic: p.topic,
            payload: p.payload,
            qos,
            retain: p.retain,
            properties: properties.boxed(),
            expiry_at_ms: expiry.map(|e| now_ms + u64::from(e) * 1000),
            origin: client_id,
        });
        if qos == 0 {
            self.route(msg, now_ms);
            return;
        }
        self.publishing = Some(conn);
        // With persistent sessions, the acknowledgement waits until whatever the message changed
        // on any shard is on disk.
        let token = self.persist_sessions.then(|| self.new_receipt());
        let (produced, expected) = self.route_with_receipt(msg, token, now_ms);
        self.publishing = None;
        let congested = std::mem::take(&mut self.congested);
        let receipt = token.filter(|_| expected > 0).map(|t| (t, expected));
        self.queue_ack_waiting(conn, pid, qos, &produced, &congested, receipt);
    }

    fn new_receipt(&mut self) -> u64 {
        self.next_receipt += 1;
        self.next_receipt
    }

    /// [`Shard::route`], asking every shard for a receipt under `token`; returns the Kafka
    /// records and how many answers to expect (this shard's own included, when it stored
    /// something).
    fn route_with_receipt(&mut self, msg: Msg, token: Option<u64>, now_ms: u64) -> (Vec<u64>, u32) {
        let Some(token) = token else { return (self.route(msg, now_ms), 0) };
        let receipt = Receipt { from: self.id, token };
        let (produced, forwards) = self.under_receipt(receipt, |shard| shard.route(msg, now_ms));
        let mut expected = (self.n_shards - 1) as u32 + forwards;
        if std::mem::take(&mut self.stored_hit) {
            self.store_receipts.push((receipt, 0));
            self.effects.sessions_urgent = true;
            expected += 1;
        }
        (produced, expected)
    }

    /// Runs `f` (routing one message) on behalf of `receipt`: what it forwards to other shards
    /// carries the receipt too. Returns `f`'s result and how many shards it forwarded to;
    /// `stored_hit` then says whether it stored something here.
    fn under_receipt<R>(&mut self, receipt: Receipt, f: impl FnOnce(&mut Self) -> R) -> (R, u32) {
        self.routing_receipt = Some(receipt);
        self.stored_hit = false;
        self.receipt_forwards = 0;
        let r = f(self);
        self.routing_receipt = None;
        (r, std::mem::take(&mut self.receipt_forwards))
    }

    /// An answer to one of this shard's receipts.
    fn on_receipt(&mut self, token: u64, more: u32, failed: bool) {
        let Some(e) = self.receipts.get_mut(&token) else { return };
        e.left = (e.left + more).saturating_sub(1);
        e.failed |= failed;
        if e.left > 0 {
            return;
        }
        let Some(done) = self.receipts.remove(&token) else { return };
        match done.then {
            ReceiptFor::Ack(conn, seq) => {
                if done.failed {
                    // Not durable, so not acknowledged: MQTT 5 hears 0x97, 3.1.1 nothing (it
                    // publishes again after reconnecting).
                    self.stats.store_refusals += 1;
                    self.set_ack_code(conn, seq, reason::QUOTA_EXCEEDED);
                }
                self.release_acks(vec![(conn, seq)])
            }
            ReceiptFor::Positions if done.failed => self.failed_position_batches.push(token),
            ReceiptFor::Positions => self.complete_position_batch(token),
        }
    }

    /// The acknowledgement `seq` of `conn` reports `code` unless it already reports a failure.
    fn set_ack_code(&mut self, conn: ConnId, seq: u64, code: u8) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let Some(a) = seq.checked_sub(c.acks_front_seq).and_then(|i| c.acks.get_mut(i as usize)) else { return };
        if a.code == reason::SUCCESS {
            a.code = code;
        }
    }

    fn complete_position_batch(&mut self, token: u64) {
        self.receipts_done.insert(token);
        while let Some((t, _)) = self.position_batches.front() {
            if !self.receipts_done.remove(t) {
                break;
            }
            let (_, moves) = self.position_batches.pop_front().unwrap();
            for (key, next) in moves {
                self.positions.insert(key, next);
            }
            self.positions_dirty = true;
        }
    }

    /// Queues the PUBACK/PUBREC of a QoS 1/2 publish. It goes out once Kafka acknowledged every
    /// record in `records` (at once when there are none) and every earlier acknowledgement of
    /// this connection went out: MQTT requires them in the order the PUBLISHes arrived.
    fn queue_ack(&mut self, conn: ConnId, pid: u16, qos: u8, records: &[u64]) {
        self.queue_ack_waiting(conn, pid, qos, records, &[], None);
    }

    /// [`Shard::queue_ack`] that also waits for the queues of `congested` sessions to drain,
    /// and for `receipt`: `(token, answers expected)` from the shards that stored it.
    fn queue_ack_waiting(
        &mut self,
        conn: ConnId,
        pid: u16,
        qos: u8,
        records: &[u64],
        congested: &[ClientId],
        receipt: Option<(u64, u32)>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let seq = c.acks_front_seq + c.acks.len() as u64;
        let waiting = (records.len() + congested.len() + usize::from(receipt.is_some())) as u32;
        if let Some((token, expected)) = receipt {
            self.receipts
                .insert(token, ReceiptWait { left: expected, failed: false, then: ReceiptFor::Ack(conn, seq) });
        }
        c.acks.push_back(PendingAck { pid, qos, waiting, code: reason::SUCCESS });
        for id in records {
            self.kafka_waiters.insert(*id, (conn, seq));
        }
        for id in congested {
            self.drain_waiters.entry(id.clone()).or_default().waiters.push(DrainWaiter::Ack(conn, seq));
        }
        self.flush_acks(conn);
    }

    /// Room for `id`'s queue to move: pump it, and once it is down to a quarter, let go of what
    /// waited for it to drain.
    fn pump_and_release(&mut self, id: &ClientId, now_ms: u64) {
        self.pump(id, now_ms);
        self.feed_retained(id, now_ms);
        if self.sessions.get(id).is_some_and(|s| s.queue.len() * 4 <= self.limits.max_queued_messages) {
            self.slow.remove(id);
            self.release_drain_waiters(id);
        }
    }

    /// A session's queue drained (or it went offline): acknowledgements and receipt answers held
    /// for it go on.
    fn release_drain_waiters(&mut self, id: &ClientId) {
        let Some(congestion) = self.drain_waiters.remove(id) else { return };
        self.release_waiters(congestion.waiters);
    }

    fn release_waiters(&mut self, waiters: Vec<DrainWaiter>) {
        let mut acks = Vec::new();
        for w in waiters {
            match w {
                DrainWaiter::Ack(conn, seq) => acks.push((conn, seq)),
                DrainWaiter::Receipt(h) => {
                    let Some(held) = self.held_receipts.get_mut(&h) else { continue };
                    held.waiting -= 1;
                    if held.waiting == 0 {
                        if let Some(held) = self.held_receipts.remove(&h) {
                            self.answer_receipt_now(held.receipt, held.more, held.stored);
                        }
                    }
                }
            }
        }
        self.release_acks(acks);
    }

    /// Back-pressure is bounded in time: publishers held for `max_backpressure_ms` by one
    /// session's queue stop waiting for it, and do not wait for it again until it drained. One
    /// subscriber that never acknowledges (or never reads) slows publishers once, briefly; it
    /// never stops them.
    fn stop_waiting_for_slow_subscribers(&mut self, now_ms: u64) {
        let bound = self.limits.max_backpressure_ms;
        let mut stuck = Vec::new();
        for (id, c) in &mut self.drain_waiters {
            match c.since_ms {
                None => c.since_ms = Some(now_ms),
                Some(t) if now_ms.saturating_sub(t) >= bound => stuck.push(id.clone()),
                Some(_) => {}
            }
        }
        for id in stuck {
            let newly = self.slow.insert(id.clone());
            if newly {
                self.stats.slow_subscribers += 1;
            }
            if newly && self.stats.slow_subscribers == 1 {
                self.effects.warnings.push(format!(
                    "shard {}: client `{id}` held publishers back for {bound} ms; they no longer wait for it until its queue drains, and its queue drops by queue_full_policy meanwhile (further ones are counted in $SYS/broker/shard/{}/clients/slow)",
                    self.id, self.id
                ));
            }
            // Publishers go on. Kafka → MQTT slices keep waiting: Kafka holds those records,
            // and the feed has its own, longer bound (`kafka_to_mqtt_max_wait_ms`).
            let Some(c) = self.drain_waiters.get_mut(&id) else { continue };
            let held = &self.held_receipts;
            let is_feed = |w: &DrainWaiter| match w {
                DrainWaiter::Receipt(h) => held.get(h).is_some_and(|r| r.receipt.token & FEED_TOKEN != 0),
                DrainWaiter::Ack(..) => false,
            };
            let (feed, publishers): (Vec<_>, Vec<_>) = std::mem::take(&mut c.waiters).into_iter().partition(is_feed);
            if feed.is_empty() {
                self.drain_waiters.remove(&id);
            } else {
                c.waiters = feed;
                c.since_ms = None;
            }
            self.release_waiters(publishers);
        }
    }

    /// One thing each of these acknowledgements waited for happened.
    fn release_acks(&mut self, waiters: Vec<(ConnId, u64)>) {
        let mut touched = Vec::new();
        for (conn, seq) in waiters {
            let Some(c) = self.conns.get_mut(&conn) else { continue };
            let Some(a) = seq.checked_sub(c.acks_front_seq).and_then(|i| c.acks.get_mut(i as usize)) else { continue };
            a.waiting = a.waiting.saturating_sub(1);
            touched.push(conn);
        }
        touched.dedup();
        for conn in touched {
            self.flush_acks(conn);
        }
    }

    fn flush_acks(&mut self, conn: ConnId) {
        loop {
            let Some(c) = self.conns.get_mut(&conn) else { return };
            let Some(front) = c.acks.front() else { return };
            if front.waiting > 0 {
                return;
            }
            let a = c.acks.pop_front().unwrap();
            c.acks_front_seq += 1;
            if a.code != reason::SUCCESS && c.version != Some(Version::V5) {
                // 3.1.1 has no negative acknowledgement: close without one, so the client
                // publishes again after reconnecting. Nothing acknowledged is lost.
                self.close(conn, None, 0);
                return;
            }
            let r = PubResp { packet_id: a.pid, code: a.code, properties: Properties::default() };
            self.send(conn, if a.qos == 1 { Packet::PubAck(r) } else { Packet::PubRec(r) });
        }
    }

    /// Outcomes of records handed to Kafka.
    pub fn on_produce_results(&mut self, results: impl IntoIterator<Item = ProduceResult>, now_ms: u64) {
        let mut touched = Vec::new();
        for r in results {
            let meta = self.kafka_inflight_mapping.remove(&r.id);
            let RecordMeta { mapping, cluster, durable, qos0 } =
                meta.unwrap_or(RecordMeta { mapping: 0, cluster: 0, durable: false, qos0: false });
            if !durable {
                self.kafka_pending = self.kafka_pending.saturating_sub(1);
            }
            if qos0 {
                self.kafka_pending_qos0 = self.kafka_pending_qos0.saturating_sub(1);
            }
            let copy = self.kafka_copies.remove(&r.id);
            if let (Err(ProduceError::TimedOut), Some(record)) = (&r.outcome, copy) {
                // Kafka is down or hanging: the record goes to the spill log, the publisher
                // hears back once it is on disk, and Kafka gets it on replay.
                if !self.spilling {
                    self.spilling = true;
                    self.effects.warnings.push(format!(
                        "shard {}: Kafka timed out; QoS 1/2 records go to the spill log until Kafka takes them again",
                        self.id
                    ));
                }
                self.kafka_inflight_mapping.insert(r.id, RecordMeta { mapping, cluster, durable: true, qos0: false });
                self.mapping_stats.entry((mapping, cluster)).or_default().records_spilled += 1;
                self.effects.produce.push(ProduceRequest { id: r.id, record, durable: true });
                continue;
            }
            let ms = self.mapping_stats.entry((mapping, cluster)).or_default();
            ms.records_retried += u64::from(r.attempts.saturating_sub(1));
            ms.latency_us_sum += r.latency_us;
            ms.latency_us_max = ms.latency_us_max.max(r.latency_us);
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
                Err(e) => {
                    ms.records_failed += 1;
                    if self.logged_failures.insert((mapping, e.cause())) {
                        let name = self.router.mapping_name(mapping).to_string();
                        self.effects.warnings.push(format!(
                            "Kafka refused records of mapping `{name}`: {} ({e:?}); further failures of this kind are counted in $SYS/broker/shard/{}/kafka/{name}/.../records/failed",
                            e.cause(),
                            self.id
                        ));
                    }
                }
            }
            // A durable record's publisher heard back when it reached the spill log.
            if !durable {
                self.resolve_waiter(r.id, &r.outcome, &mut touched);
            }
        }
        if self.kafka_copies.is_empty() && !self.held_produce.is_empty() {
            self.effects.produce.append(&mut self.held_produce);
        }
        while self.kafka_pending < self.max_pending_records {
            let Some(req) = self.qos0_waiting.pop_front() else { break };
            self.kafka_pending += 1;
            self.kafka_pending_qos0 += 1;
            self.effects.produce.push(req);
        }
        touched.dedup();
        for conn in touched {
            self.flush_acks(conn);
        }
        self.run_local(now_ms);
    }

    /// Whether QoS 1/2 records go to the spill log because Kafka timed out (`kafka-ack`).
    pub fn kafka_spilling(&self) -> bool {
        self.spilling
    }

    /// The spill log drained after an outage: QoS 1/2 records go straight to Kafka again.
    pub fn end_spilling(&mut self) {
        // Records that may still time out and go to the log must not be overtaken.
        if self.spilling && self.held_produce.is_empty() && self.kafka_copies.is_empty() {
            self.spilling = false;
            self.effects.warnings.push(format!("shard {}: spill log drained; records go straight to Kafka", self.id));
        }
    }

    /// Unix time in ms at `now_ms == 0`, for what is stored on disk (expiry survives restarts).
    pub fn set_wall_offset(&mut self, wall_offset_ms: i64) {
        self.wall_offset_ms = wall_offset_ms;
    }

    /// Retained messages read back from disk at start. Ones this shard owns are stored; others
    /// (the shard count changed) go to their owner, which persists them; their topics are
    /// returned so the caller can drop them from this shard's store.
    ///
    /// `adopt`: the messages come from the store of a shard that no longer exists (fewer cores
    /// now); every one goes to its owner to be stored and persisted there.
    pub fn restore_retained(&mut self, stored: Vec<StoredMessage>, adopt: bool, now_ms: u64) -> Vec<String> {
        let mut moved = Vec::new();
        for s in stored {
            let Some(msg) = s.into_message(self.wall_offset_ms, now_ms) else { continue };
            let msg = Arc::new(msg);
            let owner = shard_of(&msg.topic, self.n_shards);
            if owner == self.id && !adopt {
                self.retained.insert(&msg.topic, msg.clone());
            } else {
                moved.push(msg.topic.clone());
                self.send_to_shard(owner, ShardMsg::Publish(msg));
            }
        }
        self.run_local(now_ms);
        moved
    }

    /// Turns on session persistence: changes to persistent sessions (session expiry > 0) are
    /// collected for [`Shard::take_session_changes`], and acknowledgements that promise
    /// something a crash must not lose (SUBACK of a persistent session, PUBACK/PUBREC of a
    /// message queued for one on this shard) wait for [`Shard::on_sessions_synced`].
    pub fn with_session_store(mut self) -> Self {
        self.persist_sessions = true;
        self
    }

    /// Sessions from the store of the last run: `(client id, generation, bytes)`. The caller
    /// hands each session to the shard owning its directory entry. Returns the client ids
    /// whose records are to be dropped (expired while stored, or unreadable).
    pub fn restore_sessions(&mut self, stored: Vec<(String, u64, Vec<u8>)>, now_ms: u64) -> Vec<String> {
        let mut dropped = Vec::new();
        for (client_id, generation, bytes) in stored {
            let id: ClientId = client_id.as_str().into();
            let s = match Session::decode(id.clone(), generation, &bytes, self.wall_offset_ms, now_ms) {
                Some(s) if s.expires_at_ms.is_none_or(|at| at > now_ms) => s,
                _ => {
                    dropped.push(client_id);
                    continue;
                }
            };
            self.directory.insert(id, DirEntry { host: Some(self.id), ..DirEntry::default() });
            // The same session, already stored under this generation: no new one, nothing to write.
            self.install(Box::new(s));
        }
        self.run_local(now_ms);
        dropped
    }

    /// Changes to persistent sessions since the last call, and the token to hand to
    /// [`Shard::on_sessions_synced`] once they are durable.
    pub fn take_session_changes(&mut self) -> (Vec<SessionChange>, u64) {
        let mut changes = Vec::with_capacity(self.dirty_sessions.len());
        for id in self.dirty_sessions.drain() {
            match self.sessions.get(&id) {
                Some(s) if s.expiry_secs > 0 => {
                    let mut bytes = Vec::new();
                    s.encode(self.wall_offset_ms, &mut bytes);
                    changes.push(SessionChange::Put { client_id: id, generation: s.generation, bytes });
                }
                _ => changes.push(SessionChange::Delete { client_id: id }),
            }
        }
        self.next_store_token += 1;
        let receipts = std::mem::take(&mut self.store_receipts);
        let subs = std::mem::take(&mut self.store_sub_waiters);
        if !receipts.is_empty() || !subs.is_empty() {
            self.store_flushing.push_back(StoreWaiters { token: self.next_store_token, receipts, subscribes: subs });
        }
        (changes, self.next_store_token)
    }

    /// The changes taken with `token` (and every earlier token) are durable (`ok`), or could
    /// not all be committed (a full disk, an I/O error): acknowledgements waiting for them go
    /// out, or are refused — MQTT 5 PUBACK/PUBREC/SUBACK 0x97, 3.1.1 no PUBACK (the connection
    /// closes, the client publishes again) and SUBACK 0x80 — and counted.
    pub fn on_sessions_synced(&mut self, token: u64, ok: bool, now_ms: u64) {
        if ok {
            // This shard's store works again: Kafka positions held back by a failed commit move.
            for t in std::mem::take(&mut self.failed_position_batches) {
                self.complete_position_batch(t);
            }
        }
        while let Some(w) = self.store_flushing.pop_front_if(|w| w.token <= token) {
            for (r, more) in w.receipts {
                if r.from == self.id {
                    self.on_receipt(r.token, more, !ok);
                } else {
                    self.send_to_shard(r.from, ShardMsg::Receipt { token: r.token, more, failed: !ok });
                }
            }
            for conn in w.subscribes {
                self.subscribe_step_done(conn, ok, now_ms);
            }
        }
        self.run_local(now_ms);
    }

    /// The store could not write these sessions: they are written again at the next commit
    /// (what a crash before then loses was not acknowledged: that commit refused its waiters).
    pub fn retry_sessions(&mut self, ids: impl IntoIterator<Item = ClientId>) {
        self.dirty_sessions.extend(ids);
    }

    /// The consumer positions of this shard, if they moved since the last call (to be stored).
    pub fn take_positions(&mut self) -> Option<Positions> {
        if !self.positions_dirty {
            return None;
        }
        self.positions_dirty = false;
        Some(
            self.positions
                .iter()
                .map(|((m, t, p), off)| ((self.inbound.mapping_name(*m).to_string(), t.to_string(), *p), *off))
                .collect(),
        )
    }

    /// `local-durable` records that stay on disk behind a backlog: the net layer replays them to
    /// Kafka itself, so this state machine stops counting them as pending.
    pub fn on_spilled(&mut self, ids: &[u64]) {
        for id in ids {
            self.kafka_inflight_mapping.remove(id);
        }
    }

    /// Counters of the spill log, published under `$SYS/broker/shard/N/spill/`.
    pub fn set_spill_stats(&mut self, backlog: u64, disk_bytes: u64, replayed: u64) {
        self.spill_stats = Some((backlog, disk_bytes, replayed));
    }

    /// `local-durable` records reached the spill log on disk (or could not: a full log). Their
    /// publishers' acknowledgements may go out now.
    pub fn on_durable(&mut self, ids: &[u64], outcome: Result<(), ProduceError>, now_ms: u64) {
        let mut touched = Vec::new();
        for id in ids {
            self.resolve_waiter(*id, &outcome, &mut touched);
        }
        touched.dedup();
        for conn in touched {
            self.flush_acks(conn);
        }
        self.run_local(now_ms);
    }

    fn resolve_waiter(&mut self, id: u64, outcome: &Result<(), ProduceError>, touched: &mut Vec<ConnId>) {
        let Some((conn, seq)) = self.kafka_waiters.remove(&id) else { return };
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let Some(a) = seq.checked_sub(c.acks_front_seq).and_then(|i| c.acks.get_mut(i as usize)) else { return };
        a.waiting = a.waiting.saturating_sub(1);
        if let (Err(e), reason::SUCCESS) = (outcome, a.code) {
            a.code = e.reason_code();
        }
        touched.push(conn);
    }

    /// Whether so many records wait for Kafka that this shard should stop reading publishers.
    pub fn kafka_backlogged(&self) -> bool {
        let pending = match self.qos0_policy {
            Qos0Policy::BackPressure => self.kafka_pending,
            // QoS 0 records have their own bound: they never stop the shard reading.
            _ => self.kafka_pending - self.kafka_pending_qos0,
        };
        pending + self.held_produce.len() >= self.max_pending_records
    }

    /// Records handed to Kafka and not yet answered.
    pub fn kafka_pending(&self) -> usize {
        self.kafka_pending
    }

    /// PUBACK, PUBREC (`rec`) or PUBCOMP for a message we sent.
    fn on_ack(&mut self, conn: ConnId, pid: u16, rec: bool, now_ms: u64) {
        let Some(id) = self.conns.get(&conn).and_then(|c| c.client_id.clone()) else { return };
        let Some(s) = self.sessions.get_mut(&id) else { return };
        touch(self.persist_sessions, &mut self.dirty_sessions, s);
        match s.inflight.get(&pid) {
            Some(Inflight::Publish(d)) if rec && d.qos == 2 => {
                s.inflight.insert(pid, Inflight::Release);
                self.send(conn, Packet::PubRel(PubResp { packet_id: pid, code: 0, properties: Properties::default() }));
            }
            Some(Inflight::Release) if rec => {
                self.send(conn, Packet::PubRel(PubResp { packet_id: pid, code: 0, properties: Properties::default() }));
            }
            Some(_) if !rec => {
                s.inflight.remove(&pid);
                self.pump_and_release(&id, now_ms);
            }
            _ => {}
        }
    }

    fn on_subscribe(&mut self, conn: ConnId, sub: Subscribe, now_ms: u64) {
        let c = self.conns.get(&conn).unwrap();
        let v5 = c.version == Some(Version::V5);
        let client_id = c.client_id.clone().unwrap();
        let sub_id = sub.properties.subscription_identifiers.first().copied();
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut queries = Vec::new();
        let mut added = Vec::new();
        let mut acks_left = 0;
        for (filter, opts) in sub.filters {
            let shared = topic::parse_shared(&filter);
            let plain = match shared {
                Some(Ok((_, f))) => f,
                Some(Err(())) => {
                    codes.push(reason::TOPIC_FILTER_INVALID);
                    continue;
                }
                None => filter.as_str(),
            };
            if !topic::valid_filter(plain, &self.topic_limits) {
                codes.push(if v5 { reason::TOPIC_FILTER_INVALID } else { 0x80 });
                continue;
            }
            if shared.is_some() && opts.no_local && v5 {
                return self.protocol_close(conn, reason::PROTOCOL_ERROR, "No Local on a shared subscription", now_ms);
            }
            let s = self.sessions.get_mut(&client_id).unwrap();
            let existed = s.subs.contains_key(&filter);
            if !existed && s.subs.len() >= self.limits.max_subscriptions_per_session {
                codes.push(if v5 { reason::QUOTA_EXCEEDED } else { 0x80 });
                continue;
            }
            let entry = Sub { opts, sub_id };
            s.subs.insert(filter.clone(), entry.clone());
            if !existed {
                added.push(filter.clone());
            }
            match shared {
                Some(Ok((group, f))) => {
                    let key = format!("{group}/{f}");
                    let owner = shard_of(&key, self.n_shards);
                    let member = ShareMember { client_id: client_id.clone(), shard: self.id, opts, sub_id };
                    self.send_to_shard(owner, ShardMsg::ShareJoin { key, member, ack: Some(conn) });
                    acks_left += 1;
                }
                _ => {
                    self.trie.insert(&filter, client_id.clone(), entry);
                    let send_retained = match opts.retain_handling {
                        0 => true,
                        1 => !existed,
                        _ => false,
                    };
                    if send_retained {
                        queries.push((filter.clone(), opts, sub_id));
                    }
                }
            }
            codes.push(opts.qos);
        }
        let s = self.sessions.get_mut(&client_id).unwrap();
        touch(self.persist_sessions, &mut self.dirty_sessions, s);
        if s.stored {
            // The SUBACK promises the subscription: it goes out once the store has it.
            self.store_sub_waiters.push(conn);
            self.effects.sessions_urgent = true;
            acks_left += 1;
        }
        let pending = PendingSub {
            acks_left,
            suback: SubAck { packet_id: sub.packet_id, codes, properties: Properties::default() },
            retained_queries: queries,
            added,
            failed: false,
        };
        if acks_left > 0 {
            self.conns.get_mut(&conn).unwrap().pending_sub = Some(Box::new(pending));
        } else {
            self.finish_subscribe(conn, client_id, pending);
        }
    }

    /// One of the confirmations a pending SUBSCRIBE waits for arrived.
    fn subscribe_step_done(&mut self, conn: ConnId, ok: bool, now_ms: u64) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let Some(p) = c.pending_sub.as_mut() else { return };
        p.acks_left = p.acks_left.saturating_sub(1);
        p.failed |= !ok;
        if p.acks_left > 0 {
            return;
        }
        let v5 = c.version == Some(Version::V5);
        let (Some(p), Some(id)) = (c.pending_sub.take(), c.client_id.clone()) else { return };
        let mut p = *p;
        if p.failed {
            self.refuse_subscribe(&id, v5, &mut p);
        }
        self.finish_subscribe(conn, id, p);
        self.run_deferred(conn, now_ms);
        self.resume(conn, now_ms);
    }

    /// The session store could not commit a SUBSCRIBE: the filters it added are taken back and
    /// its SUBACK refuses every one (MQTT 5 0x97, 3.1.1 0x80); the client may subscribe again.
    fn refuse_subscribe(&mut self, id: &ClientId, v5: bool, p: &mut PendingSub) {
        self.stats.store_refusals += 1;
        for code in &mut p.suback.codes {
            if *code < 0x80 {
                *code = if v5 { reason::QUOTA_EXCEEDED } else { 0x80 };
            }
        }
        p.retained_queries.clear();
        for filter in std::mem::take(&mut p.added) {
            let removed = self.sessions.get_mut(id).and_then(|s| s.subs.remove(&filter));
            if removed.is_some() {
                self.unsubscribe_one(id, &filter);
            }
        }
        if let Some(s) = self.sessions.get_mut(id) {
            touch(self.persist_sessions, &mut self.dirty_sessions, s);
        }
    }

    /// SUBACK, then the retained messages the new subscriptions asked for.
    fn finish_subscribe(&mut self, conn: ConnId, client_id: ClientId, p: PendingSub) {
        self.send(conn, Packet::SubAck(p.suback));
        if p.retained_queries.is_empty() {
            return;
        }
        match self.retained_feeds.get_mut(&client_id) {
            Some(feed) => feed.queue(p.retained_queries),
            None => self.start_retained_feed(client_id, p.retained_queries, HashSet::default()),
        }
    }

    fn on_unsubscribe(&mut self, conn: ConnId, u: Unsubscribe) {
        let Some(s) = self.session_of(conn) else { return };
        let id = s.client_id.clone();
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let s = self.sessions.get_mut(&id).unwrap();
            touch(self.persist_sessions, &mut self.dirty_sessions, s);
            if s.subs.remove(f).is_some() {
                self.unsubscribe_one(&id, f);
                if let Some(feed) = self.retained_feeds.get_mut(&id) {
                    feed.unsubscribed(f);
                }
                codes.push(reason::SUCCESS);
            } else {
                codes.push(reason::NO_SUBSCRIPTION_EXISTED);
            }
        }
        self.send(
            conn,
            Packet::UnsubAck(UnsubAck { packet_id: u.packet_id, codes, properties: Properties::default() }),
        );
    }

    // -----------------------------------------------------------------------------------------
    // Routing and delivery
    // -----------------------------------------------------------------------------------------

    /// A message published on this shard: deliver here and hand it to every other shard.
    /// Returns the ids of the Kafka records the message became (MQTT → Kafka mappings).
    fn route(&mut self, msg: Msg, now_ms: u64) -> Vec<u64> {
        for shard in 0..self.n_shards {
            if shard != self.id {
                let m = match self.routing_receipt {
                    Some(receipt) => ShardMsg::PublishReceipt { msg: msg.clone(), receipt },
                    None => ShardMsg::Publish(msg.clone()),
                };
                self.effects.to_shards.push((shard, m));
            }
        }
        self.route_here(&msg, now_ms);
        if &*msg.origin == "$kafka" {
            // What came from Kafka does not go back to it: no loops between the two directions.
            return Vec::new();
        }
        self.bridge_to_kafka(&msg, now_ms)
    }

    fn bridge_to_kafka(&mut self, msg: &Msg, now_ms: u64) -> Vec<u64> {
        if self.router.is_empty() {
            return Vec::new();
        }
        let mut records = Vec::new();
        self.router.route(msg, self.wall_offset_ms + now_ms as i64, &mut records);
        let mut ids = Vec::with_capacity(records.len());
        for record in records {
            let ms = self.mapping_stats.entry((record.mapping, record.cluster)).or_default();
            ms.messages_in += 1;
            ms.bytes_in += msg.payload.len() as u64;
            self.next_produce_id += 1;
            let id = self.next_produce_id;
            let durable = msg.qos > 0 && (self.delivery == DeliveryMode::LocalDurable || self.spilling);
            let qos0 = msg.qos == 0;
            let meta = RecordMeta { mapping: record.mapping, cluster: record.cluster, durable, qos0 };
            self.kafka_inflight_mapping.insert(id, meta);
            ids.push(id);
            let waits = !self.qos0_waiting.is_empty() || self.kafka_pending >= self.max_pending_records;
            if qos0 && self.qos0_policy != Qos0Policy::BackPressure && waits {
                self.qos0_waiting.push_back(ProduceRequest { id, record, durable });
                if self.qos0_waiting.len() > self.max_pending_records {
                    let dropped = match self.qos0_policy {
                        Qos0Policy::DropOldest => self.qos0_waiting.pop_front(),
                        _ => self.qos0_waiting.pop_back(),
                    };
                    if let Some(d) = dropped {
                        self.kafka_inflight_mapping.remove(&d.id);
                        let ms = self.mapping_stats.entry((d.record.mapping, d.record.cluster)).or_default();
                        ms.records_dropped += 1;
                    }
                }
                continue;
            }
            if qos0 {
                self.kafka_pending_qos0 += 1;
            }
            if durable && self.delivery == DeliveryMode::KafkaAck && !self.kafka_copies.is_empty() {
                // Spilling after an outage began: behind the records still in flight.
                self.held_produce.push(ProduceRequest { id, record, durable });
                continue;
            }
            // Durable records are bounded by the spill log (disk), not by memory here.
            if !durable {
                self.kafka_pending += 1;
                if self.outage_spill && msg.qos > 0 {
                    self.kafka_copies.insert(id, record.clone());
                }
            }
            self.effects.produce.push(ProduceRequest { id, record, durable });
        }
        ids
    }

    /// Delivery on this shard of a message published anywhere.
    fn route_here(&mut self, msg: &Msg, now_ms: u64) {
        if msg.retain && shard_of(&msg.topic, self.n_shards) == self.id {
            let persist = !msg.topic.starts_with("$SYS");
            if msg.payload.is_empty() {
                if self.retained.remove(&msg.topic).is_some() && persist {
                    self.effects.retained.push((msg.topic.clone(), None));
                    self.stored_hit = true;
                }
            } else if self.retained.len() < self.limits.max_retained_messages || self.retained.contains(&msg.topic) {
                self.retained.insert(&msg.topic, msg.clone());
                if persist {
                    self.effects.retained.push((msg.topic.clone(), Some(msg.clone())));
                    self.stored_hit = true;
                }
            }
        }
        // One delivery per session: highest QoS over its matching filters, all their ids. The
        // matches are gathered in a reused vector and merged by client id after sorting (most
        // messages match one subscription, and no table is built per message).
        let mut matches = std::mem::take(&mut self.route_matches);
        self.trie.for_each_match(&msg.topic, |id, sub| {
            if !(sub.opts.no_local && *id == msg.origin) {
                matches.push((id.clone(), sub.opts.qos, sub.opts.retain_as_published, sub.sub_id));
            }
        });
        if matches.len() > 1 {
            matches.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        }
        let mut i = 0;
        while i < matches.len() {
            let (id, mut qos, mut rap, sid) = matches[i].clone();
            let mut sub_ids: Vec<u32> = sid.into_iter().collect();
            i += 1;
            while i < matches.len() && matches[i].0 == id {
                qos = qos.max(matches[i].1);
                rap |= matches[i].2;
                sub_ids.extend(matches[i].3);
                i += 1;
            }
            if msg.retain {
                if let Some(feed) = self.retained_feeds.get_mut(&id) {
                    feed.live.insert(Arc::as_ptr(msg) as usize);
                }
            }
            let d = Delivery { msg: msg.clone(), qos: qos.min(msg.qos), retain: rap && msg.retain, sub_ids };
            self.deliver(&id, d, now_ms);
        }
        matches.clear();
        self.route_matches = matches;
        let mut picks = Vec::new();
        self.shared.for_each_match_mut(&msg.topic, |_, g| {
            if !g.members.is_empty() {
                let m = g.members[g.next % g.members.len()].clone();
                g.next = g.next.wrapping_add(1);
                picks.push(m);
            }
        });
        for m in picks {
            if m.shard == self.id {
                self.deliver_shared(&m.client_id, msg.clone(), m.opts, m.sub_id, now_ms);
            } else {
                let receipt = self.routing_receipt;
                if receipt.is_some() {
                    self.receipt_forwards += 1;
                }
                let sd = ShardMsg::ShareDeliver {
                    client_id: m.client_id,
                    msg: msg.clone(),
                    opts: m.opts,
                    sub_id: m.sub_id,
                    receipt,
                };
                self.send_to_shard(m.shard, sd);
            }
        }
    }

    fn deliver_shared(&mut self, id: &ClientId, msg: Msg, opts: SubOptions, sub_id: Option<u32>, now_ms: u64) {
        let d = Delivery {
            qos: opts.qos.min(msg.qos),
            retain: opts.retain_as_published && msg.retain,
            sub_ids: sub_id.into_iter().collect(),
            msg,
        };
        self.deliver(id, d, now_ms);
    }

    /// Hands one message to one session: straight out if connected and the window allows,
    /// otherwise into its bounded queue (QoS 0 is not queued for offline sessions).
    fn deliver(&mut self, id: &ClientId, d: Delivery, now_ms: u64) {
        let Some(s) = self.sessions.get_mut(id) else { return };
        match s.conn {
            Some(conn) if d.qos == 0 => {
                let c = self.conns.get(&conn).unwrap();
                if c.out.len() >= self.limits.max_outbound_buffer_bytes {
                    self.stats.dropped_slow_qos0 += 1;
                    return;
                }
                self.write_publish(conn, &d, 0, false, now_ms);
            }
            None if d.qos == 0 => {}
            _ => {
                if s.queue.len() >= self.limits.max_queued_messages {
                    self.stats.dropped_queue_full += 1;
                    match self.limits.queue_full_policy {
                        QueueFullPolicy::DropNewest => return,
                        QueueFullPolicy::DropOldest => {
                            s.queue.pop_front();
                        }
                    }
                }
                s.queue.push_back(d);
                touch(self.persist_sessions, &mut self.dirty_sessions, s);
                if s.stored {
                    self.stored_hit = true;
                }
                let congested = s.conn.is_some()
                    && s.conn != self.publishing
                    && s.queue.len() * 2 >= self.limits.max_queued_messages
                    && self.limits.max_backpressure_ms > 0
                    && !self.slow.contains(id);
                let for_a_publisher = self.publishing.is_some() || self.routing_receipt.is_some();
                if congested && for_a_publisher && !self.congested.contains(id) {
                    self.congested.push(id.clone());
                }
                self.pump(id, now_ms);
            }
        }
    }

    /// Moves queued messages into flight while the client's window has room and its output
    /// buffer is under `max_outbound_buffer_bytes`: a message in flight is an encoded copy for
    /// this client, a queued one a pointer shared with every other queue it is in, so a client
    /// that stops reading pins at most the window or the buffer limit, whichever comes first.
    fn pump(&mut self, id: &ClientId, now_ms: u64) {
        loop {
            let Some(s) = self.sessions.get_mut(id) else { return };
            let Some(conn) = s.conn else { return };
            let c = self.conns.get_mut(&conn).unwrap();
            if !matches!(c.state, ConnState::Active) {
                return;
            }
            if c.out.len() >= self.limits.max_outbound_buffer_bytes {
                c.out_full = true;
                return;
            }
            let window = usize::from(c.client_receive_max.min(self.limits.max_inflight));
            if s.inflight.len() >= window {
                return;
            }
            let Some(d) = s.queue.pop_front() else { return };
            if d.qos == 0 {
                self.write_publish(conn, &d, 0, false, now_ms);
                continue;
            }
            let pid = s.alloc_pid();
            if self.write_publish(conn, &d, pid, false, now_ms) {
                self.sessions.get_mut(id).unwrap().inflight.insert(pid, Inflight::Publish(d));
            }
        }
    }

    /// Encodes one PUBLISH to `conn`. Returns false when the message was dropped instead (expired,
    /// or larger than the client accepts): it then counts as delivered.
    fn write_publish(&mut self, conn: ConnId, d: &Delivery, pid: u16, dup: bool, now_ms: u64) -> bool {
        let Some(left) = expiry_left_secs(&d.msg, now_ms) else {
            self.stats.dropped_expired += 1;
            return false;
        };
        let c = self.conns.get_mut(&conn).unwrap();
        let v5 = c.version == Some(Version::V5);
        let mut topic: &str = &d.msg.topic;
        // Most deliveries forward the message as it is; MQTT 5 adds per-delivery properties.
        let mut own = None;
        if v5 && (left.is_some() || !d.sub_ids.is_empty() || c.client_alias_max > 0) {
            let properties = own.insert(d.msg.properties().clone());
            properties.message_expiry_interval = left;
            properties.subscription_identifiers = d.sub_ids.clone();
            if c.client_alias_max > 0 {
                let out = &mut c.aliases.get_or_insert_with(Default::default).outbound;
                if let Some(a) = out.get(topic) {
                    properties.topic_alias = Some(*a);
                    topic = "";
                } else if out.len() < usize::from(c.client_alias_max) {
                    let a = out.len() as u16 + 1;
                    out.insert(topic.to_string(), a);
                    properties.topic_alias = Some(a);
                }
            }
        }
        let p = PublishRef {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic,
            packet_id: pid,
            properties: own.as_ref().unwrap_or(d.msg.properties()),
            payload: &d.msg.payload,
        };
        if self.send_publish(conn, &p) {
            self.stats.messages_sent += 1;
            true
        } else {
            self.stats.dropped_too_large += 1;
            false
        }
    }

    // -----------------------------------------------------------------------------------------
    // Retained messages for new subscriptions (crate::retained_feed)
    // -----------------------------------------------------------------------------------------

    /// Whether retained scans wait for [`Shard::run_retained`].
    pub fn has_retained_work(&self) -> bool {
        self.retained_scans.has_work()
    }

    /// One turn of retained scans (at most `retained_feed::SLICE_NODES` tree nodes): each
    /// slice goes to its subscriber's shard. Returns whether more work waits; the caller runs
    /// it in a later turn, after the shard's other work had its turn.
    pub fn run_retained(&mut self, now_ms: u64) -> bool {
        let mut replies = Vec::new();
        self.retained_scans.run(&self.retained, |m| expiry_left_secs(m, now_ms).is_some(), &mut replies);
        for r in replies {
            let reply = ShardMsg::RetainedReply {
                from: self.id,
                scan: r.scan,
                client_id: r.client_id,
                msgs: r.msgs,
                done: r.done,
            };
            self.send_to_shard(r.to, reply);
        }
        self.run_local(now_ms);
        let more = self.retained_scans.has_work();
        self.effects.retained_work |= more;
        more
    }

    /// Asks every shard for the retained messages of `filters`, for session `id`.
    fn start_retained_feed(&mut self, id: ClientId, filters: Vec<RetainedFilter>, live: HashSet<usize>) {
        self.next_retained_scan += 1;
        let scan = self.next_retained_scan;
        let (feed, filters) = Feed::start(scan, filters, self.n_shards, live);
        self.retained_feeds.insert(id.clone(), feed);
        for shard in 0..self.n_shards {
            let q = ShardMsg::RetainedQuery { from: self.id, scan, client_id: id.clone(), filters: filters.clone() };
            self.send_to_shard(shard, q);
        }
    }

    /// Moves `id`'s retained backlog into the session while it has room (QoS 1/2: its queue
    /// under a quarter full, so neither overflow nor back-pressure; QoS 0: the output buffer
    /// under its limit, else `out_full` brings us back), then gives owners credit when the
    /// backlog ran low and starts the next request when this one is done.
    fn feed_retained(&mut self, id: &ClientId, now_ms: u64) {
        if self.retained_feeds.is_empty() {
            return;
        }
        loop {
            let moved = self.feed_retained_pass(id, now_ms);
            self.pump(id, now_ms);
            if !moved {
                break;
            }
        }
        let Some(feed) = self.retained_feeds.get_mut(id) else { return };
        let scan = feed.scan;
        for owner in feed.credit() {
            self.send_to_shard(owner, ShardMsg::RetainedMore { from: self.id, scan });
        }
        let feed = self.retained_feeds.get(id).unwrap();
        if feed.finished() {
            let (next, live) = self.retained_feeds.remove(id).unwrap().into_next();
            if !next.is_empty() {
                self.start_retained_feed(id.clone(), next, live);
            }
        }
    }

    /// One pass of [`Shard::feed_retained`]; returns whether anything moved.
    fn feed_retained_pass(&mut self, id: &ClientId, now_ms: u64) -> bool {
        let mut moved = false;
        loop {
            let Some(feed) = self.retained_feeds.get_mut(id) else { return moved };
            let Some(s) = self.sessions.get_mut(id) else { return moved };
            let Some(d) = feed.backlog.pop_front() else { return moved };
            if feed.live.contains(&(Arc::as_ptr(&d.msg) as usize)) {
                continue;
            }
            match s.conn {
                Some(conn) if d.qos == 0 => {
                    let c = self.conns.get_mut(&conn).unwrap();
                    if !matches!(c.state, ConnState::Active) {
                        feed.backlog.push_front(d);
                        return moved;
                    }
                    if c.out.len() >= self.limits.max_outbound_buffer_bytes {
                        c.out_full = true;
                        feed.backlog.push_front(d);
                        return moved;
                    }
                    self.write_publish(conn, &d, 0, false, now_ms);
                }
                // As for any QoS 0 message to an offline session.
                None if d.qos == 0 => {}
                _ => {
                    if !s.queue.is_empty() && s.queue.len() * 4 >= self.limits.max_queued_messages {
                        feed.backlog.push_front(d);
                        return moved;
                    }
                    s.queue.push_back(d);
                    touch(self.persist_sessions, &mut self.dirty_sessions, s);
                    if s.conn.is_some() {
                        // Into flight now: the queue stays short and the window full.
                        self.pump(id, now_ms);
                    }
                }
            }
            moved = true;
        }
    }

    /// `id` ended or left this shard: its retained scans stop.
    fn cancel_retained_feed(&mut self, id: &ClientId) {
        let Some(feed) = self.retained_feeds.remove(id) else { return };
        for owner in feed.scanning() {
            self.send_to_shard(owner, ShardMsg::RetainedCancel { from: self.id, scan: feed.scan });
        }
    }

    // -----------------------------------------------------------------------------------------
    // Messages between shards
    // -----------------------------------------------------------------------------------------

    fn handle_shard_msg(&mut self, m: ShardMsg, now_ms: u64) {
        match m {
            ShardMsg::Publish(msg) => self.route_here(&msg, now_ms),
            ShardMsg::PublishReceipt { msg, receipt } => {
                let ((), more) = self.under_receipt(receipt, |shard| shard.route_here(&msg, now_ms));
                if receipt.token & FEED_TOKEN != 0 {
                    self.answer_feed_receipt(receipt, more, &msg, now_ms);
                } else {
                    self.answer_receipt(receipt, more);
                }
            }
            ShardMsg::Receipt { token, more, failed } => self.on_receipt(token, more, failed),
            ShardMsg::Claim { client_id, host, conn, clean_start } => self.on_claim(client_id, host, conn, clean_start),
            ShardMsg::Settled { client_id, host, hosting } => self.on_settled(client_id, host, hosting),
            ShardMsg::Evict { client_id, to, conn, clean_start } => {
                let mut session = None;
                if let Some(old_conn) = self.sessions.get(&client_id).and_then(|s| s.conn) {
                    // Takeover: the old connection goes; its will follows the MQTT 5 rules — sent
                    // now unless the session continues and the will has a delay.
                    if let Some(c) = self.conns.get_mut(&old_conn) {
                        let keep_delayed = !clean_start
                            && c.will.as_ref().is_some_and(|w| w.properties.will_delay_interval.unwrap_or(0) > 0);
                        if keep_delayed {
                            c.will = None;
                        }
                        if c.version == Some(Version::V5) {
                            self.send(
                                old_conn,
                                Packet::Disconnect(Disconnect {
                                    code: reason::SESSION_TAKEN_OVER,
                                    properties: Properties::default(),
                                }),
                            );
                        }
                    }
                    self.detach(old_conn, Detach::Moves, now_ms);
                    self.effects.close.push(old_conn);
                }
                if to != self.id {
                    // The feed does not move with the session; the new host's client re-subscribes.
                    self.cancel_retained_feed(&client_id);
                }
                if let Some(mut s) = self.sessions.remove(&client_id) {
                    touch(self.persist_sessions, &mut self.dirty_sessions, &mut s);
                    for (filter, _) in s.subs.iter() {
                        if topic::parse_shared(filter).is_none() {
                            self.trie.remove(filter, &client_id);
                        }
                    }
                    s.conn = None;
                    session = Some(s);
                }
                self.send_to_shard(to, ShardMsg::Transfer { client_id, conn, session });
            }
            ShardMsg::Transfer { client_id, conn, session } => self.on_transfer(client_id, conn, session, now_ms),
            ShardMsg::Release { client_id, host } => {
                // While a claim is under way its claimer reports the outcome (`Settled`); a
                // release from before it must not clear the entry the claim just made.
                if let Some(e) = self.directory.get_mut(&client_id) {
                    if !e.busy && e.host == Some(host) {
                        self.directory.remove(&client_id);
                    }
                }
            }
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
                let (group, filter) = key.split_once('/').unwrap();
                let group = group.to_string();
                let mut g = self.shared.remove(filter, &group).unwrap_or_default();
                match g.members.iter_mut().find(|m| m.client_id == member.client_id) {
                    Some(m) => *m = member,
                    None => g.members.push(member),
                }
                self.shared.insert(filter, group, g);
            }
            ShardMsg::ShareLeave { key, client_id } => {
                let (group, filter) = key.split_once('/').unwrap();
                let group = group.to_string();
                if let Some(mut g) = self.shared.remove(filter, &group) {
                    g.members.retain(|m| m.client_id != client_id);
                    if !g.members.is_empty() {
                        self.shared.insert(filter, group, g);
                    }
                }
            }
            ShardMsg::ShareDeliver { client_id, msg, opts, sub_id, receipt } => {
                self.stored_hit = false;
                self.deliver_shared(&client_id, msg, opts, sub_id, now_ms);
                if let Some(r) = receipt {
                    self.answer_receipt(r, 0);
                }
            }
            ShardMsg::Stats { from, stats } => {
                if let Some(s) = self.shard_stats.get_mut(from) {
                    *s = stats;
                }
            }
        }
    }

    /// Directory: `host` wants the session of `client_id` for its connection `conn`. Carried out
    /// now, or after the claim under way (see [`DirEntry`]).
    fn on_claim(&mut self, client_id: ClientId, host: ShardId, conn: ConnId, clean_start: bool) {
        let e = self.directory.entry(client_id.clone()).or_default();
        if e.busy {
            e.waiting.push_back((host, conn, clean_start));
            return;
        }
        e.busy = true;
        match e.host.replace(host) {
            Some(prev) => self.send_to_shard(prev, ShardMsg::Evict { client_id, to: host, conn, clean_start }),
            None => self.send_to_shard(host, ShardMsg::Transfer { client_id, conn, session: None }),
        }
    }

    /// Directory: the claim under way for `client_id` is carried out.
    fn on_settled(&mut self, client_id: ClientId, host: ShardId, hosting: bool) {
        let Some(e) = self.directory.get_mut(&client_id) else { return };
        e.busy = false;
        if !hosting && e.host == Some(host) {
            e.host = None;
        }
        if let Some((host, conn, clean_start)) = e.waiting.pop_front() {
            self.on_claim(client_id, host, conn, clean_start);
        } else if e.host.is_none() {
            self.directory.remove(&client_id);
        }
    }

    /// Answers `r` for what this shard just routed under it: at once, or — when that made
    /// sessions here congested — once they drained, so that the publisher's acknowledgement on
    /// its own shard waits for a slow subscriber on this one as it would on its own.
    fn answer_receipt(&mut self, r: Receipt, more: u32) {
        let stored = std::mem::take(&mut self.stored_hit);
        let congested = std::mem::take(&mut self.congested);
        if congested.is_empty() {
            return self.answer_receipt_now(r, more, stored);
        }
        self.next_held_receipt += 1;
        let h = self.next_held_receipt;
        let waiting = congested.len() as u32;
        self.held_receipts.insert(h, HeldReceipt { receipt: r, more, stored, waiting });
        for id in congested {
            self.drain_waiters.entry(id).or_default().waiters.push(DrainWaiter::Receipt(h));
        }
    }

    fn answer_receipt_now(&mut self, r: Receipt, more: u32, stored: bool) {
        if stored {
            self.store_receipts.push((r, more));
            self.effects.sessions_urgent = true;
        } else if r.from == self.id {
            self.on_receipt(r.token, more, false);
        } else {
            self.send_to_shard(r.from, ShardMsg::Receipt { token: r.token, more, failed: false });
        }
    }

    /// Tells every other shard this shard's counters: the connection limit and the `$SYS`
    /// totals read them.
    fn share_stats(&mut self) {
        let stats = self.stats();
        self.shard_stats[self.id] = stats;
        for shard in 0..self.n_shards {
            if shard != self.id {
                self.effects.to_shards.push((shard, ShardMsg::Stats { from: self.id, stats }));
            }
        }
    }

    fn publish_sys(&mut self, now_ms: u64) {
        self.share_stats();
        let stats = self.stats();
        let uptime = (now_ms.saturating_sub(self.started_ms) / 1000).to_string();
        let mut values = vec![(format!("$SYS/broker/shard/{}/uptime", self.id), uptime.clone())];
        let fields = |s: &Stats| {
            [
                ("clients/connected", s.clients_connected),
                ("sessions", s.sessions),
                ("subscriptions/count", s.subscriptions),
                ("retained messages/count", s.retained),
                ("messages/received", s.messages_received),
                ("messages/sent", s.messages_sent),
                ("bytes/received", s.bytes_received),
                ("bytes/sent", s.bytes_sent),
                (
                    "messages/dropped",
                    s.dropped_queue_full + s.dropped_slow_qos0 + s.dropped_too_large + s.dropped_expired,
                ),
                ("clients/slow", s.slow_subscribers),
                ("store/refused", s.store_refusals),
                ("connections/preconnect", s.preconnect_connections),
                ("connections/preconnect_bytes", s.preconnect_bytes),
                ("connections/refused_preconnect", s.refused_preconnect),
                ("connections/connect_timeouts", s.connect_timeouts),
            ]
        };
        for (name, v) in fields(&stats) {
            values.push((format!("$SYS/broker/shard/{}/{name}", self.id), v.to_string()));
        }
        if self.id == 0 {
            let mut total = Stats::default();
            for s in &self.shard_stats {
                total += *s;
            }
            values.push(("$SYS/broker/uptime".into(), uptime));
            for (name, v) in fields(&total) {
                values.push((format!("$SYS/broker/{name}"), v.to_string()));
            }
        }
        for ((mapping, cluster), ms) in &self.mapping_stats {
            let name = self.router.mapping_name(*mapping);
            let cluster = &self.router.clusters()[usize::from(*cluster)];
            let done = ms.records_produced + ms.records_failed;
            let [b1, b10, b100, b1000, bmore] = ms.batch_records;
            for (field, v) in [
                ("messages/received", ms.messages_in),
                ("bytes/received", ms.bytes_in),
                ("records/produced", ms.records_produced),
                ("records/failed", ms.records_failed),
                ("records/retried", ms.records_retried),
                ("records/spilled", ms.records_spilled),
                ("records/dropped", ms.records_dropped),
                ("latency_us/avg", ms.latency_us_sum.checked_div(done).unwrap_or(0)),
                ("latency_us/max", ms.latency_us_max),
                ("batch_records/1", b1),
                ("batch_records/2-10", b10),
                ("batch_records/11-100", b100),
                ("batch_records/101-1000", b1000),
                ("batch_records/1001+", bmore),
            ] {
                values.push((format!("$SYS/broker/shard/{}/kafka/{name}/{cluster}/{field}", self.id), v.to_string()));
            }
        }
        for (i, (read, published, skipped)) in self.inbound_stats.iter().enumerate() {
            let name = self.inbound.mapping_name(i as u16);
            for (field, v) in
                [("records/received", read), ("messages/published", published), ("records/skipped", skipped)]
            {
                values.push((format!("$SYS/broker/shard/{}/kafka_to_mqtt/{name}/{field}", self.id), v.to_string()));
            }
        }
        self.feed_sys(&mut values);
        if let Some((backlog, disk, replayed)) = self.spill_stats {
            values.push((format!("$SYS/broker/shard/{}/spill/records", self.id), backlog.to_string()));
            values.push((format!("$SYS/broker/shard/{}/spill/disk_bytes", self.id), disk.to_string()));
            values.push((format!("$SYS/broker/shard/{}/spill/replayed", self.id), replayed.to_string()));
        }
        if !self.router.is_empty() {
            values.push((format!("$SYS/broker/shard/{}/kafka/pending", self.id), self.kafka_pending.to_string()));
        }
        let backlog: usize = self.retained_feeds.values().map(|f| f.backlog.len()).sum();
        for (field, v) in [
            ("scans/open", self.retained_scans.open_count() as u64),
            ("scans/waiting", self.retained_scans.waiting_count() as u64),
            ("scans/queued", self.retained_scans.queued_total),
            ("feed/backlog", backlog as u64),
        ] {
            values.push((format!("$SYS/broker/shard/{}/retained messages/{field}", self.id), v.to_string()));
        }
        let origin: ClientId = Arc::from("$SYS");
        for (topic, value) in values {
            let msg = Arc::new(Message {
                topic,
                payload: Bytes::from(value),
                qos: 0,
                retain: true,
                properties: None,
                expiry_at_ms: None,
                origin: origin.clone(),
            });
            self.route(msg, now_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The state machine driven in memory: several shards, messages routed between them until
    //! quiet, packets in and out through the real codec.
    use super::*;
    use crate::packet::{Connect, SubOptions};

    struct World {
        shards: Vec<Shard>,
        closed: HashSet<(ShardId, ConnId)>,
        now: u64,
        /// Turns of retained scans run so far, over all shards.
        retained_turns: usize,
    }

    impl World {
        fn new(n: usize, limits: Limits) -> World {
            World {
                shards: (0..n).map(|i| Shard::new(i, n, limits.clone(), 0)).collect(),
                closed: HashSet::default(),
                now: 0,
                retained_turns: 0,
            }
        }

        fn settle(&mut self) {
            loop {
                let mut moved = false;
                for i in 0..self.shards.len() {
                    // One turn of retained scans per round, as the network layer runs them.
                    if self.shards[i].has_retained_work() {
                        self.shards[i].run_retained(self.now);
                        self.retained_turns += 1;
                        moved = true;
                    }
                    let fx = self.shards[i].drain_effects();
                    for c in fx.close {
                        self.closed.insert((i, c));
                    }
                    for (to, m) in fx.to_shards {
                        moved = true;
                        self.shards[to].on_shard_msgs([m], self.now);
                    }
                }
                if !moved {
                    return;
                }
            }
        }

        fn send(&mut self, shard: ShardId, conn: ConnId, v: Version, p: Packet) {
            let mut b = BytesMut::new();
            packet::encode(&p, v, &mut b);
            self.shards[shard].on_bytes(conn, &mut b, self.now);
            self.settle();
        }

        fn recv(&mut self, shard: ShardId, conn: ConnId, v: Version) -> Vec<Packet> {
            let mut out = Vec::new();
            if let Some(mut b) = self.shards[shard].take_output(conn) {
                while let Some(p) = packet::decode(&mut b, Some(v), usize::MAX).unwrap() {
                    out.push(p);
                }
                // As the network layer does once the kernel took everything.
                self.shards[shard].on_output_drained(conn, self.now);
                self.settle();
            }
            out
        }

        fn connect(&mut self, shard: ShardId, conn: ConnId, v: Version, id: &str, clean: bool) -> ConnAck {
            match self.connect_all(shard, conn, v, id, clean).into_iter().next() {
                Some(Packet::ConnAck(a)) => a,
                o => panic!("{o:?}"),
            }
        }

        /// CONNECT, and the CONNACK with whatever followed it.
        fn connect_all(&mut self, shard: ShardId, conn: ConnId, v: Version, id: &str, clean: bool) -> Vec<Packet> {
            self.shards[shard].on_open(conn, self.now);
            let c = Connect {
                version: v,
                clean_start: clean,
                keep_alive: 10,
                client_id: id.into(),
                will: None,
                username: None,
                password: None,
                properties: Properties { session_expiry_interval: (!clean).then_some(600), ..Default::default() },
            };
            self.send(shard, conn, v, Packet::Connect(Box::new(c)));
            self.recv(shard, conn, v)
        }
    }

    fn publish(topic: &str, qos: u8, pid: u16, payload: &'static [u8]) -> Packet {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            packet_id: pid,
            properties: Properties::default(),
            payload: Bytes::from_static(payload),
        })
    }

    fn subscribe(filter: &str, qos: u8) -> Packet {
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(filter.into(), SubOptions { qos, ..Default::default() })],
            properties: Properties::default(),
        })
    }

    fn resp(pid: u16) -> PubResp {
        PubResp { packet_id: pid, code: 0, properties: Properties::default() }
    }

    const V5: Version = Version::V5;

    /// What `sluice-net` does with [`SessionChange`]s, in memory: a store per shard, merged at
    /// start by the highest generation. Holds `(generation, bytes, shard whose store has it)`.
    fn commit_sessions(w: &mut World, store: &mut HashMap<String, (u64, Vec<u8>, ShardId)>) {
        for i in 0..w.shards.len() {
            let (changes, token) = w.shards[i].take_session_changes();
            for c in changes {
                match c {
                    SessionChange::Put { client_id, generation, bytes } => {
                        let e = store.entry(client_id.to_string()).or_insert((0, Vec::new(), i));
                        if generation >= e.0 {
                            *e = (generation, bytes, i);
                        }
                    }
                    SessionChange::Delete { client_id } => {
                        if store.get(client_id.as_ref()).is_some_and(|e| e.2 == i) {
                            store.remove(client_id.as_ref());
                        }
                    }
                }
            }
            w.shards[i].on_sessions_synced(token, true, w.now);
        }
        w.settle();
    }

    #[test]
    fn a_persistent_session_comes_back_from_the_store_after_a_restart() {
        let persistent = |n: usize| {
            let mut w = World::new(n, Limits::default());
            w.shards = (0..n).map(|i| Shard::new(i, n, Limits::default(), 0).with_session_store()).collect();
            w
        };
        let mut store = HashMap::default();
        let mut w = persistent(2);
        w.connect(1, 1, V5, "dev", false);
        w.send(1, 1, V5, subscribe("cmd/#", 1));
        assert!(w.recv(1, 1, V5).is_empty(), "SUBACK before the store has the subscription");
        commit_sessions(&mut w, &mut store);
        assert!(matches!(w.recv(1, 1, V5).as_slice(), [Packet::SubAck(_)]));
        w.shards[1].on_lost(1, w.now);
        w.settle();
        // A publisher on the same shard: its PUBACK waits for the offline queue to be stored.
        w.connect(1, 2, V5, "app", true);
        w.send(1, 2, V5, publish("cmd/1", 1, 7, b"reboot"));
        assert!(w.recv(1, 2, V5).is_empty(), "PUBACK before the queued message is stored");
        commit_sessions(&mut w, &mut store);
        assert!(matches!(w.recv(1, 2, V5).as_slice(), [Packet::PubAck(r)] if r.packet_id == 7));
        // A publisher on another shard: its PUBACK waits for shard 1's commit too.
        w.connect(0, 3, V5, "far-app", true);
        w.send(0, 3, V5, publish("cmd/far", 1, 8, b"from afar"));
        assert!(w.recv(0, 3, V5).is_empty(), "PUBACK before the other shard stored the message");
        let (_, token) = w.shards[0].take_session_changes();
        w.shards[0].on_sessions_synced(token, true, w.now);
        w.settle();
        assert!(w.recv(0, 3, V5).is_empty(), "PUBACK after the wrong shard's commit");
        commit_sessions(&mut w, &mut store);
        assert!(matches!(w.recv(0, 3, V5).as_slice(), [Packet::PubAck(r)] if r.packet_id == 8));
        // Nothing stored anywhere: no wait beyond the other shard's answer.
        w.send(0, 3, V5, publish("nobody/listens", 1, 9, b"x"));
        assert!(matches!(w.recv(0, 3, V5).as_slice(), [Packet::PubAck(r)] if r.packet_id == 9));
        // A clean session is never stored.
        assert_eq!(store.keys().collect::<Vec<_>>(), ["dev"]);

        // Restart with another shard count: every session goes to its directory shard.
        let mut w = persistent(3);
        for (id, (generation, bytes, _)) in store.clone() {
            let at = directory_shard(&id, 3);
            assert!(w.shards[at].restore_sessions(vec![(id, generation, bytes)], 0).is_empty());
        }
        w.settle();
        match w.connect_all(2, 5, V5, "dev", false).as_slice() {
            [Packet::ConnAck(a), Packet::Publish(p), Packet::Publish(q)] if a.session_present => {
                assert_eq!((p.topic.as_str(), p.qos, &p.payload[..]), ("cmd/1", 1, &b"reboot"[..]));
                assert_eq!((q.topic.as_str(), &q.payload[..]), ("cmd/far", &b"from afar"[..]));
            }
            o => panic!("{o:?}"),
        }
        // The subscription came back too.
        w.connect(0, 6, V5, "app", true);
        w.send(0, 6, V5, publish("cmd/2", 0, 0, b"again"));
        assert!(matches!(w.recv(2, 5, V5).as_slice(), [Packet::Publish(p)] if p.topic == "cmd/2"));
        // Ending the session (clean start) deletes it from the store.
        w.shards[2].on_lost(5, w.now);
        w.settle();
        w.connect(1, 7, V5, "dev", true);
        commit_sessions(&mut w, &mut store);
        assert!(store.is_empty(), "{store:?}");
    }

    #[test]
    fn outbound_qos2_state_machine() {
        let mut w = World::new(2, Limits::default());
        w.connect(0, 1, V5, "sub", true);
        w.send(0, 1, V5, subscribe("t", 2));
        assert!(matches!(w.recv(0, 1, V5).as_slice(), [Packet::SubAck(_)]));
        w.connect(1, 1, V5, "pub", true);
        w.send(1, 1, V5, publish("t", 2, 9, b"x"));
        assert!(matches!(w.recv(1, 1, V5).as_slice(), [Packet::PubRec(r)] if r.packet_id == 9));
        let pid = match w.recv(0, 1, V5).as_slice() {
            [Packet::Publish(p)] if p.qos == 2 => p.packet_id,
            o => panic!("{o:?}"),
        };
        w.send(0, 1, V5, Packet::PubRec(resp(pid)));
        assert!(matches!(w.recv(0, 1, V5).as_slice(), [Packet::PubRel(r)] if r.packet_id == pid));
        assert!(matches!(w.shards[0].sessions[&ClientId::from("sub")].inflight.get(&pid), Some(Inflight::Release)));
        w.send(0, 1, V5, Packet::PubComp(resp(pid)));
        assert!(w.shards[0].sessions[&ClientId::from("sub")].inflight.is_empty());
        // PUBREL for the incoming side completes with PUBCOMP; an unknown id says so.
        w.send(1, 1, V5, Packet::PubRel(resp(9)));
        assert!(matches!(w.recv(1, 1, V5).as_slice(), [Packet::PubComp(r)] if r.code == 0));
        w.send(1, 1, V5, Packet::PubRel(resp(9)));
        assert!(matches!(w.recv(1, 1, V5).as_slice(), [Packet::PubComp(r)] if r.code == reason::PACKET_ID_NOT_FOUND));
    }

    #[test]
    fn session_moves_between_shards_on_takeover() {
        let mut w = World::new(3, Limits::default());
        w.connect(0, 1, V5, "dev", false);
        w.send(0, 1, V5, subscribe("a/#", 1));
        w.recv(0, 1, V5);
        let ack = w.connect(2, 7, V5, "dev", false);
        assert!(ack.session_present);
        assert!(w.closed.contains(&(0, 1)));
        assert!(matches!(w.recv(0, 1, V5).as_slice(), [Packet::Disconnect(d)] if d.code == reason::SESSION_TAKEN_OVER));
        assert!(!w.shards[0].sessions.contains_key("dev"));
        assert!(w.shards[2].sessions.contains_key("dev"));
        assert_eq!(w.shards[0].trie.len(), 0);
        assert_eq!(w.shards[2].trie.len(), 1);
        let dir = directory_shard("dev", 3);
        assert_eq!(w.shards[dir].directory.get("dev").and_then(|e| e.host), Some(2));
    }

    #[test]
    fn queue_full_policies() {
        for (policy, want) in [(QueueFullPolicy::DropNewest, [b"0", b"1"]), (QueueFullPolicy::DropOldest, [b"2", b"3"])]
        {
            let limits = Limits { max_queued_messages: 2, queue_full_policy: policy, ..Limits::default() };
            let mut w = World::new(1, limits);
            w.connect(0, 1, V5, "off", false);
            w.send(0, 1, V5, subscribe("q", 1));
            w.shards[0].on_lost(1, 0);
            w.connect(0, 2, V5, "pub", true);
            for (i, p) in [b"0", b"1", b"2", b"3"].iter().enumerate() {
                w.send(0, 2, V5, publish("q", 1, i as u16 + 1, *p));
            }
            let q: Vec<&[u8]> =
                w.shards[0].sessions[&ClientId::from("off")].queue.iter().map(|d| &d.msg.payload[..]).collect();
            assert_eq!(q, want.iter().map(|b| &b[..]).collect::<Vec<_>>(), "{policy:?}");
            assert_eq!(w.shards[0].stats.dropped_queue_full, 2);
        }
    }

    #[test]
    fn keep_alive_is_one_and_a_half_times_the_interval() {
        let mut w = World::new(1, Limits::default());
        w.connect(0, 1, V5, "ka", true); // keep-alive 10 s
        w.now = 14_900;
        w.shards[0].tick(w.now, 0);
        assert!(w.shards[0].drain_effects().close.is_empty());
        w.now = 15_600;
        w.shards[0].tick(w.now, 0);
        assert_eq!(w.shards[0].drain_effects().close, vec![1]);
    }

    #[test]
    fn a_retained_publish_racing_a_new_subscription_arrives_once() {
        let mut w = World::new(2, Limits::default());
        let topic = (0..).map(|i| format!("r/{i}")).find(|t| shard_of(t, 2) == 0).unwrap();
        w.connect(1, 1, V5, "sub", true);
        w.connect(0, 2, V5, "pub", true);
        // The publish is stored by its owner (shard 0) but its copy for shard 1 is still in
        // flight when the subscription is made on shard 1.
        let mut b = BytesMut::new();
        let p = Publish {
            dup: false,
            qos: 0,
            retain: true,
            topic: topic.clone(),
            packet_id: 0,
            properties: Properties::default(),
            payload: Bytes::from_static(b"once"),
        };
        packet::encode(&Packet::Publish(p), V5, &mut b);
        w.shards[0].on_bytes(2, &mut b, 0);
        let mut b = BytesMut::new();
        packet::encode(&subscribe("r/#", 0), V5, &mut b);
        w.shards[1].on_bytes(1, &mut b, 0);
        w.settle();
        let got: Vec<Packet> = w.recv(1, 1, V5).into_iter().filter(|p| matches!(p, Packet::Publish(_))).collect();
        assert_eq!(got.len(), 1, "delivered live and again from the retained store: {got:?}");
    }

    /// A world of two shards holding `n` retained QoS 0 messages `ret/0` … (spread over both).
    fn world_with_retained(n: usize, limits: Limits) -> World {
        world_of_with_retained(2, n, limits)
    }

    fn world_of_with_retained(shards: usize, n: usize, limits: Limits) -> World {
        let mut w = World::new(shards, limits);
        w.connect(0, 100, V5, "loader", true);
        let mut b = BytesMut::new();
        for i in 0..n {
            let p = Publish {
                dup: false,
                qos: 0,
                retain: true,
                topic: format!("ret/{i}"),
                packet_id: 0,
                properties: Properties::default(),
                payload: Bytes::from_static(b"r"),
            };
            packet::encode(&Packet::Publish(p), V5, &mut b);
        }
        w.shards[0].on_bytes(100, &mut b, 0);
        w.settle();
        assert_eq!(w.shards.iter().map(|s| s.retained.len()).sum::<usize>(), n);
        w
    }

    fn feed_backlog(w: &World, shard: ShardId, id: &str) -> usize {
        w.shards[shard].retained_feeds.get(id).map_or(0, |f| f.backlog.len())
    }

    /// The most a subscriber's retained backlog may hold: the low-water mark and a slice per owner.
    const BACKLOG_MAX: usize = crate::retained_feed::BACKLOG_LOW + 2 * crate::retained_feed::SLICE_NODES;

    #[test]
    fn every_retained_message_reaches_a_qos0_subscriber_in_bounded_slices() {
        const N: usize = 100_000;
        let limits = Limits { max_outbound_buffer_bytes: 64 << 10, ..Limits::default() };
        let mut w = world_with_retained(N, limits);
        w.connect(1, 1, V5, "all", true);
        w.send(1, 1, V5, subscribe("ret/#", 0));
        let (mut got, mut max_backlog, mut rounds) = (std::collections::HashSet::new(), 0, 0);
        while got.len() < N && rounds < 100_000 {
            rounds += 1;
            max_backlog = max_backlog.max(feed_backlog(&w, 1, "all"));
            for p in w.recv(1, 1, V5) {
                if let Packet::Publish(p) = p {
                    assert!(p.retain);
                    assert!(got.insert(p.topic), "delivered twice");
                }
            }
        }
        assert_eq!(got.len(), N, "after {rounds} rounds");
        assert!(max_backlog <= BACKLOG_MAX, "backlog reached {max_backlog}");
        assert_eq!(w.shards[1].stats.dropped_slow_qos0, 0);
        assert!(w.shards[1].retained_feeds.is_empty(), "the feed ends with its request");
        assert_eq!(w.shards[0].retained_scans.open_count() + w.shards[1].retained_scans.open_count(), 0);
    }

    #[test]
    fn every_retained_message_reaches_an_acknowledging_qos1_subscriber_without_overflowing_its_queue() {
        const N: usize = 100_000;
        let mut w = world_with_retained(N, Limits::default());
        // Stored at QoS 0 above; published again at QoS 1 (replacing them) for this test.
        let mut b = BytesMut::new();
        for i in 0..N {
            let p = Publish {
                dup: false,
                qos: 1,
                retain: true,
                topic: format!("ret/{i}"),
                packet_id: (i % 60_000 + 1) as u16,
                properties: Properties::default(),
                payload: Bytes::from_static(b"r1"),
            };
            packet::encode(&Packet::Publish(p), V5, &mut b);
        }
        w.shards[0].on_bytes(100, &mut b, 0);
        w.settle();
        w.recv(0, 100, V5);
        w.connect(1, 1, V5, "all1", true);
        w.send(1, 1, V5, subscribe("ret/#", 1));
        let (mut got, mut max_backlog, mut rounds) = (std::collections::HashSet::new(), 0, 0);
        while got.len() < N && rounds < 1_000_000 {
            rounds += 1;
            max_backlog = max_backlog.max(feed_backlog(&w, 1, "all1"));
            for p in w.recv(1, 1, V5) {
                if let Packet::Publish(p) = p {
                    assert_eq!((p.qos, p.retain, &p.payload[..]), (1, true, &b"r1"[..]));
                    assert!(got.insert(p.topic), "delivered twice");
                    w.send(1, 1, V5, Packet::PubAck(resp(p.packet_id)));
                }
            }
        }
        assert_eq!(got.len(), N, "after {rounds} rounds");
        assert!(max_backlog <= BACKLOG_MAX, "backlog reached {max_backlog}");
        let s = &w.shards[1];
        assert_eq!(s.stats.dropped_queue_full, 0);
        assert!(s.sessions["all1"].queue.is_empty());
        assert!(s.drain_waiters.is_empty(), "the feed holds no publisher back");
    }

    #[test]
    fn a_subscribe_with_many_filters_matching_nothing_is_cheap_and_answered() {
        let mut w = world_with_retained(100_000, Limits::default());
        w.connect(1, 1, V5, "many", true);
        let filters = (0..1000).map(|i| (format!("none/{i}/#"), SubOptions::default())).collect();
        let sub = Subscribe { packet_id: 9, filters, properties: Properties::default() };
        let mut b = BytesMut::new();
        packet::encode(&Packet::Subscribe(sub), V5, &mut b);
        let before = w.retained_turns;
        w.shards[1].on_bytes(1, &mut b, 0);
        w.settle();
        // One turn on each owner answers the whole SUBSCRIBE: its 1000 filters cost a node or two
        // each, not a pass over 100,000 messages.
        assert_eq!(w.retained_turns - before, 2);
        match w.recv(1, 1, V5).as_slice() {
            [Packet::SubAck(a)] => assert_eq!(a.codes.len(), 1000),
            o => panic!("{o:?}"),
        }
        assert!(w.shards[1].retained_feeds.is_empty());
    }

    #[test]
    fn a_feed_blocked_on_its_output_buffer_asks_its_own_shard_for_more_once_it_drained() {
        // One shard: owner and subscriber are the same, so the credit is a local message.
        let limits = Limits { max_outbound_buffer_bytes: 4096, ..Limits::default() };
        let mut w = world_of_with_retained(1, 20_000, limits);
        w.connect(0, 1, V5, "self", true);
        w.send(0, 1, V5, subscribe("ret/#", 0));
        let mut got = 0;
        for _ in 0..100_000 {
            let n = w.recv(0, 1, V5).into_iter().filter(|p| matches!(p, Packet::Publish(_))).count();
            if n == 0 {
                break;
            }
            got += n;
        }
        assert_eq!(got, 20_000);
    }

    #[test]
    fn subscribes_during_a_retained_feed_are_served_after_it_one_request_at_a_time() {
        let mut w = world_with_retained(20_000, Limits { max_outbound_buffer_bytes: 4096, ..Limits::default() });
        w.connect(1, 1, V5, "twice", true);
        w.send(1, 1, V5, subscribe("ret/#", 0));
        w.send(1, 1, V5, subscribe("ret/7", 0));
        w.send(1, 1, V5, subscribe("ret/8", 0));
        let open = |w: &World| w.shards.iter().map(|s| s.retained_scans.open_count()).sum::<usize>();
        assert_eq!(open(&w), 2, "one request per session runs; the others wait at the subscriber");
        let mut got = Vec::new();
        for _ in 0..100_000 {
            let out = w.recv(1, 1, V5);
            if out.is_empty() && w.shards[1].retained_feeds.is_empty() {
                break;
            }
            got.extend(out.into_iter().filter_map(|p| if let Packet::Publish(p) = p { Some(p.topic) } else { None }));
        }
        assert_eq!(got.len(), 20_002);
        assert_eq!(
            got[20_000..].iter().filter(|t| *t == "ret/7" || *t == "ret/8").count(),
            2,
            "the merged request last"
        );
    }

    /// A subscriber to 20,000 retained messages that reads nothing (the owners hold their scans
    /// open, waiting for credit) and then leaves: by `leave`.
    fn retained_feed_cancelled_when(persistent: bool, leave: impl FnOnce(&mut World)) {
        let mut w = world_with_retained(20_000, Limits { max_outbound_buffer_bytes: 4096, ..Limits::default() });
        w.connect(1, 1, V5, "leaver", !persistent);
        w.send(1, 1, V5, subscribe("ret/#", 1));
        let open = |w: &World| w.shards.iter().map(|s| s.retained_scans.open_count()).sum::<usize>();
        assert_eq!(open(&w), 2);
        assert!(feed_backlog(&w, 1, "leaver") <= BACKLOG_MAX);
        leave(&mut w);
        w.settle();
        assert_eq!(open(&w), 0, "scans of a session that went away are dropped");
        assert!(w.shards.iter().all(|s| s.retained_feeds.is_empty()));
    }

    #[test]
    fn a_retained_feed_is_cancelled_when_its_session_ends() {
        retained_feed_cancelled_when(false, |w| w.shards[1].on_lost(1, 0));
    }

    #[test]
    fn a_retained_feed_is_cancelled_when_its_session_moves_to_another_shard() {
        retained_feed_cancelled_when(true, |w| {
            w.connect(0, 7, V5, "leaver", false);
        });
    }

    #[test]
    fn kafka_ack_spills_what_times_out_and_keeps_order_across_the_switch() {
        use crate::bridge::MappingConfig;
        let m: MappingConfig =
            toml::from_str("name = \"k\"\nfilters = [\"k/#\"]\ndestinations = [{ cluster = \"c\", topic = \"t\" }]")
                .unwrap();
        let router = Router::new(&[m], &["c".to_string()]).unwrap();
        let mut shard = Shard::new(0, 1, Limits::default(), 0)
            .with_bridge(router, DeliveryMode::KafkaAck, 100, 0)
            .with_outage_spill();
        shard.on_open(1, 0);
        let feed = |shard: &mut Shard, p: Packet| {
            let mut b = BytesMut::new();
            packet::encode(&p, V5, &mut b);
            shard.on_bytes(1, &mut b, 0);
            shard.drain_effects().produce.into_iter().map(|r| (r.id, r.durable)).collect::<Vec<_>>()
        };
        let connect = Connect {
            version: V5,
            clean_start: true,
            keep_alive: 0,
            client_id: "dev".into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        };
        feed(&mut shard, Packet::Connect(Box::new(connect)));
        let acks = |shard: &mut Shard| -> Vec<u16> {
            let mut out = shard.take_output(1).unwrap_or_default();
            let mut pids = Vec::new();
            while let Some(p) = packet::decode(&mut out, Some(V5), usize::MAX).unwrap() {
                if let Packet::PubAck(r) = p {
                    assert_eq!(r.code, 0);
                    pids.push(r.packet_id);
                }
            }
            pids
        };
        acks(&mut shard);
        let a = feed(&mut shard, publish("k/1", 1, 1, b"a"));
        let b = feed(&mut shard, publish("k/1", 1, 2, b"b"));
        assert!(matches!((a.as_slice(), b.as_slice()), ([(_, false)], [(_, false)])), "straight to Kafka");
        let (a, b) = (a[0].0, b[0].0);
        // Kafka timed out on the first: it goes to the spill log; the shard is spilling now.
        shard.on_produce_results([ProduceResult::failed(a, ProduceError::TimedOut)], 0);
        assert_eq!(shard.drain_effects().produce.iter().map(|r| (r.id, r.durable)).collect::<Vec<_>>(), [(a, true)]);
        assert!(shard.kafka_spilling());
        // A new record waits behind the one still in flight (it may time out and spill too).
        assert!(feed(&mut shard, publish("k/1", 1, 3, b"c")).is_empty());
        shard.on_durable(&[a], Ok(()), 0);
        assert_eq!(acks(&mut shard), [1]);
        shard.on_produce_results([ProduceResult::failed(b, ProduceError::TimedOut)], 0);
        let spilled: Vec<(u64, bool)> = shard.drain_effects().produce.iter().map(|r| (r.id, r.durable)).collect();
        assert_eq!(spilled.len(), 2);
        assert_eq!(spilled[0], (b, true), "the timed-out record before the held one");
        assert!(spilled[1].1);
        shard.on_durable(&[b, spilled[1].0], Ok(()), 0);
        assert_eq!(acks(&mut shard), [2, 3]);
        // The log drained: acknowledgements wait for Kafka again.
        shard.end_spilling();
        assert!(!shard.kafka_spilling());
        assert!(matches!(feed(&mut shard, publish("k/1", 1, 4, b"d")).as_slice(), [(_, false)]));
        assert!(acks(&mut shard).is_empty());
    }

    /// A subscriber with a window of one on `sub_shard` and a publisher on shard 0, sessions
    /// stored as in the broker (so every QoS 1 publish asks the other shard for a receipt).
    fn slow_subscriber_holds_back_the_publisher(sub_shard: ShardId) {
        let limits = Limits { max_queued_messages: 8, max_inflight: 1, ..Limits::default() };
        let mut w = World::new(2, limits.clone());
        w.shards = (0..2).map(|i| Shard::new(i, 2, limits.clone(), 0).with_session_store()).collect();
        w.connect(sub_shard, 1, V5, "slow", true);
        w.send(sub_shard, 1, V5, subscribe("bp", 1));
        w.recv(sub_shard, 1, V5);
        w.connect(0, 2, V5, "fast", true);
        // One message in flight (window 1), then the queue: past half full (4) acks are held.
        for pid in 1..=8u16 {
            w.send(0, 2, V5, publish("bp", 1, pid, b"m"));
        }
        let acks = |w: &mut World| -> Vec<u16> {
            w.recv(0, 2, V5)
                .into_iter()
                .filter_map(|p| if let Packet::PubAck(r) = p { Some(r.packet_id) } else { None })
                .collect()
        };
        assert_eq!(acks(&mut w), vec![1, 2, 3, 4], "acks after the queue passed half full must wait");
        assert_eq!(w.shards[sub_shard].stats.dropped_queue_full, 0);
        // The subscriber catches up: once its queue is a quarter full, the held acks go out, in order.
        let mut released = Vec::new();
        for _ in 0..8 {
            let pid = match w.recv(sub_shard, 1, V5).as_slice() {
                [Packet::Publish(p)] => p.packet_id,
                o => panic!("{o:?}"),
            };
            w.send(sub_shard, 1, V5, Packet::PubAck(resp(pid)));
            released.extend(acks(&mut w));
        }
        assert_eq!(released, vec![5, 6, 7, 8]);
    }

    /// A subscriber that never acknowledges holds publishers back for `max_backpressure_ms`
    /// once; then they stop waiting for it (its queue drops instead), until it has drained.
    fn a_silent_subscriber_holds_back_publishers_for_the_bound_only(sub_shard: ShardId) {
        let limits = Limits { max_queued_messages: 8, max_inflight: 1, max_backpressure_ms: 1000, ..Limits::default() };
        let mut w = World::new(2, limits.clone());
        w.shards = (0..2).map(|i| Shard::new(i, 2, limits.clone(), 0).with_session_store()).collect();
        w.connect(sub_shard, 1, V5, "silent", true);
        w.send(sub_shard, 1, V5, subscribe("bp", 1));
        w.recv(sub_shard, 1, V5);
        w.connect(0, 2, V5, "publisher", true);
        let acks = |w: &mut World| -> Vec<u16> {
            w.recv(0, 2, V5)
                .into_iter()
                .filter_map(|p| if let Packet::PubAck(r) = p { Some(r.packet_id) } else { None })
                .collect()
        };
        let tick = |w: &mut World, now: u64| {
            w.now = now;
            for i in 0..2 {
                w.shards[i].tick(now, 0);
            }
            w.settle();
        };
        for pid in 1..=8u16 {
            w.send(0, 2, V5, publish("bp", 1, pid, b"m"));
        }
        assert_eq!(acks(&mut w), vec![1, 2, 3, 4]);
        tick(&mut w, 100);
        tick(&mut w, 900);
        assert_eq!(acks(&mut w), Vec::<u16>::new(), "held within the bound");
        tick(&mut w, 1100);
        assert_eq!(acks(&mut w), vec![5, 6, 7, 8], "released once the bound passed");
        // From now on nobody waits for it: its queue drops by its policy instead.
        for pid in 9..=30u16 {
            w.send(0, 2, V5, publish("bp", 1, pid, b"m"));
        }
        assert_eq!(acks(&mut w), (9..=30).collect::<Vec<u16>>());
        assert!(w.shards[sub_shard].stats.dropped_queue_full > 0);
        assert_eq!(w.shards[sub_shard].stats.slow_subscribers, 1);
        // It catches up and drains: publishers wait for it again.
        loop {
            let got = w.recv(sub_shard, 1, V5);
            let Some(Packet::Publish(p)) = got.first() else { break };
            let pid = p.packet_id;
            w.send(sub_shard, 1, V5, Packet::PubAck(resp(pid)));
        }
        for pid in 31..=38u16 {
            w.send(0, 2, V5, publish("bp", 1, pid, b"m"));
        }
        assert_eq!(acks(&mut w), vec![31, 32, 33, 34], "held again after it drained");
    }

    #[test]
    fn a_silent_subscriber_holds_back_publishers_on_its_shard_for_the_bound_only() {
        a_silent_subscriber_holds_back_publishers_for_the_bound_only(0);
    }

    #[test]
    fn a_silent_subscriber_holds_back_publishers_on_another_shard_for_the_bound_only() {
        a_silent_subscriber_holds_back_publishers_for_the_bound_only(1);
    }

    #[test]
    fn a_filling_subscriber_queue_holds_back_the_publishers_acknowledgements() {
        slow_subscriber_holds_back_the_publisher(0);
    }

    #[test]
    fn a_filling_subscriber_queue_on_another_shard_holds_back_the_publishers_acknowledgements() {
        slow_subscriber_holds_back_the_publisher(1);
    }

    #[test]
    fn a_full_output_buffer_holds_qos1_messages_in_the_queue_until_it_drains() {
        let limits = Limits { max_outbound_buffer_bytes: 1000, max_inflight: 100, ..Limits::default() };
        let mut w = World::new(1, limits);
        w.connect(0, 1, V5, "reader", true);
        w.send(0, 1, V5, subscribe("ob", 1));
        w.recv(0, 1, V5);
        w.connect(0, 2, V5, "writer", true);
        for pid in 1..=20u16 {
            let body: &'static [u8] = Box::leak(vec![pid as u8; 300].into_boxed_slice());
            w.send(0, 2, V5, publish("ob", 1, pid, body));
        }
        // The window (100) has room, but the buffer stops taking messages past 1000 bytes: four
        // ~310-byte PUBLISHes, the rest queued. Each time the output goes out, four more follow.
        let mut got = Vec::new();
        for round in 0..5 {
            let batch: Vec<u8> = w
                .recv(0, 1, V5)
                .into_iter()
                .filter_map(|p| if let Packet::Publish(p) = p { Some(p.payload[0]) } else { None })
                .collect();
            assert_eq!(batch.len(), 4, "round {round}: {batch:?}");
            got.extend(batch);
        }
        assert_eq!(got, (1..=20).collect::<Vec<u8>>(), "every message, in order");
        assert!(w.recv(0, 1, V5).is_empty());
        assert_eq!(w.shards[0].stats.dropped_queue_full, 0);
    }

    #[test]
    fn will_survives_a_connection_lost_before_its_connack() {
        let mut w = World::new(2, Limits::default());
        w.connect(0, 1, V5, "watcher", true);
        w.send(0, 1, V5, subscribe("will/#", 0));
        w.recv(0, 1, V5);
        // Find a client id whose directory shard is the other one, so the CONNECT stays pending.
        let id = (0..).map(|i| format!("c{i}")).find(|id| directory_shard(id, 2) == 0).unwrap();
        w.shards[1].on_open(5, 0);
        let c = Connect {
            version: V5,
            clean_start: true,
            keep_alive: 0,
            client_id: id,
            will: Some(Will {
                topic: "will/x".into(),
                payload: Bytes::from_static(b"w"),
                qos: 0,
                retain: false,
                properties: Properties::default(),
            }),
            username: None,
            password: None,
            properties: Properties::default(),
        };
        let mut b = BytesMut::new();
        packet::encode(&Packet::Connect(Box::new(c)), V5, &mut b);
        w.shards[1].on_bytes(5, &mut b, 0);
        assert!(w.shards[1].is_pending(5));
        w.shards[1].on_lost(5, 0);
        w.settle();
        assert!(matches!(w.recv(0, 1, V5).as_slice(), [Packet::Publish(p)] if p.topic == "will/x"));
        assert!(!w.shards[1].conns.contains_key(&5));
    }

    #[test]
    fn packets_pipelined_behind_connect_are_handled_in_order() {
        let mut w = World::new(2, Limits::default());
        w.shards[1].on_open(1, 0);
        let mut b = BytesMut::new();
        let c = Connect {
            version: V5,
            clean_start: true,
            keep_alive: 0,
            client_id: "pipelined".into(), // its directory shard may be the other one
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        };
        packet::encode(&Packet::Connect(Box::new(c)), V5, &mut b);
        packet::encode(&subscribe("p", 0), V5, &mut b);
        packet::encode(&Packet::PingReq, V5, &mut b);
        w.shards[1].on_bytes(1, &mut b, 0);
        w.settle();
        let got = w.recv(1, 1, V5);
        let names: Vec<&str> = got.iter().map(Packet::name).collect();
        assert_eq!(names, ["CONNACK", "SUBACK", "PINGRESP"]);
    }

    /// A tiny deterministic generator for interleavings (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
        }
    }

    /// Shard messages in flight, one FIFO per ordered pair of shards (as the mesh keeps them),
    /// delivered one at a time from a pair the generator picks: every interleaving the real
    /// mesh allows can happen here.
    struct Mesh {
        queues: HashMap<(ShardId, ShardId), VecDeque<ShardMsg>>,
    }

    impl Mesh {
        fn collect(&mut self, w: &mut World) {
            for i in 0..w.shards.len() {
                let fx = w.shards[i].drain_effects();
                for c in fx.close {
                    w.closed.insert((i, c));
                }
                for (to, m) in fx.to_shards {
                    self.queues.entry((i, to)).or_default().push_back(m);
                }
            }
        }

        /// Delivers one message, if any is in flight.
        fn step(&mut self, w: &mut World, rng: &mut Rng) -> bool {
            let busy: Vec<(ShardId, ShardId)> =
                self.queues.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
            if busy.is_empty() {
                return false;
            }
            let mut keys = busy;
            keys.sort_unstable();
            let (from, to) = keys[rng.below(keys.len())];
            let m = self.queues.get_mut(&(from, to)).and_then(VecDeque::pop_front);
            if let Some(m) = m {
                w.shards[to].on_shard_msgs([m], w.now);
            }
            self.collect(w);
            true
        }
    }

    fn bytes_of(p: Packet, v: Version) -> BytesMut {
        let mut b = BytesMut::new();
        packet::encode(&p, v, &mut b);
        b
    }

    /// Two devices share one client id, each looping CONNECT → SUBSCRIBE → PUBLISH → close on its
    /// own shard while shard messages interleave in every order the mesh allows. No shard may
    /// panic, and once all is quiet at most one shard hosts the session, which the directory
    /// names, with at most one connection.
    #[test]
    fn clients_sharing_an_id_race_across_shards_without_breaking_the_session_rule() {
        for seed in 1..400u64 {
            for v in [Version::V311, V5] {
                let n = 3;
                let mut w = World::new(n, Limits::default());
                w.shards = (0..n).map(|i| Shard::new(i, n, Limits::default(), 0).with_session_store()).collect();
                let mut mesh = Mesh { queues: HashMap::default() };
                let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let mut next_conn: ConnId = 1;
                // Per device: (shard, open connection, packets sent on it).
                let mut devices: Vec<(ShardId, Option<ConnId>, u32)> = vec![(0, None, 0), (1, None, 0), (2, None, 0)];
                for _ in 0..60 {
                    let d = rng.below(devices.len() + 2);
                    if d >= devices.len() {
                        for _ in 0..rng.below(4) + 1 {
                            mesh.step(&mut w, &mut rng);
                        }
                        continue;
                    }
                    let (shard, conn, sent) = devices[d];
                    match conn {
                        None => {
                            let c = next_conn;
                            next_conn += 1;
                            w.shards[shard].on_open(c, w.now);
                            let clean = rng.below(2) == 0;
                            let connect = Connect {
                                version: v,
                                clean_start: clean,
                                keep_alive: 0,
                                client_id: "twin".into(),
                                will: None,
                                username: None,
                                password: None,
                                properties: Properties {
                                    session_expiry_interval: (!clean && v == V5).then_some(60),
                                    ..Default::default()
                                },
                            };
                            w.shards[shard].on_bytes(c, &mut bytes_of(Packet::Connect(Box::new(connect)), v), w.now);
                            devices[d] = (shard, Some(c), 0);
                        }
                        Some(c) if sent >= 3 || rng.below(4) == 0 => {
                            w.shards[shard].on_lost(c, w.now);
                            devices[d] = (shard, None, 0);
                        }
                        Some(c) => {
                            let p = match rng.below(3) {
                                0 => subscribe("twin/#", 1),
                                1 => publish("twin/x", 1, 7, b"x"),
                                _ => Packet::Unsubscribe(Unsubscribe {
                                    packet_id: 2,
                                    filters: vec!["twin/#".into()],
                                    properties: Properties::default(),
                                }),
                            };
                            w.shards[shard].on_bytes(c, &mut bytes_of(p, v), w.now);
                            devices[d] = (shard, Some(c), sent + 1);
                        }
                    }
                    mesh.collect(&mut w);
                }
                while mesh.step(&mut w, &mut rng) {}
                for i in 0..n {
                    let _ = w.shards[i].take_session_changes();
                    w.shards[i].on_sessions_synced(u64::MAX, true, w.now);
                    mesh.collect(&mut w);
                }
                while mesh.step(&mut w, &mut rng) {}
                let hosts: Vec<ShardId> = (0..n).filter(|i| w.shards[*i].sessions.contains_key("twin")).collect();
                assert!(hosts.len() <= 1, "seed {seed} {v:?}: session hosted on {hosts:?}");
                let dir = &w.shards[directory_shard("twin", n)].directory;
                if let Some(h) = hosts.first() {
                    assert_eq!(dir.get("twin").and_then(|e| e.host), Some(*h), "seed {seed} {v:?}: directory");
                }
                for s in &w.shards {
                    for c in s.conns.values() {
                        if let (ConnState::Active, Some(id)) = (&c.state, &c.client_id) {
                            assert!(
                                s.sessions.contains_key(id),
                                "seed {seed} {v:?}: active connection without session"
                            );
                        }
                    }
                }
            }
        }
    }

    /// An encoded 3.1.1 CONNECT whose client id is `id_len` bytes long.
    fn connect_bytes(id_len: usize) -> BytesMut {
        let c = Connect {
            version: Version::V311,
            clean_start: true,
            keep_alive: 60,
            client_id: "c".repeat(id_len),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        };
        let mut b = BytesMut::new();
        packet::encode(&Packet::Connect(Box::new(c)), Version::V311, &mut b);
        b
    }

    #[test]
    fn the_connect_deadline_counts_from_accept_not_from_the_last_byte() {
        let mut w = World::new(1, Limits { connect_timeout_ms: 1000, ..Limits::default() });
        let connect = connect_bytes(100);
        // Conn 1 drips its CONNECT a byte every 100 ms; conn 2 sends all of its at 900 ms.
        w.shards[0].on_open(1, 0);
        w.shards[0].on_open(2, 0);
        let mut dripped = BytesMut::new();
        let mut closed_at = None;
        for (i, t) in (0..=2000).step_by(100).enumerate() {
            w.now = t;
            if closed_at.is_none() {
                dripped.extend_from_slice(&connect[i..i + 1]);
                w.shards[0].on_bytes(1, &mut dripped, t);
            }
            if t == 900 {
                w.shards[0].on_bytes(2, &mut connect.clone(), t);
            }
            w.shards[0].tick(t, 0);
            w.settle();
            if closed_at.is_none() && w.closed.contains(&(0, 1)) {
                closed_at = Some(t);
            }
        }
        // Scanned every 500 ms: closed at the first scan at or after the deadline.
        assert_eq!(closed_at, Some(1000));
        assert!(!w.closed.contains(&(0, 2)), "a connection that completed CONNECT in time stays");
        assert!(matches!(w.recv(0, 2, Version::V311).first(), Some(Packet::ConnAck(a)) if a.code == 0));
        let st = w.shards[0].stats();
        assert_eq!((st.connect_timeouts, st.preconnect_connections, st.preconnect_bytes), (1, 0, 0));
    }

    #[test]
    fn partial_connects_share_the_shard_budget_and_a_large_connect_is_refused_from_its_header() {
        let limits =
            Limits { max_connect_packet_bytes: 4096, max_preconnect_buffer_bytes_per_shard: 8192, ..Limits::default() };
        let mut w = World::new(1, limits);
        let connect = connect_bytes(3500);
        let mut bufs: Vec<BytesMut> = (0..4).map(|_| BytesMut::from(&connect[..3000])).collect();
        for (conn, b) in bufs.iter_mut().enumerate().take(3) {
            w.shards[0].on_open(conn as u64, 0);
            w.shards[0].on_bytes(conn as u64, b, 0);
        }
        w.settle();
        // Two fit (6000 bytes); the third would take the shard past 8192: closed, its buffer dropped.
        assert_eq!(w.closed, [(0, 2)].into_iter().collect());
        assert!(bufs[2].is_empty());
        let st = w.shards[0].stats();
        assert_eq!(st.refused_preconnect, 1);
        assert_eq!(st.preconnect_bytes as usize, bufs[0].capacity() + bufs[1].capacity());
        assert_eq!(st.preconnect_connections, 2);
        // Conn 0 completes its CONNECT: it no longer counts, and a new one fits.
        bufs[0].extend_from_slice(&connect[3000..]);
        w.shards[0].on_bytes(0, &mut bufs[0], 0);
        w.shards[0].on_open(3, 0);
        w.shards[0].on_bytes(3, &mut bufs[3], 0);
        w.settle();
        assert!(!w.closed.contains(&(0, 3)));
        assert!(matches!(w.recv(0, 0, Version::V311).first(), Some(Packet::ConnAck(_))));
        assert_eq!(w.shards[0].stats().preconnect_connections, 2);
        // A CONNECT announcing more than max_connect_packet_bytes: refused from its 4-byte fixed
        // header, nothing buffered.
        let mut big = BytesMut::from(&connect_bytes(5000)[..4]);
        w.shards[0].on_open(4, 0);
        w.shards[0].on_bytes(4, &mut big, 0);
        w.settle();
        assert!(w.closed.contains(&(0, 4)) && big.is_empty());
        // Closing and losing connections gives their bytes back.
        w.shards[0].on_lost(1, 0);
        w.shards[0].on_lost(3, 0);
        w.shards[0].on_lost(2, 0);
        w.shards[0].on_lost(4, 0);
        let st = w.shards[0].stats();
        assert_eq!((st.preconnect_connections, st.preconnect_bytes), (0, 0));
    }

    #[test]
    fn unauthenticated_connections_per_address_are_capped() {
        let mut w = World::new(1, Limits { max_preconnect_per_address: 2, ..Limits::default() });
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let sh = &mut w.shards[0];
        for conn in [1, 2] {
            assert!(sh.admit_from(a));
            sh.on_open_from(conn, a, 0);
        }
        assert!(!sh.admit_from(a));
        assert!(!sh.admit_from(a));
        assert!(sh.admit_from(b));
        let fx = sh.drain_effects();
        assert_eq!(fx.warnings.len(), 1, "logged once per episode: {:?}", fx.warnings);
        assert_eq!(sh.stats().refused_preconnect, 2);
        // Completing CONNECT frees the place.
        sh.on_bytes(1, &mut connect_bytes(5), 0);
        assert!(sh.admit_from(a));
    }

    /// 3.1.1 has no Receive Maximum: QoS 2 publishes beyond `max_inflight` unreleased ones wait
    /// (flow control) instead of closing the connection; what was accepted is acknowledged, and
    /// everything is delivered once, in order.
    #[test]
    fn a_311_client_past_the_qos2_window_is_flow_controlled_not_disconnected() {
        let v = Version::V311;
        let limits = Limits { max_inflight: 2, ..Limits::default() };
        let mut w = World::new(2, limits);
        w.connect(1, 9, v, "reader", true);
        w.send(1, 9, v, subscribe("q2", 2));
        w.recv(1, 9, v);
        w.connect(0, 1, v, "writer", true);
        let mut b = BytesMut::new();
        for pid in 1..=4u16 {
            packet::encode(&publish("q2", 2, pid, b"m"), v, &mut b);
        }
        packet::encode(&Packet::PingReq, v, &mut b);
        packet::encode(&publish("q2", 2, 5, b"m"), v, &mut b);
        w.shards[0].on_bytes(1, &mut b, 0);
        w.settle();
        let names = |ps: Vec<Packet>| -> Vec<String> {
            ps.iter()
                .map(|p| match p {
                    Packet::PubRec(r) => format!("PUBREC {}", r.packet_id),
                    Packet::PubComp(r) => format!("PUBCOMP {}", r.packet_id),
                    o => o.name().to_string(),
                })
                .collect()
        };
        // 3 and 4 fill the (tiny) deferral queue; the ping passes them, 5 waits in the input.
        assert_eq!(names(w.recv(0, 1, v)), ["PUBREC 1", "PUBREC 2", "PINGRESP"]);
        assert!(!w.closed.contains(&(0, 1)));
        w.send(0, 1, v, Packet::PubRel(resp(1)));
        assert_eq!(names(w.recv(0, 1, v)), ["PUBCOMP 1", "PUBREC 3"]);
        w.send(0, 1, v, Packet::PubRel(resp(2)));
        assert_eq!(names(w.recv(0, 1, v)), ["PUBCOMP 2", "PUBREC 4"]);
        w.send(0, 1, v, Packet::PubRel(resp(3)));
        assert_eq!(names(w.recv(0, 1, v)), ["PUBCOMP 3", "PUBREC 5"]);
        // The reader gets all five, once each (acknowledging as it goes).
        let mut got = Vec::new();
        for _ in 0..12 {
            for p in w.recv(1, 9, v) {
                match p {
                    Packet::Publish(m) => {
                        got.push(m.payload.clone());
                        w.send(1, 9, v, Packet::PubRec(resp(m.packet_id)));
                    }
                    Packet::PubRel(r) => w.send(1, 9, v, Packet::PubComp(resp(r.packet_id))),
                    _ => {}
                }
            }
        }
        assert_eq!(got.len(), 5);
    }

    /// Two shards with Kafka → MQTT on (sessions stored as in the broker), queues of 8 and a
    /// window of 1: a burst from Kafka is many times what a queue holds.
    fn kafka_world(max_wait_ms: u64) -> World {
        use crate::inbound::{InboundMappingConfig, PayloadSource, StartAt};
        let limits = Limits { max_queued_messages: 8, max_inflight: 1, ..Limits::default() };
        let cfg = InboundMappingConfig {
            name: "cmd".into(),
            cluster: "c".into(),
            kafka_topics: vec!["t".into()],
            kafka_topic_pattern: None,
            mqtt_topics: vec!["d/${key}".into()],
            payload: PayloadSource::Value,
            qos: 1,
            retain: false,
            start: StartAt::Earliest,
        };
        let mut w = World::new(2, limits.clone());
        w.shards = (0..2)
            .map(|i| {
                let inbound = Inbound::new(std::slice::from_ref(&cfg), &["c".to_string()]).unwrap();
                Shard::new(i, 2, limits.clone(), 0).with_session_store().with_inbound(inbound, 1, max_wait_ms)
            })
            .collect();
        w
    }

    /// `n` records of partition 0, keys k0 and k1 in turn, values their offsets.
    fn kafka_burst(n: i64) -> Vec<InboundRecord> {
        (0..n)
            .map(|o| InboundRecord {
                mapping: 0,
                topic: "t".into(),
                partition: 0,
                offset: o,
                key: Some(Bytes::from(format!("k{}", o % 2))),
                value: Some(Bytes::from(o.to_string())),
                headers: Vec::new(),
            })
            .collect()
    }

    /// What a subscriber got (payloads), each acknowledged when `ack`.
    fn take_kafka_messages(w: &mut World, shard: ShardId, conn: ConnId, ack: bool) -> Vec<i64> {
        let mut got = Vec::new();
        for p in w.recv(shard, conn, V5) {
            if let Packet::Publish(p) = p {
                got.push(std::str::from_utf8(&p.payload).unwrap().parse().unwrap());
                if ack {
                    w.send(shard, conn, V5, Packet::PubAck(resp(p.packet_id)));
                }
            }
        }
        got
    }

    fn stored_position(w: &mut World) -> Option<i64> {
        w.shards[0].take_positions().and_then(|p| p.get(&("cmd".to_string(), "t".to_string(), 0)).copied())
    }

    #[test]
    fn a_kafka_burst_is_routed_in_slices_that_fit_the_receivers_queues() {
        let mut w = kafka_world(60_000);
        // "all" on the consuming shard gets every key; "odd" on the other shard only k1.
        w.connect(0, 1, V5, "all", true);
        w.send(0, 1, V5, subscribe("d/+", 1));
        w.recv(0, 1, V5);
        w.connect(1, 2, V5, "odd", true);
        w.send(1, 2, V5, subscribe("d/k1", 1));
        w.recv(1, 2, V5);
        w.shards[0].on_kafka_records(kafka_burst(80), w.now);
        w.settle();
        assert!(w.shards[0].kafka_records_waiting(), "a burst of 10 queues' worth waits for room");
        let early = stored_position(&mut w).unwrap_or(0);
        assert!(early < 80, "the position waits for what is not delivered: {early}");
        let (mut all, mut odd) = (Vec::new(), Vec::new());
        for _ in 0..1000 {
            all.extend(take_kafka_messages(&mut w, 0, 1, true));
            odd.extend(take_kafka_messages(&mut w, 1, 2, true));
            w.shards[0].feed_kafka_records(w.now);
            w.settle();
            if all.len() == 80 && odd.len() == 40 {
                break;
            }
        }
        assert_eq!(all, (0..80).collect::<Vec<_>>(), "every record, in order");
        assert_eq!(odd, (0..80).filter(|o| o % 2 == 1).collect::<Vec<_>>());
        assert_eq!(w.shards[0].stats.dropped_queue_full + w.shards[1].stats.dropped_queue_full, 0);
        assert!(!w.shards[0].kafka_records_waiting());
        assert_eq!(stored_position(&mut w), Some(80), "the position moved past every record");
    }

    #[test]
    fn a_receiver_that_takes_nothing_holds_kafka_records_back_only_for_the_max_wait() {
        let mut w = kafka_world(1000);
        w.connect(0, 1, V5, "live", true);
        w.send(0, 1, V5, subscribe("d/+", 1));
        w.recv(0, 1, V5);
        // On the other shard, a subscriber that never acknowledges: its queue fills.
        w.connect(1, 2, V5, "stuck", true);
        w.send(1, 2, V5, subscribe("d/+", 1));
        w.recv(1, 2, V5);
        w.shards[0].on_kafka_records(kafka_burst(40), w.now);
        w.settle();
        let mut live = Vec::new();
        for _ in 0..100 {
            live.extend(take_kafka_messages(&mut w, 0, 1, true));
            take_kafka_messages(&mut w, 1, 2, false);
            if live.len() == 40 {
                break;
            }
            w.now += 100;
            for s in &mut w.shards {
                s.tick(w.now, 0);
            }
            w.shards[0].feed_kafka_records(w.now);
            w.settle();
        }
        assert!(w.now >= 1000, "the stuck receiver held the records back first ({} ms)", w.now);
        assert_eq!(live, (0..40).collect::<Vec<_>>(), "the other receiver gets every record, in order");
        assert_eq!(w.shards[1].feed.receivers_skipped, 1);
        assert!(w.shards[1].stats.dropped_queue_full > 0, "the stuck receiver's queue followed its policy");
        assert_eq!(w.shards[0].stats.dropped_queue_full, 0);
        assert_eq!(stored_position(&mut w), Some(40));
    }

    #[test]
    fn an_offline_receiver_that_moves_to_another_shard_lets_the_held_kafka_records_go() {
        let mut w = kafka_world(60_000);
        let mut store = HashMap::default();
        // A persistent session on shard 1, offline: its queue fills to half and holds the feed.
        w.connect(1, 2, V5, "dev", false);
        w.send(1, 2, V5, subscribe("d/+", 1));
        w.recv(1, 2, V5);
        w.shards[1].on_lost(2, w.now);
        w.settle();
        w.shards[0].on_kafka_records(kafka_burst(40), w.now);
        w.settle();
        for _ in 0..10 {
            commit_sessions(&mut w, &mut store);
            w.shards[0].feed_kafka_records(w.now);
            w.settle();
        }
        assert!(w.shards[0].kafka_records_waiting());
        assert!(!w.shards[1].feed.held.is_empty(), "shard 1 holds its answer for the offline session");
        // It comes back on shard 0: the session moves, and what shard 1 held for it must go.
        let mut got = Vec::new();
        for p in w.connect_all(0, 3, V5, "dev", false) {
            if let Packet::Publish(p) = p {
                got.push(std::str::from_utf8(&p.payload).unwrap().parse().unwrap());
                w.send(0, 3, V5, Packet::PubAck(resp(p.packet_id)));
            }
        }
        for _ in 0..100 {
            got.extend(take_kafka_messages(&mut w, 0, 3, true));
            if got.len() == 40 {
                break;
            }
            w.now += 100;
            for s in &mut w.shards {
                s.tick(w.now, 0);
            }
            w.shards[0].feed_kafka_records(w.now);
            w.settle();
            commit_sessions(&mut w, &mut store);
        }
        assert_eq!(got, (0..40).collect::<Vec<_>>(), "every record, in order");
        assert!(w.now < 60_000, "released when the session left, not by the time bound");
        assert_eq!(w.shards[0].stats.dropped_queue_full + w.shards[1].stats.dropped_queue_full, 0);
        assert_eq!(w.shards[0].feed.receivers_skipped + w.shards[1].feed.receivers_skipped, 0);
    }

    /// The fuzz target's world on pseudo-random inputs, so that stable CI runs it too (the
    /// coverage-guided run is `scripts/fuzz`).
    #[test]
    fn the_simulated_broker_keeps_its_invariants_on_random_action_streams() {
        let mut rng = Rng(0x5eed);
        for _ in 0..3000 {
            let len = rng.below(400);
            let data: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
            sim::Sim::run(&data);
        }
    }
}
