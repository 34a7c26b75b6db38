//! SUBSCRIBE and UNSUBSCRIBE: validate filters, update the session and the trie (or the shared
//! group's owner), and answer SUBACK once the group owners and the session store confirmed;
//! then the retained messages the new subscriptions asked for.

use super::*;

impl Shard {
    pub(super) fn unsubscribe_one(&mut self, client_id: &ClientId, filter: &str) {
        match topic::parse_shared(filter) {
            Some(Ok((group, f))) => {
                let key = share_key(group, f);
                let owner = shard_of(&key, self.n_shards);
                self.send_to_shard(owner, ShardMsg::ShareLeave { key, client_id: client_id.clone() });
            }
            _ => {
                self.trie.remove(filter, client_id);
            }
        }
    }

    pub(super) fn on_subscribe(&mut self, conn: ConnId, sub: Subscribe, now_ms: u64) {
        let Some((c, s)) = held_in(&mut self.conns, &mut self.sessions, conn) else {
            return self.orphaned(conn, now_ms);
        };
        let v5 = c.is_v5();
        let client_id = s.client_id.clone();
        if let (Some(auth), Some(rules)) = (c.auth.as_mut(), self.access.rules_for(c.listener)) {
            auth.refresh(rules, &client_id);
        }
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
            if self.conns.get(&conn).and_then(|c| c.auth.as_deref()).is_some_and(|a| !a.may_subscribe(&filter)) {
                self.stats.acl_denied += 1;
                codes.push(if v5 { reason::NOT_AUTHORIZED } else { 0x80 });
                continue;
            }
            if shared.is_some() && opts.no_local && v5 {
                return self.protocol_close(conn, reason::PROTOCOL_ERROR, "No Local on a shared subscription", now_ms);
            }
            let Some((_, s)) = held_in(&mut self.conns, &mut self.sessions, conn) else {
                return self.orphaned(conn, now_ms);
            };
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
                    let key = share_key(group, f);
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
        let Some((_, s)) = held_in(&mut self.conns, &mut self.sessions, conn) else {
            return self.orphaned(conn, now_ms);
        };
        self.commits.touch(s);
        if s.stored {
            // The SUBACK promises the subscription: it goes out once the store has it.
            self.commits.wait_subscribe(conn);
            self.effects.sessions_urgent = true;
            acks_left += 1;
        }
        // In a cluster, once the survivors of this node can read it too.
        if s.expiry_secs > 0 && self.announce_subscribe(&client_id, conn, now_ms) {
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
            if let Some(c) = self.conns.get_mut(&conn) {
                c.pending_sub = Some(Box::new(pending));
            }
        } else {
            self.finish_subscribe(conn, client_id, pending);
        }
    }

    /// One of the confirmations a pending SUBSCRIBE waits for arrived.
    pub(super) fn subscribe_step_done(&mut self, conn: ConnId, ok: bool, now_ms: u64) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let Some(p) = c.pending_sub.as_mut() else { return };
        p.acks_left = p.acks_left.saturating_sub(1);
        p.failed |= !ok;
        if p.acks_left > 0 {
            return;
        }
        let v5 = c.is_v5();
        let (Some(p), Some(id)) = (c.pending_sub.take(), c.active_id().cloned()) else { return };
        let mut p = *p;
        if p.failed {
            self.refuse_subscribe(&id, v5, &mut p);
            // The filters taken back: the cluster's record follows (nothing waits for it).
            if self.sessions.get(&id).is_some_and(|s| s.expiry_secs > 0) {
                self.announce_session(&id, now_ms);
            }
        }
        self.finish_subscribe(conn, id, p);
        self.run_deferred(conn, now_ms);
        self.resume(conn, now_ms);
    }

    /// The session store could not commit a SUBSCRIBE: the filters it added are taken back and
    /// its SUBACK refuses every one (MQTT 5 0x97, 3.1.1 0x80); the client may subscribe again.
    pub(super) fn refuse_subscribe(&mut self, id: &ClientId, v5: bool, p: &mut PendingSub) {
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
            self.commits.touch(s);
        }
    }

    /// SUBACK, then the retained messages the new subscriptions asked for.
    pub(super) fn finish_subscribe(&mut self, conn: ConnId, client_id: ClientId, p: PendingSub) {
        self.send(conn, Packet::SubAck(p.suback));
        if p.retained_queries.is_empty() {
            return;
        }
        match self.retained_feeds.get_mut(&client_id) {
            Some(feed) => feed.queue(p.retained_queries),
            None => self.start_retained_feed(client_id, p.retained_queries, LiveSet::default()),
        }
    }

    pub(super) fn on_unsubscribe(&mut self, conn: ConnId, u: Unsubscribe, now_ms: u64) {
        let Some((_, s)) = self.held(conn) else { return };
        let id = s.client_id.clone();
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let Some(s) = self.sessions.get_mut(&id) else { return };
            self.commits.touch(s);
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
        if self.sessions.get(&id).is_some_and(|s| s.expiry_secs > 0) {
            self.announce_session(&id, now_ms);
        }
    }
}
