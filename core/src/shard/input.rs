//! Bytes in: decode packets in order, hold input while the connection is blocked (bounded, then
//! the network layer stops reading), and dispatch each packet of an active connection to its
//! handler after checking the connection rule ([`Shard::held`]). 3.1.1 QoS 2 flow control
//! (the deferral queue) lives here too.

use super::*;
use bytes::Buf;

impl Shard {
    /// Bytes arrived on `conn`. Decodes and handles every whole packet in `buf`, leaving a partial
    /// one there for the next call. The caller keeps `buf` only while it is not empty, and grows
    /// it only by what arrives (the pre-CONNECT budget counts its capacity).
    pub fn on_bytes(&mut self, conn: ConnId, buf: &mut BytesMut, now_ms: u64) {
        self.on_bytes_within(conn, buf, now_ms, usize::MAX);
    }

    /// [`Shard::on_bytes`], handling whole packets only until `budget` bytes were handled: the
    /// rest stays in `buf` for a later call. Returns whether it stopped for the budget (whole
    /// packets may be left), as against having handled every whole packet there is. A network
    /// layer that received far more than it wants handled at once (io_uring's multishot
    /// receives) keeps its per-turn fairness with it.
    pub fn on_bytes_within(&mut self, conn: ConnId, buf: &mut BytesMut, now_ms: u64, budget: usize) -> bool {
        let before = buf.len();
        let stopped = self.on_bytes_inner(conn, buf, now_ms, budget);
        // Counted as handled: what stays in `buf` comes again with the next call.
        self.stats.bytes_received += (before - buf.len()) as u64;
        stopped
    }

    fn on_bytes_inner(&mut self, conn: ConnId, buf: &mut BytesMut, now_ms: u64, budget: usize) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else { return false };
        let mut stopped = false;
        if matches!(c.state, ConnState::AwaitConnect) {
            stopped = self.decode_all(conn, buf, now_ms, budget);
            self.account_preconnect(conn, buf, now_ms);
        } else if c.blocked() || !c.held.is_empty() {
            c.held.extend_from_slice(buf);
            buf.clear();
            if !c.blocked() || c.acks_may_pass(&c.held) {
                self.resume(conn, now_ms);
            }
        } else {
            stopped = self.decode_all(conn, buf, now_ms, budget);
            if let Some(c) = self.conns.get_mut(&conn) {
                if c.blocked() && !buf.is_empty() {
                    c.held.extend_from_slice(buf);
                    buf.clear();
                    stopped = false;
                }
            }
        }
        self.watch_held_input(conn);
        self.run_local(now_ms);
        stopped
    }

    /// Input held for a blocked connection is bounded: past [`HELD_INPUT_MAX`] the network
    /// layer stops reading it, and reads again once the state machine caught up.
    pub(super) fn watch_held_input(&mut self, conn: ConnId) {
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
    pub(super) fn account_preconnect(&mut self, conn: ConnId, buf: &mut BytesMut, now_ms: u64) {
        let Some(c) = self.conns.get(&conn) else { return };
        if !matches!(c.state, ConnState::AwaitConnect) {
            self.preconnect.leave(conn);
            // Input behind the CONNECT while its session is on the way waits in `held`.
            if c.blocked() && !buf.is_empty() {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.held.extend_from_slice(buf);
                    buf.clear();
                }
            }
            return;
        }
        let held = if buf.is_empty() { 0 } else { buf.capacity() };
        if let Err(over) = self.preconnect.account(conn, held) {
            buf.clear();
            self.refuse_over_budget(conn, over, now_ms);
        }
    }

    /// What `conn`'s transport (TLS, WebSocket) received so far: `received` socket bytes in all.
    /// Until its CONNECT is decoded they count against the shard's pre-CONNECT budget, like a
    /// partial CONNECT's buffer, and growing past the budget closes the connection. Returns
    /// whether they still count: false once the CONNECT is in (or the connection is gone), so
    /// the caller stops reporting.
    pub fn on_transport_input(&mut self, conn: ConnId, received: usize, now_ms: u64) -> bool {
        match self.preconnect.account_transport(conn, received) {
            Ok(counted) => counted,
            Err(over) => {
                self.refuse_over_budget(conn, over, now_ms);
                false
            }
        }
    }

    fn refuse_over_budget(&mut self, conn: ConnId, over: crate::preconnect::OverBudget, now_ms: u64) {
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
        self.close(conn, None, now_ms);
    }

    /// Handles packets held while the connection was blocked.
    pub(super) fn resume(&mut self, conn: ConnId, now_ms: u64) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let mut held = std::mem::take(&mut c.held);
        self.decode_all(conn, &mut held, now_ms, usize::MAX);
        if let Some(c) = self.conns.get_mut(&conn) {
            held.extend_from_slice(&c.held);
            c.held = if held.is_empty() { BytesMut::new() } else { held };
        }
        self.watch_held_input(conn);
    }

    /// Handles the whole packets in `buf` (until `budget` bytes were handled); returns whether
    /// the budget stopped it with bytes left.
    pub(super) fn decode_all(&mut self, conn: ConnId, buf: &mut BytesMut, now_ms: u64, budget: usize) -> bool {
        let start = buf.len();
        loop {
            let Some(c) = self.conns.get_mut(&conn) else { return false };
            if matches!(c.state, ConnState::Closing) {
                buf.clear();
                return false;
            }
            if c.blocked() && !c.acks_may_pass(buf) {
                return false;
            }
            if start - buf.len() >= budget && !buf.is_empty() {
                return true;
            }
            c.last_rx_ms = now_ms;
            // Before CONNECT the decoder reads the version from the CONNECT itself.
            let version = (!matches!(c.state, ConnState::AwaitConnect)).then_some(c.version);
            let max_size = match version {
                None => self.limits.max_connect_packet_bytes.min(self.limits.max_packet_size),
                Some(_) => self.limits.max_packet_size,
            };
            // The commonest packet of a subscriber, a plain PUBACK (four bytes: what 3.1.1
            // sends, and MQTT 5 for a success without properties), goes straight to its
            // handler, past the checks `on_packet` makes of it: no `Packet` (a few hundred
            // bytes with its properties) is built, moved and dropped. The decoder reads these
            // four bytes the same way.
            if let Some(pid) = version.and(plain_puback(buf)).filter(|_| max_size >= 4) {
                buf.advance(4);
                if self.held(conn).is_none() {
                    self.orphaned(conn, now_ms);
                } else {
                    self.on_ack(conn, pid, false, now_ms);
                }
                continue;
            }
            // A PUBLISH is decoded as itself and handed on without a `Packet` around it.
            let decoded = match version.filter(|_| buf.first().is_some_and(|b| b >> 4 == 3)) {
                Some(v) => match packet::decode_publish(buf, v, max_size as usize) {
                    Ok(Some(p)) => {
                        self.on_client_publish(conn, p, now_ms);
                        continue;
                    }
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                },
                None => packet::decode(buf, version, max_size as usize),
            };
            match decoded {
                Ok(Some(p)) => self.on_packet(conn, p, now_ms),
                Ok(None) => return false,
                Err(e) => {
                    self.stats.malformed += 1;
                    if version.is_none() && e.code == reason::UNSUPPORTED_PROTOCOL_VERSION {
                        // Answer in the 3.1.1 form every client version understands (the
                        // connection's version until a CONNECT is accepted).
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
                    return false;
                }
            }
        }
    }

    pub(super) fn on_packet(&mut self, conn: ConnId, p: Packet, now_ms: u64) {
        let Some(c) = self.conns.get(&conn) else { return };
        // Only a 3.1.1 client with packets already deferred, or sending QoS 2, can need the
        // deferral queue: everything else skips `must_defer`'s lookups.
        let may_defer =
            c.version == Version::V311 && (!c.deferred.is_empty() || matches!(&p, Packet::Publish(pb) if pb.qos == 2));
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
        if self.held(conn).is_none() {
            return self.orphaned(conn, now_ms);
        }
        if may_defer && self.must_defer(conn, &p) {
            return self.defer(conn, p);
        }
        self.handle_packet(conn, p, now_ms);
    }

    /// [`Shard::on_packet`] of a PUBLISH from a connection past CONNECT: the same checks, and
    /// one that may have to wait (3.1.1 QoS 2 flow control) takes that path as a `Packet`.
    fn on_client_publish(&mut self, conn: ConnId, p: Publish, now_ms: u64) {
        let Some(c) = self.conns.get(&conn) else { return };
        if c.version == Version::V311 && (!c.deferred.is_empty() || p.qos == 2) {
            return self.on_packet(conn, Packet::Publish(p), now_ms);
        }
        if self.held(conn).is_none() {
            return self.orphaned(conn, now_ms);
        }
        self.on_publish(conn, p, now_ms);
    }

    /// One packet of an active connection holding its session, in its turn.
    pub(super) fn handle_packet(&mut self, conn: ConnId, p: Packet, now_ms: u64) {
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
                let Some(id) = self.conns.get(&conn).and_then(|c| c.active_id().cloned()) else { return };
                let Some(s) = self.sessions.get_mut(&id) else { return };
                let found = s.incoming_qos2.remove(&r.packet_id);
                self.commits.touch(s);
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
            Packet::Unsubscribe(u) => self.on_unsubscribe(conn, u, now_ms),
            Packet::PingReq => {
                self.send(conn, Packet::PingResp);
            }
            Packet::Disconnect(d) => {
                let max_expiry = self.limits.max_session_expiry_secs;
                let Some((c, s)) = self.held(conn) else { return self.orphaned(conn, now_ms) };
                if let Some(e) = d.properties.session_expiry_interval {
                    if c.connect_expiry == 0 && e != 0 {
                        self.protocol_close(conn, reason::PROTOCOL_ERROR, "session expiry raised from 0", now_ms);
                        return;
                    }
                    s.expiry_secs = e.min(max_expiry);
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    if d.code != reason::DISCONNECT_WITH_WILL {
                        c.will = None;
                    }
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
    pub(super) fn must_defer(&self, conn: ConnId, p: &Packet) -> bool {
        let Some(c) = self.conns.get(&conn) else { return false };
        if c.version != Version::V311 {
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
    pub(super) fn qos2_room(&self, conn: ConnId, pid: u16) -> bool {
        let Some(s) = self.conns.get(&conn).and_then(|c| c.active_id()).and_then(|id| self.sessions.get(id)) else {
            return true;
        };
        s.incoming_qos2.contains(&pid) || s.incoming_qos2.len() < usize::from(self.limits.max_inflight)
    }

    pub(super) fn defer(&mut self, conn: ConnId, p: Packet) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.deferred_bytes += deferred_size(&p);
        c.deferred.push_back(p);
        c.deferred_full = c.deferred_bytes >= DEFERRED_BYTES_MAX;
    }

    /// A PUBREL made room: deferred packets run, in order, while they can.
    pub(super) fn run_deferred(&mut self, conn: ConnId, now_ms: u64) {
        loop {
            let Some(c) = self.conns.get(&conn) else { return };
            if c.pending_sub.is_some() || !c.is_active() {
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
    pub(super) fn holder(&self, conn: ConnId) -> Option<ClientId> {
        let c = self.conns.get(&conn)?;
        let id = c.active_id()?;
        (self.sessions.get(id)?.conn == Some(conn)).then(|| id.clone())
    }

    /// The rule every packet handler rests on, as one accessor: `conn` is active and holds its
    /// session here. `None` means the rule does not hold for `conn`; the handler then closes
    /// that connection ([`Shard::orphaned`]) instead of panicking the shard.
    pub(super) fn held(&mut self, conn: ConnId) -> Option<(&mut Conn, &mut Session)> {
        held_in(&mut self.conns, &mut self.sessions, conn)
    }

    /// `conn` sent a packet but does not hold its session here (any more): it closes with
    /// 0x8E, counted in `orphaned_packets`.
    pub(super) fn orphaned(&mut self, conn: ConnId, now_ms: u64) {
        self.stats.orphaned_packets += 1;
        self.protocol_close(conn, reason::SESSION_TAKEN_OVER, "the session moved to another connection", now_ms);
    }
}

/// The packet id of a PUBACK of remaining length 2 at the front of `buf`.
fn plain_puback(buf: &[u8]) -> Option<u16> {
    (buf.len() >= 4 && buf[0] == 0x40 && buf[1] == 2).then(|| u16::from_be_bytes([buf[2], buf[3]]))
}

/// [`Shard::held`] over the two tables only, so that the caller may use the shard's other parts
/// (limits, the session store) while it holds the connection and its session.
pub(super) fn held_in<'a>(
    conns: &'a mut HashMap<ConnId, Box<Conn>>,
    sessions: &'a mut Sessions,
    conn: ConnId,
) -> Option<(&'a mut Conn, &'a mut Session)> {
    let (c, key) = held_key(conns, sessions, conn)?;
    let s = sessions.at_mut(key)?;
    (s.conn == Some(conn)).then_some((c, s))
}

/// The connection and the key of the session it names (found through the connection's hint,
/// which is brought up to date), without checking that the session names it back.
pub(super) fn held_key<'a>(
    conns: &'a mut HashMap<ConnId, Box<Conn>>,
    sessions: &Sessions,
    conn: ConnId,
) -> Option<(&'a mut Conn, SessionKey)> {
    let c = conns.get_mut(&conn)?;
    let key = sessions.find(c.session_hint, c.active_id()?)?;
    c.session_hint = key;
    if let (Some(s), ConnState::Active { client_id }) = (sessions.at(key), &mut c.state) {
        if !Arc::ptr_eq(client_id, &s.client_id) {
            // The same id in the session's allocation: the next `find` compares pointers.
            *client_id = s.client_id.clone();
        }
    }
    Some((&mut **c, key))
}
