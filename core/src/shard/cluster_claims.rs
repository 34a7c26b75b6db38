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
//! Every node reads one client id's claims in one order (one partition), so of two nodes
//! serving one client id at once, exactly one keeps it, once both read both claims.
//! Invariant: `unconfirmed` holds at most one entry per connection of this shard; `deadlines`
//! holds each at most once.

use super::*;
use crate::bridge::ClaimsNode;
use crate::cluster::{Claim, ClaimKind, HandoverTo};
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
    /// members of: those nodes, sorted. At most [`SHARE_KEYS_MAX`] keys.
    remote_shares: HashMap<String, Vec<Arc<str>>>,
    /// Share records beyond [`SHARE_KEYS_MAX`], not kept.
    pub(super) shares_refused: u64,
    /// Fencing (`ClusterConfig::fence`): how often this shard writes its lease, when it next
    /// does, when it last read its own back (`None`: not yet), and whether it is cut off now.
    lease_ms: Option<u64>,
    lease_next_ms: u64,
    lease_seen_ms: Option<u64>,
    started_ms: Option<u64>,
    pub(super) fenced: bool,
    /// Connections closed because the shard was cut off from Kafka.
    pub(super) fenced_closed: u64,
}

/// Shared-subscription groups with members on other nodes a shard keeps, at most; a group
/// beyond it is delivered by every node that has members (counted in `shares_refused`).
pub(super) const SHARE_KEYS_MAX: usize = 100_000;

impl ClusterClaims {
    fn remote_share(&mut self, key: &str, node: &str, active: bool) {
        if active {
            if !self.remote_shares.contains_key(key) && self.remote_shares.len() >= SHARE_KEYS_MAX {
                self.shares_refused += 1;
                return;
            }
            let nodes = self.remote_shares.entry(key.to_string()).or_default();
            if let Err(i) = nodes.binary_search_by(|n| (**n).cmp(node)) {
                nodes.insert(i, node.into());
            }
        } else if let Some(nodes) = self.remote_shares.get_mut(key) {
            nodes.retain(|n| **n != *node);
            if nodes.is_empty() {
                self.remote_shares.remove(key);
            }
        }
    }

    /// Whether this node delivers a message on `topic` to its members of group `key` (see
    /// [`crate::cluster::share_node`]): always outside a cluster or when no other node has
    /// members.
    pub(super) fn share_mine(&self, key: &str, topic: &str) -> bool {
        let (Some(ClaimsNode { node: me, .. }), Some(others)) = (&self.node, self.remote_shares.get(key)) else {
            return true;
        };
        let mut nodes: Vec<&str> = others.iter().map(|n| &**n).collect();
        if let Err(i) = nodes.binary_search(&&**me) {
            nodes.insert(i, me);
        }
        crate::cluster::share_node(&nodes, topic) == Some(&**me)
    }
}

impl ClusterClaims {
    pub(super) fn new(node: Option<ClaimsNode>, lease_ms: Option<u64>) -> Self {
        ClusterClaims { node, lease_ms, ..Default::default() }
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
        let expiry = self.sessions.get(client_id).map_or(0, |s| s.expiry_secs);
        let claim = Claim {
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
            None => self.send_claim(&claim, client_id.clone(), Bytes::new(), 0, now_ms),
        }
    }

    /// `claim` as a record of the claims mapping: key `key`, value `value`, QoS `qos` (1: by
    /// the spill log through an outage).
    fn send_claim(&mut self, claim: &Claim, key: ClientId, value: Bytes, qos: u8, now_ms: u64) {
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
        self.outbox.bridge_claim(&Arc::new(msg), claim.encode().into(), wall, &mut self.effects.produce);
    }

    /// This node has members of shared-subscription group `key` from now on (`active`), or none
    /// any more: the other nodes hear it (see [`ClaimKind::Share`]).
    pub(super) fn announce_share(&mut self, key: &str, active: bool, now_ms: u64) {
        let Some(me) = &self.claims.node else { return };
        let claim = Claim { active, inc: me.incarnation, ..Claim::new(&me.node, key, self.id, ClaimKind::Share) };
        // The record's key: one per (group, node) in the compacted topic.
        let record_key = format!("{key}\u{1}{}", me.node).into();
        self.send_claim(&claim, record_key, Bytes::new(), 1, now_ms);
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
            ClaimKind::Release => return, // for the survivors' table of wills (`sluice-kafka`)
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
                }
                return;
            }
            ClaimKind::Share => {
                if claim.node != **node && shard_of(&claim.client, self.n_shards) == self.id {
                    self.claims.remote_share(&claim.client, &claim.node, claim.active);
                }
                return;
            }
            ClaimKind::Connect => {}
        }
        if claim.node == **node {
            // A claim of an earlier run of this node (read after a restart) is of a connection
            // that is gone: its connection id may be a new connection's now.
            if claim.shard == self.id && claim.inc == me.incarnation {
                self.claims.unconfirmed.remove(&claim.conn);
            }
            return;
        }
        let Some(s) = self.sessions.get_mut(claim.client.as_str()) else { return };
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
    /// off): the session's stored form goes to the claiming connection (see [`ClaimKind::Handover`]).
    fn hand_over(&mut self, claim: &Claim, now_ms: u64) {
        let Some(s) = self.sessions.get(claim.client.as_str()) else { return };
        if claim.clean || s.expiry_secs == 0 {
            return;
        }
        let mut bytes = Vec::new();
        s.encode(self.wall_offset_ms, &mut bytes);
        if bytes.len() > crate::cluster::HANDOVER_MAX_BYTES {
            // Subscriptions only: the messages do not fit one record.
            let light =
                Session { subs: s.subs.clone(), expiry_secs: s.expiry_secs, ..Session::new(s.client_id.clone()) };
            bytes.clear();
            light.encode(self.wall_offset_ms, &mut bytes);
            self.claims.handover_truncated += 1;
        }
        let Some(me) = &self.claims.node else { return };
        let to = HandoverTo { node: claim.node.clone(), shard: claim.shard, conn: claim.conn };
        let handover = Claim {
            to: Some(to),
            inc: me.incarnation,
            ..Claim::new(&me.node, &claim.client, self.id, ClaimKind::Handover)
        };
        // QoS 1: by the spill log through an outage, like an acknowledged publish.
        let key = s.client_id.clone();
        self.send_claim(&handover, key, bytes.into(), 1, now_ms);
        self.claims.handed_over += 1;
    }

    /// A session handed over for a connection of this shard: its subscriptions join the
    /// session here, its in-flight and queued messages go to the front of the queue, in order.
    fn take_handover(&mut self, claim: &Claim, value: &[u8], now_ms: u64) {
        let Some(to) = &claim.to else { return };
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
            let lease = format!("lease/{node}/{}", self.id);
            let claim = Claim { inc: me.incarnation, ..Claim::new(&node, &lease, self.id, ClaimKind::Lease) };
            self.send_claim(&claim, lease.into(), Bytes::new(), 0, now_ms);
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

    /// Closes connections whose claim was not read back in time.
    pub(super) fn close_unconfirmed(&mut self, now_ms: u64) {
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
