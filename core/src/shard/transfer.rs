//! Takeover between shards: the directory carrying out claims one at a time
//! ([`directory`](super::directory)), and the previous host closing the old connection (0x8E)
//! and sending the session to the new one.

use super::*;

impl Shard {
    /// Directory: a claim for `client_id`'s session. Carried out now, or after the claim under
    /// way (see [`directory`]).
    pub(super) fn on_claim(&mut self, client_id: ClientId, claim: Claim) {
        if let Some(go) = self.directory.claim(&client_id, claim) {
            self.carry_out(client_id, go);
        }
    }

    /// Directory: the claim under way for `client_id` is carried out; the next one may go.
    pub(super) fn on_settled(&mut self, client_id: ClientId, host: ShardId, hosting: bool) {
        if let Some(go) = self.directory.settled(&client_id, host, hosting) {
            self.carry_out(client_id, go);
        }
    }

    fn carry_out(&mut self, client_id: ClientId, go: ClaimGo) {
        match go {
            ClaimGo::Evict { prev, claim: Claim { host, conn, clean_start } } => {
                self.send_to_shard(prev, ShardMsg::Evict { client_id, to: host, conn, clean_start })
            }
            ClaimGo::Fresh(Claim { host, conn, clean_start }) => {
                // Not on this node: perhaps on another node of the cluster.
                let remote = if clean_start { None } else { self.claims.remote_holder(&client_id) };
                self.send_to_shard(host, ShardMsg::Transfer { client_id, conn, session: None, remote })
            }
        }
    }

    /// Previous host: a new connection on shard `to` takes over `client_id`. The old connection
    /// here (if any) closes with 0x8E, and the session (if any) travels to `to`.
    pub(super) fn on_evict(&mut self, client_id: ClientId, to: ShardId, conn: ConnId, clean_start: bool, now_ms: u64) {
        let mut session = None;
        if let Some(old_conn) = self.sessions.get(&client_id).and_then(|s| s.conn) {
            // Takeover: the old connection goes; its will follows the MQTT 5 rules — sent
            // now unless the session continues and the will has a delay.
            if let Some(c) = self.conns.get_mut(&old_conn) {
                let keep_delayed =
                    !clean_start && c.will.as_ref().is_some_and(|w| w.properties.will_delay_interval.unwrap_or(0) > 0);
                if keep_delayed {
                    c.will = None;
                }
                if c.is_v5() {
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
            self.leave_shard_records(&client_id, now_ms);
        }
        if let Some(mut s) = self.sessions.remove(&client_id) {
            self.commits.touch(&mut s);
            for (filter, _) in s.subs.iter() {
                if topic::parse_shared(filter).is_none() {
                    self.trie.remove(filter, &client_id);
                }
            }
            s.conn = None;
            session = Some(s);
        }
        self.send_to_shard(to, ShardMsg::Transfer { client_id, conn, session, remote: None });
    }
}
