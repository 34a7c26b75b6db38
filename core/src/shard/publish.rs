//! PUBLISH from a client, and routing any message: to subscribers on this shard, to every other
//! shard, to shared-subscription members, and into Kafka records. A PUBLISH reads top to
//! bottom: validate, make a [`Routing`](super::routing::Routing), route, queue the
//! acknowledgement with what the routing says it waits for.

use super::*;

impl Shard {
    pub(super) fn on_publish(&mut self, conn: ConnId, mut p: Publish, now_ms: u64) {
        self.stats.messages_received += 1;
        self.stats.received_by_qos[usize::from(p.qos.min(2))] += 1;
        // `on_packet` checked that `conn` holds its session here (`Shard::held`): the client id
        // comes from the connection's state, without a second session lookup per PUBLISH.
        let Some((c, client_id)) = self.conns.get_mut(&conn).and_then(|c| {
            let id = c.active_id()?.clone();
            Some((c, id))
        }) else {
            return self.orphaned(conn, now_ms);
        };
        if let Some(alias) = p.properties.get_mut().and_then(|pr| pr.topic_alias.take()) {
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
        if let Some(auth) = c.auth.as_mut() {
            if let Some(rules) = self.access.rules_for(c.listener) {
                auth.refresh(rules, &client_id);
            }
            if !auth.may_publish(&p.topic) {
                // MQTT 5 hears 0x87; 3.1.1 has no refusal, so (as Mosquitto does) the message is
                // acknowledged and dropped. In PUBLISH order, like every acknowledgement.
                self.stats.acl_denied += 1;
                let code = if c.is_v5() { reason::NOT_AUTHORIZED } else { reason::SUCCESS };
                if p.qos > 0 {
                    self.queue_ack_with_code(conn, p.packet_id, p.qos, code);
                }
                return;
            }
        }
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
            let Some((_, s)) = held_in(&mut self.conns, &mut self.sessions, conn) else {
                return self.orphaned(conn, now_ms);
            };
            if s.incoming_qos2.contains(&p.packet_id) {
                // A resend of a message we already took: acknowledge again (after any earlier
                // acknowledgement still waiting for Kafka), route nothing.
                self.queue_ack(conn, p.packet_id, 2, 0..0);
                return;
            }
            if s.incoming_qos2.len() >= usize::from(self.limits.max_inflight) {
                return self.protocol_close(conn, reason::RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded", now_ms);
            }
            s.incoming_qos2.insert(p.packet_id);
            self.commits.touch(s);
        }
        let mut expiry = None;
        if let Some(properties) = p.properties.get_mut() {
            properties.subscription_identifiers.clear();
            expiry = properties.message_expiry_interval.take();
        }
        let (qos, pid) = (p.qos, p.packet_id);
        let msg = Arc::new(Message {
            topic: p.topic,
            payload: p.payload,
            qos,
            retain: p.retain,
            properties: p.properties.into_boxed(),
            expiry_at_ms: expiry.map(|e| now_ms + u64::from(e) * 1000),
            origin: client_id,
        });
        if qos == 0 {
            self.route(msg, &mut Routing::default(), now_ms);
            return;
        }
        // With persistent sessions, the acknowledgement waits until whatever the message changed
        // on any shard is on disk.
        let receipt = self.commits.enabled().then(|| Receipt { from: self.id, token: self.new_receipt() });
        let mut routing = Routing::publisher(conn, receipt);
        let (produced, expected) = self.route_with_receipt(msg, &mut routing, now_ms);
        let receipt = receipt.filter(|_| expected > 0).map(|r| (r.token, expected));
        self.queue_ack_waiting(conn, pid, qos, produced, &routing.congested, receipt);
    }

    pub(super) fn new_receipt(&mut self) -> u64 {
        self.receipts.new_token()
    }

    /// [`Shard::route`] under `routing`; returns the Kafka records and, when the routing has a
    /// receipt, how many answers to expect (every other shard, every shard a shared pick was
    /// forwarded to, and this shard's own store commit when it stored something).
    pub(super) fn route_with_receipt(
        &mut self,
        msg: Msg,
        routing: &mut Routing,
        now_ms: u64,
    ) -> (std::ops::Range<u64>, u32) {
        let produced = self.route(msg, routing, now_ms);
        let Some(receipt) = routing.receipt else { return (produced, 0) };
        let mut expected = (self.n_shards - 1) as u32 + routing.forwards;
        if routing.stored {
            self.commits.wait_receipt(receipt, 0);
            self.effects.sessions_urgent = true;
            expected += 1;
        }
        (produced, expected)
    }

    /// A message published on this shard: deliver here and hand it to every other shard.
    /// Returns the ids of the Kafka records the message became (MQTT → Kafka mappings).
    pub(super) fn route(&mut self, msg: Msg, routing: &mut Routing, now_ms: u64) -> std::ops::Range<u64> {
        for shard in 0..self.n_shards {
            if shard != self.id {
                let m = match routing.receipt {
                    Some(receipt) => ShardMsg::PublishReceipt { msg: msg.clone(), receipt },
                    None => ShardMsg::Publish(msg.clone()),
                };
                self.effects.to_shards.push((shard, m));
            }
        }
        self.route_here(&msg, routing, now_ms);
        if !self.taps.is_empty() {
            self.tap(&msg, now_ms);
        }
        if inbound::is_internal(&msg.origin) {
            // What came from Kafka does not go back to it: no loops between the two directions,
            // and none between cluster nodes (the node that took it from a device forwarded it).
            return 0..0;
        }
        self.bridge_to_kafka(&msg, now_ms)
    }

    pub(super) fn bridge_to_kafka(&mut self, msg: &Msg, now_ms: u64) -> std::ops::Range<u64> {
        self.outbox.bridge(msg, self.wall_offset_ms + now_ms as i64, &mut self.effects.produce)
    }

    /// Delivery on this shard of a message published anywhere.
    pub(super) fn route_here(&mut self, msg: &Msg, routing: &mut Routing, now_ms: u64) {
        let internal = inbound::is_internal(&msg.origin);
        if internal && &*msg.origin == inbound::CLAIM {
            return self.on_cluster_claim(&msg.payload, now_ms);
        }
        if msg.retain && shard_of(&msg.topic, self.n_shards) == self.id {
            let persist = !msg.topic.starts_with("$SYS");
            if msg.payload.is_empty() {
                if self.retained.remove(&msg.topic).is_some() && persist {
                    self.effects.retained.push((msg.topic.clone(), None));
                    routing.stored = true;
                }
            } else if self.retained.len() < self.limits.max_retained_messages || self.retained.contains(&msg.topic) {
                self.retained.insert(&msg.topic, msg.clone());
                if persist {
                    self.effects.retained.push((msg.topic.clone(), Some(msg.clone())));
                    routing.stored = true;
                }
            }
        }
        if internal && &*msg.origin == inbound::RETAINED_SYNC {
            // The cluster's retained table: stored above, delivered by the node it was published
            // on (live subscribers everywhere got it through the cluster's message topic).
            return;
        }
        self.claims.remember(msg, now_ms);
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
                    feed.live.insert(msg);
                }
            }
            let queued_s = crate::session::queued_tag(now_ms);
            let d = Delivery { msg: msg.clone(), qos: qos.min(msg.qos), retain: rap && msg.retain, sub_ids, queued_s };
            self.deliver(&id, d, routing, now_ms);
        }
        matches.clear();
        self.route_matches = matches;
        let mut picks = Vec::new();
        let (sessions, conns, limits, here) = (&self.sessions, &self.conns, &self.limits, self.id);
        let claims = &self.claims;
        self.shared.pick(
            &msg.topic,
            |key, announced, before| claims.share_mine(key, announced, before, msg, now_ms),
            |m| (m.shard == here).then(|| member_busy(sessions, conns, limits, &m.client_id)).flatten(),
            &mut picks,
        );
        self.deliver_picks(picks, msg, routing, now_ms);
    }

    /// `msg` to the shared-subscription members picked for it, here or on their shard.
    pub(super) fn deliver_picks(&mut self, picks: Vec<ShareMember>, msg: &Msg, routing: &mut Routing, now_ms: u64) {
        for m in picks {
            if m.shard == self.id {
                self.deliver_shared(&m.client_id, msg.clone(), m.opts, m.sub_id, routing, now_ms);
            } else {
                let receipt = routing.receipt;
                if receipt.is_some() {
                    routing.forwards += 1;
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
}
