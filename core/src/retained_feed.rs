//! Retained messages for new subscriptions: scanned in slices by their owners, fed to the
//! subscriber with credit.
//!
//! A SUBSCRIBE whose filters want retained messages becomes one request per session: one
//! [`ShardMsg::RetainedQuery`](crate::shard::ShardMsg::RetainedQuery) to every shard (each owns
//! the retained messages of `hash(topic) % n`).
//!
//! - **Owner side ([`Scans`])**: a query opens a scan over the shard's
//!   [`RetainedTree`](crate::retained::RetainedTree). A scan runs one slice of at most
//!   [`SLICE_NODES`] tree nodes, sends it as one `RetainedReply`, and then waits for the
//!   subscriber's `RetainedMore` (credit) before the next. Slices are run by
//!   [`Shard::run_retained`](crate::shard::Shard::run_retained), which the caller calls in
//!   turns of its own (yielding between them) so a big lookup never holds the shard for longer
//!   than one turn's [`SLICE_NODES`]. At most [`SCANS_MAX`] scans are open per shard; a query
//!   past that waits, counted, in FIFO order and opens when a scan closes. A scan closes when
//!   it is complete or its subscriber cancels it (`RetainedCancel`).
//! - **Subscriber side ([`Feed`])**: the session's shard keeps the slices in a backlog and
//!   moves them into the session as room allows — QoS 1/2 into its queue while that is under a
//!   quarter of `max_queued_messages` (so nothing overflows and no publisher is held back),
//!   QoS 0 into the output buffer while it is under `max_outbound_buffer_bytes` — and asks an
//!   owner for its next slice only once the backlog is down to [`BACKLOG_LOW`]. Memory per
//!   subscriber is therefore at most `BACKLOG_LOW` plus one slice per shard. SUBSCRIBEs that
//!   arrive while a request runs are merged into the next request (one per filter).
//!
//! Invariants: a session has at most one request running, so at most one open or waiting scan
//! per owner shard (the waiting FIFO is bounded by the sessions); every message a scan finds is handed to the session (or, QoS 0 to an offline session,
//! dropped as any QoS 0 message to it is) unless it was delivered live while the feed existed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Weak};

use crate::message::{ClientId, Message, Msg, ShardId};
use crate::packet::SubOptions;
use crate::retained::{Cursor, RetainedTree};
use crate::session::Delivery;
use crate::HashMap;

/// Tree nodes one slice of a scan visits at most; a turn of [`Scans::run`] starts slices
/// while it visited fewer than this (so under two slices a turn: about a millisecond).
pub(crate) const SLICE_NODES: usize = 4096;
/// Open scans per shard; queries beyond wait for one to close.
pub(crate) const SCANS_MAX: usize = 1024;
/// A subscriber's backlog at or below which it asks owners for their next slice.
pub(crate) const BACKLOG_LOW: usize = SLICE_NODES / 4;

/// A filter whose retained messages a subscription asked for, with the options and
/// subscription id they are delivered with.
pub(crate) type RetainedFilter = (String, SubOptions, Option<u32>);

/// One request being scanned on the owner.
struct Scan {
    from: ShardId,
    id: u64,
    client_id: ClientId,
    filters: Vec<String>,
    /// The filter being looked up, and where its lookup stopped.
    at: usize,
    cursor: Option<Cursor>,
    /// In `Scans::ready`.
    ready: bool,
}

/// A slice for a subscriber's shard.
pub(crate) struct Reply {
    pub(crate) to: ShardId,
    pub(crate) scan: u64,
    pub(crate) client_id: ClientId,
    pub(crate) msgs: Vec<(u32, Msg)>,
    pub(crate) done: bool,
}

/// The scans one owner shard runs for subscribers anywhere.
#[derive(Default)]
pub(crate) struct Scans {
    open: HashMap<(ShardId, u64), Scan>,
    /// Open scans owed a slice, in order.
    ready: VecDeque<(ShardId, u64)>,
    /// Queries that came while [`SCANS_MAX`] scans were open.
    waiting: VecDeque<Scan>,
    /// Queries that had to wait, since start.
    pub(crate) queued_total: u64,
}

impl Scans {
    pub(crate) fn query(&mut self, from: ShardId, id: u64, client_id: ClientId, filters: Vec<String>) {
        let scan = Scan { from, id, client_id, filters, at: 0, cursor: None, ready: false };
        if self.open.len() < SCANS_MAX {
            self.open_scan(scan);
        } else {
            self.queued_total += 1;
            self.waiting.push_back(scan);
        }
    }

    fn open_scan(&mut self, mut scan: Scan) {
        let key = (scan.from, scan.id);
        scan.ready = true;
        self.open.insert(key, scan);
        self.ready.push_back(key);
    }

    /// The subscriber wants the next slice.
    pub(crate) fn more(&mut self, from: ShardId, id: u64) {
        if let Some(s) = self.open.get_mut(&(from, id)) {
            if !std::mem::replace(&mut s.ready, true) {
                self.ready.push_back((from, id));
            }
        }
    }

    pub(crate) fn cancel(&mut self, from: ShardId, id: u64) {
        if self.open.remove(&(from, id)).is_some() {
            self.promote();
        } else {
            self.waiting.retain(|s| (s.from, s.id) != (from, id));
        }
    }

    fn promote(&mut self) {
        while self.open.len() < SCANS_MAX {
            let Some(s) = self.waiting.pop_front() else { return };
            self.open_scan(s);
        }
    }

    pub(crate) fn has_work(&self) -> bool {
        !self.ready.is_empty()
    }

    pub(crate) fn open_count(&self) -> usize {
        self.open.len()
    }

    pub(crate) fn waiting_count(&self) -> usize {
        self.waiting.len()
    }

    /// One turn: ready scans run one slice each until [`SLICE_NODES`] nodes were visited in
    /// all. `keep` filters what is found (expired messages are not delivered).
    pub(crate) fn run(&mut self, tree: &RetainedTree, keep: impl Fn(&Msg) -> bool, replies: &mut Vec<Reply>) {
        let mut spent = 0;
        while spent < SLICE_NODES {
            let Some(key) = self.ready.pop_front() else { return };
            let Some(scan) = self.open.get_mut(&key) else { continue };
            scan.ready = false;
            let mut msgs = Vec::new();
            let mut visited = 0;
            while let Some(filter) = scan.filters.get(scan.at) {
                let idx = scan.at as u32;
                let budget = SLICE_NODES - visited;
                let slice = tree.lookup(filter, scan.cursor.as_ref(), budget, |m| {
                    if keep(m) {
                        msgs.push((idx, m.clone()));
                    }
                });
                visited += slice.visited;
                scan.cursor = slice.resume;
                if scan.cursor.is_some() {
                    break;
                }
                scan.at += 1;
                if visited >= SLICE_NODES {
                    break;
                }
            }
            spent += visited;
            let done = scan.at == scan.filters.len();
            replies.push(Reply { to: scan.from, scan: scan.id, client_id: scan.client_id.clone(), msgs, done });
            if done {
                self.open.remove(&key);
                self.promote();
            }
        }
    }
}

/// What a subscriber's shard knows of one owner's scan for the running request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Owner {
    /// A slice was asked for (the query, or credit) and has not arrived.
    Asked,
    /// The owner has more and waits for credit.
    Paused,
    Done,
}

/// A session's retained messages on their way in (subscriber side).
pub(crate) struct Feed {
    /// The running request: its scan id and, by filter index, the options it delivers with.
    pub(crate) scan: u64,
    opts: Vec<(SubOptions, Option<u32>)>,
    owners: Vec<Owner>,
    /// Found by the owners, not yet handed to the session.
    pub(crate) backlog: VecDeque<Delivery>,
    /// Filters of SUBSCRIBEs that came while the request ran: the next request, one per filter
    /// (so at most `max_subscriptions_per_session`: unsubscribing removes one).
    next: BTreeMap<String, (SubOptions, Option<u32>)>,
    /// Retained messages delivered live while the feed exists: their scanned copies are skipped
    /// (a message published while the subscription is set up reaches it both ways).
    pub(crate) live: LiveSet,
}

/// Retained messages delivered live while a feed exists, by identity. The set holds a `Weak`
/// of each: the message's allocation is not reused while its entry exists, so comparing
/// addresses is sound (a bare address could be reused after a drop, and a new message would
/// then be skipped as if delivered), and its payload is still freed when the last `Arc` goes.
///
/// Bound: entries whose message is gone are dropped whenever the set doubled since the last
/// sweep (no backlog entry can be such a message: the backlog holds `Arc`s), so the set stays
/// within twice the live retained messages delivered during the feed.
#[derive(Default)]
pub(crate) struct LiveSet {
    msgs: HashMap<usize, Weak<Message>>,
    sweep_at: usize,
}

impl LiveSet {
    pub(crate) fn insert(&mut self, msg: &Msg) {
        if self.msgs.len() >= self.sweep_at {
            self.msgs.retain(|_, m| m.strong_count() > 0);
            self.sweep_at = (self.msgs.len() * 2).max(64);
        }
        self.msgs.entry(Arc::as_ptr(msg) as usize).or_insert_with(|| Arc::downgrade(msg));
    }

    pub(crate) fn contains(&self, msg: &Msg) -> bool {
        self.msgs.get(&(Arc::as_ptr(msg) as usize)).is_some_and(|m| std::ptr::eq(m.as_ptr(), Arc::as_ptr(msg)))
    }
}

impl Feed {
    /// A feed running `filters` as request `scan`; returns it and the filters to query.
    pub(crate) fn start(
        scan: u64,
        filters: Vec<RetainedFilter>,
        n_shards: usize,
        live: LiveSet,
    ) -> (Feed, Vec<String>) {
        let mut names = Vec::with_capacity(filters.len());
        let mut opts = Vec::with_capacity(filters.len());
        for (f, o, id) in filters {
            names.push(f);
            opts.push((o, id));
        }
        let feed = Feed {
            scan,
            opts,
            owners: vec![Owner::Asked; n_shards],
            backlog: VecDeque::new(),
            next: BTreeMap::new(),
            live,
        };
        (feed, names)
    }

    /// Filters for the next request; a filter already waiting takes the newer options.
    pub(crate) fn queue(&mut self, filters: Vec<RetainedFilter>) {
        for (f, o, id) in filters {
            self.next.insert(f, (o, id));
        }
    }

    /// A filter was unsubscribed: it is not looked up for the next request.
    pub(crate) fn unsubscribed(&mut self, filter: &str) {
        self.next.remove(filter);
    }

    /// This request is over: the filters for the next one, if any, and the live set.
    pub(crate) fn into_next(self) -> (Vec<RetainedFilter>, LiveSet) {
        (self.next.into_iter().map(|(f, (o, id))| (f, o, id)).collect(), self.live)
    }

    /// A slice from `from`; false if it belongs to no running request (cancelled, stale).
    pub(crate) fn on_reply(&mut self, from: ShardId, scan: u64, msgs: Vec<(u32, Msg)>, done: bool) -> bool {
        if scan != self.scan || self.owners.get(from) != Some(&Owner::Asked) {
            return false;
        }
        self.owners[from] = if done { Owner::Done } else { Owner::Paused };
        for (idx, msg) in msgs {
            let Some((o, sub_id)) = self.opts.get(idx as usize) else { continue };
            let qos = o.qos.min(msg.qos);
            let sub_ids = sub_id.iter().copied().collect();
            // Not in the cluster's log: never holds a floor back (see `Delivery::queued_s`).
            self.backlog.push_back(Delivery { msg, qos, retain: true, sub_ids, queued_s: crate::session::NOT_IN_LOG });
        }
        true
    }

    /// Owners to ask for their next slice now (the backlog ran low); they count as asked.
    pub(crate) fn credit(&mut self) -> Vec<ShardId> {
        if self.backlog.len() > BACKLOG_LOW {
            return Vec::new();
        }
        let mut ask = Vec::new();
        for (shard, o) in self.owners.iter_mut().enumerate() {
            if *o == Owner::Paused {
                *o = Owner::Asked;
                ask.push(shard);
            }
        }
        ask
    }

    /// Every owner is done and everything was handed on.
    pub(crate) fn finished(&self) -> bool {
        self.backlog.is_empty() && self.owners.iter().all(|o| *o == Owner::Done)
    }

    /// Owners still scanning for this feed (to cancel).
    pub(crate) fn scanning(&self) -> impl Iterator<Item = ShardId> + '_ {
        self.owners.iter().enumerate().filter(|(_, o)| **o != Owner::Done).map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    fn message(topic: &str) -> Msg {
        Arc::new(Message {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: 1,
            retain: true,
            properties: None,
            expiry_at_ms: None,
            origin: Arc::from("t"),
        })
    }

    #[test]
    fn the_live_set_knows_a_message_by_identity_and_no_new_message_takes_its_place() {
        let mut live = LiveSet::default();
        let m = message("a");
        live.insert(&m);
        assert!(live.contains(&m));
        assert!(!live.contains(&message("a")), "an equal message is another message");
        drop(m);
        // The set keeps the delivered message's allocation: no later message can take its address.
        let later: Vec<Msg> = (0..1000).map(|i| message(&i.to_string())).collect();
        assert!(later.iter().all(|m| !live.contains(m)));
    }

    fn tree(n: usize) -> RetainedTree {
        let mut t = RetainedTree::default();
        for i in 0..n {
            let topic = format!("r/{i}");
            t.insert(&topic, message(&topic));
        }
        t
    }

    #[test]
    fn a_scan_runs_in_slices_and_waits_for_credit() {
        let t = tree(10_000);
        let mut scans = Scans::default();
        scans.query(1, 7, Arc::from("c"), vec!["x/#".into(), "r/#".into(), "r/5".into()]);
        let mut replies = Vec::new();
        scans.run(&t, |_| true, &mut replies);
        assert_eq!(replies.len(), 1);
        assert!(!replies[0].done);
        assert!(replies[0].msgs.len() < SLICE_NODES);
        assert!(!scans.has_work(), "waits for credit");
        let mut got = replies.pop().unwrap().msgs.len();
        loop {
            scans.more(1, 7);
            scans.run(&t, |_| true, &mut replies);
            let r = replies.pop().unwrap();
            got += r.msgs.len();
            if r.done {
                break;
            }
        }
        assert_eq!(got, 10_001, "r/# then r/5 again");
        assert_eq!(scans.open_count(), 0);
    }

    #[test]
    fn queries_past_the_limit_wait_and_open_in_order() {
        let mut scans = Scans::default();
        for id in 0..SCANS_MAX as u64 + 2 {
            scans.query(0, id, Arc::from("c"), vec!["r/#".into()]);
        }
        assert_eq!((scans.open_count(), scans.waiting_count(), scans.queued_total), (SCANS_MAX, 2, 2));
        scans.cancel(0, SCANS_MAX as u64 + 1); // a waiting one
        assert_eq!(scans.waiting_count(), 1);
        scans.cancel(0, 3); // an open one: the first waiting opens
        assert_eq!((scans.open_count(), scans.waiting_count()), (SCANS_MAX, 0));
        assert!(scans.open.contains_key(&(0, SCANS_MAX as u64)));
    }
}
