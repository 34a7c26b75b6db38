//! Retained messages for new subscriptions, shard side: running the owners' scans in turns,
//! and feeding the found messages into the subscribing session as it has room (see
//! `crate::retained_feed`).

use super::*;

impl Shard {
    /// Whether retained scans wait for [`Shard::run_retained`].
    pub fn has_retained_work(&self) -> bool {
        self.retained_scans.has_work()
    }

    /// One turn of retained scans (at most `retained_feed::SLICE_NODES` tree nodes): each
    /// slice goes to its subscriber's shard. Returns whether more work waits; the caller runs
    /// it in a later turn, after the shard's other work had its turn.
    pub fn run_retained(&mut self, now_ms: u64) -> bool {
        let mut replies = Vec::new();
        self.retained_scans.run(&self.retained, |m| expiry_left_secs(m, now_ms).is_some(), &mut replies);
        for r in replies {
            let reply = ShardMsg::RetainedReply {
                from: self.id,
                scan: r.scan,
                client_id: r.client_id,
                msgs: r.msgs,
                done: r.done,
            };
            self.send_to_shard(r.to, reply);
        }
        self.run_local(now_ms);
        let more = self.retained_scans.has_work();
        self.effects.retained_work |= more;
        more
    }

    /// Asks every shard for the retained messages of `filters`, for session `id`.
    pub(super) fn start_retained_feed(&mut self, id: ClientId, filters: Vec<RetainedFilter>, live: LiveSet) {
        self.next_retained_scan += 1;
        let scan = self.next_retained_scan;
        let (feed, filters) = Feed::start(scan, filters, self.n_shards, live);
        self.retained_feeds.insert(id.clone(), feed);
        for shard in 0..self.n_shards {
            let q = ShardMsg::RetainedQuery { from: self.id, scan, client_id: id.clone(), filters: filters.clone() };
            self.send_to_shard(shard, q);
        }
    }

    /// Moves `id`'s retained backlog into the session while it has room (QoS 1/2: its queue
    /// under a quarter full, so neither overflow nor back-pressure; QoS 0: the output buffer
    /// under its limit, else `out_full` brings us back), then gives owners credit when the
    /// backlog ran low and starts the next request when this one is done.
    pub(super) fn feed_retained(&mut self, id: &ClientId, now_ms: u64) {
        if self.retained_feeds.is_empty() {
            return;
        }
        loop {
            let moved = self.feed_retained_pass(id, now_ms);
            self.pump(id, now_ms);
            if !moved {
                break;
            }
        }
        let Some(feed) = self.retained_feeds.get_mut(id) else { return };
        let scan = feed.scan;
        for owner in feed.credit() {
            self.send_to_shard(owner, ShardMsg::RetainedMore { from: self.id, scan });
        }
        if self.retained_feeds.get(id).is_some_and(Feed::finished) {
            let Some(feed) = self.retained_feeds.remove(id) else { return };
            let (next, live) = feed.into_next();
            if !next.is_empty() {
                self.start_retained_feed(id.clone(), next, live);
            }
        }
    }

    /// One pass of [`Shard::feed_retained`]; returns whether anything moved.
    pub(super) fn feed_retained_pass(&mut self, id: &ClientId, now_ms: u64) -> bool {
        let mut moved = false;
        loop {
            let Some(feed) = self.retained_feeds.get_mut(id) else { return moved };
            let Some(s) = self.sessions.get_mut(id) else { return moved };
            let Some(d) = feed.backlog.pop_front() else { return moved };
            if feed.live.contains(&d.msg) {
                continue;
            }
            match s.conn {
                Some(conn) if d.qos == 0 => {
                    let Some(c) = self.conns.get_mut(&conn).filter(|c| c.is_active()) else {
                        feed.backlog.push_front(d);
                        return moved;
                    };
                    if c.out.len() >= self.limits.max_outbound_buffer_bytes {
                        c.out_full = true;
                        feed.backlog.push_front(d);
                        return moved;
                    }
                    self.write_publish(conn, &d, 0, false, now_ms);
                }
                // As for any QoS 0 message to an offline session.
                None if d.qos == 0 => {}
                _ => {
                    if !s.queue.is_empty() && s.queue.len() * 4 >= self.limits.max_queued_messages {
                        feed.backlog.push_front(d);
                        return moved;
                    }
                    s.queue.push_back(d);
                    self.commits.touch(s);
                    if s.conn.is_some() {
                        // Into flight now: the queue stays short and the window full.
                        self.pump(id, now_ms);
                    }
                }
            }
            moved = true;
        }
    }

    /// `id` ended or left this shard: its retained scans stop.
    pub(super) fn cancel_retained_feed(&mut self, id: &ClientId) {
        let Some(feed) = self.retained_feeds.remove(id) else { return };
        for owner in feed.scanning() {
            self.send_to_shard(owner, ShardMsg::RetainedCancel { from: self.id, scan: feed.scan });
        }
    }
}
