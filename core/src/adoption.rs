//! Rebuilding a dead node's persistent session from the cluster's message log.
//!
//! A persistent session's queue lives on its node's disk; when the node dies for good, what
//! survives is in Kafka: the session's subscriptions (its latest [`ClaimKind::Session`]
//! record) and every message any node published (`<prefix>.messages`). A survivor replays the
//! log from the dead node's *floor* (per partition, an offset below which nothing was still
//! queued or in flight for any of its persistent sessions, sent with its heartbeats) and keeps,
//! in log order, what the subscriptions take at QoS 1 or 2: the session as the dead node would
//! have had it, and possibly messages it had already delivered (at least once).
//!
//! Invariants: the result is a session in its stored form ([`Session::encode`]) no larger than
//! [`HANDOVER_MAX_BYTES`] plus one message (one Kafka record), its queue in the order records
//! were offered; a record that is not a cluster message is ignored. Sans-I/O: the caller fetches
//! the records (`sluice-kafka`), time is wall-clock ms (wall offset 0).
//!
//! [`ClaimKind::Session`]: crate::cluster::ClaimKind::Session
//! [`HANDOVER_MAX_BYTES`]: crate::cluster::HANDOVER_MAX_BYTES

use std::sync::Arc;

use crate::inbound::{cluster_message, InboundInternal, InboundRecord};
use crate::session::{Delivery, Session};
use crate::topic;

/// A session being rebuilt (see the module doc).
pub struct Adoption {
    session: Session,
    /// Bytes of the stored form so far, about: the bound is [`crate::cluster::HANDOVER_MAX_BYTES`].
    size: usize,
    /// How the records are read: as cluster messages of no node in particular.
    internal: InboundInternal,
    /// Messages queued, and ones its subscriptions took that did not fit (counted, not kept).
    pub taken: usize,
    pub left_out: usize,
}

impl Adoption {
    /// `stored`: the value of the client's latest session record (subscriptions, no messages).
    /// `None` when it is not a stored session.
    pub fn new(client: &str, stored: &[u8], now_ms: u64) -> Option<Adoption> {
        let session = Session::decode(client.into(), 0, stored, 0, now_ms)?;
        Some(Adoption {
            session,
            size: stored.len(),
            // No node's records are skipped: the dead node's own are what its sessions missed.
            internal: InboundInternal::ClusterMessages { node: Arc::from("") },
            taken: 0,
            left_out: 0,
        })
    }

    /// The filters the session subscribes to (not the shared ones: a group's messages went to
    /// its other members).
    pub fn filters(&self) -> impl Iterator<Item = &str> {
        self.session.subs.keys().map(|f| f.as_str()).filter(|f| topic::parse_shared(f).is_none())
    }

    /// One record of `.messages`, in log order: queued if the subscriptions take it at QoS 1/2.
    pub fn offer(&mut self, r: &InboundRecord, now_ms: u64) {
        let Ok(Some(msg)) = cluster_message(&self.internal, r, now_ms) else { return };
        let publisher = r.headers.iter().find(|(k, _)| k == "mqtt.client_id").map_or(&[][..], |(_, v)| v.as_ref());
        let Some((qos, retain, sub_ids)) = self.session.offline_match(&msg.topic, msg.qos, msg.retain, publisher)
        else {
            return;
        };
        let size = msg.topic.len() + msg.payload.len() + 64;
        if self.size + size > crate::cluster::HANDOVER_MAX_BYTES {
            self.left_out += 1;
            return;
        }
        self.size += size;
        self.taken += 1;
        self.session.queue.push_back(Delivery { msg: Arc::new(msg), qos, retain, sub_ids, queued_s: 0 });
    }

    /// The rebuilt session in its stored form: the value of a handover record.
    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size);
        self.session.encode(0, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::SubOptions;
    use crate::session::Sub;
    use bytes::Bytes;

    fn stored() -> Vec<u8> {
        let mut s = Session::new("dev".into());
        s.expiry_secs = 3600;
        let sub = |qos, no_local| Sub {
            opts: SubOptions { qos, no_local, retain_as_published: false, retain_handling: 0 },
            sub_id: None,
        };
        s.subs.insert("a/+".into(), sub(1, false));
        s.subs.insert("b/#".into(), sub(0, false));
        s.subs.insert("own/#".into(), sub(2, true));
        s.subs.insert("$share/g/a/#".into(), sub(1, false));
        let mut out = Vec::new();
        s.encode(0, &mut out);
        out
    }

    fn rec(topic: &str, qos: u8, from: &str, payload: usize) -> InboundRecord {
        let h = |k: &str, v: &str| (k.to_string(), Bytes::copy_from_slice(v.as_bytes()));
        InboundRecord {
            mapping: 0,
            topic: "_sluice.c.messages".into(),
            partition: 0,
            offset: 0,
            key: None,
            value: Some(Bytes::from(vec![b'x'; payload])),
            headers: vec![
                h("mqtt.topic", topic),
                h("mqtt.qos", &qos.to_string()),
                h("mqtt.client_id", from),
                h(crate::cluster::NODE_HEADER, "n2"),
            ],
        }
    }

    #[test]
    fn the_subscriptions_take_messages_at_qos_1_and_2_in_log_order_and_the_size_is_bounded() {
        let mut a = Adoption::new("dev", &stored(), 0).expect("a stored session");
        assert_eq!(a.filters().count(), 3, "not the shared subscription");
        a.offer(&rec("a/1", 1, "p", 10), 0);
        a.offer(&rec("a/2", 0, "p", 10), 0); // QoS 0: not queued for an offline session
        a.offer(&rec("b/1", 1, "p", 10), 0); // subscribed at QoS 0
        a.offer(&rec("own/1", 2, "dev", 10), 0); // No Local
        a.offer(&rec("own/2", 2, "p", 10), 0);
        a.offer(&rec("c/1", 1, "p", 10), 0);
        a.offer(&InboundRecord { headers: vec![], ..rec("a/3", 1, "p", 1) }, 0); // not a message
        assert_eq!((a.taken, a.left_out), (2, 0));
        let back = Session::decode("dev".into(), 0, &a.finish(), 0, 0).expect("decodes");
        let queued: Vec<(&str, u8)> = back.queue.iter().map(|d| (d.msg.topic.as_str(), d.qos)).collect();
        assert_eq!(queued, [("a/1", 1), ("own/2", 2)]);
        assert_eq!(back.subs.len(), 4);

        let mut a = Adoption::new("dev", &stored(), 0).unwrap();
        for _ in 0..100 {
            a.offer(&rec("a/big", 1, "p", 20_000), 0);
        }
        assert!(a.taken > 0 && a.left_out > 0 && a.taken + a.left_out == 100, "{} {}", a.taken, a.left_out);
        assert!(a.finish().len() <= crate::cluster::HANDOVER_MAX_BYTES + 21_000);
        assert!(Adoption::new("dev", b"not a session", 0).is_none());
    }
}
