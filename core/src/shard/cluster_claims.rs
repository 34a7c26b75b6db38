//! Takeover between cluster nodes: this node's claims of the client ids it serves, and what it
//! does with other nodes' claims (see `crate::cluster::Claim`).
//!
//! - A connection answered with CONNACK makes a claim (a record in the cluster's sessions
//!   topic, through this shard's producers) and waits, *unconfirmed*, until the node reads it
//!   back. A connection still unconfirmed after `confirm_ms` is closed (0x89, server busy): a node that
//!   cannot reach Kafka does not keep serving a client id it cannot claim.
//! - Another node's claim for a client hosted here: if this shard's connection of that client
//!   is confirmed, the other claim is later in the log — the client connected there since — so
//!   the connection here closes with 0x8E and its session ends here (it goes on over there).
//!   If it is unconfirmed, the other claim is earlier, and is ignored. An offline session here
//!   ends too.
//!
//! - A CONNECT with clean start off for a client whose persistent session another node holds
//!   (as this client id's directory shard read from the claims) claims at once and waits for
//!   that node's handover before CONNACK (at most `dead_after_ms` + [`HANDOVER_WAIT_EXTRA_MS`]:
//!   a dead holder's session is rebuilt from the log meanwhile, see `crate::adoption`); messages routed
//!   here meanwhile are kept (≤ [`RECENT_MAX`]) and queued for the session it brings.
//!
//! - A persistent session's subscriptions ([`ClaimKind::Session`]) are written at once, on
//!   every change: the client has its SUBACK, so a node killed before the record reaches
//!   Kafka must lose at most that round trip, never a heartbeat of changes (held back to the
//!   next lease, a kill within the heartbeat left the survivors an old record to rebuild the
//!   session from) — one record per session on its way at a time, though: changes while one
//!   is unanswered go as one record with its answer (`super::session_records`). A shared-subscription group's member count on this node
//!   ([`ClaimKind::Share`]) is coalesced instead: its first member and its last go at once,
//!   a new count in between with the next lease (every `heartbeat_ms`), with the count then —
//!   the count only weighs how the nodes split a group's messages, and a client that joins
//!   and leaves without pause costs a record a heartbeat, not one per packet.
//!
//! Every node reads one client id's claims in one order (one partition), so of two nodes
//! serving one client id at once, exactly one keeps it, once both read both claims.
//! Invariant: `unconfirmed` holds at most one entry per connection of this shard; `deadlines`
//! holds each at most once; `awaiting` holds at most one connection per client id, and
//! `recent` holds, in a cluster, the messages routed in the last [`RECENT_LOOKBACK_MS`] and
//! since the earliest waiting connection's lookback began (≤ [`RECENT_MAX`] messages and
//! [`RECENT_BYTES_MAX`] payload bytes), and `recent_bytes` is the sum of their payloads;
//! `shares_dirty` holds at most [`DIRTY_MAX`] groups; `leases_seen` holds at most
//! [`crate::cluster::MEMBERS_MAX`] nodes.

use std::ops::Range;

use super::session_records::SessionRecords;
use super::stats::ClusterStats;
use super::*;
use crate::bridge::ClaimsNode;
use crate::cluster::{Claim, ClaimKind, HandoverTo, LOW_UNKNOWN};
use crate::packet::Will;

#[derive(Default)]
pub(super) struct ClusterClaims {
    /// This node, its incarnation and how long a claim may stay unconfirmed; `None`: not in a
    /// cluster.
    node: Option<ClaimsNode>,
    /// Connections whose claim was not read back yet, with their CONNECT's clean start.
    unconfirmed: HashMap<ConnId, bool>,
    /// (deadline, connection, retried), in deadline order: at the first deadline (half the
    /// confirmation time) an unconfirmed claim is made again, at the second the connection goes.
    deadlines: VecDeque<(u64, ConnId, bool)>,
    /// Connections closed because another node took their client over.
    pub(super) taken_over: u64,
    /// Connections closed because their claim was not confirmed in time.
    pub(super) unconfirmed_closed: u64,
    /// Persistent sessions sent to the node that took their client over, and received.
    pub(super) handed_over: u64,
    pub(super) taken_over_in: u64,
    /// Handovers sent without their messages (too large for one record).
    pub(super) handover_truncated: u64,
    /// Shared-subscription groups owned by this shard (by share key) that other nodes have
    /// members of, with their member counts (see [`RemoteShare`]). At most
    /// [`SHARE_KEYS_MAX`] keys.
    remote_shares: HashMap<String, RemoteShare>,
    /// Share records beyond [`SHARE_KEYS_MAX`], not kept.
    pub(super) shares_refused: u64,
    /// The incarnation of each other node whose lease this shard read (≤
    /// [`crate::cluster::MEMBERS_MAX`]): a new one is a node that started since.
    leases_seen: HashMap<Arc<str>, u64>,
    /// Messages delivered again because the node they were left to had lost its last member
    /// of the group (see [`Shard::redeliver_left_share`]).
    pub(super) share_redelivered: u64,
    /// Groups owned here whose member count on this node differs from the one it announced:
    /// one record each goes with the next lease (`Shard::flush_records`). ≤ [`DIRTY_MAX`].
    pub(super) shares_dirty: HashSet<String>,
    /// Session and Share records written; changes that joined a record already due or on its
    /// way (the records coalescing saved); flushes before the lease because a set was full.
    pub(super) state_records: u64,
    pub(super) state_coalesced: u64,
    pub(super) state_flushed_early: u64,
    /// Fencing (`ClusterConfig::fence`): how often this shard writes its lease, when it next
    /// does, when it last read its own back (`None`: not yet), and whether it is cut off now.
    lease_ms: Option<u64>,
    lease_next_ms: u64,
    /// When this shard next writes its groups' Share records again (see
    /// [`SHARE_REANNOUNCE_MS`]).
    reannounce_next_ms: u64,
    lease_seen_ms: Option<u64>,
    started_ms: Option<u64>,
    pub(super) fenced: bool,
    /// Connections closed because the shard was cut off from Kafka.
    pub(super) fenced_closed: u64,
    /// The last walk over the sessions for the lease's `low`: when, and what it found (see
    /// [`Shard::lease_low`]).
    low_walk: Option<(u64, Option<u64>)>,
    /// Client ids whose directory is this shard and whose persistent session another node
    /// holds, as the latest claim read says (≤ [`REMOTE_SESSIONS_MAX`]; the node names shared
    /// through `node_names`): a CONNECT with clean start off waits for that node's handover.
    remote_sessions: HashMap<ClientId, Arc<str>>,
    node_names: Vec<Arc<str>>,
    /// Claims not kept in `remote_sessions` because it was full.
    pub(super) remote_sessions_refused: u64,
    /// Connections of this shard whose CONNACK waits for a handover, by client id (the
    /// directory carries out one claim per client id at a time, so at most one each).
    awaiting: HashMap<ClientId, Awaiting>,
    /// Connections claimed before their CONNACK (while awaiting): not claimed again after it.
    early: HashSet<ConnId>,
    /// Messages routed on this shard (when), numbered from `recent_base`: the last
    /// [`RECENT_LOOKBACK_MS`] of them, and while connections await a handover, since the
    /// lookback of the earliest began (≤ [`RECENT_MAX`]). Those a handed-over session's
    /// subscriptions match are queued for it: the old node stopped queueing when it read the
    /// claim, the new one starts when the handover arrives.
    recent: VecDeque<(u64, Msg)>,
    recent_base: u64,
    /// Payload bytes in `recent` (≤ [`RECENT_BYTES_MAX`]).
    recent_bytes: usize,
    /// The earliest `since` of the connections in `awaiting` (`None`: none waits): kept here,
    /// not looked up per routed message.
    recent_keep_from: Option<u64>,
    /// Handovers awaited in vain (CONNACK then says no session), and awaited ones whose start
    /// had already left `recent` (messages in between may be missing).
    pub(super) handover_timeouts: u64,
    pub(super) handover_gap_lost: u64,
    /// Persistent sessions' `Session` records on their way to Kafka, one per session at a time.
    pub(super) session_records: SessionRecords,
}

/// A connection whose CONNACK waits for another node's handover of its session.
struct Awaiting {
    conn: ConnId,
    /// Where in `recent` it began to wait, and when.
    since: u64,
    since_ms: u64,
    deadline_ms: u64,
    /// The session expiry its CONNECT asks for (for its claim), and the node asked.
    expiry: u32,
    from: Arc<str>,
}

/// Client ids whose session another node holds, kept per directory shard, at most: about 80
/// bytes each. Beyond it a moving session still moves, but CONNACK says no session (counted).
pub(super) const REMOTE_SESSIONS_MAX: usize = 1_000_000;
/// Sessions a shard walks per lease for its `low`: with more, it walks every
/// `sessions / LOW_WALK_SESSIONS` leases (the floor it gives is older by as much).
pub(super) const LOW_WALK_SESSIONS: usize = 50_000;
/// How far back the messages queued for a handed-over session go from when its connection
/// began to wait: the old node may read the claim (and stop queueing) after it routed
/// messages this node routed before the wait began (its feed lagging behind this one's).
pub(super) const RECENT_LOOKBACK_MS: u64 = 1_000;
/// Payload bytes of the messages kept in `recent`, at most, per shard.
pub(super) const RECENT_BYTES_MAX: usize = 16 << 20;
/// Messages kept for connections awaiting a handover, at most, per shard.
pub(super) const RECENT_MAX: usize = 65_536;
/// How long a CONNACK waits for a handover beyond `dead_after_ms`: when the holder is dead, the
/// others declare it so after `dead_after_ms` and this node rebuilds the session from the log
/// (`sluice-kafka`'s membership), within this.
pub(super) const HANDOVER_WAIT_EXTRA_MS: u64 = 5_000;

/// Shared-subscription groups with members on other nodes a shard keeps, at most; a group
/// beyond it is delivered by every node that has members (counted in `shares_refused`).
pub(super) const SHARE_KEYS_MAX: usize = 100_000;

/// Nodes with members of a group and their member counts, sorted by node.
type ShareWeights = Vec<(Arc<str>, u32)>;

/// The other nodes with members of one group, as this node read them.
#[derive(Default)]
struct RemoteShare {
    /// Those nodes, sorted, with their member counts as their latest record says (at least 1).
    nodes: ShareWeights,
    /// `nodes` before the last change, and until when it still counts: the other nodes read
    /// that change at other times, so for a while some of them pick by the old view.
    before: Option<(ShareWeights, u64)>,
}

/// Groups whose Share record waits for the next lease, at most per shard.
/// Nothing is dropped when full: the set is written out at once (counted in
/// `state_flushed_early`), so a record is early, never lost.
pub(super) const DIRTY_MAX: usize = 100_000;

impl ClusterClaims {
    /// `node` has `members` of group `key` (`active`; 0 from a node that does not say: one),
    /// or none any more; read at `now_ms`. The view it replaces stays in force beside the new
    /// one for [`share_grace_ms`](Self::share_grace_ms) (see [`RemoteShare`]).
    fn remote_share(&mut self, key: &str, node: &str, active: bool, members: u32, now_ms: u64) {
        let until = now_ms + self.share_grace_ms();
        if active {
            if !self.remote_shares.contains_key(key) && self.remote_shares.len() >= SHARE_KEYS_MAX {
                self.shares_refused += 1;
                return;
            }
            let share = self.remote_shares.entry(key.to_string()).or_default();
            let weight = members.max(1);
            let found = share.nodes.binary_search_by(|(n, _)| (**n).cmp(node));
            if found.is_ok_and(|i| share.nodes[i].1 == weight) {
                return;
            }
            share.before = Some((share.nodes.clone(), until));
            match found {
                Ok(i) => share.nodes[i].1 = weight,
                Err(i) => share.nodes.insert(i, (node.into(), weight)),
            }
        } else if let Some(share) = self.remote_shares.get_mut(key) {
            let before = share.nodes.clone();
            share.nodes.retain(|(n, _)| **n != *node);
            if share.nodes.len() != before.len() {
                share.before = Some((before, until));
            }
            // With no other node's members left this node delivers everything (the union of
            // every view): the entry can go.
            if share.nodes.is_empty() {
                self.remote_shares.remove(key);
            }
        }
    }

    /// How long a view of a group's member counts that was replaced stays in force beside the
    /// new one: a heartbeat and a second, the time a record takes to reach every node (as the
    /// floor's margin).
    pub(super) fn share_grace_ms(&self) -> u64 {
        self.lease_ms.unwrap_or(0) + 1_000
    }

    /// Whether this node delivers `msg` to its members of group `key` at `now_ms` (see
    /// [`crate::cluster::share_node`]), weighing this node by `announced`, the member count it
    /// last wrote — what the others weigh it by once they read it, not the count now — and at
    /// least 1 (it has members). Always outside a cluster or when no other node has members.
    ///
    /// While a view was replaced less than [`share_grace_ms`](Self::share_grace_ms) ago — the
    /// other nodes' counts (`RemoteShare::before`) or this node's own (`announced_before`,
    /// the count it wrote before, with when that stops counting) — this node delivers what
    /// any combination of the old and new views gives it. A node that has not read the change
    /// yet delivers by the old view, one that has by the new, so a message the two views give
    /// to different nodes reaches the group twice rather than not at all.
    pub(super) fn share_mine(
        &self,
        key: &str,
        announced: u32,
        announced_before: Option<(u32, u64)>,
        msg: &Message,
        now_ms: u64,
    ) -> bool {
        let (Some(ClaimsNode { node: me, .. }), Some(share)) = (&self.node, self.remote_shares.get(key)) else {
            return true;
        };
        let others_before = share.before.as_ref().filter(|(_, until)| now_ms < *until).map(|(v, _)| v);
        if others_before.is_some_and(|v| v.is_empty()) {
            // Before, no other node had members: this one delivered everything.
            return true;
        }
        // A count of 0 before: this node was in no one's view, so that view gives it nothing.
        let mine_before = announced_before.filter(|&(n, until)| n > 0 && now_ms < until).map(|(n, _)| n);
        let h = crate::cluster::share_hash(&msg.topic, &msg.payload);
        for others in std::iter::once(&share.nodes).chain(others_before) {
            for mine in std::iter::once(announced.max(1)).chain(mine_before) {
                if pick_in_view(h, others, me, mine) == Some(&**me) {
                    return true;
                }
            }
        }
        false
    }
}

/// The node [`crate::cluster::share_pick`] gives hash `h` in the view of the other nodes
/// `others` with this node (`me`) counted `mine` members, put in its place by name: walked in
/// place, no vector per message.
fn pick_in_view<'a>(h: u64, others: &'a ShareWeights, me: &'a str, mine: u32) -> Option<&'a str> {
    let at = others.partition_point(|(n, _)| &**n < me);
    let after = at + usize::from(others.get(at).is_some_and(|(n, _)| &**n == me));
    let view = others[..at]
        .iter()
        .map(|(n, w)| (&**n, *w))
        .chain(std::iter::once((me, mine)))
        .chain(others[after..].iter().map(|(n, w)| (&**n, *w)));
    crate::cluster::share_pick(h, view)
}

/// How long before a node's last member of a group left (its clock) the messages this node
/// routed count as possibly lost there (see [`Shard::redeliver_left_share`]): how far the
/// other node's feed may lag behind this one's, with the two clocks' skew.
pub(super) const SHARE_LEFT_MARGIN_MS: u64 = 500;

/// How often a shard writes the Share records of its groups again, unchanged. A node that
/// started later hears them at its first lease that says it reads, but its readers of other
/// partitions of the topic may come up after that lease (and a record can be missed in other
/// ways): this bounds how long such a node lacks a group — and delivers its messages a second
/// time — to about a minute. It costs one record per group and shard a minute.
pub(super) const SHARE_REANNOUNCE_MS: u64 = 60_000;

impl ClusterClaims {
    /// Whether this is the first lease read of `node`'s run `inc` that says it reads (at most
    /// [`crate::cluster::MEMBERS_MAX`] nodes are kept; beyond, none counts as new).
    fn first_lease_of(&mut self, node: &str, inc: u64) -> bool {
        let full = self.leases_seen.len() >= crate::cluster::MEMBERS_MAX;
        match self.leases_seen.get_mut(node) {
            Some(seen) if *seen == inc => false,
            Some(seen) => {
                *seen = inc;
                true
            }
            None if !full => {
                self.leases_seen.insert(node.into(), inc);
                true
            }
            None => false,
        }
    }

    /// The other nodes' member counts of group `key` as this node weighs them now, if `node`
    /// is among them.
    fn view_with(&self, key: &str, node: &str) -> Option<ShareWeights> {
        let share = self.remote_shares.get(key)?;
        share.nodes.iter().any(|(n, _)| **n == *node).then(|| share.nodes.clone())
    }

    /// The messages routed here at or after `from_ms` (as far back as `recent` goes).
    fn recent_routed_from(&self, from_ms: u64) -> impl Iterator<Item = &Msg> {
        let start = self.recent.partition_point(|(t, _)| *t < from_ms);
        self.recent.range(start..).map(|(_, m)| m)
    }

    pub(super) fn new(node: Option<ClaimsNode>, lease_ms: Option<u64>) -> Self {
        ClusterClaims { node, lease_ms, ..Default::default() }
    }

    /// The node that holds `id`'s persistent session, if another one does (as far as this
    /// node, the directory of `id`, has read).
    pub(super) fn remote_holder(&self, id: &str) -> Option<Arc<str>> {
        self.node.as_ref()?;
        self.remote_sessions.get(id).cloned()
    }

    /// `id`'s latest claim is by `holder` with a persistent session, or by nobody else.
    fn note_remote(&mut self, id: &str, holder: Option<&str>) {
        let Some(holder) = holder else {
            self.remote_sessions.remove(id);
            return;
        };
        if !self.remote_sessions.contains_key(id) && self.remote_sessions.len() >= REMOTE_SESSIONS_MAX {
            self.remote_sessions_refused += 1;
            return;
        }
        let name = match self.node_names.iter().find(|n| ***n == *holder) {
            Some(n) => n.clone(),
            None => {
                let n: Arc<str> = holder.into();
                self.node_names.push(n.clone());
                n
            }
        };
        self.remote_sessions.insert(id.into(), name);
    }

    pub(super) fn stats(&self) -> ClusterStats {
        ClusterStats {
            taken_over: self.taken_over,
            unconfirmed_closed: self.unconfirmed_closed,
            fenced_closed: self.fenced_closed,
            handed_over: self.handed_over,
            taken_over_in: self.taken_over_in,
            handover_truncated: self.handover_truncated,
            handover_timeouts: self.handover_timeouts,
            handover_gap_lost: self.handover_gap_lost,
            remote_sessions: self.remote_sessions.len() as u64,
            remote_sessions_refused: self.remote_sessions_refused,
            shares_refused: self.shares_refused,
            state_records: self.state_records,
            state_coalesced: self.state_coalesced,
            state_flushed_early: self.state_flushed_early,
            state_failed: self.session_records.failed,
            state_stale: self.session_records.stale,
            session_records_in_flight: self.session_records.len() as u64,
            share_redelivered: self.share_redelivered,
        }
    }

    /// Whether `conn` was claimed before its CONNACK (see `early`); forgets it.
    pub(super) fn claimed_before_connack(&mut self, conn: ConnId) -> bool {
        self.early.remove(&conn)
    }

    /// A message routed on this shard (in a cluster): kept for [`RECENT_LOOKBACK_MS`], and
    /// while a connection awaits a handover.
    pub(super) fn remember(&mut self, msg: &Msg, now_ms: u64) {
        if self.node.is_none() {
            return;
        }
        while self.recent.len() >= RECENT_MAX || self.recent_bytes + msg.payload.len() > RECENT_BYTES_MAX {
            let Some((_, m)) = self.recent.pop_front() else { break };
            self.recent_bytes -= m.payload.len();
            self.recent_base += 1;
        }
        self.recent_bytes += msg.payload.len();
        self.recent.push_back((now_ms, msg.clone()));
        self.trim_recent(now_ms);
    }

    /// Drops what no awaiting connection needs any more and is older than the lookback.
    fn trim_recent(&mut self, now_ms: u64) {
        let keep_from = self.recent_keep_from.unwrap_or(u64::MAX);
        let old = now_ms.saturating_sub(RECENT_LOOKBACK_MS);
        while self.recent_base < keep_from && self.recent.front().is_some_and(|(t, _)| *t < old) {
            if let Some((_, m)) = self.recent.pop_front() {
                self.recent_bytes -= m.payload.len();
            }
            self.recent_base += 1;
        }
    }

    /// Where in `recent` a wait that begins now starts: at the lookback.
    fn recent_since(&self, now_ms: u64) -> u64 {
        let old = now_ms.saturating_sub(RECENT_LOOKBACK_MS);
        self.recent_base + self.recent.iter().take_while(|(t, _)| *t < old).count() as u64
    }
}

impl Shard {
    /// A connection of `client_id` was accepted: claim it for this node, with its will.
    pub(super) fn claim_session(&mut self, conn: ConnId, client_id: &ClientId, clean: bool, now_ms: u64) {
        let Some(confirm_ms) = self.claims.node.as_ref().map(|n| n.confirm_ms) else { return };
        let will = self.conns.get(&conn).and_then(|c| c.will.as_deref().cloned());
        self.write_claim(conn, client_id, clean, ClaimKind::Connect, will, now_ms);
        if self.claims.unconfirmed.insert(conn, clean).is_none() {
            self.claims.deadlines.push_back((now_ms + confirm_ms / 2, conn, false));
        }
    }

    /// The client's connection here ended and no will of it is pending: the others need not
    /// publish one should this node die.
    pub(super) fn release_claim(&mut self, conn: ConnId, client_id: &ClientId, now_ms: u64) {
        if self.claims.node.is_some() {
            self.write_claim(conn, client_id, false, ClaimKind::Release, None, now_ms);
        }
    }

    fn write_claim(
        &mut self,
        conn: ConnId,
        client_id: &ClientId,
        clean: bool,
        kind: ClaimKind,
        will: Option<Will>,
        now_ms: u64,
    ) {
        let Some(me) = &self.claims.node else { return };
        let awaiting = self.claims.awaiting.get(client_id).filter(|a| a.conn == conn);
        let expiry = match self.sessions.get(client_id) {
            Some(s) => s.expiry_secs,
            None => awaiting.map_or(0, |a| a.expiry),
        };
        let from = awaiting.filter(|_| kind == ClaimKind::Connect).map(|a| a.from.to_string());
        let claim = Claim {
            from,
            conn,
            clean,
            will: will.is_some(),
            inc: me.incarnation,
            will_delay: will.as_ref().and_then(|w| w.properties.will_delay_interval).unwrap_or(0),
            expiry,
            ..Claim::new(&me.node, client_id, self.id, kind)
        };
        // The record is the will itself (the others publish it as it is should this node die),
        // or an empty message on the claim topic.
        match will {
            Some(w) => {
                let mut properties = w.properties;
                properties.will_delay_interval = None;
                properties.message_expiry_interval = None;
                let msg = Message {
                    topic: w.topic,
                    payload: w.payload,
                    qos: w.qos,
                    retain: w.retain,
                    properties: properties.boxed(),
                    expiry_at_ms: None,
                    origin: client_id.clone(),
                };
                let wall = self.wall_offset_ms + now_ms as i64;
                self.outbox.bridge_claim(&Arc::new(msg), claim.encode().into(), wall, &mut self.effects.produce);
            }
            None => {
                self.send_claim(&claim, client_id.clone(), Bytes::new(), 0, now_ms);
            }
        }
    }

    /// `claim` as a record of the claims mapping: key `key`, value `value`, QoS `qos` (1: by
    /// the spill log through an outage).
    /// Hands `claim` to the producers; the record ids it went out as.
    fn send_claim(&mut self, claim: &Claim, key: ClientId, value: Bytes, qos: u8, now_ms: u64) -> Range<u64> {
        let msg = Message {
            topic: crate::cluster::CLAIM_TOPIC.into(),
            payload: value,
            qos,
            retain: false,
            properties: None,
            expiry_at_ms: None,
            origin: key,
        };
        let wall = self.wall_offset_ms + now_ms as i64;
        self.outbox.bridge_claim(&Arc::new(msg), claim.encode().into(), wall, &mut self.effects.produce)
    }

    /// The members of shared-subscription group `key` on this node changed (`had`: it had some
    /// before): the other nodes hear it (see [`ClaimKind::Share`]). Its first member and its
    /// last at once — until the others read it, they leave messages to a node that has no
    /// members or deliver what this one does — and a new count with the next lease, with the
    /// count then (a client that joins and leaves without pause costs a record a heartbeat).
    pub(super) fn share_members_changed(&mut self, key: &str, had: bool, now_ms: u64) {
        if self.claims.node.is_none() {
            return;
        }
        let n = u32::try_from(self.shared.members(key)).unwrap_or(u32::MAX);
        if had != (n > 0) {
            self.claims.shares_dirty.remove(key);
            self.announce_share(key, n, now_ms);
        } else if n > 0 && n != self.shared.announced(key) {
            if self.claims.shares_dirty.contains(key) {
                self.claims.state_coalesced += 1;
                return;
            }
            if self.claims.shares_dirty.len() >= DIRTY_MAX {
                self.claims.state_flushed_early += 1;
                self.flush_shares(now_ms);
            }
            self.claims.shares_dirty.insert(key.to_string());
        }
    }

    /// Node `gone`'s last member of group `key` left at `at_ms` (its clock; 0: not said), and
    /// `old` is how this node weighed the other nodes until it read so. Until the others read
    /// it, they left to `gone` the messages their views gave it, and `gone` had no one to give
    /// them to: of the messages routed here since (less [`SHARE_LEFT_MARGIN_MS`]; all that
    /// `recent` holds, its last [`RECENT_LOOKBACK_MS`], when not said), those `old` gave to
    /// `gone` and the view now gives to this node go to its members now. Every node does the
    /// same with the same views, so each such message is delivered once more, by one node;
    /// one `gone` delivered within the margin before its member left arrives twice.
    fn redeliver_left_share(&mut self, key: &str, gone: &str, old: &ShareWeights, at_ms: u64, now_ms: u64) {
        if self.shared.members(key) == 0 {
            return;
        }
        let (Some(me), Some((_, filter))) = (self.claims.node.as_ref().map(|n| n.node.clone()), key.split_once('/'))
        else {
            return;
        };
        let mine = self.shared.announced(key).max(1);
        let now: ShareWeights = self.claims.remote_shares.get(key).map(|s| s.nodes.clone()).unwrap_or_default();
        let from_ms = match at_ms {
            0 => now_ms.saturating_sub(RECENT_LOOKBACK_MS),
            at => u64::try_from(at as i64 - self.wall_offset_ms).unwrap_or(0).saturating_sub(SHARE_LEFT_MARGIN_MS),
        };
        let lost: Vec<Msg> = self
            .claims
            .recent_routed_from(from_ms)
            .filter(|m| topic::matches(filter, &m.topic))
            .filter(|m| {
                let h = crate::cluster::share_hash(&m.topic, &m.payload);
                pick_in_view(h, old, &me, mine) == Some(gone) && pick_in_view(h, &now, &me, mine) == Some(&*me)
            })
            .cloned()
            .collect();
        for msg in lost {
            self.claims.share_redelivered += 1;
            let mut picks = Vec::new();
            let (sessions, conns, limits, here) = (&self.sessions, &self.conns, &self.limits, self.id);
            self.shared.pick(
                &msg.topic,
                |k, _, _| k == key,
                |m| (m.shard == here).then(|| member_busy(sessions, conns, limits, &m.client_id)).flatten(),
                &mut picks,
            );
            self.deliver_picks(picks, &msg, &mut Routing::default(), now_ms);
        }
    }

    /// This node has `members` of shared-subscription group `key` from now on (0: none any
    /// more): a [`ClaimKind::Share`] record.
    fn announce_share(&mut self, key: &str, members: u32, now_ms: u64) {
        let Some(me) = &self.claims.node else { return };
        let at_ms = if members == 0 { u64::try_from(self.wall_offset_ms + now_ms as i64).unwrap_or(0) } else { 0 };
        let claim = Claim {
            active: members > 0,
            members,
            inc: me.incarnation,
            at_ms,
            ..Claim::new(&me.node, key, self.id, ClaimKind::Share)
        };
        // The record's key: one per (group, node) in the compacted topic.
        let record_key = format!("{key}\u{1}{}", me.node).into();
        self.send_claim(&claim, record_key, Bytes::new(), 1, now_ms);
        self.claims.state_records += 1;
        let until = now_ms + self.claims.share_grace_ms();
        self.shared.set_announced(key, members, until);
    }

    /// Every group owned here that has members on this node, its Share record again (with its
    /// count now).
    fn reannounce_shares(&mut self, now_ms: u64) {
        for (key, members) in self.shared.announced_groups() {
            let n = u32::try_from(members).unwrap_or(u32::MAX);
            if n > 0 {
                self.claims.shares_dirty.remove(&key);
                self.announce_share(&key, n, now_ms);
            }
        }
    }

    /// The records that wait for the lease (see the module doc), with the state now.
    pub(super) fn flush_records(&mut self, now_ms: u64) {
        self.flush_shares(now_ms);
        let mut due = Vec::new();
        self.claims.session_records.due(now_ms, &mut due);
        for client in due {
            self.write_session_record(&client, now_ms);
        }
    }

    fn flush_shares(&mut self, now_ms: u64) {
        let mut dirty = std::mem::take(&mut self.claims.shares_dirty);
        for key in dirty.drain() {
            // A group whose last member left since said so at once.
            let n = u32::try_from(self.shared.members(&key)).unwrap_or(u32::MAX);
            if n > 0 && n != self.shared.announced(&key) {
                self.announce_share(&key, n, now_ms);
            }
        }
        // Its allocation kept (nothing was marked meanwhile: announcing marks nothing).
        self.claims.shares_dirty = dirty;
    }

    /// "confirmed" or "unconfirmed" for a connection in a cluster; `None` outside one.
    pub(super) fn claim_state(&self, conn: ConnId) -> Option<&'static str> {
        self.claims.node.as_ref()?;
        Some(if self.claims.unconfirmed.contains_key(&conn) { "unconfirmed" } else { "confirmed" })
    }

    /// A claim read from the cluster's sessions topic (see the module doc): the claim's JSON,
    /// a newline, the record's value.
    pub(super) fn on_cluster_claim(&mut self, payload: &[u8], now_ms: u64) {
        let Some(me) = self.claims.node.clone() else { return };
        let node = &me.node;
        let (json, value) = match payload.iter().position(|b| *b == b'\n') {
            Some(i) => (&payload[..i], &payload[i + 1..]),
            None => (payload, &[][..]),
        };
        let Some(claim) = Claim::decode(json) else { return };
        match claim.kind {
            // For the survivors' tables of wills and sessions (`sluice-kafka`).
            ClaimKind::Release | ClaimKind::Session | ClaimKind::WillSent => return,
            ClaimKind::Handover => {
                if claim.to.as_ref().is_some_and(|t| t.node == **node && t.shard == self.id) {
                    self.take_handover(&claim, value, now_ms);
                }
                return;
            }
            ClaimKind::Lease => {
                if claim.node == **node && claim.shard == self.id && claim.inc == me.incarnation {
                    self.claims.lease_seen_ms = Some(now_ms);
                    if std::mem::take(&mut self.claims.fenced) {
                        self.effects.warnings.push(format!(
                            "cluster: shard {} reads its lease from Kafka again: accepting clients",
                            self.id
                        ));
                    }
                } else if claim.node != **node && claim.reading && self.claims.first_lease_of(&claim.node, claim.inc) {
                    // A node (or a new run of one) that started after this shard's Share records:
                    // its readers began at the end of the topic, so once they are in place (its
                    // first lease that says so) it hears them again.
                    self.reannounce_shares(now_ms);
                }
                return;
            }
            ClaimKind::Share => {
                if claim.node != **node && shard_of(&claim.client, self.n_shards) == self.id {
                    let left = if claim.active { None } else { self.claims.view_with(&claim.client, &claim.node) };
                    self.claims.remote_share(&claim.client, &claim.node, claim.active, claim.members, now_ms);
                    if let Some(old) = left {
                        self.redeliver_left_share(&claim.client, &claim.node, &old, claim.at_ms, now_ms);
                    }
                }
                return;
            }
            ClaimKind::Connect => {}
        }
        if directory_shard(&claim.client, self.n_shards) == self.id {
            let holder = (claim.node != **node && claim.expiry > 0).then_some(claim.node.as_str());
            self.claims.note_remote(&claim.client, holder);
        }
        if claim.node == **node {
            // A claim of an earlier run of this node (read after a restart) is of a connection
            // that is gone: its connection id may be a new connection's now.
            if claim.shard == self.id && claim.inc == me.incarnation {
                self.claims.unconfirmed.remove(&claim.conn);
            }
            return;
        }
        if let Some(a) = self.claims.awaiting.get(claim.client.as_str()) {
            if !self.claims.unconfirmed.contains_key(&a.conn) {
                // The client connected elsewhere after this connection's claim, before its
                // CONNACK: it never gets one.
                let conn = a.conn;
                self.claims.taken_over += 1;
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.will = None;
                }
                self.close(conn, None, now_ms);
                let id = self.awaiting_client_id(&claim.client);
                self.finish_handover(&id, None, now_ms);
                return;
            }
        }
        let Some(s) = self.sessions.get_mut(claim.client.as_str()) else {
            // Asked for a session this node does not have: say so at once (the directory
            // shard answers when no shard here hosts it).
            let asked = claim.from.as_deref() == Some(&**node) && !claim.clean;
            if asked && directory_shard(&claim.client, self.n_shards) == self.id && !self.directory.knows(&claim.client)
            {
                self.send_handover(&claim, Vec::new(), now_ms);
            }
            return;
        };
        match s.conn {
            Some(conn) if self.claims.unconfirmed.contains_key(&conn) => {}
            Some(conn) => {
                // The session goes on over there: it ends here, with the will the MQTT 5 rules
                // of a takeover give (held back if the session continues and it has a delay).
                self.hand_over(&claim, now_ms);
                let Some(s) = self.sessions.get_mut(claim.client.as_str()) else { return };
                s.expiry_secs = 0;
                if let Some(c) = self.conns.get_mut(&conn) {
                    if !claim.clean
                        && c.will.as_ref().is_some_and(|w| w.properties.will_delay_interval.unwrap_or(0) > 0)
                    {
                        c.will = None;
                    }
                }
                self.claims.taken_over += 1;
                self.close_why(
                    conn,
                    Some(reason::SESSION_TAKEN_OVER),
                    Some("the client connected to another node"),
                    now_ms,
                );
            }
            None => {
                if !claim.clean {
                    s.pending_will = None;
                }
                self.hand_over(&claim, now_ms);
                if let Some(s) = self.sessions.remove(claim.client.as_str()) {
                    self.end_session(s, now_ms);
                }
            }
        }
    }

    /// A claim by another node that continues a persistent session hosted here (clean start
    /// off): the session's stored form goes to the claiming connection (see
    /// [`ClaimKind::Handover`]); an empty one when the claimer asked this node and there is no
    /// session to give.
    fn hand_over(&mut self, claim: &Claim, now_ms: u64) {
        let Some(s) = self.sessions.get(claim.client.as_str()) else { return };
        let asked = self.claims.node.as_ref().is_some_and(|me| claim.from.as_deref() == Some(&*me.node));
        if claim.clean || s.expiry_secs == 0 {
            if asked && !claim.clean {
                self.send_handover(claim, Vec::new(), now_ms);
            }
            return;
        }
        let mut bytes = Vec::new();
        s.encode(self.wall_offset_ms, &mut bytes);
        if bytes.len() > crate::cluster::HANDOVER_MAX_BYTES {
            // Subscriptions only: the messages do not fit one record.
            bytes.clear();
            s.encode_subscriptions(self.wall_offset_ms, &mut bytes);
            self.claims.handover_truncated += 1;
        }
        self.send_handover(claim, bytes, now_ms);
        self.claims.handed_over += 1;
    }

    /// A handover record for the connection `claim` names: `session` in its stored form, or
    /// empty for "no session here".
    fn send_handover(&mut self, claim: &Claim, session: Vec<u8>, now_ms: u64) {
        let Some(me) = &self.claims.node else { return };
        let to = HandoverTo { node: claim.node.clone(), shard: claim.shard, conn: claim.conn };
        let handover = Claim {
            to: Some(to),
            inc: me.incarnation,
            ..Claim::new(&me.node, &claim.client, self.id, ClaimKind::Handover)
        };
        // QoS 1: by the spill log through an outage, like an acknowledged publish.
        let key: ClientId = claim.client.as_str().into();
        self.send_claim(&handover, key, session.into(), 1, now_ms);
    }

    /// The client id as the awaiting table holds it (the allocation the connection shares), or
    /// a new one.
    fn awaiting_client_id(&self, id: &str) -> ClientId {
        match self.claims.awaiting.get_key_value(id) {
            Some((k, _)) => k.clone(),
            None => id.into(),
        }
    }

    /// A CONNECT with clean start off, for a client whose session `holder` (another node) has:
    /// claims the client id now and holds the CONNACK until the handover arrives (or
    /// `dead_after_ms` + [`HANDOVER_WAIT_EXTRA_MS`] passes). Returns false when it does not wait.
    pub(super) fn await_handover(&mut self, conn: ConnId, client_id: &ClientId, holder: Arc<str>, now_ms: u64) -> bool {
        let Some(me) = &self.claims.node else { return false };
        let wait_ms = me.confirm_ms + HANDOVER_WAIT_EXTRA_MS;
        let expiry = match self.conns.get(&conn).map(|c| &c.state) {
            Some(ConnState::Pending { client_id: id, connect }) if id == client_id && !connect.clean_start => {
                if connect.version.is_v5() {
                    connect.properties.session_expiry_interval.unwrap_or(0).min(self.limits.max_session_expiry_secs)
                } else {
                    u32::MAX
                }
            }
            _ => return false,
        };
        if self.claims.awaiting.contains_key(client_id) {
            return false;
        }
        let since = self.claims.recent_since(now_ms);
        let a = Awaiting { conn, since, since_ms: now_ms, deadline_ms: now_ms + wait_ms, expiry, from: holder };
        self.claims.awaiting.insert(client_id.clone(), a);
        self.claims.recent_keep_from = Some(self.claims.recent_keep_from.map_or(since, |k| k.min(since)));
        self.claims.early.insert(conn);
        self.claim_session(conn, client_id, false, now_ms);
        true
    }

    /// The wait of `client_id`'s connection is over: CONNACK with the handed-over `session`
    /// (plus what was routed here meanwhile that its subscriptions take) or with none.
    fn finish_handover(&mut self, client_id: &ClientId, session: Option<Session>, now_ms: u64) {
        let Some(a) = self.claims.awaiting.remove(client_id) else { return };
        self.claims.recent_keep_from = self.claims.awaiting.values().map(|a| a.since).min();
        let session = session.map(|mut s| {
            self.queue_recent(&mut s, a.since, a.since_ms);
            self.claims.taken_over_in += 1;
            Box::new(s)
        });
        self.claims.trim_recent(now_ms);
        let pending = matches!(self.conns.get(&a.conn).map(|c| &c.state), Some(ConnState::Pending { .. }));
        if !pending {
            self.claims.early.remove(&a.conn);
        }
        let taken = session.is_some();
        self.on_transfer(client_id.clone(), a.conn, session, None, now_ms);
        if taken {
            // It lives here now: should this node die, a survivor rebuilds it from here.
            self.announce_session(client_id, now_ms);
        }
    }

    /// Queues for `s` the messages at QoS 1 or 2 routed here since `since` that its
    /// subscriptions match, but not those the session brought: a message equal to one it has
    /// queued or in flight (topic, payload, QoS) is skipped as often as the session has it.
    /// The old node may have delivered some of the others already (at least once).
    fn queue_recent(&mut self, s: &mut Session, since: u64, since_ms: u64) {
        let queued_s = crate::session::queued_tag(since_ms.saturating_sub(RECENT_LOOKBACK_MS));
        let mut brought: HashMap<(&str, &[u8], u8), usize> = HashMap::default();
        let in_flight = s.inflight.values().filter_map(|i| match i {
            Inflight::Publish(d) => Some(d),
            Inflight::Release => None,
        });
        for d in s.queue.iter().chain(in_flight) {
            *brought.entry((d.msg.topic.as_str(), d.msg.payload.as_ref(), d.msg.qos)).or_default() += 1;
        }
        let c = &mut self.claims;
        let skip = match since.checked_sub(c.recent_base) {
            Some(skip) => skip as usize,
            None => {
                c.handover_gap_lost += 1;
                0
            }
        };
        let mut add = Vec::new();
        for (_, msg) in c.recent.iter().skip(skip) {
            if let Some(n) = brought.get_mut(&(msg.topic.as_str(), msg.payload.as_ref(), msg.qos)) {
                if *n > 0 {
                    *n -= 1;
                    continue;
                }
            }
            if let Some((qos, retain, sub_ids)) =
                s.offline_match(&msg.topic, msg.qos, msg.retain, msg.origin.as_bytes())
            {
                add.push(Delivery { msg: msg.clone(), qos, retain, sub_ids, queued_s });
            }
        }
        drop(brought);
        s.queue.extend(add);
        s.queue.truncate(self.limits.max_queued_messages.max(1));
    }

    /// A session handed over for a connection of this shard: if its CONNACK waits for it, it
    /// is the connection's session; otherwise (CONNACK went out already) its subscriptions
    /// join the session here, its in-flight and queued messages go to the front of the queue,
    /// in order.
    fn take_handover(&mut self, claim: &Claim, value: &[u8], now_ms: u64) {
        let Some(to) = &claim.to else { return };
        if let Some(a) = self.claims.awaiting.get(claim.client.as_str()) {
            if a.conn == to.conn {
                let id = self.awaiting_client_id(&claim.client);
                let old = if value.is_empty() {
                    None
                } else {
                    Session::decode(id.clone(), 0, value, self.wall_offset_ms, now_ms)
                };
                self.finish_handover(&id, old, now_ms);
            }
            return;
        }
        if value.is_empty() {
            return;
        }
        let Some(cur) = self.sessions.get(claim.client.as_str()) else { return };
        if cur.conn.is_some_and(|c| c != to.conn) {
            return; // a newer connection since: this handover is for one that is gone
        }
        let id = cur.client_id.clone();
        let Some(old) = Session::decode(id.clone(), 0, value, self.wall_offset_ms, now_ms) else { return };
        let Some(mut cur) = self.sessions.remove(claim.client.as_str()) else { return };
        // Out of the tables under the current subscriptions, back in under the union.
        let subs: Vec<(String, Sub)> = cur.subs.iter().map(|(f, s)| (f.clone(), s.clone())).collect();
        self.drop_subscriptions(&mut cur);
        cur.subs = old.subs.clone();
        for (f, s) in subs {
            cur.subs.insert(f, s);
        }
        let mut queue: VecDeque<Delivery> = old
            .inflight
            .sorted()
            .into_iter()
            .filter_map(|(_, i)| match i {
                Inflight::Publish(d) => Some(d.clone()),
                Inflight::Release => None,
            })
            .collect();
        queue.extend(old.queue);
        queue.extend(cur.queue.drain(..));
        queue.truncate(self.limits.max_queued_messages.max(1));
        cur.queue = queue;
        self.commits.touch(&mut cur);
        self.install(cur);
        self.claims.taken_over_in += 1;
        self.announce_session(&id, now_ms);
        self.pump(&id, now_ms);
    }

    /// Fencing: writes this shard's lease every `lease_ms`; once none came back for the
    /// confirmation time (`dead_after_ms`), closes every client (0x89) and refuses new ones
    /// until one does (see `ClusterConfig::fence`).
    pub(super) fn renew_lease(&mut self, now_ms: u64) {
        let (Some(lease_ms), Some(me)) = (self.claims.lease_ms, self.claims.node.clone()) else {
            return;
        };
        let (node, confirm_ms) = (me.node, me.confirm_ms);
        let started = *self.claims.started_ms.get_or_insert(now_ms);
        if now_ms >= self.claims.lease_next_ms {
            self.claims.lease_next_ms = now_ms + lease_ms;
            self.flush_records(now_ms);
            if now_ms >= self.claims.reannounce_next_ms {
                self.claims.reannounce_next_ms = now_ms + SHARE_REANNOUNCE_MS;
                self.reannounce_shares(now_ms);
            }
            let lease = format!("lease/{node}/{}", self.id);
            let claim = Claim {
                inc: me.incarnation,
                low: self.lease_low(lease_ms, now_ms),
                pos: self.inbound.positions_of(crate::cluster::FORWARD_MAPPING),
                shards: self.n_shards,
                reading: self.claims.lease_seen_ms.is_some(),
                ..Claim::new(&node, &lease, self.id, ClaimKind::Lease)
            };
            self.send_claim(&claim, lease.into(), Bytes::new(), 0, now_ms);
        }
        if !me.fence {
            return;
        }
        let seen = self.claims.lease_seen_ms.unwrap_or(started);
        if self.claims.fenced || now_ms.saturating_sub(seen) < confirm_ms {
            return;
        }
        self.claims.fenced = true;
        self.effects.warnings.push(format!(
            "cluster: shard {} has not read its lease back from Kafka for {confirm_ms} ms: closing its clients \
             and refusing new ones until it does (no client id served by two nodes)",
            self.id
        ));
        let active: Vec<ConnId> = self.conns.iter().filter(|(_, c)| c.is_active()).map(|(id, _)| *id).collect();
        for conn in active {
            self.claims.fenced_closed += 1;
            // Its client did not fail: the node cut it off (no will for that).
            if let Some(c) = self.conns.get_mut(&conn) {
                c.will = None;
            }
            self.close_why(conn, Some(reason::SERVER_BUSY), Some("this node is cut off from Kafka"), now_ms);
        }
    }

    /// The lease's `low`: from a walk over the sessions ([`Shard::pending_low`]) once per lease,
    /// or with many sessions once per `sessions / LOW_WALK_SESSIONS` leases, aged since:
    /// what was queued after a walk is newer than what it found, so the age stays an upper
    /// bound (a walk that found nothing gives the time since it).
    fn lease_low(&mut self, lease_ms: u64, now_ms: u64) -> Option<u64> {
        let every = lease_ms * (self.sessions.len() / LOW_WALK_SESSIONS).max(1) as u64;
        let stale = self.claims.low_walk.is_none_or(|(at, _)| now_ms.saturating_sub(at) + lease_ms / 2 >= every);
        if stale {
            let oldest =
                self.pending_low(now_ms).map(|age| if age == LOW_UNKNOWN { age } else { now_ms - age.min(now_ms) });
            self.claims.low_walk = Some((now_ms, oldest));
        }
        match self.claims.low_walk {
            Some((_, Some(LOW_UNKNOWN))) => Some(LOW_UNKNOWN),
            Some((_, Some(queued_ms))) => Some(now_ms.saturating_sub(queued_ms)),
            Some((at, None)) if at < now_ms => Some(now_ms - at),
            _ => None,
        }
    }

    /// The age (ms) of the oldest message at QoS 1/2 queued or in flight for a persistent
    /// session here ([`crate::cluster::LOW_UNKNOWN`] for one of unknown age), for the lease:
    /// below what it came with, a survivor need not replay the log (see `crate::adoption`).
    /// A walk over the sessions once per lease; a queue is read from its front only (its
    /// tags do not decrease after the unknown ones, see [`Delivery::queued_s`]).
    pub(super) fn pending_low(&self, now_ms: u64) -> Option<u64> {
        use crate::session::{tag_age_ms, NOT_IN_LOG};
        let mut oldest: Option<u32> = None;
        let mut note = |t: u32| {
            if t != NOT_IN_LOG {
                oldest = Some(oldest.map_or(t, |o| o.min(t)));
            }
        };
        for s in self.sessions.values().filter(|s| s.expiry_secs > 0) {
            if !s.inflight.is_empty() {
                for i in s.inflight.values() {
                    if let Inflight::Publish(d) = i {
                        if d.qos > 0 {
                            note(d.queued_s);
                        }
                    }
                }
            }
            if let Some(d) = s.queue.iter().find(|d| d.qos > 0 && d.queued_s != NOT_IN_LOG) {
                note(d.queued_s);
            }
        }
        oldest.map(|t| tag_age_ms(t, now_ms))
    }

    /// `client_id`'s persistent session lives here now with these subscriptions, or ended here
    /// (not persistent any more): a [`ClaimKind::Session`] record, what a survivor rebuilds it
    /// from should this node die. At once, every change (see the module doc) — but one record
    /// per session at a time: a change while one is on its way goes with its answer
    /// (`crate::shard::session_records`).
    pub(super) fn announce_session(&mut self, client_id: &ClientId, now_ms: u64) {
        if self.claims.node.is_none() {
            return;
        }
        if self.claims.session_records.coalesce(client_id) {
            self.claims.state_coalesced += 1;
            return;
        }
        self.write_session_record(client_id, now_ms);
    }

    fn write_session_record(&mut self, client_id: &ClientId, now_ms: u64) {
        let Some(me) = &self.claims.node else { return };
        let (node, inc) = (me.node.clone(), me.incarnation);
        let (value, active, expiry) = match self.sessions.get(client_id) {
            Some(s) if s.expiry_secs > 0 => {
                let mut bytes = Vec::new();
                s.encode_subscriptions(self.wall_offset_ms, &mut bytes);
                (Bytes::from(bytes), true, s.expiry_secs)
            }
            _ => (Bytes::new(), false, 0),
        };
        // When, on the node's one wall clock: readers put this session's records back in the
        // order they were written, whichever shard's producer got them to Kafka first.
        let at_ms = u64::try_from(self.wall_offset_ms + now_ms as i64).unwrap_or(0);
        let claim = Claim { active, inc, expiry, at_ms, ..Claim::new(&node, client_id, self.id, ClaimKind::Session) };
        let key: ClientId = crate::cluster::session_record_key(client_id).into();
        let ids = self.send_claim(&claim, key, value, 1, now_ms);
        let unwritten = self.claims.session_records.sent(client_id, ids, now_ms);
        self.claims.state_records += 1;
        for conn in unwritten {
            self.subscribe_step_done(conn, true, now_ms);
        }
    }

    /// Record `id` was answered (`stored`: in Kafka, or on disk for it): if it was a session's
    /// record, the SUBACKs that waited for it go, and if that session changed since, its next
    /// record goes now.
    pub(super) fn session_record_answered(&mut self, id: u64, stored: bool, now_ms: u64) {
        let mut released = Vec::new();
        let again = self.claims.session_records.answered(id, stored, &mut released);
        for conn in released {
            self.subscribe_step_done(conn, true, now_ms);
        }
        if let Some(client) = again {
            self.write_session_record(&client, now_ms);
        }
    }

    /// `conn`'s SUBSCRIBE just changed persistent session `client_id`: the change is written
    /// to the cluster, and returns whether its SUBACK waits for that record's answer (see
    /// `session_records`: a SUBACK promises the subscription to the survivors of this node).
    pub(super) fn announce_subscribe(&mut self, client_id: &ClientId, conn: ConnId, now_ms: u64) -> bool {
        self.announce_session(client_id, now_ms);
        self.claims.node.is_some() && self.claims.session_records.wait(client_id, conn)
    }

    /// `client_id`'s session leaves this shard for another of this node: a change of it that
    /// waited for a record's answer here is written now, while the session is still here (the
    /// shard it goes to writes nothing for its arrival).
    pub(super) fn leave_shard_records(&mut self, client_id: &ClientId, now_ms: u64) {
        if self.claims.session_records.leave(client_id) {
            self.write_session_record(client_id, now_ms);
        }
    }

    /// Closes connections whose claim was not read back in time.
    pub(super) fn close_unconfirmed(&mut self, now_ms: u64) {
        if !self.claims.awaiting.is_empty() {
            let late: Vec<ClientId> = self
                .claims
                .awaiting
                .iter()
                .filter(|(_, a)| a.deadline_ms <= now_ms)
                .map(|(id, _)| id.clone())
                .collect();
            for id in late {
                self.claims.handover_timeouts += 1;
                self.finish_handover(&id, None, now_ms);
            }
        }
        while let Some(&(deadline, conn, retried)) = self.claims.deadlines.front() {
            if deadline > now_ms {
                break;
            }
            self.claims.deadlines.pop_front();
            let Some(&clean) = self.claims.unconfirmed.get(&conn) else { continue };
            let active = self.conns.get(&conn).and_then(|c| c.active_id().cloned());
            if !retried {
                // Once more: the first claim may have failed (Kafka unreachable for a moment).
                if let (Some(id), Some(confirm_ms)) = (active, self.claims.node.as_ref().map(|n| n.confirm_ms)) {
                    self.claim_session(conn, &id, clean, now_ms);
                    self.claims.deadlines.push_back((now_ms + confirm_ms - confirm_ms / 2, conn, true));
                } else {
                    self.claims.unconfirmed.remove(&conn);
                }
                continue;
            }
            if self.claims.unconfirmed.remove(&conn).is_some() && active.is_some() {
                self.claims.unconfirmed_closed += 1;
                self.close_why(
                    conn,
                    Some(reason::SERVER_BUSY),
                    Some("the cluster could not confirm this session through Kafka"),
                    now_ms,
                );
            }
        }
    }
}
