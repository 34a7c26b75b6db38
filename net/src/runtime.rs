//! The per-core runtime: one [`Shard`] state machine and what carries out its decisions on
//! this core.
//!
//! Everything here is owned by this core's thread (`Rc`, `RefCell`, `Cell`); the only things
//! that cross threads are the batches on the channel mesh and the Kafka link. After every call
//! into the state machine its caller runs [`ShardRuntime::dispatch`], which takes the
//! [`Effects`] and carries them out: records for Kafka go to the spill log and/or the Kafka
//! outbox, retained changes to the retained store, connections with output or a close to the
//! connection driver, cross-shard messages to the mesh outbox, and wake-ups to the store tasks.
//!
//! Invariants: the state machine is borrowed only for one call at a time, never across an
//! `await`; `dispatch` runs after each such call, so no effect waits for an unrelated event; a
//! durable record is handed to Kafka only after the spill log took it (or refused, which
//! answers its publisher with 0x97).

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use sluice_core::bridge::{ProduceError, ProduceRequest, ProduceResult};
use sluice_core::shard::{Effects, Shard, VerifyJob};

use crate::access::SharedAccess;
use crate::conns::{Conns, Host};
use crate::mesh::Outbox;
use crate::notify::Notify;
use crate::spill::Spill;
use crate::store::{RetainedStore, SessionStore};

/// Memory freed by connections that had not completed CONNECT (a flood of them closing, say)
/// beyond which the ticker hands freed memory back to the operating system.
const RELEASE_MIN_BYTES: usize = 4 << 20;

/// The per-core state shared by this core's tasks.
pub(crate) struct ShardRuntime {
    pub(crate) shard: RefCell<Shard>,
    pub(crate) conns: Conns,
    /// Batches being filled for each peer shard.
    pub(crate) mesh: Rc<Outbox>,
    /// Records for Kafka since the last hand-over, and the flag that wakes the task handing over
    /// (`kafka_link`). Bounded by the state machine's `max_pending_records_per_shard`.
    pub(crate) kafka_outbox: RefCell<Vec<ProduceRequest>>,
    pub(crate) kafka_ready: Notify,
    pub(crate) spill: Option<Spill>,
    pub(crate) positions_file: Option<PathBuf>,
    pub(crate) retained: RetainedStore,
    pub(crate) sessions: SessionStore,
    /// Wakes the session store's commit task.
    pub(crate) sessions_ready: Notify,
    /// Wakes the task that runs retained scans in turns ([`Shard::run_retained`]).
    pub(crate) retained_ready: Notify,
    /// Password checks waiting to run off the reactor, and the flag that wakes their task.
    pub(crate) verify_queue: RefCell<std::collections::VecDeque<VerifyJob>>,
    pub(crate) verify_ready: Notify,
    /// The authentication rules every shard shares, and the generation this shard applies.
    pub(crate) access: Option<Arc<SharedAccess>>,
    access_generation: std::cell::Cell<u64>,
    wall_offset_ms: i64,
    epoch: Instant,
}

/// Password checks (argon2id: tens of milliseconds each) run at once per shard, on glommio's
/// blocking pool; the rest wait in `verify_queue`, their CONNECTs held.
const VERIFY_CONCURRENCY: usize = 4;

/// The parts a runtime is made of; [`ShardRuntime::new`] adds the queues and wake-up flags.
pub(crate) struct Parts {
    pub(crate) shard: Shard,
    pub(crate) conns: Conns,
    pub(crate) n_shards: usize,
    pub(crate) spill: Option<Spill>,
    pub(crate) positions_file: Option<PathBuf>,
    pub(crate) retained: RetainedStore,
    pub(crate) sessions: SessionStore,
    pub(crate) access: Option<Arc<SharedAccess>>,
    pub(crate) wall_offset_ms: i64,
    pub(crate) epoch: Instant,
}

impl ShardRuntime {
    pub(crate) fn new(p: Parts) -> ShardRuntime {
        ShardRuntime {
            shard: RefCell::new(p.shard),
            conns: p.conns,
            mesh: Rc::new(Outbox::new(p.n_shards)),
            kafka_outbox: RefCell::new(Vec::new()),
            kafka_ready: Notify::default(),
            spill: p.spill,
            positions_file: p.positions_file,
            retained: p.retained,
            sessions: p.sessions,
            sessions_ready: Notify::default(),
            retained_ready: Notify::default(),
            verify_queue: RefCell::new(std::collections::VecDeque::new()),
            verify_ready: Notify::default(),
            access_generation: std::cell::Cell::new(p.access.as_ref().map_or(0, |a| a.generation())),
            access: p.access,
            wall_offset_ms: p.wall_offset_ms,
            epoch: p.epoch,
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether some peer or Kafka is so far behind that reading more input would only grow
    /// memory.
    pub(crate) fn backlogged(&self) -> bool {
        self.mesh.backlogged() || self.shard.borrow().kafka_backlogged()
    }

    /// Records for the Kafka link's hand-over task.
    pub(crate) fn to_kafka(&self, mut records: Vec<ProduceRequest>) {
        self.to_kafka_from(&mut records);
    }

    /// Moves `records` to the outbox, leaving `records` empty: by swapping the vectors when the
    /// outbox is empty (no copy), by appending otherwise.
    fn to_kafka_from(&self, records: &mut Vec<ProduceRequest>) {
        if records.is_empty() {
            return;
        }
        let mut out = self.kafka_outbox.borrow_mut();
        if out.is_empty() {
            std::mem::swap(&mut *out, records);
        } else {
            out.append(records);
        }
        drop(out);
        self.kafka_ready.notify();
    }

    /// Carries out what the state machine decided since the last call.
    pub(crate) fn dispatch(&self) {
        let mut fx = self.shard.borrow_mut().drain_effects();
        for w in fx.warnings.drain(..) {
            tracing::warn!("{w}");
        }
        let mut refused = Vec::new();
        if !fx.produce.is_empty() {
            let mut spilled = Vec::new();
            if let Some(spill) = &self.spill {
                // Durable records go to the log first; whether they also go to Kafka now or wait
                // on disk behind older ones is the log's decision (`Spill::append`).
                fx.produce.retain(|req| !req.durable || spill.append(req, &mut refused, &mut spilled));
            }
            if !spilled.is_empty() {
                // On disk only for now; they come back through `refill` under replay ids.
                let now = self.now_ms();
                self.shard.borrow_mut().on_spilled(&spilled, now);
            }
            self.to_kafka_from(&mut fx.produce);
            // The emptied vector (the outbox's last one, sized like the last hand-over) serves
            // the state machine's next records: no regrowth per dispatch.
            self.shard.borrow_mut().recycle_produce_buffer(std::mem::take(&mut fx.produce));
        }
        self.apply(fx);
        if !refused.is_empty() {
            // Not on disk, so not acknowledged and not sent: the publisher hears 0x97.
            let now = self.now_ms();
            let mut shard = self.shard.borrow_mut();
            shard.on_durable(&refused, Err(ProduceError::SpillFull), now);
            shard.on_produce_results(refused.iter().map(|id| ProduceResult::failed(*id, ProduceError::SpillFull)), now);
            drop(shard);
            self.dispatch();
        }
    }

    /// The effects other than records for Kafka: stores, wake-ups, closes, cross-shard batches.
    fn apply(&self, mut fx: Effects) {
        for (topic, msg) in fx.retained.drain(..) {
            self.retained.record(&topic, msg.as_ref(), self.wall_offset_ms);
        }
        if fx.sessions_urgent {
            self.sessions_ready.notify();
        }
        if fx.retained_work {
            self.retained_ready.notify();
        }
        for id in fx.dirty {
            self.conns.output(id);
        }
        for id in fx.pause_reading {
            self.conns.pause_reading(id);
        }
        for id in fx.resume_reading {
            self.conns.resume_reading(id);
        }
        for id in fx.close {
            self.conns.close(id);
        }
        for (to, msg) in fx.to_shards {
            self.mesh.push(to, msg);
        }
        if !fx.verify.is_empty() {
            self.verify_queue.borrow_mut().extend(fx.verify);
            self.verify_ready.notify();
        }
    }

    /// New authentication rules since the last tick (a reload): this shard applies them.
    fn follow_access(&self) {
        let Some(access) = &self.access else { return };
        let generation = access.generation();
        if generation != self.access_generation.replace(generation) {
            access.install(&mut self.shard.borrow_mut());
        }
    }

    /// The spill log's group commit made `ids` durable (or failed): their publishers hear it.
    pub(crate) fn on_durable(&self, ids: &[u64], outcome: Result<(), ProduceError>) {
        let now = self.now_ms();
        self.shard.borrow_mut().on_durable(ids, outcome, now);
        self.dispatch();
    }

    /// One tick of the state machine (keep-alive, delayed wills, session expiry, `$SYS`) and the
    /// periodic work around it: spill statistics, memory release, positions, session commit.
    pub(crate) fn tick(&self, sys_interval_ms: u64, release_memory: fn()) {
        self.follow_access();
        let now = self.now_ms();
        if let Some(spill) = &self.spill {
            let (backlog, disk_bytes, replayed) = spill.stats();
            self.shard.borrow_mut().set_spill_stats(backlog, disk_bytes, replayed);
        }
        self.shard.borrow_mut().tick(now, sys_interval_ms);
        // Measured: without this, 60 MiB of partial CONNECTs freed stayed resident (mimalloc
        // purges freed pages only on later allocator work an idle shard lacks).
        if self.shard.borrow_mut().take_preconnect_released() >= RELEASE_MIN_BYTES {
            release_memory();
        }
        self.store_positions();
        self.sessions_ready.notify();
        self.dispatch();
    }

    /// Stores the Kafka → MQTT positions if they moved (temp file + rename: never half-written).
    pub(crate) fn store_positions(&self) {
        let Some(path) = &self.positions_file else { return };
        let Some(p) = self.shard.borrow_mut().take_positions() else { return };
        let tmp = path.with_extension("tmp");
        let res = std::fs::create_dir_all(path.parent().unwrap_or(std::path::Path::new(".")))
            .and_then(|_| std::fs::write(&tmp, sluice_core::inbound::encode_positions(&p)))
            .and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = res {
            tracing::warn!(path = %path.display(), error = %e, "cannot store Kafka → MQTT positions");
        }
    }
}

/// The connection driver sees the runtime only through this.
impl Host for ShardRuntime {
    fn conns(&self) -> &Conns {
        &self.conns
    }

    fn shard(&self) -> &RefCell<Shard> {
        &self.shard
    }

    fn now_ms(&self) -> u64 {
        ShardRuntime::now_ms(self)
    }

    fn dispatch(&self) {
        ShardRuntime::dispatch(self)
    }

    fn backlogged(&self) -> bool {
        ShardRuntime::backlogged(self)
    }
}

/// The session store's commit task: commits when the state machine asks (or each tick).
pub(crate) async fn session_commits(rt: Rc<ShardRuntime>) {
    loop {
        rt.sessions_ready.notified().await;
        rt.sessions.commit(&rt.shard, &rt.retained, || rt.now_ms()).await;
        rt.dispatch();
    }
}

/// Password checks off the reactor, at most [`VERIFY_CONCURRENCY`] at once; each result goes
/// back to the state machine, which answers the CONNECT.
pub(crate) async fn password_checks(rt: Rc<ShardRuntime>) {
    let running = Rc::new(std::cell::Cell::new(0usize));
    let done = Rc::new(Notify::default());
    loop {
        while running.get() < VERIFY_CONCURRENCY {
            let Some(job) = rt.verify_queue.borrow_mut().pop_front() else { break };
            running.set(running.get() + 1);
            let (rt, running, done) = (rt.clone(), running.clone(), done.clone());
            glommio::spawn_local(async move {
                let conn = job.conn;
                let ok = glommio::executor().spawn_blocking(move || job.run()).await;
                let now = rt.now_ms();
                rt.shard.borrow_mut().on_verified(conn, ok, now);
                rt.dispatch();
                running.set(running.get() - 1);
                done.notify();
            })
            .detach();
        }
        futures_lite::future::or(rt.verify_ready.notified(), done.notified()).await;
    }
}

/// Retained lookups for new subscriptions: one bounded slice of scanning per turn, then the
/// core's connections and other tasks run before the next (a lookup over 100,000 retained
/// messages must not stall the shard).
pub(crate) async fn retained_scans(rt: Rc<ShardRuntime>) {
    loop {
        rt.retained_ready.notified().await;
        loop {
            let now = rt.now_ms();
            let more = rt.shard.borrow_mut().run_retained(now);
            rt.dispatch();
            if !more {
                break;
            }
            futures_lite::future::yield_now().await;
        }
    }
}

/// The spill log's group commits: the publishers of the records each one covered get their
/// acknowledgements. Runs only when the shard has a spill log.
pub(crate) async fn spill_commits(rt: Rc<ShardRuntime>) {
    let Some(spill) = &rt.spill else { return };
    loop {
        let (ids, outcome) = spill.commit().await;
        rt.on_durable(&ids, outcome);
        spill.persist_cursor();
    }
}
