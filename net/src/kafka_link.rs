//! One shard's link to the Kafka side, and the four tasks that move batches over it.
//!
//! The Kafka side (sluice-kafka, on tokio) is started by the binary; this crate sees only the
//! channels of [`KafkaLink`] and the `sluice-core` types that travel on them:
//! - records out: the runtime collects produce requests between hand-overs (its Kafka outbox),
//!   and one task sends them as one batch over the bounded `requests` channel (a full channel
//!   makes that task wait; the state machine's `max_pending_records_per_shard` stops the shard
//!   reading its sockets long before memory grows);
//! - results back: one task hands each batch of results to the spill log (confirmations,
//!   read-back of records waiting on disk) and then to the state machine;
//! - consumed records in (Kafka → MQTT): one task takes a batch only when the state machine
//!   routed all of the previous one (`kafka_records_waiting`) and the shard is not backlogged, so
//!   the bounded `inbound` channel fills and the consumers stop fetching: Kafka is the buffer;
//! - the cluster's claims in: a task of their own hands them over as they come (takeovers,
//!   handovers and leases never wait behind a slow device's queue).

use std::rc::Rc;
use std::time::Duration;

use sluice_core::bridge::{ProduceRequest, ProduceResult};
use sluice_core::inbound::InboundRecord;
use tokio::sync::mpsc;

use crate::runtime::ShardRuntime;
use crate::spill::{Spill, REPLAY_ID};

/// One shard's link to the Kafka side: records out, their results back, consumed records in.
pub struct KafkaLink {
    /// Batches of records for the producers (bounded by the Kafka side).
    pub requests: mpsc::Sender<Vec<ProduceRequest>>,
    /// Kafka's answers, one batch per hand-back.
    pub results: mpsc::UnboundedReceiver<Vec<ProduceResult>>,
    /// Records consumed for Kafka → MQTT (bounded by the Kafka side).
    pub inbound: mpsc::Receiver<Vec<InboundRecord>>,
    /// The cluster's claims consumed on this shard: handed over whenever they come, never
    /// held back like `inbound` (see `Shard::on_claim_records`).
    pub claims: mpsc::Receiver<Vec<InboundRecord>>,
}

/// Starts the link's tasks on this core; they end when their channel closes.
pub(crate) fn spawn(link: KafkaLink, rt: &Rc<ShardRuntime>) {
    let KafkaLink { requests, mut results, mut inbound, mut claims } = link;
    let c = rt.clone();
    glommio::spawn_local(async move {
        while let Some(batch) = claims.recv().await {
            let now = c.now_ms();
            c.shard.borrow_mut().on_claim_records(batch, now);
            c.dispatch();
        }
    })
    .detach();
    let c = rt.clone();
    glommio::spawn_local(async move {
        loop {
            // Let this core's connections drain what was just routed before routing more.
            futures_lite::future::yield_now().await;
            while c.backlogged() {
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
            if c.shard.borrow().kafka_records_waiting() {
                // Part of a batch waits for its receivers' room (acknowledgements, drained
                // output, other shards' answers): no new batch meanwhile, so the consumers
                // pause and Kafka keeps the records.
                let now = c.now_ms();
                let moved = c.shard.borrow_mut().feed_kafka_records(now);
                c.dispatch();
                if !moved {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                continue;
            }
            let Some(batch) = inbound.recv().await else { break };
            let now = c.now_ms();
            c.shard.borrow_mut().on_kafka_records(batch, now);
            c.dispatch();
        }
    })
    .detach();
    let c = rt.clone();
    glommio::spawn_local(async move {
        loop {
            c.kafka_ready.notified().await;
            let batch = {
                let mut out = c.kafka_outbox.borrow_mut();
                // The next hand-over is likely about as big: room for it, no regrowth.
                let room = out.len();
                std::mem::replace(&mut *out, Vec::with_capacity(room))
            };
            if !batch.is_empty() && requests.send(batch).await.is_err() {
                break;
            }
        }
    })
    .detach();
    let c = rt.clone();
    glommio::spawn_local(async move {
        while let Some(mut batch) = results.recv().await {
            if let Some(spill) = &c.spill {
                for r in &batch {
                    spill.confirm(r.id);
                }
                batch.retain(|r| r.id & REPLAY_ID == 0);
                c.to_kafka(spill.refill());
            }
            let now = c.now_ms();
            c.shard.borrow_mut().on_produce_results(batch, now);
            c.dispatch();
            // After the dispatch: records that just timed out are in the log by now.
            if c.shard.borrow().kafka_spilling() && c.spill.as_ref().is_some_and(Spill::drained) {
                c.shard.borrow_mut().end_spilling();
                c.dispatch();
            }
        }
    })
    .detach();
}
