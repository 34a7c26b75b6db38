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
//! Invariants: `flights` holds a session while some of its record ids are unanswered
//! (`unanswered > 0`), or while it waits for the lease to write again after a failure
//! (`unanswered == 0`, `failed`); `by_record` holds exactly the unanswered ids of `flights`,
//! each naming its session; a session is in `flights` at most once (one record at a time).

use std::ops::Range;

use super::ClientId;
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
}

#[derive(Default)]
pub(super) struct SessionRecords {
    flights: HashMap<ClientId, Flight>,
    by_record: HashMap<u64, ClientId>,
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

    /// A record of `client` went out as `ids` at `now_ms`.
    pub(super) fn sent(&mut self, client: &ClientId, ids: Range<u64>, now_ms: u64) {
        if ids.is_empty() {
            return;
        }
        for id in ids.clone() {
            self.by_record.insert(id, client.clone());
        }
        let unanswered = u32::try_from(ids.end - ids.start).unwrap_or(u32::MAX);
        self.flights.insert(client.clone(), Flight { ids, unanswered, dirty: false, failed: false, since_ms: now_ms });
    }

    /// Whether record `id` is a session's record waiting for its answer (cheap when none is).
    pub(super) fn waits_for(&self, id: u64) -> bool {
        !self.by_record.is_empty() && self.by_record.contains_key(&id)
    }

    /// Record `id` was answered (`stored`: in Kafka or on disk; not: it failed). Returns the
    /// session to write again now: every record of its flight answered, none failed, and a
    /// change since.
    pub(super) fn answered(&mut self, id: u64, stored: bool) -> Option<ClientId> {
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
        f.dirty.then_some(client)
    }

    /// At the lease: the sessions to write again — those whose record failed, and those whose
    /// answer is later than [`STALE_MS`] (given up on) — taken out, into `out`.
    pub(super) fn due(&mut self, now_ms: u64, out: &mut Vec<ClientId>) {
        if self.flights.is_empty() {
            return;
        }
        let by_record = &mut self.by_record;
        let stale = &mut self.stale;
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
            out.push(client.clone());
            false
        });
    }

    /// `client`'s session leaves this shard: its flight stays behind (answers of it are
    /// ignored). Returns whether a change of it waited for that flight's answer.
    pub(super) fn leave(&mut self, client: &ClientId) -> bool {
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
