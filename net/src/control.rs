//! The operator's way into a shard: questions from the HTTP endpoint (`sluice-admin`, on a
//! thread of its own) over one bounded channel per shard, each with its own reply channel.
//!
//! A shard answers one question per turn of its task, between its other work, so a scraper or
//! an admin request never holds a shard longer than one [`Shard::admin`] call; the HTTP side
//! never touches shard state. Bound: [`CONTROL_CHANNEL_REQUESTS`] questions waiting per shard;
//! a full channel makes the HTTP side answer 503 rather than queue more.
//!
//! [`Shard::admin`]: sluice_core::shard::Shard::admin

use std::rc::Rc;

use sluice_core::shard::{AdminQuery, AdminReply};
use tokio::sync::{mpsc, oneshot};

use crate::runtime::ShardRuntime;

/// One question for a shard and where its answer goes.
pub type ControlRequest = (AdminQuery, oneshot::Sender<AdminReply>);

/// Questions waiting for one shard, at most.
pub const CONTROL_CHANNEL_REQUESTS: usize = 64;

/// One channel per shard: the senders for the HTTP side, the receivers for [`crate::run`].
pub fn channels(n_shards: usize) -> (Vec<mpsc::Sender<ControlRequest>>, Vec<mpsc::Receiver<ControlRequest>>) {
    (0..n_shards).map(|_| mpsc::channel(CONTROL_CHANNEL_REQUESTS)).unzip()
}

/// Answers the questions arriving on `rx` until the HTTP side goes away.
pub(crate) async fn serve(rt: Rc<ShardRuntime>, mut rx: mpsc::Receiver<ControlRequest>) {
    while let Some((query, reply)) = rx.recv().await {
        let now = rt.now_ms();
        let answer = rt.shard.borrow_mut().admin(query, now);
        rt.dispatch();
        // The asker may have given up (time-out, closed connection): nothing to do then.
        let _ = reply.send(answer);
        futures_lite::future::yield_now().await;
    }
}
