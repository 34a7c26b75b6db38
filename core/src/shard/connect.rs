//! CONNECT: validate it, claim the client id at its directory shard, and — once the session
//! arrived ([`ShardMsg::Transfer`](super::ShardMsg::Transfer)) — answer CONNACK, install the
//! session here and resend what was in flight. Also how a session is installed and ended, and
//! how a will is published.

use super::*;

impl Shard {
    /// A session ends for good: its will (if still waiting) goes out, its subscriptions go away.
    pub(super) fn end_session(&mut self, s: Box<Session>, now_ms: u64) {
        let client_id = s.client_id.clone();
        let persistent = s.stored;
        self.end_session_quietly(s, now_ms);
        if persistent {
            // In a cluster: no survivor rebuilds it should this node die.
            self.announce_session(&client_id, now_ms);
        }
        let dir = directory_shard(&client_id, self.n_shards);
        self.send_to_shard(dir, ShardMsg::Release { client_id, host: self.id });
    }

    pub(super) fn drop_subscriptions(&mut self, s: &mut Session) {
        for (filter, _) in s.subs.drain() {
            self.unsubscribe_one(&s.client_id, &filter);
        }
    }

    pub(super) fn publish_will(&mut self, client_id: &ClientId, w: Will, now_ms: u64) {
        let mut properties = w.properties;
        properties.will_delay_interval = None;
        let expiry = properties.message_expiry_interval.take();
        let msg = Arc::new(Message {
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            properties: properties.boxed(),
            expiry_at_ms: expiry.map(|e| now_ms + u64::from(e) * 1000),
            origin: client_id.clone(),
        });
        self.route(msg, &mut Routing::default(), now_ms);
    }

    pub(super) fn on_connect(&mut self, conn: ConnId, mut connect: Box<Connect>, now_ms: u64) {
        let v5 = connect.version.is_v5();
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.version = connect.version;
        if connect.properties.authentication_method.is_some() {
            return self.refuse_connect(conn, reason::BAD_AUTHENTICATION_METHOD, now_ms);
        }
        if connect.client_id.is_empty() {
            if !v5 && !connect.clean_start {
                return self.refuse_connect(conn, reason::CLIENT_IDENTIFIER_NOT_VALID, now_ms);
            }
            self.next_assigned += 1;
            connect.client_id = format!("sluice-{}-{}-{}", self.id, now_ms, self.next_assigned);
            if let Some(c) = self.conns.get_mut(&conn) {
                c.assigned_id = true;
            }
        }
        if let Some(w) = &connect.will {
            if !topic::valid_topic_name(&w.topic, &self.topic_limits) {
                return self.refuse_connect(conn, reason::TOPIC_NAME_INVALID, now_ms);
            }
            if w.properties.payload_format_indicator == Some(1) && std::str::from_utf8(&w.payload).is_err() {
                return self.refuse_connect(conn, reason::PAYLOAD_FORMAT_INVALID, now_ms);
            }
        }
        if self.access.enabled() {
            let now_unix_ms = self.wall_offset_ms + now_ms as i64;
            let user = connect.username.as_deref();
            let identity = self.conns.get(&conn).and_then(|c| c.identity.clone());
            let listener = self.conns.get(&conn).map_or(0, |c| c.listener);
            let who = Credentials {
                listener,
                client_id: &connect.client_id,
                identity: identity.as_deref(),
                user,
                password: connect.password.as_ref(),
            };
            let decision = self.access.decide(conn, who, now_ms, now_unix_ms);
            match decision {
                Decision::Granted(auth) => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.auth = Some(auth);
                    }
                }
                Decision::Refused(code, why) => {
                    let addr = self.preconnect.addr_of(conn);
                    return self.refuse_credentials(conn, addr, &connect, code, why, now_ms);
                }
                Decision::Verify(job) => {
                    // The CONNECT waits (its input held) for the check, run off the shard.
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.state = ConnState::Authenticating { connect, addr: self.preconnect.addr_of(conn) };
                    }
                    self.effects.verify.push(job);
                    return;
                }
                Decision::Busy => {
                    self.stats.auth_busy += 1;
                    return self.refuse_connect(conn, reason::SERVER_BUSY, now_ms);
                }
            }
        }
        self.admit(conn, connect, now_ms);
    }

    /// The off-shard password check for `conn` came back: `ok` or not.
    pub fn on_verified(&mut self, conn: ConnId, ok: bool, now_ms: u64) {
        self.access.check_returned();
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if !matches!(c.state, ConnState::Authenticating { .. }) {
            return;
        }
        let ConnState::Authenticating { connect, addr } = std::mem::replace(&mut c.state, ConnState::AwaitConnect)
        else {
            return;
        };
        let (user, password) =
            (connect.username.as_deref().unwrap_or(""), connect.password.clone().unwrap_or_default());
        match self.access.verified(c.listener, user, &password, &connect.client_id, ok, now_ms) {
            Some(auth) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.auth = Some(auth);
                }
                self.admit(conn, connect, now_ms);
                self.resume(conn, now_ms);
            }
            None => {
                let code = reason::BAD_USERNAME_OR_PASSWORD;
                self.refuse_credentials(conn, addr, &connect, code, "bad password", now_ms)
            }
        }
        self.run_local(now_ms);
    }

    /// Refuses a CONNECT whose credentials failed: counted, logged (the first ones, then every
    /// thousandth), and answered after the back-off of its address.
    fn refuse_credentials(
        &mut self,
        conn: ConnId,
        addr: Option<IpAddr>,
        connect: &Connect,
        code: u8,
        why: &str,
        now_ms: u64,
    ) {
        self.stats.auth_failures += 1;
        let n = self.stats.auth_failures;
        if n <= 100 || n.is_multiple_of(1000) {
            let from = addr.map_or_else(|| "an unlisted address".to_string(), |a| a.to_string());
            self.effects.warnings.push(format!(
                "shard {}: refused CONNECT of client `{}` (user {:?}) from {from}: {why} (refusal {n}; all are counted in $SYS/broker/shard/{}/clients/auth_failures)",
                self.id, connect.client_id, connect.username, self.id
            ));
        }
        let delay = self.access.failed(addr, now_ms);
        if delay == 0 {
            return self.refuse_connect(conn, code, now_ms);
        }
        // Input is ignored meanwhile; the CONNACK goes when the back-off ran out.
        self.preconnect.leave(conn);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.will = None;
            c.state = ConnState::Closing;
        }
        self.access.delayed.push((now_ms + delay, conn, code));
    }

    /// Refusals whose back-off ran out: CONNACK, then close.
    pub(super) fn send_delayed_refusals(&mut self, now_ms: u64) {
        for (conn, code) in self.access.due(now_ms) {
            if self.conns.contains_key(&conn) {
                let refusal = ConnAck { session_present: false, code, properties: Properties::default() };
                self.send(conn, Packet::ConnAck(refusal));
                self.effects.close.push(conn);
            }
        }
    }

    /// CONNACK with `code` (mapped to a 3.1.1 return code for 3.1.1 clients), then close.
    pub(super) fn refuse_connect(&mut self, conn: ConnId, code: u8, now_ms: u64) {
        self.send(conn, Packet::ConnAck(ConnAck { session_present: false, code, properties: Properties::default() }));
        if let Some(c) = self.conns.get_mut(&conn) {
            c.will = None;
        }
        self.close(conn, None, now_ms);
    }

    /// An authenticated (or unauthenticated, without rules) CONNECT goes on: the connection
    /// limit, keep-alive, the will, and the claim at the client id's directory shard.
    fn admit(&mut self, conn: ConnId, mut connect: Box<Connect>, now_ms: u64) {
        let v5 = connect.version.is_v5();
        let will_denied = match (&connect.will, self.conns.get(&conn).and_then(|c| c.auth.as_deref())) {
            (Some(w), Some(a)) => !a.may_publish(&w.topic),
            _ => false,
        };
        if will_denied {
            self.stats.acl_denied += 1;
            return self.refuse_connect(conn, reason::NOT_AUTHORIZED, now_ms);
        }
        if !self.may_connect() {
            let code = if v5 { reason::QUOTA_EXCEEDED } else { reason::SERVER_UNAVAILABLE };
            return self.refuse_connect(conn, code, now_ms);
        }
        if self.claims.fenced {
            // Cut off from Kafka: this node cannot claim the client id (3.1.1 and 5.0 both
            // have "server unavailable", 3).
            let code = if v5 { reason::SERVER_UNAVAILABLE } else { 3 };
            return self.refuse_connect(conn, code, now_ms);
        }
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let mut ka = u64::from(connect.keep_alive);
        let cap = u64::from(self.limits.max_keep_alive_secs);
        if cap > 0 && (ka == 0 || ka > cap) {
            ka = cap;
        }
        c.keep_alive_ms = ka * 1000;
        c.will = connect.will.take().map(Box::new);
        if v5 {
            let p = &connect.properties;
            c.client_max_packet = p.maximum_packet_size.map_or(usize::MAX, |m| m as usize);
            c.client_receive_max = p.receive_maximum.unwrap_or(u16::MAX);
            c.client_alias_max = p.topic_alias_maximum.unwrap_or(0);
            c.connect_expiry = p.session_expiry_interval.unwrap_or(0);
            c.problem_information = p.request_problem_information != Some(0);
        }
        let client_id: ClientId = connect.client_id.as_str().into();
        let clean_start = connect.clean_start;
        c.state = ConnState::Pending { client_id: client_id.clone(), connect };
        let dir = directory_shard(&client_id, self.n_shards);
        self.send_to_shard(dir, ShardMsg::Claim { client_id, host: self.id, conn, clean_start });
    }

    /// The session for a pending connection arrived (or there is none): finish the CONNECT.
    pub(super) fn on_transfer(
        &mut self,
        client_id: ClientId,
        conn: ConnId,
        session: Option<Box<Session>>,
        remote: Option<Arc<str>>,
        now_ms: u64,
    ) {
        if let (None, Some(holder)) = (&session, remote) {
            // Another cluster node holds the session: CONNACK waits for its handover.
            if self.await_handover(conn, &client_id, holder, now_ms) {
                return;
            }
        }
        let pending = match self.conns.get_mut(&conn) {
            Some(c) if matches!(&c.state, ConnState::Pending { client_id: id, .. } if *id == client_id) => {
                match std::mem::replace(&mut c.state, ConnState::Active { client_id: client_id.clone() }) {
                    ConnState::Pending { connect, .. } => Some(connect),
                    _ => None,
                }
            }
            _ => None,
        };
        let dir = directory_shard(&client_id, self.n_shards);
        let Some(connect) = pending else {
            // The connection went away while its session was on the way: keep the session here.
            let hosting = match session {
                Some(mut s) if s.expiry_secs > 0 => {
                    s.conn = None;
                    if s.expiry_secs != u32::MAX {
                        s.expires_at_ms = Some(now_ms + u64::from(s.expiry_secs) * 1000);
                    }
                    self.adopt(s);
                    true
                }
                Some(s) => {
                    self.end_session_quietly(s, now_ms);
                    false
                }
                None => false,
            };
            self.send_to_shard(dir, ShardMsg::Settled { client_id, host: self.id, hosting });
            return;
        };
        let v5 = connect.version.is_v5();
        let mut session_present = false;
        let mut session = match session {
            Some(mut old) if !connect.clean_start => {
                session_present = true;
                // A new connection to this session cancels a will still waiting out its delay.
                old.pending_will = None;
                old
            }
            Some(old) => {
                self.end_session_quietly(old, now_ms);
                Box::new(Session::new(client_id.clone()))
            }
            None => Box::new(Session::new(client_id.clone())),
        };
        session.expiry_secs = if v5 {
            connect.properties.session_expiry_interval.unwrap_or(0).min(self.limits.max_session_expiry_secs)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        };
        session.expires_at_ms = None;
        session.conn = Some(conn);
        self.stats.clients_connected += 1;
        let (assigned_id, keep_alive_ms) =
            self.conns.get(&conn).map_or((false, 0), |c| (c.assigned_id, c.keep_alive_ms));
        let mut props = Properties::default();
        if v5 {
            if assigned_id {
                props.assigned_client_identifier = Some(client_id.to_string());
            }
            props.receive_maximum = Some(self.limits.max_inflight);
            props.topic_alias_maximum = Some(self.limits.topic_alias_maximum);
            props.maximum_packet_size = Some(self.limits.max_packet_size);
            props.retain_available = Some(1);
            props.wildcard_subscription_available = Some(1);
            props.subscription_identifier_available = Some(1);
            props.shared_subscription_available = Some(1);
            let asked = connect.properties.session_expiry_interval.unwrap_or(0);
            if asked != session.expiry_secs {
                props.session_expiry_interval = Some(session.expiry_secs);
            }
            if u64::from(connect.keep_alive) * 1000 != keep_alive_ms {
                props.server_keep_alive = Some((keep_alive_ms / 1000) as u16);
            }
        }
        self.send(conn, Packet::ConnAck(ConnAck { session_present, code: reason::SUCCESS, properties: props }));
        self.adopt(session);
        if !self.claims.claimed_before_connack(conn) {
            self.claim_session(conn, &client_id, connect.clean_start, now_ms);
        }
        // Before anything below can end the session (a lost connection sends `Release`).
        self.send_to_shard(dir, ShardMsg::Settled { client_id: client_id.clone(), host: self.id, hosting: true });
        // Redeliver what was in flight, in order, then whatever waited in the queue.
        let resend: Vec<(u16, Inflight)> = match self.sessions.get(&client_id) {
            Some(s) => s.inflight.sorted().into_iter().map(|(k, v)| (k, v.clone())).collect(),
            None => Vec::new(),
        };
        for (pid, inf) in resend {
            match inf {
                Inflight::Publish(d) => {
                    if !self.write_publish(conn, &d, pid, true, now_ms) {
                        if let Some(s) = self.sessions.get_mut(&client_id) {
                            s.inflight.remove(pid);
                        }
                    }
                }
                Inflight::Release => {
                    self.send(
                        conn,
                        Packet::PubRel(PubResp { packet_id: pid, code: 0, properties: Properties::default() }),
                    );
                }
            }
        }
        self.pump(&client_id, now_ms);
        self.feed_retained(&client_id, now_ms);
        if self.conns.get(&conn).is_some_and(|c| c.lost) {
            self.detach(conn, Detach::Lost, now_ms);
            self.conns.remove(&conn);
            return;
        }
        self.resume(conn, now_ms);
    }

    /// Installs a session on this shard: its subscriptions enter this shard's trie.
    pub(super) fn adopt(&mut self, mut s: Box<Session>) {
        s.generation += 1;
        self.commits.touch(&mut s);
        self.install(s);
    }

    /// Puts a session in this shard's tables: its subscriptions into the trie, its shared ones
    /// to their groups' owners.
    pub(super) fn install(&mut self, s: Box<Session>) {
        let id = s.client_id.clone();
        if let Some(mut old) = self.sessions.remove(&id) {
            // The directory hands a session over one claim at a time, so this should not happen;
            // should it, the older session's connection goes (0x8E) rather than living on
            // without a session.
            debug_assert!(false, "two sessions of one client id on one shard");
            if let Some(c) = old.conn.take() {
                self.close_why(c, Some(reason::SESSION_TAKEN_OVER), None, 0);
            }
            self.drop_subscriptions(&mut old);
        }
        for (filter, sub) in &s.subs {
            match topic::parse_shared(filter) {
                Some(Ok((group, f))) => {
                    let key = share_key(group, f);
                    let owner = shard_of(&key, self.n_shards);
                    let member =
                        ShareMember { client_id: id.clone(), shard: self.id, opts: sub.opts, sub_id: sub.sub_id };
                    self.send_to_shard(owner, ShardMsg::ShareJoin { key, member, ack: None });
                }
                _ => {
                    self.trie.insert(filter, id.clone(), sub.clone());
                }
            }
        }
        self.sessions.insert(id, s);
    }

    /// A session replaced by a clean start: its will goes out, subscriptions go; the directory
    /// already names the new host, so no Release.
    pub(super) fn end_session_quietly(&mut self, mut s: Box<Session>, now_ms: u64) {
        self.cancel_retained_feed(&s.client_id);
        self.commits.touch(&mut s);
        if let Some((_, w)) = s.pending_will.take() {
            self.publish_will(&s.client_id, *w, now_ms);
        }
        self.drop_subscriptions(&mut s);
    }
}
