//! A persistent session's `Session` records on their way to Kafka: at most one per session.
//!
//! Every change to a persistent session's subscriptions is written at once (see
//! `cluster_claims`: a node killed after a SUBACK must not leave the survivors an old record).
//! But a record carries every subscription the session has (up to `max_subscriptions`), so one
//! per packet would let a client that sends SUBSCRIBE after SUBSCRIBE turn each small packet
//! into a large record in the sessions topic — an amplifier pointed at Kafka. So while one of a
//! session's records is unanswered, its further changes only mark it *dirty*; when the answer
//! comes, one record with the subscriptions as they are then goes out. A session's changes cost
//! at most one record per Kafka round trip, and a node killed loses at most the last two round
//! trips of them (the one in flight and the one waiting for it), never more.
//!
//! A record is answered when Kafka stored it, or when it is on disk in the spill log (Kafka gets
//! it from there, in order). One that failed (neither) is written again with the next lease,
//! not at once: a full disk refuses it while it is handed out, and a retry at once would loop.
//! One whose answer did not come within [`STALE_MS`] is given up on at the lease and written
//! again. A session that moves to another shard of this node takes no flight along: its record
//! waiting here goes at once, before it leaves (`Shard::leave_shard_records`).
//!
//! A SUBACK of a persistent session promises the subscription to the whole cluster: a node
//! killed right after it must leave the survivors a record that has it. So the SUBSCRIBE's
//! connection waits (`wait`) for the answer of the first record written *after* its change —
//! the one just sent, or, when one was already on its way, the next — and its SUBACK goes
//! only then, as it waits for the local store's commit. A failed or stale record's waiters wait
//! for the record written again. A connection has one SUBSCRIBE pending at a time (its input
//! waits meanwhile), so a flight holds at most a few waiters.
//!
//! Invariants: `flights` holds a session while some of its record ids are unanswered
//! (`unanswered > 0`), or while it waits for the lease to write again after a failure
//! (`unanswered == 0`, `failed`); `by_record` holds exactly the unanswered ids of `flights`,
//! each naming its session; a session is in `flights` at most once (one record at a time);
//! `acks` wait for the answer of the flight's record, `next_acks` (only when `dirty`) for the
//! next record's; `carried` holds waiters between a flight's end and the next record's
//! `sent`, which the caller calls at once.

use std::ops::Range;

use super::{ClientId, ConnId};
use crate::HashMap;

/// How long a record's answer may take before the lease writes the session again. An answer
/// always comes (at the latest when the produce times out), so this guards against one lost,
/// not against a slow Kafka; with a longer time-out configured, a slow answer only means the
/// session's state is written twice.
pub(super) const STALE_MS: u64 = 120_000;

/// One session's record in flight.
struct Flight {
    /// The record ids it went out as (one per cluster mapping; usually one).
    ids: Range<u64>,
    unanswered: u32,
    /// Changed since: another record goes when this one is answered.
    dirty: bool,
    /// One of its records failed: the session is written again with the lease.
    failed: bool,
    since_ms: u64,
    /// SUBSCRIBEs whose change this record carries: their SUBACK goes with its answer.
    acks: Vec<ConnId>,
    /// SUBSCRIBEs whose change came while it was on its way (`dirty`): the next record's.
    next_acks: Vec<ConnId>,
}

#[derive(Default)]
pub(super) struct SessionRecords {
    flights: HashMap<ClientId, Flight>,
    by_record: HashMap<u64, ClientId>,
    /// Waiters of a flight that ended without releasing them (a change since, a failure, given
    /// up on): they go with the session's next record.
    carried: HashMap<ClientId, Vec<ConnId>>,
    /// Records that failed (written again with the next lease), and flights given up on.
    pub(super) failed: u64,
    pub(super) stale: u64,
}

impl SessionRecords {
    /// Whether a record of `client` is on its way: if so, the change waits for its answer
    /// (marked dirty) and this returns `true`.
    pub(super) fn coalesce(&mut self, client: &ClientId) -> bool {
        match self.flights.get_mut(client) {
            Some(f) => {
                f.dirty = true;
                true
            }
            None => false,
        }
    }

    /// A record of `client` went out as `ids` at `now_ms`; it carries the changes of the
    /// waiters carried from the last flight. Returns waiters to release now: no record went
    /// (`ids` empty: there is nothing a survivor could read, so nothing to wait for).
    pub(super) fn sent(&mut self, client: &ClientId, ids: Range<u64>, now_ms: u64) -> Vec<ConnId> {
        let acks = self.carried.remove(client).unwrap_or_default();
        if ids.is_empty() {
            return acks;
        }
        for id in ids.clone() {
            self.by_record.insert(id, client.clone());
        }
        let unanswered = u32::try_from(ids.end - ids.start).unwrap_or(u32::MAX);
        let f = Flight { ids, unanswered, dirty: false, failed: false, since_ms: now_ms, acks, next_acks: Vec::new() };
        self.flights.insert(client.clone(), f);
        Vec::new()
    }

    /// `conn`'s SUBSCRIBE changed `client`'s session, and the change was just announced (sent or
    /// coalesced): its SUBACK waits for the first record that carries it. Returns `false` when
    /// no record is on its way (nothing was written: nothing to wait for).
    pub(super) fn wait(&mut self, client: &ClientId, conn: ConnId) -> bool {
        let Some(f) = self.flights.get_mut(client) else { return false };
        if f.dirty || f.failed {
            f.next_acks.push(conn);
        } else {
            f.acks.push(conn);
        }
        true
    }

    /// Whether record `id` is a session's record waiting for its answer (cheap when none is).
    pub(super) fn waits_for(&self, id: u64) -> bool {
        !self.by_record.is_empty() && self.by_record.contains_key(&id)
    }

    /// Record `id` was answered (`stored`: in Kafka or on disk; not: it failed). Returns the
    /// session to write again now (every record of its flight answered, none failed, and a
    /// change since), and the SUBSCRIBEs whose SUBACK may go (into `released`).
    pub(super) fn answered(&mut self, id: u64, stored: bool, released: &mut Vec<ConnId>) -> Option<ClientId> {
        let client = self.by_record.remove(&id)?;
        let f = self.flights.get_mut(&client)?;
        f.unanswered = f.unanswered.saturating_sub(1);
        if !stored {
            // Written again with the lease (see the module doc).
            self.failed += 1;
            f.failed = true;
        }
        if f.unanswered > 0 || f.failed {
            return None;
        }
        let f = self.flights.remove(&client)?;
        released.extend(f.acks);
        if !f.dirty {
            return None;
        }
        if !f.next_acks.is_empty() {
            self.carried.insert(client.clone(), f.next_acks);
        }
        Some(client)
    }

    /// At the lease: the sessions to write again — those whose record failed, and those whose
    /// answer is later than [`STALE_MS`] (given up on) — taken out, into `out`.
    pub(super) fn due(&mut self, now_ms: u64, out: &mut Vec<ClientId>) {
        if self.flights.is_empty() {
            return;
        }
        let by_record = &mut self.by_record;
        let stale = &mut self.stale;
        let carried = &mut self.carried;
        self.flights.retain(|client, f| {
            let waiting = f.unanswered == 0;
            let late = now_ms.saturating_sub(f.since_ms) >= STALE_MS;
            if !waiting && !late {
                return true;
            }
            if !waiting {
                *stale += 1;
                for id in f.ids.clone() {
                    by_record.remove(&id);
                }
            }
            // The record written again carries every change its waiters made.
            let mut acks = std::mem::take(&mut f.acks);
            acks.append(&mut f.next_acks);
            if !acks.is_empty() {
                carried.insert(client.clone(), acks);
            }
            out.push(client.clone());
            false
        });
    }

    /// `client`'s session leaves this shard: its flight stays behind (answers of it are
    /// ignored). Returns whether a change of it waited for that flight's answer.
    /// Its waiters are dropped: their connection closes as the session leaves (a takeover).
    pub(super) fn leave(&mut self, client: &ClientId) -> bool {
        self.carried.remove(client);
        let Some(f) = self.flights.remove(client) else { return false };
        for id in f.ids {
            self.by_record.remove(&id);
        }
        f.dirty
    }

    /// Sessions with a record in flight or waiting for the lease.
    pub(super) fn len(&self) -> usize {
        self.flights.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> ClientId {
        "dev".into()
    }

    /// A SUBACK waits for the first record that carries its change: the one just sent, or the
    /// next when one was on its way; a failed or stale record's waiters go with the record
    /// written again; a session that leaves drops them (its connection closes).
    #[test]
    fn a_subscribe_waits_for_the_first_record_written_after_its_change() {
        let mut r = SessionRecords::default();
        let mut out = Vec::new();
        assert!(!r.wait(&client(), 1), "nothing on its way: nothing to wait for");

        // Sent with the change: its answer releases it.
        assert!(r.sent(&client(), 10..11, 0).is_empty());
        assert!(r.wait(&client(), 1));
        assert_eq!(r.answered(10, true, &mut out), None);
        assert_eq!(out, [1]);

        // A change while a record is on its way waits for the next record.
        out.clear();
        r.sent(&client(), 11..12, 0);
        assert!(r.coalesce(&client()));
        assert!(r.wait(&client(), 2));
        assert_eq!(r.answered(11, true, &mut out), Some(client()), "the next record goes now");
        assert!(out.is_empty(), "the record answered did not carry conn 2's change");
        r.sent(&client(), 12..13, 1);
        r.answered(12, true, &mut out);
        assert_eq!(out, [2]);

        // Failed: written again with the lease, and released by that one's answer.
        out.clear();
        r.sent(&client(), 13..14, 2);
        r.wait(&client(), 3);
        r.answered(13, false, &mut out);
        assert!(out.is_empty());
        let mut due = Vec::new();
        r.due(3, &mut due);
        assert_eq!(due, [client()]);
        r.sent(&client(), 14..15, 3);
        r.answered(14, true, &mut out);
        assert_eq!(out, [3]);

        // Given up on after STALE_MS (both waiters: the one it carried and the one after).
        out.clear();
        r.sent(&client(), 15..16, 4);
        r.wait(&client(), 4);
        r.coalesce(&client());
        r.wait(&client(), 5);
        due.clear();
        r.due(4 + STALE_MS, &mut due);
        assert_eq!(due, [client()]);
        assert_eq!(r.stale, 1);
        r.answered(15, true, &mut out);
        assert!(out.is_empty(), "a late answer of the record given up on");
        r.sent(&client(), 16..17, 5);
        r.answered(16, true, &mut out);
        assert_eq!(out, [4, 5]);

        // No record written (nothing to write to): released at once.
        r.sent(&client(), 17..18, 6);
        r.coalesce(&client());
        r.wait(&client(), 6);
        out.clear();
        assert_eq!(r.answered(17, true, &mut out), Some(client()));
        assert_eq!(r.sent(&client(), 18..18, 6), [6]);

        // Leaving: the flight and its waiters stay behind.
        r.sent(&client(), 19..20, 7);
        r.wait(&client(), 7);
        assert!(!r.leave(&client()));
        out.clear();
        r.answered(19, true, &mut out);
        assert!(out.is_empty());
        assert_eq!(r.len(), 0);
        assert!(r.carried.is_empty());
    }
}
