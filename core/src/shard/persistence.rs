//! The shard's side of what survives a restart: retained messages and sessions read back at
//! start, session changes handed to the store and the store's commit reports, and the Kafka →
//! MQTT positions to store.

use super::*;

impl Shard {
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
        self.commits.enable();
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
            self.directory.restored(id.clone(), self.id);
            // The same session, already stored under this generation: no new one, nothing to write.
            self.install(Box::new(s));
        }
        self.run_local(now_ms);
        dropped
    }

    /// Changes to persistent sessions since the last call, and the token to hand to
    /// [`Shard::on_sessions_synced`] once they are durable.
    pub fn take_session_changes(&mut self) -> (Vec<SessionChange>, u64) {
        let (dirty, token) = self.commits.take();
        let mut changes = Vec::with_capacity(dirty.len());
        for id in dirty {
            match self.sessions.get(&id) {
                Some(s) if s.expiry_secs > 0 => {
                    let mut bytes = Vec::new();
                    s.encode(self.wall_offset_ms, &mut bytes);
                    changes.push(SessionChange::Put { client_id: id, generation: s.generation, bytes });
                }
                _ => changes.push(SessionChange::Delete { client_id: id }),
            }
        }
        (changes, token)
    }

    /// The changes taken with `token` (and every earlier token) are durable (`ok`), or could
    /// not all be committed (a full disk, an I/O error): acknowledgements waiting for them go
    /// out, or are refused — MQTT 5 PUBACK/PUBREC/SUBACK 0x97, 3.1.1 no PUBACK (the connection
    /// closes, the client publishes again) and SUBACK 0x80 — and counted.
    pub fn on_sessions_synced(&mut self, token: u64, ok: bool, now_ms: u64) {
        if ok {
            // This shard's store works again: Kafka positions held back by a failed commit move.
            let moves = self.receipts.retry_failed();
            self.inbound.move_positions(moves);
        }
        for w in self.commits.committed(token) {
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
        self.commits.retry(ids);
    }

    /// The consumer positions of this shard, if they moved since the last call (to be stored).
    pub fn take_positions(&mut self) -> Option<Positions> {
        self.inbound.take_positions()
    }
}
