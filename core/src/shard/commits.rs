//! The session store's side in the shard: which persistent sessions changed, and what waits
//! for their next commit.
//!
//! The caller (net) writes changed sessions to disk in group commits: it takes the changes
//! under a token ([`Shard::take_session_changes`](super::Shard::take_session_changes)) and
//! reports the token durable (or failed). An acknowledgement that promises something a crash
//! must not lose — a SUBACK of a persistent session, a receipt for a message queued for one —
//! waits here for the commit after the change.
//!
//! Invariants: a waiter is sealed under the first token taken after it was added, so it is
//! released only by a commit that contains its change; tokens grow, and a report for a token
//! releases every waiter sealed under it or an earlier one, exactly once.

use crate::HashSet;
use std::collections::VecDeque;

use super::{ClientId, ConnId, Receipt, Session};

/// What waits for one commit of the session store.
pub(super) struct Sealed {
    token: u64,
    /// Receipt answers `(receipt, more)` to send once the commit is in.
    pub(super) receipts: Vec<(Receipt, u32)>,
    /// Connections whose SUBSCRIBE waits for it.
    pub(super) subscribes: Vec<ConnId>,
}

#[derive(Default)]
pub(super) struct SessionCommits {
    /// The caller stores persistent sessions.
    enabled: bool,
    /// Sessions changed since the caller last took the changes.
    dirty: HashSet<ClientId>,
    receipts: Vec<(Receipt, u32)>,
    subscribes: Vec<ConnId>,
    /// Waiters of changes taken and not yet reported, by token.
    sealed: VecDeque<Sealed>,
    next_token: u64,
}

impl SessionCommits {
    pub(super) fn enable(&mut self) {
        self.enabled = true;
    }

    pub(super) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Marks `s` for the store if it is (or was) persistent.
    pub(super) fn touch(&mut self, s: &mut Session) {
        if self.enabled && (s.expiry_secs > 0 || s.stored) {
            s.stored = s.expiry_secs > 0;
            self.dirty.insert(s.client_id.clone());
        }
    }

    /// These sessions are written again at the next commit (the last one failed for them).
    pub(super) fn retry(&mut self, ids: impl IntoIterator<Item = ClientId>) {
        self.dirty.extend(ids);
    }

    /// The answer `(receipt, more)` goes once the next commit is in.
    pub(super) fn wait_receipt(&mut self, receipt: Receipt, more: u32) {
        self.receipts.push((receipt, more));
    }

    /// The SUBSCRIBE of `conn` is answered once the next commit is in.
    pub(super) fn wait_subscribe(&mut self, conn: ConnId) {
        self.subscribes.push(conn);
    }

    /// The sessions changed since the last call, and the token that commits them (waiters
    /// added so far are sealed under it).
    pub(super) fn take(&mut self) -> (Vec<ClientId>, u64) {
        self.next_token += 1;
        let receipts = std::mem::take(&mut self.receipts);
        let subscribes = std::mem::take(&mut self.subscribes);
        if !receipts.is_empty() || !subscribes.is_empty() {
            self.sealed.push_back(Sealed { token: self.next_token, receipts, subscribes });
        }
        (self.dirty.drain().collect(), self.next_token)
    }

    /// The commit of `token` is done: the waiters it (and every earlier one) releases.
    pub(super) fn committed(&mut self, token: u64) -> Vec<Sealed> {
        let mut out = Vec::new();
        while let Some(w) = self.sealed.pop_front_if(|w| w.token <= token) {
            out.push(w);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiter_is_released_by_the_commit_that_contains_its_change_and_once() {
        let mut c = SessionCommits::default();
        c.enable();
        let mut s = Session::new("a".into());
        s.expiry_secs = 60;
        c.touch(&mut s);
        c.wait_subscribe(1);
        let (dirty, t1) = c.take();
        assert_eq!(dirty, vec![ClientId::from("a")]);
        c.wait_subscribe(2);
        assert!(c.committed(t1 - 1).is_empty(), "an earlier commit does not contain the change");
        let done = c.committed(t1);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].subscribes, vec![1], "2 came after the changes were taken");
        let (_, t2) = c.take();
        assert_eq!(c.committed(t2)[0].subscribes, vec![2]);
        assert!(c.committed(t2).is_empty());
    }

    #[test]
    fn only_persistent_sessions_are_marked_and_one_that_stops_being_persistent_is_deleted() {
        let mut c = SessionCommits::default();
        let mut s = Session::new("a".into());
        s.expiry_secs = 60;
        c.touch(&mut s);
        assert!(c.take().0.is_empty(), "not enabled: nothing is stored");
        c.enable();
        let mut clean = Session::new("b".into());
        c.touch(&mut clean);
        assert!(c.take().0.is_empty(), "expiry 0 and never stored");
        c.touch(&mut s);
        assert!(s.stored);
        s.expiry_secs = 0;
        c.touch(&mut s);
        assert!(!s.stored, "marked once more, so the store deletes it");
        assert_eq!(c.take().0.len(), 1);
    }
}
