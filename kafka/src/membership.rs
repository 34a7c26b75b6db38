//! The cluster's Kafka side that is not a mapping: its internal topics and its membership.
//!
//! Runs on shard 0's Kafka thread, with a client of its own (a heartbeat waiting on a paused
//! broker never holds the producers' client):
//! 1. creates every internal topic that is missing, with its cleanup policy
//!    ([`ClusterConfig::internal_topics`]), retrying each second until Kafka answers;
//! 2. writes this node's [`Heartbeat`] to `<prefix>.nodes` every `heartbeat_ms`;
//! 3. reads `<prefix>.nodes` from its beginning (a compacted table: one record per node) into
//!    [`Members`], declares nodes dead when they fall silent, and logs every change once;
//! 4. at a clean stop ([`leave`]) writes a last heartbeat that says the node left;
//! 5. reads `<prefix>.sessions` from its beginning into the table of wills ([`Wills`]: the
//!    latest claim of each client id whose record carries a will). A will's connection is gone
//!    when its node is dead or alive as a later incarnation; then the alive node with the lowest
//!    id other than the owner waits out the will's delay (capped by the session expiry; a new
//!    claim of the client cancels it) and writes a release naming itself. The node whose
//!    release is read first publishes the will — into `<prefix>.messages` as the owner's record
//!    (every node, itself included, delivers it; a retained one into `.retained` too) — so a
//!    will goes out once even when survivors disagree on who is lowest. Then it writes that it
//!    did ([`ClaimKind::WillSent`]); until every node read that, the will stays released by it,
//!    and should it die, restart or leave first, the will is released and published again by
//!    another survivor: lost only with every node, sent twice only if its publisher dies
//!    between publishing and saying so. A node's releases name its incarnation (`by_inc`): after
//!    a restart it reads its old ones as another node's and does not publish those wills again.
//!
//! 6. keeps this node's *floor* and sends it with every heartbeat: each shard's lease says how
//!    old its oldest message still queued or in flight for a persistent session is, and where
//!    its `.messages` partitions are committed; the floor is, per partition, the position this
//!    node had committed before that oldest message was queued (a snapshot per heartbeat,
//!    taken back by a margin of `heartbeat_ms` + 1 s for the lease's trip): below it, nothing
//!    any of its persistent sessions still needs. It also keeps, from the [`ClaimKind::Session`]
//!    records, which node holds which persistent session with which subscriptions (of one
//!    run's records, the latest written, since its shards' producers can reorder them:
//!    `Wills::stale_session_record`);
//! 7. rebuilds a dead node's session for a client of this node: when one of its shards claims
//!    a client id naming a holder (`Claim::from`) that is dead, this thread replays
//!    `.messages` from the holder's last floor, queues what the session's subscriptions take
//!    ([`Adoption`]) and sends it to that shard as the handover the holder cannot send.
//!
//! What it sees is published in [`KafkaHealth`] for the HTTP endpoint (`/api/v1/cluster`,
//! `/metrics`). A Kafka that does not answer is logged at the first failure of each kind and
//! shown there; the node keeps serving its own devices meanwhile.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rskafka::chrono::{TimeZone, Utc};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient};
use rskafka::record::Record;
use sluice_core::adoption::Adoption;
use sluice_core::cluster::{
    Claim, ClaimKind, ClusterConfig, HandoverTo, Heartbeat, MemberChange, MemberState, Members, Offsets, CLAIM_HEADER,
    LOW_UNKNOWN, MEMBERS_MAX,
};
use sluice_core::inbound::InboundRecord;

use crate::cluster::Cluster;
use crate::health::{ClusterView, KafkaHealth};

/// How long a fetch of `.nodes` waits for new heartbeats.
const FETCH_WAIT_MS: i32 = 200;
/// Wills of other nodes' clients kept, at most; further ones are not kept (counted, logged once).
pub const WILLS_MAX: usize = 100_000;
/// Claims of this node's shards naming a holder that may be dead, kept at most (each for
/// `dead_after_ms` + 5 s, about 150 bytes): this node's reconnect storm after a node died.
/// Beyond it a claim is not kept (counted, logged once): its session is not rebuilt here, and
/// its CONNACK goes without it when the wait is over.
pub const ADOPT_MAX: usize = 100_000;

/// Persistent sessions of the cluster's nodes kept (their subscriptions, about 100–300 bytes
/// each), at most; further ones are not kept (counted, logged once): such a session is not
/// rebuilt when its node dies.
pub const REGISTRY_MAX: usize = 1_000_000;

/// Ends of persistent sessions remembered (see `Wills::note_ended`), and for how long at least.
const ENDED_MAX: usize = 100_000;
const ENDED_KEEP_MS: u64 = 300_000;
/// Position snapshots kept for this node's floor, at most (one per heartbeat while an old
/// message stays pending); beyond, the second oldest goes (the floor only gets older).
const SNAPSHOTS_MAX: usize = 4096;
/// How long rebuilding one session may read the log, at most.
const REPLAY_MAX: Duration = Duration::from_secs(3);

/// A persistent session as its latest [`ClaimKind::Session`] record says.
#[derive(Clone)]
struct SessionEntry {
    node: String,
    /// The run of `node` that wrote its record.
    inc: u64,
    /// When its record was written (Unix ms, the writer's clock; 0: not said — an older node).
    at_ms: u64,
    /// Its session expiry (seconds; `u32::MAX`: never).
    expiry: u32,
    /// Its stored form, subscriptions only.
    value: Vec<u8>,
}

/// A persistent session's end as the registry remembers it (see [`Wills::note_ended`]).
struct Ended {
    node: String,
    inc: u64,
    /// When the end was written (the writer's clock) and when it was read here.
    at_ms: u64,
    read_ms: u64,
}

/// A shard of this node claimed `client` naming `from` as its holder: if `from` is dead, this
/// node rebuilds the session (until `until_ms`; after that the shard no longer waits).
struct Adopt {
    client: String,
    to: HandoverTo,
    from: String,
    until_ms: u64,
}

/// An adoption to carry out: the claim, the holder's session (if it is known), floor and the
/// user mappings' topics that carried its messages.
type AdoptNow = (Adopt, Option<SessionEntry>, Option<Offsets>, Vec<String>);

/// What this node's own leases say, for its floor (see the module doc).
#[derive(Default)]
struct Floor {
    /// Per shard: when its latest lease was written (this thread's clock, from the record's
    /// timestamp: not when it was read, which may be late) and its `low`.
    leases: HashMap<usize, (u64, Option<u64>)>,
    shards: usize,
    /// Committed positions in the message topics: the latest any lease said, per (topic,
    /// partition).
    latest: Positions,
    /// (when, `latest` then), oldest first.
    snapshots: VecDeque<(u64, Positions)>,
}

/// Committed offsets per (topic, partition).
type Positions = BTreeMap<(String, i32), i64>;

impl Floor {
    fn on_lease(&mut self, claim: &Claim, now_ms: u64) {
        self.leases.insert(claim.shard, (now_ms, claim.low));
        self.shards = self.shards.max(claim.shards);
        for (t, p, off) in &claim.pos {
            let e = self.latest.entry((t.clone(), *p)).or_insert(*off);
            *e = (*e).max(*off);
        }
    }

    /// Takes a snapshot and says the floor: the snapshot taken before this node's oldest
    /// pending message was queued, less `margin_ms`. `None` (replay from the earliest record)
    /// until every shard's lease was read, while a message of unknown age is pending, or when
    /// no snapshot is that old.
    fn tick(&mut self, now_ms: u64, margin_ms: u64, starts: &[(String, i32, i64)]) -> Option<Offsets> {
        self.snapshots.push_back((now_ms, self.latest.clone()));
        while self.snapshots.len() > SNAPSHOTS_MAX {
            self.snapshots.remove(1);
        }
        if self.shards == 0 || self.leases.len() < self.shards {
            return None;
        }
        let mut low_at = u64::MAX;
        for &(read_ms, low) in self.leases.values() {
            let age = match low {
                None => 0,
                Some(LOW_UNKNOWN) => return None,
                Some(age) => age,
            };
            low_at = low_at.min(read_ms.saturating_sub(age));
        }
        // Where this run's readers started bounds everything routed in this run: the floor of a
        // partition no snapshot names, and of all when no snapshot is old enough (a young node).
        let from_start = || (!starts.is_empty()).then(|| starts.to_vec());
        let Some(low_at) = low_at.checked_sub(margin_ms) else { return from_start() };
        // Kept: a margin and two seconds more than needed now, for a message queued just after
        // a lease that said nothing was pending (its age is rounded up to the second, and its
        // lease is read later by the trip to Kafka).
        let keep_from = low_at.saturating_sub(margin_ms + 2_000);
        let keep = self.snapshots.iter().rposition(|(t, _)| *t <= keep_from).unwrap_or(0);
        self.snapshots.drain(..keep);
        let Some((_, at)) = self.snapshots.iter().rev().find(|(t, _)| *t <= low_at) else { return from_start() };
        let mut floor = at.clone();
        for (t, p, o) in starts {
            floor.entry((t.clone(), *p)).or_insert(*o);
        }
        Some(floor.into_iter().map(|((t, p), o)| (t, p, o)).collect())
    }
}

/// A will another node holds for a client of its, as its claim carried it.
struct WillEntry {
    node: String,
    /// The incarnation of `node` that holds it (0: not said).
    inc: u64,
    /// How long after the connection is lost it goes out (the will delay, at most the session's
    /// expiry).
    after_ms: u64,
    record: Record,
    /// When this node writes its release (and publishes the will if that release is read
    /// first); `None`: the connection is not known to be gone, or another node publishes.
    due_ms: Option<u64>,
    /// The survivor whose release was read first (it publishes the will), until its
    /// [`ClaimKind::WillSent`] is read; cleared when it is gone before that.
    released: Option<Releaser>,
}

/// A survivor that released a will: node, incarnation, and when its release was read here.
struct Releaser {
    node: String,
    inc: u64,
    read_ms: u64,
}

/// A will this node's release won: it publishes it, then says so ([`ClaimKind::WillSent`]).
struct Won {
    client: String,
    /// The node and incarnation that held the will.
    owner: String,
    inc: u64,
    record: Record,
}

/// The latest will of each client id, by the node that holds it (see the module doc).
#[derive(Default)]
struct Wills {
    by_client: HashMap<String, WillEntry>,
    refused: u64,
    /// Per node, the shared-subscription groups it said it has members of (≤ [`WILLS_MAX`] per
    /// node; further ones not kept, counted): when it dies, the survivor says it has none any
    /// more.
    shares: HashMap<String, std::collections::HashSet<String>>,
    shares_refused: u64,
    /// Wills whose release by this node was read first: this node publishes them.
    won: Vec<Won>,
    /// Wills released again (their publisher went before its [`ClaimKind::WillSent`]).
    released_again: u64,
    /// Persistent sessions by client id, and those not kept (beyond [`REGISTRY_MAX`]).
    registry: HashMap<String, SessionEntry>,
    registry_refused: u64,
    /// Sessions whose end was read, by client id: (node, when the end was written, when it was
    /// read here), kept [`ENDED_KEEP_MS`] (≤ [`ENDED_MAX`]) so that a record written before the
    /// end but read after it does not bring the session back (see [`Wills::stale_session_record`]).
    ended: HashMap<String, Ended>,
    /// `ended`'s client ids in the order they were read (with when), oldest first: the ones
    /// past [`ENDED_KEEP_MS`] leave from the front, so a full table costs no scan per end.
    ended_order: std::collections::VecDeque<(u64, String)>,
    /// Ends forgotten before [`ENDED_KEEP_MS`] because `ended_order` held [`ENDED_MAX`] (an
    /// end read again counts there twice).
    ended_refused: u64,
    /// Claims of this node's shards that name a holder, while it may be dead, by client and
    /// connection (≤ [`ADOPT_MAX`]), and those not kept.
    adopt: HashMap<(String, u64), Adopt>,
    adopt_refused: u64,
    floor: Floor,
}

/// Entries of the membership's tables not kept because the table was full, per table (see
/// [`crate::health::ClusterView`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Refused {
    wills: u64,
    sessions: u64,
    shares: u64,
    adoptions: u64,
    /// Remembered ends forgotten early (before [`ENDED_KEEP_MS`]).
    ends: u64,
}

/// A due will whose release was written but not read back is released again after this long;
/// a will this node won and published whose [`ClaimKind::WillSent`] was not read back is
/// published again after this long.
const RELEASE_RETRY_MS: u64 = 5_000;

impl WillEntry {
    /// Whether `claim` comes from the node incarnation that holds this will (a claim that does
    /// not say its incarnation: from that node).
    fn held_by(&self, claim: &Claim) -> bool {
        self.node == claim.node && (claim.inc == 0 || claim.inc == self.inc)
    }
}

impl Wills {
    /// Whether a [`ClaimKind::Session`] record was written before the one this node holds for
    /// the client, or before the end it read, by the same node. Each shard writes its own
    /// sessions' records through its own producer, so when a session ends on one shard and a
    /// new one starts on another (or a session moves between shards), the two records can reach
    /// Kafka in either order; when they were written puts them back in order. That time is the
    /// shard's monotonic clock plus the wall clock's offset taken when the node started (the
    /// same for all its shards, within a millisecond), so a clock stepped during a run does not
    /// reorder them. Records of different runs of a node (a restart, maybe with a clock set
    /// back), of different nodes, and records that do not say when they were written keep the
    /// rule of the latest read: a run's records reach Kafka after its previous run's, which
    /// ended before it started.
    fn stale_session_record(&self, claim: &Claim) -> bool {
        let earlier = |node: &str, inc: u64, at_ms: u64| {
            node == claim.node && inc == claim.inc && claim.at_ms != 0 && claim.at_ms < at_ms
        };
        self.registry.get(&claim.client).is_some_and(|e| earlier(&e.node, e.inc, e.at_ms))
            || self.ended.get(&claim.client).is_some_and(|e| earlier(&e.node, e.inc, e.at_ms))
    }

    /// `claim` ended its session: remembered for [`ENDED_KEEP_MS`] (a record of that session
    /// still on its way is older than that: its shard gives up on one after 120 s and writes
    /// it again, with a new time), the newest [`ENDED_MAX`] at most (beyond, the oldest goes).
    fn note_ended(&mut self, claim: Claim, now_ms: u64) {
        if claim.at_ms == 0 {
            return;
        }
        while let Some((read_ms, client)) = self.ended_order.front() {
            let young = now_ms.saturating_sub(*read_ms) < ENDED_KEEP_MS;
            if young && self.ended_order.len() < ENDED_MAX {
                break;
            }
            // Its entry goes unless it was read again since (then a later place holds it).
            if self.ended.get(client).is_some_and(|e| e.read_ms == *read_ms) {
                self.ended.remove(client);
                if young {
                    if self.ended_refused == 0 {
                        tracing::warn!(
                            max = ENDED_MAX,
                            "more persistent sessions ended within {} s than the membership remembers: \
                             the oldest ends are forgotten early (a record of such a session written before \
                             its end but read after it would bring the session back)",
                            ENDED_KEEP_MS / 1000
                        );
                    }
                    self.ended_refused += 1;
                }
            }
            self.ended_order.pop_front();
        }
        if self.ended.len() >= ENDED_MAX {
            return;
        }
        self.ended_order.push_back((now_ms, claim.client.clone()));
        self.ended
            .insert(claim.client, Ended { node: claim.node, inc: claim.inc, at_ms: claim.at_ms, read_ms: now_ms });
    }

    fn apply(&mut self, me: &NodeIdentity, claim: Claim, record: Record, now_ms: u64) {
        let mine = claim.node == me.cfg.node_id && claim.inc == me.incarnation;
        match claim.kind {
            ClaimKind::Lease if mine => {
                // When the lease was written, on this thread's clock (the writer is this node:
                // one wall clock). Read late — a busy node, a slow fetch — it would otherwise
                // date the shard's oldest pending message too late, and the floor past it.
                let written_ms = u64::try_from(record.timestamp.timestamp_millis()).unwrap_or(0);
                let late_ms = if written_ms == 0 { 0 } else { wall_ms().saturating_sub(written_ms) };
                self.floor.on_lease(&claim, now_ms.saturating_sub(late_ms))
            }
            ClaimKind::Session => {
                if self.stale_session_record(&claim) {
                    return;
                }
                let value = record.value.unwrap_or_default();
                if claim.active && !value.is_empty() {
                    if self.registry.len() >= REGISTRY_MAX && !self.registry.contains_key(&claim.client) {
                        if self.registry_refused == 0 {
                            tracing::warn!(
                                "cluster: more than {REGISTRY_MAX} persistent sessions; further ones are not kept"
                            );
                        }
                        self.registry_refused += 1;
                    } else {
                        self.ended.remove(&claim.client);
                        let entry = SessionEntry {
                            node: claim.node,
                            inc: claim.inc,
                            at_ms: claim.at_ms,
                            expiry: claim.expiry,
                            value,
                        };
                        self.registry.insert(claim.client, entry);
                    }
                } else if self.registry.get(&claim.client).is_none_or(|e| e.node == claim.node) {
                    self.registry.remove(&claim.client);
                    self.note_ended(claim, now_ms);
                }
                return;
            }
            ClaimKind::Connect if claim.clean => {
                self.registry.remove(&claim.client);
            }
            ClaimKind::Connect if mine => {
                let again = self.adopt.contains_key(&(claim.client.clone(), claim.conn));
                // Named by the shard (it waits), or known here only (the shard's directory
                // started after the holder's claim): the handover then joins the session
                // after CONNACK.
                let holder = claim.from.clone().or_else(|| {
                    self.registry.get(&claim.client).map(|e| e.node.clone()).filter(|n| *n != me.cfg.node_id)
                });
                if let (Some(from), false) = (holder, again) {
                    if self.adopt.len() >= ADOPT_MAX {
                        if self.adopt_refused == 0 {
                            tracing::warn!(
                                "cluster: more than {ADOPT_MAX} clients wait for a dead node's session here; \
                                 further ones get none"
                            );
                        }
                        self.adopt_refused += 1;
                    } else {
                        let to = HandoverTo { node: claim.node.clone(), shard: claim.shard, conn: claim.conn };
                        let until_ms = now_ms + me.cfg.dead_after_ms + 5_000;
                        let a = Adopt { client: claim.client.clone(), to, from, until_ms };
                        self.adopt.insert((claim.client.clone(), claim.conn), a);
                    }
                }
            }
            _ => {}
        }
        let (me, my_inc) = (me.cfg.node_id.as_str(), me.incarnation);
        match (claim.kind, claim.will) {
            (ClaimKind::Share, _) => {
                let keys = self.shares.entry(claim.node).or_default();
                if claim.active {
                    if keys.len() < WILLS_MAX || keys.contains(&claim.client) {
                        keys.insert(claim.client);
                    } else {
                        self.shares_refused += 1;
                    }
                } else {
                    keys.remove(&claim.client);
                }
            }
            (ClaimKind::Connect, true) => {
                if self.by_client.len() >= WILLS_MAX && !self.by_client.contains_key(&claim.client) {
                    if self.refused == 0 {
                        tracing::warn!("cluster: more than {WILLS_MAX} wills; further ones are not kept");
                    }
                    self.refused += 1;
                    return;
                }
                let after_ms = claim.will_after_ms();
                let entry =
                    WillEntry { node: claim.node, inc: claim.inc, after_ms, record, due_ms: None, released: None };
                self.by_client.insert(claim.client, entry);
            }
            // A new connection of the client, anywhere: the will of the old one is gone (a
            // client that connects again before its will's delay cancels it).
            (ClaimKind::Connect, false) => {
                self.by_client.remove(&claim.client);
            }
            (ClaimKind::Handover | ClaimKind::Lease | ClaimKind::Session, _) => {}
            // A release of the will by the incarnation that held it (not an older one's, read
            // after a newer claim): its connection ended, the will is gone. Or by a survivor:
            // the first survivor's release read wins, and that survivor publishes it.
            (ClaimKind::Release, _) => {
                let Some(e) = self.by_client.get_mut(&claim.client) else { return };
                if !e.held_by(&claim) {
                    return;
                }
                let Some(by) = claim.by else {
                    self.by_client.remove(&claim.client);
                    return;
                };
                if e.released.is_some() {
                    return; // another survivor's release was read first
                }
                if by == me && claim.by_inc == my_inc {
                    let (owner, inc, record) = (e.node.clone(), e.inc, e.record.clone());
                    self.won.push(Won { client: claim.client, owner, inc, record });
                }
                e.released = Some(Releaser { node: by, inc: claim.by_inc, read_ms: now_ms });
            }
            // Its publisher says the will went out: gone for good.
            (ClaimKind::WillSent, _) => {
                if self.by_client.get(&claim.client).is_some_and(|e| e.held_by(&claim)) {
                    self.by_client.remove(&claim.client);
                }
            }
        }
    }

    fn take_shares(&mut self, node: &str) -> Vec<String> {
        self.shares.remove(node).map(|k| k.into_iter().collect()).unwrap_or_default()
    }

    /// The wills this node should release now (client, owner, owner's incarnation): of
    /// connections that are gone (their node dead or restarted) whose delay is over, when this
    /// node is the one to publish them. A connection seen alive again is not due any more. A
    /// will released by a survivor that is gone (dead, left, restarted) before it said it
    /// published it is due again; one this node (`my_inc`) won and published without its
    /// [`ClaimKind::WillSent`] read back for [`RELEASE_RETRY_MS`] goes to `won` again.
    fn due(&mut self, members: &Members, my_inc: u64, now_ms: u64) -> Vec<(String, String, u64)> {
        let mut out = Vec::new();
        for (client, e) in &mut self.by_client {
            if let Some(r) = &mut e.released {
                if r.node == members.me() && r.inc == my_inc {
                    if now_ms >= r.read_ms + RELEASE_RETRY_MS {
                        r.read_ms = now_ms;
                        let (owner, inc, record) = (e.node.clone(), e.inc, e.record.clone());
                        self.won.push(Won { client: client.clone(), owner, inc, record });
                    }
                    continue;
                }
                let gone = members.get(&r.node).is_none_or(|m| match m.state {
                    MemberState::Alive => m.incarnation > r.inc,
                    MemberState::Dead | MemberState::Left => true,
                });
                if !gone {
                    continue;
                }
                tracing::info!(client = %client, releaser = %r.node, "cluster: a will's publisher is gone before it said it sent it: released again");
                self.released_again += 1;
                e.released = None;
                e.due_ms = None;
            }
            if !(members.connection_gone(&e.node, e.inc) && members.publishes_for(&e.node)) {
                e.due_ms = None;
                continue;
            }
            let due = *e.due_ms.get_or_insert(now_ms + e.after_ms);
            if due <= now_ms {
                out.push((client.clone(), e.node.clone(), e.inc));
                e.due_ms = Some(now_ms + RELEASE_RETRY_MS);
            }
        }
        out
    }
}

impl Wills {
    /// The adoptions to carry out now (their holder is not alive) with the holder's session and
    /// floor; ones whose shard stopped waiting are dropped.
    fn adoptions_due(&mut self, members: &Members, now_ms: u64) -> Vec<AdoptNow> {
        let mut out = Vec::new();
        if self.adopt.is_empty() {
            return out;
        }
        let gone = |a: &Adopt| members.get(&a.from).is_none_or(|m| m.state != MemberState::Alive);
        let due: Vec<(String, u64)> = if members.settled(now_ms) {
            self.adopt.iter().filter(|(_, a)| gone(a)).map(|(k, _)| k.clone()).collect()
        } else {
            Vec::new()
        };
        for k in due {
            let Some(a) = self.adopt.remove(&k) else { continue };
            let holder = members.get(&a.from);
            // A session that expired since its node was last heard of is gone (it may have
            // gone earlier: its client may have been offline before).
            let silent_ms = holder.map_or(0, |m| m.silent_ms);
            let live = |e: &&SessionEntry| e.expiry == u32::MAX || u64::from(e.expiry) * 1000 > silent_ms;
            let entry = self.registry.get(&a.client).filter(|e| e.node == a.from).filter(live).cloned();
            let floor = holder.and_then(|m| m.floor.clone());
            let carriers = holder.map(|m| m.carriers.clone()).unwrap_or_default();
            out.push((a, entry, floor, carriers));
        }
        // The shard stopped waiting for these.
        self.adopt.retain(|_, a| a.until_ms > now_ms);
        out
    }

    /// Entries not kept because a table was full.
    fn refused(&self) -> Refused {
        Refused {
            wills: self.refused,
            sessions: self.registry_refused,
            shares: self.shares_refused,
            adoptions: self.adopt_refused,
            ends: self.ended_refused,
        }
    }
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// This node's identity for its heartbeats.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub cfg: ClusterConfig,
    /// Start time, ms since the epoch.
    pub incarnation: u64,
    pub listeners: Vec<String>,
    /// The topics of the user mappings that carry this node's messages to the others
    /// (`ClusterConfig::message_topics` but `.messages`).
    pub carriers: Vec<String>,
    /// The floor this node's last heartbeat said (its leaving one says it too).
    floor: Arc<Mutex<Option<Offsets>>>,
}

impl NodeIdentity {
    /// `topics`: where the other nodes read this node's messages
    /// (`ClusterConfig::message_topics`).
    pub fn new(cfg: ClusterConfig, listeners: Vec<String>, topics: &[String]) -> NodeIdentity {
        let incarnation = if cfg.incarnation == 0 { wall_ms() } else { cfg.incarnation };
        let carriers = topics.iter().filter(|t| **t != cfg.messages_topic()).cloned().collect();
        NodeIdentity { cfg, incarnation, listeners, carriers, floor: Arc::default() }
    }

    fn heartbeat(&self, seq: u64, alive: bool) -> Record {
        let hb = Heartbeat {
            node: self.cfg.node_id.clone(),
            incarnation: self.incarnation,
            seq,
            alive,
            listeners: self.listeners.clone(),
            floor: self.floor.lock().ok().and_then(|f| f.clone()),
            carriers: self.carriers.clone(),
        };
        Record {
            key: Some(self.cfg.node_id.as_bytes().to_vec()),
            value: Some(hb.encode()),
            headers: Default::default(),
            timestamp: Utc.timestamp_millis_opt(wall_ms() as i64).single().unwrap_or_default(),
        }
    }
}

/// Creates the internal topics, then runs heartbeats and the membership reader until the
/// thread stops.
pub(crate) async fn run(me: NodeIdentity, kafka: Arc<Cluster>, health: Arc<KafkaHealth>) {
    let start = Instant::now();
    let now_ms = move || start.elapsed().as_millis() as u64;
    health.set_cluster(ClusterView {
        name: me.cfg.name.clone(),
        node: me.cfg.node_id.clone(),
        ..ClusterView::default()
    });
    ensure_topics(&me.cfg, &kafka, &health).await;
    let topic = me.cfg.nodes_topic();
    let pc = loop {
        match kafka.partition_client(&topic, 0).await {
            Ok(pc) => break Arc::new(pc),
            Err(e) => {
                health.cluster_error(format!("{topic}: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let wills = Arc::new(Mutex::new(Wills::default()));
    let writer = {
        let (me, pc, health, wills) = (me.clone(), pc.clone(), health.clone(), wills.clone());
        tokio::spawn(async move {
            let every = Duration::from_millis(me.cfg.heartbeat_ms);
            let margin_ms = me.cfg.heartbeat_ms + 1000;
            let mut failing = false;
            for seq in 0.. {
                let starts = health.start_offsets(sluice_core::cluster::FORWARD_MAPPING);
                let floor = wills.lock().ok().and_then(|mut w| w.floor.tick(now_ms(), margin_ms, &starts));
                health.update_cluster(|v| v.floor = floor.clone());
                if let Ok(mut f) = me.floor.lock() {
                    *f = floor;
                }
                let sent = tokio::time::timeout(every.max(Duration::from_secs(1)), async {
                    pc.produce(vec![me.heartbeat(seq, true)], Compression::NoCompression).await
                })
                .await;
                match sent {
                    Ok(Ok(_)) => failing = false,
                    Ok(Err(e)) => fail(&health, &mut failing, format!("heartbeat to {}: {e}", me.cfg.nodes_topic())),
                    Err(_) => fail(&health, &mut failing, format!("heartbeat to {}: timed out", me.cfg.nodes_topic())),
                }
                tokio::time::sleep(every).await;
            }
        })
    };
    let sessions = tokio::spawn(read_sessions(me.clone(), kafka.clone(), wills.clone(), start));
    read(&me, &pc, &health, now_ms, &kafka, &wills).await;
    writer.abort();
    sessions.abort();
}

/// Every partition of `.sessions`, from the beginning, into `wills`.
async fn read_sessions(me: NodeIdentity, kafka: Arc<Cluster>, wills: Arc<Mutex<Wills>>, start: Instant) {
    let topic = me.cfg.sessions_topic();
    let n = loop {
        match kafka.partitions(&topic, Instant::now() + Duration::from_secs(5)).await {
            Ok(n) => break n,
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    };
    for partition in 0..n {
        let (kafka, wills, topic, me) = (kafka.clone(), wills.clone(), topic.clone(), me.clone());
        tokio::spawn(async move {
            let pc = loop {
                match kafka.partition_client(&topic, partition).await {
                    Ok(pc) => break pc,
                    Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            };
            let mut offset = None;
            loop {
                match tokio::time::timeout(Duration::from_secs(5), fetch_from_start(&pc, &mut offset)).await {
                    Ok(Ok((records, _))) => {
                        let Ok(mut w) = wills.lock() else { return };
                        for r in records {
                            offset = Some(r.offset + 1);
                            let claim = r.record.headers.get(CLAIM_HEADER).and_then(|c| Claim::decode(c));
                            if let Some(claim) = claim {
                                w.apply(&me, claim, r.record, start.elapsed().as_millis() as u64);
                            }
                        }
                    }
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        });
    }
}

/// For a node that is gone (dead or left), the survivor with the lowest id says it has no
/// members of any shared-subscription group any more, so that no node leaves a group's messages
/// to it.
async fn clear_shares(me: &NodeIdentity, gone: &str, kafka: &Cluster, wills: &Mutex<Wills>) {
    let keys = match wills.lock() {
        Ok(mut w) => w.take_shares(gone),
        Err(_) => return,
    };
    let timestamp = Utc.timestamp_millis_opt(wall_ms() as i64).single().unwrap_or_default();
    let records = keys
        .into_iter()
        .map(|key| Record {
            key: Some(format!("{key}\u{1}{gone}").into_bytes()),
            value: None,
            headers: [(CLAIM_HEADER.to_string(), Claim::new(gone, &key, 0, ClaimKind::Share).encode())].into(),
            timestamp,
        })
        .collect();
    produce_keyed(kafka, &me.cfg.sessions_topic(), records).await;
}

/// Releases the wills that are due (see [`Wills::due`]) in `.sessions`, each as this node's
/// (`Claim::by`): whichever survivor's release of a will is read first publishes it.
async fn release_due(me: &NodeIdentity, kafka: &Cluster, wills: &Mutex<Wills>, members: &Members, now_ms: u64) {
    let due = match wills.lock() {
        Ok(mut w) => w.due(members, me.incarnation, now_ms),
        Err(_) => return,
    };
    if due.is_empty() {
        return;
    }
    let timestamp = Utc.timestamp_millis_opt(wall_ms() as i64).single().unwrap_or_default();
    let records = due.into_iter().map(|(client, owner, inc)| {
        let release = Claim {
            inc,
            by: Some(me.cfg.node_id.clone()),
            by_inc: me.incarnation,
            ..Claim::new(&owner, &client, 0, ClaimKind::Release)
        };
        Record {
            key: Some(client.into_bytes()),
            value: None,
            headers: [(CLAIM_HEADER.to_string(), release.encode())].into(),
            timestamp,
        }
    });
    let n = records.len();
    produce_keyed(kafka, &me.cfg.sessions_topic(), records.collect()).await;
    tracing::debug!(wills = n, "cluster: released wills of lost connections");
}

/// Publishes the wills this node's release won (see [`Wills::won`]) into `.messages` as their
/// node's records (every node delivers them, this one included), retained ones into
/// `.retained` too; once Kafka took them, says so in `.sessions` ([`ClaimKind::WillSent`]).
/// What Kafka did not take is published again after [`RELEASE_RETRY_MS`] (`Wills::due`).
async fn publish_won(me: &NodeIdentity, kafka: &Cluster, wills: &Mutex<Wills>) -> u64 {
    let won = match wills.lock() {
        Ok(mut w) => std::mem::take(&mut w.won),
        Err(_) => return 0,
    };
    if won.is_empty() {
        return 0;
    }
    let timestamp = Utc.timestamp_millis_opt(wall_ms() as i64).single().unwrap_or_default();
    let (mut messages, mut retained, mut sent) = (Vec::new(), Vec::new(), Vec::new());
    for Won { client, owner, inc, mut record } in won {
        record.headers.remove(CLAIM_HEADER);
        record.timestamp = timestamp;
        record.key = Some(client.clone().into_bytes());
        if record.headers.get("mqtt.retain").is_some_and(|v| v == b"true") {
            let mut r = record.clone();
            r.key = record.headers.get("mqtt.topic").cloned();
            retained.push(r);
        }
        messages.push(record);
        let claim = Claim {
            inc,
            by: Some(me.cfg.node_id.clone()),
            by_inc: me.incarnation,
            ..Claim::new(&owner, &client, 0, ClaimKind::WillSent)
        };
        sent.push(Record {
            key: Some(client.into_bytes()),
            value: None,
            headers: [(CLAIM_HEADER.to_string(), claim.encode())].into(),
            timestamp,
        });
    }
    let n = messages.len();
    let published = produce_keyed(kafka, &me.cfg.messages_topic(), messages).await;
    produce_keyed(kafka, &me.cfg.retained_topic(), retained).await;
    if !published {
        return 0;
    }
    tracing::info!(wills = n, "cluster: published the wills of connections lost with their node");
    produce_keyed(kafka, &me.cfg.sessions_topic(), sent).await;
    n as u64
}

/// Rebuilds `a.client`'s session that `a.from` (dead) held, from `entry` (its subscriptions)
/// and the message topics (`.messages` and the holder's `carriers`) from `floor`, and sends it
/// to the shard that waits for it as a handover; an empty handover (no session) when there is
/// no entry. Bounded by [`REPLAY_MAX`] and one record ([`Adoption`]): what is left out is
/// counted.
async fn adopt(
    me: &NodeIdentity,
    kafka: &Cluster,
    health: &KafkaHealth,
    a: Adopt,
    entry: Option<SessionEntry>,
    floor: Option<Offsets>,
    carriers: Vec<String>,
) {
    let value = match entry.as_ref().and_then(|e| Adoption::new(&a.client, &e.value, wall_ms())) {
        None => Vec::new(),
        Some(mut adoption) => {
            let topics: Vec<String> = std::iter::once(me.cfg.messages_topic()).chain(carriers).collect();
            let read = tokio::time::timeout(REPLAY_MAX, async {
                for topic in &topics {
                    replay(kafka, topic, floor.as_deref(), &mut adoption).await?;
                }
                Ok::<_, String>(())
            })
            .await;
            let complete = matches!(read, Ok(Ok(())));
            match read {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(client = %a.client, "cluster: rebuilding a dead node's session: {e}"),
                Err(_) => {
                    tracing::warn!(client = %a.client, "cluster: rebuilding a dead node's session took longer than {REPLAY_MAX:?}: sent with what was read")
                }
            }
            tracing::info!(
                client = %a.client, holder = %a.from, floor = ?floor, messages = adoption.taken, left_out = adoption.left_out, complete,
                "cluster: rebuilt the persistent session of a dead node's client from the log"
            );
            let (taken, left_out) = (adoption.taken as u64, adoption.left_out as u64);
            health.update_cluster(|v| {
                v.sessions_adopted += 1;
                v.adoptions_incomplete += u64::from(!complete);
                v.adopted_messages += taken;
                v.adopted_left_out += left_out;
            });
            adoption.finish()
        }
    };
    let handover =
        Claim { to: Some(a.to), inc: me.incarnation, ..Claim::new(&me.cfg.node_id, &a.client, 0, ClaimKind::Handover) };
    let record = Record {
        key: Some(a.client.into_bytes()),
        value: Some(value),
        headers: [(CLAIM_HEADER.to_string(), handover.encode())].into(),
        timestamp: Utc.timestamp_millis_opt(wall_ms() as i64).single().unwrap_or_default(),
    };
    produce_keyed(kafka, &me.cfg.sessions_topic(), vec![record]).await;
}

/// Offers every record of `topic` from `floor` (per partition; the earliest kept where it
/// names none) to what was written when the replay began to `adoption`, partition by
/// partition (one publisher's messages on one MQTT topic are in one partition, in order).
async fn replay(
    kafka: &Cluster,
    topic: &str,
    floor: Option<&[(String, i32, i64)]>,
    adoption: &mut Adoption,
) -> Result<(), String> {
    let n = kafka.partitions(topic, Instant::now() + REPLAY_MAX).await.map_err(|e| e.to_string())?;
    let topic_name: Arc<str> = topic.into();
    let started_ms = wall_ms() as i64;
    for partition in 0..n {
        let pc = kafka.partition_client(topic, partition).await.map_err(|e| e.to_string())?;
        let from = floor.and_then(|f| f.iter().find(|(t, p, _)| t == topic && *p == partition)).map(|(_, _, o)| *o);
        let mut at = match from {
            Some(o) => o,
            None => pc.get_offset(OffsetAt::Earliest).await.map_err(|e| e.to_string())?,
        };
        let end = pc.get_offset(OffsetAt::Latest).await.map_err(|e| e.to_string())?;
        // Past the high watermark too (a broker's may lag behind its last batch: tansu's
        // does), until the partition has no more or its records were written after the
        // replay began (those the waiting shard keeps itself).
        let mut done = false;
        while !done {
            let (records, _) = pc.fetch_records(at, 1..1 << 20, 50).await.map_err(|e| e.to_string())?;
            if records.is_empty() {
                break;
            }
            for r in records {
                if r.offset < at {
                    continue;
                }
                if r.offset >= end && r.record.timestamp.timestamp_millis() >= started_ms {
                    done = true;
                    break;
                }
                at = r.offset + 1;
                let rec = InboundRecord {
                    mapping: 0,
                    topic: topic_name.clone(),
                    partition,
                    offset: r.offset,
                    key: r.record.key.map(bytes::Bytes::from),
                    value: r.record.value.map(bytes::Bytes::from),
                    headers: r.record.headers.into_iter().map(|(k, v)| (k, bytes::Bytes::from(v))).collect(),
                };
                adoption.offer(&rec, wall_ms());
            }
        }
    }
    Ok(())
}

/// Produces `records` into `topic`, each into its key's partition, one request per partition;
/// failures are logged (all bounded by ten seconds).
async fn produce_keyed(kafka: &Cluster, topic: &str, records: Vec<Record>) -> bool {
    if records.is_empty() {
        return true;
    }
    let sent = tokio::time::timeout(Duration::from_secs(10), async {
        let n = kafka.partitions(topic, Instant::now() + Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
        let mut by_partition: HashMap<i32, Vec<Record>> = HashMap::new();
        for r in records {
            let p = r.key.as_deref().map_or(0, |k| sluice_core::bridge::partition_for_key(k, n));
            by_partition.entry(p).or_default().push(r);
        }
        for (p, records) in by_partition {
            let pc = kafka.partition_client(topic, p).await.map_err(|e| e.to_string())?;
            pc.produce(records, Compression::NoCompression).await.map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(())
    })
    .await;
    match sent {
        Ok(Ok(())) => return true,
        Ok(Err(e)) => tracing::warn!(%topic, "cluster: producing to an internal topic failed: {e}"),
        Err(_) => tracing::warn!(%topic, "cluster: producing to an internal topic timed out"),
    }
    false
}

/// The next records of a table read from its beginning: `offset` is where the last fetch ended
/// (`None`: the partition's earliest offset, asked first).
async fn fetch_from_start(
    pc: &PartitionClient,
    offset: &mut Option<i64>,
) -> Result<(Vec<rskafka::record::RecordAndOffset>, i64), rskafka::client::error::Error> {
    let from = match *offset {
        Some(o) => o,
        None => pc.get_offset(OffsetAt::Earliest).await?,
    };
    *offset = Some(from);
    pc.fetch_records(from, 1..1 << 20, FETCH_WAIT_MS).await
}

fn fail(health: &KafkaHealth, failing: &mut bool, e: String) {
    if !*failing {
        tracing::warn!("cluster: {e}");
    }
    *failing = true;
    health.cluster_error(e);
}

async fn ensure_topics(cfg: &ClusterConfig, kafka: &Cluster, health: &KafkaHealth) {
    let mut logged = false;
    for t in cfg.internal_topics() {
        loop {
            match kafka.ensure_topic(&t.name, t.partitions, &t.configs).await {
                Ok(()) => break,
                Err(e) => {
                    let e = format!("creating internal topic {}: {e}", t.name);
                    if !logged {
                        tracing::warn!("cluster: {e}; retrying every second");
                        logged = true;
                    }
                    health.cluster_error(e);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    health.update_cluster(|v| v.topics_ready = true);
}

async fn read(
    me: &NodeIdentity,
    pc: &PartitionClient,
    health: &Arc<KafkaHealth>,
    now_ms: impl Fn() -> u64,
    kafka: &Arc<Cluster>,
    wills: &Mutex<Wills>,
) {
    let mut members = Members::new(&me.cfg.node_id, me.cfg.dead_after_ms);
    let mut left: Vec<String> = Vec::new();
    let mut offset = None;
    let mut failing = false;
    let mut warned = std::collections::HashSet::new();
    loop {
        let timeout = Duration::from_millis(me.cfg.heartbeat_ms.max(1000) + FETCH_WAIT_MS as u64);
        match tokio::time::timeout(timeout, fetch_from_start(pc, &mut offset)).await {
            Ok(Ok((records, _))) => {
                failing = false;
                let wall = wall_ms() as i64;
                for r in &records {
                    offset = Some(r.offset + 1);
                    let Some(hb) = r.record.value.as_deref().and_then(Heartbeat::decode) else { continue };
                    let age = (wall - r.record.timestamp.timestamp_millis()).max(0) as u64;
                    if let Some(change) = members.on_heartbeat(hb, age, now_ms()) {
                        log_change(&change);
                        if let MemberChange::Left(gone) = change {
                            left.push(gone);
                        }
                    }
                }
            }
            Ok(Err(e)) => fail(health, &mut failing, format!("reading {}: {e}", me.cfg.nodes_topic())),
            Err(_) => fail(health, &mut failing, format!("reading {}: timed out", me.cfg.nodes_topic())),
        }
        for gone in left.drain(..) {
            let designated = members.alive().filter(|n| *n != gone).chain([me.cfg.node_id.as_str()]).min();
            if designated == Some(me.cfg.node_id.as_str()) {
                clear_shares(me, &gone, kafka, wills).await;
            }
        }
        for change in members.tick(now_ms()) {
            log_change(&change);
            if let MemberChange::Dead(dead) = &change {
                let designated = members.alive().filter(|n| n != dead).chain([me.cfg.node_id.as_str()]).min();
                if designated == Some(me.cfg.node_id.as_str()) {
                    clear_shares(me, dead, kafka, wills).await;
                }
            }
        }
        if members.settled(now_ms()) {
            release_due(me, kafka, wills, &members, now_ms()).await;
        }
        warn_unread_carriers(me, &members, &mut warned);
        let (adoptions, refused) =
            wills.lock().map(|mut w| (w.adoptions_due(&members, now_ms()), w.refused())).unwrap_or_default();
        for (a, entry, floor, carriers) in adoptions {
            let (me, kafka, health) = (me.clone(), kafka.clone(), health.clone());
            tokio::spawn(async move { adopt(&me, &kafka, &health, a, entry, floor, carriers).await });
        }
        let published = publish_won(me, kafka, wills).await;
        let list = members.members();
        let (held, again) = wills.lock().map(|w| (w.by_client.len() as u64, w.released_again)).unwrap_or_default();
        let settled = members.settled(now_ms());
        health.update_cluster(|v| {
            v.members = list;
            (v.settled, v.wills_held, v.wills_released_again) = (settled, held, again);
            v.wills_published += published;
            (v.wills_refused, v.sessions_refused, v.shares_refused, v.adoptions_refused, v.ends_refused) =
                (refused.wills, refused.sessions, refused.shares, refused.adoptions, refused.ends);
            if !failing {
                v.last_error = None;
            }
        });
        if failing {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Logs once per (node, topic) a topic that carries another node's messages (a user mapping of
/// its, `ClusterConfig::message_topics`) and that this node does not read: the nodes' mappings
/// differ, and this node's clients miss what that mapping takes there.
fn warn_unread_carriers(
    me: &NodeIdentity,
    members: &Members,
    warned: &mut std::collections::HashSet<(String, String)>,
) {
    for m in members.members() {
        for topic in &m.carriers {
            if m.state == MemberState::Alive
                && !me.carriers.contains(topic)
                && warned.len() < MEMBERS_MAX
                && warned.insert((m.node.clone(), topic.clone()))
            {
                tracing::warn!(
                    node = %m.node, %topic,
                    "cluster: that node's mapping into this topic carries its messages to the others, and this node has no such mapping: give every node the same [[mqtt_to_kafka]] mappings"
                );
            }
        }
    }
}

fn log_change(c: &MemberChange) {
    match c {
        MemberChange::Joined(n) => tracing::info!(node = %n, "cluster: node joined"),
        MemberChange::Restarted(n) => tracing::info!(node = %n, "cluster: node restarted"),
        MemberChange::Left(n) => tracing::info!(node = %n, "cluster: node left"),
        MemberChange::Dead(n) => tracing::warn!(node = %n, "cluster: node is silent past dead_after_ms: dead"),
    }
}

/// The last heartbeat of a clean stop: the others see the node leave at once instead of
/// declaring it dead after `dead_after_ms`. Bounded by `within`.
pub(crate) async fn leave(me: &NodeIdentity, kafka: &Cluster, within: Duration) {
    let topic = me.cfg.nodes_topic();
    let sent = tokio::time::timeout(within, async {
        let pc = kafka.partition_client(&topic, 0).await?;
        pc.produce(vec![me.heartbeat(u64::MAX, false)], Compression::NoCompression).await
    })
    .await;
    match sent {
        Ok(Ok(_)) => tracing::info!(node = %me.cfg.node_id, "cluster: left"),
        Ok(Err(e)) => tracing::warn!("cluster: the leaving heartbeat failed: {e}"),
        Err(_) => tracing::warn!("cluster: the leaving heartbeat timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::cluster::Heartbeat;

    fn hb(node: &str, inc: u64) -> Heartbeat {
        Heartbeat {
            node: node.into(),
            incarnation: inc,
            seq: 0,
            alive: true,
            listeners: vec![],
            floor: None,
            carriers: vec![],
        }
    }

    fn me(node: &str) -> NodeIdentity {
        let cfg = ClusterConfig {
            name: "c".into(),
            node_id: node.into(),
            kafka: "default".into(),
            topic_prefix: None,
            heartbeat_ms: 100,
            dead_after_ms: 1000,
            partitions: 4,
            fence: true,
            incarnation: 1,
        };
        NodeIdentity::new(cfg, vec![], &[])
    }

    fn lease(shard: usize, low: Option<u64>, pos: &[(i32, i64)]) -> Claim {
        let pos = offsets(pos);
        Claim { inc: 1, low, pos, shards: 2, ..Claim::new("n1", "lease", shard, ClaimKind::Lease) }
    }

    /// Offsets in topic `t`.
    fn offsets(pos: &[(i32, i64)]) -> Offsets {
        pos.iter().map(|&(p, o)| ("t".to_string(), p, o)).collect()
    }

    #[test]
    fn the_floor_is_the_snapshot_taken_before_the_oldest_pending_message_less_the_margin() {
        let mut f = Floor::default();
        f.on_lease(&lease(0, None, &[(0, 10)]), 1000);
        assert_eq!(f.tick(1000, 0, &[]), None, "shard 1's lease not read yet: from the earliest");
        f.on_lease(&lease(1, None, &[(1, 5)]), 2000);
        f.on_lease(&lease(0, None, &[(0, 20)]), 2000);
        assert_eq!(f.tick(2000, 0, &[]), Some(offsets(&[(0, 20), (1, 5)])), "nothing pending: the positions now");
        f.on_lease(&lease(0, None, &[(0, 30)]), 3000);
        f.tick(3000, 0, &[]);
        // Shard 0 now holds a message queued 2.5 s before its lease was read (at 1.5 s).
        f.on_lease(&lease(0, Some(2500), &[(0, 40)]), 4000);
        f.on_lease(&lease(1, None, &[(1, 9)]), 4000);
        assert_eq!(f.tick(4000, 600, &[]), None, "no snapshot from before 0.9 s is left");
        assert_eq!(
            f.tick(4000, 600, &offsets(&[(0, 3), (5, 8)])),
            Some(offsets(&[(0, 3), (5, 8)])),
            "then where this run's readers started"
        );
        let mut f2 = Floor::default();
        for (t, off) in [(1000, 10), (2000, 20), (3000, 30)] {
            f2.on_lease(&lease(0, None, &[(0, off)]), t);
            f2.on_lease(&lease(1, None, &[(1, 1)]), t);
            f2.tick(t, 200, &[]);
        }
        f2.on_lease(&lease(0, Some(1600), &[(0, 40)]), 4000);
        assert_eq!(
            f2.tick(4000, 200, &offsets(&[(0, 3), (5, 8)])),
            Some(offsets(&[(0, 20), (1, 1), (5, 8)])),
            "queued at 2.4 s, less 0.2: the 2 s snapshot, and a partition it lacks from where its reader started"
        );
        f2.on_lease(&lease(1, Some(LOW_UNKNOWN), &[(1, 1)]), 5000);
        assert_eq!(f2.tick(5000, 0, &[]), None, "a message of unknown age: from the earliest");
        f2.on_lease(&lease(1, None, &[(1, 2)]), 6000);
        f2.on_lease(&lease(0, None, &[(0, 50)]), 6000);
        assert_eq!(f2.tick(6000, 0, &[]), Some(offsets(&[(0, 50), (1, 2)])), "delivered: the floor moves up");
        let kept: Vec<u64> = f2.snapshots.iter().map(|(t, _)| *t).collect();
        assert_eq!(kept, [4000, 5000, 6000], "snapshots older than 2 s (and the margin) before the floor go");
        for t in 0..SNAPSHOTS_MAX as u64 + 10 {
            f2.on_lease(&lease(1, Some(LOW_UNKNOWN), &[(1, 2)]), 7000 + t);
            f2.tick(7000 + t, 0, &[]);
        }
        assert_eq!(f2.snapshots.len(), SNAPSHOTS_MAX, "bounded while the floor is held back");
        assert_eq!(f2.snapshots[0].0, 4000, "keeping the oldest");
    }

    #[test]
    fn a_claim_naming_a_dead_holder_is_adopted_with_its_session_and_floor_and_a_clean_connect_forgets_it() {
        let me1 = me("n1");
        let mut w = Wills::default();
        let session = |node: &str, client: &str, active: bool| Claim {
            active,
            expiry: if client == "e" { 1 } else { 3600 },
            ..Claim::new(node, client, 0, ClaimKind::Session)
        };
        let with_value = |v: &[u8]| Record { value: Some(v.to_vec()), ..record() };
        w.apply(&me1, session("n2", "c", true), with_value(b"subs of c"), 0);
        w.apply(&me1, session("n2", "d", true), with_value(b"subs of d"), 0);
        w.apply(&me1, session("n3", "d", false), record(), 0);
        assert!(w.registry.contains_key("d"), "an end on another node than the holder's is not this session's");
        let claim = |client: &str, conn: u64| Claim {
            from: Some("n2".into()),
            conn,
            inc: 1,
            ..Claim::new("n1", client, 1, ClaimKind::Connect)
        };
        w.apply(&me1, session("n2", "e", true), with_value(b"subs of e"), 0);
        w.apply(&me1, claim("c", 5), record(), 0);
        w.apply(&me1, claim("c", 5), record(), 0);
        assert_eq!(w.adopt.len(), 1, "a claim made again is adopted once");
        w.apply(&me1, claim("e", 6), record(), 0);
        let (mut m, now) = members();
        assert!(w.adoptions_due(&m, now).is_empty(), "the holder is alive: it hands over itself");
        let n2 = Heartbeat { floor: Some(offsets(&[(0, 7)])), ..hb("n2", 1) };
        m.on_heartbeat(n2, 0, now);
        for t in (now..=now + 1500).step_by(100) {
            m.on_heartbeat(hb("n1", 1), 0, t);
            m.tick(t);
        }
        let mut due = w.adoptions_due(&m, now + 1500);
        due.sort_by(|x, y| x.0.client.cmp(&y.0.client));
        assert_eq!(due.len(), 2);
        assert!(due[1].1.is_none(), "e's session (expiry 1 s) expired while its node was silent 1.5 s");
        let (a, entry, floor, _) = &due[0];
        assert_eq!((a.client.as_str(), a.to.shard, a.to.conn), ("c", 1, 5));
        assert_eq!(entry.as_ref().map(|e| e.value.as_slice()), Some(&b"subs of c"[..]));
        assert_eq!(floor.as_deref(), Some(&offsets(&[(0, 7)])[..]));
        let clean = Claim { clean: true, ..Claim::new("n3", "d", 0, ClaimKind::Connect) };
        w.apply(&me1, clean, record(), 0);
        assert!(!w.registry.contains_key("d"), "a clean start anywhere ends the session");
    }

    #[test]
    fn a_nodes_session_records_that_reach_kafka_out_of_order_are_read_in_the_order_written() {
        let me1 = me("n1");
        let mut w = Wills::default();
        let session = |node: &str, shard: usize, active: bool, at_ms: u64| Claim {
            active,
            at_ms,
            expiry: 3600,
            ..Claim::new(node, "c", shard, ClaimKind::Session)
        };
        let with_value = |v: &[u8]| Record { value: Some(v.to_vec()), ..record() };
        let value = |w: &Wills| w.registry.get("c").map(|e| e.value.clone());
        // Ended on shard 1 at 100 and started again on shard 0 at 200; the start is read first.
        w.apply(&me1, session("n2", 1, true, 50), with_value(b"old"), 0);
        w.apply(&me1, session("n2", 0, true, 200), with_value(b"new"), 0);
        w.apply(&me1, session("n2", 1, false, 100), record(), 0);
        assert_eq!(
            value(&w).as_deref(),
            Some(&b"new"[..]),
            "an end written before the new session's record is not its end"
        );
        w.apply(&me1, session("n2", 1, true, 150), with_value(b"stale"), 0);
        assert_eq!(value(&w).as_deref(), Some(&b"new"[..]), "nor is a change written before it");
        // Ended at 300; a change written at 250 on another shard comes after the end.
        w.apply(&me1, session("n2", 0, false, 300), record(), 1);
        assert_eq!(value(&w), None);
        w.apply(&me1, session("n2", 1, true, 250), with_value(b"late"), 2);
        assert_eq!(value(&w), None, "a record written before the end does not bring the session back");
        w.apply(&me1, session("n2", 1, true, 400), with_value(b"again"), 3);
        assert_eq!(value(&w).as_deref(), Some(&b"again"[..]), "one written after it does");
        // Records that do not say when (older nodes): the latest read wins, as before.
        w.apply(&me1, session("n2", 0, false, 0), record(), 4);
        assert_eq!(value(&w), None);
        w.apply(&me1, session("n2", 0, true, 0), with_value(b"undated"), 4);
        assert_eq!(value(&w).as_deref(), Some(&b"undated"[..]));
        // Another node's clock is not compared with this one's: the latest read wins.
        w.apply(&me1, session("n2", 0, true, 500), with_value(b"n2"), 5);
        w.apply(&me1, session("n3", 0, true, 10), with_value(b"n3"), 5);
        assert_eq!(w.registry.get("c").map(|e| e.node.as_str()), Some("n3"));
        w.apply(&me1, session("n2", 0, false, 600), record(), 6);
        assert_eq!(
            value(&w).as_deref(),
            Some(&b"n3"[..]),
            "an end on another node than the holder's is not this session's"
        );
        // A restarted node whose clock was set back: its new run's records are not older than
        // its previous run's, whatever they say (the latest read wins between runs).
        let run = |inc: u64, active: bool, at_ms: u64| Claim { inc, ..session("n4", 0, active, at_ms) };
        w.apply(&me1, run(1, true, 10_000), with_value(b"run 1"), 7);
        w.apply(&me1, run(2, true, 20), with_value(b"run 2"), 8);
        assert_eq!(value(&w).as_deref(), Some(&b"run 2"[..]), "a new run's record, dated earlier");
        w.apply(&me1, run(2, false, 30), record(), 9);
        w.apply(&me1, run(1, false, 20_000), record(), 9);
        w.apply(&me1, run(3, true, 5), with_value(b"run 3"), 9);
        assert_eq!(
            value(&w).as_deref(),
            Some(&b"run 3"[..]),
            "an earlier run's end, dated later, does not hide a later run's session"
        );
        // The ends remembered are bounded, the oldest going first, and forgotten with age.
        let end = |client: &str| Claim { at_ms: 100, ..Claim::new("n2", client, 0, ClaimKind::Session) };
        for i in 0..ENDED_MAX + 10 {
            w.apply(&me1, end(&format!("x{i}")), record(), 10);
        }
        assert!(w.ended.len() <= ENDED_MAX && w.ended_order.len() <= ENDED_MAX);
        assert!(!w.ended.contains_key("x0") && w.ended.contains_key(&format!("x{}", ENDED_MAX + 9)));
        assert_eq!(w.refused().ends, 10, "the ten pushed out early are counted");
        w.apply(&me1, end("late"), record(), 10 + ENDED_KEEP_MS);
        assert_eq!(w.ended.len(), 1, "five minutes on, only the new one");
        assert_eq!(w.refused().ends, 10, "those that leave with age are not");
    }

    #[test]
    fn the_claims_waiting_for_a_dead_holders_session_are_bounded_and_the_refused_ones_counted() {
        let me1 = me("n1");
        let mut w = Wills::default();
        let claim = |i: usize| Claim {
            from: Some("n2".into()),
            conn: i as u64,
            inc: 1,
            ..Claim::new("n1", &format!("c{i}"), 0, ClaimKind::Connect)
        };
        for i in 0..=ADOPT_MAX {
            w.apply(&me1, claim(i), record(), 0);
        }
        assert_eq!(w.adopt.len(), ADOPT_MAX);
        assert_eq!(w.refused(), Refused { adoptions: 1, ..Refused::default() }, "the one beyond the bound, counted");
        w.apply(&me1, claim(7), record(), 0);
        assert_eq!(
            (w.adopt.len(), w.refused().adoptions),
            (ADOPT_MAX, 1),
            "a claim made again is neither kept twice nor refused"
        );
        let (m, now) = members();
        assert!(w.adoptions_due(&m, now).is_empty(), "n2 is alive: it hands over itself");
        assert_eq!(w.adopt.len(), ADOPT_MAX);
        // Their shards stop waiting after dead_after_ms + 5 s: the entries go, and there is room.
        assert!(w.adoptions_due(&m, 1000 + 5_000).is_empty());
        assert!(w.adopt.is_empty());
        w.apply(&me1, claim(ADOPT_MAX + 1), record(), 6_000);
        assert_eq!((w.adopt.len(), w.refused().adoptions), (1, 1));
    }

    #[test]
    fn a_nodes_shared_groups_beyond_the_bound_are_counted() {
        let me1 = me("n1");
        let mut w = Wills::default();
        let share =
            |i: usize, active: bool| Claim { active, ..Claim::new("n2", &format!("g/{i}"), 0, ClaimKind::Share) };
        for i in 0..=WILLS_MAX {
            w.apply(&me1, share(i, true), record(), 0);
        }
        w.apply(&me1, share(3, true), record(), 0);
        assert_eq!(w.refused().shares, 1, "a count update of a group kept is not refused");
        w.apply(&me1, share(3, false), record(), 0);
        w.apply(&me1, share(WILLS_MAX, true), record(), 0);
        assert_eq!(w.take_shares("n2").len(), WILLS_MAX);
    }

    fn record() -> Record {
        Record {
            key: None,
            value: Some(b"lost".to_vec()),
            headers: [("mqtt.topic".to_string(), b"wills/x".to_vec())].into(),
            timestamp: Utc.timestamp_millis_opt(0).single().unwrap_or_default(),
        }
    }

    fn connect(node: &str, client: &str, inc: u64, will_delay: u32, expiry: u32) -> Claim {
        Claim { will: true, inc, will_delay, expiry, ..Claim::new(node, client, 0, ClaimKind::Connect) }
    }

    fn release_by(owner: &str, client: &str, inc: u64, by: &str) -> Claim {
        Claim { inc, by: Some(by.into()), by_inc: 1, ..Claim::new(owner, client, 0, ClaimKind::Release) }
    }

    /// n1 (this node) and n2 alive for long enough that n1 has heard itself (settled).
    fn members() -> (Members, u64) {
        let mut m = Members::new("n1", 1000);
        for now in (0..=2000).step_by(100) {
            m.on_heartbeat(hb("n1", 1), 0, now);
            m.on_heartbeat(hb("n2", 1), 0, now);
            m.tick(now);
        }
        assert!(m.settled(2000));
        (m, 2000)
    }

    #[test]
    fn a_restarted_nodes_older_wills_are_due_at_once_and_its_newer_ones_never() {
        let (mut m, now) = members();
        let mut w = Wills::default();
        w.apply(&me("n1"), connect("n2", "old", 1, 0, 0), record(), 0);
        assert!(w.due(&m, 1, now).is_empty(), "n2 alive as the incarnation that holds it");
        m.on_heartbeat(hb("n2", 2), 0, now + 10);
        w.apply(&me("n1"), connect("n2", "new", 2, 0, 0), record(), 0);
        assert_eq!(w.due(&m, 1, now + 10), vec![("old".to_string(), "n2".to_string(), 1)]);
        assert!(w.due(&m, 1, now + 20).is_empty(), "released once, then again only after the retry time");
        assert_eq!(w.due(&m, 1, now + 10 + RELEASE_RETRY_MS).len(), 1);
    }

    #[test]
    fn the_first_survivors_release_read_publishes_the_will_and_a_later_one_nothing() {
        let mut w = Wills::default();
        w.apply(&me("n1"), connect("n3", "c", 7, 0, 0), record(), 0);
        w.apply(&me("n1"), release_by("n3", "c", 7, "n2"), record(), 0);
        w.apply(&me("n1"), release_by("n3", "c", 7, "n1"), record(), 0);
        assert!(w.won.is_empty(), "n2's release came first: n2 publishes");
        w.apply(&me("n1"), connect("n3", "d", 7, 0, 0), record(), 0);
        w.apply(&me("n1"), release_by("n3", "d", 7, "n1"), record(), 0);
        w.apply(&me("n1"), release_by("n3", "d", 7, "n2"), record(), 0);
        assert_eq!(w.won.len(), 1);
        assert_eq!(w.won[0].client, "d");
    }

    #[test]
    fn a_will_waits_out_its_delay_capped_by_the_session_expiry_and_a_reconnect_cancels_it() {
        let (mut m, now) = members();
        let mut w = Wills::default();
        w.apply(&me("n1"), connect("n2", "slow", 1, 30, 3600), record(), 0);
        w.apply(&me("n1"), connect("n2", "short-session", 1, 30, 2), record(), 0);
        w.apply(&me("n1"), connect("n2", "back", 1, 30, 3600), record(), 0);
        m.on_heartbeat(hb("n2", 2), 0, now);
        assert!(w.due(&m, 1, now).is_empty());
        assert_eq!(w.due(&m, 1, now + 2000), vec![("short-session".to_string(), "n2".to_string(), 1)]);
        w.apply(&me("n1"), release_by("n2", "short-session", 1, "n1"), record(), 0);
        assert_eq!(w.won.len(), 1, "read back: this node publishes it");
        // The client connects again (anywhere, without a will) before the delay is out.
        w.apply(&me("n1"), Claim::new("n1", "back", 0, ClaimKind::Connect), record(), 0);
        let mut due: Vec<String> = w.due(&m, 1, now + 30_000).into_iter().map(|d| d.0).collect();
        due.sort();
        assert_eq!(due, vec!["slow".to_string()]);
    }

    #[test]
    fn a_lease_read_late_dates_the_oldest_pending_message_by_when_it_was_written() {
        let me1 = me("n1");
        let mut w = Wills::default();
        let lease = Claim { inc: 1, shards: 1, low: Some(500), ..Claim::new("n1", "lease/n1/0", 0, ClaimKind::Lease) };
        let written = Record {
            timestamp: Utc.timestamp_millis_opt(wall_ms() as i64 - 4_000).single().unwrap_or_default(),
            ..record()
        };
        w.apply(&me1, lease, written, 10_000);
        let (at, low) = w.floor.leases[&0];
        assert!((5_900..=6_100).contains(&at), "written about 4 s before it was read: {at}");
        assert_eq!(low, Some(500));
    }

    fn will_sent(owner: &str, client: &str, inc: u64, by: &str, by_inc: u64) -> Claim {
        Claim { inc, by: Some(by.into()), by_inc, ..Claim::new(owner, client, 0, ClaimKind::WillSent) }
    }

    #[test]
    fn a_will_whose_publisher_dies_before_saying_it_sent_it_is_released_and_published_again() {
        let (mut m, now) = members();
        m.on_heartbeat(hb("n3", 7), 5_000, now); // n3 (the will's node) was last heard of long ago
        let mut w = Wills::default();
        w.apply(&me("n1"), connect("n3", "c", 7, 0, 0), record(), 0);
        w.apply(&me("n1"), release_by("n3", "c", 7, "n2"), record(), now);
        assert!(w.won.is_empty(), "n2's release was read first: n2 publishes");
        assert!(w.due(&m, 1, now + RELEASE_RETRY_MS).is_empty(), "n2 is alive: it publishes, n1 waits");
        // n2 dies before its WillSent is read.
        let mut t = now;
        while m.get("n2").is_some_and(|n| n.state == MemberState::Alive) {
            t += 100;
            m.on_heartbeat(hb("n1", 1), 0, t);
            m.tick(t);
        }
        assert_eq!(w.due(&m, 1, t), vec![("c".to_string(), "n3".to_string(), 7)], "released again by n1");
        w.apply(&me("n1"), release_by("n3", "c", 7, "n1"), record(), t);
        assert_eq!(w.won.len(), 1, "n1 publishes it now");
        w.won.clear();
        assert!(w.due(&m, 1, t + 10).is_empty());
        // n1's own WillSent read back: the will is gone for good.
        w.apply(&me("n1"), will_sent("n3", "c", 7, "n1", 1), record(), t + 20);
        assert!(!w.by_client.contains_key("c"));
        assert!(w.due(&m, 1, t + 10 * RELEASE_RETRY_MS).is_empty() && w.won.is_empty());
    }

    #[test]
    fn a_won_will_whose_sent_record_is_not_read_back_is_published_again_and_a_restart_does_not_republish() {
        let (mut m, now) = members();
        m.on_heartbeat(hb("n3", 7), 5_000, now);
        let mut w = Wills::default();
        w.apply(&me("n1"), connect("n3", "c", 7, 0, 0), record(), 0);
        w.apply(&me("n1"), release_by("n3", "c", 7, "n1"), record(), now);
        assert_eq!(w.won.len(), 1);
        w.won.clear(); // published, but its WillSent never came back (Kafka did not take it)
        assert!(w.due(&m, 1, now + RELEASE_RETRY_MS - 1).is_empty() && w.won.is_empty());
        assert!(w.due(&m, 1, now + RELEASE_RETRY_MS).is_empty(), "not released again: published again");
        assert_eq!(w.won.len(), 1);

        // The same log read by n1 restarted as incarnation 2: its first incarnation's release
        // and WillSent are another node's; the will stays sent.
        let mut restarted = me("n1");
        restarted.incarnation = 2;
        let mut w = Wills::default();
        w.apply(&restarted, connect("n3", "c", 7, 0, 0), record(), 0);
        w.apply(&restarted, release_by("n3", "c", 7, "n1"), record(), 0);
        w.apply(&restarted, will_sent("n3", "c", 7, "n1", 1), record(), 0);
        assert!(w.won.is_empty(), "the first incarnation's win is not the restarted node's");
        assert!(!w.by_client.contains_key("c"));
        // Without the WillSent (the first incarnation died before it): released again.
        let mut w = Wills::default();
        w.apply(&restarted, connect("n3", "c", 7, 0, 0), record(), 0);
        w.apply(&restarted, release_by("n3", "c", 7, "n1"), record(), 0);
        assert!(w.won.is_empty());
        m.on_heartbeat(hb("n1", 2), 0, now + 1);
        assert_eq!(w.due(&m, 2, now + 1), vec![("c".to_string(), "n3".to_string(), 7)]);
    }

    #[test]
    fn only_the_lowest_surviving_node_releases_and_a_release_by_an_older_incarnation_is_ignored() {
        let (mut m, now) = members();
        m.on_heartbeat(hb("n0", 1), 0, now);
        m.on_heartbeat(hb("n2", 2), 0, now);
        let mut w = Wills::default();
        w.apply(&me("n1"), connect("n2", "c", 1, 0, 0), record(), 0);
        assert!(w.due(&m, 1, now).is_empty(), "n0 publishes, not n1");
        // n2's own release, but of a newer incarnation than the will's: not this will's.
        w.apply(&me("n1"), Claim { inc: 2, ..Claim::new("n2", "c", 0, ClaimKind::Release) }, record(), 0);
        assert!(w.by_client.contains_key("c"));
    }
}
