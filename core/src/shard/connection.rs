//! A connection's life on the shard outside its packets: accept (with the pre-CONNECT
//! admission), loss, output handed to the network layer, closing (MQTT 5 DISCONNECT with a
//! reason first) and detaching from the session.

use super::*;

impl Shard {
    /// Whether a socket from `peer` may be accepted as far as `max_preconnect_per_address` goes
    /// (check [`Shard::may_accept`] too). A refusal is counted, and logged once per episode.
    pub fn admit_from(&mut self, peer: IpAddr) -> bool {
        match self.preconnect.admit(peer) {
            Admission::Accept => true,
            Admission::Refuse { first } => {
                self.stats.refused_preconnect += 1;
                if first {
                    self.effects.warnings.push(format!(
                        "shard {}: {peer} has {} connections that have not completed CONNECT \
                         (max_preconnect_per_address); refusing more from it until one completes or closes",
                        self.id, self.limits.max_preconnect_per_address
                    ));
                }
                false
            }
        }
    }

    /// A new connection was accepted from `peer` (admitted by [`Shard::admit_from`]).
    pub fn on_open_from(&mut self, conn: ConnId, peer: IpAddr, now_ms: u64) {
        self.open_conn(conn, Some(peer), now_ms);
    }

    /// A new connection was accepted from an address that does not count against
    /// `max_preconnect_per_address`.
    pub fn on_open(&mut self, conn: ConnId, now_ms: u64) {
        self.open_conn(conn, None, now_ms);
    }

    pub(super) fn open_conn(&mut self, conn: ConnId, peer: Option<IpAddr>, now_ms: u64) {
        self.preconnect.open(conn, peer, now_ms);
        self.conns.insert(conn, Box::new(Conn::new(now_ms)));
    }

    /// Where `conn` came from, as its transport established it before its first byte reaches
    /// the state machine: the index of the listener that accepted it, and the identity the
    /// transport proved (a verified client certificate's name), if any.
    pub fn set_origin(&mut self, conn: ConnId, listener: u16, identity: Option<Box<str>>) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.listener = listener;
            c.identity = identity;
        }
    }

    /// Whether the connection is waiting for its session; the caller should hold further input.
    pub fn is_pending(&self, conn: ConnId) -> bool {
        matches!(self.conns.get(&conn).map(|c| &c.state), Some(ConnState::Pending { .. }))
    }

    /// The socket closed or failed without a DISCONNECT (or after we decided to close it).
    pub fn on_lost(&mut self, conn: ConnId, now_ms: u64) {
        self.preconnect.leave(conn);
        match self.conns.get_mut(&conn).map(|c| (&c.state, &mut c.lost)) {
            // The CONNECT was accepted but its session is still on the way: finish it when it
            // arrives, then treat the connection as lost (so its will is published).
            Some((ConnState::Pending { .. }, lost)) => *lost = true,
            Some((ConnState::Closing, _)) => {
                self.conns.remove(&conn);
            }
            Some(_) => {
                self.detach(conn, Detach::Lost, now_ms);
                self.conns.remove(&conn);
            }
            None => {}
        }
        self.run_local(now_ms);
    }

    /// Takes the bytes waiting to be written to `conn`.
    pub fn take_output(&mut self, conn: ConnId) -> Option<BytesMut> {
        let c = self.conns.get_mut(&conn)?;
        if c.out.is_empty() {
            return None;
        }
        let out = c.out.split();
        c.out_hint = out.len().min(OUT_HINT_MAX) as u32;
        // What is left shares the allocation just handed out: keep it only while it is worth
        // reusing, and no larger than what was taken, so that an idle connection pins no
        // buffer and one that got a burst, then a trickle, does not pin the burst's size.
        if c.out.capacity() < 1024 || c.out.capacity() > out.len() {
            c.out = BytesMut::new();
        }
        Some(out)
    }

    /// Everything handed out for `conn` so far went out (the kernel took it). Messages that waited
    /// for room in its output buffer move on; returns whether there is something to dispatch (new
    /// output, messages for other shards, retained work).
    pub fn on_output_drained(&mut self, conn: ConnId, now_ms: u64) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else { return false };
        if !std::mem::take(&mut c.out_full) {
            return false;
        }
        let Some(id) = c.active_id().cloned() else { return false };
        self.pump_and_release(&id, now_ms);
        // Feeding retained messages may have asked an owner (this shard too) for more.
        self.run_local(now_ms);
        let fx = &self.effects;
        self.conns.get(&conn).is_some_and(|c| !c.out.is_empty()) || !fx.to_shards.is_empty() || fx.retained_work
    }

    /// Closes connections whose CONNECT is not complete `connect_timeout_ms` after accept, however
    /// many bytes they sent meanwhile. Called from the 500 ms scan: a connection is closed between
    /// the deadline and half a second (plus one tick) later.
    pub(super) fn close_connect_late(&mut self, now_ms: u64) {
        for id in self.preconnect.expired(now_ms) {
            self.stats.connect_timeouts += 1;
            // No DISCONNECT: before CONNACK there is nothing to answer with.
            self.close(id, None, now_ms);
        }
    }

    /// Encodes `p` for `conn`. Returns false (and sends nothing) when the client's Maximum Packet
    /// Size would be exceeded.
    pub(super) fn send(&mut self, conn: ConnId, p: Packet) -> bool {
        match &p {
            Packet::Publish(publish) => self.send_publish(conn, &publish.into()),
            _ => self.send_encoded(conn, |v| packet::encoded_len(&p, v), |v, out| packet::encode(&p, v, out)),
        }
    }

    /// A PUBACK/PUBREC/PUBREL/PUBCOMP (`first`: its first byte) with success and no
    /// properties: the four bytes [`packet::encode`] writes for it in either version.
    pub(super) fn send_plain_resp(&mut self, conn: ConnId, first: u8, pid: u16) -> bool {
        self.send_encoded(
            conn,
            |_| 4,
            |_, out| {
                let [hi, lo] = pid.to_be_bytes();
                out.extend_from_slice(&[first, 2, hi, lo]);
                4
            },
        )
    }

    /// [`Shard::send`] for a delivery, encoded from borrowed parts.
    pub(super) fn send_publish(&mut self, conn: ConnId, p: &PublishRef<'_>) -> bool {
        self.send_encoded(conn, |v| packet::publish_len(p, v), |v, out| packet::encode_publish(p, v, out))
    }

    /// Appends a packet to `conn`'s output unless it is larger than the client accepts.
    pub(super) fn send_encoded(
        &mut self,
        conn: ConnId,
        len: impl FnOnce(Version) -> usize,
        encode: impl FnOnce(Version, &mut BytesMut) -> usize,
    ) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else { return false };
        let version = c.version;
        if c.client_max_packet != usize::MAX && len(version) > c.client_max_packet {
            return false;
        }
        let was_empty = c.out.is_empty();
        if c.out.capacity() == 0 {
            c.out.reserve(c.out_hint as usize);
        }
        let n = encode(version, &mut c.out);
        self.stats.bytes_sent += n as u64;
        if was_empty {
            self.effects.dirty.push(conn);
        }
        true
    }

    /// Closes `conn`: for MQTT 5 a DISCONNECT with `code` first. The will is published unless the
    /// client sent DISCONNECT 0x00 (the caller clears it then) or the broker is shutting down.
    pub(super) fn close(&mut self, conn: ConnId, code: Option<u8>, now_ms: u64) {
        self.close_why(conn, code, None, now_ms)
    }

    /// [`Shard::close`] with a reason string for MQTT 5 clients that did not opt out of problem
    /// information.
    pub(super) fn close_why(&mut self, conn: ConnId, code: Option<u8>, why: Option<&str>, now_ms: u64) {
        let Some(c) = self.conns.get(&conn) else { return };
        if matches!(c.state, ConnState::Closing) {
            return;
        }
        self.preconnect.leave(conn);
        if let (Some(code), true) = (code, c.is_active() && c.is_v5()) {
            let reason_string = why.filter(|_| c.problem_information).map(str::to_string);
            let properties = Properties { reason_string, ..Default::default() };
            self.send(conn, Packet::Disconnect(Disconnect { code, properties }));
        }
        self.detach(conn, Detach::Lost, now_ms);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = ConnState::Closing;
        }
        self.effects.close.push(conn);
    }

    pub(super) fn protocol_close(&mut self, conn: ConnId, code: u8, why: &str, now_ms: u64) {
        self.close_why(conn, Some(code), Some(why), now_ms);
    }

    /// Separates a connection from its session: will handling starts here, and for a session
    /// that stays on this shard (`Detach::Lost`) so does its expiry. A session that `Moves` to
    /// another connection's shard keeps living there; a will with a delay waits with it.
    pub(super) fn detach(&mut self, conn: ConnId, how: Detach, now_ms: u64) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let will = c.will.take();
        let ConnState::Active { client_id: id } = std::mem::replace(&mut c.state, ConnState::Closing) else { return };
        self.stats.clients_connected = self.stats.clients_connected.saturating_sub(1);
        let Some(s) = self.sessions.get_mut(&id) else { return };
        if s.conn != Some(conn) {
            return;
        }
        s.conn = None;
        let expiry = s.expiry_secs;
        // Nobody reads this session's queue now: publishers are not held back for it.
        self.release_drain_waiters(&id);
        let Some(s) = self.sessions.get_mut(&id) else { return };
        if let Some(w) = will {
            let delay = w.properties.will_delay_interval.unwrap_or(0);
            if delay > 0 && (expiry > 0 || how == Detach::Moves) {
                s.pending_will = Some((now_ms + u64::from(delay.min(expiry)) * 1000, w));
            } else {
                self.publish_will(&id, *w, now_ms);
            }
        }
        // A will still waiting out its delay stays in the cluster's table (the others publish
        // it should this node die meanwhile); otherwise nothing of this connection is left.
        // (A connection moving to another shard here is claimed again by its new shard.)
        if how == Detach::Lost && self.sessions.get(&id).is_some_and(|s| s.pending_will.is_none()) {
            self.release_claim(conn, &id, now_ms);
        }
        if how == Detach::Moves {
            return;
        }
        let Some(s) = self.sessions.get_mut(&id) else { return };
        let was_stored = s.stored;
        self.commits.touch(s);
        if expiry == 0 {
            if let Some(mut s) = self.sessions.remove(&id) {
                // A persistent session whose expiry went to 0 (DISCONNECT, a takeover) ends as
                // one: in a cluster its end is announced (the touch above cleared `stored`).
                s.stored |= was_stored;
                self.end_session(s, now_ms);
            }
        } else if expiry != u32::MAX {
            s.expires_at_ms = Some(now_ms + u64::from(expiry) * 1000);
        }
    }
}
