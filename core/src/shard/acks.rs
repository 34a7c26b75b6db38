//! Handler glue for acknowledgements the shard owes publishers: a PUBACK/PUBREC is queued in
//! the connection's [`AckQueue`](super::ack_queue::AckQueue) with what it waits for (Kafka
//! records, congested sessions, a receipt), and leaves when all of that happened, in order.
//! A refused acknowledgement is MQTT 5 reason code; 3.1.1 has none, so the connection closes.

use super::*;
use crate::schemas::OnInvalid;

impl Shard {
    /// The acknowledgement `seq` of `conn` reports `code` unless it already reports a failure.
    pub(super) fn set_ack_code(&mut self, conn: ConnId, seq: u64, code: u8) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.acks.fail(seq, code);
        }
    }

    /// Queues the PUBACK/PUBREC of a QoS 1/2 publish. It goes out once Kafka acknowledged every
    /// record in `records` (at once when there are none) and every earlier acknowledgement of
    /// this connection went out: MQTT requires them in the order the PUBLISHes arrived.
    pub(super) fn queue_ack(&mut self, conn: ConnId, pid: u16, qos: u8, records: std::ops::Range<u64>) {
        self.queue_ack_waiting(conn, pid, qos, records, &[], None);
    }

    /// Queues an acknowledgement that waits for nothing but earlier ones, reporting `code`.
    pub(super) fn queue_ack_with_code(&mut self, conn: ConnId, pid: u16, qos: u8, code: u8) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let seq = c.acks.push(pid, qos, 0);
        c.acks.fail(seq, code);
        self.flush_acks(conn);
    }

    /// [`Shard::queue_ack`] that also waits for the queues of `congested` sessions to drain,
    /// and for `receipt`: `(token, answers expected)` from the shards that stored it.
    pub(super) fn queue_ack_waiting(
        &mut self,
        conn: ConnId,
        pid: u16,
        qos: u8,
        records: std::ops::Range<u64>,
        congested: &[ClientId],
        receipt: Option<(u64, u32)>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let waiting = (records.end - records.start) as u32 + (congested.len() + usize::from(receipt.is_some())) as u32;
        if waiting == 0 && !matches!(c.state, ConnState::Closing) && c.acks.pass_through() {
            // Waits for nothing, nothing before it: out now, as `flush_acks` would send it.
            self.send_plain_resp(conn, if qos == 1 { 0x40 } else { 0x50 }, pid);
            return;
        }
        let seq = c.acks.push(pid, qos, waiting);
        if let Some((token, expected)) = receipt {
            self.receipts.expect(token, expected, ReceiptFor::Ack(conn, seq));
        }
        for id in records {
            self.outbox.wait(id, (conn, seq));
        }
        for id in congested {
            self.drain.wait(id, DrainWaiter::Ack(conn, seq));
        }
        self.flush_acks(conn);
    }

    /// One thing each of these acknowledgements waited for happened.
    pub(super) fn release_acks(&mut self, waiters: Vec<(ConnId, u64)>) {
        let mut touched = Vec::new();
        for (conn, seq) in waiters {
            let Some(c) = self.conns.get_mut(&conn) else { continue };
            if c.acks.done(seq, None) {
                touched.push(conn);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for conn in touched {
            self.flush_acks(conn);
        }
    }

    /// Sends the acknowledgements of `conn` that may leave now, in order.
    pub(super) fn flush_acks(&mut self, conn: ConnId) {
        loop {
            let Some(c) = self.conns.get_mut(&conn) else { return };
            // The broker closed this connection (its DISCONNECT is queued): an acknowledgement
            // whose receipt came late would follow it, and nothing may. The client publishes
            // again after reconnecting; nothing acknowledged is lost.
            if matches!(c.state, ConnState::Closing) {
                return;
            }
            // Plain successes (nearly all of them) are encoded straight into the output as
            // `send_plain_resp` would, with one lookup of the connection for all of them: a
            // Kafka answer releases tens of acknowledgements per connection at once.
            let was_empty = c.out.is_empty();
            let fits = c.client_max_packet >= 4;
            let mut bytes = 0u64;
            let mut other = None;
            while let Some(a) = c.acks.pop_ready() {
                if a.code != reason::SUCCESS || (a.reason.is_some() && c.problem_information) {
                    other = Some(a);
                    break;
                }
                if fits {
                    if c.out.capacity() == 0 {
                        c.out.reserve(c.out_hint as usize);
                    }
                    let [hi, lo] = a.pid.to_be_bytes();
                    c.out.extend_from_slice(&[if a.qos == 1 { 0x40 } else { 0x50 }, 2, hi, lo]);
                    bytes += 4;
                }
            }
            if bytes > 0 {
                self.stats.bytes_sent += bytes;
                if was_empty {
                    self.effects.dirty.push(conn);
                }
            }
            let Some(a) = other else { return };
            if a.code != reason::SUCCESS && !c.is_v5() {
                // 3.1.1 has no negative acknowledgement: close without one, so the client
                // publishes again after reconnecting. Nothing acknowledged is lost.
                self.close(conn, None, 0);
                return;
            }
            // A reason string only to a client that did not refuse problem information.
            let reason_string = a.reason.filter(|_| c.problem_information).map(|r| r.to_string());
            let r = PubResp {
                packet_id: a.pid,
                code: a.code,
                properties: Properties { reason_string, ..Default::default() },
            };
            self.send(conn, if a.qos == 1 { Packet::PubAck(r) } else { Packet::PubRec(r) });
        }
    }

    /// Kafka (or the spill log) answered a record the acknowledgement `seq` of `conn` waited for.
    pub(super) fn resolve_waiter(
        &mut self,
        (conn, seq): (ConnId, u64),
        outcome: &Result<(), ProduceError>,
        touched: &mut Vec<ConnId>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let answered = match outcome {
            // A payload its schema refuses: MQTT 5 hears why (0x99 with the schema and the
            // error); 3.1.1 has no negative acknowledgement, so the mapping's policy decides —
            // acknowledged (dead-lettered or dropped by the Kafka side) or disconnected.
            Err(ProduceError::Invalid { reason: why, policy, .. }) => {
                if c.is_v5() || *policy == OnInvalid::Disconnect {
                    c.acks.done_with_reason(seq, reason::PAYLOAD_FORMAT_INVALID, why)
                } else {
                    c.acks.done(seq, None)
                }
            }
            _ => c.acks.done(seq, outcome.as_ref().err().map(ProduceError::reason_code)),
        };
        if answered {
            touched.push(conn);
        }
    }
}
