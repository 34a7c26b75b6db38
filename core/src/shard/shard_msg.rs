//! The messages shards send each other: the only way one shard affects another.
//!
//! Each pair of shards has one FIFO channel, so messages from one shard arrive at another in
//! the order they were sent (per-publisher order, claim before transfer, join before deliver).

use std::sync::Arc;

use super::{ClientId, ConnId, Msg, Receipt, Session, ShardId, ShareMember, Stats, SubOptions};

/// Work one shard asks of another.
#[derive(Debug)]
pub enum ShardMsg {
    Publish(Msg),
    /// A publish whose sender waits until what it changed here is durable (queued for a
    /// persistent session, or a retained message stored): answer [`ShardMsg::Receipt`] then.
    PublishReceipt {
        msg: Msg,
        receipt: Receipt,
    },
    /// The answer to a receipt: this shard is done, and `more` shards it forwarded the message
    /// to (shared subscriptions) will answer too.
    Receipt {
        token: u64,
        more: u32,
        /// What this shard stored for the message could not be committed (disk full, I/O
        /// error): the acknowledgement waiting for it must refuse instead.
        failed: bool,
    },
    /// To the directory shard: `host` wants the session of `client_id` for connection `conn`.
    Claim {
        client_id: ClientId,
        host: ShardId,
        conn: ConnId,
        clean_start: bool,
    },
    /// To the previous host: close the old connection and send the session to `to`.
    Evict {
        client_id: ClientId,
        to: ShardId,
        conn: ConnId,
        clean_start: bool,
    },
    /// To the new host: the session (if any) for the pending connection `conn`; with none on
    /// this node, `remote` names the cluster node that holds it, if one does.
    Transfer {
        client_id: ClientId,
        conn: ConnId,
        session: Option<Box<Session>>,
        remote: Option<Arc<str>>,
    },
    /// To the directory shard: the session ended on `host`.
    Release {
        client_id: ClientId,
        host: ShardId,
    },
    /// To the directory shard: the claim it answered last for `client_id` is carried out; the
    /// claimer `host` now hosts the session (`hosting`) or, its connection gone, ended it. The
    /// next waiting claim may go ahead.
    Settled {
        client_id: ClientId,
        host: ShardId,
        hosting: bool,
    },
    /// To every shard, for a session's new subscriptions: scan the retained messages matching
    /// `filters` and answer in slices ([`ShardMsg::RetainedReply`]), one per credit.
    RetainedQuery {
        from: ShardId,
        scan: u64,
        client_id: ClientId,
        filters: Vec<String>,
    },
    /// One slice of a scan: messages with the index of the filter they matched. `done`: the
    /// owner `from` has nothing more for this scan.
    RetainedReply {
        from: ShardId,
        scan: u64,
        client_id: ClientId,
        msgs: Vec<(u32, Msg)>,
        done: bool,
    },
    /// To an owner: the subscriber's backlog ran low, send the next slice of `scan`.
    RetainedMore {
        from: ShardId,
        scan: u64,
    },
    /// To an owner: the session went away, drop `scan`.
    RetainedCancel {
        from: ShardId,
        scan: u64,
    },
    /// To the group's owner. With `ack`, the owner answers [`ShardMsg::ShareJoined`] so that the
    /// SUBACK goes out only once the member can receive.
    ShareJoin {
        key: String,
        member: ShareMember,
        ack: Option<ConnId>,
    },
    ShareJoined {
        conn: ConnId,
    },
    ShareLeave {
        key: String,
        client_id: ClientId,
    },
    /// To a group's owner, from the shard of its member `client_id`: the member's window
    /// filled or it has messages queued (`busy`), or it has room again (at most half its
    /// window in flight, nothing queued). Sent on those changes only.
    ShareBusy {
        key: String,
        client_id: ClientId,
        busy: bool,
    },
    ShareDeliver {
        client_id: ClientId,
        msg: Msg,
        opts: SubOptions,
        sub_id: Option<u32>,
        receipt: Option<Receipt>,
    },
    /// To shard 0: this shard's counters, for the `$SYS/broker/...` totals.
    Stats {
        from: ShardId,
        stats: Box<Stats>,
    },
}
