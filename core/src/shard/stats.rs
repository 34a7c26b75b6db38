//! A shard's counters, published under `$SYS/` and summed across shards by shard 0.

/// Counters a shard keeps; published under `$SYS/`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub clients_connected: u64,
    pub sessions: u64,
    pub subscriptions: u64,
    pub retained: u64,
    pub messages_received: u64,
    pub messages_sent: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// `messages_received` and `messages_sent` by QoS (index = QoS), for `/metrics`.
    pub received_by_qos: [u64; 3],
    pub sent_by_qos: [u64; 3],
    pub dropped_queue_full: u64,
    pub dropped_slow_qos0: u64,
    pub dropped_too_large: u64,
    pub dropped_expired: u64,
    pub malformed: u64,
    /// Packets that arrived on a connection no longer holding its session (closed, 0x8E).
    pub orphaned_packets: u64,
    /// Times a subscriber held publishers back for `max_backpressure_ms` and was let go.
    pub slow_subscribers: u64,
    /// Acknowledgements refused because the session or retained store could not commit.
    pub store_refusals: u64,
    /// Connections that have not completed CONNECT, and the bytes their partial CONNECTs hold.
    pub preconnect_connections: u64,
    pub preconnect_bytes: u64,
    /// Closed before CONNECT: at accept by `max_preconnect_per_address`, or for growing past
    /// `max_preconnect_buffer_bytes_per_shard`. (A CONNECT over `max_connect_packet_bytes` is
    /// refused from its fixed header and counted in `malformed`, like any over-size packet.)
    pub refused_preconnect: u64,
    /// Closed because CONNECT was not complete `connect_timeout_ms` after accept.
    pub connect_timeouts: u64,
    /// CONNECTs refused for their credentials (or for none).
    pub auth_failures: u64,
    /// CONNECTs refused because `VERIFYING_MAX` slow password checks were under way.
    pub auth_busy: u64,
    /// PUBLISHes, SUBSCRIBE filters and wills the ACL refused.
    pub acl_denied: u64,
    /// Deliveries not written because the ACL does not let the client read the topic.
    pub acl_dropped: u64,
    /// Client ids between cluster nodes (zero outside a cluster).
    pub cluster: ClusterStats,
}

/// A shard's part in moving client ids between cluster nodes (see `cluster_claims`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Connections closed (0x8E) because the client connected to another node.
    pub taken_over: u64,
    /// Connections closed (0x89) because their claim was not read back in time.
    pub unconfirmed_closed: u64,
    /// Connections closed because the shard was cut off from Kafka (fencing).
    pub fenced_closed: u64,
    /// Persistent sessions sent to another node, and received from one.
    pub handed_over: u64,
    pub taken_over_in: u64,
    /// Sessions sent without their messages (too large for one record).
    pub handover_truncated: u64,
    /// CONNACKs that waited for a handover in vain (then: no session).
    pub handover_timeouts: u64,
    /// Handovers whose wait outlasted the messages kept for it (some may be missing).
    pub handover_gap_lost: u64,
    /// Client ids whose session another node holds, known here; and claims not kept (full).
    pub remote_sessions: u64,
    pub remote_sessions_refused: u64,
    /// Shared-subscription groups of other nodes not kept (full).
    pub shares_refused: u64,
    /// Session and Share records written (a session's subscriptions, a group's member count),
    /// changes that joined a record already waiting (for the lease, or for the answer to the
    /// session's record on its way), and flushes of those before the lease because a shard's
    /// set was full (`cluster_claims::DIRTY_MAX`).
    pub state_records: u64,
    pub state_coalesced: u64,
    pub state_flushed_early: u64,
    /// `Session` records that failed (written again with the lease), and whose answer never
    /// came (given up on, written again: `session_records::STALE_MS`).
    pub state_failed: u64,
    pub state_stale: u64,
    /// Persistent sessions whose `Session` record is on its way to Kafka (or waits for the
    /// lease after a failure): a gauge.
    pub session_records_in_flight: u64,
    /// Shared-subscription messages delivered again after the node they were left to lost
    /// its last member of the group.
    pub share_redelivered: u64,
}

impl std::ops::AddAssign for ClusterStats {
    fn add_assign(&mut self, o: ClusterStats) {
        let ClusterStats {
            taken_over,
            unconfirmed_closed,
            fenced_closed,
            handed_over,
            taken_over_in,
            handover_truncated,
            handover_timeouts,
            handover_gap_lost,
            remote_sessions,
            remote_sessions_refused,
            shares_refused,
            state_records,
            state_coalesced,
            state_flushed_early,
            state_failed,
            state_stale,
            session_records_in_flight,
            share_redelivered,
        } = o;
        self.taken_over += taken_over;
        self.unconfirmed_closed += unconfirmed_closed;
        self.fenced_closed += fenced_closed;
        self.handed_over += handed_over;
        self.taken_over_in += taken_over_in;
        self.handover_truncated += handover_truncated;
        self.handover_timeouts += handover_timeouts;
        self.handover_gap_lost += handover_gap_lost;
        self.remote_sessions += remote_sessions;
        self.remote_sessions_refused += remote_sessions_refused;
        self.shares_refused += shares_refused;
        self.state_records += state_records;
        self.state_coalesced += state_coalesced;
        self.state_flushed_early += state_flushed_early;
        self.state_failed += state_failed;
        self.state_stale += state_stale;
        self.session_records_in_flight += session_records_in_flight;
        self.share_redelivered += share_redelivered;
    }
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        let Stats {
            clients_connected,
            sessions,
            subscriptions,
            retained,
            messages_received,
            messages_sent,
            bytes_received,
            bytes_sent,
            received_by_qos,
            sent_by_qos,
            dropped_queue_full,
            dropped_slow_qos0,
            dropped_too_large,
            dropped_expired,
            malformed,
            orphaned_packets,
            slow_subscribers,
            store_refusals,
            preconnect_connections,
            preconnect_bytes,
            refused_preconnect,
            connect_timeouts,
            auth_failures,
            auth_busy,
            acl_denied,
            acl_dropped,
            cluster,
        } = o;
        self.clients_connected += clients_connected;
        self.sessions += sessions;
        self.subscriptions += subscriptions;
        self.retained += retained;
        self.messages_received += messages_received;
        self.messages_sent += messages_sent;
        self.bytes_received += bytes_received;
        self.bytes_sent += bytes_sent;
        for q in 0..3 {
            self.received_by_qos[q] += received_by_qos[q];
            self.sent_by_qos[q] += sent_by_qos[q];
        }
        self.dropped_queue_full += dropped_queue_full;
        self.dropped_slow_qos0 += dropped_slow_qos0;
        self.dropped_too_large += dropped_too_large;
        self.dropped_expired += dropped_expired;
        self.malformed += malformed;
        self.orphaned_packets += orphaned_packets;
        self.slow_subscribers += slow_subscribers;
        self.store_refusals += store_refusals;
        self.preconnect_connections += preconnect_connections;
        self.preconnect_bytes += preconnect_bytes;
        self.refused_preconnect += refused_preconnect;
        self.connect_timeouts += connect_timeouts;
        self.auth_failures += auth_failures;
        self.auth_busy += auth_busy;
        self.acl_denied += acl_denied;
        self.acl_dropped += acl_dropped;
        self.cluster += cluster;
    }
}
