//! This shard's end of the channel mesh to every other shard.
//!
//! Cross-shard messages the state machine produces are appended to one batch per peer
//! ([`Outbox::push`]); one sender task per peer ships whatever accumulated since its last send —
//! one channel operation per batch, not per message — and one receiver task per peer hands each
//! batch that arrives to the state machine in one call.
//!
//! Bounds: the mesh channel holds [`MESH_CHANNEL_BATCHES`] batches per ordered pair of shards (a
//! full one makes the sender task wait); a batch being filled for a peer holds any number of
//! messages, but past [`OUTBOX_MESSAGES_MAX`] the shard reports itself backlogged
//! ([`Outbox::backlogged`]) and stops reading its sockets until the peer catches up.
//! Per-publisher order holds because each pair of shards has one FIFO channel.
//!
//! This module knows the message type and the channels only, not the state machine: what to do
//! with a received batch is the caller's closure.

use std::cell::RefCell;
use std::rc::Rc;

use futures_lite::StreamExt;
use glommio::channels::channel_mesh::{Receivers, Senders};
use sluice_core::shard::ShardMsg;

use crate::notify::Notify;

/// Cross-shard channel depth, in batches. A full channel makes the sending shard wait, which in
/// turn stops it reading from its sockets: back-pressure rather than unbounded memory.
pub(crate) const MESH_CHANNEL_BATCHES: usize = 1024;

/// Messages waiting for one peer shard beyond which this shard stops reading its sockets until
/// the peer catches up (the mesh channel itself holds `MESH_CHANNEL_BATCHES` batches).
const OUTBOX_MESSAGES_MAX: usize = 64 * 1024;

/// Batches being filled for each peer shard (index = peer), and the flags that wake their
/// sender tasks.
pub(crate) struct Outbox {
    batches: RefCell<Vec<Vec<ShardMsg>>>,
    ready: Vec<Notify>,
}

impl Outbox {
    pub(crate) fn new(n_shards: usize) -> Outbox {
        Outbox {
            batches: RefCell::new((0..n_shards).map(|_| Vec::new()).collect()),
            ready: (0..n_shards).map(|_| Notify::default()).collect(),
        }
    }

    pub(crate) fn push(&self, to: usize, msg: ShardMsg) {
        self.batches.borrow_mut()[to].push(msg);
        self.ready[to].notify();
    }

    /// Whether some peer is so far behind that reading more input would only grow memory.
    pub(crate) fn backlogged(&self) -> bool {
        self.batches.borrow().iter().any(|b| b.len() > OUTBOX_MESSAGES_MAX)
    }
}

/// Receivers: one task per peer, each batch handed to `on_batch` as it arrives.
pub(crate) fn spawn_receivers(
    mut receivers: Receivers<Vec<ShardMsg>>,
    on_batch: impl Fn(Vec<ShardMsg>) + Clone + 'static,
) {
    for (_peer, mut stream) in receivers.streams() {
        let on_batch = on_batch.clone();
        glommio::spawn_local(async move {
            while let Some(batch) = stream.next().await {
                on_batch(batch);
            }
        })
        .detach();
    }
}

/// Senders: one task per peer, shipping whatever accumulated in `outbox` since its last send.
/// The tasks run until the handles are dropped.
pub(crate) fn spawn_senders(senders: Senders<Vec<ShardMsg>>, outbox: Rc<Outbox>, me: usize) -> Vec<glommio::Task<()>> {
    let senders = Rc::new(senders);
    let n = outbox.ready.len();
    let mut tasks = Vec::with_capacity(n.saturating_sub(1));
    for peer in (0..n).filter(|p| *p != me) {
        let outbox = outbox.clone();
        let senders = senders.clone();
        tasks.push(glommio::spawn_local(async move {
            loop {
                outbox.ready[peer].notified().await;
                let batch = std::mem::take(&mut outbox.batches.borrow_mut()[peer]);
                if batch.is_empty() {
                    continue;
                }
                if senders.send_to(peer, batch).await.is_err() {
                    break;
                }
            }
        }));
    }
    tasks
}
