//! What outlives a connection, and its on-disk form.
//!
//! A [`Session`] is plain data owned by the shard hosting it; it moves between shards whole
//! ([`crate::shard::ShardMsg::Transfer`]). Persistent sessions (expiry > 0) and retained
//! messages are also written to the shard's stores (`sluice-net`), in the binary forms below, so
//! that a restarted broker — even after SIGKILL — finds subscriptions, offline queues and
//! in-flight QoS 1/2 state where it left them. Times are stored as wall-clock (Unix ms): the
//! shards' monotonic clock starts again at zero.

use crate::HashMap;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::bytes_reader::ByteReader;
use crate::message::{ClientId, ConnId, Message, Msg};
use crate::packet::{self, Packet, Properties, Publish, SubOptions, Version, Will};

mod window;
pub(crate) use window::InflightWindow;

#[derive(Clone, Debug)]
pub(crate) struct Sub {
    pub(crate) opts: SubOptions,
    pub(crate) sub_id: Option<u32>,
}

/// One message on its way to one session.
#[derive(Clone, Debug)]
pub(crate) struct Delivery {
    pub(crate) msg: Msg,
    pub(crate) qos: u8,
    pub(crate) retain: bool,
    pub(crate) sub_ids: Vec<u32>,
    /// When the shard queued or sent it, as [`queued_tag`] gives; 0: not known (restored from
    /// disk, handed over). A dead node's floor is taken from the oldest one pending (see
    /// [`crate::cluster::Claim::low`]).
    pub(crate) queued_s: u32,
}

/// [`Delivery::queued_s`] of a message that is not in the cluster's log (a retained message
/// sent on subscribe): a survivor could not replay it, so it never holds a floor back.
pub(crate) const NOT_IN_LOG: u32 = u32::MAX;

/// [`Delivery::queued_s`] for `now_ms` (shard time): whole seconds plus one, so never 0.
pub(crate) fn queued_tag(now_ms: u64) -> u32 {
    (now_ms / 1000).min(u64::from(u32::MAX - 2)) as u32 + 1
}

/// The age in ms of a delivery queued with `tag` ([`crate::cluster::LOW_UNKNOWN`] for 0), never
/// less than its true age.
pub(crate) fn tag_age_ms(tag: u32, now_ms: u64) -> u64 {
    match tag {
        0 => crate::cluster::LOW_UNKNOWN,
        NOT_IN_LOG => 0,
        t => now_ms.saturating_sub(u64::from(t - 1) * 1000),
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Inflight {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Publish(Delivery),
    /// PUBREL sent, waiting for PUBCOMP.
    Release,
}

/// A session: what survives a connection. Moves between shards in [`ShardMsg::Transfer`](crate::shard::ShardMsg::Transfer).
#[derive(Debug)]
pub struct Session {
    pub(crate) client_id: ClientId,
    pub(crate) conn: Option<ConnId>,
    pub(crate) subs: HashMap<String, Sub>,
    pub(crate) inflight: InflightWindow,
    pub(crate) queue: VecDeque<Delivery>,
    pub(crate) next_pid: u16,
    /// QoS 2 packet ids received and PUBREC'd, waiting for PUBREL.
    pub(crate) incoming_qos2: BTreeSet<u16>,
    pub(crate) expiry_secs: u32,
    pub(crate) expires_at_ms: Option<u64>,
    /// A will waiting out its delay while the session is offline.
    pub(crate) pending_will: Option<(u64, Box<Will>)>,
    /// Bumped each time a shard adopts the session: when a crash leaves it in the stores of two
    /// shards, the higher generation is the newer.
    pub(crate) generation: u64,
    /// The session store may hold this session (it was persistent when last written).
    pub(crate) stored: bool,
}

impl Session {
    pub(crate) fn new(client_id: ClientId) -> Self {
        Session {
            client_id,
            conn: None,
            subs: HashMap::default(),
            inflight: InflightWindow::default(),
            queue: VecDeque::new(),
            next_pid: 1,
            incoming_qos2: BTreeSet::new(),
            expiry_secs: 0,
            expires_at_ms: None,
            pending_will: None,
            generation: 0,
            stored: false,
        }
    }

    pub(crate) fn alloc_pid(&mut self) -> u16 {
        loop {
            let pid = self.next_pid;
            self.next_pid = if pid == u16::MAX { 1 } else { pid + 1 };
            if !self.inflight.contains(pid) {
                return pid;
            }
        }
    }
}

/// Format of [`Session::encode`]; a record in another format is ignored when read.
const SESSION_FORMAT: u8 = 1;

impl Session {
    /// The client id this session belongs to.
    pub fn client_id(&self) -> &ClientId {
        &self.client_id
    }

    /// Binary form for the session store. A session connected now is stored as if it went
    /// offline at the restart (its expiry starts then).
    pub(crate) fn encode(&self, wall_offset_ms: i64, out: &mut Vec<u8>) {
        out.push(SESSION_FORMAT);
        out.extend_from_slice(&self.expiry_secs.to_le_bytes());
        let expires = match (self.conn, self.expires_at_ms) {
            (None, Some(at)) => wall_offset_ms + at as i64,
            _ => 0,
        };
        out.extend_from_slice(&expires.to_le_bytes());
        out.extend_from_slice(&self.next_pid.to_le_bytes());
        out.extend_from_slice(&(self.subs.len() as u32).to_le_bytes());
        for (filter, sub) in &self.subs {
            put_str(out, filter);
            let o = sub.opts;
            out.push(o.qos | u8::from(o.no_local) << 2 | u8::from(o.retain_as_published) << 3 | o.retain_handling << 4);
            out.extend_from_slice(&sub.sub_id.unwrap_or(0).to_le_bytes());
        }
        out.extend_from_slice(&(self.incoming_qos2.len() as u32).to_le_bytes());
        for pid in &self.incoming_qos2 {
            out.extend_from_slice(&pid.to_le_bytes());
        }
        out.extend_from_slice(&(self.inflight.len() as u32).to_le_bytes());
        for (pid, inf) in self.inflight.sorted() {
            out.extend_from_slice(&pid.to_le_bytes());
            match inf {
                Inflight::Publish(d) => {
                    out.push(1);
                    encode_delivery(d, wall_offset_ms, out);
                }
                Inflight::Release => out.push(0),
            }
        }
        out.extend_from_slice(&(self.queue.len() as u32).to_le_bytes());
        for d in &self.queue {
            encode_delivery(d, wall_offset_ms, out);
        }
    }

    /// [`Session::encode`] of its subscriptions and expiry alone (no messages): a handover too
    /// large for one record, a cluster's session record.
    pub(crate) fn encode_subscriptions(&self, wall_offset_ms: i64, out: &mut Vec<u8>) {
        let light =
            Session { subs: self.subs.clone(), expiry_secs: self.expiry_secs, ..Session::new(self.client_id.clone()) };
        light.encode(wall_offset_ms, out);
    }

    /// What a message on `topic` at `qos` (`retain`, from `publisher` for No Local) is for this
    /// session outside a live subscription table — a session brought from another node or
    /// rebuilt from the log: (QoS, retain flag, subscription ids) over its matching non-shared
    /// subscriptions (the highest QoS, every id), `None` when none takes it at QoS 1 or 2.
    pub(crate) fn offline_match(
        &self,
        topic: &str,
        qos: u8,
        retain: bool,
        publisher: &[u8],
    ) -> Option<(u8, bool, Vec<u32>)> {
        let mut best: Option<(u8, bool, Vec<u32>)> = None;
        for (filter, sub) in &self.subs {
            if crate::topic::parse_shared(filter).is_some() || !crate::topic::matches(filter, topic) {
                continue;
            }
            if sub.opts.no_local && publisher == self.client_id.as_bytes() {
                continue;
            }
            let b = best.get_or_insert((0, false, Vec::new()));
            b.0 = b.0.max(sub.opts.qos.min(qos));
            b.1 |= sub.opts.retain_as_published && retain;
            b.2.extend(sub.sub_id);
        }
        best.filter(|b| b.0 > 0)
    }

    /// The session stored by [`Session::encode`], offline; `None` if the bytes are not one.
    /// Messages that expired while stored are left out.
    pub(crate) fn decode(
        client_id: ClientId,
        generation: u64,
        b: &[u8],
        wall_offset_ms: i64,
        now_ms: u64,
    ) -> Option<Session> {
        let mut r = Reader::new(b);
        if r.u8().ok()? != SESSION_FORMAT {
            return None;
        }
        let mut s = Session::new(client_id);
        s.generation = generation;
        s.stored = true;
        s.expiry_secs = r.u32_le().ok()?;
        let expires = r.i64_le().ok()?;
        s.expires_at_ms = match (expires, s.expiry_secs) {
            (_, u32::MAX) => None,
            (0, e) => Some(now_ms + u64::from(e) * 1000),
            (at, _) => Some((at - wall_offset_ms).max(0) as u64),
        };
        s.next_pid = r.u16_le().ok()?.max(1);
        for _ in 0..r.u32_le().ok()? {
            let filter = r.str_u32_le().ok()?;
            let bits = r.u8().ok()?;
            let opts = SubOptions {
                qos: bits & 3,
                no_local: bits & 4 != 0,
                retain_as_published: bits & 8 != 0,
                retain_handling: bits >> 4 & 3,
            };
            let sub_id = Some(r.u32_le().ok()?).filter(|i| *i != 0);
            s.subs.insert(filter, Sub { opts, sub_id });
        }
        for _ in 0..r.u32_le().ok()? {
            s.incoming_qos2.insert(r.u16_le().ok()?);
        }
        for _ in 0..r.u32_le().ok()? {
            let pid = r.u16_le().ok()?;
            let inf = match r.u8().ok()? {
                1 => match decode_delivery(&mut r, wall_offset_ms, now_ms)? {
                    Some(d) => Inflight::Publish(d),
                    None => continue,
                },
                _ => Inflight::Release,
            };
            s.inflight.insert(pid, inf);
        }
        for _ in 0..r.u32_le().ok()? {
            if let Some(d) = decode_delivery(&mut r, wall_offset_ms, now_ms)? {
                s.queue.push_back(d);
            }
        }
        r.is_empty().then_some(s)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn encode_delivery(d: &Delivery, wall_offset_ms: i64, out: &mut Vec<u8>) {
    out.push(d.qos);
    out.push(u8::from(d.retain) | u8::from(d.msg.retain) << 1);
    out.extend_from_slice(&(d.sub_ids.len() as u32).to_le_bytes());
    for id in &d.sub_ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
    let mut m = Vec::new();
    StoredMessage::from_message(&d.msg, wall_offset_ms).encode(&mut m);
    out.extend_from_slice(&(m.len() as u32).to_le_bytes());
    out.extend_from_slice(&m);
}

/// `Some(None)`: well-formed, but the message expired.
fn decode_delivery(r: &mut Reader<'_>, wall_offset_ms: i64, now_ms: u64) -> Option<Option<Delivery>> {
    let qos = r.u8().ok()?;
    let flags = r.u8().ok()?;
    let mut sub_ids = Vec::new();
    for _ in 0..r.u32_le().ok()? {
        sub_ids.push(r.u32_le().ok()?);
    }
    let stored = StoredMessage::decode(r.bytes_u32_le().ok()?)?;
    let Some(mut msg) = stored.into_message(wall_offset_ms, now_ms) else { return Some(None) };
    msg.retain = flags & 2 != 0;
    Some(Some(Delivery { msg: Arc::new(msg), qos, retain: flags & 1 != 0, sub_ids, queued_s: 0 }))
}

/// The stored forms are read through [`ByteReader`]; any [`ReadError`](crate::bytes_reader::ReadError) (a short or corrupt
/// record) makes the record unreadable, which the callers treat as "drop it", so only the
/// `Option` survives.
type Reader<'a> = ByteReader<&'a [u8]>;

/// A message in its on-disk form (retained messages): self-contained, expiry as wall-clock time.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub properties: Properties,
    /// Unix ms, 0 = never.
    pub expiry_at_unix_ms: i64,
    pub origin: String,
}

impl StoredMessage {
    pub fn from_message(m: &Message, wall_offset_ms: i64) -> StoredMessage {
        StoredMessage {
            topic: m.topic.clone(),
            payload: m.payload.clone(),
            qos: m.qos,
            properties: m.properties().clone(),
            expiry_at_unix_ms: m.expiry_at_ms.map_or(0, |e| wall_offset_ms + e as i64),
            origin: m.origin.to_string(),
        }
    }

    /// `None` when it expired while stored.
    pub(crate) fn into_message(self, wall_offset_ms: i64, now_ms: u64) -> Option<Message> {
        let expiry_at_ms = match self.expiry_at_unix_ms {
            0 => None,
            at => {
                let local = at - wall_offset_ms;
                if local <= now_ms as i64 {
                    return None;
                }
                Some(local as u64)
            }
        };
        Some(Message {
            topic: self.topic,
            payload: self.payload,
            qos: self.qos,
            retain: true,
            properties: self.properties.boxed(),
            expiry_at_ms,
            origin: self.origin.into(),
        })
    }

    /// Binary form: the topic and payload as an MQTT 5 PUBLISH (reusing the codec and its
    /// checks), then expiry and origin.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let p = Packet::Publish(Publish {
            dup: false,
            qos: self.qos,
            retain: true,
            topic: self.topic.clone(),
            packet_id: if self.qos > 0 { 1 } else { 0 },
            properties: self.properties.clone().into(),
            payload: self.payload.clone(),
        });
        let mut b = BytesMut::new();
        packet::encode(&p, Version::V5, &mut b);
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(&b);
        out.extend_from_slice(&self.expiry_at_unix_ms.to_le_bytes());
        out.extend_from_slice(self.origin.as_bytes());
    }

    pub fn decode(b: &[u8]) -> Option<StoredMessage> {
        let mut r = Reader::new(b);
        let mut pkt = BytesMut::from(r.bytes_u32_le().ok()?);
        let Ok(Some(Packet::Publish(p))) = packet::decode(&mut pkt, Some(Version::V5), usize::MAX) else { return None };
        let expiry_at_unix_ms = r.i64_le().ok()?;
        let origin = std::str::from_utf8(r.rest()).ok()?.to_string();
        Some(StoredMessage {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            properties: p.properties.into_boxed().map(|b| *b).unwrap_or_default(),
            expiry_at_unix_ms,
            origin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_message_round_trip_and_expiry() {
        let m = Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"\x00hi"),
            qos: 1,
            retain: true,
            properties: Properties { user_properties: vec![("k".into(), "v".into())], ..Default::default() }.boxed(),
            expiry_at_ms: Some(5_000),
            origin: "dev".into(),
        };
        let s = StoredMessage::from_message(&m, 1_000_000);
        let mut b = Vec::new();
        s.encode(&mut b);
        let back = StoredMessage::decode(&b).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.expiry_at_unix_ms, 1_005_000);
        // Restored under another clock origin: still 4 s left.
        let restored = back.clone().into_message(1_001_000, 0).unwrap();
        assert_eq!(restored.expiry_at_ms, Some(4_000));
        assert!(back.into_message(1_010_000, 0).is_none(), "expired while stored");
        assert!(StoredMessage::decode(&b[..b.len() / 2]).is_none());
    }

    #[test]
    fn session_round_trip_keeps_subscriptions_queue_and_flight() {
        let msg = |topic: &str, expiry_at_ms| {
            Arc::new(Message {
                topic: topic.into(),
                payload: Bytes::from_static(b"p"),
                qos: 2,
                retain: true,
                properties: Properties { content_type: Some("text/plain".into()), ..Default::default() }.boxed(),
                expiry_at_ms,
                origin: "pub".into(),
            })
        };
        let d = |m: Msg| Delivery { msg: m, qos: 1, retain: false, sub_ids: vec![3, 9], queued_s: 0 };
        let mut s = Session::new("dev".into());
        s.expiry_secs = 3600;
        s.expires_at_ms = Some(10_000);
        s.next_pid = 42;
        let opts = SubOptions { qos: 2, no_local: true, retain_as_published: true, retain_handling: 2 };
        s.subs.insert("a/+/c".into(), Sub { opts, sub_id: Some(7) });
        s.subs.insert("$share/g/x".into(), Sub { opts: SubOptions::default(), sub_id: None });
        s.incoming_qos2.extend([5, 6]);
        s.inflight.insert(40, Inflight::Publish(d(msg("in/flight", None))));
        s.inflight.insert(41, Inflight::Release);
        s.queue.push_back(d(msg("queued", None)));
        s.queue.push_back(d(msg("expires", Some(1_500))));
        let mut b = Vec::new();
        s.encode(1_000_000, &mut b);
        // Read back under a clock that started 1 s later, at its time 1 000: 8 s of expiry left.
        let back = Session::decode("dev".into(), 4, &b, 1_001_000, 1_000).unwrap();
        assert_eq!((back.generation, back.expiry_secs, back.expires_at_ms, back.next_pid), (4, 3600, Some(9_000), 42));
        assert_eq!(back.subs.len(), 2);
        let a = &back.subs["a/+/c"];
        assert_eq!((a.opts, a.sub_id), (opts, Some(7)));
        assert_eq!(back.incoming_qos2, BTreeSet::from([5, 6]));
        match (back.inflight.get(40), back.inflight.get(41)) {
            (Some(Inflight::Publish(p)), Some(Inflight::Release)) => {
                assert_eq!((p.msg.topic.as_str(), p.qos, p.sub_ids.as_slice()), ("in/flight", 1, &[3, 9][..]));
                assert!(p.msg.retain && !p.retain);
                assert_eq!(p.msg.properties().content_type.as_deref(), Some("text/plain"));
            }
            o => panic!("{o:?}"),
        }
        // The message whose expiry passed while stored is gone.
        let topics: Vec<&str> = back.queue.iter().map(|d| d.msg.topic.as_str()).collect();
        assert_eq!(topics, ["queued"]);
        // Torn bytes are not a session.
        assert!(Session::decode("dev".into(), 4, &b[..b.len() - 1], 0, 0).is_none());
    }
}
