//! Delivery to one session: straight to the connection when its window and output buffer
//! allow, else into its bounded queue; the queue moves into flight as acknowledgements come
//! (`pump`). Also PUBACK/PUBREC/PUBCOMP for messages the shard sent.

use super::*;

impl Shard {
    /// PUBACK, PUBREC (`rec`) or PUBCOMP for a message we sent.
    pub(super) fn on_ack(&mut self, conn: ConnId, pid: u16, rec: bool, now_ms: u64) {
        // The connection's hint finds its session without hashing the client id.
        let Some((c, key)) = held_key(&mut self.conns, &self.sessions, conn) else { return };
        let share_busy = c.share_busy;
        let Some(s) = self.sessions.at_mut(key) else { return };
        self.commits.touch(s);
        match s.inflight.get(pid) {
            Some(Inflight::Publish(d)) if rec && d.qos == 2 => {
                s.inflight.insert(pid, Inflight::Release);
                self.send(conn, Packet::PubRel(PubResp { packet_id: pid, code: 0, properties: Properties::default() }));
            }
            Some(Inflight::Release) if rec => {
                self.send(conn, Packet::PubRel(PubResp { packet_id: pid, code: 0, properties: Properties::default() }));
            }
            Some(_) if !rec => {
                s.inflight.remove(pid);
                let id = s.client_id.clone();
                self.pump_and_release_at(&id, key, now_ms);
                if share_busy {
                    self.report_share_load(&id);
                }
            }
            _ => {}
        }
    }

    pub(super) fn deliver_shared(
        &mut self,
        id: &ClientId,
        msg: Msg,
        opts: SubOptions,
        sub_id: Option<u32>,
        routing: &mut Routing,
        now_ms: u64,
    ) {
        let d = Delivery {
            qos: opts.qos.min(msg.qos),
            retain: opts.retain_as_published && msg.retain,
            sub_ids: sub_id.into_iter().collect(),
            msg,
            queued_s: crate::session::queued_tag(now_ms),
        };
        self.deliver(id, d, routing, now_ms);
    }

    /// Hands one message to one session: straight out if connected and the window allows,
    /// otherwise into its bounded queue (QoS 0 is not queued for offline sessions).
    pub(super) fn deliver(&mut self, id: &ClientId, d: Delivery, routing: &mut Routing, now_ms: u64) {
        // Looked up once; the steps below reach the session by its key.
        let Some(key) = self.sessions.key_of(&**id) else { return };
        let Some(s) = self.sessions.at_mut(key) else { return };
        match s.conn {
            Some(conn) if d.qos == 0 => {
                let Some(c) = self.conns.get(&conn) else { return };
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
                self.commits.touch(s);
                if s.stored {
                    routing.stored = true;
                }
                // With the message queued (as it is, for a moment, when it goes straight out).
                let queued = s.queue.len() + 1;
                let congested = s.conn.is_some()
                    && s.conn != routing.publisher
                    && queued * 2 >= self.limits.max_queued_messages
                    && self.limits.max_backpressure_ms > 0
                    && !self.drain.is_slow(id);
                if congested {
                    routing.note_congested(id);
                }
                let Some(s) = self.sessions.at_mut(key) else { return };
                match s.conn.filter(|_| s.queue.is_empty()) {
                    // Nothing waits before it: what `pump` would do with it, without the
                    // queue's push and pop and the lookups of another pass.
                    Some(conn) => self.send_or_queue(key, conn, d, now_ms),
                    None => {
                        s.queue.push_back(d);
                        self.pump_at(key, now_ms);
                    }
                }
            }
        }
    }

    /// Moves queued messages into flight while the client's window has room and its output
    /// buffer is under `max_outbound_buffer_bytes`: a message in flight is an encoded copy for
    /// this client, a queued one a pointer shared with every other queue it is in, so a client
    /// that stops reading pins at most the window or the buffer limit, whichever comes first.
    pub(super) fn pump(&mut self, id: &ClientId, now_ms: u64) {
        if let Some(key) = self.sessions.key_of(&**id) {
            self.pump_at(key, now_ms);
        }
    }

    /// [`Shard::pump`] of the session at `key` (found in this handler).
    pub(super) fn pump_at(&mut self, key: SessionKey, now_ms: u64) {
        loop {
            let Some(s) = self.sessions.at_mut(key) else { return };
            let Some(conn) = s.conn else { return };
            if !may_send(&mut self.conns, &self.limits, s, conn) {
                return;
            }
            let Some(d) = s.queue.pop_front() else { return };
            self.send_now(key, conn, d, now_ms);
        }
    }

    /// A message for the connected session at `key` with nothing queued before it: out now if
    /// the window and the output buffer allow (as [`Shard::pump`] would send it), else queued.
    fn send_or_queue(&mut self, key: SessionKey, conn: ConnId, d: Delivery, now_ms: u64) {
        let Some(s) = self.sessions.at_mut(key) else { return };
        if may_send(&mut self.conns, &self.limits, s, conn) {
            self.send_now(key, conn, d, now_ms);
        } else {
            s.queue.push_back(d);
        }
    }

    /// Writes `d` to `conn`, the connection of the session at `key`, whose window has room:
    /// QoS 1/2 under a new packet id, in flight from then on.
    fn send_now(&mut self, key: SessionKey, conn: ConnId, d: Delivery, now_ms: u64) {
        if d.qos == 0 {
            self.write_publish(conn, &d, 0, false, now_ms);
            return;
        }
        let Some(s) = self.sessions.at_mut(key) else { return };
        let pid = s.alloc_pid();
        if d.sub_ids.is_empty() {
            // In flight before it is written (a pointer copy), so that the session is reached
            // once per message; taken out again if the message was dropped instead.
            s.inflight.insert(pid, Inflight::Publish(d.clone()));
            if !self.write_publish(conn, &d, pid, false, now_ms) {
                if let Some(s) = self.sessions.at_mut(key) {
                    s.inflight.remove(pid);
                }
            }
        } else if self.write_publish(conn, &d, pid, false, now_ms) {
            // Subscription ids would make that copy an allocation: a second access instead.
            if let Some(s) = self.sessions.at_mut(key) {
                s.inflight.insert(pid, Inflight::Publish(d));
            }
        }
    }

    /// Session `id` hosted here is a member of shared groups whose owners may be on other
    /// shards, which cannot see its window: tell them when it turned busy (as
    /// [`member_busy`] judges) and when it has room again — at most half its window in flight
    /// and nothing queued, so that a member working at its window's edge does not send a
    /// message per delivery. Called after a shared delivery here and, while it is busy, after
    /// each acknowledgement.
    pub(super) fn report_share_load(&mut self, id: &ClientId) {
        let Some(s) = self.sessions.get(id) else { return };
        let Some(c) = s.conn.and_then(|conn| self.conns.get_mut(&conn)) else { return };
        let busy = if c.share_busy {
            let window = usize::from(c.client_receive_max.min(self.limits.max_inflight));
            !(s.queue.is_empty() && s.inflight.len() * 2 <= window)
        } else {
            member_busy(&self.sessions, &self.conns, &self.limits, id).is_some()
        };
        let Some(c) = s.conn.and_then(|conn| self.conns.get_mut(&conn)) else { return };
        if busy == c.share_busy {
            return;
        }
        c.share_busy = busy;
        for filter in s.subs.keys() {
            if let Some(Ok((group, f))) = topic::parse_shared(filter) {
                let key = share_key(group, f);
                let owner = shard_of(&key, self.n_shards);
                if owner != self.id {
                    // The owner on this shard sees the session itself.
                    self.effects.to_shards.push((owner, ShardMsg::ShareBusy { key, client_id: id.clone(), busy }));
                }
            }
        }
    }

    /// Encodes one PUBLISH to `conn`. Returns false when the message was dropped instead (expired,
    /// or larger than the client accepts): it then counts as delivered.
    pub(super) fn write_publish(&mut self, conn: ConnId, d: &Delivery, pid: u16, dup: bool, now_ms: u64) -> bool {
        let Some(left) = expiry_left_secs(&d.msg, now_ms) else {
            self.stats.dropped_expired += 1;
            return false;
        };
        let Some(c) = self.conns.get_mut(&conn) else { return false };
        if let Some(auth) = c.auth.as_mut() {
            // Rules reloaded since: a subscription granted before no longer reads what they deny.
            if let (Some(rules), ConnState::Active { client_id }) = (self.access.rules_for(c.listener), &c.state) {
                auth.refresh(rules, client_id);
            }
            if !auth.may_read(&d.msg.topic) {
                // Whatever route it came by (live, queued, retained, shared, Kafka): not this client's.
                self.stats.acl_dropped += 1;
                return false;
            }
        }
        let v5 = c.is_v5();
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
            self.stats.sent_by_qos[usize::from(d.qos.min(2))] += 1;
            true
        } else {
            self.stats.dropped_too_large += 1;
            false
        }
    }
}

/// For the shared-subscription pick ([`ShareGroups::pick`]): `Some(backlog)` when the session
/// `id`, hosted here, cannot put one more message on the wire now — offline, its in-flight
/// window full, messages already queued, or its output buffer full — `None` when it can.
pub(super) fn member_busy(
    sessions: &Sessions,
    conns: &HashMap<ConnId, Box<Conn>>,
    limits: &Limits,
    id: &ClientId,
) -> Option<usize> {
    let Some(s) = sessions.get(id) else { return Some(usize::MAX) };
    let backlog = s.inflight.len() + s.queue.len();
    let Some(c) = s.conn.and_then(|conn| conns.get(&conn)) else { return Some(backlog) };
    let window = usize::from(c.client_receive_max.min(limits.max_inflight));
    let room = s.queue.is_empty() && s.inflight.len() < window && c.out.len() < limits.max_outbound_buffer_bytes;
    (!room).then_some(backlog)
}

/// Whether session `s` may put one more message on `conn` now: the connection is active, its
/// output buffer under `max_outbound_buffer_bytes` (else marked full, to pump again once it
/// drained) and the in-flight window has room.
fn may_send(conns: &mut HashMap<ConnId, Box<Conn>>, limits: &Limits, s: &Session, conn: ConnId) -> bool {
    let Some(c) = conns.get_mut(&conn) else { return false };
    if !c.is_active() {
        return false;
    }
    if c.out.len() >= limits.max_outbound_buffer_bytes {
        c.out_full = true;
        return false;
    }
    let window = usize::from(c.client_receive_max.min(limits.max_inflight));
    s.inflight.len() < window
}
