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
use crate::cluster::{Claim, ClaimKind};
use crate::packet::Will;

#[derive(Default)]
pub(super) struct ClusterClaims {
    /// This node's id and how long a claim may stay unconfirmed; `None`: not in a cluster.
    node: Option<(Arc<str>, u64)>,
    /// Connections whose claim was not read back yet, with their CONNECT's clean start.
    unconfirmed: HashMap<ConnId, bool>,
    /// (deadline, connection, retried), in deadline order: at the first deadline (half the
    /// confirmation time) an unconfirmed claim is made again, at the second the connection goes.
    deadlines: VecDeque<(u64, ConnId, bool)>,
    /// Connections closed because another node took their client over.
    pub(super) taken_over: u64,
    /// Connections closed because their claim was not confirmed in time.
    pub(super) unconfirmed_closed: u64,
}

impl ClusterClaims {
    pub(super) fn new(node: Option<(Arc<str>, u64)>) -> Self {
        ClusterClaims { node, ..Default::default() }
    }
}

impl Shard {
    /// A connection of `client_id` was accepted: claim it for this node, with its will.
    pub(super) fn claim_session(&mut self, conn: ConnId, client_id: &ClientId, clean: bool, now_ms: u64) {
        let Some((_, confirm_ms)) = self.claims.node.clone() else { return };
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
        let Some((node, _)) = &self.claims.node else { return };
        let claim = Claim {
            node: node.to_string(),
            client: client_id.to_string(),
            shard: self.id,
            conn,
            clean,
            kind,
            will: will.is_some(),
        };
        // The record is the will itself (the others publish it as it is should this node die),
        // or an empty message on the claim topic.
        let msg = match will {
            Some(w) => {
                let mut properties = w.properties;
                properties.will_delay_interval = None;
                properties.message_expiry_interval = None;
                Message {
                    topic: w.topic,
                    payload: w.payload,
                    qos: w.qos,
                    retain: w.retain,
                    properties: properties.boxed(),
                    expiry_at_ms: None,
                    origin: client_id.clone(),
                }
            }
            None => Message {
                topic: crate::cluster::CLAIM_TOPIC.into(),
                payload: Bytes::new(),
                qos: 0,
                retain: false,
                properties: None,
                expiry_at_ms: None,
                origin: client_id.clone(),
            },
        };
        let wall = self.wall_offset_ms + now_ms as i64;
        self.outbox.bridge_claim(&Arc::new(msg), claim.encode().into(), wall, &mut self.effects.produce);
    }

    /// "confirmed" or "unconfirmed" for a connection in a cluster; `None` outside one.
    pub(super) fn claim_state(&self, conn: ConnId) -> Option<&'static str> {
        self.claims.node.as_ref()?;
        Some(if self.claims.unconfirmed.contains_key(&conn) { "unconfirmed" } else { "confirmed" })
    }

    /// A claim read from the cluster's sessions topic (see the module doc).
    pub(super) fn on_cluster_claim(&mut self, payload: &[u8], now_ms: u64) {
        let Some((node, _)) = &self.claims.node else { return };
        let Some(claim) = Claim::decode(payload) else { return };
        if claim.kind == ClaimKind::Release {
            return; // for the survivors' table of wills (`sluice-kafka`), never a takeover
        }
        if claim.node == **node {
            if claim.shard == self.id {
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
                if let Some(s) = self.sessions.remove(claim.client.as_str()) {
                    self.end_session(s, now_ms);
                }
            }
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
                if let (Some(id), Some((_, confirm_ms))) = (active, self.claims.node.clone()) {
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
