//! The session directory: which shard hosts each client id's session, kept by the shard owning
//! `hash(client_id)` ([`directory_shard`](super::directory_shard)).
//!
//! A CONNECT claims its client id here. Claims are carried out one at a time: while one is under
//! way (its `Evict` and `Transfer` in flight, *busy*), later claims wait. So when an `Evict`
//! reaches the previous host, that host has finished its own claim and holds the session (or
//! nothing) — never a session still on its way — and two connections can never both end up
//! holding one client id's session.
//!
//! Invariants: an entry is busy from a claim until its claimer reports `Settled`; a `Release`
//! never clears a busy entry (it may come from before the claim); waiting claims are bounded
//! by the connections between CONNECT and CONNACK.

use crate::HashMap;
use std::collections::VecDeque;

use super::{ClientId, ConnId, ShardId};

/// A claim: shard `host` wants the session for its connection `conn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Claim {
    pub(super) host: ShardId,
    pub(super) conn: ConnId,
    pub(super) clean_start: bool,
}

/// What the directory shard must send for a claim carried out now.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ClaimGo {
    /// The session lives on `prev`: evict it from there, to the claimer.
    Evict { prev: ShardId, claim: Claim },
    /// No session anywhere: the claimer starts one.
    Fresh(Claim),
}

#[derive(Debug, Default)]
struct DirEntry {
    /// The shard hosting the session, or about to; `None` once it ended there.
    host: Option<ShardId>,
    busy: bool,
    waiting: VecDeque<Claim>,
}

#[derive(Debug, Default)]
pub(super) struct Directory {
    entries: HashMap<ClientId, DirEntry>,
}

impl Directory {
    /// `host` hosts `id`'s session (restored from the store at start).
    pub(super) fn restored(&mut self, id: ClientId, host: ShardId) {
        self.entries.insert(id, DirEntry { host: Some(host), ..DirEntry::default() });
    }

    /// A claim for `id`: what to send now, or nothing while another claim is under way.
    pub(super) fn claim(&mut self, id: &ClientId, claim: Claim) -> Option<ClaimGo> {
        let e = self.entries.entry(id.clone()).or_default();
        if e.busy {
            e.waiting.push_back(claim);
            return None;
        }
        e.busy = true;
        Some(match e.host.replace(claim.host) {
            Some(prev) => ClaimGo::Evict { prev, claim },
            None => ClaimGo::Fresh(claim),
        })
    }

    /// The claim under way for `id` is carried out: `host` now hosts the session (`hosting`)
    /// or ended it. Returns the next waiting claim, carried out now.
    pub(super) fn settled(&mut self, id: &ClientId, host: ShardId, hosting: bool) -> Option<ClaimGo> {
        let e = self.entries.get_mut(id)?;
        e.busy = false;
        if !hosting && e.host == Some(host) {
            e.host = None;
        }
        match e.waiting.pop_front() {
            Some(next) => self.claim(id, next),
            None => {
                if e.host.is_none() {
                    self.entries.remove(id);
                }
                None
            }
        }
    }

    /// The shard `id`'s session is hosted by (or about to be), as far as the directory knows.
    #[cfg(test)]
    pub(super) fn host(&self, id: &str) -> Option<ShardId> {
        self.entries.get(id).and_then(|e| e.host)
    }

    /// Whether `id` has an entry: a session hosted here, or a claim under way.
    pub(super) fn knows(&self, id: &str) -> bool {
        self.entries.contains_key(id)
    }

    /// The session of `id` ended on `host`.
    pub(super) fn released(&mut self, id: &ClientId, host: ShardId) {
        if self.entries.get(id).is_some_and(|e| !e.busy && e.host == Some(host)) {
            self.entries.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(host: ShardId, conn: ConnId) -> Claim {
        Claim { host, conn, clean_start: false }
    }

    #[test]
    fn claims_for_one_id_are_carried_out_one_at_a_time_in_order() {
        let mut d = Directory::default();
        let id: ClientId = "a".into();
        assert_eq!(d.claim(&id, claim(0, 1)), Some(ClaimGo::Fresh(claim(0, 1))));
        assert_eq!(d.claim(&id, claim(1, 2)), None, "busy: waits");
        assert_eq!(d.claim(&id, claim(0, 3)), None);
        assert_eq!(d.settled(&id, 0, true), Some(ClaimGo::Evict { prev: 0, claim: claim(1, 2) }));
        assert_eq!(d.settled(&id, 1, true), Some(ClaimGo::Evict { prev: 1, claim: claim(0, 3) }));
        assert_eq!(d.settled(&id, 0, true), None);
    }

    #[test]
    fn a_release_from_before_a_claim_does_not_clear_it() {
        let mut d = Directory::default();
        let id: ClientId = "a".into();
        d.restored(id.clone(), 1);
        assert_eq!(d.claim(&id, claim(0, 1)), Some(ClaimGo::Evict { prev: 1, claim: claim(0, 1) }));
        d.released(&id, 1);
        d.released(&id, 0);
        assert_eq!(d.settled(&id, 0, true), None);
        assert_eq!(d.claim(&id, claim(1, 2)), Some(ClaimGo::Evict { prev: 0, claim: claim(1, 2) }), "0 hosts it");
        // The claimer lost its connection and ended the session: the next claim starts afresh.
        assert_eq!(d.settled(&id, 1, false), None);
        assert_eq!(d.claim(&id, claim(0, 3)), Some(ClaimGo::Fresh(claim(0, 3))));
    }
}
